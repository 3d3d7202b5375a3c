"""Engine costs in the simulator: jaxserve's padded shapes, host costs per step/call/sequence, KV hand-off."""

import dataclasses
import json

import numpy as np
import pytest

from jaxserve.config import model_preset
from planner.colocated import run_colocated
from planner.decode_batch import DecodeBatch
from planner.fit import Fit, fit_packed_prefill, write_profile
from planner.latency import DISAGG_ENGINE, EngineCosts, InstanceModel, PhaseModel, load_profile, pow2_bucket
from planner.simulator import run_disaggregated
from planner.workload import Requests

MODEL = model_preset("opt-125m")
PRE = (0.02, 1e-4, 1e-8)
PACKED = (0.01, 2e-4, 3e-8)
DEC = (0.01, 1e-6, 1e-3)
TABLE = ((1, 0.03, 1e-4, 0.0), (4, 0.05, 2e-4, 1e-5), (8, 0.07, 4e-4, 2e-5))
COSTS = EngineCosts(padded=True, step_s=0.004, call_s=0.002, seq_s=0.0005, kv_export=(0.001, 1e-5),
                    kv_import=(0.002, 2e-5))


def inst(costs: EngineCosts = COSTS, table=None) -> InstanceModel:
    phase = PhaseModel(PRE, DEC, DEC, 1 << 30, prefill_packed=PACKED, decode_padded=table)
    return InstanceModel(MODEL, 1, 1, phase, 80, stage_link_bw=np.inf, kv_tokens=1 << 20, costs=costs)


def reqs(arrival, prompt, output) -> Requests:
    return Requests(np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))


def packed(t: int) -> float:
    a, b, c = PACKED
    return a + b * t + c * t * t


def padded_step(contexts: list[int], k: EngineCosts = COSTS) -> float:
    """No table: a + c*rows + b*sum(contexts), c paid for every padded row."""
    rows = pow2_bucket(len(contexts))
    a, b, c = DEC
    return a + k.step_s + k.call_s + b * sum(contexts) + c * rows + k.seq_s * len(contexts)


def table_step(contexts: list[int], k: EngineCosts = COSTS) -> float:
    """With the profiled table: a + p*M + q*S of the padded row count (interpolated between rows)."""
    rows = pow2_bucket(len(contexts))
    pts = {r: (a, p, q) for r, a, p, q in TABLE}
    if rows not in pts:  # 2 rows: a third of the way from 1 to 4
        pts[2] = tuple(x + (y - x) / 3 for x, y in zip(pts[1], pts[4], strict=True))
    a, p, q = pts[rows]
    return a + k.step_s + k.call_s + p * max(contexts) + q * sum(contexts) + k.seq_s * len(contexts)


def test_pow2_bucket():
    assert [pow2_bucket(n) for n in (1, 2, 3, 5, 32)] == [1, 2, 4, 8, 32]
    assert pow2_bucket(3, 16) == 16 and pow2_bucket(130, 16) == 256


@pytest.mark.parametrize("table, step", [(None, padded_step), (TABLE, table_step)])
def test_padded_decode_batch_matches_step_by_step(table, step):
    m = inst(table=table)
    batch = m.decode_batch()
    ctx = {0: 100, 1: 300, 2: 50}
    left = {0: 5, 1: 3, 2: 9}
    for rid in ctx:
        batch.admit(rid, ctx[rid], left[rid])
    expect, total = [], 0.0
    live = dict(ctx)
    for k in range(9):
        total += step(list(live.values()))
        live = {r: c + 1 for r, c in live.items() if left[r] > k + 1}
        expect.append(total)
    got = 0.0
    finishes = {}
    while batch.B:
        dt, done = batch.advance(batch.steps_to_next_finish())
        got += dt
        for rid in done:
            finishes[rid] = got
    assert finishes[1] == pytest.approx(expect[2])  # the longest context leaves: M drops to the next one
    assert finishes[0] == pytest.approx(expect[4])  # 4 -> 2 -> 1 padded rows on the way
    assert finishes[2] == pytest.approx(expect[8])
    # an unpadded batch (the planner's default) pays every step at the real batch and sum of contexts
    plain = DecodeBatch(inst(EngineCosts()).decode_lane_coeffs)
    plain.admit(0, 100, 2)
    plain.admit(1, 300, 2)
    a, b, c = DEC
    assert plain.time_of(2) == pytest.approx(2 * (a + 2 * c) + b * (400 + 402))


