"""A compact whole-batch generator over the model (static batching, like HF ``generate``).

    prompts [[ids]], SamplingParams per prompt
      -> one prefill step for all prompts (contiguous blocks per sequence)
      -> decode steps for the still-running sequences until each stops
      -> [Generation(token_ids, text, finish_reason)]

It is the model-level reference loop (tests compare it with HF transformers);
serving goes through ``jaxserve.engine``, which schedules, pages and batches
continuously but uses the same forward, sampler and stop rules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.model.inputs import SeqChunk, StepShape, build_step_inputs, pow2_buckets
from jaxserve.model.opt import Params, forward, init_kv_cache
from jaxserve.model.sampling import SamplingArrays, new_seed, sample_tokens
from jaxserve.request import FinishReason, SamplingParams
from jaxserve.stopping import OutputTracker


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(4,))
def jit_forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, kv: Any,
                meta: Any, logits_index: jax.Array) -> tuple[jax.Array, Any]:
    return forward(params, cfg, tokens, positions, kv, meta, logits_index)


def _bucket(n: int) -> int:
    return pow2_buckets(1, n)[-1]


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             tokenizer: Any = None, block_size: int = 16) -> list[Generation]:
    """Generate for every prompt; ``tokenizer`` (jaxserve.tokenizer.Tokenizer) enables text and stop strings."""
    n = len(prompts)
    sampling = SamplingParams() if sampling is None else sampling
    sps = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    if len(sps) != n:
        raise ValueError(f"{n} prompts but {len(sps)} SamplingParams")
    limit = cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if not 0 < len(p) < limit:
            raise ValueError(f"prompt {i}: length {len(p)} must be in [1, {limit - 1}]")
    budgets = [min(s.max_tokens, limit - len(p)) for p, s in zip(prompts, sps, strict=True)]
    # contiguous blocks per sequence, after the null block 0
    tables, nxt = [], 1
    for p, m in zip(prompts, budgets, strict=True):
        nb = -(-(len(p) + m) // block_size)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    kv = init_kv_cache(cfg, nxt, block_size)
    seeds = [s.seed if s.seed is not None else new_seed() for s in sps]
    trackers = [OutputTracker(sp, cfg.eos_token_id, tokenizer.detokenizer(p) if tokenizer is not None else None,
                              max_tokens=m) for p, sp, m in zip(prompts, sps, budgets, strict=True)]
    max_blocks = _bucket(max(len(t) for t in tables))

    chunks = [SeqChunk(list(p), 0, tables[i]) for i, p in enumerate(prompts)]
    active = list(range(n))
    while active:
        b = _bucket(len(active))
        prefill = chunks[0].start_pos == 0
        shape = StepShape(_bucket(sum(len(c.token_ids) for c in chunks)), b, prefill,
                          () if prefill else ((b, 1, max_blocks),))
        inputs = build_step_inputs([chunks], shape, block_size)
        logits, kv = jit_forward(params, cfg, jnp.asarray(inputs.tokens), jnp.asarray(inputs.positions), kv,
                                 jax.tree_util.tree_map(jnp.asarray, inputs.meta),
                                 jnp.asarray(inputs.logits_index))
        arrays = SamplingArrays.from_params([sps[i] for i in active], [seeds[i] for i in active],
                                            [len(trackers[i].token_ids) for i in active], b, cfg.eos_token_id)
        toks = sample_tokens(logits, arrays).tokens
        active = [i for row, i in enumerate(active) if trackers[i].add(int(toks[row]))[1] is None]
        chunks = [SeqChunk([trackers[i].token_ids[-1]], len(prompts[i]) + len(trackers[i].token_ids) - 1,
                           tables[i]) for i in active]
    return [Generation(t.token_ids, t.text, t.finish_reason) for t in trackers]
