"""One admitted request answered over HTTP: its deltas in, a completion object or an SSE stream out.

    Job --Orchestrator.generate(request)--> Delta stream
      (errors before the first token: ValueError -> 400, QueueFull / timeout / unavailable -> 503)
      stream=false: one completion object with usage (``completion``)
      stream=true:  SSE "data: {chunk}" per Delta, [usage chunk], "data: [DONE]"
    client gone (write fails, or the socket is closing) --> the Delta iterator is closed -->
      the orchestrator aborts the request and its blocks are freed on every instance
    each request's end --> ServerMetrics (TTFT, TPOT, e2e, tokens, finish reasons)
    each request that ran to its end (stop / length) --> WorkloadWindow (the last 10 minutes)

A request the server cuts at shutdown gets 503 ``server_shutdown`` (streams: that error chunk and
``[DONE]``, never a chunk with an invented finish reason). An engine failure after the first token
ends a stream with an error chunk and ``[DONE]``; no
traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from jaxserve.engine.frontend import Delta
from jaxserve.errors import EngineUnavailable
from jaxserve.request import FinishReason, SamplingError, TokenLogprobs
from jaxserve.serving.connections import probe_half_closed
from jaxserve.serving.fields import ApiError
from jaxserve.serving.logprobs import chat_logprobs, completion_logprobs, text_length
from jaxserve.serving.metrics import ServerMetrics
from jaxserve.serving.orchestrator import Orchestrator, QueueFull
from jaxserve.serving.protocol import Job, param_of
from jaxserve.serving.workload import WorkloadWindow

log = logging.getLogger(__name__)

CLIENT_POLL_S = 0.25  # how often a request waiting for its first token checks that its client is still there
SSE_DONE = b"data: [DONE]\n\n"
ENGINE_ERROR = "the engine failed while running this request"


def shutdown_error() -> ApiError:
    """A request the server ended by shutting down (503, retryable)."""
    return ApiError(503, "the server shut down before this request finished; retry it", code="server_shutdown",
                    headers={"Retry-After": "1"})


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
        choice: dict[str, Any] = {"index": job.index, "delta": delta}
    else:
        choice = {"index": job.index, "text": (job.echo if first else "") + d.text}
    choice.update(logprobs=_logprobs(job, d.token_ids, d.logprobs, first), finish_reason=_reason(d.finish_reason))
    if job.return_token_ids:
        choice["token_ids"] = d.token_ids
    out = {"id": job.answer_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
           "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def usage_chunk(job: Job, num_out: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": job.answer_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": job.model, "choices": [], "usage": usage(job, num_out)}


def _logprobs(job: Job, token_ids: list[int], entries: list[TokenLogprobs] | None,
              first: bool = True) -> dict[str, Any] | None:
    """The choice's logprobs for these tokens (None unless asked); a completions stream's offsets run on.
    With echo + logprobs the first answer part carries the prompt's tokens and logprobs before them."""
    if job.request.sampling.logprobs is None or job.tokenizer is None or job.hide_logprobs:
        return None
    if entries is None or len(entries) != len(token_ids):  # an engine that gives none (a test double)
        return None
    if job.chat:
        return chat_logprobs(job.tokenizer, token_ids, entries)
    all_entries: list[TokenLogprobs | None] = list(entries)
    if first and job.echo_logprobs:
        prompt = job.request.prompt_token_ids
        got = job.request.prompt_logprobs
        token_ids = [*prompt, *token_ids]
        all_entries = [*(got if len(got) == len(prompt) else [None] * len(prompt)), *all_entries]
    out = completion_logprobs(job.tokenizer, token_ids, all_entries, job.text_offset)
    job.text_offset += text_length(job.tokenizer, token_ids)
    return out


