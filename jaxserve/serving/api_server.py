"""The OpenAI-compatible HTTP server (aiohttp) in front of the orchestrator.

    POST /v1/completions | /v1/chat/completions  (JSON body, <= client_max_size bytes)
      --auth (Bearer, when --api-key is set) --parse + validate (400 naming the field)-->
      prompt ids (tokenizer.encode, or token ids as given; chat: chat.render_chat first)
      --Request(cmpl-<hex>, ids, SamplingParams, arrival = server arrival)-->
      Orchestrator.generate (ValueError -> 400, QueueFull -> 503) --Delta stream-->
        stream=false: one completion object with usage
        stream=true:  SSE "data: {chunk}" per Delta, [usage chunk], "data: [DONE]"
      client gone (write fails, or the socket is closing) --> the Delta iterator is closed -->
      the orchestrator aborts the request and its blocks are freed on every instance
      each request's end --> ServerMetrics (TTFT, TPOT, e2e, tokens, finish reasons)
      each request that ran to its end (stop / length) --> WorkloadWindow (the last 10 minutes)
    GET /v1/models, /v1/models/{id}, /health (200 once is_ready(), else 503), /metrics (Prometheus)
    GET /v1/workload: arrival rate and length percentiles of the recent window;
        ?format=jsonl: the window as a trace for ``python -m planner --workload FILE.jsonl`` (replanning)

Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400
invalid field (``param`` names it), prompt too long (code ``context_length_exceeded``),
malformed JSON or a non-object body; 401 bad or missing bearer token (``/v1/*`` only);
404 unknown model or route; 413 body over ``max_body_bytes``; 503 not ready, shutting
down or admission queue full (with ``Retry-After``); 500 engine failure. No traceback
ever reaches a client.

Choices (documented, as vLLM does them):
  * ``max_tokens`` defaults to 16 for completions (OpenAI's); for chat to the rest of the
    context. A value past the context is capped to ``max_model_len - prompt_tokens`` (the
    request then ends with ``length`` there), not refused; a prompt of ``max_model_len``
    tokens or more is refused (400), since it leaves no room for a token.
  * ``model`` may be omitted (the one served model); any other name is 404.
  * ``top_k`` above the vocabulary means "off" and is sent as 0.
  * Not supported, 400 if set to anything but the default: ``n``/``best_of`` != 1, ``echo``,
    ``logprobs``, ``suffix``, ``logit_bias``, penalties, ``tools``. Unknown fields are ignored.
  * Extensions (vLLM's names): ``ignore_eos``, ``stop_token_ids``,
    ``include_stop_str_in_output``, ``return_token_ids`` (adds ``token_ids`` to each choice).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from jaxserve.engine.frontend import Delta
from jaxserve.errors import EngineUnavailable
from jaxserve.request import FinishReason, Request, SamplingError, SamplingParams
from jaxserve.serving.chat import ChatError, render_chat
from jaxserve.serving.metrics import ServerMetrics
from jaxserve.serving.orchestrator import Orchestrator, QueueFull
from jaxserve.serving.workload import WorkloadWindow

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4
CLIENT_POLL_S = 0.25  # how often a request waiting for its first token checks that its client is still there
# fields that are fine at their default and refused otherwise
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "suffix": ("",), "logit_bias": ({},),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "top_logprobs": (0,), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},)}
SSE_DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass
class ServerState:
    orchestrator: Orchestrator
    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None
    is_ready: Callable[[], bool]
    metrics: ServerMetrics
    max_body_bytes: int
    workload: WorkloadWindow = dataclasses.field(default_factory=WorkloadWindow)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("jaxserve_state", ServerState)


class ApiError(Exception):
    """An answer in OpenAI's error shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad(param: str, why: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code=code)


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- field parsing ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(body: dict[str, Any], key: str, default: int | None, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(key, f"must be an integer, got {_show(v)}")
    if lo is not None and v < lo:
        raise bad(key, f"must be >= {lo}, got {v}")
    return v


def get_num(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise bad(key, f"must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:  # an integer past float range
        f = math.inf
    if not math.isfinite(f):
        raise bad(key, f"must be a finite number, got {_show(v)}")
    return f


def get_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"must be true or false, got {_show(v)}")
    return v


def get_stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"must be a string or a list of strings, got {_show(v)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if not all(stops):
        raise bad("stop", "stop strings must not be empty")
    return tuple(stops)


def check_token_ids(ids: list[Any], param: str, vocab_size: int) -> list[int]:
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise bad(param, f"item {i} must be an integer token id, got {_show(t)}")
        if not 0 <= t < vocab_size:
            raise bad(param, f"token id {t} at position {i} is outside the vocabulary [0, {vocab_size})")
    return list(ids)


def check_model(body: dict[str, Any], st: ServerState) -> None:
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise bad("model", f"must be a string, got {_show(m)}")
    if m != st.model_name:
        raise ApiError(404, f"The model `{m}` does not exist (this server serves `{st.model_name}`)",
                       param="model", code="model_not_found")


def check_unsupported(body: dict[str, Any]) -> None:
    for key, allowed in UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and not any(v == ok and type(v) is type(ok) for ok in allowed):
            raise bad(key, f"not supported by this server (got {_show(v)})", code="unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"only n=1 is supported, got {_show(n)}", code="unsupported_parameter")


def encode_text(text: str, st: ServerState, param: str) -> list[int]:
    if st.tokenizer is None:
        raise bad(param, "this model has no tokenizer; send the prompt as a list of token ids")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): the tokenizer would raise TypeError
        raise bad(param, f"is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}") from e
    return list(st.tokenizer.encode(text))


def parse_prompt(body: dict[str, Any], st: ServerState) -> tuple[list[int], str | None]:
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "is required")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "must not be empty")
        return encode_text(p, st, "prompt"), p
    if isinstance(p, list):
        if not p:
            raise bad("prompt", "must not be empty")
        if any(isinstance(t, str | list) for t in p):
            raise bad("prompt", "a batch of several prompts is not supported; send one request per prompt")
        return check_token_ids(p, "prompt", st.vocab_size), None
    raise bad("prompt", f"must be a string or a list of token ids, got {type(p).__name__}")


