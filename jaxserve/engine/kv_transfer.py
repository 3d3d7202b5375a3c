"""Moving one request's KV from a prefill instance to a decode instance: export on one side, import on the other.

    source instance's thread:       export_kv(src executor, block ids, num tokens) -> handle
        (a compact copy of the request's blocks; the source keeps its blocks until released)
    ... the router passes the handle to a decode instance with room ...
    destination instance's thread:  import_kv(dst executor, block ids, handle) -> bytes written

Every transport speaks this pair; each executor is touched only by its own instance's thread.

* ``LocalTransport`` (in-process, the default): the handle is a ``DeviceKV``: the blocks gathered
  on the source mesh, padded to a power-of-two bucket (compiled once per bucket). Import on CPU
  meshes (equal block size and dtype, one tp a multiple of the other) is one jitted pass that
  reads the export through zero-copy views and writes the donated destination pages (see below);
  elsewhere it is staged: ``jax.device_put`` to the destination's sharding re-splits heads (tp) and
  layers (pp), then a scatter into the donated pages (what accelerators do: the hop is the link).
  Different block sizes are re-paged through the host.
* ``HostTransport``: the handle is a ``KVPayload`` of numpy arrays (what crosses processes).
* ``jaxserve.cluster.actors.ObjectStoreTransport``: a ``KVPayload`` in Ray's object store.
* ``jaxserve.cluster.collective.CollectiveTransport``: across processes over JAX collectives (gloo on
  CPU, NCCL on GPUs); its handle is a descriptor the destination fetches on a transfer thread.
* Any ``import_kv`` accepts a ``KVPayload``. ``request_id`` names the export (a transport that holds
  exports until the request is released keys them by it).

``warmup(src, dst)`` compiles a pair's import programs for every block bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.engine.block_manager import NULL_BLOCK, blocks_needed
from jaxserve.model.inputs import pow2_buckets

LayerBlocks = list[tuple[Any, Any]]  # per layer (k, v) [n, bs, H, Dh]


class KVTransport(Protocol):
    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> Any: ...
    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: Any) -> int: ...
    def warmup(self, src: Any, dst: Any) -> None: ...


@dataclasses.dataclass
class KVPayload:
    """One request's KV as host arrays: per layer (k, v) [n_blocks, block_size, H, Dh]."""

    num_tokens: int
    block_size: int
    layers: list[tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclasses.dataclass
class DeviceKV:
    """One request's KV gathered on the source mesh: per layer (k, v) [bucket, bs, H, Dh], each on its
    stage's devices; the first ``num_blocks`` rows are real."""

    num_tokens: int
    block_size: int
    num_blocks: int
    layers: LayerBlocks

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers) * self.num_blocks // max(1, self.layers[0][0].shape[0])


def _pad(ids: Sequence[int], n: int) -> list[int]:
    return list(ids) + [NULL_BLOCK] * (n - len(ids))


def _bucket(n: int) -> int:
    return pow2_buckets(1, n)[-1]


def padded_ids(block_ids: Sequence[int], num_tokens: int, block_size: int) -> list[int]:
    """The blocks holding ``num_tokens``, padded with the null block to a bucket (a warmed gather shape)."""
    n = blocks_needed(num_tokens, block_size)
    if len(block_ids) < n:
        raise ValueError(f"{num_tokens} tokens need {n} source blocks, got {len(block_ids)}")
    return _pad(block_ids[:n], _bucket(max(1, n)))


def block_buckets(executor: Any, max_tokens: int) -> tuple[int, ...]:
    """The hand-off block buckets an executor's requests can need."""
    return pow2_buckets(1, blocks_needed(max_tokens, executor.block_size))


