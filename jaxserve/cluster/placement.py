"""Ray placement groups from a deployment: one bundle per instance replica, grouped by plan node.

    DeploymentConfig (instances with role, tp, pp, replicas, optional plan ``nodes``)
      --> bundles {CPU: 1 (+ GPU: tp*pp on GPU clusters)}, one per replica, prefill first
      --> one placement group per plan node (STRICT_PACK: its bundles share a Ray node), or a single
          PACK group when the deployment names no nodes
      --> ActorOptions(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle index))
          in the order the launcher starts actors (prefill, decode, colocated replicas)

A plan from the low node-affinity search puts the prefill and decode stages that hold the same
layers on one node; those replicas share a plan node index, so their actors land on one Ray node
and KV moves over the intra-node link. An actor holds a whole instance, so a replica whose
pipeline stages span plan nodes is placed on its first stage's node.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.cluster.actors import ActorOptions
from jaxserve.config import ConfigError, DeploymentConfig


@dataclasses.dataclass(frozen=True)
class Placement:
    """Actor options in launch order, and the placement groups they use (remove them at shutdown)."""

    options: list[ActorOptions]
    groups: list[Any]
    node_of_actor: list[int | None]  # the plan node each actor was grouped under (None: no plan nodes)


def plan_bundles(deployment: DeploymentConfig, *, gpus: bool) -> list[tuple[int | None, dict[str, float]]]:
    """(plan node or None, bundle) per instance replica: prefill replicas, then decode, then colocated."""
    out: list[tuple[int | None, dict[str, float]]] = []
    for role in ("prefill", "decode", "colocated"):
        for inst in deployment.instances:
            if inst.role != role:
                continue
            for r in range(inst.replicas):
                bundle: dict[str, float] = {"CPU": 1.0}
                if gpus:
                    bundle["GPU"] = float(inst.tp * inst.pp)
                out.append((inst.nodes[r][0] if inst.nodes is not None else None, bundle))
    return out


def place(deployment: DeploymentConfig, *, gpus: bool = False, timeout_s: float = 60.0) -> Placement:
    """Create and wait for the placement groups; a cluster that cannot hold them is a ConfigError."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    items = plan_bundles(deployment, gpus=gpus)
    keys = sorted({k for k, _ in items}, key=lambda k: -1 if k is None else k)
    groups: dict[int | None, Any] = {}
    index: list[tuple[Any, int]] = []
    for key in keys:
        bundles = [b for k, b in items if k == key]
        groups[key] = placement_group(bundles, strategy="PACK" if key is None else "STRICT_PACK",
                                      name=f"jaxserve-{'all' if key is None else f'node{key}'}")
    seen: dict[int | None, int] = {}
    for key, _ in items:
        index.append((groups[key], seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    for key, pg in groups.items():
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            need = [b for k, b in items if k == key]
            for g in groups.values():
                remove_placement_group(g)
            raise ConfigError(
                f"Ray could not place {len(need)} instance(s) {need} for plan node {key} within {timeout_s:.0f} s: "
                f"the cluster has {ray.cluster_resources()}") from None
    options = [ActorOptions(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0.0), platform=None if gpus else "cpu",
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
               for (pg, i), (_, b) in zip(index, items, strict=True)]
    return Placement(options, list(groups.values()), [k for k, _ in items])


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
