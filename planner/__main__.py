"""``python -m planner``: command line -> SearchSpec -> plan JSON, ranked table, optional plot.

    args --spec_from_args()--> SearchSpec --make_plan()--> plan dict
         --> stdout: ranked layouts + chosen plan;  --out plan.json;  --plot curves.png
Bad input prints one ``error: ...`` line on stderr and exits 2; "no feasible plan"
prints one line, still writes --out (with "feasible": false), and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm import tqdm

from jaxserve.config import ConfigError, model_preset
from jaxserve.slo import SLO

from .assumptions import parse as parse_assumptions
from .errors import PlannerError
from .hardware import hardware_spec
from .latency import DISAGG_ENGINE, load_profile
from .plan import make_plan
from .search import SearchSpec
from .workload import workload


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m planner", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="OPT preset name, e.g. opt-66b")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--profile", help="profile JSON (DistServe format)")
    src.add_argument("--hardware", help="analytic model instead of a profile: preset name or spec JSON")
    ap.add_argument("--link-hardware", default=None,
                    help="hardware preset giving link speeds with --profile (default: from the profile's name)")
    ap.add_argument("--workload", default="sharegpt", help="sharegpt|humaneval|longbench|fixed:P:O|trace.csv|.jsonl")
    ap.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    ap.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    ap.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    ap.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--rate", type=float, default=None, help="target traffic, req/s")
    ap.add_argument("--affinity", default="high", choices=["high", "low"])
    ap.add_argument("--requests", type=int, default=2000, help="simulated requests per layout evaluation")
    ap.add_argument("--chunked", type=int, default=512, metavar="TOKENS",
                    help="token budget per iteration of the chunked-prefill mode (0: leave that mode out)")
    ap.add_argument("--assumptions", default="jaxserve", metavar="jaxserve|distserve[+SWITCH,...]",
                    help="what is modelled: jaxserve's engine, or DistServe's simulator (P90 TTFT and P90 TPOT "
                         "checked apart, no KV transfer time, no KV memory limit, whole-queue prefill batches, one "
                         "prefill + one decode instance); distserve+kv_capacity,... puts those of ours back "
                         "(planner/assumptions.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the plan JSON here")
    ap.add_argument("--plot", default=None, help="draw attainment-vs-rate curves to this PNG")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def spec_from_args(a: argparse.Namespace) -> SearchSpec:
    try:
        model = model_preset(a.model, dtype="float16")
    except ConfigError as e:
        raise PlannerError(f"--model {a.model!r}: {e}") from e
    if a.chunked < 0:
        raise PlannerError(f"--chunked must be >= 0, got {a.chunked}")
    for name in ("nodes", "gpus_per_node", "requests"):
        if getattr(a, name) < 1:
            raise PlannerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.rate is not None and not a.rate > 0:
        raise PlannerError(f"--rate must be positive, got {a.rate}")
    try:
        slo = SLO(a.ttft, a.tpot, a.attainment)
    except ValueError as e:
        raise PlannerError(str(e)) from e
    if a.hardware:
        profile, hw = None, hardware_spec(a.hardware)
    else:
        profile = load_profile(a.profile or "configs/profiles/a100_80g.json")
        profile.require_model(DISAGG_ENGINE, a.model)
        profile.require_model(profile.colocated_engine(), a.model)
        hw = hardware_spec(a.link_hardware or profile.hardware_name)
    try:
        assumptions = parse_assumptions(a.assumptions)
    except ValueError as e:
        raise PlannerError(str(e)) from e
    wl = workload(a.workload, a.arrival, a.cv)
    if wl.trace is not None and len(wl.trace) < a.requests:
        print(f"warning: the trace {a.workload} has {len(wl.trace)} requests, fewer than --requests "
              f"{a.requests}: every layout is scored on those {len(wl.trace)} (few requests make a noisy "
              "goodput)", file=sys.stderr)
    return SearchSpec(a.model, model, profile, hw, slo, wl, a.nodes,
                      a.gpus_per_node, a.affinity, a.rate, a.requests, a.seed, chunk=a.chunked,
                      assumptions=assumptions)


def format_table(plan: dict[str, Any]) -> str:
    lines = ["rank  prefill(tp,pp) x n  decode(tp,pp) x n  inter  per-device goodput (req/s)"]
    for i, r in enumerate(plan["ranking"], 1):
        lines.append(f"{i:>4}  ({r['prefill'][0]},{r['prefill'][1]}) x {r['n_p']:<10} ({r['decode'][0]},"
                     f"{r['decode'][1]}) x {r['n_d']:<9}  {r['inter'] or '-':>5}  {r['per_device_goodput']:.3f}")
    lines.append("colocated / chunked (tp,pp)  per-device goodput (req/s)")
    for r in plan["colocated_ranking"]:
        lines.append(f"  {r['mode']:<9} ({r['tp']},{r['pp']})      {r['per_device_goodput']:.3f}")
    if plan.get("feasible"):
        inst = ", ".join(f"{x['role']} tp={x['tp']} pp={x['pp']} x{x['replicas']}" for x in plan["instances"])
        lines.append(f"mode: {plan['why']}")
        lines.append(f"chosen: {plan['mode']}: {inst}; {plan['devices']} devices; per-device goodput "
                     f"{plan['per_device_goodput']:.3f} req/s end to end (phase estimate "
                     f"{plan['phase_estimate_per_device_goodput']:.3f}); colocated "
                     f"{plan['colocated_per_device_goodput']:.3f}; predicted attainment "
                     f"{plan['predicted_attainment']:.1%} at {plan['rate']:.2f} req/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        bar = tqdm(desc="layouts", unit="layout", file=sys.stderr, disable=args.no_progress)
        plan = make_plan(spec, progress=bar.update)
        bar.close()
        print(format_table(plan))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(plan, f, indent=1)
        if not plan["feasible"]:
            print(f"no feasible plan: {plan['reason']}", file=sys.stderr)
            return 1
        if args.plot:
            from .plot import plot_curves
            plot_curves(spec, plan, args.plot)
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
