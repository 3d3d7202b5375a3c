"""Moving one request's KV from a prefill instance to a decode instance: one interface, several transports.

    src executor, src block ids --gather_blocks (on the prefill mesh)--> per-layer (k, v) [n, bs, H, Dh]
        --transport--> dst executor, dst block ids --scatter_blocks (device_put to the decode
                       side's sharding, written into its donated cache)-->

* ``LocalTransport``: both instances in this process. ``jax.device_put`` to the destination
  sharding re-splits heads (different ``tp``) and layers (different ``pp``: each layer goes to
  the stage that owns it); block ids differ freely. The number of blocks is padded to a
  power-of-two bucket (padding reads/writes the null block 0) so transfers compile once per
  bucket. Different block sizes are re-paged through the host.
* ``HostTransport``: the KV crosses as numpy arrays (what a Ray object-store hop carries); the
  same code path the Ray actors use (``jaxserve.cluster``).
* NCCL between GPUs is not implemented yet; the interface is the place for it.

Everything is issued through JAX's asynchronous dispatch: the host loop does not wait for
the copy; the decode instance's next step orders itself after the write on its devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from jaxserve.engine.block_manager import NULL_BLOCK, blocks_needed
from jaxserve.model.inputs import pow2_buckets

LayerBlocks = list[tuple[Any, Any]]  # per layer (k, v) [n, bs, H, Dh]


class KVTransport(Protocol):
    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None: ...


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
    """Same-process transfer with ``jax.device_put`` between meshes."""

    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None:
        n_src = blocks_needed(num_tokens, src.block_size)
        n_dst = blocks_needed(num_tokens, dst.block_size)
        if len(src_blocks) < n_src or len(dst_blocks) < n_dst:
            raise ValueError(f"{num_tokens} tokens need {n_src} source / {n_dst} destination blocks, "
                             f"got {len(src_blocks)} / {len(dst_blocks)}")
        if src.block_size == dst.block_size:
            b = _bucket(n_src)
            blocks = src.gather_blocks(_pad(src_blocks[:n_src], b))
            dst.scatter_blocks(_pad(dst_blocks[:n_dst], b), blocks)
            return
        blocks = src.gather_blocks(list(src_blocks[:n_src]))
        dst.scatter_blocks(list(dst_blocks[:n_dst]), repage(blocks, num_tokens, dst.block_size, n_dst))


class HostTransport(LocalTransport):
    """Transfer through host numpy arrays (the Ray object-store path, exercised in one process)."""

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
