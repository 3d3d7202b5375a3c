"""An instance that runs on its own: one engine core, one thread, commands in, message batches out.

    add / abort / import_kv / release (any thread) --command queue--> the instance's thread:
        (a handle marked ``remote`` is first fetched on the instance's transfer thread, beside
         stepping; then its import is queued like any command)
        loop: apply the commands that came in; step the core if it has work; export the KV of
              newly prefilled requests (prefill role); publish a Batch; sleep only when idle
    outputs() (the router's thread) <--Batch(messages, stats)-- published batches; ``wake`` set

The core (``jaxserve.engine.engine.LLMEngine`` or a test double) is touched by this thread only, so
it needs no locks, and it never waits on another instance: a decode instance steps as soon as its
previous step ended, whatever the prefill instances do (JAX releases the GIL while a step runs).
Requests arrive as copies; what happens to them leaves as messages (``RequestUpdate``: the events
and tokens new since the last batch). A step that raises ends the requests on this instance with
``Failed`` (their blocks freed) and the loop carries on. A Ray actor hosts the same class
(``jaxserve.cluster.actors``), so in-process and Ray instances run one loop.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from jaxserve.errors import InstanceLost
from jaxserve.request import FinishReason, Request
from jaxserve.runtime.api import (
    Batch,
    EngineCore,
    Failed,
    Imported,
    InstanceStats,
    KVReady,
    Message,
    RequestUpdate,
)
from jaxserve.warmup_progress import WarmupProgress

log = logging.getLogger(__name__)
_running: weakref.WeakSet[LocalInstance] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """End every instance loop before the interpreter goes: a daemon thread that is still inside
    XLA when Python finalizes aborts the process ("FATAL: exception not rethrown")."""
    for inst in list(_running):
        inst.shutdown(timeout_s=10.0)


class LocalInstance:
    """An ``EngineCore`` looping in its own thread (see the module docstring)."""

    def __init__(self, core: EngineCore, *, idle_wait_s: float = 0.5, call_timeout_s: float = 600.0) -> None:
        self.core = core
        self.info = core.info()
        self.clock_offset = 0.0
        self.idle_wait_s, self.call_timeout_s = idle_wait_s, call_timeout_s
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._work = threading.Event()
        self._wake: threading.Event | None = None
        self._lock = threading.Lock()  # guards _messages and _stats
        self._messages: list[Message] = []
        self._stats = core.stats()
        self._tracked: dict[str, tuple[Request, int, int]] = {}  # id -> (request, events sent, tokens sent)
        self._exported: set[str] = set()
        self._fetching: dict[str, bool] = {}  # request id -> aborted meanwhile (loop thread only)
        self._fetcher: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._lost: str | None = None  # why the core can never step again (InstanceLost)
        self._thread: threading.Thread | None = None

    # ---- the interface (any thread) ----------------------------------------------------------
    def start(self, wake: threading.Event | None = None) -> None:
        self._wake = wake
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"jaxserve-{self.info.name}", daemon=True)
            self._thread.start()
            _running.add(self)

    def add(self, request: Request) -> None:
        self._send(("add", request))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._send(("abort", request_id, reason))

    def import_kv(self, request: Request, handle: Any, source: str) -> None:
        self._send(("import", request, handle, source))

    def release(self, request_id: str) -> None:
        self._send(("release", request_id))

    def outputs(self) -> Batch:
        with self._lock:
            msgs, self._messages = self._messages, []
            return Batch(msgs, self._stats, error=self._lost)

    def stats(self) -> InstanceStats:
        """Load right after every command sent so far (a round trip through the loop)."""
        return self._call(self.core.stats)

    def warmup(self, progress: bool = False) -> int:
        """Compile every shape on the loop's thread; ``progress``: report it on stderr as it goes."""
        return self._call(lambda: self.core.warmup(WarmupProgress(f"{self.core.name} warm-up") if progress else None))

    def compilations_since_warmup(self) -> int:
        return self._call(lambda: self.core.compilations_since_warmup)

    def stop_soon(self) -> None:
        """Ask the loop to end after its current step (does not wait)."""
        self._stopping.set()
        self._work.set()

    def shutdown(self, timeout_s: float | None = None) -> None:
        self.stop_soon()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.call_timeout_s if timeout_s is None else timeout_s)
        self._thread = None
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
        _running.discard(self)

    def _send(self, cmd: tuple[Any, ...]) -> None:
        self._cmds.put(cmd)
        self._work.set()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the instance's thread (in order with the commands), or here if it is not running."""
        if self._thread is None or not self._thread.is_alive():  # (a lost instance's loop has ended)
            return fn()
        fut: Future[Any] = Future()
        self._send(("call", fn, fut))
        return fut.result(timeout=self.call_timeout_s)

    # ---- the instance's thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._work.clear()
            changed = self._drain()
            if self.core.has_unfinished():
                self._step()
                changed = True
            if changed:
                self._publish()
            elif not self._cmds.empty():
                continue
            else:
                self._work.wait(self.idle_wait_s)

    def _drain(self) -> bool:
        did = False
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return did
            did = True
            try:
                self._apply(cmd)
            except Exception as e:  # a command about one request failed: that request ends
                rid = cmd[1].request_id if isinstance(cmd[1], Request) else cmd[1]
                if cmd[0] == "call":
                    continue
                log.warning("%s: %s of %s failed: %s", self.info.name, cmd[0], rid, e)
                self._forget(rid, FinishReason.ERROR)
                self._emit(Failed(rid, f"{self.info.name}: {cmd[0]} failed: {type(e).__name__}: {e}"))

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "import" and getattr(cmd[2], "remote", False):
            self._start_fetch(cmd[1], cmd[2], cmd[3])
        elif kind == "fetch":
            self._fetched(*cmd[1:])
        elif kind == "add":
            req: Request = cmd[1]
            sent = len(req.events), len(req.output_token_ids)
            self.core.add_request(req)
            self._tracked[req.request_id] = (req, *sent)
        elif kind == "abort":
            if cmd[1] in self._fetching:
                self._fetching[cmd[1]] = True
            self._forget(cmd[1], cmd[2])
        elif kind == "release":
            self._exported.discard(cmd[1])
            self._tracked.pop(cmd[1], None)
            if cmd[1] in self.core.take_ready():
                self.core.release(cmd[1])
        elif kind == "import":
            self._import(cmd[1], cmd[2], cmd[3])
        elif kind == "call":
            fut: Future[Any] = cmd[2]
            try:
                fut.set_result(cmd[1]())
            except Exception as e:
                fut.set_exception(e)

    def _start_fetch(self, request: Request, handle: Any, source: str) -> None:
        """Fetch a remote handle's KV on the transfer thread (one at a time, in the order sent)."""
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix=f"jaxserve-fetch-{self.info.name}")
        self._fetching[request.request_id] = False

        def fetch() -> None:
            began = time.perf_counter()  # when this fetch starts (earlier ones may have queued it)
            try:
                self._send(("fetch", request, self.core.fetch_kv(handle), source, began, None))
            except Exception as e:
                self._send(("fetch", request, None, source, began, e))

        self._fetcher.submit(fetch)

    def _fetched(self, request: Request, local: Any, source: str, began: float, error: Exception | None) -> None:
        if self._fetching.pop(request.request_id, False):
            return  # aborted while its KV was on the way: nothing was allocated
        if error is not None:
            raise error  # -> Failed for this request (see _drain)
        self._import(request, local, source, began)

    def _import(self, request: Request, handle: Any, source: str, began: float | None = None) -> None:
        sent = len(request.events), len(request.output_token_ids)
        nbytes = self.core.import_kv(request, handle, source, began=began)
        if nbytes is not None:
            self._tracked[request.request_id] = (request, *sent)
        self._emit(Imported(request.request_id, nbytes))

    def _forget(self, request_id: str, reason: FinishReason) -> None:
        self._exported.discard(request_id)
        self._tracked.pop(request_id, None)
        try:
            self.core.abort_request(request_id, reason)
        except Exception:  # the core is in an unknown state; nothing more to free
            log.exception("%s: abort of %s failed", self.info.name, request_id)

    def _step(self) -> None:
        try:
            self.core.step()
        except Exception as e:
            log.exception("%s: step failed; ending its requests with an error", self.info.name)
            why = f"{self.info.name}: step raised {type(e).__name__}: {e}"
            for rid in list(self._tracked):
                self._forget(rid, FinishReason.ERROR)
                self._emit(Failed(rid, why))
            if isinstance(e, InstanceLost):  # it can never step again: the router stops using it
                self._lost = why
                self._stopping.set()
            return
        self._collect_updates()
        for rid in self.core.take_ready():  # prefill role: export right away, so a pull never waits on us
            if rid in self._exported:
                continue
            self._exported.add(rid)
            try:
                handle, n = self.core.export_kv(rid)
            except Exception as e:
                self._forget(rid, FinishReason.ERROR)
                self._emit(Failed(rid, f"{self.info.name}: KV export failed: {type(e).__name__}: {e}"))
                continue
            self._emit(KVReady(rid, handle, n))

    def _collect_updates(self) -> None:
        for rid, (req, ne, nt) in list(self._tracked.items()):
            if len(req.events) == ne and len(req.output_token_ids) == nt and req.finish_reason is None:
                continue
            first = nt == 0 and req.output_token_ids  # the prompt's logprobs are complete with the first token
            self._emit(RequestUpdate(rid, req.events[ne:], req.output_token_ids[nt:], req.finish_reason,
                                     req.sampling.seed, req.output_logprobs[nt:], req.num_cached_tokens,
                                     list(req.prompt_logprobs) if first and req.prompt_logprobs else None))
            if req.finish_reason is not None:
                del self._tracked[rid]
            else:
                self._tracked[rid] = (req, len(req.events), len(req.output_token_ids))

    def _emit(self, msg: Message) -> None:
        with self._lock:
            self._messages.append(msg)

    def _publish(self) -> None:
        self._collect_updates()  # events stamped by commands (queued, transfer) travel too
        stats = self.core.stats()
        with self._lock:
            self._stats = stats
        if self._wake is not None:
            self._wake.set()
