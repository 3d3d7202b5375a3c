"""One engine instance inside a Ray actor: what crosses the process boundary, and how requests stay true.

    driver --start_instance(model, EngineConfig, ActorOptions)--> Ray actor process
        runtime_env: XLA_FLAGS=--xla_force_host_platform_device_count=tp*pp, JAX_PLATFORMS=cpu
        __init__: load_model(folder, dtype) -> LLMEngine(cfg, params, config) on the actor's own devices

    driver Request --pickled--> actor copy (add_request / admit_import); the actor's engine stamps events
        and appends tokens on its copy; every mutating method answers a ``Reply``:
            value (method result), updates (per request: events and tokens new since the last
            reply, finish reason, the fixed seed), stats (free/held blocks, queued tokens)
        --> the driver appends the updates to its own Request objects, so they stay true.

    KV: step(export=True) puts export_kv(request id) -> ``KVPayload`` (numpy per layer, host arrays)
        in the Ray object store --> admit_import(request, payload) on a decode actor (admit if
        there is room, write the KV, re-paged there if the block sizes differ). Only numpy crosses, never ``jax.Array`` (see FACTS.md: 64 MiB numpy
        moves in ms, a jax.Array takes over a second).

``InstanceActor`` is a plain class (usable in-process for tests); ``start_instance`` wraps it
with ``ray.remote`` and the placement options. Event times are ``time.perf_counter()`` in each
process: CLOCK_MONOTONIC on Linux, so comparable across actors on one host. For an actor on
another node the driver estimates its clock's offset at start (``clock()``, the sample with the
shortest round trip: ``ray_engine.estimate_clock_offset``) and moves the actor's event times
onto its own clock (``RequestUpdate.apply(request, offset)``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.request import Event, FinishReason, LifecycleEvent, Request


@dataclasses.dataclass
class RequestUpdate:
    """What happened to one request on an actor since its previous reply."""

    request_id: str
    events: list[LifecycleEvent]
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    seed: int | None  # fixed by the first instance that saw the request (prefill side)

    def apply(self, request: Request, clock_offset: float = 0.0) -> None:
        """Bring the driver's copy of the request up to date; event times minus ``clock_offset`` (the
        actor's clock minus the driver's)."""
        if clock_offset:
            request.events.extend(dataclasses.replace(e, time=e.time - clock_offset) for e in self.events)
        else:
            request.events.extend(self.events)
        request.output_token_ids.extend(self.new_token_ids)
        if self.finish_reason is not None and request.finish_reason is None:
            request.finish_reason = self.finish_reason
        if request.sampling.seed is None and self.seed is not None:
            request.sampling = dataclasses.replace(request.sampling, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class InstanceStats:
    name: str
    free_blocks: int
    held_blocks: int
    queued_tokens: int  # prompt tokens not yet prefilled (prefill dispatch key)
    num_ready: int  # prefill role: requests whose KV waits to be pulled
    has_unfinished: bool


@dataclasses.dataclass
class Reply:
    """Answer of every state-changing actor method."""

    value: Any
    updates: list[RequestUpdate]
    stats: InstanceStats


@dataclasses.dataclass
class StepResult:
    outputs: list[Any]  # [StepOutput]
    ready: list[str]  # prefill role: ids held for transfer, oldest first
    # step(export=True): KV of the requests that became ready in this step, already in the object
    # store (ObjectRef of a KVPayload), so a decode actor can import it while this actor keeps working
    exported: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KVPayload:
    """One request's KV as host arrays: per layer (k, v) [n_blocks, block_size, H, Dh]."""

    num_tokens: int
    block_size: int
    layers: list[tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    name: str
    mode: str
    cfg: ModelConfig
    config: EngineConfig
    max_model_len: int
    num_devices: int
    pid: int
    node_id: str | None


def pin_threads() -> set[int] | None:
    """Pin every thread of this process to the cores in ``JAXSERVE_CPU_AFFINITY`` (e.g. "0" or "0,1").

    Runs first in an actor, before XLA starts its thread pools; threads started later inherit it."""
    spec = os.environ.get("JAXSERVE_CPU_AFFINITY")
    if not spec or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = {int(c) for c in spec.split(",") if c.strip()}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just exited
            pass
    return cpus


class InstanceActor:
    """An ``LLMEngine`` plus the bookkeeping that keeps the driver's Request objects true."""

    def __init__(self, model: str | None, config: EngineConfig, name: str, dtype: str = "float32") -> None:
        import jax

        from jaxserve.engine.engine import LLMEngine
        from jaxserve.model.checkpoint import load_model

        pin_threads()
        n = config.tp * config.pp
        devices = jax.devices()
        if len(devices) < n:
            raise ConfigError(f"{name}: tp={config.tp} x pp={config.pp} needs {n} devices, the actor sees "
                              f"{len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
        loaded = load_model(model, dtype)
        self.engine = LLMEngine(loaded.cfg, loaded.params, config, devices=devices[:n], name=name)
        self.name = name
        self._tracked: dict[str, tuple[Request, int, int]] = {}  # id -> (request, events sent, tokens sent)
        self._exported: set[str] = set()  # prefill role: ids whose KV step(export=True) already put

    # ---- bookkeeping -------------------------------------------------------------------------
    def _track(self, request: Request) -> None:
        self._tracked[request.request_id] = (request, len(request.events), len(request.output_token_ids))

    def _reply(self, value: Any = None) -> Reply:
        updates = []
        for rid, (req, ne, nt) in list(self._tracked.items()):
            if len(req.events) == ne and len(req.output_token_ids) == nt and req.finish_reason is None:
                continue
            updates.append(RequestUpdate(rid, req.events[ne:], req.output_token_ids[nt:], req.finish_reason,
                                         req.sampling.seed))
            if req.finish_reason is not None:
                del self._tracked[rid]
            else:
                self._tracked[rid] = (req, len(req.events), len(req.output_token_ids))
        return Reply(value, updates, self.stats())

    # ---- queries -----------------------------------------------------------------------------
    def info(self) -> InstanceInfo:
        try:
            import ray
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # in-process use without Ray
            node = None
        e = self.engine
        return InstanceInfo(self.name, e.config.mode, e.cfg, e.config, e.max_model_len,
                            e.config.tp * e.config.pp, os.getpid(), node)

    def clock(self) -> float:
        """This process's event clock (``time.perf_counter()``), for the driver's offset estimate."""
        return time.perf_counter()

    def stats(self) -> InstanceStats:
        e = self.engine
        return InstanceStats(self.name, e.num_free_blocks, e.num_held_blocks, e.num_queued_tokens,
                             len(e.ready), e.has_unfinished())

    def warmup(self) -> int:
        return self.engine.warmup()

    def compilations_since_warmup(self) -> int:
        return self.engine.compilations_since_warmup

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> Reply:
        """Queue a request; the update carries its PREFILL_QUEUED event and the seed fixed here."""
        sent = len(request.events), len(request.output_token_ids)  # what the driver already has
        self.engine.add_request(request)
        self._tracked[request.request_id] = (request, *sent)
        return self._reply()

    def step(self, export: bool = False) -> Reply:
        """One engine step. ``export``: also put the KV of newly prefilled requests in the object store."""
        outs = self.engine.step()
        ready = self.engine.take_ready()
        exported = {}
        if export:
            import ray

            for rid in ready:
                if rid not in self._exported:
                    self._exported.add(rid)
                    exported[rid] = ray.put(self.export_kv(rid))
        return self._reply(StepResult(outs, ready, exported))

    # ---- disaggregation ----------------------------------------------------------------------
    def export_kv(self, request_id: str) -> KVPayload:
        """Prefill role: a held request's KV as numpy (the bytes go to the object store, not the driver)."""
        from jaxserve.engine.block_manager import blocks_needed
        from jaxserve.engine.kv_transfer import export_kv

        e = self.engine
        blocks, n = e.kv_of(request_id)
        used = blocks[: blocks_needed(n, e.config.block_size)]
        return KVPayload(n, e.config.block_size, export_kv(e.executor, used))

    def release(self, request_id: str) -> Reply:
        """Prefill role: the KV has been exported; free its blocks and forget the request.

        A request aborted here meanwhile is already gone: nothing to free (value False)."""
        self._exported.discard(request_id)
        self._tracked.pop(request_id, None)
        if request_id not in self.engine.ready:
            return self._reply(False)
        self.engine.release(request_id)
        return self._reply(True)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Reply:
        self._exported.discard(request_id)
        return self._reply(self.engine.abort_request(request_id, reason))

    def admit_import(self, request: Request, payload: KVPayload, source: str = "") -> Reply:
        """Decode role, one call per hand-off: if there is room, admit the request and write its KV;
        value = bytes imported, or None (no room now: the prefill side keeps holding it).

        The driver passes the KV's ObjectRef as the argument, so Ray pulls it to this node while the
        call waits behind this actor's running step; the transfer is stamped here (this actor's
        clock, like decode queued), from when the call starts to the end of the write, so that wait
        counts as decode queue, not transfer, as the planner's simulator counts it."""
        if not self.engine.can_admit(request):
            return self._reply(None)
        dst = self.engine.admit(request)
        self._track(request)
        request.stamp(Event.TRANSFER_BEGAN, instance=f"{source}->{self.name}")
        try:
            self._write_kv(request.request_id, dst, payload)
        except BaseException:
            self.engine.abort_request(request.request_id, FinishReason.ERROR)
            self._tracked.pop(request.request_id, None)
            raise
        request.stamp(Event.TRANSFER_ENDED, instance=f"{source}->{self.name}")
        request.stamp(Event.DECODE_QUEUED, instance=self.name)
        return self._reply(payload.nbytes)

    def _write_kv(self, request_id: str, block_ids: Sequence[int], payload: KVPayload) -> None:
        """Write transferred KV into the blocks ``admit`` gave (re-paged if block sizes differ)."""
        from jaxserve.engine.block_manager import blocks_needed
        from jaxserve.engine.kv_transfer import import_kv, repage

        e = self.engine
        if request_id not in e.seqs:
            raise KeyError(f"{self.name}: request {request_id!r} was not admitted here")
        n_dst = blocks_needed(payload.num_tokens, e.config.block_size)
        if len(block_ids) < n_dst:
            raise ValueError(f"{payload.num_tokens} tokens need {n_dst} blocks, got {len(block_ids)}")
        layers: Sequence[tuple[np.ndarray, ...]] = payload.layers
        if payload.block_size != e.config.block_size:
            layers = repage(layers, payload.num_tokens, e.config.block_size, n_dst)
        import_kv(e.executor, list(block_ids[:n_dst]), layers)


@dataclasses.dataclass(frozen=True)
class ActorOptions:
    """Where and with what an instance actor runs (the placement seam).

    ``scheduling_strategy`` is passed to Ray as is: a placement-group strategy
    (``PlacementGroupSchedulingStrategy``) plugs in here when plans place instances on
    bundles; ``node_id`` is a hard node-affinity hint when no strategy is given."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    cpu_affinity: tuple[int, ...] | None = None  # pin the actor's threads to these cores (Linux)
    xla_threads: int | None = None  # 1: XLA CPU runs single-threaded (one core per instance experiments)
    resources: tuple[tuple[str, float], ...] = ()
    node_id: str | None = None
    scheduling_strategy: Any = None
    platform: str | None = "cpu"  # JAX_PLATFORMS in the actor; None: let JAX choose (GPUs)
    env_vars: tuple[tuple[str, str], ...] = ()

    def ray_options(self, config: EngineConfig) -> dict[str, Any]:
        flags = f"--xla_force_host_platform_device_count={config.tp * config.pp}"
        if self.xla_threads == 1:
            flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env = {"XLA_FLAGS": flags}
        if self.cpu_affinity is not None:
            env["JAXSERVE_CPU_AFFINITY"] = ",".join(map(str, self.cpu_affinity))
        if self.platform is not None:
            env["JAX_PLATFORMS"] = self.platform
        env.update(dict(self.env_vars))
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                "runtime_env": {"env_vars": env}, "max_restarts": 0}
        if self.resources:
            opts["resources"] = dict(self.resources)
        strategy = self.scheduling_strategy
        if strategy is None and self.node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            strategy = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        return opts


_REMOTE_CLASS: Any = None


def start_instance(model: str | os.PathLike[str] | None, config: EngineConfig, name: str, *,
                   dtype: str = "float32", options: ActorOptions | None = None) -> Any:
    """Create an ``InstanceActor`` (asynchronously: its first call waits for the model to load)."""
    import ray

    global _REMOTE_CLASS
    if _REMOTE_CLASS is None:
        _REMOTE_CLASS = ray.remote(InstanceActor)
    options = options or ActorOptions()
    model_spec = None if model is None else str(model)
    return _REMOTE_CLASS.options(**options.ray_options(config)).remote(model_spec, config, name, dtype)
