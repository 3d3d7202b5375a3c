"""Host-side packing of one model step into bucketed int32 arrays.

    groups of SeqChunk(token_ids, start_pos, block_table)   (host Python lists)
        + StepShape (bucketed sizes, chosen by the runner)
        --build_step_inputs()-->
    StepInputs(tokens [T], positions [T], meta: AttnMeta, logits_index [R])  (numpy int32)

``StepShape`` is the whole jit signature of a step: ``packed`` steps (prompts from
position 0) depend on ``T`` and ``R`` only; ``paged`` steps add one
``(Bg, Qg, MBg)`` triple per attention group. Padding tokens write into the
reserved null block 0 and are never read back; padding queries are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.model.attention import AttnGroup, AttnMeta

NULL_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence runs this step: a prompt (chunk) or its last sampled token."""

    token_ids: Sequence[int]
    start_pos: int  # absolute position of token_ids[0]
    block_table: Sequence[int]  # physical blocks covering positions [0, start_pos + len(token_ids))
    all_logits: bool = False  # logits rows for every token (prompt logprobs), not just the last

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Bucketed sizes of one step: the jit signature."""

    num_tokens: int  # T
    logits_rows: int  # R: sequences whose last token gets logits
    packed: bool  # prompts from position 0, attending to their own tokens
    groups: tuple[tuple[int, int, int], ...] = ()  # paged: (Bg, Qg, MBg) per group


@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    meta: AttnMeta  # numpy int32 arrays
    logits_index: np.ndarray  # [R] int32: last token of each sequence, in chunk order
    shape: StepShape


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from lo up to and including the first >= hi."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(b)
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int], what: str = "size") -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}: {n} exceeds the largest bucket {max(buckets)}")


def build_step_inputs(groups: Sequence[Sequence[SeqChunk]], shape: StepShape, block_size: int) -> StepInputs:
    """Pack chunk groups into arrays of exactly ``shape``. Packed steps take a single group."""
    t_cap, r_cap = shape.num_tokens, shape.logits_rows
    chunks = [c for g in groups for c in g]
    t_real = sum(len(c.token_ids) for c in chunks)
    if t_real > t_cap or sum(len(c.token_ids) if c.all_logits else 1 for c in chunks) > r_cap:
        raise ValueError(f"step of {len(chunks)} seqs / {t_real} tokens exceeds shape {shape}")
    if shape.packed and (len(groups) > 1 or any(c.start_pos for c in chunks)):
        raise ValueError("a packed step takes one group of chunks that start at position 0")
    if not shape.packed and len(groups) != len(shape.groups):
        raise ValueError(f"{len(groups)} chunk groups for a shape with {len(shape.groups)}")
    tokens = np.zeros(t_cap, np.int32)
    positions = np.zeros(t_cap, np.int32)
    slots = np.full(t_cap, NULL_BLOCK * block_size, np.int32)
    seg = np.full(t_cap, -1, np.int32)
    logits_index = np.zeros(r_cap, np.int32)
    attn_groups = []
    t = row = ci = 0
    for gi, g in enumerate(groups):
        if not shape.packed:
            bg, qg, mbg = shape.groups[gi]
            qidx = np.full((bg, qg), t_cap, np.int32)
            tables = np.full((bg, mbg), NULL_BLOCK, np.int32)
            ctx = np.zeros(bg, np.int32)
            if len(g) > bg:
                raise ValueError(f"group {gi}: {len(g)} sequences exceed {bg}")
        for b, c in enumerate(g):
            n = len(c.token_ids)
            need = -(-c.end_pos // block_size)
            if n == 0 or len(c.block_table) < need:
                raise ValueError(f"chunk {b}: {n} tokens at {c.start_pos} but {len(c.block_table)} blocks")
            pos = np.arange(c.start_pos, c.end_pos, dtype=np.int32)
            table = np.asarray(c.block_table[:need], np.int32)
            tokens[t:t + n] = c.token_ids
            positions[t:t + n] = pos
            slots[t:t + n] = table[pos // block_size] * block_size + pos % block_size
            if shape.packed:
                seg[t:t + n] = ci
            else:
                if n > qg or need > mbg:
                    raise ValueError(f"chunk {b}: {n} tokens / {need} blocks exceed group shape {(bg, qg, mbg)}")
                qidx[b, :n] = np.arange(t, t + n)
                tables[b, :need] = table
                ctx[b] = c.end_pos
            if c.all_logits:
                logits_index[row:row + n] = np.arange(t, t + n)
                row += n
            else:
                logits_index[row] = t + n - 1
                row += 1
            t += n
            ci += 1
        if not shape.packed:
            attn_groups.append(AttnGroup(qidx, tables, ctx))
    if shape.packed:
        meta = AttnMeta(slots, (), seg)
    else:
        meta = AttnMeta(slots, tuple(attn_groups), None)
    return StepInputs(tokens, positions, meta, logits_index, shape)


def dummy_step_inputs(shape: StepShape, block_size: int) -> StepInputs:
    """All-padding inputs of ``shape`` (for warm-up compiles): writes only touch the null block."""
    return build_step_inputs([[] for _ in (shape.groups or [()])] if not shape.packed else [[]], shape, block_size)
