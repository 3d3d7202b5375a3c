"""Issue 7: per-core goodput of disaggregated vs colocated vs chunked-prefill serving, on this CPU.

    random OPT-125m-shaped HF folder (float32; written once to the jaxserve cache)
    --> per system, two Ray actors, each pinned to its own core with one XLA thread:
          disaggregated  prefill (core 0) + decode (core 1)
          colocated      2 replicas, prefill-first continuous batching (cores 0, 1)
          chunked        2 replicas, chunked prefill (Sarathi-style token budget)
        behind the server's Orchestrator (the same code path as the HTTP server), warmed up
    --> SLOs from the unloaded colocated instance (multiples of its TTFT on the mean prompt and its
        batch-1 TPOT), unless given
    --> per rate: the same Poisson arrivals and lengths for every system (seeded), each request
        streamed through Orchestrator.generate; TTFT/TPOT per jaxserve.slo, the five-stage
        breakdown from each request's lifecycle events
    --> attainment vs per-core rate, per-core goodput at the attainment target (linear
        interpolation between swept rates), JSON, a PNG plot, a section of docs/performance.md

Workload (chatbot-like, scaled to a 2-core CPU): prompt ~ lognormal(median 128, sigma 0.7)
clipped to [32, 512]; output ~ lognormal(median 64, sigma 0.7) clipped to [16, 256];
``ignore_eos`` so outputs have exactly those lengths. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("disaggregated", "colocated", "chunked")
PROMPT = (128, 0.7, 32, 512)  # lognormal median, sigma, clip lo, clip hi
OUTPUT = (64, 0.7, 16, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--rates", default="0.3,0.45,0.6,0.75",
                   help="per-core request rates to sweep (req/s per core; each system has 2 cores)")
    p.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals per rate (at least --min-requests)")
    p.add_argument("--min-requests", type=int, default=20)
    p.add_argument("--drain-timeout", type=float, default=90.0,
                   help="after the last arrival, requests still running this long are cut (count as misses)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: --ttft-mult x unloaded TTFT)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: --tpot-mult x unloaded TPOT)")
    p.add_argument("--ttft-mult", type=float, default=4.0)
    p.add_argument("--tpot-mult", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment target for goodput")
    p.add_argument("--token-budget", type=int, default=768,
                   help="prefill token budget per step (prefill-first and disaggregated prefill; >= 768, the context)")
    p.add_argument("--chunk-budget", type=int, default=256, help="chunked prefill: tokens per step (decodes + chunk)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="opt-125m", help="model preset (random weights of that shape)")
    p.add_argument("--quick", action="store_true", help="a 2-layer model, two short rates: a smoke run")
    p.add_argument("--json", default=str(ROOT / "docs/figures/goodput.json"))
    p.add_argument("--plot", default=str(ROOT / "docs/figures/goodput.png"))
    p.add_argument("--out", default=str(ROOT / "docs/performance.md"))
    p.add_argument("--no-write", action="store_true", help="print only (no markdown section)")
    a = p.parse_args(argv)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        p.error(f"--systems: unknown {bad}; choose from {SYSTEMS}")
    try:
        a.rates = sorted(float(r) for r in a.rates.split(","))
    except ValueError:
        p.error(f"--rates: not a comma-separated list of numbers: {a.rates!r}")
    if not a.rates or any(r <= 0 for r in a.rates):
        p.error(f"--rates must be positive, got {a.rates}")
    if os.cpu_count() is not None and os.cpu_count() < 2:
        p.error("this experiment pins two instances to two cores; this machine has fewer")
    return a


# ---- model and workload --------------------------------------------------------------------------
def ensure_model(preset: str, quick: bool) -> tuple[Path, Any]:
    import dataclasses

    from jaxserve.config import model_preset
    from jaxserve.model.demo import cache_dir, random_params_numpy
    from jaxserve.model.loader import export_hf

    cfg = model_preset(preset)
    if quick:
        cfg = dataclasses.replace(cfg, num_hidden_layers=2)
    out = cache_dir() / f"experiment-{cfg.name}-{cfg.num_hidden_layers}l"
    if not (out / "config.json").is_file():
        print(f"writing a random {cfg.name} ({cfg.num_hidden_layers} layers) to {out} ...", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        export_hf(random_params_numpy(cfg, seed=0), cfg, tmp)
        tmp.rename(out)
    return out, cfg


def lengths(rng: np.random.Generator, n: int, spec: tuple[float, float, int, int]) -> np.ndarray:
    median, sigma, lo, hi = spec
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int)


def workload(rate: float, n: int, seed: int, vocab: int) -> list[dict[str, Any]]:
    """n requests: Poisson arrivals at ``rate`` req/s, chatbot-like lengths, random prompt ids."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    p, o = lengths(rng, n, PROMPT), lengths(rng, n, OUTPUT)
    return [{"arrival": float(t), "prompt_len": int(pl), "output_len": int(ol),
             "prompt": [2, *rng.integers(4, vocab, pl - 1).tolist()]}
            for t, pl, ol in zip(arrivals, p, o, strict=True)]