def parse_sampling(body: dict[str, Any], st: ServerState, num_prompt: int, max_tokens_keys: tuple[str, ...],
                   default_max_tokens: int | None) -> SamplingParams:
    room = st.max_model_len - num_prompt
    if room < 1:
        raise bad("prompt", f"has {num_prompt} tokens; this model's context is {st.max_model_len} tokens, so a "
                  f"prompt may have at most {st.max_model_len - 1}", code="context_length_exceeded")
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = get_int(body, key, None, lo=1)
        if max_tokens is not None:
            break
    max_tokens = min(max_tokens or default_max_tokens or room, room)  # capped to the context (see above)
    top_k = get_int(body, "top_k", 0, lo=-1)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        raise bad("stop_token_ids", f"must be a list of token ids, got {_show(stop_ids)}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=get_num(body, "temperature", 1.0),
            top_p=get_num(body, "top_p", 1.0),
            top_k=0 if top_k >= st.vocab_size else top_k,
            seed=get_int(body, "seed", None),
            stop=get_stop(body),
            stop_token_ids=tuple(check_token_ids(stop_ids or [], "stop_token_ids", st.vocab_size)),
            ignore_eos=get_bool(body, "ignore_eos", False),
            include_stop_str_in_output=get_bool(body, "include_stop_str_in_output", False),
        )
    except SamplingError as e:  # ranges: "field: why, got value"
        raise bad(str(e).split(":", 1)[0], str(e).split(":", 1)[1].strip()) from e


