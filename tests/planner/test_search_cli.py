"""Placement search outcomes, the plan JSON, the CLI's error handling, and the replanning hook."""

import json

import numpy as np
import pytest

from jaxserve.config import DeploymentConfig
from planner.__main__ import build_parser, main, spec_from_args
from planner.plan import make_plan
from planner.replan import WorkloadProfiler

BASE = ["--profile", "configs/profiles/a100_80g.json", "--no-progress"]


def plan_for(*extra: str) -> dict:
    return make_plan(spec_from_args(build_parser().parse_args([*BASE, *extra])))


@pytest.fixture(scope="module")
def plan13():
    return plan_for("--model", "opt-13b", "--workload", "sharegpt", "--ttft", "0.25", "--tpot", "0.1",
                    "--nodes", "1", "--gpus-per-node", "8")


def test_opt13b_chatbot_prefers_wider_prefill_and_beats_colocated(plan13):
    assert plan13["feasible"]
    pre, dec = plan13["instances"]
    assert (pre["role"], dec["role"]) == ("prefill", "decode")
    assert pre["tp"] > dec["tp"]
    assert plan13["per_device_goodput"] > 1.1 * plan13["colocated_per_device_goodput"]
    assert plan13["predicted_attainment"] >= 0.9
    assert plan13["devices"] == sum(x["tp"] * x["pp"] * x["replicas"] for x in plan13["instances"]) <= 8


def test_the_plan_is_the_mode_with_the_most_goodput(plan13):
    """Every mode is scored end to end under the same joint SLO; the plan says why it won. Tight
    chatbot SLOs on OPT-13B: disaggregated. Loose SLOs, short prompts and long outputs on two GPUs:
    colocated (or chunked); one GPU: only colocated can run (it used to be "infeasible")."""
    assert plan13["mode"] == "disaggregated"
    alts = plan13["alternatives"]
    assert {a["mode"] for a in alts} == {"colocated", "chunked"}
    assert all(a["per_device_goodput"] <= plan13["per_device_goodput"] for a in alts)
    assert alts[0]["mode"] in plan13["why"] and "disaggregated" in plan13["why"]
    loose = plan_for("--model", "opt-13b", "--workload", "fixed:32:512", "--ttft", "5", "--tpot", "0.2",
                     "--gpus-per-node", "2", "--requests", "400")
    assert loose["mode"] in ("colocated", "chunked") and loose["feasible"]
    (inst,) = loose["instances"]
    assert inst["role"] == "colocated" and inst["mode"] == loose["mode"]
    assert inst["replicas"] * inst["tp"] * inst["pp"] == loose["devices"] <= 2
    dis = next(a for a in loose["alternatives"] if a["mode"] == "disaggregated")
    assert loose["per_device_goodput"] > 1.2 * dis["per_device_goodput"]
    dep = DeploymentConfig.from_dict(loose)  # what the launcher reads
    assert {i.engine_config().mode for i in dep.instances} == {loose["mode"]}
    one = plan_for("--model", "opt-13b", "--workload", "humaneval", "--ttft", "5", "--tpot", "0.2",
                   "--gpus-per-node", "1", "--requests", "300")
    assert one["feasible"] and one["mode"] in ("colocated", "chunked") and one["devices"] == 1


def test_plot_of_a_colocated_plan(tmp_path):
    out = tmp_path / "c.png"
    assert main([*BASE, "--model", "opt-13b", "--workload", "humaneval", "--ttft", "5", "--tpot", "0.2",
                 "--gpus-per-node", "1", "--requests", "200", "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_plan_json_schema_and_placement(plan13):
    for key in ("instances", "per_device_goodput", "colocated_per_device_goodput", "devices", "slo",
                "workload", "predicted_attainment"):
        assert key in plan13
    used = set()
    for x in plan13["instances"]:
        assert len(x["placement"]) == len(x["nodes"]) == x["replicas"]
        for rep in x["placement"]:
            assert len(rep) == x["pp"]
            for st in rep:
                assert len(st["gpus"]) == x["tp"]
                used.update((st["node"], g) for g in st["gpus"])
    assert len(used) == plan13["devices"]  # no device given twice
    json.dumps(plan13)


def test_low_affinity_keeps_kv_inside_nodes():
    plan = plan_for("--model", "opt-66b", "--workload", "humaneval", "--ttft", "0.5", "--tpot", "0.2",
                    "--nodes", "2", "--gpus-per-node", "8", "--affinity", "low", "--requests", "300")
    assert plan["feasible"]
    pre, dec = plan["instances"]
    inter = plan["inter"]
    seg_p, seg_d = pre["pp"] // inter, dec["pp"] // inter
    # the stages holding layer segment i of prefill and decode sit on the same node
    for i in range(inter):
        assert {r[i * seg_p]["node"] for r in pre["placement"]} == {r[i * seg_d]["node"] for r in dec["placement"]}


def test_target_rate_sizes_replicas():
    plan = plan_for("--model", "opt-13b", "--workload", "humaneval", "--ttft", "0.25", "--tpot", "0.1",
                    "--nodes", "2", "--gpus-per-node", "8", "--rate", "20", "--requests", "300")
    assert plan["feasible"] and plan["rate"] == 20
    for x in plan["instances"]:
        assert x["replicas"] * x["rate_per_instance"] >= 20


@pytest.mark.parametrize("args, needle, code", [
    (["--model", "opt-7b", "--ttft", "1", "--tpot", "0.1"], "opt-7b", 2),
    (["--model", "opt-30b", "--ttft", "1", "--tpot", "0.1"], "opt-30b", 2),
    (["--model", "opt-13b", "--ttft", "-1", "--tpot", "0.1"], "ttft", 2),
    (["--model", "opt-13b", "--ttft", "0.001", "--tpot", "0.1", "--requests", "200"], "no feasible plan", 1),
])
def test_cli_bad_input_one_line_nonzero(capsys, args, needle, code):
    assert main([*BASE, *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_cli_malformed_trace_and_writes_plan(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_time,prompt_len\n0,5\n")
    assert main([*BASE, "--model", "opt-13b", "--ttft", "1", "--tpot", "0.1", "--workload", str(bad)]) == 2
    assert "missing columns ['output_len']" in capsys.readouterr().err
    out = tmp_path / "plan.json"
    assert main([*BASE, "--model", "opt-13b", "--ttft", "0.001", "--tpot", "0.1", "--requests", "200",
                 "--out", str(out)]) == 1
    assert json.loads(out.read_text())["feasible"] is False


def test_workload_profiler_tracks_rate_and_lengths():
    prof = WorkloadProfiler(window_s=100.0)
    rng = np.random.default_rng(0)
    t = 0.0
    for _ in range(3000):
        t += rng.exponential(1 / 4.0)
        prof.observe(t, int(rng.integers(100, 200)), 50)
    assert prof.rate() == pytest.approx(4.0, rel=0.1)
    assert prof.recent[0][0] >= t - 100.0
    counts, edges = prof.histograms()["prompt_len"]
    assert counts.sum() == len(prof.recent) and edges[0] >= 100
    r = prof.to_workload().sample(500, 2.0)
    assert r.prompt_len.min() >= 100 and (r.output_len == 50).all()
