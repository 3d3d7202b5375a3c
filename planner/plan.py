"""From search results to the plan JSON that ``jaxserve.launch`` reads.

    SearchSpec --make_plan()--> search (planner.search): disaggregated Candidates, colocated and
      chunked-prefill layouts --> each mode's best few: node placement (tp inside a node; pp stages
      may span nodes) and end-to-end simulation (goodput by bisection, joint TTFT+TPOT)
      --> the mode with the most per-device goodput --> plan dict (schema below);
      ``"feasible": false`` with a ``"reason"`` when no mode fits

Plan schema (all rates in req/s):
  feasible: bool, reason: str (when not feasible)
  mode: disaggregated | colocated | chunked; why: the winner and the runner-up, with their goodput
  alternatives: [{mode, layout, per_device_goodput}] the other modes' best, best first
  model, profile, hardware, affinity, cluster: {nodes, gpus_per_node}
  instances: [{role, tp, pp, replicas, nodes: [[node of each stage] per replica],
               placement: [[{node, gpus: [...]} per stage] per replica], rate_per_instance}
              (colocated: role "colocated", mode colocated | chunked, chunked: max_num_batched_tokens)]
  devices: total devices used; groups, inter: low-affinity node groups and segments (inter 0: high);  rate: the traffic rate the plan is sized for
  per_device_goodput: end-to-end (joint SLO) max rate / devices of the chosen plan
  phase_estimate_per_device_goodput: the search's per-phase estimate for the same plan
  colocated_per_device_goodput, colocated: {tp, pp, replicas, rate_per_instance}: the best prefill-first
    colocated plan end to end; goodput_ratio_vs_colocated
  slo: {ttft, tpot, attainment}, workload: {...}, predicted_attainment (at ``rate``)
  ranking: top disaggregated layouts [{prefill: [tp, pp], decode: [tp, pp], n_p, n_d, inter, per_device_goodput}]
  colocated_ranking: [{mode, tp, pp, per_device_goodput}] (phase estimates)
  skipped: layouts left out and why
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from jaxserve.slo import goodput_by_bisection

from .search import Candidate, LayoutScore, Scorer, SearchSpec, best_colocated, search_high, search_low

E2E_MIN_REQUESTS = 1500
E2E_PER_INSTANCE = 250
TOP_K_E2E = 4  # disaggregated candidates re-scored end to end (joint SLO) before choosing
TOP_K_COLOCATED = 1  # the best colocated and the best chunked layout are re-scored end to end


def place(instances: list[tuple[str, int, int, int]], nodes: int, gpus_per_node: int
          ) -> list[list[list[dict[str, Any]]]] | None:
    """First-fit placement of (role, tp, pp, replicas); per instance, per replica, per stage."""
    free = [list(range(gpus_per_node)) for _ in range(nodes)]
    out = []
    for _role, tp, pp, replicas in instances:
        reps = []
        for _ in range(replicas):
            stages = []
            for _ in range(pp):
                node = next((n for n in range(nodes) if len(free[n]) >= tp), None)
                if node is None:
                    return None
                gpus, free[node] = free[node][:tp], free[node][tp:]
                stages.append({"node": node, "gpus": gpus})
            reps.append(stages)
        out.append(reps)
    return out


def place_low(cand: Candidate, groups: int, gpus_per_node: int) -> list[list[list[dict[str, Any]]]]:
    """Low affinity: group g uses nodes g*inter .. g*inter+inter-1; segment i of each instance on node i."""
    res: list[list[list[dict[str, Any]]]] = [[], []]
    for g in range(groups):
        used = [0] * cand.inter
        for k, (score, count) in enumerate(((cand.prefill, cand.n_p), (cand.decode, cand.n_d))):
            per_node = score.pp // cand.inter
            for _ in range(count):
                stages = []
                for i in range(cand.inter):
                    for _ in range(per_node):
                        stages.append({"node": g * cand.inter + i, "gpus": list(range(used[i], used[i] + score.tp))})
                        used[i] += score.tp
                res[k].append(stages)
    return res


def evaluate(sc: Scorer, best: Candidate) -> dict[str, Any] | None:
    """Place one candidate and score it end to end; None if it does not pack onto the nodes."""
    spec = sc.spec
    if best.inter:
        groups = spec.nodes // best.inter if spec.rate is None else math.ceil(spec.rate / best.rate - 1e-9)
        placement = place_low(best, groups, spec.gpus_per_node)
    else:
        groups = 1
        placement = place([("prefill", best.prefill.tp, best.prefill.pp, best.n_p),
                           ("decode", best.decode.tp, best.decode.pp, best.n_d)], spec.nodes, spec.gpus_per_node)
        if placement is None:
            sc.skipped.append(f"plan prefill {best.prefill.tp}x{best.prefill.pp} x{best.n_p} + decode "
                              f"{best.decode.tp}x{best.decode.pp} x{best.n_d}: does not pack onto the nodes")
            return None
    n_p, n_d = best.n_p * groups, best.n_d * groups
    n_req = _e2e_n(n_p + n_d)
    return {
        "feasible": True, "mode": "disaggregated", "groups": groups, "inter": best.inter,
        "instances": [
            {"role": role, "tp": s.tp, "pp": s.pp, "replicas": n,
             "nodes": [[st["node"] for st in rep] for rep in reps], "placement": reps,
             "rate_per_instance": s.rate}
            for role, s, n, reps in (("prefill", best.prefill, n_p, placement[0]),
                                     ("decode", best.decode, n_d, placement[1]))],
        # each phase alone reaches best.rate, so the end-to-end goodput is at or below it
        **_end_to_end(sc, lambda rate: sc.e2e_attainment(best, groups, rate, n_req), best.rate * groups,
                      best.devices * groups, best.per_device),
    }


def _e2e_n(instances: int) -> int:
    return max(E2E_MIN_REQUESTS, E2E_PER_INSTANCE * instances)


def _end_to_end(sc: Scorer, simulate: Callable[[float], Any], est_rate: float, devices: int,
                phase_estimate: float) -> dict[str, Any]:
    """A placed plan scored end to end: goodput by bisection below ``est_rate`` (the per-phase
    estimate, an upper bound), the rate it is sized for, and the SLO score predicted there."""
    spec = sc.spec

    def att(rate: float) -> float:
        res = simulate(rate)
        return sc.slo_score(res.ttft(), res.tpot())

    e2e_rate = goodput_by_bisection(att, spec.slo.attainment, est_rate / 8, est_rate, rel_tol=0.02, expand=False)
    rate = spec.rate if spec.rate is not None else e2e_rate
    return {"rate": rate, "devices": devices, "per_device_goodput": e2e_rate / devices,
            "phase_estimate_per_device_goodput": phase_estimate,
            "predicted_attainment": att(rate) if rate > 0 else 0.0}


def evaluate_colocated(sc: Scorer, x: LayoutScore) -> dict[str, Any] | None:
    """A colocated (or chunked) layout as a plan: replicas filling the cluster (or meeting --rate),
    placed and scored end to end under the same joint SLO as a disaggregated plan."""
    spec = sc.spec
    reps = spec.devices // x.devices if spec.rate is None else math.ceil(spec.rate / x.rate - 1e-9)
    placement = place([(x.role, x.tp, x.pp, reps)], spec.nodes, spec.gpus_per_node) if reps else None
    if placement is None:
        sc.skipped.append(f"plan {x.role} tp={x.tp} pp={x.pp} x{reps}: does not pack onto the nodes")
        return None
    n_req = _e2e_n(reps)
    engine = {"mode": x.role} | ({"max_num_batched_tokens": sc.chunk_of(x.role)} if x.role == "chunked" else {})
    return {
        "feasible": True, "mode": x.role, "groups": 1, "inter": 0,
        "instances": [{"role": "colocated", "tp": x.tp, "pp": x.pp, "replicas": reps, **engine,
                       "nodes": [[st["node"] for st in rep] for rep in placement[0]], "placement": placement[0],
                       "rate_per_instance": x.rate}],
        **_end_to_end(sc, lambda rate: sc.colocated_result(x, reps, rate, n_req), x.rate * reps,
                      x.devices * reps, x.per_device),
    }


def _best(evals: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    good = [e for e in evals if e is not None]
    return max(good, key=lambda e: e["per_device_goodput"]) if good else None


def _layout(e: dict[str, Any]) -> str:
    return " + ".join(f"{x.get('mode', x['role'])} tp={x['tp']} pp={x['pp']} x{x['replicas']}" for x in e["instances"])


def make_plan(spec: SearchSpec, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Search every mode, score each mode's best layouts end to end under the same rules, and return
    the plan with the most per-device goodput (its runner-ups under ``alternatives``)."""
    sc = Scorer(spec, progress)
    cands = search_high(sc) if spec.affinity == "high" else search_low(sc)
    colo, chunked = best_colocated(sc, "colocated"), best_colocated(sc, "chunked")
    plan: dict[str, Any] = {
        "model": spec.model_name,
        "profile": spec.profile.path if spec.profile else f"analytic:{spec.hardware.name}",
        "hardware": spec.hardware.name, "affinity": spec.affinity, "assumptions": spec.assumptions.name,
        "cluster": {"nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node},
        "slo": {"ttft": spec.slo.ttft, "tpot": spec.slo.tpot, "attainment": spec.slo.attainment},
        "workload": spec.workload.describe(), "skipped": sc.skipped,
        "ranking": [{"prefill": [c.prefill.tp, c.prefill.pp], "decode": [c.decode.tp, c.decode.pp],
                     "n_p": c.n_p, "n_d": c.n_d, "inter": c.inter, "per_device_goodput": c.per_device}
                    for c in cands[:10]],
        "colocated_ranking": [{"mode": x.role, "tp": x.tp, "pp": x.pp, "per_device_goodput": x.per_device}
                              for x in sorted(colo + chunked, key=lambda x: -x.per_device)[:10]],
    }
    best = {"disaggregated": _best([evaluate(sc, c) for c in cands[:TOP_K_E2E]]),
            "colocated": _best([evaluate_colocated(sc, x) for x in colo[:TOP_K_COLOCATED]]),
            "chunked": _best([evaluate_colocated(sc, x) for x in chunked[:TOP_K_COLOCATED]])}
    # with --rate, a plan predicted to carry it comes first; then the most goodput per device
    ranked = sorted((e for e in best.values() if e is not None),
                    key=lambda e: (spec.rate is not None and e["predicted_attainment"] < spec.slo.attainment,
                                   -e["per_device_goodput"]))
    if not ranked:
        why = (f"no layout meets TTFT {spec.slo.ttft}s / TPOT {spec.slo.tpot}s for {spec.slo.attainment:.0%} "
               f"of requests" + (f" at rate {spec.rate} req/s" if spec.rate else "")
               + f" on {spec.nodes}x{spec.gpus_per_node} devices, in any mode (or none packs onto the nodes)")
        return {**plan, "feasible": False, "reason": why}
    plan.update(ranked[0])
    plan["alternatives"] = [{"mode": e["mode"], "layout": _layout(e), "per_device_goodput": e["per_device_goodput"]}
                            for e in ranked[1:]]
    plan["why"] = _why(ranked)
    c = best["colocated"]
    plan["colocated_per_device_goodput"] = c["per_device_goodput"] if c else 0.0
    plan["colocated"] = c and {k: c["instances"][0][k] for k in ("tp", "pp", "replicas", "rate_per_instance")}
    if plan["colocated_per_device_goodput"] > 0:
        plan["goodput_ratio_vs_colocated"] = plan["per_device_goodput"] / plan["colocated_per_device_goodput"]
    return plan


def _why(ranked: list[dict[str, Any]]) -> str:
    top = ranked[0]
    if len(ranked) == 1:
        return f"{top['mode']}: the only mode with a layout that meets the SLO"
    run = ranked[1]
    lead = (f"{top['mode']} ({_layout(top)}) serves {top['per_device_goodput']:.3f} req/s per device within the "
            f"SLO; the runner-up, {run['mode']} ({_layout(run)}), {run['per_device_goodput']:.3f}")
    if run["per_device_goodput"] > 0:
        return f"{lead} ({top['per_device_goodput'] / run['per_device_goodput']:.2f}x)"
    return lead
