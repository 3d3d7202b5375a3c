"""Pipeline stages on the serving path: pp=2 call times against pp=1 and the planner's pp model.

    python scripts/bench_pipeline.py            # ~3 min on 2 quiet cores
    python scripts/bench_pipeline.py --quick    # 3 repetitions, fewer shapes

One process, 8 virtual CPU devices, float32, random weights: OPT-125m's shape (12 layers, hidden 768)
with an 8192-token vocabulary, 16-token blocks. pp=1 (``ModelExecutor``) on device 0; pp=2 (two tp=1
stages, ``PipelineExecutor``) on devices 2-3. Each call is built as ``engine.runner`` builds it
(bucketed shapes): a packed prefill of P prompts (pp=2: cut into 2 micro-batches by
``jaxserve.microbatch.split_runs``, what the runner does), and a decode step of B sequences at context
C (pp=2: one micro-batch, what the runner does; cut in 2 as well, for the record). Per repetition every
variant runs back to back (blocking on the logits); figures are medians, ratios medians of
per-repetition ratios, so load from other processes hits all variants alike.

Planner: ``planner.latency`` prices a pp=2 call from pp=1 times: one micro-batch takes the pp=1 time
(plus hops, ~0 here); micro-batches take the ``wavefront`` of their pp=1 times / 2 per stage. An
instrumented run (``record_timeline``) then gives, per micro-batched call, the measured makespan over
the wavefront of the measured stage times (does the engine run the planner's schedule?) and the stage
times when overlapped over the same stages run alone (how much the stages slow each other down: the
virtual devices share the host's cores, which the planner's model assumes they do not).

Prints a markdown table (docs/planner.md, "Pipeline stages").
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxserve.config import model_preset
from jaxserve.engine.executor import ModelExecutor
from jaxserve.engine.pipeline import PipelineExecutor
from jaxserve.microbatch import split_runs, wavefront
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.inputs import SeqChunk, StepInputs, StepShape, build_step_inputs, pow2_buckets

BS = 16
NUM_BLOCKS = 1024


def pow2(n: int, lo: int = 1) -> int:
    return next(b for b in pow2_buckets(lo, n) if b >= n)


def prefill_inputs(lens: list[int], first_block: int = 1) -> StepInputs:
    chunks, b = [], first_block
    for n in lens:
        k = -(-n // BS)
        chunks.append(SeqChunk([5] * n, 0, list(range(b, b + k))))
        b += k
    rows = next(r for r in (1, 4, 16, 64) if r >= len(lens))
    return build_step_inputs([chunks], StepShape(pow2(sum(lens), 16), rows, True), BS)


def decode_inputs(rows: int, ctx: int, first_block: int = 1) -> StepInputs:
    k = -(-(ctx + 1) // BS)
    chunks = [SeqChunk([5], ctx, list(range(first_block + r * k, first_block + (r + 1) * k))) for r in range(rows)]
    bb = pow2(rows)
    return build_step_inputs([chunks], StepShape(bb, bb, False, ((bb, 1, pow2(k, 4)),)), BS)


def calls(kind: str, n: int, size: int) -> tuple[StepInputs, list[StepInputs]]:
    """The whole call and its two micro-batches (split as the runner splits a packed call)."""
    if kind == "prefill":
        lens = [size] * n
        runs = split_runs(lens, 2)
        starts = [1 + sum(-(-x // BS) for x in lens[:r.start]) for r in runs]
        return prefill_inputs(lens), [prefill_inputs(lens[r.start:r.stop], b) for r, b in zip(runs, starts, strict=True)]
    half = n // 2
    return decode_inputs(n, size), [decode_inputs(half, size), decode_inputs(half, size, 1 + half * -(-(size + 1) // BS))]


def measure(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    for fn in variants.values():  # compile and warm
        fn()
        fn()
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def timeline_figures(pp: PipelineExecutor, mbs: list[StepInputs], reps: int) -> tuple[float, float]:
    """(median makespan / wavefront of the measured stage times, median stage time overlapped / alone)."""
    ratio, stretch = [], []
    for _ in range(reps):
        spans = pp.record_timeline()
        jax.block_until_ready(pp.execute_many(mbs))
        alone = pp.record_timeline()
        for mb in mbs:
            jax.block_until_ready(pp.execute(mb))
        pp.stop_timeline()
        c = {(s.stage, s.mb): s.end - s.start for s in spans}
        durations = [[c[0, m], c[1, m]] for m in range(len(mbs))]
        makespan = max(s.end for s in spans) - min(s.start for s in spans)
        ratio.append(makespan / wavefront(durations)[-1][-1][1])
        solo = [s.end - s.start for s in alone]  # stage 0, 1 of mb 0, then of mb 1
        stretch.append((c[1, 0] + c[0, 1]) / (solo[1] + solo[2]))  # the two stage runs that overlap
    return statistics.median(ratio), statistics.median(stretch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    reps = a.reps or (3 if a.quick else 7)
    cfg = model_preset("opt-125m").replace(vocab_size=8192)
    params = random_params_numpy(cfg)
    devs = jax.devices()
    one = ModelExecutor(cfg, params, devs[:1])
    pp = PipelineExecutor(cfg, params, devs[2:4], pp=2)
    one.init_kv(NUM_BLOCKS, BS)
    pp.init_kv(NUM_BLOCKS, BS)
    shapes = [("prefill", 4, 64), ("prefill", 4, 128), ("decode", 16, 256), ("decode", 64, 256)]
    if not a.quick:
        shapes.insert(2, ("prefill", 8, 64))
    rb = jax.block_until_ready
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {reps} repetitions\n")
    print("| call | pp=1 (ms) | pp=2, stages in turn | pp=2, 2 micro-batches | planner: in turn / micro-batched "
          "| measured / planner: in turn / micro-batched | makespan / wavefront | stage stretch |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, size in shapes:
        whole, mbs = calls(kind, n, size)
        t = measure({
            "pp1": lambda w=whole: rb(one.execute(w)),
            "pp1_mb0": lambda m=mbs: rb(one.execute(m[0])),
            "pp1_mb1": lambda m=mbs: rb(one.execute(m[1])),
            "pp2_turn": lambda w=whole: rb(pp.execute(w)),
            "pp2_mb": lambda m=mbs: rb(pp.execute_many(m)),
        }, reps)
        med = {k: statistics.median(v) for k, v in t.items()}
        plan_mb = [wavefront([[x / 2, x / 2] for x in (a0, a1)])[-1][-1][1]
                   for a0, a1 in zip(t["pp1_mb0"], t["pp1_mb1"], strict=True)]
        r_turn = statistics.median(x / y for x, y in zip(t["pp2_turn"], t["pp1"], strict=True))
        r_mb = statistics.median(x / y for x, y in zip(t["pp2_mb"], plan_mb, strict=True))
        ratio, stretch = timeline_figures(pp, mbs, reps)
        label = f"{kind} {n} x {size}" + ("" if kind == "prefill" else " ctx")
        print(f"| {label} | {med['pp1'] * 1e3:.0f} | {med['pp2_turn'] * 1e3:.0f} | {med['pp2_mb'] * 1e3:.0f} | "
              f"{med['pp1'] * 1e3:.0f} / {statistics.median(plan_mb) * 1e3:.0f} | {r_turn:.2f} / {r_mb:.2f} | "
              f"{ratio:.2f} | {stretch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
