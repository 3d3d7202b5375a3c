"""Paged decode attention: one query token per sequence, K/V read through block tables.

What flows through it (one layer, one decode step):

    q             [B, H, D]           this step's query token per sequence (not pre-scaled)
    k_pages       [N, block_size, H, D]  the layer's paged K cache; block 0 is the null block
    v_pages       [N, block_size, H, D]  the layer's paged V cache
    block_tables  int32 [B, M]        key position p of sequence b lives in page
                                      block_tables[b, p // block_size], slot p % block_size
    context_lens  int32 [B]           number of valid keys per sequence (0 = padding row)
    ->  out       [B, H, D]           softmax(q k^T * sm_scale) v over the valid keys, in q.dtype

The kernel is written in the generic Pallas style (grid over (sequence, head), block table
read inside the kernel) so that it lowers to Triton on GPU and interprets quickly on CPU.
Each program walks its sequence's pages `pages_per_chunk` at a time with an online softmax
accumulated in float32. Keys past `context_len` are masked (scores and values), so stale or
NaN contents of unused slots and of the null block never reach the output. A sequence with
no keys yields zeros.

`paged_decode_attention_reference` is the dense jnp version (gather pages, mask, softmax in
float32) that the serving path uses on CPU and that the tests compare the kernel against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import MASK_VALUE, SUPPORTED_DTYPES, is_power_of_2, resolve_interpret

# ----------------------------------------------------------------------------- kernel


def _paged_decode_kernel(
    context_lens_ref,  # int32 [B]: all sequences' lengths (read at this program's b)
    block_tables_ref,  # int32 [Mp]: this sequence's block table, padded to pages_per_chunk
    q_ref,  # [D]: this (sequence, head)'s query
    k_pages_ref,  # [N, block_size, D]: this head's slice of the K cache
    v_pages_ref,  # [N, block_size, D]: this head's slice of the V cache
    o_ref,  # [D]: output for this (sequence, head)
    *,
    sm_scale: float,
    pages_per_chunk: int,
):
    b = pl.program_id(0)
    block_size, head_dim = k_pages_ref.shape[1], k_pages_ref.shape[2]
    chunk = pages_per_chunk * block_size  # keys per loop step
    ctx = context_lens_ref[b]

    q = q_ref[...].astype(jnp.float32) * sm_scale  # [D]

    def body(c, carry):
        acc, m_prev, l_prev = carry  # [D], [], []
        ids = block_tables_ref[pl.ds(c * pages_per_chunk, pages_per_chunk)]  # [P]
        k = k_pages_ref[ids].reshape(chunk, head_dim).astype(jnp.float32)  # [P*bs, D]
        v = v_pages_ref[ids].reshape(chunk, head_dim).astype(jnp.float32)  # [P*bs, D]
        valid = c * chunk + jnp.arange(chunk, dtype=jnp.int32) < ctx  # [P*bs]

        s = jnp.sum(k * q[None, :], axis=1)  # [P*bs]
        s = jnp.where(valid, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s))  # []
        p = jnp.where(valid, jnp.exp(s - m_next), 0.0)  # [P*bs]
        alpha = jnp.exp(m_prev - m_next)  # []
        l_next = alpha * l_prev + jnp.sum(p)
        v = jnp.where(valid[:, None], v, 0.0)  # unused slots may hold garbage (even NaN)
        acc = alpha * acc + jnp.sum(p[:, None] * v, axis=0)  # [D]
        return acc, m_next, l_next

    init = (
        jnp.zeros((head_dim,), jnp.float32),
        jnp.float32(MASK_VALUE),
        jnp.float32(0.0),
    )
    num_chunks = lax.div(ctx + chunk - 1, chunk)
    acc, _, l_final = lax.fori_loop(0, num_chunks, body, init)
    # context_len 0: acc == 0 and l == 0 -> zeros, not 0/0.
    o_ref[...] = (acc / jnp.where(l_final > 0.0, l_final, 1.0)).astype(o_ref.dtype)


# ---------------------------------------------------------------------------- wrapper


def _paged_decode_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float,
    pages_per_chunk: int,
    interpret: bool,
    num_warps: int,
) -> jax.Array:
    batch, heads, head_dim = q.shape
    num_blocks, block_size = k_pages.shape[0], k_pages.shape[1]
    max_blocks = block_tables.shape[1]
    padded_blocks = pl.cdiv(max_blocks, pages_per_chunk) * pages_per_chunk
    if padded_blocks != max_blocks:  # pad with the null block; masked by context_lens
        block_tables = jnp.pad(block_tables, ((0, 0), (0, padded_blocks - max_blocks)))

    kernel = functools.partial(_paged_decode_kernel, sm_scale=sm_scale, pages_per_chunk=pages_per_chunk)
    page_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim), lambda b, h: (0, 0, h, 0))
    qo_spec = pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0))
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=2)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, h: (0,)),  # context_lens
            pl.BlockSpec((None, padded_blocks), lambda b, h: (b, 0)),  # block_tables
            qo_spec,  # q
            page_spec,  # k_pages
            page_spec,  # v_pages
        ],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="paged_decode_attention",
    )(context_lens, block_tables, q, k_pages, v_pages)


# ------------------------------------------------------------------------------ entry


def _check_inputs(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
) -> None:
    """Raise ValueError naming the first argument that breaks the contract."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H, D], got shape {q.shape}")
    batch, heads, head_dim = q.shape
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [num_blocks, block_size, H, D], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    if k_pages.shape[2] != heads:
        raise ValueError(f"head count mismatch: q has {heads} heads, k_pages has {k_pages.shape[2]}")
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, k_pages has {k_pages.shape[3]}")
    if head_dim % 8 != 0:
        raise ValueError(f"head_dim must be a multiple of 8, got {head_dim}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be float32/bfloat16/float16, got {q.dtype}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_pages {k_pages.dtype}, v_pages {v_pages.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got shape {block_tables.shape}")
    if block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got shape {context_lens.shape}")
    if context_lens.dtype != jnp.int32:
        raise ValueError(f"context_lens must be int32, got {context_lens.dtype}")


