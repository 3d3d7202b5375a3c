"""Logprobs and penalties from the engine's sampler against HF transformers on the tiny random OPT.

Logprobs are the model's raw log-softmax (float32), so a greedy token is the top of its own list and
its logprob is HF's log_softmax of the same position's logits. Penalties: greedy decoding equals HF's
generate with the matching logits processor (HF's repetition_penalty; OpenAI's presence / frequency
penalties written as a processor here), token for token. Through the in-process disaggregated
runtime too (first token sampled on the prefill instance, the rest on the decode instance).
"""

import dataclasses

import numpy as np
import pytest
import torch

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Request, SamplingParams

PROMPT = [2, 11, 22, 33, 44, 11, 22]


def _engine(tiny, **kw):
    _, _, cfg, params, _ = tiny
    return LLMEngine(cfg, params, EngineConfig(**{"max_num_seqs": 8, "max_model_len": 128, **kw}))


def _hf_logsoftmax(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()  # [len(ids), V]: row t predicts token t + 1


def test_greedy_logprobs_equal_hf_log_softmax(tiny):
    _, model, _, _, _ = tiny
    engine = _engine(tiny)
    req = Request("lp", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5))
    out = run_requests(engine, [req])[0].token_ids
    assert len(req.output_logprobs) == len(out) == 8
    ref = _hf_logsoftmax(model, PROMPT + out)
    for i, (tok, (lp, top)) in enumerate(zip(out, req.output_logprobs, strict=True)):
        row = ref[len(PROMPT) - 1 + i]
        assert abs(lp - row[tok]) < 1e-4
        assert len(top) == 5 and top[0][0] == tok  # greedy: the top of its own list
        assert [t for t, _ in top] == list(np.argsort(-row, kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in top], row[[t for t, _ in top]], atol=1e-4)
    plain = Request("p", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    assert run_requests(engine, [plain])[0].token_ids == out and plain.output_logprobs == []
    assert engine.num_held_blocks == 0


class OpenAIPenalties:
    """OpenAI's presence / frequency penalties over the generated tokens, as an HF logits processor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.n, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            counts = torch.bincount(input_ids[row, self.n:], minlength=scores.shape[1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.8}, {"repetition_penalty": 0.6},
                                {"presence_penalty": 1.5}, {"frequency_penalty": 0.7},
                                {"presence_penalty": -0.5, "frequency_penalty": 1.2, "repetition_penalty": 1.3}])
def test_penalties_equal_hf_greedy(tiny, kw):
    from transformers import LogitsProcessorList

    _, model, _, _, _ = tiny
    engine = _engine(tiny)
    n = 24
    got = run_requests(engine, [Request("pen", PROMPT, SamplingParams(max_tokens=n, ignore_eos=True, **kw))])
    base = run_requests(engine, [Request("base", PROMPT, SamplingParams(max_tokens=n, ignore_eos=True))])
    procs = LogitsProcessorList()
    if kw.get("presence_penalty") or kw.get("frequency_penalty"):
        procs.append(OpenAIPenalties(len(PROMPT), kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0)))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             repetition_penalty=kw.get("repetition_penalty", 1.0),
                             logits_processor=procs)[0, len(PROMPT):].tolist()
    assert got[0].token_ids == ref
    assert got[0].token_ids != base[0].token_ids  # the penalty changed something (the test can fail)
    assert engine.num_held_blocks == 0


def test_logprobs_and_penalties_through_disaggregation(tiny):
    """Prefill samples the first token (with its logprobs) and hands over; decode samples the rest."""
    import jax

    from jaxserve.engine.build import build_local

    _, _, cfg, params, _ = tiny
    sp = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3, repetition_penalty=1.5)
    colo = _engine(tiny)
    a = Request("a", PROMPT, sp)
    ref = run_requests(colo, [a])[0].token_ids
    roles = [(r, EngineConfig(mode=r, max_num_seqs=8, max_model_len=128)) for r in ("prefill", "decode")]
    rt = build_local(cfg, params, roles, jax.devices())
    b = Request("b", PROMPT, dataclasses.replace(sp))
    got = run_requests(rt, [b])[0].token_ids
    assert rt.num_transfers == 1 and all(v == 0 for v in rt.held_blocks().values())
    assert got == ref
    assert len(b.output_logprobs) == 10
    for (lp1, top1), (lp2, top2) in zip(a.output_logprobs, b.output_logprobs, strict=True):
        assert abs(lp1 - lp2) < 1e-5 and [t for t, _ in top1] == [t for t, _ in top2]


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_prompt_logprobs_in_pieces_equal_hf(tiny, mode):
    """A 150-token prompt scored in 64-token pieces (logits at every position, no prefix cache) beside an
    ordinary request in the same steps: every prompt logprob is HF's log-softmax, the generated tokens are
    HF's greedy ones, nothing compiles after warm-up, no block is held after."""
    from tests.model_fixtures import hf_greedy

    _, model, cfg, _, _ = tiny
    prompt = [2, *np.random.default_rng(1).integers(4, cfg.vocab_size, 149).tolist()]
    engine = _engine(tiny, mode=mode, max_model_len=256)
    engine.warmup()
    scored = Request("s", prompt, SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3, logprobs=1))
    other = Request("o", PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    outs = run_requests(engine, [scored, other])
    assert outs[0].token_ids == hf_greedy(model, prompt, 4) and outs[1].token_ids == hf_greedy(model, PROMPT, 6)
    rows = _hf_logsoftmax(model, prompt)
    assert len(scored.prompt_logprobs) == len(prompt) and scored.prompt_logprobs[0] is None
    for j in range(1, len(prompt)):
        lp, top = scored.prompt_logprobs[j]
        assert abs(lp - rows[j - 1][prompt[j]]) < 1e-4, j
        assert [t for t, _ in top] == list(np.argsort(-rows[j - 1], kind="stable")[:3])
    assert len(scored.output_logprobs) == 4
    assert engine.compilations_since_warmup == 0 and engine.num_held_blocks == 0


def test_scored_prompts_that_cannot_both_fit_run_one_after_the_other(tiny):
    """Two prompts scored in pieces whose blocks fit one at a time (a review found they could hold half
    the pool each and stall forever): the first takes its whole prompt's blocks at once, the second waits."""
    _, _, cfg, _, _ = tiny
    rng = np.random.default_rng(2)
    prompts = [[2, *rng.integers(4, cfg.vocab_size, 149).tolist()] for _ in range(2)]
    engine = _engine(tiny, max_model_len=256, num_blocks=16)  # 15 usable; each request needs 10
    reqs = [Request(f"s{i}", p, SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=0))
            for i, p in enumerate(prompts)]
    outs = run_requests(engine, reqs)
    assert [len(o.token_ids) for o in outs] == [4, 4]
    assert [len(r.prompt_logprobs) for r in reqs] == [150, 150] and engine.num_held_blocks == 0
