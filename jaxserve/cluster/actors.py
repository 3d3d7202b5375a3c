"""One instance inside a Ray actor: the same ``LocalInstance`` loop as in-process, behind remote methods.

    driver --start_instance(model, EngineConfig, name, ActorOptions, compilation cache)--> Ray actor process
        runtime_env: XLA_FLAGS=--xla_force_host_platform_device_count=tp*pp, JAX_PLATFORMS=cpu
        __init__: the driver's compilation cache setting (jaxserve.compile_cache), before any compile
                  -> load_model(folder, dtype) -> LLMEngine(..., transport=ObjectStoreTransport()), its
                  KV pool sized from 1/host_share of the host's memory when it runs on CPU devices
                  (or a ``FakeCore`` for runtime tests) -> LocalInstance, looping in its own thread
    warmup(progress): compiles every shape; progress lines go to the actor's stderr (Ray's log)
    add / abort / import_kv / release: queued for the loop in the order sent (the default concurrency
        group has one thread), return at once; ``poll`` runs in a group of its own, so a command
        never waits behind it
    poll(wait_s) -> Batch: the loop's messages since the last poll (waits up to ``wait_s`` for one)

KV crosses over JAX collectives when the actors form a group (``jaxserve.cluster.collective``:
``send_kv`` / ``warm_transfer`` here), otherwise as numpy through the object store: the prefill actor's export is ``ray.put`` of a
``KVPayload`` (its ``KVReady`` carries the ObjectRef); the driver passes that ref to the decode
actor's ``import_kv`` at top level, so Ray pulls the bytes to that node before the call runs and
the import itself is a plain numpy write. Only numpy crosses, never ``jax.Array`` (see FACTS.md).

Event times are ``time.perf_counter()`` in each process (CLOCK_MONOTONIC on Linux: comparable
across actors on one host); for an actor on another node the driver estimates the offset at start
(``clock()``) and the router moves the actor's event times onto its own clock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from jaxserve.config import ConfigError, EngineConfig
from jaxserve.request import FinishReason, Request
from jaxserve.runtime.api import Batch, InstanceInfo, InstanceStats

log = logging.getLogger(__name__)


class ObjectStoreTransport:
    """``HostTransport`` with the payload in Ray's object store: export returns an ObjectRef; import
    takes the payload (Ray resolves a top-level ref argument) or a ref (fetched with a deadline)."""

    def __init__(self, get_timeout_s: float = 60.0) -> None:
        from jaxserve.engine.kv_transfer import HostTransport

        self.host = HostTransport()
        self.get_timeout_s = get_timeout_s

    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> Any:
        import ray

        if hasattr(src, "export_staged"):  # a pipeline spanning processes: a part per segment, on its node
            return src.export_staged(block_ids, num_tokens)
        return ray.put(self.host.export_kv(src, block_ids, num_tokens))

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: Any) -> int:
        import ray

        from jaxserve.cluster.stages import StagedKV, layers_of

        if isinstance(handle, ray.ObjectRef):
            handle = ray.get(handle, timeout=self.get_timeout_s)
        if isinstance(handle, StagedKV):
            if hasattr(dst, "import_staged"):
                return dst.import_staged(block_ids, handle)
            from jaxserve.engine.kv_transfer import KVPayload
            payloads = ray.get([p[2] for p in handle.parts], timeout=self.get_timeout_s)
            layers = layers_of(handle.parts, payloads, range(dst.cfg.num_hidden_layers))
            handle = KVPayload(handle.num_tokens, handle.block_size, layers)
        return self.host.import_kv(dst, block_ids, handle)

    def warmup(self, src: Any, dst: Any) -> None:
        """Nothing beyond the executors' own warm-up."""


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