def _default_pages_per_chunk(block_size: int, max_blocks: int) -> int:
    """About 64 keys per loop step, a power of two, never more pages than a table holds."""
    pages = max(1, 64 // block_size)
    return max(1, min(pages, pl.next_power_of_2(max_blocks)))


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "pages_per_chunk", "num_warps"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float,
    interpret: bool | None = None,
    pages_per_chunk: int | None = None,
    num_warps: int = 4,
) -> jax.Array:
    """Decode attention over a paged KV cache (see the module docstring for shapes).

    interpret=None runs the compiled kernel on GPU and the Pallas interpreter elsewhere
    (the serving path on CPU should call `paged_decode_attention_reference` instead).
    pages_per_chunk (pages read per loop step) defaults to about 64 keys' worth.
    """
    _check_inputs(q, k_pages, v_pages, block_tables, context_lens)
    interpret = resolve_interpret(interpret)
    block_size = k_pages.shape[1]
    if pages_per_chunk is None:
        pages_per_chunk = _default_pages_per_chunk(block_size, block_tables.shape[1])
    if pages_per_chunk < 1:
        raise ValueError(f"pages_per_chunk must be >= 1, got {pages_per_chunk}")
    if not interpret:
        for name, n in (
            ("block_size", block_size),
            ("head_dim", q.shape[2]),
            ("pages_per_chunk", pages_per_chunk),
        ):
            if not is_power_of_2(n):
                raise ValueError(f"the GPU kernel needs {name} to be a power of two, got {n}")
    return _paged_decode_pallas(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        sm_scale=float(sm_scale),
        pages_per_chunk=pages_per_chunk,
        interpret=interpret,
        num_warps=num_warps,
    )


# -------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float,
) -> jax.Array:
    """Dense jnp paged decode attention: gather pages, mask by length, softmax in float32."""
    _check_inputs(q, k_pages, v_pages, block_tables, context_lens)
    batch, heads, head_dim = q.shape
    block_size = k_pages.shape[1]
    max_len = block_tables.shape[1] * block_size
    k = k_pages[block_tables].reshape(batch, max_len, heads, head_dim)  # [B, S, H, D]
    v = v_pages[block_tables].reshape(batch, max_len, heads, head_dim)  # [B, S, H, D]
    valid = jnp.arange(max_len)[None, :] < context_lens[:, None]  # [B, S]

    s = jnp.einsum("bhd,bshd->bhs", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    s = jnp.where(valid[:, None, :], s, MASK_VALUE)  # [B, H, S]
    p = jax.nn.softmax(s, axis=-1)
    v = jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bhs,bshd->bhd", p, v)  # [B, H, D]
    out = jnp.where((context_lens > 0)[:, None, None], out, 0.0)
    return out.astype(q.dtype)