def repage(blocks: LayerBlocks, num_tokens: int, dst_block_size: int, n_dst: int) -> list[tuple[np.ndarray, ...]]:
    """Host re-paging: per-layer [n, bs_src, H, Dh] -> [n_dst, bs_dst, H, Dh] keeping the first num_tokens."""
    out = []
    for k, v in blocks:
        pair = []
        for a in (np.asarray(k), np.asarray(v)):
            flat = a.reshape(-1, *a.shape[2:])[:num_tokens]
            buf = np.zeros((n_dst * dst_block_size, *a.shape[2:]), a.dtype)
            buf[:num_tokens] = flat
            pair.append(buf.reshape(n_dst, dst_block_size, *a.shape[2:]))
        out.append(tuple(pair))
    return out


def _check(handle: Any, dst: Any, block_ids: Sequence[int]) -> int:
    n_dst = blocks_needed(handle.num_tokens, dst.block_size)
    if len(block_ids) < n_dst:
        raise ValueError(f"{handle.num_tokens} tokens need {n_dst} destination blocks, got {len(block_ids)}")
    return n_dst


def import_host(dst: Any, block_ids: Sequence[int], payload: KVPayload) -> int:
    """Write a ``KVPayload`` into ``block_ids`` of ``dst`` (re-paged if block sizes differ; padded to a bucket)."""
    n = _check(payload, dst, block_ids)
    layers: Sequence[tuple[np.ndarray, ...]] = payload.layers
    if payload.block_size != dst.block_size:
        layers = repage(layers, payload.num_tokens, dst.block_size, n)
    b = _bucket(n)

    def pad(a: np.ndarray) -> np.ndarray:
        a = a[:n]
        return np.concatenate([a, np.zeros((b - n, *a.shape[1:]), a.dtype)]) if b > n else a

    dst.scatter_blocks(_pad(block_ids[:n], b), [(pad(k), pad(v)) for k, v in layers])
    return payload.nbytes


class HostTransport:
    """The KV as numpy arrays (what a process boundary carries)."""

    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> KVPayload:
        n = blocks_needed(num_tokens, src.block_size)
        blocks = src.gather_blocks(padded_ids(block_ids, num_tokens, src.block_size))
        return KVPayload(num_tokens, src.block_size, [(np.asarray(k)[:n], np.asarray(v)[:n]) for k, v in blocks])

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: KVPayload) -> int:
        return import_host(dst, block_ids, handle)

    def warmup(self, src: Any, dst: Any) -> None:
        """Nothing beyond the executors' own warm-up (gather / scatter per bucket)."""


class LocalTransport:
    """Both instances in this process. ``one_pass=None``: the one-pass import where it applies (CPU
    meshes), staged elsewhere; ``False``: always staged (what an accelerator does)."""

    def __init__(self, one_pass: bool | None = None) -> None:
        self.one_pass = one_pass

    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> DeviceKV:
        n = blocks_needed(num_tokens, src.block_size)
        if len(block_ids) < n:
            raise ValueError(f"{num_tokens} tokens need {n} source blocks, got {len(block_ids)}")
        return DeviceKV(num_tokens, src.block_size, n, src.gather_blocks(_pad(block_ids[:n], _bucket(max(1, n)))))

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: DeviceKV | KVPayload) -> int:
        if isinstance(handle, KVPayload):
            return import_host(dst, block_ids, handle)
        n = _check(handle, dst, block_ids)
        if handle.block_size != dst.block_size:
            layers = repage(handle.layers, handle.num_tokens, dst.block_size, n)
            return import_host(dst, block_ids, KVPayload(handle.num_tokens, dst.block_size, layers))
        if self.one_pass is not False and one_pass_ok(handle, dst):
            one_pass_import(handle, dst, block_ids[:n])
        elif self.one_pass:
            raise ValueError("the one-pass import needs CPU meshes with the same block size and dtype "
                             "and one tp a multiple of the other")
        else:
            b = handle.layers[0][0].shape[0]
            dst.scatter_blocks(_pad(block_ids[:n], b), handle.layers)
        return handle.nbytes

    def warmup(self, src: Any, dst: Any, max_tokens: int | None = None) -> None:
        """Compile the import programs from ``src`` into ``dst`` for every block bucket (copies nothing
        real: null blocks onto the null block, or zero blocks in the one-pass loop)."""
        limit = max_tokens if max_tokens is not None else src.num_blocks * src.block_size
        for b in block_buckets(src, min(limit, src.num_blocks * src.block_size)):
            warm_import(self, dst, self.export_kv(src, [NULL_BLOCK] * b, b * src.block_size))


