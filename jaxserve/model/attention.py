"""Attention over a paged KV cache: the one seam between the model and the KV layout.

Tokens of a step are *packed*: ``[T]`` tokens from ``B`` sequences (prefill
chunks, decodes, or both), each with its absolute position. Per layer:

    k, v [T, H, Dh] --write_kv(slot_mapping)--> k_pages, v_pages [N, bs, H, Dh]
    q [T, H, Dh] --gather(query_index)--> [B, Q, H, Dh]
        x  pages gathered through block_tables [B, MB] -> [B, S=MB*bs, H, Dh]
        masked by (key_pos <= query_pos) & (key_pos < context_lens)
    --> [B, Q, H, Dh] --scatter back (token_row, token_col)--> [T, H, Dh]

Only int32 index arrays enter here; block bookkeeping stays on the host. The
XLA path below is what CPU serving runs; on GPU the engine may swap in the
Pallas kernels (``pallas_kernels``) through the same ``AttnMeta``.
Block 0 of the cache is a reserved null block: padding tokens write there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked padding rows give a uniform softmax, never NaN


class AttnMeta(NamedTuple):
    """Int32 index arrays describing one packed step (a pytree; enters jit)."""

    slot_mapping: jax.Array  # [T]      flat cache slot (block*bs + offset) to write each token's K/V
    query_index: jax.Array  # [B, Q]   token index of each (sequence, query) pair; padding -> any
    token_row: jax.Array  # [T]      sequence row of each token (for scatter back)
    token_col: jax.Array  # [T]      query column of each token
    block_tables: jax.Array  # [B, MB]  physical block ids per sequence (0 = null block)
    context_lens: jax.Array  # [B]      valid keys per sequence after this step's write


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values [T, H, Dh] into pages [N, bs, H, Dh] at flat slots [T]."""
    n, bs, h, d = k_pages.shape
    k_flat = k_pages.reshape(n * bs, h, d).at[slot_mapping].set(k.astype(k_pages.dtype))
    v_flat = v_pages.reshape(n * bs, h, d).at[slot_mapping].set(v.astype(v_pages.dtype))
    return k_flat.reshape(n, bs, h, d), v_flat.reshape(n, bs, h, d)


def paged_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                        meta: AttnMeta, scale: float) -> jax.Array:
    """Causal attention of packed queries [T, H, Dh] over the paged cache (already written)."""
    b, mb = meta.block_tables.shape
    _, bs, h, d = k_pages.shape
    qb = q[meta.query_index]  # [B, Q, H, Dh]
    qpos = positions[meta.query_index]  # [B, Q]
    k = k_pages[meta.block_tables].reshape(b, mb * bs, h, d)  # [B, S, H, Dh]
    v = v_pages[meta.block_tables].reshape(b, mb * bs, h, d)  # [B, S, H, Dh]
    s = jnp.einsum("bqhd,bshd->bhqs", qb, k, preferred_element_type=jnp.float32) * scale  # [B, H, Q, S]
    kpos = jnp.arange(mb * bs, dtype=jnp.int32)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < meta.context_lens[:, None, None])
    s = jnp.where(mask[:, None, :, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqs,bshd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [B, Q, H, Dh]
    return o[meta.token_row, meta.token_col].astype(q.dtype)  # [T, H, Dh]
