"""Prefill attention: causal attention over packed variable-length sequences.

What flows through it (one layer, one prefill step):

    q, k, v      [T, H, D]   the tokens of several prompts back to back (q not pre-scaled);
                             rows past cu_seqlens[-1] are padding
    cu_seqlens   int32 [B+1] sequence b owns rows cu_seqlens[b] : cu_seqlens[b+1]
    ->  out      [T, H, D]   causal attention within each sequence, none across sequences;
                             padding rows are zeros; in q.dtype

The kernel (generic Pallas style, lowers to Triton on GPU) runs a grid over (query tile, head).
The wrapper turns cu_seqlens into a segment id per row and, per query tile, the range of key
rows it can see: from the start of the tile's first sequence to the tile's last valid row.
The kernel walks that range a key tile at a time with an online softmax in float32, masking
by segment and causality, so it never builds a T x T matrix.

`prefill_attention_reference` is the dense jnp version (segment + causal mask) that the
serving path uses on CPU and that the tests compare the kernel against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import MASK_VALUE, SUPPORTED_DTYPES, is_power_of_2, resolve_interpret

_MIN_GPU_TILE = 16  # Triton dots need every dimension >= 16
# HIGHEST keeps float32 dots in IEEE float32 on GPU (Triton would otherwise use TF32).
_PRECISION = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- kernel


def _prefill_kernel(
    kv_lo_ref,  # int32 [num_q_tiles]: first key row any query of tile i may see
    kv_hi_ref,  # int32 [num_q_tiles]: one past the last valid query row of tile i
    seg_ref,  # int32 [Tp]: segment id per row, -1 for padding
    q_ref,  # [block_q, D]: this (query tile, head)'s queries
    k_ref,  # [Tp, D]: this head's keys
    v_ref,  # [Tp, D]: this head's values
    o_ref,  # [block_q, D]: output for this (query tile, head)
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
):
    i = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    lo, hi = kv_lo_ref[i], kv_hi_ref[i]

    q = q_ref[...]  # [bq, D]
    q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)  # [bq]
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]  # [bq]

    def body(j, carry):
        acc, m_prev, l_prev = carry  # [bq, D], [bq], [bq]
        k_rows = pl.ds(j * block_k, block_k)
        k = k_ref[k_rows, :]  # [bk, D]
        v = v_ref[k_rows, :]  # [bk, D]
        k_seg = seg_ref[k_rows]  # [bk]
        k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk]

        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=_PRECISION, preferred_element_type=jnp.float32
        )
        s = s * sm_scale  # [bq, bk]
        mask = (
            (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0) & (q_pos[:, None] >= k_pos[None, :])
        )  # [bq, bk]
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [bq]
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)  # [bq, bk]
        alpha = jnp.exp(m_prev - m_next)  # [bq]
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        v = jnp.where((k_seg >= 0)[:, None], v, jnp.zeros_like(v))  # padding rows may hold garbage
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=_PRECISION,
            preferred_element_type=jnp.float32,
        )  # [bq, D]
        return alpha[:, None] * acc + pv, m_next, l_next

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l_final = lax.fori_loop(lax.div(lo, block_k), lax.div(hi + block_k - 1, block_k), body, init)
    # Rows that saw no key (padding) have acc == 0 and l == 0 -> zeros.
    o_ref[...] = (acc / jnp.where(l_final > 0.0, l_final, 1.0)[:, None]).astype(o_ref.dtype)


# ---------------------------------------------------------------------------- wrapper


def _tile_metadata(
    cu_seqlens: jax.Array, padded_len: int, block_q: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Segment id per row (-1 = padding) and the visible key range [lo, hi) per query tile."""
    rows = jnp.arange(padded_len, dtype=jnp.int32)
    total = cu_seqlens[-1]
    seg = jnp.searchsorted(cu_seqlens[1:], rows, side="right").astype(jnp.int32)  # [Tp]
    seg = jnp.where(rows < total, seg, -1)
    seq_start = cu_seqlens[jnp.clip(seg, 0, None)]  # [Tp]
    q0 = jnp.arange(0, padded_len, block_q, dtype=jnp.int32)  # [num_q_tiles]
    live = q0 < total
    kv_lo = jnp.where(live, seq_start[q0], 0).astype(jnp.int32)
    kv_hi = jnp.where(live, jnp.minimum(q0 + block_q, total), 0).astype(jnp.int32)
    return seg, kv_lo, kv_hi