def param_of(e: Exception) -> str | None:
    """The field an engine-side ValueError is about, from its message."""
    msg = str(e)
    m = re.match(r"(\w+):", msg)
    if m and m.group(1) in ("prompt", "stop", "max_tokens", "temperature", "top_p", "top_k", "seed",
                            "stop_token_ids"):
        return m.group(1)
    if msg.startswith("prompt"):
        return "prompt"
    if "max_tokens" in msg:
        return "max_tokens"
    return None


@dataclasses.dataclass
class Job:
    """One admitted-to-be request and how to answer it."""

    request: Request
    chat: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def parse_job(body: dict[str, Any], st: ServerState, *, chat: bool, arrival: float) -> Job:
    check_model(body, st)
    check_unsupported(body)
    if chat:
        try:
            text = render_chat(body.get("messages"))
        except ChatError as e:
            raise ApiError(400, str(e), param=e.param) from e
        ids = encode_text(text, st, "messages")
        sampling = parse_sampling(body, st, len(ids), ("max_completion_tokens", "max_tokens"), None)
    else:
        ids, text = parse_prompt(body, st)
        sampling = parse_sampling(body, st, len(ids), ("max_tokens",), DEFAULT_MAX_TOKENS)
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "only allowed when stream is true")
        if not isinstance(opts, dict):
            raise bad("stream_options", f"must be an object, got {_show(opts)}")
        include_usage = get_bool(opts, "include_usage", False)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    return Job(Request(rid, ids, sampling, prompt=text, arrival_time=arrival), chat, stream, include_usage,
               get_bool(body, "return_token_ids", False), st.model_name)


# ---- response objects ------------------------------------------------------------------------
def _reason(r: FinishReason | None) -> str | None:
    return None if r is None else r.value


def usage(job: Job, num_out: int) -> dict[str, int]:
    n = job.request.num_prompt_tokens
    return {"prompt_tokens": n, "completion_tokens": num_out, "total_tokens": n + num_out}


