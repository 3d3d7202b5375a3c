"""Ray placement groups from a deployment: one bundle per instance replica, grouped by plan node.

    DeploymentConfig (instances with role, tp, pp, replicas, optional plan ``nodes``)
      --> bundles {CPU: 1 (+ GPU: tp*pp on GPU clusters)}, one per replica, prefill first
      --> one placement group per plan node (STRICT_PACK: its bundles share a Ray node), or a single
          PACK group when the deployment names no nodes
      --> ActorOptions(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle index))
          in the order the launcher starts actors (prefill, decode, colocated replicas)

A plan from the low node-affinity search puts the prefill and decode stages that hold the same
layers on one node; those replicas share a plan node index, so their actors land on one Ray node
and KV moves over the intra-node link. A replica whose pipeline stages span plan nodes gets one
bundle per run of consecutive stages on one node (``jaxserve.cluster.stages.segments``): its
instance actor holds the first run, a stage actor each further run (``Placement.stages``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.cluster.actors import ActorOptions
from jaxserve.config import ConfigError, DeploymentConfig


@dataclasses.dataclass(frozen=True)
class Placement:
    """Actor options in launch order, and the placement groups they use (remove them at shutdown)."""

    options: list[ActorOptions]  # per instance actor, in launch order
    groups: list[Any]
    node_of_actor: list[int | None]  # the plan node each instance actor was grouped under (None: no plan nodes)
    stages: list[list[tuple[range, ActorOptions]]]  # per instance actor: its further segments' stages and options


@dataclasses.dataclass(frozen=True)
class Bundle:
    """One actor's bundle: ``replica`` counts instance replicas in launch order; ``stages`` the
    pipeline stages the actor holds (the first of a replica's bundles is its instance actor)."""

    node: int | None
    resources: dict[str, float]
    replica: int
    stages: range


def plan_bundles(deployment: DeploymentConfig, *, gpus: bool) -> list[Bundle]:
    """A bundle per actor: prefill replicas, then decode, then colocated; a replica's segments in order."""
    from jaxserve.cluster.stages import segments

    out: list[Bundle] = []
    replica = 0
    for role in ("prefill", "decode", "colocated"):
        for inst in deployment.instances:
            if inst.role != role:
                continue
            for r in range(inst.replicas):
                runs = segments(inst.nodes[r]) if inst.nodes is not None else [(None, range(inst.pp))]
                for node, stages in runs:
                    bundle: dict[str, float] = {"CPU": 1.0}
                    if gpus:
                        bundle["GPU"] = float(inst.tp * len(stages))
                    out.append(Bundle(node, bundle, replica, stages))
                replica += 1
    return out


def place(deployment: DeploymentConfig, *, gpus: bool = False, timeout_s: float = 60.0) -> Placement:
    """Create and wait for the placement groups; a cluster that cannot hold them is a ConfigError."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    items = plan_bundles(deployment, gpus=gpus)
    keys = sorted({b.node for b in items}, key=lambda k: -1 if k is None else k)
    groups: dict[int | None, Any] = {}
    index: list[tuple[Any, int]] = []
    for key in keys:
        bundles = [b.resources for b in items if b.node == key]
        groups[key] = placement_group(bundles, strategy="PACK" if key is None else "STRICT_PACK",
                                      name=f"jaxserve-{'all' if key is None else f'node{key}'}")
    seen: dict[int | None, int] = {}
    for b in items:
        index.append((groups[b.node], seen.get(b.node, 0)))
        seen[b.node] = seen.get(b.node, 0) + 1
    for key, pg in groups.items():
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            need = [b.resources for b in items if b.node == key]
            for g in groups.values():
                remove_placement_group(g)
            raise ConfigError(
                f"Ray could not place {len(need)} instance(s) {need} for plan node {key} within {timeout_s:.0f} s: "
                f"the cluster has {ray.cluster_resources()}") from None
    opts = [ActorOptions(num_cpus=b.resources["CPU"], num_gpus=b.resources.get("GPU", 0.0),
                         platform=None if gpus else "cpu",
                         scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
            for (pg, i), b in zip(index, items, strict=True)]
    leaders = [i for i, b in enumerate(items) if b.stages.start == 0]
    stages = [[(items[j].stages, opts[j]) for j in range(len(items)) if items[j].replica == items[i].replica
               and items[j].stages.start > 0] for i in leaders]
    return Placement([opts[i] for i in leaders], list(groups.values()), [items[i].node for i in leaders], stages)


def release(placement: Placement | None) -> None:
    """Remove the placement groups (their actors should be gone already)."""
    if placement is None:
        return
    from ray.util.placement_group import remove_placement_group
    for g in placement.groups:
        try:
            remove_placement_group(g)
        except Exception:  # the cluster may already be down
            pass
