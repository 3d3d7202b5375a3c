"""Issue 16: automatic prefix caching, side by side with it off, in one process on the same weights.

    python scripts/bench_prefix_cache.py              # the figures in docs/performance.md (~5 min)
    python scripts/bench_prefix_cache.py --quick      # a smoke run

What flows through: OPT-125m-shaped random float32 weights (numpy seed) -> two colocated engines
(prefix caching on / off; same limits, both warmed up, so no compile is timed), then

1. TTFT with a shared system prompt: a 1,000-token system prompt + a distinct 32-token question,
   one request at a time (TTFT = its prefill; 1 output token): the first request on the caching
   engine misses (computes all), the next ``--requests`` hit (compute the question); the same
   requests on the engine without the cache all miss. Medians, ratio miss / hit.
2. Multi-turn chat: ``--conversations`` conversations of ``--turns`` turns, each turn's prompt the
   whole conversation so far (earlier questions and answers) + a new 64-token question, 32 answer
   tokens; turn t of every conversation is submitted together. Wall time and generated tokens/s on
   each engine, ratio; every answer must be token-identical between the two engines.

Results are printed and written between markers into docs/performance.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from _docs import write_block

from jaxserve.config import EngineConfig, model_preset
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.model.demo import random_params_numpy
from jaxserve.request import Event, Request, SamplingParams

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench_prefix_cache] {msg}", file=sys.stderr, flush=True)


def ttft_s(req: Request) -> float:
    return req.event_times(Event.PREFILL_ENDED)[0] - req.arrival_time


def shared_prompt_ttft(engines: dict[str, LLMEngine], rng: np.random.Generator, system_len: int,
                       n: int, vocab: int) -> dict[str, list[float]]:
    system = [2, *rng.integers(4, vocab, system_len - 1).tolist()]
    questions = [rng.integers(4, vocab, 32).tolist() for _ in range(n + 1)]
    out: dict[str, list[float]] = {}
    for name, eng in engines.items():
        times = []
        for i, q in enumerate(questions):
            r = Request(f"{name}-t{i}", system + q, SamplingParams(max_tokens=1), arrival_time=time.perf_counter())
            run_requests(eng, [r])
            times.append(ttft_s(r))
            assert (r.num_cached_tokens > 0) == (name == "cache on" and i > 0), (name, i, r.num_cached_tokens)
        out[name] = times
    return out


def multi_turn(eng: LLMEngine, convs: int, turns: int, rng_seed: int, vocab: int) -> tuple[float, int, list]:
    rng = np.random.default_rng(rng_seed)
    history = [[2, *rng.integers(4, vocab, 63).tolist()] for _ in range(convs)]
    answers: list[list[int]] = []
    generated, t0 = 0, time.perf_counter()
    for t in range(turns):
        reqs = [Request(f"c{c}-t{t}", h + rng.integers(4, vocab, 64).tolist(),
                        SamplingParams(max_tokens=32, ignore_eos=True)) for c, h in enumerate(history)]
        outs = run_requests(eng, reqs)
        for c, (r, o) in enumerate(zip(reqs, outs, strict=True)):
            history[c] = r.prompt_token_ids + o.token_ids
            answers.append(o.token_ids)
            generated += len(o.token_ids)
    return time.perf_counter() - t0, generated, answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small prompt, few requests")
    p.add_argument("--requests", type=int, default=8, help="hit requests after the first (TTFT part)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    system_len = 200 if a.quick else 1000
    convs, turns = (2, 2) if a.quick else (a.conversations, a.turns)
    started, load0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]
    cfg = model_preset("opt-125m")
    params = random_params_numpy(cfg, seed=a.seed, std=0.02)
    lim = dict(max_num_seqs=16, max_model_len=2048, max_num_batched_tokens=2048, num_blocks=2600)
    engines = {name: LLMEngine(cfg, params, EngineConfig(prefix_caching=on, **lim), name=name)
               for name, on in (("cache on", True), ("cache off", False))}
    for name, eng in engines.items():
        t = time.perf_counter()
        log(f"warming up {name}: {eng.warmup()} shapes in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(a.seed)
    log("TTFT with a shared system prompt ...")
    tt = shared_prompt_ttft(engines, rng, system_len, 2 if a.quick else a.requests, cfg.vocab_size)
    log("multi-turn chat ...")
    chat = {name: multi_turn(eng, convs, turns, a.seed + 1, cfg.vocab_size) for name, eng in engines.items()}
    same = chat["cache on"][2] == chat["cache off"][2]
    compiles = {n: e.compilations_since_warmup for n, e in engines.items()}
    md = report(a, started, load0, system_len, tt, chat, same, compiles, engines["cache on"], convs, turns)
    print(md)
    if not a.no_write:
        write_block(a.out, "bench_prefix_cache", md)
        log(f"wrote section 'bench_prefix_cache' to {a.out}")
    return 0 if same else 1


def report(a: argparse.Namespace, started: str, load0: float, system_len: int, tt: dict[str, list[float]],
           chat: dict[str, tuple[float, int, list]], same: bool, compiles: dict[str, int], on: LLMEngine,
           convs: int, turns: int) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    ms = lambda xs: f"{statistics.median(xs) * 1e3:.0f} ms"  # noqa: E731
    miss, hit, off = tt["cache on"][:1], tt["cache on"][1:], tt["cache off"][1:]
    (w_on, g_on, _), (w_off, g_off, _) = chat["cache on"], chat["cache off"]
    cmd = "python scripts/bench_prefix_cache.py" + (" --quick" if a.quick else "")
    return "\n".join([
        "## Prefix caching (issue 16)", "",
        f"Command: `{cmd}`  ",
        f"Started {started}; commit {commit.strip()}{' + uncommitted changes' if dirty else ''}; load average (1 min) "
        f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; {os.cpu_count()} cores, Python {platform.python_version()}.",
        "OPT-125m-shaped random float32 weights; two colocated engines in one process (prefix caching on / off), "
        "max_num_seqs 16, max_model_len 2048, 2600 KV blocks of 16, both warmed up (compiles after warm-up: "
        f"{compiles['cache on']} / {compiles['cache off']}).", "",
        f"### TTFT, {system_len}-token system prompt + a distinct 32-token question, one request at a time", "",
        "| | TTFT (median) | requests |", "|---|---|---|",
        f"| cache on, first request (miss: computes {system_len + 32} tokens) | {ms(miss)} | 1 |",
        f"| cache on, later requests (hit: {system_len // 16 * 16} tokens cached) | **{ms(hit)}** | {len(hit)} |",
        f"| cache off (every request computes all) | **{ms(off)}** | {len(off)} |",
        f"| **ratio off / hit** | **{statistics.median(off) / statistics.median(hit):.1f}x** | |", "",
        f"### Multi-turn chat: {convs} conversations x {turns} turns (each prompt = the conversation so far + "
        "64 new tokens; 32 answer tokens)", "",
        "| engine | wall | generated tokens | tok/s |", "|---|---|---|---|",
        f"| cache on | {w_on:.1f} s | {g_on} | **{g_on / w_on:.1f}** |",
        f"| cache off | {w_off:.1f} s | {g_off} | **{g_off / w_off:.1f}** |",
        f"| **ratio on / off** | | | **{(g_on / w_on) / (g_off / w_off):.2f}x** |", "",
        f"Every answer token-identical between the engines: {'yes' if same else '**NO**'}. Prefix-cache counters of "
        f"the caching engine: {on.blocks.hit_tokens} of {on.blocks.query_tokens} looked-up prompt tokens hit.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