def chunk(job: Job, d: Delta, first: bool) -> dict[str, Any]:
    if job.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": d.text} if first else (
            {"content": d.text} if d.text else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": d.text}
    choice.update(logprobs=None, finish_reason=_reason(d.finish_reason))
    if job.return_token_ids:
        choice["token_ids"] = d.token_ids
    out = {"id": job.request.request_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
           "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def completion(job: Job, text: str, token_ids: list[int], reason: FinishReason | None) -> dict[str, Any]:
    if job.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=None, finish_reason=_reason(reason))
    if job.return_token_ids:
        choice.update(token_ids=token_ids, prompt_token_ids=job.request.prompt_token_ids)
    return {"id": job.request.request_id, "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created, "model": job.model, "choices": [choice], "usage": usage(job, len(token_ids))}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"  # ASCII JSON: never an encoding error


ENGINE_ERROR = "the engine failed while running this request"


# ---- running a request -----------------------------------------------------------------------
def client_gone(http: web.Request) -> bool:
    t = http.transport
    return t is None or t.is_closing()


async def first_delta(http: web.Request, agen: Any) -> Delta | None:
    """The first delta; None if the client left while the request queued (it is aborted then).

    The wait for a first token can be long (queueing under a burst), so the socket is checked
    every ``CLIENT_POLL_S``; later deltas come every engine step and are checked as they come.
    """
    task = asyncio.ensure_future(agen.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=CLIENT_POLL_S)
            if done:
                return task.result()
            if client_gone(http):
                task.cancel()  # the generator's cleanup tells the orchestrator to abort
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    except asyncio.CancelledError:
        task.cancel()
        raise


async def admit(http: web.Request, st: ServerState, job: Job) -> tuple[Any, Delta | None]:
    """Start the request; returns (delta iterator, first delta or None if the client left).

    Errors before the first token become ApiError (400 / 503 / 500)."""
    agen = st.orchestrator.generate(job.request)
    try:
        return agen, await first_delta(http, agen)
    except QueueFull as e:
        st.metrics.observe_rejected("queue_full")
        raise ApiError(503, f"server busy: {e}", code="queue_full", headers={"Retry-After": "1"}) from e
    except SamplingError as e:
        st.metrics.observe_rejected("invalid")
        raise ApiError(400, str(e), param=param_of(e)) from e
    except ValueError as e:
        st.metrics.observe_rejected("invalid")
        raise ApiError(400, str(e), param=param_of(e)) from e
    except TimeoutError as e:
        st.metrics.observe_rejected("timeout")
        raise ApiError(503, "timed out waiting for the engine", code="timeout", headers={"Retry-After": "1"}) from e
    except EngineUnavailable as e:
        st.metrics.observe_rejected("unavailable")
        raise ApiError(503, f"engine unavailable: {e}", code="unavailable", headers={"Retry-After": "5"}) from e
    except StopAsyncIteration as e:
        raise ApiError(500, ENGINE_ERROR, code="engine_error") from e


async def run_job(http: web.Request, st: ServerState, job: Job) -> web.StreamResponse:
    arrival = job.request.arrival_time
    agen, d = await admit(http, st, job)
    if d is None:
        st.metrics.observe_finished(job.request, arrival=arrival, first_token=None, finish=time.perf_counter(),
                                    num_output_tokens=0, finish_reason="abort")
        return web.Response(status=499, text="client closed the connection")
    st.metrics.observe_admitted(job.request.num_prompt_tokens)
    text: list[str] = []
    ids: list[int] = []
    first_token: float | None = None
    reason: str = "abort"  # unless the stream reaches its end
    resp: web.StreamResponse | None = None
    try:
        if job.stream:
            resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            resp.content_type = "text/event-stream"
            resp.charset = "utf-8"
            await resp.prepare(http)
        first = True
        while True:
            if client_gone(http):
                raise ConnectionResetError("client disconnected")
            if d.finish_reason == FinishReason.ERROR:
                reason = "error"
                break
            if resp is not None:
                await resp.write(sse(chunk(job, d, first)))
            first = False
            text.append(d.text)
            ids += d.token_ids
            if first_token is None and d.token_ids:
                first_token = time.perf_counter()
            if d.finish_reason is not None:
                reason = d.finish_reason.value
                break
            d = await agen.__anext__()
        if resp is None:
            if reason == "error":
                raise ApiError(500, ENGINE_ERROR, code="engine_error")
            return web.json_response(completion(job, "".join(text), ids, d.finish_reason))
        if reason == "error":
            await resp.write(sse(ApiError(500, ENGINE_ERROR, code="engine_error").body()))
        elif job.include_usage:
            await resp.write(sse({"id": job.request.request_id,
                                  "object": "chat.completion.chunk" if job.chat else "text_completion",
                                  "created": job.created, "model": job.model, "choices": [],
                                  "usage": usage(job, len(ids))}))
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp
    except asyncio.CancelledError:  # the handler was cancelled: abort (the finally below)
        reason = "abort"
        raise
    except ConnectionError:  # the client went away: abort (the finally below); nobody reads the answer
        reason = "abort"
        return resp if resp is not None else web.Response(status=499, text="client closed the connection")
    except (TimeoutError, StopAsyncIteration) as e:
        reason = "error"
        if resp is None:
            raise ApiError(500, f"{ENGINE_ERROR}: no output in time", code="engine_error") from e
        await _try_write(resp, sse(ApiError(500, ENGINE_ERROR, code="engine_error").body()) + SSE_DONE)
        return resp
    except Exception:
        reason = "error"
        if resp is None or not resp.prepared:
            raise  # the middleware answers 500
        log.exception("streaming %s failed", job.request.request_id)
        await _try_write(resp, sse(ApiError(500, "internal server error", code="internal_error").body()) + SSE_DONE)
        return resp
    finally:
        await agen.aclose()  # not finished -> the orchestrator aborts it and frees its blocks
        st.metrics.observe_finished(job.request, arrival=arrival, first_token=first_token,
                                    finish=time.perf_counter(), num_output_tokens=len(ids), finish_reason=reason)
        if reason in ("stop", "length") and ids:
            st.workload.observe(arrival, job.request.num_prompt_tokens, len(ids))


async def _try_write(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
        await resp.write_eof()
    except ConnectionError:
        pass


# ---- handlers ---------------------------------------------------------------------------------
async def read_json(http: web.Request, st: ServerState) -> dict[str, Any]:
    try:
        raw = await http.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body is larger than the limit of {st.max_body_bytes} bytes",
                       code="request_too_large") from e
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _ready(st: ServerState) -> bool:
    try:
        return bool(st.is_ready())
    except Exception:  # a failing readiness probe means "not ready"
        log.exception("is_ready() failed")
        return False


async def _generate(http: web.Request, chat: bool) -> web.StreamResponse:
    arrival = time.perf_counter()
    st = http.app[STATE]
    if not _ready(st):
        raise ApiError(503, "the server is starting or shutting down; retry shortly", code="not_ready",
                       headers={"Retry-After": "1"})
    try:
        job = parse_job(await read_json(http, st), st, chat=chat, arrival=arrival)
    except ApiError:
        st.metrics.observe_rejected("invalid")
        raise
    return await run_job(http, st, job)


async def completions(http: web.Request) -> web.StreamResponse:
    return await _generate(http, chat=False)


async def chat_completions(http: web.Request) -> web.StreamResponse:
    return await _generate(http, chat=True)


def _model_card(st: ServerState) -> dict[str, Any]:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "jaxserve",
            "max_model_len": st.max_model_len}