# ---- systems ---------------------------------------------------------------------------------------
def start_system(name: str, model: Path, a: argparse.Namespace) -> Any:
    from jaxserve.cluster.actors import ActorOptions
    from jaxserve.cluster.ray_instance import launch_router
    from jaxserve.config import EngineConfig

    max_len = PROMPT[3] + OUTPUT[3]
    common = dict(max_model_len=max_len, max_num_seqs=a.max_num_seqs, block_size=16, kv_cache_gb=1.0)
    opts = [ActorOptions(num_cpus=1, cpu_affinity=(core,), xla_threads=1) for core in (0, 1)]
    if name == "disaggregated":
        return launch_router(model, [("prefill-0", EngineConfig(mode="prefill", max_num_batched_tokens=a.token_budget,
                                                                **common)),
                                     ("decode-0", EngineConfig(mode="decode", max_num_batched_tokens=a.token_budget,
                                                               **common))], options=opts, timeout_s=600)
    mode, budget = ("chunked", a.chunk_budget) if name == "chunked" else ("colocated", a.token_budget)
    cfgs = [(f"colocated-{i}", EngineConfig(mode=mode, max_num_batched_tokens=budget, **common)) for i in range(2)]
    return launch_router(model, cfgs, options=opts, timeout_s=600)


async def run_rate(orch: Any, reqs: list[dict[str, Any]], drain_timeout: float, tag: str) -> list[dict[str, Any]]:
    """Stream every request at its arrival time; per request: times, TTFT, TPOT, stage breakdown."""
    from jaxserve import slo
    from jaxserve.request import Request, SamplingParams

    t0 = time.perf_counter() + 0.2
    results: list[dict[str, Any]] = [{} for _ in reqs]
    done = [0]

    async def one(i: int, r: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, t0 + r["arrival"] - time.perf_counter()))
        req = Request(f"{tag}-{i}", r["prompt"], SamplingParams(max_tokens=r["output_len"], ignore_eos=True))
        sent = req.events[0].time if req.events else time.perf_counter()
        first = last = None
        n = 0
        reason = None
        try:
            async for d in orch.generate(req):
                now = time.perf_counter()
                if d.token_ids:
                    first = first if first is not None else now
                    last = now
                    n += len(d.token_ids)
                if d.finish_reason is not None:
                    reason = d.finish_reason.value
        except asyncio.CancelledError:
            reason = "cut"
        rec = {k: r[k] for k in ("arrival", "prompt_len", "output_len")}
        rec.update(tokens=n, finish=reason)
        if first is not None and n == r["output_len"] and reason == "length":
            ttft = first - sent
            rec.update(ttft=ttft, tpot=0.0 if n == 1 else (last - first) / (n - 1), latency=last - sent)
            rec["breakdown"] = slo.breakdown([(e.kind, e.time) for e in req.events])
        else:
            rec.update(ttft=math.inf, tpot=math.inf, latency=math.inf)
        results[i] = rec
        done[0] += 1

    tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(reqs)]
    horizon = reqs[-1]["arrival"] + drain_timeout
    shown = time.perf_counter()
    while not all(t.done() for t in tasks) and time.perf_counter() - t0 < horizon:
        await asyncio.sleep(0.25)
        if time.perf_counter() - shown > 15:
            shown = time.perf_counter()
            print(f"  {tag}: {done[0]}/{len(reqs)} done at {shown - t0:.0f} s", flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return results


def attainment(rs: list[dict[str, Any]], ttft_slo: float, tpot_slo: float) -> float:
    ok = [r["ttft"] <= ttft_slo and r["tpot"] <= tpot_slo for r in rs]
    return float(np.mean(ok)) if ok else 0.0


def goodput(rates: list[float], att: list[float], target: float) -> float:
    """Highest rate where the attainment curve (linear between sweep points) is still >= target."""
    if not att or att[0] < target:
        return 0.0  # below the sweep: unknown, reported as 0 (sweep lower rates)
    best = rates[0]
    for (r0, a0), (r1, a1) in zip(zip(rates, att, strict=True), zip(rates[1:], att[1:], strict=True), strict=False):
        if a1 >= target:
            best = r1
            continue
        best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 > a1 else r0
        break
    return best


async def calibrate(orch: Any, vocab: int, seed: int) -> dict[str, float]:
    """Unloaded TTFT on a mean-length prompt and batch-1 TPOT (3 lone requests, medians)."""
    rng = np.random.default_rng(seed + 999)
    mean_p = int(np.mean(lengths(np.random.default_rng(seed), 4000, PROMPT)))
    out = []
    for i in range(3):
        r = [{"arrival": 0.0, "prompt_len": mean_p, "output_len": 32,
              "prompt": [2, *rng.integers(4, vocab, mean_p - 1).tolist()]}]
        out += await run_rate(orch, r, 120.0, f"cal{i}")
    return {"mean_prompt": mean_p, "ttft": float(np.median([o["ttft"] for o in out])),
            "tpot": float(np.median([o["tpot"] for o in out]))}


def stage_means(rs: list[dict[str, Any]]) -> dict[str, float]:
    from jaxserve.slo import STAGES

    ok = [r["breakdown"] for r in rs if "breakdown" in r]
    return {s: float(np.mean([b[s] for b in ok])) if ok else math.nan for s in STAGES}


async def run_system(name: str, model: Path, cfg: Any, a: argparse.Namespace, plan: dict[float, list[dict[str, Any]]],
                     slo_box: dict[str, Any]) -> dict[str, Any]:
    from jaxserve.serving.orchestrator import Orchestrator

    t = time.perf_counter()
    engine = start_system(name, model, a)
    loop = asyncio.get_running_loop()
    try:
        print(f"[{name}] actors up in {time.perf_counter() - t:.0f} s; warming up (every step shape) ...", flush=True)
        t = time.perf_counter()
        shapes = await loop.run_in_executor(None, engine.warmup)
        print(f"[{name}] {shapes} shapes compiled in {time.perf_counter() - t:.0f} s", flush=True)
        orch = Orchestrator(engine, None, max_queue=100000, token_timeout_s=3600)
        orch.start()
        try:
            unloaded = await calibrate(orch, cfg.vocab_size, a.seed)
            print(f"[{name}] unloaded: TTFT {unloaded['ttft'] * 1e3:.0f} ms on a {unloaded['mean_prompt']}-token "
                  f"prompt, TPOT {unloaded['tpot'] * 1e3:.0f} ms", flush=True)
            if "ttft" not in slo_box:  # the first system (colocated, by order) sets the SLOs
                slo_box["ttft"] = a.ttft_slo or a.ttft_mult * unloaded["ttft"]
                slo_box["tpot"] = a.tpot_slo or a.tpot_mult * unloaded["tpot"]
                slo_box["from"] = name
                print(f"SLOs: TTFT <= {slo_box['ttft'] * 1e3:.0f} ms, TPOT <= {slo_box['tpot'] * 1e3:.0f} ms", flush=True)
            runs = []
            for rate in a.rates:
                rs = await run_rate(orch, plan[rate], a.drain_timeout, f"{name}@{rate:g}")
                att = attainment(rs, slo_box["ttft"], slo_box["tpot"])
                ok = [r for r in rs if math.isfinite(r["ttft"])]
                runs.append({"per_core_rate": rate, "rate": 2 * rate, "attainment": att, "requests": rs,
                             "stages": stage_means(rs),
                             "ttft_p90": float(np.percentile([r["ttft"] for r in ok], 90)) if ok else math.inf,
                             "tpot_p90": float(np.percentile([r["tpot"] for r in ok], 90)) if ok else math.inf})
                print(f"[{name}] {rate:g} req/s/core: attainment {att:.0%}, TTFT p90 "
                      f"{runs[-1]['ttft_p90']:.2f} s, TPOT p90 {runs[-1]['tpot_p90'] * 1e3:.0f} ms", flush=True)
                while engine.has_unfinished():  # leftovers of a cut run end before the next rate
                    await asyncio.sleep(0.1)
            held = engine.held_blocks()
        finally:
            await loop.run_in_executor(None, orch.stop)
    finally:
        engine.shutdown()
    return {"unloaded": unloaded, "runs": runs, "held_blocks_after": held}


def write_outputs(a: argparse.Namespace, res: dict[str, Any]) -> str:
    systems = res["systems"]
    lines = []
    slo_t = res["slo"]
    lines.append(f"SLOs: TTFT <= {slo_t['ttft']:.2f} s, TPOT <= {slo_t['tpot'] * 1e3:.0f} ms "
                 f"({a.ttft_mult:g}x / {a.tpot_mult:g}x the unloaded {slo_t['from']} instance), target "
                 f"{a.target:.0%}.\n")
    head = "| per-core rate (req/s) | " + " | ".join(systems) + " |"
    lines += [head, "|" + "---|" * (len(systems) + 1)]
    for k, rate in enumerate(a.rates):
        lines.append(f"| {rate:g} | " + " | ".join(f"{systems[s]['runs'][k]['attainment']:.0%}" for s in systems)
                     + " |")
    def fmt(v: dict[str, Any]) -> str:  # ">=": the target still held at the highest rate swept
        return (">= " if v["runs"][-1]["attainment"] >= a.target else "") + f"{v['goodput_per_core']:.3f}"

    lines.append("| **goodput / core at target** | " + " | ".join(f"**{fmt(systems[s])}**" for s in systems) + " |")
    if "disaggregated" in systems:
        d = systems["disaggregated"]["goodput_per_core"]
        for s in systems:
            if s != "disaggregated" and systems[s]["goodput_per_core"] > 0:
                lines.append(f"\nDisaggregated / {s}: **{d / systems[s]['goodput_per_core']:.2f}x** per-core goodput.")
    lines.append("\nMean latency breakdown (s) at each system's highest rate with attainment >= 50%:\n")
    from jaxserve.slo import STAGES
    lines += ["| system | rate/core | " + " | ".join(STAGES) + " |", "|" + "---|" * (len(STAGES) + 2)]
    for s, v in systems.items():
        runs = [r for r in v["runs"] if r["attainment"] >= 0.5] or v["runs"][:1]
        r = runs[-1]
        lines.append(f"| {s} | {r['per_core_rate']:g} | " + " | ".join(f"{r['stages'][x]:.2f}" for x in STAGES) + " |")
    return "\n".join(lines)


def write_section(path: Path, title: str, body: str) -> None:
    """This experiment's block of the markdown file; everything else stays."""
    from _docs import write_block

    write_block(path, "experiment_goodput", f"## {title}\n\n{body}")


def plot(a: argparse.Namespace, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, v in res["systems"].items():
        ax.plot([r["per_core_rate"] for r in v["runs"]], [100 * r["attainment"] for r in v["runs"]], "o-", label=s)
    ax.axhline(100 * a.target, color="gray", ls="--", lw=1)
    ax.set_xlabel("rate per core (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"OPT-125m shape, float32, 2 CPU cores\nTTFT<={res['slo']['ttft']:.2f}s, "
                 f"TPOT<={res['slo']['tpot'] * 1e3:.0f}ms")
    ax.legend()
    ax.grid(alpha=0.3)
    Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)


async def amain(a: argparse.Namespace) -> int:
    import ray

    model, cfg = ensure_model(a.model, a.quick)
    plan = {}
    for k, rate in enumerate(a.rates):
        n = max(a.min_requests, round(2 * rate * a.duration))
        plan[rate] = workload(2 * rate, n, a.seed + k, cfg.vocab_size)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    order = sorted(a.systems, key=lambda s: (s != "colocated", SYSTEMS.index(s)))  # colocated first: it sets SLOs
    slo_box: dict[str, Any] = {}
    out: dict[str, Any] = {}
    try:
        for s in order:
            out[s] = await run_system(s, model, cfg, a, plan, slo_box)
    finally:
        ray.shutdown()
    for v in out.values():
        v["goodput_per_core"] = goodput(a.rates, [r["attainment"] for r in v["runs"]], a.target)
    res = {"model": f"{cfg.name} shape, {cfg.num_hidden_layers} layers, random weights, float32",
           "machine": f"{os.cpu_count()} cores; one instance per core (affinity), one XLA thread each",
           "workload": {"prompt_lognormal": PROMPT, "output_lognormal": OUTPUT, "arrivals": "poisson",
                        "seed": a.seed, "duration_s": a.duration, "min_requests": a.min_requests},
           "engine": {"token_budget": a.token_budget, "chunk_budget": a.chunk_budget, "max_num_seqs": a.max_num_seqs,
                      "block_size": 16},
           "slo": {**slo_box, "target": a.target}, "rates_per_core": a.rates,
           "systems": {s: out[s] for s in SYSTEMS if s in out}}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1, default=lambda x: None if x != x else x))
    plot(a, res)
    table = write_outputs(a, res)
    cmd = "python scripts/experiment_goodput.py " + " ".join(sys.argv[1:])
    print("\n" + table)
    if not a.no_write:
        write_section(Path(a.out), "Goodput experiment (issue 7)",
                      f"Command: `{cmd.strip()}` (raw data: `{os.path.relpath(a.json, ROOT)}`, plot: "
                      f"`{os.path.relpath(a.plot, ROOT)}`).\n\n{res['model']}; {res['machine']}. Workload: "
                      f"chatbot-like, prompt lognormal(median {PROMPT[0]}, sigma {PROMPT[1]}) in [{PROMPT[2]}, "
                      f"{PROMPT[3]}], output lognormal(median {OUTPUT[0]}, sigma {OUTPUT[1]}) in [{OUTPUT[2]}, "
                      f"{OUTPUT[3]}], Poisson arrivals, identical requests for every system.\n\n{table}\n")
    bad = {s: v["held_blocks_after"] for s, v in out.items() if any(v["held_blocks_after"].values())}
    if bad:
        print(f"warning: blocks still held after the runs: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.quick:
        a.rates = a.rates[:2]
        a.duration, a.min_requests, a.drain_timeout = min(a.duration, 15.0), min(a.min_requests, 8), 30.0
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())
