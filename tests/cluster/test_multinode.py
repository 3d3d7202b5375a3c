"""A two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, all on 127.0.0.1): a plan's
nodes become placement groups, KV moves over JAX collectives, outputs equal HF.

The plan is DistServe's low node-affinity shape at pp=1: two (prefill, decode) replica pairs, each
pair on one plan node. From each actor's Ray node id: a pair shares a node, the pairs do not; every
hand-off stays on its node (the router prefers the source's node). Actors on the node the driver is
not on get their clock offset estimated for real (round trips), and every request's events stay in
order on the driver's clock.

The second plan is the same shape at pp=2: prefill and decode each hold stage 0 on node 0 and stage 1
on node 1 (an instance actor plus a stage actor each, ``jaxserve.cluster.stages``): activations cross
the nodes over the JAX group, each stage's KV moves on its own node; a stage actor that dies ends the
request it was decoding with an error within 5 s.
"""

from __future__ import annotations

import os
import time

import pytest
import ray

from jaxserve.cluster.placement import place, release
from jaxserve.cluster.ray_instance import launch_router
from jaxserve.config import DeploymentConfig, InstanceSpec
from jaxserve.engine.build import instance_names
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Event, FinishReason, Request, SamplingParams
from tests.cluster.helpers import drained
from tests.model_fixtures import greedy_case

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # everything on 127.0.0.1
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "object_store_memory": 128 * 2**20, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, object_store_memory=128 * 2**20)
    ray.init(address=cluster.address, logging_level="warning")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return greedy_case(tmp_path_factory.mktemp("mn-model"), 13, [4, 19, 33, 64, 90, 130], 8)


def test_pairs_per_node_collective_kv_equal_hf(two_nodes, model):
    model_dir, prompts, refs = model
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    plan = DeploymentConfig((InstanceSpec("prefill", replicas=2, nodes=((0,), (1,))),
                             InstanceSpec("decode", replicas=2, nodes=((0,), (1,)))))
    placement = place(plan)  # one STRICT_PACK group per plan node: 2 CPUs each, so one per Ray node
    roles = ["prefill", "prefill", "decode", "decode"]
    configs = [s.engine_config(max_num_seqs=8, max_model_len=256) for s in plan.instances for _ in range(2)]
    try:
        with launch_router(model_dir, list(zip(instance_names(roles), configs, strict=True)),
                           options=placement.options, timeout_s=60, transport="collective") as eng:
            node = {s.name: s.inst.info.node_id for s in eng.slots}
            assert node["prefill-0"] == node["decode-0"] != node["prefill-1"] == node["decode-1"]
            here = ray.get_runtime_context().get_node_id()
            for s in eng.slots:  # the other node's actors: offsets measured by round trips (one clock here)
                if node[s.name] == here:
                    assert s.inst.clock_offset == 0.0 and s.inst.clock_error == 0.0
                else:
                    assert 0 < s.inst.clock_error < 0.05 and abs(s.inst.clock_offset) < 0.05
            eng.warmup()
            reqs = [Request(f"m{i}", p, SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
            assert [t.token_ids for t in run_requests(eng, reqs)] == refs
            hops = {e.instance for r in reqs for e in r.events if e.kind == Event.TRANSFER_BEGAN}
            assert hops == {"prefill-0->decode-0", "prefill-1->decode-1"}
            for r in reqs:
                assert [e.time for e in r.events] == sorted(e.time for e in r.events)
            assert eng.compilations_since_warmup == 0
    finally:
        release(placement)


def test_pipeline_stages_on_two_nodes_equal_hf(two_nodes, model):
    """DistServe's low node-affinity shape with pp=2: prefill and decode each have stage 0 on node 0 and
    stage 1 on node 1 (an instance actor and a stage actor per instance); activations cross nodes over
    the JAX group; each stage's KV moves between the actors holding its layers, on one node."""
    model_dir, prompts, refs = model
    plan = DeploymentConfig((InstanceSpec("prefill", pp=2, nodes=((0, 1),)),
                             InstanceSpec("decode", pp=2, nodes=((0, 1),))))
    placement = place(plan)
    assert [[s for s, _ in chain] for chain in placement.stages] == [[range(1, 2)], [range(1, 2)]]
    configs = [s.engine_config(max_num_seqs=8, max_model_len=256) for s in plan.instances]
    try:
        with launch_router(model_dir, list(zip(["prefill-0", "decode-0"], configs, strict=True)),
                           options=placement.options, stages=placement.stages, timeout_s=120) as eng:
            node = {s.name: s.inst.info.node_id for s in eng.slots}
            stage_node = {s.name: ray.get(s.inst.segments[0].actor.node.remote())[0] for s in eng.slots}
            assert node["prefill-0"] == node["decode-0"] != stage_node["prefill-0"] == stage_node["decode-0"]
            eng.warmup()
            reqs = [Request(f"s{i}", p, SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
            assert [t.token_ids for t in run_requests(eng, reqs)] == refs
            assert eng.compilations_since_warmup == 0  # the stage actors' programs included
            assert drained(eng) == {"prefill-0": 0, "decode-0": 0}
            # the decode instance's stage actor dies while a request decodes: it ends with an error, soon
            long = Request("long", prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
            eng.add_request(long)
            t0 = time.monotonic()
            while not any(e.kind == Event.DECODE_BEGAN for e in long.events):
                assert time.monotonic() - t0 < 60
                eng.step()
            ray.kill(eng.slots[1].inst.segments[0].actor, no_restart=True)
            t0 = time.monotonic()
            while long.finish_reason is None:
                assert time.monotonic() - t0 < 5.0, "not ended within 5 s of its stage actor's death"
                eng.step()
            assert long.finish_reason == FinishReason.ERROR and "long" in eng.failures
            t0 = time.monotonic()
            while eng.slots[1].alive:  # the instance reports itself lost: the router stops using it
                assert time.monotonic() - t0 < 5.0
                eng.step()
            assert "stage process" in eng.slots[1].error
    finally:
        release(placement)


def test_a_plan_mixing_spanning_and_single_process_instances(two_nodes, model):
    """Prefill in one process on node 0, decode spanning nodes 0 and 1: the group exists for the decode's
    activations only, so every instance moves KV through the object store (one export per hand-off into
    the spanning decode's layers on both nodes)."""
    model_dir, prompts, refs = model
    plan = DeploymentConfig((InstanceSpec("prefill", nodes=((0,),)), InstanceSpec("decode", pp=2, nodes=((0, 1),))))
    placement = place(plan)
    assert [[s for s, _ in chain] for chain in placement.stages] == [[], [range(1, 2)]]
    configs = [s.engine_config(max_num_seqs=8, max_model_len=256) for s in plan.instances]
    try:
        with launch_router(model_dir, list(zip(["prefill-0", "decode-0"], configs, strict=True)),
                           options=placement.options, stages=placement.stages, timeout_s=120) as eng:
            eng.warmup()
            reqs = [Request(f"x{i}", p, SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
            assert [t.token_ids for t in run_requests(eng, reqs)] == refs
            assert eng.num_transfers == len(prompts) and eng.compilations_since_warmup == 0
            assert drained(eng) == {"prefill-0": 0, "decode-0": 0}
    finally:
        release(placement)
