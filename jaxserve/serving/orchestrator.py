"""The orchestrator: async request streams over the runtime's router, driven from one thread.

    async caller --generate(Request)--> command queue (router woken) --> the router's thread:
        Frontend.add --> Router.add_request (dispatch to an entry instance) ... Frontend.step()
        (Router.step: fold the instances' message batches, pull prefilled KV to decode instances)
        Delta --loop.call_soon_threadsafe--> the request's asyncio.Queue --> async iterator
    consumer stops early (client disconnected, cancelled) --> abort command --> blocks freed
                                                             on every instance at once

The router (``jaxserve.runtime.router.Router``) is touched only by this thread; the instances
run on their own (a thread each in this process, or Ray actors), so a decode instance never
waits for a prefill step. Admission is bounded (``max_queue`` requests in flight; more raise
``QueueFull``: the server answers 503). Every wait has a timeout. If a router step raises, the
requests in flight end with ``finish_reason`` ``error`` and the loop carries on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from jaxserve.engine.frontend import Delta, Frontend
from jaxserve.request import FinishReason, Request
from jaxserve.runtime.router import Router

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests in flight; retry later (HTTP 503)."""


class Orchestrator:
    def __init__(self, engine: Router, tokenizer: Any = None, *, max_queue: int = 256,
                 admit_timeout_s: float = 30.0, token_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.frontend = Frontend(engine, tokenizer)
        self.max_queue = max_queue
        self.admit_timeout_s = admit_timeout_s
        self.token_timeout_s = token_timeout_s
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta]]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._admitting = True
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        self.num_errors = 0
        self.finished: dict[str, int] = {}  # finish reason -> count

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
            self._thread.start()

    def stop_admitting(self) -> None:
        """New requests get QueueFull (503) from now on; requests in flight carry on."""
        self._admitting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still in flight end with ``ABORT`` (the server answers them
        503 ``server_shutdown``: ``jaxserve.serving.streaming``)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- the async side ----------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Stream one request's deltas. Raises ValueError (bad request) or QueueFull before the first."""
        if self._thread is None:
            raise QueueFull("the server is not ready yet (warming up)")
        if self._stopping.is_set() or not self._admitting:
            raise QueueFull("the server is shutting down")
        if len(self._streams) >= self.max_queue:
            raise QueueFull(f"{len(self._streams)} requests in flight (limit {self.max_queue})")
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"duplicate request id {rid!r}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Delta] = asyncio.Queue()
        admitted: asyncio.Future[None] = loop.create_future()
        self._streams[rid] = (loop, q)
        self._send(("add", request, loop, admitted))
        try:
            await asyncio.wait_for(admitted, self.admit_timeout_s)
        except BaseException:
            self._streams.pop(rid, None)
            if not admitted.done() or admitted.cancelled() or admitted.exception() is None:
                self._send(("abort", rid))
            raise
        done = False
        try:
            while not done:
                d = await asyncio.wait_for(q.get(), self.token_timeout_s)
                done = d.finish_reason is not None
                yield d
        finally:
            self._streams.pop(rid, None)
            if not done:  # consumer went away (disconnect, cancel, timeout): free the blocks now
                self._send(("abort", rid))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, cmd: tuple[Any, ...]) -> None:
        self._cmds.put(cmd)
        self._wake.set()
        self.engine.wake()  # a router step waiting for instance batches returns now

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_commands()
            busy = bool(self.frontend.trackers) or self.engine.has_unfinished()
            self._step()  # idle too: folds the instances' last batches (their gauges stay current)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        self._drain_commands()
        for rid in list(self.frontend.trackers):
            self.frontend.abort(rid)
            self._deliver(Delta(rid, "", [], FinishReason.ABORT))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request, loop, fut = cmd
                try:
                    self.frontend.add(request)
                except Exception as e:  # a bad request: the caller gets the exception (HTTP 400)
                    loop.call_soon_threadsafe(_set_exception, fut, e)
                else:
                    loop.call_soon_threadsafe(_set_result, fut)
            elif cmd[0] == "abort":
                if self.frontend.abort(cmd[1]) is not None:
                    self.finished["abort"] = self.finished.get("abort", 0) + 1

    def _step(self) -> None:
        try:
            deltas = self.frontend.step()
        except Exception:
            log.exception("engine step failed; ending the requests in flight with an error")
            self.num_errors += 1
            for rid in list(self.frontend.trackers):
                self.frontend.abort(rid, FinishReason.ERROR)
                self._deliver(Delta(rid, "", [], FinishReason.ERROR))
            time.sleep(0.01)
            return
        self.num_steps += 1
        for d in deltas:
            if d.finish_reason is not None:
                self.finished[d.finish_reason.value] = self.finished.get(d.finish_reason.value, 0) + 1
            self._deliver(d)

    def _deliver(self, d: Delta) -> None:
        stream = self._streams.get(d.request_id)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, d)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                self._streams.pop(d.request_id, None)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
