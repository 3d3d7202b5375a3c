"""Simulator mechanics against hand-computed timelines and invariants."""

import numpy as np
import pytest

from jaxserve.config import model_preset
from planner.colocated import run_colocated
from planner.latency import InstanceModel, PhaseModel
from planner.simulator import SimResult, kv_need, run_decode, run_disaggregated, run_prefill
from planner.workload import Requests, workload

MODEL = model_preset("opt-13b", dtype="float16")
PRE = (0.02, 1e-4, 1e-8)
DEC = (0.01, 1e-6, 1e-3)


def inst(pp: int = 1, mem: float = 80, dec=DEC) -> InstanceModel:
    return InstanceModel(MODEL, 1, pp, PhaseModel(PRE, dec, dec, 1 << 30), mem, stage_link_bw=np.inf)


def reqs(arrival, prompt, output) -> Requests:
    return Requests(np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))


def decode_time(p: int, o: int, dec=DEC) -> float:
    a, b, c = dec
    return sum(a + b * (p + 1 + j) + c for j in range(o - 1))


def test_single_request_timeline_disaggregated():
    r = reqs([1.0], [300], [50])
    res = run_disaggregated([inst()], [inst()], r, kv_link_bw=1e9)
    pre = PRE[0] + PRE[1] * 300 + PRE[2] * 300**2
    xfer = 300 * MODEL.kv_bytes_per_token(2) / 1e9
    assert res.ttft()[0] == pytest.approx(pre)
    assert res.finish[0] == pytest.approx(1.0 + pre + xfer + decode_time(300, 50))
    stages = res.breakdown()
    assert sum(v[0] for v in stages.values()) == pytest.approx(res.latency()[0])
    assert stages["transfer"][0] == pytest.approx(xfer)


def test_decode_batch_matches_step_by_step_and_respects_kv_capacity():
    # three requests arrive together; capacity fits two at a time
    cap_inst = inst(mem=80)
    cap = kv_need(500, 100) * 2 + 8
    r = reqs([0.0, 0.0, 0.0], [500, 500, 500], [100, 40, 100])
    out = SimResult.empty(r)
    out.prefill_end[:] = 0.0

    class Capped(InstanceModel):
        def kv_capacity_tokens(self) -> int:
            return cap
    capped = Capped(**{f: getattr(cap_inst, f) for f in ("model", "tp", "pp", "phase", "memory_gib", "stage_link_bw")})
    run_decode([capped], r, np.zeros(3), np.zeros(3), out)
    # two run together; the third waits for the short one (40 tokens) to finish
    a, b, c = DEC
    both = sum(a + b * 2 * (501 + j) + 2 * c for j in range(39))
    assert out.finish[1] == pytest.approx(both)
    assert out.decode_admit[2] == pytest.approx(both)
    assert out.finish[2] > out.finish[0]


def test_prefill_batches_respect_token_budget_and_pp_overlaps_micro_batches_within_a_step():
    r = reqs(np.zeros(8), np.full(8, 600), np.full(8, 2))
    res = run_prefill([inst()], r, token_budget=2048)
    starts, counts = np.unique(res.prefill_start, return_counts=True)
    assert counts.tolist() == [3, 3, 2]  # 3 x 600 <= 2048 < 4 x 600
    one = PRE[0] + PRE[1] * 1800 + PRE[2] * 3 * 600**2
    assert starts[1] == pytest.approx(one)
    piped = run_prefill([inst(pp=2)], r, token_budget=2048)
    # pp=2 cuts the 3 prompts into micro-batches of 2 and 1 (1200 and 600 tokens); each stage runs half
    # of a micro-batch's pp=1 time; stage 0 of the second overlaps stage 1 of the first
    x0 = (PRE[0] + PRE[1] * 1200 + PRE[2] * 2 * 600**2) / 2
    x1 = (PRE[0] + PRE[1] * 600 + PRE[2] * 600**2) / 2
    step = max(x0 + x1, 2 * x0) + x1
    assert piped.prefill_end[0] == pytest.approx(step) and step < one
    # the next batch starts when this step has ended: consecutive steps do not overlap
    assert np.unique(piped.prefill_start)[1] == pytest.approx(step)


def test_more_prefill_replicas_cut_queueing():
    r = workload("sharegpt").sample(600, 12.0, seed=3)
    one = run_prefill([inst()], r).ttft().mean()
    two = run_prefill([inst(), inst()], r).ttft().mean()
    assert two < 0.5 * one


def test_colocated_prefill_first_and_chunked_single_request():
    r = reqs([0.0], [1024], [10])
    res = run_colocated([inst()], r)
    pre = PRE[0] + PRE[1] * 1024 + PRE[2] * 1024**2
    assert res.ttft()[0] == pytest.approx(pre)
    assert res.finish[0] == pytest.approx(pre + decode_time(1024, 10))
    ch = run_colocated([inst()], r, chunk=512)
    two_chunks = (PRE[0] + PRE[1] * 512 + PRE[2] * 512 * 512) + (PRE[0] + PRE[1] * 512 + PRE[2] * 512 * 1024)
    assert ch.ttft()[0] == pytest.approx(two_chunks)


def test_colocated_prefill_pauses_decoding():
    # a long decode is interrupted by a later prompt's prefill: its TPOT rises over the idle case
    alone = run_colocated([inst()], reqs([0.0], [100], [200]))
    mixed = run_colocated([inst()], reqs([0.0, 0.5], [100, 1800], [200, 2]))
    assert mixed.finish[0] > alone.finish[0] + 0.9 * (PRE[0] + PRE[1] * 1800)


def test_unservable_request_is_an_slo_miss_not_a_crash():
    tiny = inst(mem=14)  # 13B weights fill the device: no room for a 2048-token request
    r = reqs([0.0], [1500], [500])
    res = run_disaggregated([inst()], [tiny], r, kv_link_bw=1e9)
    assert np.isinf(res.finish[0]) and res.attainment(10.0, 10.0) == 0.0
