"""KV between instance processes over JAX collectives: gloo on CPU, NCCL on GPUs, one code path.

    driver:  CoordinatorService(n) -> GroupSpec  (jax.distributed's coordination service runs in the
             driver, with recoverable tasks: any instance process may die without taking the group
             down; measured: a dead task 0 that hosted the service aborted every other process)
    each instance actor, before JAX starts:  join_group(spec, process_id)
    prefill actor's loop:  export_kv -> CollectiveKV (a descriptor; the blocks are gathered in
             power-of-two pieces, per piece and layer k and v [1, piece, bs, H, Dh] on the process's
             first device, held until the request is released or aborted)
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
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any


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
    # task 0 would start a second service: it binds an unused loopback port (on its own host); every
    # task talks to the driver's
    bind = f"127.0.0.1:{_free_port('127.0.0.1')}" if process_id == 0 else None
    jax.distributed.initialize(spec.address, num_processes=spec.num_processes, process_id=process_id,
                               coordinator_bind_address=bind, heartbeat_timeout_seconds=spec.heartbeat_s,
                               shutdown_timeout_seconds=5)


@dataclasses.dataclass(frozen=True)
class CollectiveKV:
    """A handle to one request's KV held by process ``src_process`` (what the router passes on)."""

    request_id: str
    key: str
    src_process: int
    num_tokens: int
    block_size: int
    pieces: tuple[tuple[int, int], ...]  # block ranges sent one exchange each (pow2_pieces)
    shape: tuple[int, ...]  # (2L arrays, bs, H, Dh): per layer k then v, each [blocks, bs, H, Dh]
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


def exchange(src: int, dst: int, kv: list[Any], ok: bool) -> tuple[list[Any], bool]:
    """One side of a transfer from process ``src`` to ``dst``: ``kv`` is this side's list of [1, ...]
    shards on its first device (the KV on the source, buffers of those shapes on the destination).
    Returns the destination's shards and the source's flag (meaningful on the destination)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    mesh, fn = _exchange_fn(first_device(src), first_device(dst))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    flag = jax.device_put(np.full((1,), int(ok), np.int32), first_device(jax.process_index()))
    glob = [jax.make_array_from_single_device_arrays((2, *a.shape[1:]), sharding, [a]) for a in (*kv, flag)]
    out_kv, out_ok = fn(glob[:-1], glob[-1])
    local = [a.addressable_shards[0].data for a in out_kv]
    return jax.block_until_ready(local), bool(np.asarray(out_ok.addressable_shards[0].data)[0])


def send_array(dst: int, a: Any) -> None:
    """Send one array (an activation, logits) from this process to process ``dst``, which runs
    ``recv_array`` with its shape and dtype at the same point."""
    import jax

    me = jax.process_index()
    exchange(me, dst, with_lead_axis([a], first_device(me), add=True), True)


_recv_buffers: dict[tuple[tuple[int, ...], str], Any] = {}


def recv_array(src: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """The array process ``src`` sends with ``send_array``, on this process's first device."""
    import jax
    import numpy as np

    me = jax.process_index()
    key = (tuple(shape), str(np.dtype(dtype)))
    if key not in _recv_buffers:  # the receive side's input: zeros, reused, never written
        _recv_buffers[key] = jax.device_put(np.zeros((1, *shape), dtype), first_device(me))
    out, _ = exchange(src, me, [_recv_buffers[key]], True)
    return with_lead_axis(out, first_device(me), add=False)[0]


@functools.cache
def _reshapers() -> tuple[Any, Any]:
    import jax

    return jax.jit(lambda xs: [x[None] for x in xs]), jax.jit(lambda xs: [x[0] for x in xs])


def with_lead_axis(arrays: Sequence[Any], dev: Any, add: bool) -> list[Any]:
    """[k, ...] arrays -> [1, k, ...] on ``dev`` (``add``), or [1, k, ...] -> [k, ...]. On CPU through
    numpy views of the buffers (no copy of a single-device array); elsewhere one jitted reshape."""
    import jax
    import numpy as np

    if dev.platform == "cpu":
        views = [np.asarray(a)[None] if add else np.asarray(a)[0] for a in arrays]
        return jax.device_put(views, [dev] * len(views), may_alias=True)
    expand, squeeze = _reshapers()
    return (expand if add else squeeze)(jax.device_put(list(arrays), dev))


def pow2_pieces(n: int) -> list[tuple[int, int]]:
    """Block ranges of powers of two covering ``n`` blocks, largest first (10 -> [0, 8), [8, 10)):
    only the real blocks cross, in shapes that warm-up compiled (one per block bucket)."""
    out, start = [], 0
    for bit in reversed(range(max(1, n).bit_length())):
        if n & (1 << bit):
            out.append((start, start + (1 << bit)))
            start += 1 << bit
    return out


@dataclasses.dataclass
class FetchedKV:
    """A ``CollectiveKV`` after the fetch: its pieces as ``DeviceKV``s on this process's first device."""

    num_tokens: int
    block_size: int
    pieces: list[tuple[int, int, Any]]  # (first block, end block, DeviceKV)


