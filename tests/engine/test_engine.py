"""The engine end to end: exact greedy tokens vs HF, all modes, preemption, no leaks, no compiles after warm-up."""

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Event, FinishReason, Request, SamplingParams


def _requests(prompts, max_tokens, tag):
    return [Request(f"{tag}-{i}", p, SamplingParams(max_tokens=m)) for i, (p, m) in
            enumerate(zip(prompts, max_tokens, strict=True))]


def _engine(tiny, **kw):
    _, _, cfg, params, _ = tiny
    base = dict(max_num_seqs=32, max_model_len=512)
    base.update(kw)
    return LLMEngine(cfg, params, EngineConfig(**base))


@pytest.mark.parametrize("mode,kw", [
    ("colocated", {}),
    ("chunked", {"max_num_batched_tokens": 64}),
    ("colocated-preempt", {"num_blocks": 40}),
    ("chunked-preempt", {"num_blocks": 40, "max_num_batched_tokens": 64}),
])
def test_engine_greedy_equals_hf_alone(tiny, workload, mode, kw):
    prompts, max_tokens, refs = workload
    engine = _engine(tiny, mode=mode.split("-")[0], **kw)
    reqs = _requests(prompts, max_tokens, mode)
    trackers = run_requests(engine, reqs)
    for i, (r, t, ref) in enumerate(zip(reqs, trackers, refs, strict=True)):
        assert t.token_ids == ref, f"request {i} (prompt {len(r.prompt_token_ids)} tokens)"
        assert r.output_token_ids == ref
        assert t.finish_reason == (FinishReason.STOP if ref[-1] == 2 and len(ref) < max_tokens[i]
                                   else FinishReason.LENGTH)
    if mode.endswith("preempt"):
        assert engine.scheduler.num_preemptions > 0, "the small KV pool should have forced preemption"
    else:
        assert engine.scheduler.num_preemptions == 0
    assert engine.num_held_blocks == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    engine.blocks.check_invariants()


def test_lifecycle_events_complete_and_monotone(tiny, workload):
    prompts, max_tokens, _ = workload
    engine = _engine(tiny)
    reqs = _requests(prompts[:12], max_tokens[:12], "ev")
    run_requests(engine, reqs)
    for r in reqs:
        kinds = [e.kind for e in r.events]
        times = [e.time for e in r.events]
        assert times == sorted(times)
        assert kinds[:4] == [Event.ARRIVED, Event.PREFILL_QUEUED, Event.PREFILL_BEGAN, Event.PREFILL_ENDED]
        assert kinds.count(Event.TOKEN) == len(r.output_token_ids)
        assert kinds[-1] == Event.FINISHED
        if len(r.output_token_ids) > 1:
            assert Event.DECODE_BEGAN in kinds


def test_abort_frees_blocks_at_once(tiny, workload):
    prompts, _, _ = workload
    engine = _engine(tiny)
    reqs = [Request(f"ab-{i}", p, SamplingParams(max_tokens=30, ignore_eos=True)) for i, p in enumerate(prompts[:8])]
    for r in reqs:
        engine.add_request(r)
    engine.step()  # prefill: everyone holds blocks
    engine.step()
    held = engine.num_held_blocks
    assert held > 0
    assert engine.abort_request("ab-3") and engine.abort_request("ab-0")
    assert engine.num_held_blocks < held
    assert reqs[3].finish_reason == FinishReason.ABORT and reqs[3].events[-1].kind == Event.ABORTED
    assert not engine.abort_request("nope")
    while engine.has_unfinished():
        engine.step()
    assert engine.num_held_blocks == 0
    assert all(len(r.output_token_ids) == 30 for i, r in enumerate(reqs) if i not in (0, 3))


