"""Does a burst of prompts slow a decoding stream? One server per system, over HTTP, side by side.

    OPT-125m-shaped random weights (an HF folder written once under --workdir)
    for each --system NAME=REPO (default: after=. ; a checkout of an older commit gives "before"):
        python -m jaxserve.launch --model DIR (the default: 1 prefill + 1 decode instance, in-process)
        one streamed completion (ignore_eos) decodes alone for --alone tokens
        then --burst prompts of --prompt-len tokens arrive at once (max_tokens 1)
        gaps between the stream's chunks: p50 alone, p90 / max while the burst is prefilled
    --> a table (ratio p90 during / p50 alone; target <= 4x), --out JSON

Example (the figures in docs/performance.md):
    git worktree add /tmp/before 9f6e716
    python scripts/bench_interference.py --system before=/tmp/before --system after=.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", action="append", default=None, metavar="NAME=REPO",
                   help="a jaxserve checkout to serve from (repeatable)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "jaxserve" / "bench-interference"))
    p.add_argument("--burst", type=int, default=6, help="prompts in the burst")
    p.add_argument("--prompt-len", type=int, default=900, help="tokens per burst prompt")
    p.add_argument("--alone", type=int, default=40, help="tokens the stream decodes before the burst")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for warm-up")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    a.system = a.system or ["after=."]
    for s in a.system:
        name, _, repo = s.partition("=")
        if not name or not repo or not Path(repo, "jaxserve").is_dir():
            p.error(f"--system {s!r}: expected NAME=REPO with REPO a jaxserve checkout")
    if a.prompt_len >= a.max_model_len:
        p.error(f"--prompt-len {a.prompt_len} must be below --max-model-len {a.max_model_len}")
    return a


def ensure_model(workdir: Path) -> Path:
    from jaxserve.config import model_preset
    from jaxserve.model.demo import random_params_numpy
    from jaxserve.model.loader import export_hf

    out = workdir / "opt-125m-random"
    if not (out / "model.safetensors").is_file():
        cfg = model_preset("opt-125m")
        export_hf(random_params_numpy(cfg, seed=0), cfg, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, model: Path, port: int, a: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(repo.resolve()), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "jaxserve.launch", "--model", str(model), "--port", str(port),
           "--max-model-len", str(a.max_model_len), "--max-num-seqs", "16"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        if "jaxserve: ready" in line:
            return proc
        if time.monotonic() - t0 > a.ready_timeout:
            break
    proc.kill()
    raise SystemExit(f"error: the server in {repo} did not get ready (exit {proc.poll()})")


async def scenario(url: str, a: argparse.Namespace) -> dict[str, float]:
    import aiohttp

    rng = np.random.default_rng(0)
    times: list[float] = []
    burst_window: list[float] = []
    async with aiohttp.ClientSession() as s:
        async def stream() -> None:
            body = {"prompt": [2, *rng.integers(4, 50000, 30).tolist()], "max_tokens": a.alone + 400,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        times.append(time.perf_counter())
                        if burst_window and len(burst_window) == 2:
                            return

        async def one(i: int) -> None:
            body = {"prompt": [2, *rng.integers(4, 50000, a.prompt_len - 1).tolist()], "max_tokens": 1}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                await r.read()

        task = asyncio.ensure_future(stream())
        while len(times) < a.alone:
            await asyncio.sleep(0.01)
        burst_window.append(time.perf_counter())
        await asyncio.gather(*[one(i) for i in range(a.burst)])
        burst_window.append(time.perf_counter())
        await asyncio.wait_for(task, 120)
    t = np.array(times)
    alone = np.diff(t[5:a.alone])  # skip the first few (prefill, transfer)
    during = np.diff(t[(t >= burst_window[0]) & (t <= burst_window[1])])
    return {"p50_alone_ms": 1e3 * float(np.median(alone)), "p90_during_ms": 1e3 * float(np.percentile(during, 90)),
            "max_during_ms": 1e3 * float(during.max()), "gaps_during": int(during.size),
            "burst_s": burst_window[1] - burst_window[0]}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    model = ensure_model(Path(a.workdir))
    load = os.getloadavg()
    results = {}
    for spec in a.system:
        name, _, repo = spec.partition("=")
        port = free_port()
        proc = start_server(Path(repo), model, port, a)
        try:
            results[name] = asyncio.run(scenario(f"http://127.0.0.1:{port}", a))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        r = results[name]
        r["ratio"] = r["p90_during_ms"] / r["p50_alone_ms"]
    print(f"load average before: {load[0]:.2f}; burst of {a.burst} x {a.prompt_len}-token prompts")
    print("| system | p50 gap alone (ms) | p90 gap during burst (ms) | max gap during (ms) | gaps | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['p50_alone_ms']:.1f} | {r['p90_during_ms']:.1f} | {r['max_during_ms']:.1f} | "
              f"{r['gaps_during']} | {r['ratio']:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps({"load": load, "args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
