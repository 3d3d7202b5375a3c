"""KV between instance processes over JAX collectives: gloo on CPU, NCCL on GPUs, one code path.

    driver:  CoordinatorService(n) -> GroupSpec  (jax.distributed's coordination service runs in the
             driver, with recoverable tasks: any instance process may die without taking the group
             down; measured: a dead task 0 that hosted the service aborted every other process)
    each instance actor, before JAX starts:  join_group(spec, process_id)
    prefill actor's loop:  export_kv -> CollectiveKV (a descriptor; the blocks are gathered and stacked
             into one [1, L, 2, bucket, bs, H, Dh] array on the process's first device, held until
             the request is released or aborted)
    router -> decode proxy.import_kv(handle): the source actor is told send(request, key, dst) and the
             decode actor fetch(handle); each runs it on its own transfer thread, beside stepping:
                 one jitted ppermute over a 2-device mesh (source device, destination device),
                 compiled per block bucket at warm-up, carrying the KV and a "still held" flag
             -> the fetched DeviceKV is imported by the decode loop (kv_transfer's staged import:
                heads and layers re-split for the destination's tp / pp, scatter into donated pages)

Pull-based as in DistServe: the router pulls only into a decode instance with room. Each process
runs its transfers one at a time in the order the router issued them, so two transfers never wait
on each other (the earliest one always has both ends at it).

Faults: warm-up runs one transfer per (prefill, decode) pair, which also connects the pair's gloo
(or NCCL) context. A peer that dies later makes the other end's collective fail at once ("connection
closed by peer"); the request it carried ends with an error, survivors go on. An unconnected pair
would instead wait 30 s in the context's rendezvous: warm-up exists partly to avoid that.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Where the instance processes find each other."""

    address: str  # host:port of the coordination service (the driver)
    num_processes: int
    heartbeat_s: int = 10


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CoordinatorService:
    """jax.distributed's coordination service, hosted by the driver (it outlives every instance)."""

    def __init__(self, num_processes: int, host: str = "127.0.0.1", heartbeat_s: int = 10) -> None:
        from jax._src.lib import _jax  # the service jax.distributed.initialize starts in task 0

        self.spec = GroupSpec(f"{host}:{_free_port(host)}", num_processes, heartbeat_s)
        self._service = _jax.get_distributed_runtime_service(
            self.spec.address, num_processes, heartbeat_timeout=heartbeat_s, shutdown_timeout=5,
            recoverable=True)

    def shutdown(self) -> None:
        if self._service is not None:
            self._service.shutdown()
            self._service = None


def join_group(spec: GroupSpec, process_id: int) -> None:
    """Join the group as ``process_id``; call before anything starts JAX's backends."""
    import jax

    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    host = spec.address.rsplit(":", 1)[0]
    # task 0 would start a second service: it binds an unused port; every task talks to the driver's
    jax.distributed.initialize(spec.address, num_processes=spec.num_processes, process_id=process_id,
                               coordinator_bind_address=f"{host}:{_free_port(host)}",
                               heartbeat_timeout_seconds=spec.heartbeat_s, shutdown_timeout_seconds=5)


@dataclasses.dataclass(frozen=True)
class CollectiveKV:
    """A handle to one request's KV held by process ``src_process`` (what the router passes on)."""

    request_id: str
    key: str
    src_process: int
    num_tokens: int
    block_size: int
    num_blocks: int
    shape: tuple[int, ...]  # [L, 2, bucket, bs, H, Dh]
    dtype: str
    remote = True  # an instance fetches it on its transfer thread before importing


def first_device(process: int) -> Any:
    import jax

    return next(d for d in jax.devices() if d.process_index == process)