def test_request_that_can_never_fit_is_rejected(tiny):
    engine = _engine(tiny, num_blocks=8)  # 7 usable blocks of 16 = 112 tokens
    with pytest.raises(ValueError, match="needs up to 130 tokens of KV cache"):
        engine.add_request(Request("big", [2] * 100, SamplingParams(max_tokens=30)))
    with pytest.raises(ValueError, match="limit is 511"):
        engine.add_request(Request("long", [2] * 600, SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(Request("vocab", [2, 9999], SamplingParams(max_tokens=1)))
    assert not engine.has_unfinished() and engine.num_held_blocks == 0


def test_no_compilation_after_warmup(tiny):
    """200 requests of mixed lengths after warm-up: zero new compilations, all blocks free."""
    _, _, cfg, _, _ = tiny
    engine = _engine(tiny, max_num_seqs=16, max_model_len=256)
    n_shapes = engine.warmup()
    assert n_shapes > 10
    rng = np.random.default_rng(11)
    reqs = [Request(f"w-{i}", [2, *rng.integers(3, cfg.vocab_size, int(rng.integers(0, 200))).tolist()],
                    SamplingParams(max_tokens=int(rng.integers(1, 50)), temperature=float(rng.choice([0.0, 0.8])),
                                   seed=i))
            for i in range(200)]
    run_requests(engine, reqs)
    assert engine.compilations_since_warmup == 0
    assert engine.num_held_blocks == 0
    assert all(r.finished for r in reqs)


def test_stop_string_through_the_front_end_frees_blocks(tiny):
    tok = tiny[4]
    engine = _engine(tiny)
    prompt = tok.encode("The weather today")
    base = run_requests(engine, [Request("s0", prompt, SamplingParams(max_tokens=40, ignore_eos=True))], tok)[0]
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    req = Request("s1", prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))
    t = run_requests(engine, [req], tok)[0]
    assert t.finish_reason == FinishReason.STOP and t.text == base.text[: base.text.index(stop)]
    assert req.finish_reason == FinishReason.STOP and req.events[-1].kind == Event.FINISHED
    assert engine.num_held_blocks == 0 and not engine.has_unfinished()


def test_min_tokens_bans_eos_until_reached_like_hf(tiny):
    """EOS set to the token greedy decoding picks first: without min_tokens the request stops at once;
    with min_tokens=3 EOS is banned for three tokens and the output equals HF's generate with
    min_new_tokens=3 and that EOS, token for token (then EOS may end it again)."""
    import torch

    _, model, cfg, params, _ = tiny
    prompt = [2, 50, 60, 70]
    first = run_requests(LLMEngine(cfg, params, EngineConfig(max_num_seqs=4, max_model_len=64)),
                         [Request("f", prompt, SamplingParams(max_tokens=1))])[0].token_ids[0]
    eos_cfg = cfg.replace(eos_token_id=first)
    engine = LLMEngine(eos_cfg, params, EngineConfig(max_num_seqs=4, max_model_len=64))
    plain, held = run_requests(engine, [Request("a", prompt, SamplingParams(max_tokens=12)),
                                        Request("b", prompt, SamplingParams(max_tokens=12, min_tokens=3))])
    assert plain.token_ids == [first] and plain.finish_reason == FinishReason.STOP
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=3,
                             eos_token_id=first, pad_token_id=first)[0, len(prompt):].tolist()
    if first in ref:  # HF keeps the EOS it stopped on; the engine does not emit it as text but as its last id
        ref = ref[: ref.index(first) + 1]
    assert held.token_ids == ref and len(held.token_ids) >= 3 and first not in held.token_ids[:3]
    assert engine.num_held_blocks == 0


def test_logit_bias_equals_hf_sequence_bias(tiny):
    """Greedy with logit_bias (the first greedy token pushed down, another pulled up) equals HF's generate
    with the same single-token sequence_bias, token for token."""
    import torch

    _, model, cfg, _, _ = tiny
    prompt = [2, 11, 22, 33, 44]
    engine = _engine(tiny, max_num_seqs=4, max_model_len=64)
    first = run_requests(engine, [Request("f", prompt, SamplingParams(max_tokens=1))])[0].token_ids[0]
    bias = {first: -100.0, 7: 4.0, 9: 2.5}
    got = run_requests(engine, [Request("b", prompt, SamplingParams(max_tokens=10, ignore_eos=True,
                                                                     logit_bias=bias))])[0].token_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                             sequence_bias={(t,): b for t, b in bias.items()})[0, len(prompt):].tolist()
    assert got == ref and first not in got
    with pytest.raises(ValueError, match="logit_bias: token id"):
        engine.add_request(Request("x", prompt, SamplingParams(logit_bias={cfg.vocab_size: 1.0})))
