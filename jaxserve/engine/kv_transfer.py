"""Moving one request's KV from a prefill instance to a decode instance: one interface, several transports.

    staged (any devices):
    src executor, src block ids --gather_blocks (on the prefill mesh)--> per-layer (k, v) [n, bs, H, Dh]
        --device_put to the decode side's sharding--> scatter_blocks into dst block ids (donated cache)
    one pass (CPU meshes: all "devices" are host memory):
    src pages --zero-copy views, aliased onto the decode devices--> one jitted loop on the decode
        mesh reads the request's blocks and writes them into the donated dst pages in place

* ``LocalTransport``: both instances in this process. The one-pass path where it applies
  (``fused_host_ok``: CPU devices, equal block size and dtype, one tp a multiple of the other),
  else the staged path: ``jax.device_put`` to the destination sharding re-splits heads
  (different ``tp``) and layers (different ``pp``: each layer goes to the stage that owns it);
  block ids differ freely; the block count is padded to a power-of-two bucket (padding
  reads/writes the null block 0) so transfers compile once per bucket. Different block sizes are
  re-paged through the host. On accelerators the staged path is the right one: gather and
  scatter run at HBM speed and the middle hop is the link.
* ``HostTransport``: the KV crosses as numpy arrays (what a Ray object-store hop carries); the
  same code path the Ray actors use (``jaxserve.cluster``).
* NCCL between GPUs is not implemented; the interface is the place for it.

Everything is issued through JAX's asynchronous dispatch: the decode instance's next step orders
itself after the write on its devices, and the prefill instance's next donation of its pages
waits for one-pass reads still in flight (``executor.ReadGuard``). Whether the host loop waits
for the copy itself is the runtime's choice: the CPU client runs a program for a single-device
mesh inline on the calling thread (measured: a one-pass copy into a tp1 decode returns when it is
done), and multi-device programs asynchronously. ``warmup(src, dst)`` compiles a pair's one-pass
programs (one per destination stage: the index arrays are padded to the destination pool size).
"""

from __future__ import annotations

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
    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None: ...

    # optional: ``warmup(src, dst)`` compiles what ``copy`` between two executors needs beyond their
    # own warm-up (``DisaggEngine.warmup`` calls it for every prefill/decode pair when present)


def _pad(ids: Sequence[int], n: int) -> list[int]:
    return list(ids) + [NULL_BLOCK] * (n - len(ids))


def _bucket(n: int) -> int:
    return pow2_buckets(1, n)[-1]


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


class LocalTransport:
    """Same-process transfer between meshes.

    ``one_pass=None`` (default) takes the one-pass shared-memory path where it applies (CPU
    meshes, see ``fused_host_copy``) and the staged path (gather, ``jax.device_put``, scatter)
    elsewhere; ``False`` always stages (what an accelerator does: the middle hop is the link).
    """

    def __init__(self, one_pass: bool | None = None) -> None:
        self.one_pass = one_pass

    def warmup(self, src: Any, dst: Any) -> None:
        if self.one_pass is not False and fused_host_ok(src, dst):
            fused_host_copy(src, [], dst, [])  # zero blocks: compiles the pair's program, copies nothing
            src.wait_reads()

    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None:
        n_src = blocks_needed(num_tokens, src.block_size)
        n_dst = blocks_needed(num_tokens, dst.block_size)
        if len(src_blocks) < n_src or len(dst_blocks) < n_dst:
            raise ValueError(f"{num_tokens} tokens need {n_src} source / {n_dst} destination blocks, "
                             f"got {len(src_blocks)} / {len(dst_blocks)}")
        if self.one_pass is not False and fused_host_ok(src, dst):
            fused_host_copy(src, src_blocks[:n_src], dst, dst_blocks[:n_dst])
            return
        if self.one_pass:
            raise ValueError("the one-pass transfer needs CPU meshes with the same block size and dtype "
                             "and one tp a multiple of the other")
        if src.block_size == dst.block_size:
            b = _bucket(n_src)
            blocks = src.gather_blocks(_pad(src_blocks[:n_src], b))
            dst.scatter_blocks(_pad(dst_blocks[:n_dst], b), blocks)
            return
        blocks = src.gather_blocks(list(src_blocks[:n_src]))
        dst.scatter_blocks(list(dst_blocks[:n_dst]), repage(blocks, num_tokens, dst.block_size, n_dst))


