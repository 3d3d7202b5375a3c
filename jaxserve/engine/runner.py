"""Turns a scheduled step into bucketed executor calls and sampled tokens.

    SchedulerOutput.chunks
      -> decode call        (one token per sequence, cache prefix)   shape: B x MB buckets
      -> packed prefill call (prompts from position 0)               shape: T x R buckets
      -> continuation calls (a prompt chunk after a cached prefix)   shape: Qc x MB buckets, one per chunk
      -> logits --sample (per-request settings)--> {sequence id: token id}

Calls of different kinds run one after another inside a step, so the number of
compiled shapes is the *sum* of the three bucket sets, not their product; the
price is that in chunked mode decodes and prompt chunks do not share one matmul.
``warmup()`` compiles every shape the configured scheduler can produce, reporting each to a
``(done, total)`` callback (``jaxserve.warmup_progress``: the runner itself prints nothing).

Pipeline stages (an executor with ``pp > 1``): the packed prefill call is cut into
``executor.microbatches`` micro-batches of whole prompts (``jaxserve.microbatch.split_runs``,
balanced by tokens), each padded to its own bucket (a shape warm-up compiled anyway), and run
by ``executor.execute_many`` so that stage ``s`` of one overlaps stage ``s + 1`` of the one
before. Decode and continuation calls pass through the stages as one micro-batch: cutting a
decode batch would read each stage's weights once per micro-batch, which costs more than the
overlap gains at the batch sizes that serve (docs/planner.md, "Pipeline stages: the engine and the
model").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxserve.engine.block_manager import blocks_needed
from jaxserve.engine.scheduler import ScheduledChunk
from jaxserve.microbatch import split_runs
from jaxserve.model.inputs import (
    SeqChunk,
    StepShape,
    bucket_for,
    build_step_inputs,
    dummy_step_inputs,
    pow2_buckets,
)
from jaxserve.model.sampling import SamplingArrays, score_prompt_rows
from jaxserve.warmup_progress import ProgressFn


def _every_4x(tokens: tuple[int, ...]) -> tuple[int, ...]:
    """Powers of two from 64 stepping by 4x, and the largest (score pieces need 64)."""
    return tuple(sorted({t for t in tokens if t >= 64 and (t.bit_length() - 7) % 2 == 0} | {tokens[-1], min(64, tokens[-1])}))


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Decode row counts: 1, 2, 4, 8, then every 8 up to 128 (vLLM's CUDA-graph sizes), every 32 above:
    a step's dense work grows with its padded rows, and powers of two padded a batch of 33-64 to 64
    (up to half the work wasted; OPT-125m offline run: 34.2 -> 29.1 s of decode with 48 added alone)."""
    out, b = [], 1
    while True:
        out.append(b)
        if b >= max_num_seqs:
            return tuple(out)
        b = b * 2 if b < 8 else b + (8 if b < 128 else 32)


