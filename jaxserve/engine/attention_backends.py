"""Which attention implementation a step runs: the XLA path (CPU) or the Pallas kernels (GPU).

    make_attention(backend, mesh) -> attn_fn(q, k, v, k_pages, v_pages, positions, meta, scale)

``pallas`` maps the two step kinds onto the kernels:
  * packed prompts -> ``pallas_kernels.prefill_attention`` (cu_seqlens derived from segment ids);
  * paged groups with one query per sequence (decodes) -> ``pallas_kernels.paged_decode_attention``;
  * paged groups with several queries (prompt chunks after a cached prefix) -> the XLA path.
Under tensor parallelism the kernels run per shard inside ``shard_map`` (heads split over
``tp``), since XLA cannot partition a ``pallas_call`` itself. ``pallas-interpret`` runs the
same kernels in interpret mode (CPU tests only: far too slow to serve).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxserve.model.attention import AttnMeta, attention_xla, paged_group_attention_xla

BACKENDS = ("auto", "xla", "pallas", "pallas-interpret")


def _pallas_local(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  positions: jax.Array, meta: AttnMeta, scale: float, interpret: bool) -> jax.Array:
    from pallas_kernels import paged_decode_attention, prefill_attention

    t = q.shape[0]
    if meta.segment_ids is not None:
        seg = meta.segment_ids  # segments are contiguous runs 0, 1, ... then -1 padding
        counts = jnp.bincount(jnp.where(seg >= 0, seg, t), length=t + 1)[:t]
        cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
        return prefill_attention(q, k, v, cu, sm_scale=scale, interpret=interpret)
    out = jnp.zeros(q.shape, jnp.float32)
    for g in meta.groups:
        if g.query_index.shape[1] == 1:
            rows = jnp.minimum(g.query_index[:, 0], t - 1)
            o = paged_decode_attention(q[rows], k_pages, v_pages, g.block_tables, g.context_lens,
                                       sm_scale=scale, interpret=interpret)[:, None]  # [B, 1, H, Dh]
        else:
            o = paged_group_attention_xla(q, k_pages, v_pages, positions, g, scale)
        out = out.at[g.query_index.reshape(-1)].set(o.reshape(-1, *o.shape[2:]).astype(jnp.float32), mode="drop")
    return out.astype(q.dtype)


def make_attention(backend: str = "auto", mesh: Mesh | None = None) -> Any:
    """An attention function for the model; ``auto`` = Pallas on GPU, XLA elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "xla"
    if backend == "xla":
        return attention_xla
    local = functools.partial(_pallas_local, interpret=backend == "pallas-interpret")
    if mesh is None or mesh.shape.get("tp", 1) == 1:
        return local
    heads = PartitionSpec(None, "tp", None)
    pages = PartitionSpec(None, None, "tp", None)
    rep = PartitionSpec()

    def sharded(q, k, v, k_pages, v_pages, positions, meta, scale):
        f = jax.shard_map(functools.partial(local, scale=scale), mesh=mesh,
                          in_specs=(heads, heads, heads, pages, pages, rep, rep), out_specs=heads,
                          check_vma=False)
        return f(q, k, v, k_pages, v_pages, positions, meta)

    return sharded