def _engine_core(model: str | None, config: EngineConfig, name: str, dtype: str,
                 compilation_cache: str | None, host_share: int = 1, process_id: int | None = None,
                 segments: Sequence[Any] = (), collective_kv: bool = False) -> Any:
    import jax

    from jaxserve import native
    from jaxserve.compile_cache import enable_compilation_cache
    from jaxserve.engine.engine import LLMEngine
    from jaxserve.memory import measure_memory
    from jaxserve.model.checkpoint import load_model

    # before anything compiles; a directory, "off", or None (this process's default); logs where
    enable_compilation_cache(compilation_cache)
    native.build_in_background()  # the CPU decode kernel builds (or loads) while the model loads

    here = _stages_here(config, segments)  # this process's stages: 0 .. here-1
    n = config.tp * here
    devices = jax.local_devices()  # (in a collective group jax.devices() lists every process's)
    if len(devices) < n:
        raise ConfigError(f"{name}: tp={config.tp} x {here} stage(s) needs {n} devices, the actor sees "
                          f"{len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    loaded = load_model(model, dtype)
    memory = measure_memory(devices[:n])
    if memory is not None and all(d.platform == "cpu" for d in devices[:n]):
        memory = memory.share(host_share)  # the other actors on this host draw on the same memory
    # (a group may exist for a spanning pipeline's activations alone: KV then goes through the object store)
    if not collective_kv or process_id is None:
        transport: Any = ObjectStoreTransport()
    else:
        from jaxserve.cluster.collective import CollectiveTransport
        transport = CollectiveTransport(process_id)
    executor = None
    if segments:
        from jaxserve.cluster.stages import SpanningExecutor
        from jaxserve.engine.pipeline import PipelineExecutor
        executor = SpanningExecutor(PipelineExecutor(loaded.cfg, loaded.params, devices[:n], config.tp, config.pp,
                                                     config.attention, stages=range(here)), segments)
    return LLMEngine(loaded.cfg, loaded.params, config, devices=devices[:n], name=name,
                     transport=transport, memory=memory, executor=executor)


class InstanceActor:
    """A ``LocalInstance`` in an actor process (a plain class: usable in-process for tests)."""

    def __init__(self, model: str | None, config: EngineConfig, name: str, dtype: str = "float32",
                 fake: dict[str, Any] | None = None, compilation_cache: str | None = None,
                 host_share: int = 1, group: Any = None, process_id: int | None = None,
                 segments: Sequence[Any] = (), collective_kv: bool = False) -> None:
        from jaxserve.logs import show_logs
        from jaxserve.runtime.instance import LocalInstance

        pin_threads()
        show_logs()
        if fake is not None:
            from jaxserve.runtime.fake import FakeCore
            core: Any = FakeCore(name=name, mode=config.mode, **fake)
        else:
            if group is not None:  # before anything starts JAX's backends
                from jaxserve.cluster.collective import join_group
                join_group(group, process_id)
            core = _engine_core(model, config, name, dtype, compilation_cache, host_share,
                                None if group is None else process_id, segments, collective_kv)
        self._ready = threading.Event()
        self._sender: Any = None
        self.instance = LocalInstance(core)
        self.instance.start(self._ready)

    def info(self) -> InstanceInfo:
        try:
            import ray
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # in-process use without Ray
            node = None
        return dataclasses.replace(self.instance.info, node_id=node, pid=os.getpid())

    def clock(self) -> float:
        """This process's event clock (``time.perf_counter()``), for the driver's offset estimate."""
        return time.perf_counter()

    def add(self, request: Request) -> None:
        self.instance.add(request)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self.instance.abort(request_id, reason)

    def import_kv(self, request: Request, payload: Any, source: str) -> None:
        self.instance.import_kv(request, payload, source)

    def release(self, request_id: str) -> None:
        self.instance.release(request_id)

    # ---- the collective transport (jaxserve.cluster.collective) -------------------------------------
    def send_kv(self, handle: Any, dst_process: int) -> None:
        """Queue the source side of a collective hand-off on the transfer thread; returns at once."""
        if self._sender is None:
            from concurrent.futures import ThreadPoolExecutor
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="jaxserve-send")
        transport = self.instance.core.transport

        def send() -> None:
            try:
                if not transport.send(handle, dst_process):
                    log.info("%s: %s was released before its transfer", self.instance.info.name, handle.request_id)
            except Exception as e:  # the peer died mid-transfer: it fails that request on its side
                log.warning("%s: sending %s failed: %s", self.instance.info.name, handle.request_id, e)

        self._sender.submit(send)

    def transfer_shapes(self) -> Any:
        core = self.instance.core
        return self.instance._call(lambda: core.transport.transfer_shapes(core.executor, core.max_model_len))

    def warm_transfer(self, role: str, peer: int, block_size: int = 0, shapes: Any = None) -> int:
        """One end of a pair's warm-up (both ends at once): every bucket's transfer, import included."""
        core = self.instance.core
        if role == "send":
            return self.instance._call(lambda: core.warm_more(
                lambda: core.transport.warm_send(core.executor, peer, core.max_model_len)))
        return self.instance._call(lambda: core.warm_more(
            lambda: core.transport.warm_recv(core.executor, peer, block_size, shapes)))

    def poll(self, wait_s: float) -> Batch:
        """The loop's messages since the last poll; waits up to ``wait_s`` while there are none."""
        self._ready.wait(wait_s)
        self._ready.clear()
        return self.instance.outputs()

    def stats(self) -> InstanceStats:
        return self.instance.stats()

    def warmup(self, progress: bool = False) -> int:
        return self.instance.warmup(progress)

    def compilations_since_warmup(self) -> int:
        return self.instance.compilations_since_warmup()


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

    def ray_options(self, config: EngineConfig, stages: int | None = None) -> dict[str, Any]:
        """Ray's options for an actor holding ``stages`` (default: all) of ``config``'s pipeline."""
        flags = f"--xla_force_host_platform_device_count={config.tp * (config.pp if stages is None else stages)}"
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
                   dtype: str = "float32", options: ActorOptions | None = None,
                   fake: dict[str, Any] | None = None, compilation_cache: str | None = None,
                   host_share: int = 1, group: Any = None, process_id: int | None = None,
                   segments: Sequence[Any] = (), collective_kv: bool = False) -> Any:
    """Create an ``InstanceActor`` (asynchronously: its first call waits for the model to load).
    ``fake``: a ``FakeCore``'s settings instead of a model (runtime tests). ``compilation_cache``: a
    directory or "off"; None: the driver's default (``jaxserve.compile_cache.resolve_cache_dir``),
    resolved here so that the actor uses the same directory. ``host_share``: how many instances may
    share this actor's host memory (a CPU actor's KV pool takes from 1/host_share). ``group`` (a
    ``jaxserve.cluster.collective.GroupSpec``) and ``process_id``: the actor joins that collective
    group; ``collective_kv``: its KV moves over that group (else through the object store).
    ``segments``: the further segments of a pipeline spanning processes (``jaxserve.cluster.stages.Segment``,
    started already); this actor holds the stages before them."""
    import ray

    from jaxserve.compile_cache import resolve_cache_dir, setting

    global _REMOTE_CLASS
    if _REMOTE_CLASS is None:
        # commands run one at a time, in the order sent; poll has a thread of its own
        _REMOTE_CLASS = ray.remote(concurrency_groups={"poll": 1})(InstanceActor)
    options = options or ActorOptions()
    model_spec = None if model is None else str(model)
    cache = setting(resolve_cache_dir(compilation_cache))
    return _REMOTE_CLASS.options(**options.ray_options(config, _stages_here(config, segments))).remote(
        model_spec, config, name, dtype, fake, cache, host_share, group, process_id, list(segments), collective_kv)


def _stages_here(config: EngineConfig, segments: Sequence[Any]) -> int:
    """How many leading stages the instance actor itself holds (all, unless later ones are segments)."""
    return segments[0].stages.start if segments else config.pp


_STAGE_CLASS: Any = None


def start_stage(model: str | os.PathLike[str] | None, config: EngineConfig, stages: range, *, group: Any,
                process_id: int, prev_process: int, next_process: int, dtype: str = "float32",
                options: ActorOptions | None = None, compilation_cache: str | None = None) -> Any:
    """Create a ``jaxserve.cluster.stages.StageActor`` holding ``stages`` of a pipeline instance."""
    import ray

    from jaxserve.cluster.stages import StageActor
    from jaxserve.compile_cache import resolve_cache_dir, setting

    global _STAGE_CLASS
    if _STAGE_CLASS is None:
        _STAGE_CLASS = ray.remote(StageActor)
    options = options or ActorOptions()
    return _STAGE_CLASS.options(**options.ray_options(config, len(stages))).remote(
        None if model is None else str(model), config, stages, group, process_id, prev_process, next_process,
        dtype, setting(resolve_cache_dir(compilation_cache)))