def test_in_situ_factors_scale_model_time_not_the_round_trip():
    k = dataclasses.replace(COSTS, prefill_factor=1.5, decode_factor=2.0)
    m = inst(k, TABLE)
    assert m.prefill_call_time(100, 100**2, 1) == pytest.approx(
        1.5 * (packed(128) + COSTS.call_s + COSTS.seq_s) + COSTS.step_s)
    a, p, q = TABLE[0][1:]
    assert m.padded_decode_coeffs(1) == pytest.approx((2.0 * (a + COSTS.call_s) + COSTS.step_s, 2 * p, 2 * q))
    assert k.export_time(100) == pytest.approx(1.5 * COSTS.export_time(100))
    assert k.import_time(100) == pytest.approx(2.0 * COSTS.import_time(100))


def test_prefill_uses_the_padded_packed_call_and_host_costs():
    m = inst()
    # 130 + 20 tokens pad to one 256-token packed call; two prompts
    assert m.prefill_call_time(150, 130**2 + 20**2, 2) == pytest.approx(
        packed(256) + COSTS.step_s + COSTS.call_s + 2 * COSTS.seq_s)
    plain = inst(EngineCosts())
    assert plain.prefill_call_time(150, 130**2 + 20**2, 2) == pytest.approx(
        PRE[0] + PRE[1] * 150 + PRE[2] * (130**2 + 20**2))


def test_disaggregated_single_request_pays_export_and_import():
    r = reqs([1.0], [100], [4])
    res = run_disaggregated([inst()], [inst()], r, kv_link_bw=np.inf)
    ttft = packed(128) + COSTS.step_s + COSTS.call_s + COSTS.seq_s + COSTS.export_time(100)
    assert res.ttft()[0] == pytest.approx(ttft)
    imp = COSTS.import_time(100)
    assert res.breakdown()["transfer"][0] == pytest.approx(imp)
    decode = sum(padded_step([101 + j]) for j in range(3))
    assert res.finish[0] == pytest.approx(1.0 + ttft + imp + decode)


def test_chunked_padded_single_request_splits_into_packed_and_continuation_calls():
    r = reqs([0.0], [300], [3])
    res = run_colocated([inst()], r, chunk=256)
    a, b, c = PACKED
    first = packed(256) + COSTS.step_s + COSTS.call_s + COSTS.seq_s
    # 44 tokens after 256 cached: a [1, 64] call over 32 blocks (300 tokens -> 19 blocks -> 32) of keys
    cont = a + b * 64 + c * 64 * 32 * 16 + COSTS.step_s + COSTS.call_s + COSTS.seq_s
    assert res.ttft()[0] == pytest.approx(first + cont)
    assert res.finish[0] == pytest.approx(first + cont + padded_step([301]) + padded_step([302]))


def test_packed_fit_and_engine_costs_round_trip_through_the_profile(tmp_path):
    t = np.array([16, 32, 64, 128, 256, 512, 1024], float)
    ms = 3.0 + 0.05 * t + 2e-5 * t * t
    fit = fit_packed_prefill(list(zip(t.tolist(), ms.tolist(), strict=True)))
    assert np.allclose(fit.coeffs, (3.0, 0.05, 2e-5), rtol=1e-6)
    f = Fit((1.0, 0.1, 0.01), 0.0, 0.0, 5)
    out = tmp_path / "p.json"
    write_profile(out, engine=DISAGG_ENGINE, model="opt-125m", tp=1, prefill=f,
                  decode={"decode_small": f, "decode_large": f, "small_batch_threshold": 95})
    doc = json.loads(out.read_text())
    entry = doc["engines"][DISAGG_ENGINE]["opt-125m"]["tp1"]
    entry["prefill_packed"] = list(fit.coeffs)
    entry["engine_costs"] = {"call_ms": 2.0, "seq_ms": 0.5, "kv_export_ms": [1.0, 0.01], "kv_import_ms": [2.0, 0.02]}
    entry["decode_padded"] = [[4, 50.0, 0.2, 0.01], [1, 30.0, 0.1, 0.0]]
    out.write_text(json.dumps(doc))
    ph = load_profile(out).phase(DISAGG_ENGINE, "opt-125m", 1)
    assert ph.decode_padded == ((1, 0.03, 1e-4, 0.0), (4, 0.05, 2e-4, 1e-5))
    assert ph.padded_decode(8) == pytest.approx((0.05 + 4 / 3 * 0.02, 2e-4 + 4 / 3 * 1e-4, 1e-5 + 4 / 3 * 1e-5))
    assert ph.packed_time(256) == pytest.approx((3.0 + 0.05 * 256 + 2e-5 * 256**2) / 1e3)
    assert ph.engine_costs == EngineCosts(padded=True, call_s=0.002, seq_s=0.0005, kv_export=(0.001, 1e-5),
                                          kv_import=(0.002, 2e-5))
    assert dataclasses.replace(ph.engine_costs, step_s=0.01).import_time(100) == pytest.approx(0.004)
