"""Several engine requests answered as one: a list of prompts, and/or ``n`` / ``best_of`` samples of each.

    [Job per prompt and sample] --admit each (the orchestrator's queue counts every one; a prompt's
      later samples once its first has its first token, so they find its blocks in the prefix cache)-->
      not streaming: each collected to its end concurrently --> one completion object, choices in
          ``index`` order (best_of: each prompt's n best, ``samples.pick_best``), usage summed
      streaming: every prompt's deltas as they come, each chunk's choice ``index`` its prompt,
          then the summed usage chunk (``stream_options.include_usage``) and one ``[DONE]``
    any prompt refused (400 / 503) or failing --> the others are aborted; the answer is that error

Metrics and the workload window see each prompt as a request of its own (``streaming.record_end``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from jaxserve.request import FinishReason
from jaxserve.serving.fields import ApiError
from jaxserve.serving.metrics import ServerMetrics
from jaxserve.serving.orchestrator import Orchestrator
from jaxserve.serving.protocol import Job
from jaxserve.serving.samples import pick_best, prompt_tokens
from jaxserve.serving.streaming import (
    ENGINE_ERROR,
    SSE_DONE,
    Collected,
    admit,
    chunk,
    client_gone,
    completion,
    open_stream,
    record_end,
    shutdown_error,
    sse,
    usage_chunk,
)
from jaxserve.serving.workload import WorkloadWindow


class _Run(Collected):
    """One prompt of the batch: its deltas, and how it ended."""

    def __init__(self, job: Job, after: asyncio.Event | None = None) -> None:
        super().__init__()
        self.job = job
        self.after = after  # admitted once this is set (its prompt's first sample has its first token)
        self.started = asyncio.Event()
        self.reason = "abort"
        self.agen: Any = None
        self.admitted = False

    async def go(self, http: web.Request, orch: Orchestrator, metrics: ServerMetrics,
                 out: asyncio.Queue[tuple[_Run, Any, bool]] | None) -> None:
        """Admit and run to the end; each delta goes to ``out`` (streaming) as (run, delta, first)."""
        try:
            if self.after is not None:
                await self.after.wait()
            await self._go(http, orch, metrics, out)
        finally:
            self.started.set()  # never leave a sibling waiting

    async def _go(self, http: web.Request, orch: Orchestrator, metrics: ServerMetrics,
                  out: asyncio.Queue[tuple[_Run, Any, bool]] | None) -> None:
        self.agen, d = await admit(http, orch, metrics, self.job)
        self.started.set()
        if d is None:
            raise ConnectionResetError("client disconnected")
        self.admitted = True
        metrics.observe_admitted(self.job.request.num_prompt_tokens)
        first = True
        while True:
            if d.finish_reason == FinishReason.ERROR:
                self.reason = "error"
                raise ApiError(500, ENGINE_ERROR, code="engine_error")
            if d.finish_reason == FinishReason.ABORT:
                self.reason = "abort"
                raise shutdown_error()
            if client_gone(http):
                raise ConnectionResetError("client disconnected")
            self.add(d)
            if out is not None:
                await out.put((self, d, first))
            first = False
            if d.finish_reason is not None:
                self.reason = d.finish_reason.value
                return
            d = await self.agen.__anext__()

    async def end(self, metrics: ServerMetrics, workload: WorkloadWindow) -> None:
        if self.agen is not None:
            await self.agen.aclose()  # not finished -> the orchestrator aborts it and frees its blocks
        if self.admitted:
            record_end(self.job, metrics, workload, self.first_token, len(self.ids), self.reason)


async def run_batch(http: web.Request, jobs: list[Job], orch: Orchestrator, metrics: ServerMetrics,
                    workload: WorkloadWindow) -> web.StreamResponse:
    leaders: dict[int, _Run] = {}
    runs = []
    for j in jobs:
        runs.append(_Run(j, leaders[j.group].started if j.group in leaders else None))
        leaders.setdefault(j.group, runs[-1])
    queue: asyncio.Queue[tuple[_Run, Any, bool]] | None = asyncio.Queue() if jobs[0].stream else None
    tasks = [asyncio.ensure_future(r.go(http, orch, metrics, queue)) for r in runs]
    try:
        if queue is None:
            await _all(tasks)
            best = sorted(pick_best(runs), key=lambda r: r.job.index)
            choices = [r.completion(r.job, FinishReason(r.reason))["choices"][0] for r in best]
            head = completion(runs[0].job, "", [], None)
            n_in = prompt_tokens(jobs)
            n_out = sum(len(r.ids) for r in runs)
            return web.json_response({**head, "choices": choices, "usage": {
                "prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})
        return await _stream(http, runs, tasks, queue)
    except ConnectionResetError:  # the client left: every prompt is aborted below; nobody reads this
        return web.Response(status=499, text="client closed the connection")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in runs:
            await r.end(metrics, workload)


async def _all(tasks: list[asyncio.Future[None]]) -> None:
    """Wait for every task; the first failure is raised (the caller cancels the rest)."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    await asyncio.gather(*tasks)


async def _stream(http: web.Request, runs: list[_Run], tasks: list[asyncio.Future[None]],
                  queue: asyncio.Queue[tuple[_Run, Any, bool]]) -> web.StreamResponse:
    """Chunks as deltas come; an error before the first chunk is the answer, after it an error event."""
    waiter = asyncio.ensure_future(_all(tasks))
    resp: web.StreamResponse | None = None
    try:
        while True:
            if queue.empty():
                if waiter.done():  # every prompt ended and every delta was written
                    if waiter.exception() is not None:
                        raise waiter.exception()  # type: ignore[misc]
                    break
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                run, d, first = getter.result()
            else:
                run, d, first = queue.get_nowait()
            if resp is None:
                resp = await open_stream(http)
            await resp.write(sse(chunk(run.job, d, first)))
    except ApiError as e:
        if resp is None:
            raise
        await resp.write(sse(e.body()))
    except ConnectionResetError:
        if resp is None:
            raise
        return resp  # the client left mid-stream: nobody reads the rest (every prompt is aborted)
    finally:
        waiter.cancel()
    if resp is None:  # (no prompt produced a delta: cannot happen, each ends with one)
        raise ApiError(500, ENGINE_ERROR, code="engine_error")
    if runs[0].job.include_usage and all(r.reason in ("stop", "length") for r in runs):
        u = usage_chunk(runs[0].job, sum(len(r.ids) for r in runs))
        n_in = prompt_tokens([r.job for r in runs])
        u["usage"] = {"prompt_tokens": n_in, "completion_tokens": u["usage"]["completion_tokens"],
                      "total_tokens": n_in + u["usage"]["completion_tokens"]}
        await resp.write(sse(u))
    await resp.write(SSE_DONE)
    await resp.write_eof()
    return resp
