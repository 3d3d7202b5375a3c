"""Profile loading, the analytic model, least-squares fits, and workloads/traces."""


import numpy as np
import pytest

from jaxserve.config import model_preset
from planner.errors import PlannerError
from planner.fit import fit_decode, fit_prefill, write_profile
from planner.hardware import HARDWARE_PRESETS, analytic_phase
from planner.latency import DISAGG_ENGINE, InstanceModel, load_profile
from planner.workload import load_trace, workload

PROFILE = "configs/profiles/a100_80g.json"


def test_profile_loads_published_coefficients_in_seconds():
    p = load_profile(PROFILE)
    assert p.tps(DISAGG_ENGINE, "opt-66b") == [2, 3, 4, 8]
    assert p.colocated_engine() == "vllm_colocated"
    ph = p.phase(DISAGG_ENGINE, "opt-13b", 1)
    assert ph.prefill[0] == pytest.approx(0.01810254647486372)
    # batch of 94 uses the small coefficients, 95 the large ones
    assert ph.decode_coeffs(94) == ph.decode_small and ph.decode_coeffs(95) == ph.decode_large
    with pytest.raises(PlannerError, match="no layout for model 'opt-30b'"):
        p.require_model(DISAGG_ENGINE, "opt-30b")


def test_bad_profile_json_is_a_planner_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"engines": {"e": {"opt-13b": {"tp1": {"prefill": [1, 2]}}}}}')
    with pytest.raises(PlannerError, match="'prefill' must be a list of 3 numbers"):
        load_profile(bad)
    bad.write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        load_profile(bad)


@pytest.mark.parametrize("field,coeffs,msg", [
    ("decode_small", [5.0, -0.01, 0.1], "decode model gives -?[0-9.]+ ms for a step of"),  # a negative slope
    ("decode_large", [float("nan"), 0.0, 0.1], "decode model gives nan ms"),
    ("prefill", [-50.0, 0.01, 0.0], "prefill model gives -?[0-9.]+ ms for one 1-token prompt"),
])
def test_profile_coefficients_giving_impossible_step_times_are_refused(tmp_path, field, coeffs, msg):
    import json

    entry = {"prefill": [10.0, 0.05, 1e-6], "decode_small": [5.0, 0.001, 0.1], "decode_large": [8.0, 0.001, 0.1],
             "small_batch_threshold": 95}
    entry[field] = coeffs
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"engines": {"e": {"opt-13b": {"tp1": entry}}}}))
    with pytest.raises(PlannerError, match=f"engines.e.opt-13b.tp1: the {msg}"):
        load_profile(bad)
    entry[field] = {"prefill": [10.0, 0.05, 1e-6]}.get(field, [5.0, 0.001, 0.1])
    bad.write_text(json.dumps({"engines": {"e": {"opt-13b": {"tp1": entry}}}}))
    assert load_profile(bad).phase("e", "opt-13b", 1) is not None


@pytest.mark.parametrize("tp", [2, 3, 4, 8])
def test_analytic_model_tracks_the_a100_profile_for_opt66b(tp):
    m = model_preset("opt-66b", dtype="float16")
    prof = load_profile(PROFILE).phase(DISAGG_ENGINE, "opt-66b", tp)
    ana = analytic_phase(m, tp, HARDWARE_PRESETS["a100-80g"])
    for pm, am in ((prof.prefill_time(2048, 4 * 512**2), ana.prefill_time(2048, 4 * 512**2)),
                   (prof.decode_time(32 * 800, 32), ana.decode_time(32 * 800, 32))):
        assert 1 / 1.6 < am / pm < 1.6


def test_memory_fit_opt66b_needs_two_a100s():
    p = load_profile(PROFILE)
    m = model_preset("opt-66b", dtype="float16")
    ph = p.phase(DISAGG_ENGINE, "opt-66b", 2)
    assert InstanceModel(m, 1, 1, ph, 80).kv_capacity_tokens() == 0
    assert InstanceModel(m, 2, 1, ph, 80).fits(2048)


def test_fits_recover_coefficients_and_write_a_loadable_profile(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = 20.0, 0.1, 7e-6
    pre = []
    for _ in range(60):
        ls = rng.integers(16, 1024, rng.integers(1, 6))
        pre.append((ls, (a + b * ls.sum() + c * (ls**2).sum()) * rng.normal(1, 0.01)))
    f = fit_prefill(pre)
    assert f.coeffs[1] == pytest.approx(b, rel=0.05) and f.max_rel_err < 0.05
    dec = []
    for _ in range(80):
        ctx = rng.integers(100, 2000, rng.integers(1, 200))
        small = len(ctx) < 95
        ca, cb, cc = (19.9, 6e-4, 0.04) if small else (7.2, 5.8e-4, 0.16)
        dec.append((ctx, ca + cb * ctx.sum() + cc * len(ctx)))
    d = fit_decode(dec, small_batch_threshold=95)
    np.testing.assert_allclose(d["decode_small"].coeffs, (19.9, 6e-4, 0.04), rtol=1e-6)
    np.testing.assert_allclose(d["decode_large"].coeffs, (7.2, 5.8e-4, 0.16), rtol=1e-6)
    out = tmp_path / "mine.json"
    write_profile(out, engine=DISAGG_ENGINE, model="opt-125m", tp=1, prefill=f, decode=d,
                  hardware={"name": "cpu", "memory_gib": 16})
    ph = load_profile(out).phase(DISAGG_ENGINE, "opt-125m", 1)
    assert ph.decode_large[2] == pytest.approx(0.16e-3)
    with pytest.raises(PlannerError, match="at least 3"):
        fit_prefill(pre[:2])


def test_length_mixes_match_their_documented_shapes():
    n = 20000
    chat = workload("chatbot").sample(n, 1.0, seed=0)
    assert 450 < chat.prompt_len.mean() < 700 and 150 < chat.output_len.mean() < 280
    code = workload("code").sample(n, 1.0, seed=0)
    assert 130 < code.prompt_len.mean() < 170 and 80 < code.output_len.mean() < 110
    summ = workload("summarization").sample(n, 1.0, seed=0)
    assert summ.prompt_len.min() >= 1900 and summ.output_len.max() <= 148
    for r in (chat, code, summ):
        assert (r.prompt_len + r.output_len).max() <= 2048 and r.output_len.min() >= 1


def test_arrival_processes_rate_and_burstiness():
    for cv in (1.0, 3.0):
        arr = workload("fixed:8:8", arrival="gamma", cv=cv).sample(40000, 5.0, seed=1).arrival
        gaps = np.diff(arr)
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_trace_replay_and_malformed_traces(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("arrival_time,prompt_len,output_len\n2.0,100,5\n0.0,50,3\n4.0,10,1\n")
    w = workload(str(csv_path))
    r = w.sample(10, None)
    np.testing.assert_array_equal(r.prompt_len, [50, 100, 10])
    np.testing.assert_allclose(w.sample(10, rate=1.0).arrival, [0, 1, 2])  # 2 gaps over 4 s -> rescaled
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"arrival_time": 0, "prompt_len": 5, "output_len": 2}\n{"arrival_time": 1, "prompt_len": 5}\n')
    with pytest.raises(PlannerError, match="line 2 has a bad or missing field"):
        load_trace(jl)
    csv_path.write_text("arrival_time,prompt_len,output_len\n0.0,-3,5\n")
    with pytest.raises(PlannerError, match="line 2"):
        load_trace(csv_path)
    with pytest.raises(PlannerError, match="unknown workload"):
        workload("sharegtp")