class CollectiveTransport:
    """The runtime's KV transport across processes of one group (see the module docstring)."""

    def __init__(self, process_id: int) -> None:
        from jaxserve.engine.kv_transfer import LocalTransport

        self.process_id = process_id
        self.local = LocalTransport()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, list[Any]]] = {}  # request id -> (key, per piece: 2L shards)
        self._seq = itertools.count()
        self._buffers: dict[tuple[int, tuple[int, ...], str], Any] = {}  # receive-side input shards

    # ---- source side ---------------------------------------------------------------------------
    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> CollectiveKV:
        import jax

        from jaxserve.engine.block_manager import blocks_needed

        n = blocks_needed(num_tokens, src.block_size)
        if n == 0 or len(block_ids) < n:
            raise ValueError(f"{num_tokens} tokens need {n} source blocks, got {len(block_ids)}")
        dev = first_device(self.process_id)
        pieces = pow2_pieces(n)
        flat = []
        for a, b in pieces:  # each piece a power of two: the gather's warmed bucket sizes, no slicing
            flat.append(with_lead_axis([x for pair in src.gather_blocks(block_ids[a:b]) for x in pair], dev, add=True))
        jax.block_until_ready(flat)
        key = f"{self.process_id}:{next(self._seq)}"
        with self._lock:
            self._held[request_id] = (key, flat)
        one = flat[0][0]
        return CollectiveKV(request_id, key, self.process_id, num_tokens, src.block_size, tuple(pieces),
                            (len(flat[0]), *one.shape[2:]), str(one.dtype))

    def forget(self, request_id: str) -> None:
        """The request was released or aborted here: drop its export."""
        with self._lock:
            self._held.pop(request_id, None)

    def send(self, handle: CollectiveKV, dst_process: int) -> bool:
        """Run the source side of a transfer; the destination learns whether the KV was still held
        (a released or aborted export sends zeros and a false flag, so the other end never hangs)."""
        with self._lock:
            held = self._held.get(handle.request_id)
        ok = held is not None and held[0] == handle.key
        for i, (a, b) in enumerate(handle.pieces):
            exchange(self.process_id, dst_process, held[1][i] if ok else self._buffer(b - a, handle), ok)
        return ok

    # ---- destination side ----------------------------------------------------------------------
    def _buffer(self, blocks: int, handle: CollectiveKV) -> Any:
        import jax
        import jax.numpy as jnp
        import numpy as np

        k = (blocks, handle.shape, handle.dtype)
        if k not in self._buffers:  # 2L shards of zeros, reused (never donated, never written); from
            # numpy, so that a source sending a false flag compiles nothing after warm-up
            one = np.zeros((1, blocks, *handle.shape[1:]), jnp.dtype(handle.dtype))
            self._buffers[k] = [jax.device_put(one, first_device(self.process_id))] * handle.shape[0]
        return self._buffers[k]

    def fetch(self, handle: CollectiveKV) -> FetchedKV:
        """Run the destination side: the KV's pieces as ``DeviceKV``s on this process's first device."""
        from jaxserve.engine.kv_transfer import DeviceKV

        dev, pieces, held = first_device(self.process_id), [], True
        for a, b in handle.pieces:  # every piece, even after a false flag: the source sends them all
            out, ok = exchange(handle.src_process, self.process_id, self._buffer(b - a, handle), True)
            held = held and ok
            flat = with_lead_axis(out, dev, add=False)
            tokens = max(0, min(handle.num_tokens, b * handle.block_size) - a * handle.block_size)
            pieces.append((a, b, DeviceKV(tokens, handle.block_size, b - a, list(zip(flat[::2], flat[1::2], strict=True)))))
        if not held:
            raise RuntimeError(f"process {handle.src_process} no longer holds the KV of {handle.request_id!r}")
        return FetchedKV(handle.num_tokens, handle.block_size, pieces)

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: Any) -> int:
        from jaxserve.engine.kv_transfer import KVPayload, import_host

        if isinstance(handle, CollectiveKV):
            handle = self.fetch(handle)  # callers that did not fetch on a transfer thread
        if not isinstance(handle, FetchedKV):
            return self.local.import_kv(dst, block_ids, handle)
        if handle.block_size == dst.block_size:
            return sum(self.local.import_kv(dst, block_ids[a:b], kv) for a, b, kv in handle.pieces)
        # other block sizes: re-paged through the host as one payload
        import numpy as np
        layers = [tuple(np.concatenate([np.asarray(kv.layers[i][j])[: b - a] for a, b, kv in handle.pieces])
                        for j in range(2)) for i in range(len(handle.pieces[0][2].layers))]
        return import_host(dst, block_ids, KVPayload(handle.num_tokens, handle.block_size, layers))

    # ---- warm-up (driven pair by pair by the driver, both ends at once) ------------------------
    def transfer_shapes(self, src: Any, max_tokens: int) -> tuple[list[int], tuple[int, ...], str]:
        """(block buckets, per-array shape, dtype) of this source's exports: what a peer warms."""
        from jaxserve.engine.kv_transfer import block_buckets

        buckets = list(block_buckets(src, min(max_tokens, src.num_blocks * src.block_size)))
        pages = src.kv[0][0]  # [blocks, bs, H, Dh], heads whole (a global array)
        return buckets, (2 * len(src.kv), *pages.shape[1:]), str(pages.dtype)

    def warm_send(self, src: Any, dst_process: int, max_tokens: int) -> int:
        from jaxserve.engine.block_manager import NULL_BLOCK

        buckets, _, _ = self.transfer_shapes(src, max_tokens)
        for b in buckets:
            self.send(self.export_kv(src, [NULL_BLOCK] * b, b * src.block_size, request_id="warmup"), dst_process)
        self.forget("warmup")
        return len(buckets)

    def warm_recv(self, dst: Any, src_process: int, src_block_size: int, shapes: Any) -> int:
        from jaxserve.engine.kv_transfer import warm_import

        buckets, shape, dtype = shapes
        for b in buckets:
            h = CollectiveKV("warmup", "", src_process, b * src_block_size, src_block_size, ((0, b),),
                             tuple(shape), dtype)
            warm_import(self.local, dst, self.fetch(h).pieces[0][2])
        return len(buckets)

    def warmup(self, src: Any, dst: Any) -> None:
        """In-process peers do not exist for this transport: pairs warm up through warm_send / warm_recv."""