class HostTransport:
    """Transfer through host numpy arrays (the Ray object-store path, exercised in one process).

    No ``warmup``: ``export_kv`` / ``import_kv`` use the executors' own (warmed) gather / scatter."""

    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None:
        n_src = blocks_needed(num_tokens, src.block_size)
        n_dst = blocks_needed(num_tokens, dst.block_size)
        host = export_kv(src, src_blocks[:n_src])
        import_kv(dst, dst_blocks[:n_dst], repage(host, num_tokens, dst.block_size, n_dst))


def export_kv(executor: Any, block_ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blocks of one request as host numpy arrays, per layer (k, v) [n, bs, H, Dh]."""
    b = _bucket(len(block_ids))
    blocks = executor.gather_blocks(_pad(block_ids, b))
    return [(np.asarray(k)[: len(block_ids)], np.asarray(v)[: len(block_ids)]) for k, v in blocks]


def import_kv(executor: Any, block_ids: Sequence[int], blocks: Sequence[tuple[np.ndarray, ...]]) -> None:
    """Write host per-layer (k, v) [n, bs, H, Dh] into ``block_ids`` (padded to a bucket)."""
    n = len(block_ids)
    b = _bucket(n)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((b - n, *a.shape[1:]), a.dtype)]) if b > n else a

    executor.scatter_blocks(_pad(block_ids, b), [(pad(k), pad(v)) for k, v in blocks])


# ---- one-pass transfer between CPU meshes (shared host memory) ----------------------------
# On the CPU backend every "device" is host memory. A source page pool can be handed to the
# destination devices without a copy (``np.asarray`` of a CPU shard is a read-only view;
# ``device_put(view, may_alias=True)`` wraps it), so one jitted loop on the destination mesh
# reads the request's blocks straight from the source pages and writes them into the donated
# destination pages in place: one pass over the bytes instead of gather + device_put + scatter.
# Heads are re-split inside the loop (a destination shard concatenates several source shards
# or slices one), layers are paired stage by stage. While such a read is in flight the source
# executor must not donate its pages (``ReadGuard``); if it ever did, XLA refuses to donate a
# buffer with a live view and copies instead, so the data stay right either way.

_PAGES = PartitionSpec(None, None, "tp", None)


def _head_views(pages: jax.Array) -> list[np.ndarray]:
    """Zero-copy host views of a CPU page array's shards, in head order."""
    out: dict[int, np.ndarray] = {}
    for s in pages.addressable_shards:
        out.setdefault(s.index[2].start or 0, np.asarray(s.data))
    return [out[k] for k in sorted(out)]


def _tp_of(pages: jax.Array) -> int:
    return len({s.index[2].start or 0 for s in pages.addressable_shards})


def fused_host_ok(src: Any, dst: Any) -> bool:
    """Whether the one-pass shared-memory path applies: CPU devices, same block size and dtype,
    and one side's tp a multiple of the other's."""
    if src.block_size != dst.block_size or not src.kv or not dst.kv:
        return False
    if any(d.platform != "cpu" for d in (*src.devices, *dst.devices)):
        return False
    if src.kv[0][0].dtype != dst.kv[0][0].dtype:
        return False
    a, b = _tp_of(src.kv[0][0]), _tp_of(dst.kv[0][0])
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


def fused_host_copy(src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int]) -> None:
    """Copy ``src_blocks`` of ``src`` into ``dst_blocks`` of ``dst`` in one pass (see above).

    Index arrays are padded to the destination pool size, so each (source layout, destination
    stage) pair compiles once; the loop runs only over the real blocks.
    """
    n = len(src_blocks)
    if len(dst_blocks) != n:
        raise ValueError(f"{n} source blocks but {len(dst_blocks)} destination blocks")
    size = max(dst.num_blocks, n)
    si = np.zeros(size, np.int32)
    di = np.zeros(size, np.int32)
    si[:n], di[:n] = src_blocks, dst_blocks
    outs = []
    dst.wait_reads()  # the destination's pages are donated below: the rule every donating call follows
    src_kv, dst_kv = src.kv, dst.kv  # layer order (each stage below replaces only its own layers)
    for s, (mesh, layers) in enumerate(dst.kv_stages()):
        rep = NamedSharding(mesh, PartitionSpec())
        tp_d, tp_s = mesh.shape["tp"], _tp_of(src_kv[layers.start][0])
        pieces = _aliases([src_kv[layer] for layer in layers], mesh)
        kv = [dst_kv[layer] for layer in layers]
        new, done = _fused_copy(kv, pieces, *jax.device_put((si, di, np.int32(n)), rep), mesh=mesh,
                                split=max(1, tp_d // tp_s))
        dst.set_stage_kv(s, new)
        outs.append(done)  # not donated later (the pages are, by the decode step)
    src.guard_reads(outs)
