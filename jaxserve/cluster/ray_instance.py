"""An instance actor seen from the driver: the runtime's ``Instance`` interface over remote calls.

    Router --add / abort / import_kv / release--> RayInstance --actor.X.remote(...)--> InstanceActor
        (sent, not awaited; the refs are checked by the pump: a call that failed, such as an import
        whose KV object was lost with its owner, ends that request with ``Failed``)
    pump thread: actor.poll.remote(wait) in a loop, each with a deadline --> Batch buffer, router woken;
        the actor died or stopped answering --> Batch(error=...): the router fails its requests

``launch_router`` starts one actor per instance config, waits for every model to load, estimates
the clock offset of actors on other nodes, and returns a ``Router`` over them: the same router as
in-process (dispatch, pull, stamps and failures are written once, in ``jaxserve.runtime.router``).
Every remote call has a deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from jaxserve.cluster.actors import ActorOptions, start_instance
from jaxserve.config import ConfigError, EngineConfig
from jaxserve.request import FinishReason, Request
from jaxserve.runtime.api import Batch, Failed, InstanceInfo, InstanceStats
from jaxserve.runtime.router import ClusterError, Router

log = logging.getLogger(__name__)


def estimate_clock_offset(remote_clock: Callable[[], float], samples: int = 7,
                          local_clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(remote - local clock offset, error bound) from ``samples`` round trips, NTP-style: the remote
    reading is taken as the midpoint of its round trip; the shortest round trip wins (its half is
    the bound)."""
    best = (0.0, float("inf"))
    for _ in range(max(1, samples)):
        t0 = local_clock()
        r = remote_clock()
        t1 = local_clock()
        if (t1 - t0) / 2 < best[1]:
            best = (r - (t0 + t1) / 2, (t1 - t0) / 2)
    return best


