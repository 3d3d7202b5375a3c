"""Host-side packing of one model step into bucketed int32 arrays.

    [SeqChunk(token_ids, start_pos, block_table), ...]  (host Python lists)
        --build_step_inputs(block_size, buckets)-->
    StepInputs(tokens [T], positions [T], meta: AttnMeta, logits_index [B])  (numpy int32)

Every array is padded to a bucket size (T tokens, B sequences, Q queries per
sequence, MB blocks per sequence) so jit sees a small, fixed set of shapes.
Padding tokens write into the reserved null block 0 and are never read back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.model.attention import AttnMeta

NULL_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence runs this step: a prompt (chunk) or its last sampled token."""

    token_ids: Sequence[int]
    start_pos: int  # absolute position of token_ids[0]
    block_table: Sequence[int]  # physical blocks covering positions [0, start_pos + len(token_ids))

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    meta: AttnMeta  # numpy int32 arrays
    logits_index: np.ndarray  # [B] int32: last token of each sequence
    num_seqs: int  # real sequences (rows past this are padding)
    num_tokens: int  # real tokens


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from lo up to and including the first >= hi."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(b)
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}: {n} exceeds the largest bucket {max(buckets)}")


def build_step_inputs(chunks: Sequence[SeqChunk], block_size: int, *, num_tokens: int, num_seqs: int,
                      max_q: int, max_blocks: int) -> StepInputs:
    """Pack ``chunks`` into arrays of exactly the given (bucketed) sizes."""
    t_real = sum(len(c.token_ids) for c in chunks)
    if len(chunks) > num_seqs or t_real > num_tokens:
        raise ValueError(f"step of {len(chunks)} seqs / {t_real} tokens exceeds bucket {num_seqs}/{num_tokens}")
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, NULL_BLOCK * block_size, np.int32)
    row = np.zeros(num_tokens, np.int32)
    col = np.zeros(num_tokens, np.int32)
    qidx = np.zeros((num_seqs, max_q), np.int32)
    tables = np.full((num_seqs, max_blocks), NULL_BLOCK, np.int32)
    ctx = np.zeros(num_seqs, np.int32)
    logits_index = np.zeros(num_seqs, np.int32)
    t = 0
    for b, c in enumerate(chunks):
        n = len(c.token_ids)
        need = -(-c.end_pos // block_size)
        if n == 0 or n > max_q or need > max_blocks or len(c.block_table) < need:
            raise ValueError(f"sequence {b}: {n} tokens at {c.start_pos} with {len(c.block_table)} blocks does "
                             f"not fit max_q={max_q}, max_blocks={max_blocks}")
        pos = np.arange(c.start_pos, c.end_pos, dtype=np.int32)
        table = np.asarray(c.block_table[:need], np.int32)
        tokens[t:t + n] = c.token_ids
        positions[t:t + n] = pos
        slots[t:t + n] = table[pos // block_size] * block_size + pos % block_size
        row[t:t + n] = b
        col[t:t + n] = np.arange(n)
        qidx[b, :n] = np.arange(t, t + n)
        tables[b, :need] = table
        ctx[b] = c.end_pos
        logits_index[b] = t + n - 1
        t += n
    meta = AttnMeta(slots, qidx, row, col, tables, ctx)
    return StepInputs(tokens, positions, meta, logits_index, len(chunks), t_real)
