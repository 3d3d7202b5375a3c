"""Which attention implementation a step runs: the native kernel or XLA path (CPU), the Pallas kernels (GPU).

    make_attention(backend, mesh) -> attn_fn(q, k, v, k_pages, v_pages, positions, meta, scale)

``native`` (what ``auto`` picks on CPU when ``jaxserve.native`` can build it) runs decodes and
packed prompts and prompt chunks after a cached prefix through the C++ custom calls of
``jaxserve.native`` (float32; other dtypes take the XLA path); ``auto`` falls back to ``xla`` when the kernel
cannot be built (no compiler: one warning).

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

from jaxserve.model.attention import (
    AttnGroup,
    AttnMeta,
    attention_xla,
    packed_attention_xla,
    paged_decode_attention_xla,
    paged_group_attention_xla,
)

BACKENDS = ("auto", "xla", "native", "pallas", "pallas-interpret")


def _pallas_prefill(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, seg: jax.Array,
                    scale: float, interpret: bool) -> jax.Array:
    from pallas_kernels import prefill_attention

    t = q.shape[0]  # segments are contiguous runs 0, 1, ... then -1 padding
    counts = jnp.bincount(jnp.where(seg >= 0, seg, t), length=t + 1)[:t]
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    return prefill_attention(q, k, v, cu, sm_scale=scale, interpret=interpret)


def _pallas_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, g: AttnGroup, scale: float,
                   interpret: bool) -> jax.Array:
    from pallas_kernels import paged_decode_attention

    return paged_decode_attention(q, k_pages, v_pages, g.block_tables, g.context_lens, sm_scale=scale,
                                  interpret=interpret)


def _native_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, g: AttnGroup, scale: float) -> jax.Array:
    from jaxserve import native

    if k_pages.dtype != jnp.float32 or not native.available():  # float32 pages only; a failed build: XLA
        group = g._replace(query_index=jnp.arange(q.shape[0], dtype=jnp.int32)[:, None])
        return paged_decode_attention_xla(q, k_pages, v_pages, group, scale)[:, 0]
    return native.paged_decode(q, k_pages, v_pages, g.block_tables, g.context_lens, scale)


def _native_prefill(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, seg: jax.Array,
                    scale: float) -> jax.Array:
    from jaxserve import native

    if q.dtype != jnp.float32 or not native.available():
        return packed_attention_xla(q, k, v, positions, seg, scale)
    return native.packed_prefill(q, k, v, seg, scale)


def _native_group(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array, g: AttnGroup,
                  scale: float) -> jax.Array:
    from jaxserve import native

    if k_pages.dtype != jnp.float32 or not native.available():
        return paged_group_attention_xla(q, k_pages, v_pages, positions, g, scale)
    return native.paged_prefill(q, k_pages, v_pages, g.query_index, positions, g.block_tables, g.context_lens,
                                scale)


def _kernel_local(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  positions: jax.Array, meta: AttnMeta, scale: float, prefill: Any, decode: Any,
                  group: Any = paged_group_attention_xla) -> jax.Array:
    """Packed prompts through ``prefill``, one-query groups through ``decode``, other groups through
    ``group`` (XLA unless the native kernels serve)."""
    t = q.shape[0]
    if meta.segment_ids is not None:
        return prefill(q, k, v, positions, meta.segment_ids, scale)
    out = jnp.zeros(q.shape, jnp.float32)
    for g in meta.groups:
        if g.query_index.shape[1] == 1:
            rows = jnp.minimum(g.query_index[:, 0], t - 1)
            o = decode(q[rows], k_pages, v_pages, g, scale)[:, None]  # [B, 1, H, Dh]
        else:
            o = group(q, k_pages, v_pages, positions, g, scale)
        out = out.at[g.query_index.reshape(-1)].set(o.reshape(-1, *o.shape[2:]).astype(jnp.float32), mode="drop")
    return out.astype(q.dtype)


def make_attention(backend: str = "auto", mesh: Mesh | None = None) -> Any:
    """An attention function for the model; ``auto`` = Pallas on GPU, the native kernel (else XLA) on CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "native" and on_gpu:
        raise ValueError("attention backend 'native' is the CPU kernel; on GPU use auto or pallas")
    if backend in ("auto", "native") and not on_gpu:
        from jaxserve import native

        # a build in progress is waited for at the first trace, not here; if it then fails, the
        # kernels' callers trace the XLA path instead (after the build's one warning)
        if native.expected():
            backend = "native"
        elif backend == "native":
            raise ValueError(f"the native attention kernel is unavailable: {native.unavailable_reason()}")
    if backend == "auto":
        backend = "pallas" if on_gpu else "xla"
    if backend == "xla":
        return attention_xla
    if backend == "native":
        local = functools.partial(_kernel_local, prefill=_native_prefill, decode=_native_decode,
                                  group=_native_group)
    else:
        interpret = backend == "pallas-interpret"
        local = functools.partial(_kernel_local, prefill=functools.partial(_pallas_prefill, interpret=interpret),
                                  decode=functools.partial(_pallas_decode, interpret=interpret))
    local.reads_real_context = backend == "native"
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

    sharded.reads_real_context = local.reads_real_context  # type: ignore[attr-defined]
    return sharded


def reads_real_context(executor: Any) -> bool:
    """Whether every attention call of ``executor`` reads only each sequence's real context (the native
    CPU kernels), so prompt-chunk calls need no block-table width buckets."""
    fns = getattr(executor, "stage_attn", None) or [getattr(executor, "attn_fn", None)]
    return all(getattr(f, "reads_real_context", False) for f in fns)