@dataclasses.dataclass(frozen=True)
class Buckets:
    decode_batch: tuple[int, ...]
    blocks: tuple[int, ...]  # blocks per sequence of a continuation call (its attention gathers them all)
    decode_blocks: int  # block-table width of every decode call (the max: see ``for_limits``)
    prefill_tokens: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    chunk_tokens: tuple[int, ...]
    score_rows: int = 64  # prompt tokens per call of a prompt scored for its logprobs (logits at every one)

    @classmethod
    def for_limits(cls, *, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int,
                   block_size: int, rare_prefill: bool = False, one_group_width: bool = False,
                   rare_chunks: bool = False) -> Buckets:
        """``rare_prefill``: packed prefill only recomputes preempted sequences (a decode instance), so
        every such call is padded to the one largest token bucket: one layer program instead of one
        per bucket (the demo's decode instance: 14 shapes to warm up instead of 29).
        ``one_group_width``: the attention reads only each sequence's real context in prompt-chunk
        calls too (the native CPU kernels), so those use one block-table width, as decodes do.
        ``rare_chunks``: prompt chunks are only what follows a cached prefix and scored prompt pieces
        (not chunked prefill), so their token buckets step by 4x from 64: 3 shapes instead of 6 for the
        demo's prefill instance (a 5-token rest padded to 64 costs next to nothing)."""
        max_blocks = blocks_needed(max_model_len, block_size)
        tokens = pow2_buckets(16, max_num_batched_tokens)
        # decode attention loops over each batch's longest real context, not the table's width, so
        # one width costs nothing: OPT-125m, batch 1 and 16 at context 100, a table of 8 vs 128
        # blocks: 22.9 vs 20.7 ms and 59.1 vs 57.8 ms per step; it saves 5 of 6 decode shapes at 2048
        return cls(
            decode_batch=decode_buckets(max_num_seqs),
            blocks=(max_blocks,) if one_group_width else pow2_buckets(min(4, max_blocks), max_blocks),
            decode_blocks=max_blocks,
            prefill_tokens=tokens[-1:] if rare_prefill else tokens,
            prefill_rows=(*(r for r in (1, 4, 16, 64, 256) if r < max_num_seqs), max_num_seqs),
            chunk_tokens=_every_4x(tokens) if rare_chunks else tokens,
            score_rows=min(64, tokens[-1]),
        )

    def packed_shape(self, tokens: int, rows: int) -> StepShape:
        """The shape of a packed prefill call of ``rows`` prompts, ``tokens`` tokens in all."""
        return StepShape(bucket_for(tokens, self.prefill_tokens, "prefill tokens"),
                         bucket_for(rows, self.prefill_rows, "prefill rows"), True)

    def decode_shape(self, batch: int) -> StepShape:
        """The shape of a decode call of ``batch`` sequences."""
        b = bucket_for(batch, self.decode_batch, "decode batch")
        return StepShape(b, b, False, ((b, 1, self.decode_blocks),))

    def score_shape(self, num_blocks: int) -> StepShape:
        """A scored prompt piece: ``score_rows`` tokens (padded), a logits row for each."""
        r = self.score_rows
        return StepShape(r, r, False, ((1, r, bucket_for(num_blocks, self.blocks, "blocks per sequence")),))

    def shapes(self, *, decode: bool, prefill: bool, chunks: bool, score: bool = False) -> list[StepShape]:
        out = []
        if prefill:  # a call padded to t tokens has at most t prompts: rows up to the first bucket >= t
            out += [StepShape(t, r, True) for t in self.prefill_tokens for r in self.prefill_rows
                    if r <= t or r == next(x for x in self.prefill_rows if x >= min(t, self.prefill_rows[-1]))]
        if decode:
            out += [self.decode_shape(b) for b in self.decode_batch]
        if chunks:
            out += [StepShape(q, 1, False, ((1, q, mb),)) for q in self.chunk_tokens for mb in self.blocks]
        if score:
            out += [self.score_shape(mb) for mb in self.blocks]
        return out


