"""Time the OPT-66B placement search on 4 nodes x 8 GPUs (acceptance: under 60 s on 2 cores).

    python scripts/bench_planner.py [--workload sharegpt] [--affinity high]
prints the wall time of the whole search (layout scoring + end-to-end checks) and the plan.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.__main__ import build_parser, format_table, spec_from_args
from planner.plan import make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--affinity", default="high")
    a = ap.parse_args()
    args = build_parser().parse_args([
        "--model", "opt-66b", "--profile", "configs/profiles/a100_80g.json", "--workload", a.workload,
        "--ttft", "2.5", "--tpot", "0.15", "--attainment", "0.9", "--nodes", "4", "--gpus-per-node", "8",
        "--affinity", a.affinity])
    t0 = time.perf_counter()
    plan = make_plan(spec_from_args(args))
    dt = time.perf_counter() - t0
    print(format_table(plan))
    print(f"search time: {dt:.1f} s (opt-66b, {a.workload}, 4x8 GPUs, affinity {a.affinity})")


if __name__ == "__main__":
    main()
