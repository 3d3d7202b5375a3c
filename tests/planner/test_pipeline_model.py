"""The planner's pp model is the engine's schedule: micro-batches of a packed prefill call overlap
across stages (``jaxserve.microbatch``); decode steps, continuations and consecutive steps do not."""

import numpy as np
import pytest

from jaxserve.config import model_preset
from jaxserve.microbatch import split_runs, wavefront
from planner.colocated import run_colocated
from planner.latency import EngineCosts, InstanceModel, PhaseModel
from planner.simulator import SimResult, run_decode
from planner.workload import Requests

MODEL = model_preset("opt-13b", dtype="float16")
PRE = (0.02, 1e-4, 1e-8)
PACKED = (0.01, 2e-4, 3e-8)
DEC = (0.01, 1e-6, 1e-3)
BW = 100e9  # bytes/s between stages: a hop of T tokens takes T * 5120 * 2 / BW
COSTS = EngineCosts(padded=True, step_s=0.004, call_s=0.002, seq_s=0.0005)


NO_COSTS = EngineCosts()


def inst(pp: int, costs: EngineCosts = NO_COSTS, microbatches: int | None = None, **kw) -> InstanceModel:
    phase = PhaseModel(PRE, DEC, DEC, 1 << 30, prefill_packed=PACKED)
    return InstanceModel(MODEL, 1, pp, phase, 80, stage_link_bw=BW, costs=costs, microbatches=microbatches, **kw)


def hop(tokens: float) -> float:
    return tokens * MODEL.hidden_size * 2 / BW


def prefill(lens: list[int]) -> float:
    a, b, c = PRE
    return a + b * sum(lens) + c * sum(x * x for x in lens)


def test_split_runs_keeps_order_and_balances_tokens():
    assert split_runs([10, 10, 10, 10], 2) == [range(0, 2), range(2, 4)]
    assert split_runs([10, 10, 10, 10], 9) == [range(i, i + 1) for i in range(4)]
    assert split_runs([30, 1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 4)]
    assert split_runs([1, 1, 1, 30], 2) == [range(0, 3), range(3, 4)]
    assert split_runs([600, 600, 600], 2) == [range(0, 2), range(2, 3)]
    with pytest.raises(ValueError):
        split_runs([1], 0)


def test_wavefront_is_the_pipeline_schedule():
    # 3 equal micro-batches over 2 stages: (3 + 2 - 1) stage times
    spans = wavefront([[1.0, 1.0]] * 3)
    assert spans == [[(0, 1), (1, 2)], [(1, 2), (2, 3)], [(2, 3), (3, 4)]]
    # a slow second stage holds the next micro-batch back on that stage, not on the first
    spans = wavefront([[1.0, 3.0], [1.0, 3.0]])
    assert spans == [[(0, 1), (1, 4)], [(1, 2), (4, 7)]]
    with pytest.raises(ValueError):
        wavefront([[1.0, 1.0], [1.0]])


def test_pp2_prefill_step_is_the_wavefront_of_the_runners_micro_batches():
    lens = [300, 100, 200, 200]  # two micro-batches of two prompts, 400 tokens each
    x0, x1 = prefill([300, 100]) / 2, prefill([200, 200]) / 2  # a stage runs half of the layers
    # stage 1 receives each micro-batch's activations, then runs it; it starts micro-batch 1 when done with 0
    want = max(x0 + x1, x0 + x0 + hop(400)) + hop(400) + x1
    assert wavefront([[x0, x0 + hop(400)], [x1, x1 + hop(400)]])[-1][-1][1] == pytest.approx(want)
    assert inst(2).prefill_step_time(lens) == pytest.approx(want)
    # the overlap pays here (1.5 fixed costs a, 0.75 of the per-token work): ~10% under one call through both stages
    assert inst(2).prefill_step_time(lens) < 0.9 * inst(2).prefill_call_time(800, sum(x * x for x in lens), 4)
    # one micro-batch (a lone prompt, or microbatches=1): the stages one after another
    assert inst(2).prefill_step_time([800]) == pytest.approx(prefill([800]) + hop(800))
    assert inst(2, microbatches=1).prefill_step_time(lens) == pytest.approx(prefill(lens) + hop(800))
    assert inst(1).prefill_step_time(lens) == pytest.approx(prefill(lens))


def test_pp2_padded_prefill_pays_each_micro_batch_call():
    k = COSTS
    lens = [130, 20, 100, 50]
    assert split_runs(lens, 2) == [range(0, 2), range(2, 4)]  # 150 tokens each, padded to 256
    a, b, c = PACKED
    x = (a + b * 256 + c * 256**2) / 2
    # three stage times (the second stage's two and the first's one before them), two hops of 256
    # tokens, a call per micro-batch, the per-sequence and per-step costs once
    step = 3 * x + 2 * hop(256) + 2 * k.call_s + 4 * k.seq_s + k.step_s
    assert inst(2, k).prefill_step_time(lens) == pytest.approx(step)
    assert inst(1, k).prefill_step_time(lens) == pytest.approx(inst(1, k).prefill_call_time(300, 0, 4))


def test_pp_decode_is_one_batch_over_all_the_kv_with_hops():
    # three requests of 1008 KV tokens each (prompt + output in 16-token blocks) fill 3072 tokens of KV:
    # all three run in one batch (pp lanes of 1/pp of the KV would hold one each and keep one waiting)
    r = Requests(np.zeros(3), np.array([1000] * 3), np.array([8] * 3))
    res = run_decode([inst(2, kv_tokens=3 * 1024)], r, np.zeros(3), np.zeros(3), SimResult.empty(r))
    a, b, c = DEC
    step = [a + b * 3 * (1001 + j) + 3 * (c + hop(1)) for j in range(7)]
    assert res.decode_start.tolist() == [0.0] * 3
    assert res.finish.tolist() == pytest.approx([sum(step)] * 3)


def test_pp2_colocated_lone_prompt_runs_the_stages_in_turn():
    r = Requests(np.zeros(1), np.array([1024]), np.array([3]))
    res = run_colocated([inst(2)], r)
    assert res.ttft()[0] == pytest.approx(prefill([1024]) + hop(1024))
