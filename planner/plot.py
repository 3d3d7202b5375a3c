"""Attainment-vs-rate curves of a plan and its colocated baseline (matplotlib, PNG).

    SearchSpec + plan dict --plot_curves()--> end-to-end simulations over a rate grid --> out.png
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .search import Candidate, LayoutScore, Scorer, SearchSpec

POINTS = 12


def _colocated_curve(ax: Any, sc: Scorer, spec: SearchSpec, score: LayoutScore, per_dev: np.ndarray, label: str,
                     style: str) -> None:
    ys = [sc.colocated_result(score, 1, r * score.devices, 1000).attainment(spec.slo.ttft, spec.slo.tpot)
          for r in per_dev]
    ax.plot(per_dev, ys, style, label=label)


def plot_curves(spec: SearchSpec, plan: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = Scorer(spec)
    top = 2.0 * max(plan["per_device_goodput"], plan["colocated_per_device_goodput"])
    per_dev = np.linspace(top / POINTS, top, POINTS)
    fig, ax = plt.subplots(figsize=(6, 4))
    if plan.get("mode", "disaggregated") == "disaggregated":
        pre, dec = plan["instances"]
        n_groups = plan.get("groups", 1)
        cand = Candidate(LayoutScore("prefill", pre["tp"], pre["pp"], pre["rate_per_instance"], ""),
                         LayoutScore("decode", dec["tp"], dec["pp"], dec["rate_per_instance"], ""),
                         pre["replicas"] // n_groups, dec["replicas"] // n_groups, inter=plan.get("inter", 0))
        ys = [sc.e2e_attainment(cand, n_groups, r * plan["devices"], 1500).attainment(spec.slo.ttft, spec.slo.tpot)
              for r in per_dev]
        ax.plot(per_dev, ys, "o-", label=f"disaggregated ({plan['devices']} devices)")
    else:  # the chosen plan is colocated or chunked: its own instance's curve
        (x,) = plan["instances"]
        _colocated_curve(ax, sc, spec, LayoutScore(x["mode"], x["tp"], x["pp"], x["rate_per_instance"], ""), per_dev,
                         f"{x['mode']} (chosen) tp={x['tp']} pp={x['pp']}", "o-")
    c = plan.get("colocated")
    if c and plan.get("mode") != "colocated":
        _colocated_curve(ax, sc, spec, LayoutScore("colocated", c["tp"], c["pp"], c["rate_per_instance"], ""),
                         per_dev, f"colocated tp={c['tp']} pp={c['pp']}", "s--")
    ax.axhline(spec.slo.attainment, color="gray", lw=0.8)
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_title(f"{spec.model_name}, {spec.workload.name}: TTFT {spec.slo.ttft}s, TPOT {spec.slo.tpot}s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
