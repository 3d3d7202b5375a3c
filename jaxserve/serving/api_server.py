"""The OpenAI-compatible HTTP server (aiohttp) in front of the orchestrator: routes, auth, errors.

    POST /v1/completions | /v1/chat/completions  (JSON body, <= client_max_size bytes)
      --auth (Bearer, when --api-key is set) --read_body (size, content type)--> bytes
      --admission (requests being parsed count against --max-queue)--> a worker thread:
        decode_json + protocol.parse_jobs (validate, 400 naming the field; tokenize)--> a Job per
        prompt (arrival = server arrival); the event loop stays free meanwhile
      --streaming.run_job (batch.run_batch for several prompts)--> Orchestrator.generate --Delta
        stream--> completion object or SSE stream;
        the request's end --> ServerMetrics and WorkloadWindow
    GET /v1/models, /v1/models/{id}, /health (200 once is_ready(), else 503), /metrics (Prometheus)
    POST /tokenize, /detokenize, GET /version: vLLM's token utilities (``jaxserve.serving.tokenize``)
    GET /v1/workload: arrival rate and length percentiles of the recent window;
        ?format=jsonl: the window as a trace for ``python -m planner --workload FILE.jsonl`` (replanning)

Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400
invalid field (``param`` names it), prompt too long (code ``context_length_exceeded``),
malformed JSON or a non-object body; 401 bad or missing bearer token (``/v1/*`` only);
403 a Host or browser Origin not allowed (``jaxserve.serving.origins``); 404 unknown model or route;
408 a body not received within ``body_timeout_s``; 413 body over ``max_body_bytes``; 415 a body that is not declared
``application/json`` (what keeps a web page from posting without a CORS preflight); 503 not ready, shutting
down or admission queue full (with ``Retry-After``); 500 engine failure. No traceback
ever reaches a client. A client's ``X-Request-Id`` header is echoed on the answer. Request fields and the choices made about them: ``jaxserve.serving.protocol``;
streaming, aborts and what is recorded at a request's end: ``jaxserve.serving.streaming``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from jaxserve.serving.batch import run_batch
from jaxserve.serving.fields import ApiError, bad, show
from jaxserve.serving.metrics import ServerMetrics
from jaxserve.serving.orchestrator import Orchestrator
from jaxserve.serving.origins import cors_headers
from jaxserve.serving.origins import make_middleware as make_origin_middleware
from jaxserve.serving.protocol import parse_jobs
from jaxserve.serving.streaming import run_job
from jaxserve.serving.tokenize import add_routes as tokenize_routes
from jaxserve.serving.workload import WorkloadWindow

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclasses.dataclass
class ServerState:
    """What every handler reads: the orchestrator, the served model, limits, metrics and the workload window."""

    orchestrator: Orchestrator
    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None
    is_ready: Callable[[], bool]
    metrics: ServerMetrics
    max_body_bytes: int
    body_timeout_s: float = 30.0  # to receive a request's body (408 after)
    chat_template: Any = None  # the model's own (jaxserve.serving.chat_template.ChatTemplate), if it ships one
    chat_stop_ids: tuple[int, ...] = ()  # its end-of-turn tokens: chat requests stop there by default
    metrics_need_key: bool = False  # /metrics behind the API key too
    workload: WorkloadWindow = dataclasses.field(default_factory=WorkloadWindow)
    parser: ThreadPoolExecutor = dataclasses.field(  # JSON + tokenization, one request at a time
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="jaxserve-parse"))
    parsing: int = 0  # requests read and not yet parsed (the event loop's count)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("jaxserve_state", ServerState)


# ---- handlers ---------------------------------------------------------------------------------
async def read_body(http: web.Request, st: ServerState) -> bytes:
    """The request body, checked for size and content type (on the event loop: cheap)."""
    try:  # a client trickling its body holds a connection and a handler: bounded
        raw = await asyncio.wait_for(http.read(), st.body_timeout_s)
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body is larger than the limit of {st.max_body_bytes} bytes",
                       code="request_too_large") from e
    except asyncio.TimeoutError as e:
        raise ApiError(408, f"request body not received within {st.body_timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from e
    if http.content_type != "application/json":  # aiohttp: the mimetype, without parameters
        # a browser page may send text/plain or a form to a local server without a CORS preflight:
        # requiring JSON makes any cross-origin POST need one (and the server answers no preflight)
        got = http.headers.get("Content-Type")
        raise ApiError(415, f"Content-Type must be application/json, got {show(got) if got else 'none'}",
                       code="unsupported_media_type")
    return raw


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (a worker thread: a 1 MB body is milliseconds of parsing)."""
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
        raw = await read_body(http, st)
    except ApiError:
        st.metrics.observe_rejected("invalid")
        raise
    orch = st.orchestrator
    if st.parsing + orch.num_in_flight >= orch.max_queue:  # requests still being parsed count too
        st.metrics.observe_rejected("queue_full")
        raise ApiError(503, f"server busy: {st.parsing} requests being parsed and {orch.num_in_flight} in flight "
                       f"(limit {orch.max_queue})", code="queue_full", headers={"Retry-After": "1"})
    st.parsing += 1
    try:  # JSON and tokenization off the event loop: a long prompt never stalls other streams
        jobs = await asyncio.get_running_loop().run_in_executor(
            st.parser, lambda: parse_jobs(decode_json(raw), st, chat=chat, arrival=arrival))
    except ApiError:
        st.metrics.observe_rejected("invalid")
        raise
    finally:
        st.parsing -= 1
    if len(jobs) == 1:
        return await run_job(http, jobs[0], orch, st.metrics, st.workload)
    if st.parsing + orch.num_in_flight + len(jobs) > orch.max_queue:  # every prompt is a request
        st.metrics.observe_rejected("queue_full")
        raise ApiError(503, f"server busy: {len(jobs)} prompts and {orch.num_in_flight} requests in flight "
                       f"(limit {orch.max_queue})", code="queue_full", headers={"Retry-After": "1"})
    return await run_batch(http, jobs, orch, st.metrics, st.workload)


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
    text = st.metrics.render(st.orchestrator.engine.stats(), num_in_flight=st.orchestrator.num_in_flight)
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
    raise bad("format", f"must be 'json' or 'jsonl', got {show(fmt)}")


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
    st = http.app[STATE]
    key = st.api_key
    guarded = http.path.startswith("/v1") or http.path in ("/tokenize", "/detokenize")
    if key and (guarded or (st.metrics_need_key and http.path == "/metrics")):
        got = http.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        # header bytes that are not UTF-8 arrive as surrogate escapes: compare bytes, never raise
        token_bytes = token.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_bytes, key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(http)