def completion(job: Job, text: str, token_ids: list[int], reason: FinishReason | None,
               logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:
    if job.chat:
        choice: dict[str, Any] = {"index": job.index, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": job.index, "text": job.echo + text}
    choice.update(logprobs=_logprobs(job, token_ids, logprobs), finish_reason=_reason(reason))  # one part
    if job.return_token_ids:
        choice.update(token_ids=token_ids, prompt_token_ids=job.request.prompt_token_ids)
    return {"id": job.answer_id, "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created, "model": job.model, "choices": [choice], "usage": usage(job, len(token_ids))}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"  # ASCII JSON: never an encoding error


async def open_stream(http: web.Request) -> web.StreamResponse:
    """An SSE answer, headers sent."""
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type, resp.charset = "text/event-stream", "utf-8"
    await resp.prepare(http)
    return resp


# ---- running a request -----------------------------------------------------------------------
def client_gone(http: web.Request) -> bool:
    probe_half_closed(http)
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


async def admit(http: web.Request, orchestrator: Orchestrator, metrics: ServerMetrics, job: Job
                ) -> tuple[Any, Delta | None]:
    """Start the request; returns (delta iterator, first delta or None if the client left).

    Errors before the first token become ApiError (400 / 503 / 500)."""
    agen = orchestrator.generate(job.request)
    try:
        return agen, await first_delta(http, agen)
    except QueueFull as e:
        metrics.observe_rejected("queue_full")
        raise ApiError(503, f"server busy: {e}", code="queue_full", headers={"Retry-After": "1"}) from e
    except SamplingError as e:
        metrics.observe_rejected("invalid")
        raise ApiError(400, str(e), param=param_of(e)) from e
    except ValueError as e:
        metrics.observe_rejected("invalid")
        raise ApiError(400, str(e), param=param_of(e)) from e
    except TimeoutError as e:
        metrics.observe_rejected("timeout")
        raise ApiError(503, "timed out waiting for the engine", code="timeout", headers={"Retry-After": "1"}) from e
    except EngineUnavailable as e:
        metrics.observe_rejected("unavailable")
        raise ApiError(503, f"engine unavailable: {e}", code="unavailable", headers={"Retry-After": "5"}) from e
    except StopAsyncIteration as e:
        raise ApiError(500, ENGINE_ERROR, code="engine_error") from e


class Collected:
    """What one request's deltas added up to: text pieces, token ids, their logprobs, first-token time."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.lps: list[TokenLogprobs] = []
        self.first_token: float | None = None

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.ids += d.token_ids
        self.lps += d.logprobs or []
        if self.first_token is None and d.token_ids:
            self.first_token = time.perf_counter()

    def completion(self, job: Job, reason: FinishReason | None) -> dict[str, Any]:
        return completion(job, "".join(self.text), self.ids, reason, self.lps)


class _Answer(Collected):
    """The answer to one admitted request as it is written: what was sent, when, and how it ended."""

    def __init__(self, http: web.Request, job: Job, agen: Any) -> None:
        super().__init__()
        self.http, self.job, self.agen = http, job, agen
        self.reason: str = "abort"  # unless the stream reaches its end
        self.cut = False  # ended by the server (shutdown), not by the request: an error, not a success
        self.resp: web.StreamResponse | None = None

    async def run(self, d: Delta) -> web.StreamResponse:
        """Answer from the first delta ``d`` on; sets ``reason`` (abort, error, or the finish reason)."""
        try:
            if self.job.stream:
                self.resp = await open_stream(self.http)
            return await self._close(await self._pump(d))
        except asyncio.CancelledError:  # the handler was cancelled: abort (run_job's finally)
            self.reason = "abort"
            raise
        except ConnectionError:  # the client went away: abort (run_job's finally); nobody reads the answer
            self.reason = "abort"
            return self.resp if self.resp is not None else web.Response(status=499,
                                                                        text="client closed the connection")
        except (TimeoutError, StopAsyncIteration) as e:
            self.reason = "error"
            if self.resp is None:
                raise ApiError(500, f"{ENGINE_ERROR}: no output in time", code="engine_error") from e
            await _try_write(self.resp, sse(ApiError(500, ENGINE_ERROR, code="engine_error").body()) + SSE_DONE)
            return self.resp
        except Exception:
            self.reason = "error"
            if self.resp is None or not self.resp.prepared:
                raise  # the middleware answers 500
            log.exception("streaming %s failed", self.job.request.request_id)
            await _try_write(self.resp,
                             sse(ApiError(500, "internal server error", code="internal_error").body()) + SSE_DONE)
            return self.resp

    async def _pump(self, d: Delta) -> Delta:
        """Send deltas (as SSE chunks when streaming) until the last one, which it returns."""
        first = True
        while True:
            if client_gone(self.http):
                raise ConnectionResetError("client disconnected")
            if d.finish_reason == FinishReason.ERROR:
                self.reason = "error"
                return d
            if d.finish_reason == FinishReason.ABORT:  # only the orchestrator's stop ends a live stream so
                self.reason, self.cut = "abort", True
                return d
            if self.resp is not None:
                await self.resp.write(sse(chunk(self.job, d, first)))
            first = False
            self.add(d)
            if d.finish_reason is not None:
                self.reason = d.finish_reason.value
                return d
            d = await self.agen.__anext__()

    async def _close(self, last: Delta) -> web.StreamResponse:
        """The completion object, or the end of the stream: an error or usage chunk, then [DONE]."""
        job, resp = self.job, self.resp
        if resp is None:
            if self.reason == "error":
                raise ApiError(500, ENGINE_ERROR, code="engine_error")
            if self.cut:
                raise shutdown_error()
            return web.json_response(self.completion(job, last.finish_reason))
        if self.reason == "error":
            await resp.write(sse(ApiError(500, ENGINE_ERROR, code="engine_error").body()))
        elif self.cut:  # an error event, then [DONE]: never a chunk with a finish reason OpenAI lacks
            await resp.write(sse(shutdown_error().body()))
        elif job.include_usage:
            await resp.write(sse(usage_chunk(job, len(self.ids))))
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp


async def run_job(http: web.Request, job: Job, orchestrator: Orchestrator, metrics: ServerMetrics,
                  workload: WorkloadWindow) -> web.StreamResponse:
    """Admit ``job``, answer it, and record its end (metrics; the workload window if it ran to its end)."""
    arrival = job.request.arrival_time
    agen, d = await admit(http, orchestrator, metrics, job)
    if d is None:
        metrics.observe_finished(job.request, arrival=arrival, first_token=None, finish=time.perf_counter(),
                                 num_output_tokens=0, finish_reason="abort")
        return web.Response(status=499, text="client closed the connection")
    metrics.observe_admitted(job.request.num_prompt_tokens)
    answer = _Answer(http, job, agen)
    try:
        return await answer.run(d)
    finally:
        await agen.aclose()  # not finished -> the orchestrator aborts it and frees its blocks
        record_end(job, metrics, workload, answer.first_token, len(answer.ids), answer.reason)


def record_end(job: Job, metrics: ServerMetrics, workload: WorkloadWindow, first_token: float | None,
               num_out: int, reason: str) -> None:
    """An admitted request ended: metrics, and the workload window if it ran to its end."""
    arrival = job.request.arrival_time
    metrics.observe_finished(job.request, arrival=arrival, first_token=first_token, finish=time.perf_counter(),
                             num_output_tokens=num_out, finish_reason=reason)
    if reason in ("stop", "length") and num_out:
        workload.observe(arrival, job.request.num_prompt_tokens, num_out)


async def _try_write(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
        await resp.write_eof()
    except ConnectionError:
        pass
