"""The search's per-layout throughput bounds (``Scorer.max_rate``) against hand-computed values.

Bisection never looks above these bounds (a finite run past them can still meet a lax SLO), so a
loose bound goes straight into a layout's score.
"""

import numpy as np
import pytest

from jaxserve.config import model_preset
from jaxserve.slo import SLO
from planner.hardware import hardware_spec
from planner.latency import InstanceModel, PhaseModel
from planner.search import Scorer, SearchSpec
from planner.simulator import SimResult, run_decode
from planner.workload import Requests, Workload

MODEL = model_preset("opt-13b", dtype="float16")
STEP = 0.010  # decode step: a constant 10 ms, whatever the batch


def scorer(prompt: list[int], output: list[int]) -> Scorer:
    n = len(prompt)
    trace = Requests(np.arange(n, dtype=float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))
    spec = SearchSpec("opt-13b", MODEL, None, hardware_spec("a100-80g"), SLO(10.0, 1.0, 0.9),
                      Workload("two-class", trace=trace), nodes=1, gpus_per_node=8, n_requests=n)
    return Scorer(spec)


def decode_inst(kv_tokens: int, pp: int = 1) -> InstanceModel:
    dec = (STEP, 0.0, 0.0)
    return InstanceModel(MODEL, 1, pp, PhaseModel((0.01, 1e-4, 0.0), dec, dec, 1 << 30), 80,
                         kv_tokens=kv_tokens)


def test_decode_bound_weights_kv_by_how_long_each_request_holds_it():
    # half the requests decode 1 step, half 1001 steps; all have a 100-token prompt
    sc = scorer([100] * 100, [2, 1002] * 50)
    # per lane: E[n] = 501 steps; KV reserved (16-token blocks) 112 and 1104 tokens, held 1 and 1001 steps:
    # E[need * n] = (112 * 1 + 1104 * 1001) / 2 = 552608; batch with the KV full = 100000 * 501 / 552608 = 90.66
    b = int(100_000 * 501 / 552_608)
    assert b == 90
    assert sc.max_rate("decode", decode_inst(100_000)) == pytest.approx(b / (501 * STEP))  # 17.96 req/s
    # (cap / E[p + o] = 100000 / 602 = 166 sequences, 33.1 req/s: twice what the KV can hold)
    # pp=2: one batch over all of the KV; a step is the pp=1 step plus a hop per row between the stages
    b2 = int(200_000 * 501 / 552_608)
    hop = MODEL.hidden_size * 2 / 300e9
    assert sc.max_rate("decode", decode_inst(200_000, pp=2)) == pytest.approx(b2 / (501 * (STEP + b2 * hop)))


def test_decode_bound_is_what_a_long_run_sustains():
    rng = np.random.default_rng(0)
    out = np.where(rng.random(6000) < 0.5, 2, 1002)
    sc = scorer([100] * 6000, out.tolist())
    inst = decode_inst(100_000)
    bound = sc.max_rate("decode", inst)

    def backlog(rate: float) -> float:  # mean wait for KV over the last 10% of requests
        r = sc.reqs.scaled(rate)
        res = run_decode([inst], r, r.arrival, np.zeros(len(r)), SimResult.empty(r))
        return float(np.mean((res.decode_admit - r.arrival)[-600:]))

    assert backlog(0.9 * bound) < 1.0
    assert backlog(1.2 * bound) > 30.0  # overloaded: the queue grows through the run


def test_prefill_bound_packs_whole_prompts_fcfs():
    # 1100- and 1000-token prompts, alternating: no two fit a 2048-token batch, so every batch holds one
    sc = scorer([1100, 1000] * 50, [10] * 100)
    a, b = 0.05, 1e-4
    inst = InstanceModel(MODEL, 1, 1, PhaseModel((a, b, 0.0), (STEP, 0, 0), (STEP, 0, 0), 1 << 30), 80)
    assert sc.max_rate("prefill", inst) == pytest.approx(2 / (2 * a + b * 2100))  # 6.45 req/s
    # (2048 / 1050 = 1.95 prompts per full batch would claim 1.95 / (a + b * 2048) = 7.65 req/s)
    # pairs that fit are batched together: 600 + 1000 + 400 = 2000 tokens in one batch of 3
    sc = scorer([600, 1000, 400] * 30, [10] * 90)
    assert sc.max_rate("prefill", inst) == pytest.approx(3 / (a + b * 2000))