@functools.cache
def _exchange_fn(src_dev: Any, dst_dev: Any) -> Any:
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array([src_dev, dst_dev]), ("x",))
    move = jax.shard_map(lambda kv, ok: (jax.lax.ppermute(kv, "x", [(0, 1)]), jax.lax.ppermute(ok, "x", [(0, 1)])),
                         mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"))
    return mesh, jax.jit(move)


def exchange(src: int, dst: int, kv: Any, ok: bool) -> tuple[Any, bool]:
    """One side of a transfer from process ``src`` to ``dst``: ``kv`` is this side's [1, ...] shard
    on its first device (the KV on the source, any buffer of that shape on the destination). Returns
    the destination's shard and the source's flag (meaningful on the destination)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    mesh, fn = _exchange_fn(first_device(src), first_device(dst))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    dev = kv.devices().pop()
    flag = jax.device_put(np.full((1,), int(ok), np.int32), dev)
    glob = [jax.make_array_from_single_device_arrays((2, *a.shape[1:]), sharding, [a]) for a in (kv, flag)]
    out_kv, out_ok = fn(*glob)
    local_kv, local_ok = out_kv.addressable_shards[0].data, out_ok.addressable_shards[0].data
    return jax.block_until_ready(local_kv), bool(np.asarray(local_ok)[0])


@functools.cache
def _jitted() -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    stack = jax.jit(lambda layers: jnp.stack([jnp.stack([k, v]) for k, v in layers])[None])
    unstack = jax.jit(lambda x: [(x[0, i, 0], x[0, i, 1]) for i in range(x.shape[1])])
    return stack, unstack


class CollectiveTransport:
    """The runtime's KV transport across processes of one group (see the module docstring)."""

    def __init__(self, process_id: int) -> None:
        from jaxserve.engine.kv_transfer import LocalTransport

        self.process_id = process_id
        self.local = LocalTransport()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, Any]] = {}  # request id -> (key, stacked KV)
        self._seq = itertools.count()
        self._buffers: dict[tuple[tuple[int, ...], str], Any] = {}  # receive-side input shards

    # ---- source side ---------------------------------------------------------------------------
    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> CollectiveKV:
        import jax

        kv = self.local.export_kv(src, block_ids, num_tokens)
        stacked = _jitted()[0](jax.device_put(kv.layers, first_device(self.process_id)))
        key = f"{self.process_id}:{next(self._seq)}"
        with self._lock:
            self._held[request_id] = (key, stacked)
        return CollectiveKV(request_id, key, self.process_id, kv.num_tokens, kv.block_size, kv.num_blocks,
                            tuple(stacked.shape[1:]), str(stacked.dtype))

    def forget(self, request_id: str) -> None:
        """The request was released or aborted here: drop its export."""
        with self._lock:
            self._held.pop(request_id, None)

    def send(self, request_id: str, key: str, dst_process: int, shape: Sequence[int], dtype: str) -> bool:
        """Run the source side of a transfer; the destination learns whether the KV was still held
        (a released or aborted export sends zeros and a false flag, so the other end never hangs)."""
        with self._lock:
            held = self._held.get(request_id)
        ok = held is not None and held[0] == key
        kv = held[1] if ok else self._buffer(shape, dtype)
        exchange(self.process_id, dst_process, kv, ok)
        return ok

    # ---- destination side ----------------------------------------------------------------------
    def _buffer(self, shape: Sequence[int], dtype: str) -> Any:
        import jax
        import jax.numpy as jnp

        k = (tuple(shape), dtype)
        if k not in self._buffers:
            self._buffers[k] = jax.device_put(jnp.zeros((1, *shape), dtype), first_device(self.process_id))
        return self._buffers[k]

    def fetch(self, handle: CollectiveKV) -> Any:
        """Run the destination side: the KV as a ``DeviceKV`` on this process's first device."""
        from jaxserve.engine.kv_transfer import DeviceKV

        out, ok = exchange(handle.src_process, self.process_id, self._buffer(handle.shape, handle.dtype), True)
        if not ok:
            raise RuntimeError(f"process {handle.src_process} no longer holds the KV of {handle.request_id!r}")
        return DeviceKV(handle.num_tokens, handle.block_size, handle.num_blocks, _jitted()[1](out))

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: Any) -> int:
        if isinstance(handle, CollectiveKV):
            handle = self.fetch(handle)  # callers that did not fetch on a transfer thread
        return self.local.import_kv(dst, block_ids, handle)

    # ---- warm-up (driven pair by pair by the driver, both ends at once) ------------------------
    def transfer_shapes(self, src: Any, max_tokens: int) -> list[tuple[tuple[int, ...], str]]:
        """The shapes this source's exports can take, one per block bucket."""
        from jaxserve.engine.block_manager import NULL_BLOCK
        from jaxserve.engine.kv_transfer import block_buckets

        out = []
        for b in block_buckets(src, min(max_tokens, src.num_blocks * src.block_size)):
            h = self.export_kv(src, [NULL_BLOCK] * b, b * src.block_size, request_id="warmup")
            out.append((h.shape, h.dtype))
        self.forget("warmup")
        return out

    def warm_send(self, src: Any, dst_process: int, max_tokens: int) -> int:
        from jaxserve.engine.block_manager import NULL_BLOCK
        from jaxserve.engine.kv_transfer import block_buckets

        buckets = block_buckets(src, min(max_tokens, src.num_blocks * src.block_size))
        for b in buckets:
            h = self.export_kv(src, [NULL_BLOCK] * b, b * src.block_size, request_id="warmup")
            self.send("warmup", h.key, dst_process, h.shape, h.dtype)
        self.forget("warmup")
        return len(buckets)

    def warm_recv(self, dst: Any, src_process: int, src_block_size: int,
                  shapes: Sequence[tuple[tuple[int, ...], str]]) -> int:
        from jaxserve.engine.kv_transfer import warm_import

        for shape, dtype in shapes:
            h = CollectiveKV("warmup", "", src_process, 0, src_block_size, 0, tuple(shape), dtype)
            warm_import(self.local, dst, self.fetch(h))
        return len(shapes)

    def warmup(self, src: Any, dst: Any) -> None:
        """In-process peers do not exist for this transport: pairs warm up through warm_send / warm_recv."""
