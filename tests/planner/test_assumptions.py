"""--assumptions: the planner under DistServe's simulator's assumptions lands on DistServe's own anchors,
and each switch parses, names itself and changes what it says it changes."""

import numpy as np
import pytest

from planner.__main__ import build_parser, spec_from_args
from planner.assumptions import DISTSERVE, JAXSERVE, SWITCHES, parse, slo_score
from planner.errors import PlannerError
from planner.plan import make_plan

BASE = ["--profile", "configs/profiles/a100_80g.json", "--no-progress"]


def test_parse_and_names():
    assert parse("jaxserve") == JAXSERVE and parse("distserve") == DISTSERVE
    back = parse("distserve+kv_capacity,joint_slo")
    assert back.kv_capacity and back.joint_slo and not back.kv_transfer and back.name == "distserve+joint_slo,kv_capacity"
    assert parse(back.name) == back and DISTSERVE.name == "distserve" and JAXSERVE.name == "jaxserve"
    for bad in ("vllm", "distserve+nope", "jaxserve+pairs"):
        with pytest.raises(ValueError, match="--assumptions"):
            parse(bad)
    with pytest.raises(PlannerError, match="unknown switch 'nope'"):
        spec_from_args(build_parser().parse_args([*BASE, "--model", "opt-13b", "--ttft", "1", "--tpot", "1",
                                                  "--assumptions", "distserve+nope"]))
    assert set(DISTSERVE.describe()) == set(SWITCHES)


def test_slo_score_joint_share_or_separate_p90s():
    ttft = np.array([0.1] * 7 + [0.9, 0.9, 0.9])  # P90 0.9
    tpot = np.array([0.9] + [0.01] * 9)  # P90 ~0.1
    assert slo_score(ttft, tpot, 0.5, 0.05, 0.9, JAXSERVE) == pytest.approx(0.6)  # both met by 6 of 10
    assert slo_score(ttft, tpot, 0.5, 0.5, 0.9, DISTSERVE) == 0.0  # P90 TTFT 0.9 >= 0.5
    assert slo_score(ttft, tpot, 1.0, 0.5, 0.9, DISTSERVE) == 1.0  # each P90 under its SLO
    assert slo_score(ttft, tpot, 1.0, 0.5, 0.9, JAXSERVE) == pytest.approx(0.9)


def test_distserve_switches_change_what_they_name():
    """Under DistServe's assumptions every disaggregated candidate is one prefill + one decode instance
    and the plan records its assumptions; putting our KV capacity back changes the 13B chatbot score
    (the 50,000-token step cap binds) while putting our transfer time back does not (docs/planner.md)."""
    def plan(a):
        return make_plan(spec_from_args(build_parser().parse_args([
            *BASE, "--model", "opt-13b", "--ttft", "0.25", "--tpot", "0.1", "--gpus-per-node", "4",
            "--workload", "sharegpt-anchor", "--requests", "200", "--assumptions", a])))

    ds = plan("distserve")
    assert ds["assumptions"] == "distserve" and all(r["n_p"] == r["n_d"] == 1 for r in ds["ranking"])
    best = ds["ranking"][0]["per_device_goodput"]
    assert plan("distserve+kv_transfer")["ranking"][0]["per_device_goodput"] == pytest.approx(best, rel=0.02)
    assert plan("distserve+kv_capacity")["ranking"][0]["per_device_goodput"] > 1.1 * best