def warm_import(transport: LocalTransport, dst: Any, handle: DeviceKV) -> None:
    """Compile ``dst``'s import of an export shaped like ``handle`` (copies nothing real: the null
    block onto itself, or zero blocks in the one-pass loop)."""
    h = dataclasses.replace(handle, num_tokens=0, num_blocks=0)
    if h.block_size == dst.block_size and transport.one_pass is not False and one_pass_ok(h, dst):
        one_pass_import(h, dst, [])
    elif h.block_size == dst.block_size:
        dst.scatter_blocks([NULL_BLOCK] * h.layers[0][0].shape[0], h.layers)
    jax.block_until_ready(dst.kv)


# ---- one-pass import on CPU meshes (shared host memory) --------------------------------------
# On the CPU backend every "device" is host memory. An export (a compact copy of the request's
# blocks) can be handed to the destination devices without a copy (``np.asarray`` of a CPU shard
# is a read-only view; ``device_put(view, may_alias=True)`` wraps it), so one jitted loop on the
# destination mesh reads the blocks straight from the export and writes them into the donated
# destination pages in place. Heads are re-split inside the loop (a destination shard concatenates
# several source shards or slices one), layers are paired stage by stage.
#
# Why nothing can race here: views are taken of the export only, never of a page pool. An export
# is a fresh array that no executor ever donates, so a view of it cannot block a donation (XLA
# refuses to donate a buffer with a live external reference and copies it instead: that was the
# old in-place read of the source pool, whose guard raced with the release of those views). The
# source pool is read only by the jitted gather on the source's own thread, an ordinary XLA use
# that later donations are ordered after; the destination pool is written only on the
# destination's thread.

_PAGES = PartitionSpec(None, None, "tp", None)


def _head_views(pages: jax.Array) -> list[np.ndarray]:
    """Zero-copy host views of a CPU page array's shards, in head order."""
    out: dict[int, np.ndarray] = {}
    for s in pages.addressable_shards:
        out.setdefault(s.index[2].start or 0, np.asarray(s.data))
    return [out[k] for k in sorted(out)]


def _tp_of(pages: jax.Array) -> int:
    return len({s.index[2].start or 0 for s in pages.addressable_shards})


def one_pass_ok(handle: DeviceKV, dst: Any) -> bool:
    """Whether the one-pass import applies: CPU devices, same block size and dtype, one side's tp a
    multiple of the other's."""
    if handle.block_size != dst.block_size or not handle.layers or not dst.kv:
        return False
    if any(d.platform != "cpu" for d in dst.devices) or any(
            d.platform != "cpu" for d in handle.layers[0][0].devices()):
        return False
    if handle.layers[0][0].dtype != dst.kv[0][0].dtype:
        return False
    a, b = _tp_of(handle.layers[0][0]), _tp_of(dst.kv[0][0])
    return a % b == 0 or b % a == 0


