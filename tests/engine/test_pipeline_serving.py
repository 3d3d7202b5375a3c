"""A pp=2 engine serves through micro-batched stages: HF's tokens, nothing compiled after warm-up,
and every packed prefill call of several prompts runs as micro-batches in the wavefront order."""

import collections

import jax

from jaxserve.compile_cache import program_count
from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Request, SamplingParams
from jaxserve.runtime.instance import LocalInstance
from jaxserve.runtime.router import Router

PICK = [0, 1, 2, 3, 4, 5, 8, 13, 21, 34, 40, 47, 50, 55, 60, 63]


def test_pp2_engine_micro_batches_prefill_and_equals_hf(tiny, workload):
    _, _, cfg, params, _ = tiny
    prompts, max_tokens, refs = workload
    engine = LLMEngine(cfg, params, EngineConfig(pp=2, max_num_seqs=16, max_model_len=384),
                       devices=jax.devices()[:2])
    with Router([LocalInstance(engine)]) as router:
        router.warmup()
        compiled = program_count()
        spans = engine.executor.record_timeline()
        reqs = [Request(f"pp-{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i])) for i in PICK]
        trackers = run_requests(router, reqs)
        assert [t.token_ids for t in trackers] == [refs[i] for i in PICK]
        assert program_count() == compiled
        assert engine.num_held_blocks == 0

    calls = collections.defaultdict(dict)
    for sp in spans:
        calls[sp.call][sp.stage, sp.mb] = sp
    split = [c for c in calls.values() if len(c) > 2]
    assert split, "no packed prefill call was cut into micro-batches"
    for c in split:
        mbs = 1 + max(m for _, m in c)
        assert sorted(c) == [(s, m) for s in range(2) for m in range(mbs)]
        for m in range(mbs):  # wavefront order: after the previous stage's m and this stage's m - 1
            assert c[1, m].start >= c[0, m].end
            if m:
                assert c[0, m].start >= c[0, m - 1].end and c[1, m].start >= c[1, m - 1].end
