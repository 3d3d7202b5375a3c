"""Shared SLO definitions, and the simulator against closed-form queueing (DistServe §3.1)."""

import math

import numpy as np
import pytest

from jaxserve import slo
from jaxserve.config import model_preset
from planner.latency import InstanceModel, PhaseModel
from planner.queueing import crossover_rate, md1_ttft, pp2_ttft, tp2_ttft
from planner.simulator import run_prefill
from planner.workload import workload

D = 0.1
ZERO = (0.0, 0.0, 0.0)
MODEL = model_preset("opt-13b", dtype="float16")


def const_instance(d: float, pp: int = 1) -> InstanceModel:
    """One request takes d seconds end to end at any pp (a lone prompt is one micro-batch)."""
    return InstanceModel(MODEL, 1, pp, PhaseModel((d, 0.0, 0.0), ZERO, ZERO, 1), 80, stage_link_bw=math.inf)


def mean_ttft(inst: InstanceModel, rate: float, n: int = 40000, seed: int = 1) -> float:
    reqs = workload("fixed:512:2").sample(n, rate, seed=seed)
    return float(run_prefill([inst], reqs, max_batch=1).ttft().mean())


def test_tpot_and_attainment_definitions():
    ttft = np.array([0.1, 0.5, 0.2, 0.3])
    lat = np.array([1.1, 0.9, 0.2, 10.3])
    out = np.array([11, 5, 1, 2])
    np.testing.assert_allclose(slo.tpot(ttft, lat, out), [0.1, 0.1, 0.0, 10.0])
    assert slo.attainment(ttft, lat, out, ttft_slo=0.3, tpot_slo=0.1) == 0.5  # rows 0 and 2


def test_goodput_bisection_finds_threshold_expands_and_reports_infeasible():
    def step(rate):
        return 1.0 if rate <= 7.3 else 0.0
    assert slo.goodput_by_bisection(step, 0.9, 1.0, 2.0, rel_tol=1e-3) == pytest.approx(7.3, rel=2e-3)
    assert slo.goodput_by_bisection(step, 0.9, 20.0, 40.0, rel_tol=1e-3) == pytest.approx(7.3, rel=2e-3)
    assert slo.goodput_by_bisection(lambda r: 0.5, 0.9, 1.0, 2.0) == 0.0
    assert slo.per_device_goodput(8.0, 4) == 2.0


@pytest.mark.parametrize("util", [0.1, 0.3, 0.5, 0.7, 0.8])
def test_md1_mean_ttft_within_3_percent(util):
    rate = util / D
    assert mean_ttft(const_instance(D), rate) == pytest.approx(md1_ttft(rate, D), rel=0.03)


def test_crossover_closed_form_equates_both_curves():
    for k in (1.2, 1.5, 1.8):
        r = crossover_rate(D, k)
        assert r is not None and 0 < r * D / k < 1
        assert pp2_ttft(r, D) == pytest.approx(tp2_ttft(r, D, k), rel=1e-9)
    assert crossover_rate(D, 2.0) is None and crossover_rate(D, 1.0) is None


@pytest.mark.parametrize("k", [1.3, 1.6])
def test_pp2_of_lone_prompts_is_md1_not_the_papers_pipeline(k):
    """jaxserve never overlaps consecutive steps (a step ends with its sampled tokens) and a lone prompt
    is one micro-batch, so a PP=2 prefill of one-prompt batches is an M/D/1 server of D: TP=2 (any
    K > 1) has the lower TTFT at every rate, and the paper's pipeline (``pp2_ttft``, a new request
    every D/2) is what it would take to beat TP=2 above the crossover."""
    pp, tp = const_instance(D, pp=2), const_instance(D / k)
    for util in (0.3, 0.6, 0.8):
        rate = util / D
        sim_pp, sim_tp = mean_ttft(pp, rate), mean_ttft(tp, rate)
        assert sim_pp == pytest.approx(md1_ttft(rate, D), rel=0.03)
        assert sim_tp == pytest.approx(tp2_ttft(rate, D, k), rel=0.03)
        assert sim_tp < sim_pp
    r = 1.15 * crossover_rate(D, k)
    assert pp2_ttft(r, D) < tp2_ttft(r, D, k) < md1_ttft(r, D)