async def models(http: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(http.app[STATE])]})


async def model(http: web.Request) -> web.Response:
    st = http.app[STATE]
    name = http.match_info["model"]
    if name != st.model_name:
        raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
    return web.json_response(_model_card(st))


async def health(http: web.Request) -> web.Response:
    if _ready(http.app[STATE]):
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "starting"}, status=503)


async def metrics_endpoint(http: web.Request) -> web.Response:
    st = http.app[STATE]
    text = st.metrics.render(st.orchestrator.engine, num_in_flight=st.orchestrator.num_in_flight)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def workload(http: web.Request) -> web.StreamResponse:
    st = http.app[STATE]
    fmt = http.query.get("format", "json")
    now = time.perf_counter()  # the clock of Request.arrival_time
    if fmt == "json":
        return web.json_response(st.workload.summary(now))
    if fmt == "jsonl":
        lines = "".join(json.dumps(r) + "\n" for r in st.workload.trace_rows(now))
        return web.Response(text=lines, content_type="application/x-ndjson")
    raise bad("format", f"must be 'json' or 'jsonl', got {_show(fmt)}")


# ---- middleware -------------------------------------------------------------------------------
@web.middleware
async def errors_middleware(http: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        return await handler(http)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        return ApiError(e.status, f"{e.reason}: {http.method} {http.path}", code=code).response()
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", http.method, http.path)
        return ApiError(500, "internal server error", code="internal_error").response()


@web.middleware
async def auth_middleware(http: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    key = http.app[STATE].api_key
    if key and http.path.startswith("/v1"):
        got = http.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(http)


def create_app(orchestrator: Orchestrator, tokenizer: Any, *, model_name: str, max_model_len: int,
               vocab_size: int, api_key: str | None = None, is_ready: Callable[[], bool] = lambda: True,
               metrics: ServerMetrics | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> web.Application:
    """The aiohttp application; the caller starts/stops the orchestrator and runs the app."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors_middleware, auth_middleware])
    app[STATE] = ServerState(orchestrator, tokenizer, model_name, max_model_len, vocab_size, api_key or None,
                             is_ready, metrics if metrics is not None else ServerMetrics(model_name), max_body_bytes)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/workload", workload)
    return app