def create_app(orchestrator: Orchestrator, tokenizer: Any, *, model_name: str, max_model_len: int,
               vocab_size: int, api_key: str | None = None, is_ready: Callable[[], bool] = lambda: True,
               metrics: ServerMetrics | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = 30.0, allowed_origins: Iterable[str] = (),
               allowed_hosts: frozenset[str] | None = None, metrics_need_key: bool = False) -> web.Application:
    """The aiohttp application; the caller starts/stops the orchestrator and runs the app.
    ``allowed_origins``: CORS origins ("*": any; none by default); ``allowed_hosts``: Host names
    answered (None: any; ``origins.allowed_hosts`` derives the launcher's default)."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[
        errors_middleware, make_origin_middleware(allowed_origins, allowed_hosts), auth_middleware])
    app.on_response_prepare.append(cors_headers)
    app.on_response_prepare.append(echo_request_id)
    app[STATE] = ServerState(orchestrator, tokenizer, model_name, max_model_len, vocab_size, api_key or None,
                             is_ready, metrics if metrics is not None else ServerMetrics(model_name, max_model_len),
                             max_body_bytes,
                             body_timeout_s=body_timeout_s, metrics_need_key=metrics_need_key,
                             chat_template=(template := _chat_template(tokenizer)),
                             chat_stop_ids=template.end_of_turn_ids(tokenizer) if template is not None else ())
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/workload", workload)
    tokenize_routes(app)
    return app


def _chat_template(tokenizer: Any) -> Any:
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        return None
    from jaxserve.serving.chat_template import ChatTemplate
    return ChatTemplate(source, getattr(tokenizer, "special_tokens", {}))


async def echo_request_id(http: web.Request, resp: web.StreamResponse) -> None:
    """A client's ``X-Request-Id`` comes back on the answer (printable ASCII, at most 128 characters)."""
    rid = http.headers.get("X-Request-Id")
    if rid and len(rid) <= 128 and rid.isascii() and rid.isprintable():
        resp.headers["X-Request-Id"] = rid
