"""Our forward and generation against HF transformers' OPTForCausalLM on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxserve.model.generate import generate, jit_forward
from jaxserve.model.inputs import SeqChunk, StepShape, build_step_inputs
from jaxserve.model.opt import init_kv_cache
from jaxserve.request import SamplingParams
from tests.model_fixtures import hf_greedy

BS = 16


def _run(params, cfg, kv, chunks, max_blocks, packed=False):
    n_tok = sum(len(c.token_ids) for c in chunks)
    q = max(len(c.token_ids) for c in chunks)
    # padding everywhere: extra tokens, an extra logits row, an extra group row
    shape = StepShape(n_tok + 3, len(chunks) + 1, packed, () if packed else ((len(chunks) + 1, q, max_blocks),))
    inp = build_step_inputs([chunks], shape, BS)
    logits, kv = jit_forward(params, cfg, jnp.asarray(inp.tokens), jnp.asarray(inp.positions), kv,
                             jax.tree_util.tree_map(jnp.asarray, inp.meta), jnp.asarray(inp.logits_index))
    return np.asarray(logits)[: len(chunks)], kv


def test_prefill_and_decode_logits_match_hf(hf_model):
    """Batch of prompts of different lengths, then 6 decode steps: max |diff| <= 1e-4 at every step."""
    _, model, cfg, params = hf_model
    rng = np.random.default_rng(1)
    lens = [1, 5, 17, 40]
    prompts = [[2, *rng.integers(3, cfg.vocab_size, n - 1).tolist()] for n in lens]
    steps = 6
    # non-contiguous, shuffled block ids so the block table really matters
    blocks = rng.permutation(np.arange(1, 40)).tolist()
    tables, i = [], 0
    for n in lens:
        k = -(-(n + steps) // BS)
        tables.append(blocks[i:i + k])
        i += k
    kv = init_kv_cache(cfg, 40, BS)
    seqs = [list(p) for p in prompts]
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)]
    for step in range(steps + 1):
        if step == 0:  # the prompt step both ways: packed (own keys) and paged (keys read back from pages)
            packed, kv = _run(params, cfg, kv, chunks, 4, packed=True)
            ours, kv = _run(params, cfg, kv, chunks, 4)
            np.testing.assert_allclose(packed, ours, atol=1e-5, rtol=0)
        else:
            ours, kv = _run(params, cfg, kv, chunks, 4)
        for b, s in enumerate(seqs):
            with torch.no_grad():
                ref = model(torch.tensor([s])).logits[0, -1].numpy()
            np.testing.assert_allclose(ours[b], ref, atol=1e-4, rtol=0, err_msg=f"step {step} seq {b}")
        nxt = rng.integers(3, cfg.vocab_size, len(seqs)).tolist()
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        chunks = [SeqChunk([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]


def test_greedy_generation_matches_hf_generate(hf_model):
    """16 prompts of varied lengths, 32 greedy tokens each: identical ids to HF generate(do_sample=False)."""
    _, model, cfg, params = hf_model
    rng = np.random.default_rng(2)
    prompts = [[2, *rng.integers(3, cfg.vocab_size, int(n)).tolist()] for n in rng.integers(0, 60, 16)]
    ours = generate(params, cfg, prompts, SamplingParams(max_tokens=32))
    for p, g in zip(prompts, ours, strict=True):
        assert g.token_ids == hf_greedy(model, p, 32)


def test_chunked_prefill_with_decode_group_matches_hf(hf_model):
    """A prompt prefilled in two chunks; the second chunk (cached prefix) shares a step with a decode group."""
    _, model, cfg, params = hf_model
    rng = np.random.default_rng(3)
    long_p = [2, *rng.integers(3, cfg.vocab_size, 44).tolist()]
    short_p = [2, *rng.integers(3, cfg.vocab_size, 6).tolist()]
    kv = init_kv_cache(cfg, 12, BS)
    t_long, t_short = [5, 1, 9, 3], [7]
    # step 1: first 20 tokens of the long prompt and the whole short prompt, packed
    shape = StepShape(32, 2, True)
    inp = build_step_inputs([[SeqChunk(long_p[:20], 0, t_long), SeqChunk(short_p, 0, t_short)]], shape, BS)
    _, kv = jit_forward(params, cfg, jnp.asarray(inp.tokens), jnp.asarray(inp.positions), kv,
                        jax.tree_util.tree_map(jnp.asarray, inp.meta), jnp.asarray(inp.logits_index))
    # step 2: group 0 = one decode token of the short prompt; group 1 = the long prompt's last 25 tokens
    nxt = 77
    shape = StepShape(32, 2, False, ((2, 1, 2), (1, 32, 4)))
    inp = build_step_inputs([[SeqChunk([nxt], len(short_p), t_short)], [SeqChunk(long_p[20:], 20, t_long)]],
                            shape, BS)
    logits, kv = jit_forward(params, cfg, jnp.asarray(inp.tokens), jnp.asarray(inp.positions), kv,
                             jax.tree_util.tree_map(jnp.asarray, inp.meta), jnp.asarray(inp.logits_index))
    with torch.no_grad():
        ref_short = model(torch.tensor([[*short_p, nxt]])).logits[0, -1].numpy()
        ref_long = model(torch.tensor([long_p])).logits[0, -1].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0], ref_short, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[1], ref_long, atol=1e-4, rtol=0)
