"""Attention over a paged KV cache: the one seam between the model and the KV layout.

Tokens of a step are *packed*: ``[T]`` tokens from several sequences, each with
its absolute position. Every layer first writes its new K/V into the pages
(``slot_mapping``), then attends in one of two modes, fixed by ``AttnMeta``:

* **packed** (``segment_ids`` given): prompts that start at position 0. Keys are
  this step's own K/V; a token sees tokens of its own segment at positions <= its own
  (block-diagonal causal mask over ``[T, T]``). Shape depends on ``T`` only.
* **paged groups** (``segment_ids`` is None): each ``AttnGroup`` is a ``[Bg, Qg]`` grid of
  query tokens (``query_index``; padding = ``T``, dropped) reading keys through
  ``block_tables [Bg, MBg]`` from the pages, masked by position and ``context_lens``.
  Decodes are a ``[B, 1]`` group; prefill chunks with a cached prefix a ``[Bc, Qc]`` group.

    q, k, v [T, H, Dh] --write_kv--> pages [N, bs, H, Dh] --attend--> [T, H, Dh]

Only int32 index arrays enter here; block bookkeeping stays on the host. This is
the XLA path CPU serving runs; on GPU the engine may swap in the Pallas kernels
(``pallas_kernels``) through the same metadata. Block 0 is a reserved null block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked padding rows give a uniform softmax, never NaN


class AttnGroup(NamedTuple):
    query_index: jax.Array  # [Bg, Qg] token index of each query; padding -> T (dropped on scatter)
    block_tables: jax.Array  # [Bg, MBg] physical block ids (0 = null block)
    context_lens: jax.Array  # [Bg] valid keys per sequence after this step's write


class AttnMeta(NamedTuple):
    """Int32 index arrays describing one packed step (a pytree; its structure is static under jit)."""

    slot_mapping: jax.Array  # [T] flat cache slot (block*bs + offset) for each token's K/V
    groups: tuple[AttnGroup, ...] = ()
    segment_ids: jax.Array | None = None  # [T] packed mode: sequence id per token, -1 = padding


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values [T, H, Dh] into pages [N, bs, H, Dh] at flat slots [T]."""
    n, bs, h, d = k_pages.shape
    k_flat = k_pages.reshape(n * bs, h, d).at[slot_mapping].set(k.astype(k_pages.dtype))
    v_flat = v_pages.reshape(n * bs, h, d).at[slot_mapping].set(v.astype(v_pages.dtype))
    return k_flat.reshape(n, bs, h, d), v_flat.reshape(n, bs, h, d)


def packed_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                         segment_ids: jax.Array, scale: float) -> jax.Array:
    """Block-diagonal causal attention of packed prompts over their own keys: [T, H, Dh]."""
    s = jnp.einsum("thd,shd->hts", q, k, preferred_element_type=jnp.float32) * scale  # [H, T, T]
    same = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] >= 0)
    mask = same & (positions[None, :] <= positions[:, None])  # [T, T]
    p = jax.nn.softmax(jnp.where(mask[None], s, NEG_INF), axis=-1)
    return jnp.einsum("hts,shd->thd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


DECODE_BLOCKS_PER_ITER = 2  # measured best of 1/2/4 on the CPU (scripts/bench_offline.py notes)


def paged_decode_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, group: AttnGroup,
                               scale: float) -> jax.Array:
    """One query per sequence over its pages, a block pair at a time with an online softmax: [Bg, 1, H, Dh].

    The loop runs to the longest *real* context in the batch (not the block bucket), and each
    iteration gathers only ``[Bg, 2*bs, H, Dh]``, so K/V are read once and never materialised
    whole. (Gathering every page up front cost 4x more at batch 64, and ~500x at batch 1, where
    XLA's CPU gather of a single row copies far more than the row.)
    """
    b, mb = group.block_tables.shape
    _, bs, h, d = k_pages.shape
    per = DECODE_BLOCKS_PER_ITER
    qi = jnp.minimum(group.query_index[:, 0], q.shape[0] - 1)
    qb = q[qi].astype(jnp.float32)  # [B, H, Dh]
    ctx = group.context_lens
    tables = jnp.pad(group.block_tables, ((0, 0), (0, (-mb) % per)))
    n_iter = (jnp.max(ctx) + per * bs - 1) // (per * bs)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, denom, acc = carry
        blk = jax.lax.dynamic_slice_in_dim(tables, i * per, per, axis=1)  # [B, per]
        k = k_pages[blk].reshape(b, per * bs, h, d)
        v = v_pages[blk].reshape(b, per * bs, h, d)
        s = jnp.einsum("bhd,bthd->bht", qb, k, preferred_element_type=jnp.float32) * scale
        kpos = i * per * bs + jnp.arange(per * bs, dtype=jnp.int32)
        s = jnp.where(kpos[None, None, :] < ctx[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        denom_new = denom * alpha + p.sum(-1)
        acc_new = acc * alpha[..., None] + jnp.einsum("bht,bthd->bhd", p, v.astype(jnp.float32))
        return m_new, denom_new, acc_new

    init = (jnp.full((b, h), NEG_INF, jnp.float32), jnp.zeros((b, h), jnp.float32),
            jnp.zeros((b, h, d), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, n_iter, body, init)
    return (acc / jnp.maximum(denom, 1e-30)[..., None])[:, None]


def paged_group_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                              group: AttnGroup, scale: float) -> jax.Array:
    """One group's queries over the paged cache: returns [Bg, Qg, H, Dh]."""
    if group.query_index.shape[1] == 1:
        return paged_decode_attention_xla(q, k_pages, v_pages, group, scale)
    b, mb = group.block_tables.shape
    _, bs, h, d = k_pages.shape
    qi = jnp.minimum(group.query_index, q.shape[0] - 1)  # padding reads a real row; dropped later
    qb = q[qi]  # [B, Q, H, Dh]
    qpos = positions[qi]  # [B, Q]
    k = k_pages[group.block_tables].reshape(b, mb * bs, h, d)  # [B, S, H, Dh]
    v = v_pages[group.block_tables].reshape(b, mb * bs, h, d)  # [B, S, H, Dh]
    s = jnp.einsum("bqhd,bshd->bhqs", qb, k, preferred_element_type=jnp.float32) * scale  # [B, H, Q, S]
    kpos = jnp.arange(mb * bs, dtype=jnp.int32)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < group.context_lens[:, None, None])
    p = jax.nn.softmax(jnp.where(mask[:, None], s, NEG_INF), axis=-1)
    return jnp.einsum("bhqs,bshd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  positions: jax.Array, meta: AttnMeta, scale: float) -> jax.Array:
    """Attention for a packed step (pages already hold this step's K/V): [T, H, Dh]."""
    if meta.segment_ids is not None:
        return packed_attention_xla(q, k, v, positions, meta.segment_ids, scale)
    out = jnp.zeros(q.shape, jnp.float32)
    for g in meta.groups:
        o = paged_group_attention_xla(q, k_pages, v_pages, positions, g, scale)
        out = out.at[g.query_index.reshape(-1)].set(o.reshape(-1, *o.shape[2:]), mode="drop")
    return out.astype(q.dtype)
