"""Issue 14: KV across processes: the collective hand-off vs a plain collective copy of the same bytes vs
Ray's object store, between the same two processes; then the stage breakdown of a disaggregated run
whose instances are Ray actors in one collective group.

    python scripts/bench_collective_kv.py            # 160 / 512 / 2048 tokens, 7 repetitions (~2 min)
    python scripts/bench_collective_kv.py --quick    # 160 / 512 tokens, 2 repetitions

Part 1 is jaxserve.profiling.collective_bench (its docstring says what is timed). GB/s counts the
request's real KV (tokens x 393,216 bytes); times are medians over repetitions, ratios medians of
per-repetition ratios. Part 2 serves the built-in demo
model with one prefill and one decode actor (transport "collective") and prints the five stages from
each request's lifecycle events. Local Ray on 127.0.0.1. Prints markdown (docs/performance.md,
"KV across processes (issue 14)").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BYTES_PER_TOKEN = 24 * 2 * 32 * 64 * 4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bandwidth_table(res: dict) -> str:
    rows = ["| tokens | MB | collective hand-off (export + exchange + import) | plain collective copy | object store "
            "| hand-off / copy (GB/s ratio) | hand-off vs object store | max abs error |",
            "|---|---|---|---|---|---|---|---|"]
    for n, r in res.items():
        mb = n * BYTES_PER_TOKEN / 1e6
        med = {k: statistics.median(v) for k, v in r.items() if k != "error"}
        gbs = {k: n * BYTES_PER_TOKEN / med[k] / 1e9 for k in ("collective", "plain", "object store")}
        # ratios: medians of per-repetition ratios (the paths alternate, so load hits each pair alike)
        vs_copy = statistics.median(p / c for p, c in zip(r["plain"], r["collective"], strict=True))
        vs_store = statistics.median(o / c for o, c in zip(r["object store"], r["collective"], strict=True))
        parts = " + ".join(f"{1e3 * med[k]:.0f}" for k in ("export", "exchange", "import"))
        rows.append(f"| {n} | {mb:.0f} | {1e3 * med['collective']:.1f} ms ({gbs['collective']:.2f} GB/s; {parts}) "
                    f"| {1e3 * med['plain']:.1f} ms ({gbs['plain']:.2f} GB/s) "
                    f"| {1e3 * med['object store']:.1f} ms ({gbs['object store']:.2f} GB/s) "
                    f"| {vs_copy:.2f} | {vs_store:.2f}x as fast | {r['error'][0]:.0e} |")
    return "\n".join(rows)


def disagg_breakdown(n: int) -> str:
    import numpy as np

    from jaxserve.cluster.actors import ActorOptions
    from jaxserve.cluster.ray_instance import launch_router
    from jaxserve.config import EngineConfig
    from jaxserve.engine.frontend import run_requests
    from jaxserve.request import Request, SamplingParams
    from scripts.bench_kv_transfer import breakdown

    configs = [(f"{m}-0", EngineConfig(mode=m, max_num_seqs=16, max_model_len=512)) for m in ("prefill", "decode")]
    with launch_router(None, configs, options=ActorOptions(num_cpus=0.5), transport="collective") as eng:
        eng.warmup()
        rng = np.random.default_rng(3)
        reqs = [Request(f"r{i}", rng.integers(4, eng.vocab_size, int(p)).tolist(),
                        SamplingParams(max_tokens=32, ignore_eos=True)) for i, p in enumerate(rng.integers(32, 400, n))]
        run_requests(eng, reqs)
        assert eng.compilations_since_warmup == 0
    stages = breakdown(reqs)
    rows = ["| stage | mean ms | p90 ms |", "|---|---|---|"]
    rows += [f"| {k} | {1e3 * np.mean(v):.1f} | {1e3 * np.percentile(v, 90):.1f} |" for k, v in stages.items()]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="160 and 512 tokens, 2 repetitions")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per size (default 7)")
    ap.add_argument("--requests", type=int, default=24, help="requests in the disaggregated run (default 24)")
    args = ap.parse_args()
    sizes, reps = ([160, 512], 2) if args.quick else ([160, 512, 2048], args.reps)

    import ray

    from jaxserve.profiling.collective_bench import run

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    load0 = os.getloadavg()
    try:
        res = run(sizes, reps, log)
        log("disaggregated run")
        stages = disagg_breakdown(args.requests)
    finally:
        ray.shutdown()
    print(f"Command: `python scripts/bench_collective_kv.py{' --quick' if args.quick else ''}`; {platform.node()}, "
          f"{os.cpu_count()} cores, load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n")
    print(bandwidth_table(res))
    print(f"\nStages of a disaggregated run across processes ({args.requests} requests, 32-400 prompt tokens, "
          "32 output tokens, demo model, prefill actor -> decode actor over the collective path):\n")
    print(stages)


if __name__ == "__main__":
    main()