class Runner:
    def __init__(self, executor: Any, block_tables: Any, buckets: Buckets) -> None:
        self.executor = executor
        self.tables = block_tables  # seq id -> list of block ids (BlockManager.tables)
        self.block_size = executor.block_size
        self.buckets = buckets

    def run(self, chunks: Sequence[ScheduledChunk]) -> dict[str, int]:
        """Execute one scheduled step; returns the token sampled for each chunk that completes a prompt/decode."""
        scored = [c for c in chunks if c.seq.request.scoring_prompt]
        chunks = [c for c in chunks if not c.seq.request.scoring_prompt]
        decodes = [c for c in chunks if c.is_decode]
        packed = [c for c in chunks if c.start == 0]
        conts = [c for c in chunks if c.start > 0 and not c.is_decode]
        out: dict[str, int] = {c.seq.id: t for c in scored if (t := self._scored(c)) is not None}
        b = self.buckets
        if packed:
            out.update(self._packed(packed))
        if decodes:
            out.update(self._call([(decodes, b.decode_shape(len(decodes)))]))
        for c in conts:
            q = bucket_for(c.num_tokens, b.chunk_tokens, "chunk tokens")
            mb = bucket_for(len(self.tables[c.seq.id]), b.blocks, "blocks per sequence")
            out.update(self._call([([c], StepShape(q, 1, False, ((1, q, mb),)))]))
        return out

    def _scored(self, c: ScheduledChunk) -> int | None:
        """A piece of a prompt scored for its logprobs: logits at each of its positions give the next prompt
        token's logprob (appended to ``request.prompt_logprobs``); the piece that ends the prompt samples
        the first token from its last row. Returns that token, or None mid-prompt."""
        req, n, r = c.seq.request, c.num_tokens, self.buckets.score_rows
        tokens = c.seq.token_ids
        chunk = SeqChunk(tokens[c.start:c.start + n], c.start, self.tables[c.seq.id], all_logits=True)
        shape = self.buckets.score_shape(len(self.tables[c.seq.id]))
        logits = self.executor.execute(build_step_inputs([[chunk]], shape, self.block_size))
        targets = np.zeros(r, np.int32)
        nxt = tokens[c.start + 1:min(c.start + n + 1, req.num_prompt_tokens)]
        targets[:len(nxt)] = nxt
        lp, ids, top, last_row = score_prompt_rows(logits, targets, n - 1)
        if c.start == 0:
            req.prompt_logprobs.append(None)  # the first token has no logprob
        k = req.sampling.prompt_logprobs or 0
        for i in range(len(nxt)):
            req.prompt_logprobs.append((float(lp[i]), tuple(zip(ids[i, :k].tolist(), top[i, :k].tolist(), strict=True))))
        if not c.samples:
            return None
        hist = [(req.all_token_ids, req.num_prompt_tokens)] if req.sampling.penalized else None
        arrays = SamplingArrays.from_params([req.sampling], [c.seq.seed], [len(req.output_token_ids)], 1,
                                            self.executor.cfg.eos_token_id, hist)
        picked = self.executor.sample(last_row, arrays)
        if req.sampling.logprobs is not None:
            req.output_logprobs.append(picked.token_logprobs(0, req.sampling.logprobs))
        return int(picked.tokens[0])

    def _packed(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """The packed prefill call: one micro-batch, or ``executor.microbatches`` of them through pp stages."""
        n = self.executor.microbatches if self.executor.pp > 1 else 1
        calls = []
        for r in split_runs([c.num_tokens for c in chunks], n):
            run = chunks[r.start:r.stop]
            calls.append((run, self.buckets.packed_shape(sum(c.num_tokens for c in run), len(run))))
        return self._call(calls)

    def _call(self, calls: list[tuple[list[ScheduledChunk], StepShape]]) -> dict[str, int]:
        """One executor call of one or more micro-batches (each its chunks and shape); sampled tokens."""
        inputs = [build_step_inputs(
            [[SeqChunk(c.seq.token_ids[c.start:c.start + c.num_tokens], c.start, self.tables[c.seq.id])
              for c in chunks]], shape, self.block_size) for chunks, shape in calls]
        logits = self.executor.execute_many(inputs) if len(inputs) > 1 else [self.executor.execute(inputs[0])]
        out: dict[str, int] = {}
        for (chunks, shape), lg in zip(calls, logits, strict=True):
            if not any(c.samples for c in chunks):
                continue
            reqs = [c.seq.request for c in chunks]
            histories = [(r.all_token_ids, r.num_prompt_tokens) for r in reqs] if any(
                r.sampling.penalized for r in reqs) else None
            arrays = SamplingArrays.from_params(
                [r.sampling for r in reqs], [c.seq.seed for c in chunks], [len(r.output_token_ids) for r in reqs],
                shape.logits_rows, self.executor.cfg.eos_token_id, histories)
            picked = self.executor.sample(lg, arrays)
            for i, c in enumerate(chunks):
                if not c.samples:
                    continue
                out[c.seq.id] = int(picked.tokens[i])
                if reqs[i].sampling.logprobs is not None:  # the engine appends the token itself next
                    reqs[i].output_logprobs.append(picked.token_logprobs(i, reqs[i].sampling.logprobs))
        return out

    def warmup(self, *, decode: bool, prefill: bool, chunks: bool, score: bool = False,
               progress: ProgressFn | None = None) -> int:
        """Compile every step shape (and the samplers for every row count) this engine can produce;
        returns how many shapes. ``progress(done, total)`` is called before the first and after each."""
        shapes = self.buckets.shapes(decode=decode, prefill=prefill, chunks=chunks, score=score)
        scoring = set(self.buckets.shapes(decode=False, prefill=False, chunks=False, score=score))
        report = progress or (lambda done, total: None)
        report(0, len(shapes))
        sampled: set[int] = set()
        for i, s in enumerate(shapes, 1):
            logits = self.executor.execute(dummy_step_inputs(s, self.block_size))
            if s.logits_rows not in sampled and s not in scoring:  # its samplers now (the progress counts them);
                # a scored piece samples its last row through the 1-row samplers
                sampled.add(s.logits_rows)
                greedy = SamplingArrays.from_params([], [], [], s.logits_rows)
                self.executor.sample(logits, greedy)
                self.executor.sample(logits, dataclasses.replace(greedy, temperature=greedy.temperature + 1.0))
            if s in scoring:
                score_prompt_rows(logits, np.zeros(s.logits_rows, np.int32), 0)
            report(i, len(shapes))
        jax.block_until_ready(self.executor.kv)
        return len(shapes)