def _prefill_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array,
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    interpret: bool,
    num_warps: int,
) -> jax.Array:
    tokens, heads, head_dim = q.shape
    tile = max(block_q, block_k)
    padded_len = pl.cdiv(tokens, tile) * tile
    if padded_len != tokens:
        pad = ((0, padded_len - tokens), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    num_q_tiles = padded_len // block_q
    seg, kv_lo, kv_hi = _tile_metadata(cu_seqlens, padded_len, block_q)

    kernel = functools.partial(_prefill_kernel, sm_scale=sm_scale, block_q=block_q, block_k=block_k)
    q_spec = pl.BlockSpec((block_q, None, head_dim), lambda i, h: (i, h, 0))
    kv_spec = pl.BlockSpec((padded_len, None, head_dim), lambda i, h: (0, h, 0))
    whole = lambda n: pl.BlockSpec((n,), lambda i, h: (0,))  # noqa: E731
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=2)
    out = pl.pallas_call(
        kernel,
        grid=(num_q_tiles, heads),
        in_specs=[whole(num_q_tiles), whole(num_q_tiles), whole(padded_len), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="prefill_attention",
    )(kv_lo, kv_hi, seg, q, k, v)
    return out[:tokens]


# ------------------------------------------------------------------------------ entry


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens: jax.Array) -> None:
    """Raise ValueError naming the first argument that breaks the contract."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, D], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [T, H, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % 8 != 0:
        raise ValueError(f"head_dim must be a multiple of 8, got {q.shape[2]}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be float32/bfloat16/float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B+1] with B >= 1, got shape {cu_seqlens.shape}")
    if cu_seqlens.dtype != jnp.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_q", "block_k", "num_warps"))
def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array,
    *,
    sm_scale: float,
    interpret: bool | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
) -> jax.Array:
    """Causal attention over packed sequences (see the module docstring for shapes).

    interpret=None runs the compiled kernel on GPU and the Pallas interpreter elsewhere
    (the serving path on CPU should call `prefill_attention_reference` instead).
    block_q/block_k are capped at the (power-of-two-rounded) token count; T is padded to
    a multiple of the larger tile inside the wrapper.
    """
    _check_inputs(q, k, v, cu_seqlens)
    interpret = resolve_interpret(interpret)
    head_dim = q.shape[2]
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if not is_power_of_2(n):
            raise ValueError(f"{name} must be a power of two, got {n}")
    floor = 1 if interpret else _MIN_GPU_TILE
    cap = max(floor, pl.next_power_of_2(max(q.shape[0], 1)))
    block_q, block_k = max(floor, min(block_q, cap)), max(floor, min(block_k, cap))
    if not interpret and not is_power_of_2(head_dim):
        raise ValueError(f"the GPU kernel needs head_dim to be a power of two, got {head_dim}")
    return _prefill_pallas(
        q,
        k,
        v,
        cu_seqlens,
        sm_scale=float(sm_scale),
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
        num_warps=num_warps,
    )


# -------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def prefill_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens: jax.Array, *, sm_scale: float
) -> jax.Array:
    """Dense jnp prefill attention with a segment + causal mask, softmax in float32."""
    _check_inputs(q, k, v, cu_seqlens)
    tokens = q.shape[0]
    rows = jnp.arange(tokens, dtype=jnp.int32)
    seg = jnp.searchsorted(cu_seqlens[1:], rows, side="right")  # [T]
    seg = jnp.where(rows < cu_seqlens[-1], seg, -1)
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0) & (rows[:, None] >= rows[None, :])

    s = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    s = jnp.where(mask[None], s, MASK_VALUE)  # [H, T, T]
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[None], p, 0.0)  # fully masked (padding) rows -> zeros
    vf = jnp.where((seg >= 0)[:, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("hqk,khd->qhd", p, vf)  # [T, H, D]
    return out.astype(q.dtype)