def _aliases(layers: list[tuple[jax.Array, jax.Array]], mesh: Mesh) -> list[tuple[tuple[jax.Array, ...], ...]]:
    """Source pages (per layer k, v) as arrays on ``mesh``, without a copy: per destination tp shard,
    the source shard(s) holding its heads (several shards -> several arrays, written side by side)."""
    devs = list(mesh.devices.flat)
    tp_d = len(devs)
    views, targets, shapes = [], [], []
    for pair in layers:
        for pages in pair:
            v = _head_views(pages)
            tp_s = len(v)
            r = max(1, tp_s // tp_d)
            for i in range(r):
                views += [v[j * r + i] if tp_s >= tp_d else v[j * tp_s // tp_d] for j in range(tp_d)]
                targets += devs
            shapes.append((r, v[0].shape))
    placed = iter(jax.device_put(views, targets, may_alias=True))  # one call for the whole stage
    sharding = NamedSharding(mesh, _PAGES)

    def one(shape: tuple[int, ...]) -> jax.Array:
        n, bs, hs, dh = shape
        return jax.make_array_from_single_device_arrays((n, bs, hs * tp_d, dh), sharding,
                                                        [next(placed) for _ in range(tp_d)])

    out: list[Any] = []
    it = iter(shapes)
    for _ in layers:
        pair = []
        for _ in range(2):
            r, shape = next(it)
            pair.append(tuple(one(shape) for _ in range(r)))
        out.append(tuple(pair))
    return out


@functools.partial(jax.jit, static_argnames=("mesh", "split"), donate_argnums=(0,))
def _fused_copy(dst_kv: Any, pieces: Any, src_idx: jax.Array, dst_idx: jax.Array, n: jax.Array, *,
                mesh: Mesh, split: int) -> tuple[Any, jax.Array]:
    def local(kv, pieces, si, di, n):
        # pages as [N, bs, heads * Dh]: each block's heads are one run of memory per slot
        shape = kv[0][0].shape
        flat = lambda a: a.reshape(*a.shape[:2], -1)  # noqa: E731
        hd = shape[2] * shape[3]
        off = (jax.lax.axis_index("tp") % split) * hd

        def put(page, ps, b, d):
            if split > 1:  # one source shard holds more heads than this destination shard
                blk = jax.lax.dynamic_slice(ps[0], (b, 0, off), (1, shape[1], hd))
                return jax.lax.dynamic_update_slice(page, blk, (d, 0, 0))
            h = 0
            for p in ps:  # each source shard straight into its heads of this shard: no temporary
                page = jax.lax.dynamic_update_slice(page, jax.lax.dynamic_slice_in_dim(p, b, 1, 0), (d, 0, h))
                h += p.shape[2]
            return page

        def body(i, kv):
            return [(put(k, pk, si[i], di[i]), put(v, pv, si[i], di[i]))
                    for (k, v), (pk, pv) in zip(kv, pieces, strict=True)]

        kv = [(flat(k), flat(v)) for k, v in kv]
        pieces = [(tuple(map(flat, pk)), tuple(map(flat, pv))) for pk, pv in pieces]
        out = jax.lax.fori_loop(0, n, body, kv)
        return [(k.reshape(shape), v.reshape(shape)) for k, v in out], n + 0  # n: a "done" to wait on

    rep = PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(_PAGES, _PAGES, rep, rep, rep),
                         out_specs=(_PAGES, rep), check_vma=False)(dst_kv, pieces, src_idx, dst_idx, n)


def one_pass_import(handle: DeviceKV, dst: Any, dst_blocks: Sequence[int]) -> None:
    """Write the export's first ``len(dst_blocks)`` blocks into ``dst_blocks`` of ``dst`` in one pass.

    Index arrays are padded to the destination pool size, so each (export bucket and layout,
    destination stage) compiles once; the loop runs only over the real blocks."""
    n = len(dst_blocks)
    size = max(dst.num_blocks, n)
    si = np.zeros(size, np.int32)
    di = np.zeros(size, np.int32)
    si[:n], di[:n] = np.arange(n), dst_blocks
    for s, (mesh, layers) in enumerate(dst.kv_stages()):
        rep = NamedSharding(mesh, PartitionSpec())
        tp_d, tp_s = mesh.shape["tp"], _tp_of(handle.layers[layers.start][0])
        pieces = _aliases([handle.layers[layer] for layer in layers], mesh)
        kv = [dst.kv[layer] for layer in layers]
        new, _ = _fused_copy(kv, pieces, *jax.device_put((si, di, np.int32(n)), rep), mesh=mesh,
                             split=max(1, tp_d // tp_s))
        dst.set_stage_kv(s, new)
