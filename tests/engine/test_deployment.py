"""Deployment descriptions: YAML and planner plan JSON into validated records, and into instances."""

import json

import jax
import pytest

from jaxserve.config import ConfigError, DeploymentConfig
from jaxserve.engine.build import build_engine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Request, SamplingParams
from jaxserve.runtime.router import Router


def test_plan_json_is_read(tmp_path):
    plan = {"feasible": True, "per_device_goodput": 1.2, "devices": 3, "slo": {}, "workload": {},
            "instances": [{"role": "prefill", "tp": 2, "pp": 1, "replicas": 1, "nodes": [[0]]},
                          {"role": "decode", "tp": 1, "pp": 1, "replicas": 1, "nodes": [[0]]}]}
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    d = DeploymentConfig.load(p)
    assert [(i.role, i.tp) for i in d.instances] == [("prefill", 2), ("decode", 1)] and d.num_devices == 3
    p.write_text(json.dumps({"feasible": False, "reason": "TTFT 0.01 s cannot be met"}))
    with pytest.raises(ConfigError, match="not feasible"):
        DeploymentConfig.load(p)


@pytest.mark.parametrize("doc,msg", [
    ({"instances": []}, "non-empty list"),
    ({"instances": [{"role": "prefill"}]}, "needs prefill and decode"),
    ({"instances": [{"role": "colocated"}, {"role": "decode"}]}, "not both"),
    ({"instances": [{"role": "mystery"}]}, "role must be one of"),
    ({"instances": [{"role": "prefill", "tp": 0}, {"role": "decode"}]}, "tp must be a positive integer"),
    ({"instances": [{"role": "prefill", "devices": [0, 1]}, {"role": "decode"}]}, "2 device ids given"),
    ({"instance": []}, "unknown keys"),
    ({"instances": [{"role": "prefill", "replicas": 2, "nodes": [[0]]}, {"role": "decode"}]}, "nodes must list"),
    ({"instances": [{"role": "prefill", "nodes": [[-1]]}, {"role": "decode"}]}, "nodes must list"),
    ({"instances": [{"role": "prefill", "nodes": 3}, {"role": "decode"}]}, "nodes must be a list"),
])
def test_bad_deployments(doc, msg):
    with pytest.raises(ConfigError, match=msg):
        DeploymentConfig.from_dict(doc)


def test_explicit_device_ids(tiny, workload):
    _, _, cfg, params, _ = tiny
    prompts, _, refs = workload
    dep = DeploymentConfig.from_dict({"instances": [
        {"role": "prefill", "tp": 2, "devices": [6, 7]}, {"role": "decode", "devices": [3], "max_num_seqs": 4}]})
    eng = build_engine(cfg, params, dep, max_model_len=512)
    assert isinstance(eng, Router)
    assert [d.id for d in eng.prefills[0].inst.core.executor.devices] == [6, 7]
    assert [d.id for d in eng.decodes[0].inst.core.executor.devices] == [3]
    out = run_requests(eng, [Request("x", prompts[9], SamplingParams(max_tokens=5))])
    assert out[0].token_ids == refs[9][:5]
    with pytest.raises(ConfigError, match="overlap"):
        build_engine(cfg, params, DeploymentConfig.from_dict({"instances": [
            {"role": "prefill", "devices": [1]}, {"role": "decode", "devices": [1]}]}))
    assert len(jax.devices()) == 8


def test_plan_nodes_group_actors_into_placement_bundles():
    """A low-affinity plan: prefill and decode replicas that share a node land in one placement group."""
    from jaxserve.cluster.placement import plan_bundles

    d = DeploymentConfig.from_dict({"per_device_goodput": 1.0, "instances": [
        {"role": "decode", "tp": 2, "pp": 1, "replicas": 2, "nodes": [[0], [1]]},
        {"role": "prefill", "tp": 1, "pp": 2, "replicas": 2, "nodes": [[0, 0], [1, 1]]}]})
    assert [i.nodes for i in d.instances] == [((0,), (1,)), ((0, 0), (1, 1))]
    assert [(b.node, b.resources) for b in plan_bundles(d, gpus=False)] == [
        (0, {"CPU": 1.0}), (1, {"CPU": 1.0}), (0, {"CPU": 1.0}), (1, {"CPU": 1.0})]
    assert plan_bundles(d, gpus=True)[0].resources == {"CPU": 1.0, "GPU": 2.0}  # prefill first: tp*pp devices each
    assert plan_bundles(d, gpus=True)[2].resources == {"CPU": 1.0, "GPU": 2.0}
    flat = DeploymentConfig.from_dict({"instances": [{"role": "colocated", "replicas": 2}]})
    assert [(b.node, b.stages) for b in plan_bundles(flat, gpus=False)] == [(None, range(1))] * 2


def test_stages_spanning_plan_nodes_get_a_bundle_per_segment():
    """A replica whose stages sit on two plan nodes: one bundle per run of stages on one node, each
    holding its stages' devices; the runs keep the replica's order."""
    from jaxserve.cluster.placement import plan_bundles
    from jaxserve.cluster.stages import segments

    assert segments([0, 0, 1, 1, 0]) == [(0, range(0, 2)), (1, range(2, 4)), (0, range(4, 5))]
    d = DeploymentConfig.from_dict({"instances": [
        {"role": "prefill", "tp": 2, "pp": 3, "nodes": [[0, 1, 1]]},
        {"role": "decode", "tp": 1, "pp": 2, "replicas": 2, "nodes": [[0, 1], [1, 1]]}]})
    got = [(b.node, b.resources.get("GPU"), b.replica, b.stages) for b in plan_bundles(d, gpus=True)]
    assert got == [(0, 2.0, 0, range(0, 1)), (1, 4.0, 0, range(1, 3)),
                   (0, 1.0, 1, range(0, 1)), (1, 1.0, 1, range(1, 2)), (1, 2.0, 2, range(0, 2))]
    with pytest.raises(ConfigError, match="each of its 2 stage"):
        DeploymentConfig.from_dict({"instances": [{"role": "colocated", "pp": 2, "nodes": [[0]]}]})


def test_a_chunked_colocated_plan_runs_replicas_behind_one_router(tiny, workload):
    """A planner plan of colocated instances in chunked mode: two replicas, each a chunked engine with
    the plan's token budget, behind one router; tokens equal HF's. A mode on a disaggregated role is
    refused."""
    _, _, cfg, params, _ = tiny
    prompts, max_tokens, refs = workload
    plan = {"feasible": True, "mode": "chunked", "per_device_goodput": 2.0, "devices": 2,
            "instances": [{"role": "colocated", "tp": 1, "pp": 1, "replicas": 2, "mode": "chunked",
                           "max_num_batched_tokens": 64, "nodes": [[0], [0]], "rate_per_instance": 1.0}]}
    dep = DeploymentConfig.from_dict(plan)
    eng = build_engine(cfg, params, dep, max_model_len=512)
    cores = [s.inst.core for s in eng.colocated]
    assert len(cores) == 2 and {c.config.mode for c in cores} == {"chunked"}
    assert {c.config.max_num_batched_tokens for c in cores} == {64}
    pick = (4, 9, 11, 20)  # prompts of 299 tokens (five 64-token chunks), then shorter ones
    reqs = [Request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True)) for i in pick]
    out = run_requests(eng, reqs)
    assert [o.token_ids for o in out] == [refs[i] for i in pick]
    with pytest.raises(ConfigError, match="only a colocated instance takes a mode"):
        DeploymentConfig.from_dict({"instances": [{"role": "prefill", "mode": "chunked"}, {"role": "decode"}]})