def _why(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


class RayInstance:
    """The driver's proxy of one ``InstanceActor`` (see the module docstring)."""

    def __init__(self, actor: Any, info: InstanceInfo, *, timeout_s: float = 300.0, poll_wait_s: float = 0.5,
                 own_actor: bool = False) -> None:
        self.actor, self.info = actor, info
        self.timeout_s, self.poll_wait_s, self.own_actor = timeout_s, poll_wait_s, own_actor
        self.clock_offset = 0.0
        self.clock_error = 0.0
        self._lock = threading.Lock()
        self._batches: list[Batch] = []
        self._calls: list[tuple[Any, str | None, str]] = []  # (ref, request id, kind): sent, unchecked
        self._stop = threading.Event()
        self._wake: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.process_id: int | None = None  # in a collective group
        self.peers: dict[str, RayInstance] = {}  # name -> proxy (a collective hand-off calls its source)
        self.segments: list[Any] = []  # further segments of a pipeline spanning processes (jaxserve.cluster.stages)

    # ---- commands (the router's thread) --------------------------------------------------------
    def start(self, wake: threading.Event | None = None) -> None:
        self._wake = wake
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name=f"jaxserve-pump-{self.info.name}", daemon=True)
            self._thread.start()

    def add(self, request: Request) -> None:
        self._sent(self.actor.add.remote(request), request.request_id, "add")

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._sent(self.actor.abort.remote(request_id, reason), None, "abort")

    def import_kv(self, request: Request, handle: Any, source: str) -> None:
        if getattr(handle, "remote", False):  # a collective hand-off: the source sends, this actor fetches
            src = self.peers[source]
            src._sent(src.actor.send_kv.remote(handle, self.process_id), None, "send")
        # an ObjectRef handle goes at top level: Ray fetches the KV to the actor's node first
        self._sent(self.actor.import_kv.remote(request, handle, source), request.request_id, "import")

    def release(self, request_id: str) -> None:
        self._sent(self.actor.release.remote(request_id), None, "release")

    def _sent(self, ref: Any, rid: str | None, kind: str) -> None:
        with self._lock:
            self._calls.append((ref, rid, kind))

    def outputs(self) -> Batch:
        with self._lock:
            batches, self._batches = self._batches, []
        out = Batch([m for b in batches for m in b.messages])
        for b in batches:
            out.stats = b.stats or out.stats
            out.error = out.error or b.error
        return out

    # ---- synchronous queries (with deadlines) --------------------------------------------------
    def _get(self, ref: Any, timeout: float | None = None) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s if timeout is None else timeout)
        except RayTaskError as e:
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None

    def stats(self) -> InstanceStats:
        return self._get(self.actor.stats.remote())

    def warmup(self, progress: bool = False) -> int:
        return self._get(self.actor.warmup.remote(progress))

    def compilations_since_warmup(self) -> int:
        return self._get(self.actor.compilations_since_warmup.remote())

    def stop_soon(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self.own_actor:  # (a failed instance too: its stage actors hold devices and wait for a peer)
            for a in [self.actor, *(s.actor for s in self.segments)]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already gone
                    pass

    # ---- the pump thread -----------------------------------------------------------------------
    def _pump(self) -> None:
        while not self._stop.is_set():
            ref = self.actor.poll.options(concurrency_group="poll").remote(self.poll_wait_s)
            try:
                batch = ray.get(ref, timeout=self.poll_wait_s + self.timeout_s)
            except GetTimeoutError:
                self._deliver(Batch([], error=f"{self.info.name}: no reply within {self.timeout_s:.0f} s"))
                return
            except RayError as e:  # RayActorError / ActorDiedError, WorkerCrashedError, NodeDiedError, ...
                self._deliver(Batch([], error=f"{self.info.name}: actor died: {_why(e)}"))
                return
            batch.messages += self._check_calls()
            if batch.messages or batch.stats is not None:
                self._deliver(batch)

    def _check_calls(self) -> list[Failed]:
        """Failed commands become ``Failed`` messages (their request ends; the router frees the rest)."""
        with self._lock:
            calls, self._calls = self._calls, []
        if not calls:
            return []
        done, _ = ray.wait([c[0] for c in calls], num_returns=len(calls), timeout=0)
        done_set, out, keep = set(done), [], []
        for ref, rid, kind in calls:
            if ref not in done_set:
                keep.append((ref, rid, kind))
                continue
            try:
                ray.get(ref, timeout=0)
            except RayError as e:
                if rid is not None:
                    out.append(Failed(rid, f"{self.info.name}: {kind} of {rid} failed: {_why(e)}"))
                else:
                    log.warning("%s: %s failed: %s", self.info.name, kind, _why(e))
        with self._lock:
            self._calls = keep + self._calls
        return out

    def _deliver(self, batch: Batch) -> None:
        with self._lock:
            self._batches.append(batch)
        if self._wake is not None:
            self._wake.set()


def launch_router(model: str | None, configs: Sequence[tuple[str, EngineConfig]], *, dtype: str = "float32",
                  options: ActorOptions | Sequence[ActorOptions] | None = None, timeout_s: float = 300.0,
                  start_timeout_s: float = 600.0, fake: Sequence[dict[str, Any]] | None = None,
                  poll_s: float = 0.02, compilation_cache: str | None = None,
                  transport: str = "object-store",
                  stages: Sequence[Sequence[tuple[range, ActorOptions]]] | None = None) -> Router:
    """One actor per ``(name, EngineConfig)`` (``options``: one for all, or one each), every model
    loaded, clock offsets estimated; a ``Router`` over them (its ``shutdown`` kills the actors).
    ``fake``: one ``FakeCore`` settings dict per instance instead of a model (runtime tests).
    ``compilation_cache``: a directory or "off" for every actor; None: the driver's default.
    ``transport``: "object-store" (numpy through Ray) or "collective" (the actors form one JAX
    group, coordinated from this process; KV moves over gloo / NCCL: ``jaxserve.cluster.collective``).
    ``stages``: per instance, the further segments of a pipeline spanning processes (stages, options;
    ``jaxserve.cluster.placement.Placement.stages``): a stage actor each, in the same JAX group as
    every actor (activations over gloo / NCCL: ``jaxserve.cluster.stages``)."""
    opts = list(options) if isinstance(options, Sequence) else [options] * len(configs)
    fakes = list(fake) if fake is not None else [None] * len(configs)
    segs = [list(s) for s in stages] if stages is not None else [[] for _ in configs]
    if len(opts) != len(configs) or len(fakes) != len(configs) or len(segs) != len(configs):
        raise ValueError(f"{len(opts)} ActorOptions, {len(fakes)} fakes and {len(segs)} stage lists for "
                         f"{len(configs)} instances")
    if transport not in ("object-store", "collective"):
        raise ValueError(f"transport must be 'object-store' or 'collective', got {transport!r}")
    spanning = sum(len(s) for s in segs)
    if spanning and transport == "collective":
        raise ConfigError("a pipeline whose stages span processes moves its KV per stage through the object "
                          "store: use the object-store KV transport with it")
    keep = _Resources()
    if transport == "collective" or spanning:
        from jaxserve.cluster.collective import CoordinatorService
        keep.service = CoordinatorService(len(configs) + spanning, host=ray.util.get_node_ip_address())
    group = None if keep.service is None else keep.service.spec
    # CPU actors size their KV pools as if all of them shared one host (true for a local Ray;
    # on several nodes it leaves memory unused rather than overcommitting one)
    try:
        chains = _start_stages(model, configs, segs, group, dtype, compilation_cache, keep)
        actors = [start_instance(model, c, name, dtype=dtype, options=o, fake=f, host_share=len(configs),
                                 compilation_cache=compilation_cache, process_id=i, group=group, segments=chain,
                                 collective_kv=transport == "collective")
                  for i, ((name, c), o, f, chain) in enumerate(zip(configs, opts, fakes, chains, strict=True))]
        proxies = connect(actors, timeout_s=timeout_s, start_timeout_s=start_timeout_s, own_actors=True)
        for p, chain in zip(proxies, chains, strict=True):
            p.segments = chain
        if transport != "collective":
            router = Router(proxies, poll_s=poll_s)
            router.keep_alive = keep
            return router
        by_name = {p.info.name: p for p in proxies}
        for i, p in enumerate(proxies):
            p.process_id, p.peers = i, by_name
        router = Router(proxies, poll_s=poll_s)
        router.after_warmup = lambda: warm_pairs([s.inst for s in router.live()], timeout_s)
        router.keep_alive = keep  # the group's coordinator (and stage actors) live as long as the router
        return router
    except BaseException:
        keep.shutdown()
        raise


class _Resources:
    """What lives as long as a router of actors: the collective group's coordinator, the stage actors."""

    def __init__(self) -> None:
        self.service: Any = None
        self.stage_actors: list[Any] = []

    def shutdown(self) -> None:
        for a in self.stage_actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.stage_actors = []
        if self.service is not None:
            self.service.shutdown()
            self.service = None


def _start_stages(model: str | None, configs: Sequence[tuple[str, EngineConfig]],
                  segs: Sequence[Sequence[tuple[range, ActorOptions]]], group: Any, dtype: str,
                  compilation_cache: str | None, keep: _Resources) -> list[list[Any]]:
    """A stage actor per further segment (process ids after the instances'); per instance its chain."""
    from jaxserve.cluster.actors import start_stage
    from jaxserve.cluster.stages import Segment

    chains: list[list[Any]] = []
    pid = len(configs)
    for leader, ((_, config), mine) in enumerate(zip(configs, segs, strict=True)):
        ids = [leader, *range(pid, pid + len(mine))]
        chain = []
        for k, (stages, opts) in enumerate(mine):
            actor = start_stage(model, config, stages, group=group, process_id=ids[k + 1], prev_process=ids[k],
                                next_process=ids[k + 2] if k + 2 < len(ids) else leader, dtype=dtype,
                                options=opts, compilation_cache=compilation_cache)
            keep.stage_actors.append(actor)
            chain.append(Segment(actor, stages, ids[k + 1]))
        chains.append(chain)
        pid += len(mine)
    return chains


def warm_pairs(proxies: Sequence[RayInstance], timeout_s: float) -> None:
    """Warm every (prefill, decode) pair's collective hand-off, both ends at once, one pair at a time:
    compiles each bucket's transfer and import, and connects the pair (see jaxserve.cluster.collective)."""
    live = list(proxies)
    for src in (p for p in live if p.info.role == "prefill"):
        shapes = ray.get(src.actor.transfer_shapes.remote(), timeout=timeout_s)
        for dst in (p for p in live if p.info.role == "decode"):
            refs = [src.actor.warm_transfer.remote("send", dst.process_id),
                    dst.actor.warm_transfer.remote("recv", src.process_id, src.info.block_size, shapes)]
            try:
                ray.get(refs, timeout=timeout_s)
            except (RayError, GetTimeoutError) as e:
                raise ClusterError(f"warming the hand-off {src.info.name} -> {dst.info.name} failed: {_why(e)}") from e


def connect(actors: Sequence[Any], *, timeout_s: float = 300.0, start_timeout_s: float = 600.0,
            own_actors: bool = False) -> list[RayInstance]:
    """Proxies for started actors: waits for each to load (``start_timeout_s`` in all); actors on
    another node than the driver get a clock offset. Kills the actors it owns if one fails to start."""
    deadline = time.monotonic() + start_timeout_s
    refs = [a.info.remote() for a in actors]
    try:
        infos = [ray.get(r, timeout=max(0.0, deadline - time.monotonic())) for r in refs]
        proxies = [RayInstance(a, i, timeout_s=timeout_s, own_actor=own_actors)
                   for a, i in zip(actors, infos, strict=True)]
        here = ray.get_runtime_context().get_node_id()
        for p in proxies:  # one host shares CLOCK_MONOTONIC: only actors on other nodes get an offset
            if p.info.node_id is not None and p.info.node_id != here:
                t = max(1.0, deadline - time.monotonic())
                p.clock_offset, p.clock_error = estimate_clock_offset(
                    lambda a=p.actor, t=t: ray.get(a.clock.remote(), timeout=t))
                log.info("%s: clock offset %+.3f ms (+-%.3f ms)", p.info.name, 1e3 * p.clock_offset,
                         1e3 * p.clock_error)
    except (RayError, GetTimeoutError) as e:
        if own_actors:
            for a in actors:
                ray.kill(a, no_restart=True)
        raise ClusterError(f"an instance actor did not start: {_why(e)}") from e
    return proxies
