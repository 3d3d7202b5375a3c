"""Issue 13: start-up, memory and offline speed a user feels, as whole processes, side by side in one run.

    python scripts/bench_startup.py            # the figures in docs/performance.md (~20-40 min on 2 cores)
    python scripts/bench_startup.py --quick    # a smoke run: 8 short prompts, 2 vs 8 layers

Everything runs on this machine, on 127.0.0.1, with nothing downloaded. What flows through:

    OPT-125m-shaped random float32 weights (numpy seed) --export_hf--> WORK/opt-125m (HF folder)
    bench_offline's Workload (48 prompts, lengths uniform 32..512, outputs 16..256, seed 0)
      --> WORK/prompts.jsonl ({"prompt_token_ids", "max_tokens"} per line; EOS ignored)
    1. offline: `generate_offline.py --model ... --ignore-eos --compilation-cache WORK/xla-offline`,
       every other flag at its default (no --warmup: shapes compile as the batch first needs them),
       twice with one fresh cache dir (cold, then warm); vs HF transformers in a process of its own
       (import, from_pretrained, left-padded greedy batched generate, 2 torch threads), batches
       sorted by (output, prompt) length and in workload order --> wall times, ratios HF / ours,
       peak RSS (os.wait4), first-token agreement
    2. compile: a fresh process per depth (12, 48 layers of OPT-125m width), cache off,
       LLMEngine.warmup() --> seconds per shape and per compiled program, ratio deep / shallow
    3. launcher: `python -m jaxserve.launch --port P --compilation-cache WORK/xla-launch` (demo model,
       $JAXSERVE_CACHE = WORK/home, so the cold start also builds the native kernels) until the line
       "jaxserve: ready", then SIGINT; twice (cold, second start)
    --> a markdown section, printed and written between markers into docs/performance.md

The inputs, HF and compile processes are `scripts/_startup_children.py`; the markdown is `scripts/_startup_report.py`.
Each timed process pays its own imports; peak RSS is per process (os.wait4), the driver's excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _startup_report import grep, render

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
SECTION = "bench_startup"
PARTS = ("offline", "compile", "launch")
CHILDREN = str(Path(__file__).resolve().parent / "_startup_children.py")


def log(msg: str) -> None:
    print(f"[bench_startup] {msg}", file=sys.stderr, flush=True)


# ---- running a whole process ------------------------------------------------------------------

@dataclasses.dataclass
class Proc:
    wall_s: float
    max_rss_gib: float  # this process and its waited-for children (os.wait4's rusage)
    rc: int
    log: Path
    ready_s: float | None = None  # launcher: start -> the ready line

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def child_env(work: Path) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "JAXSERVE_CACHE": str(work / "home"),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}


def run_process(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
                ready: str | None = None) -> Proc:
    """Run ``cmd`` to its exit (or, with ``ready``, until a line containing it, then SIGINT); wall time from
    the start, peak RSS from ``os.wait4``. Output goes to ``log_path``. Killed after ``timeout_s``."""
    seen = threading.Event()
    t0 = time.perf_counter()
    ready_at: list[float] = []
    with open(log_path, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pump() -> None:  # keep the pipe drained; note when the ready line shows
            assert p.stdout is not None
            for line in p.stdout:
                f.write(line)
                if ready is not None and not ready_at and ready in line:
                    ready_at.append(time.perf_counter() - t0)
                    seen.set()
            seen.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killer = threading.Timer(timeout_s, p.kill)
        killer.start()
        if ready is not None:
            seen.wait(timeout_s)
            if ready_at:  # running and ready (poll() here would reap a process that exited, breaking wait4)
                p.send_signal(signal.SIGINT)
                threading.Timer(60, p.kill).start()  # a server that does not stop on SIGINT
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        killer.cancel()
        reader.join(10)
    p.returncode = os.waitstatus_to_exitcode(status)
    return Proc(wall, ru.ru_maxrss * 1024 / GIB, p.returncode, log_path, ready_at[0] if ready_at else None)


def checked(proc: Proc, what: str) -> Proc:
    if proc.rc != 0 and proc.ready_s is None:
        tail = "\n".join(proc.text().splitlines()[-15:])
        raise SystemExit(f"error: {what} exited {proc.rc} (log {proc.log}):\n{tail}")
    return proc


# ---- inputs -------------------------------------------------------------------------------------

def write_inputs(work: Path, num_prompts: int, quick: bool, seed: int, timeout_s: float) -> dict[str, Any]:
    """The OPT-125m-shaped HF folder, the prompts JSONL and a workload summary, written by a child process:
    the driver stays small, since a child's peak RSS (os.wait4) starts from its parent's at the fork."""
    cmd = [sys.executable, CHILDREN, "inputs", "--dir", str(work), "--num-prompts", str(num_prompts),
           "--seed", str(seed)] + (["--quick"] if quick else [])
    log("writing the OPT-125m-shaped checkpoint and the prompts ...")
    checked(run_process(cmd, child_env(work), work / "inputs.log", timeout_s), "inputs")
    return json.loads((work / "workload.json").read_text())


def read_tokens(path: Path) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in path.read_text().splitlines() if line.strip()]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of requests with the same first token, mean share of tokens equal before the first difference)."""
    first = [a[:1] == b[:1] for a, b in zip(ours, ref, strict=True)]
    prefix = []
    for a, b in zip(ours, ref, strict=True):
        n = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    return sum(first) / len(first), sum(prefix) / len(prefix)


# ---- 1. offline: ours vs HF -----------------------------------------------------------------------

def run_ours(work: Path, model: Path, prompts: Path, tag: str, timeout_s: float) -> Proc:
    out = work / f"ours-{tag}.jsonl"
    cmd = [sys.executable, "scripts/generate_offline.py", "--model", str(model), "--input", str(prompts),
           "--output", str(out), "--ignore-eos", "--compilation-cache", str(work / "xla-offline")]
    log(f"offline, ours ({tag} cache): {shlex.join(cmd[1:])}")
    proc = checked(run_process(cmd, child_env(work), work / f"ours-{tag}.log", timeout_s), f"generate_offline ({tag})")
    log(f"  {proc.wall_s:.1f} s, peak RSS {proc.max_rss_gib:.2f} GiB")
    return proc


def run_hf(work: Path, model: Path, prompts: Path, batch_size: int, sort: bool, timeout_s: float) -> Proc:
    tag = f"hf-bs{batch_size}-{'sorted' if sort else 'unsorted'}"
    cmd = [sys.executable, CHILDREN, "hf", "--model", str(model), "--input", str(prompts),
           "--output", str(work / f"{tag}.jsonl"), "--batch-size", str(batch_size)] + (["--sort"] if sort else [])
    log(f"offline, HF ({tag}) ...")
    proc = checked(run_process(cmd, child_env(work), work / f"{tag}.log", timeout_s), tag)
    log(f"  {proc.wall_s:.1f} s, peak RSS {proc.max_rss_gib:.2f} GiB")
    return proc


# ---- 2. compile seconds per shape vs depth ------------------------------------------------------

def run_compile(work: Path, layers: int, seqs: int, model_len: int, timeout_s: float) -> dict[str, Any]:
    out = work / f"compile-{layers}.json"
    cmd = [sys.executable, CHILDREN, "compile", "--layers", str(layers),
           "--max-num-seqs", str(seqs), "--max-model-len", str(model_len), "--output", str(out)]
    log(f"compile, {layers} layers (max_num_seqs {seqs}, max_model_len {model_len}, cache off) ...")
    proc = checked(run_process(cmd, child_env(work), work / f"compile-{layers}.log", timeout_s), f"compile {layers}")
    r = {**json.loads(out.read_text()), "wall_s": proc.wall_s, "max_rss_gib": proc.max_rss_gib}
    log(f"  {r['shapes']} shapes, {r['compiled']} programs compiled in {r['warmup_s']:.1f} s")
    return r


# ---- 3. launcher to ready ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(work: Path, tag: str, timeout_s: float) -> Proc:
    cmd = [sys.executable, "-m", "jaxserve.launch", "--port", str(free_port()),
           "--compilation-cache", str(work / "xla-launch")]
    log(f"launcher ({tag}): {shlex.join(cmd[1:])}")
    proc = run_process(cmd, child_env(work), work / f"launch-{tag}.log", timeout_s, ready="jaxserve: ready")
    if proc.ready_s is None:
        checked(dataclasses.replace(proc, rc=proc.rc or 1), f"launcher ({tag})")
    log(f"  ready after {proc.ready_s:.1f} s")
    return proc


# ---- context --------------------------------------------------------------------------------------

def context() -> dict[str, str]:
    """Commit, uncommitted tracked changes (others share this work tree), machine."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    dirty = [line[3:] for line in git("status", "--short", "--untracked-files=no").splitlines()]
    cpu = grep(Path("/proc/cpuinfo").read_text(), r"(?<=model name\t: ).*") if Path("/proc/cpuinfo").exists() else "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return {"commit": git("rev-parse", "--short", "HEAD").strip() + (f" + uncommitted changes in {', '.join(dirty)}"
                                                             if dirty else ""),
            "machine": f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB RAM, Python {platform.python_version()}"}


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 short prompts, 2 vs 8 layers, small limits")
    p.add_argument("--num-prompts", type=int, default=None, help="default 48 (8 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="weights and workload seed")
    p.add_argument("--hf-batch-size", type=int, default=None, help="default 16 (8 with --quick)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated subset to run; a subset writes a block of its own (the full run's stays)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds any one process may take")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def offline_part(r: dict[str, Any], work: Path, a: argparse.Namespace) -> None:
    model, prompts = r["model"], r["prompts"]
    r["ours"] = {tag: run_ours(work, model, prompts, tag, a.timeout) for tag in ("cold", "warm")}
    cache = [f for f in (work / "xla-offline").rglob("*") if f.is_file()]
    r["cache_files"], r["cache_mb"] = len(cache), sum(f.stat().st_size for f in cache) / 1e6
    r["hf_batch"] = bs = a.hf_batch_size or (8 if a.quick else 16)
    r["hf"] = {key: run_hf(work, model, prompts, bs, key == "sorted", a.timeout) for key in ("sorted", "unsorted")}
    ours = read_tokens(work / "ours-cold.jsonl")
    r["same_tokens"] = ours == read_tokens(work / "ours-warm.jsonl")
    r["agree"] = agreement(ours, read_tokens(work / f"hf-bs{bs}-sorted.jsonl"))


def chosen_parts(a: argparse.Namespace) -> list[str]:
    parts = set(a.parts.split(","))
    if not parts <= set(PARTS):
        raise SystemExit(f"error: --parts {a.parts!r}: choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def bench(a: argparse.Namespace, argv: list[str], work: Path) -> dict[str, Any]:
    parts = chosen_parts(a)
    r: dict[str, Any] = {"command": shlex.join(["python", "scripts/bench_startup.py", *argv]), "seed": a.seed,
                         "started": time.strftime("%Y-%m-%d %H:%M %Z"), "load": [os.getloadavg()[0]],
                         "ctx": context(),
                         "parts": parts, "partial": len(parts) < len(PARTS)}
    t0 = time.perf_counter()
    log(f"work dir {work}; {r['ctx']}")
    if "offline" in parts:
        r["workload"] = write_inputs(work, a.num_prompts or (8 if a.quick else 48), a.quick, a.seed, a.timeout)
        r["model"], r["prompts"] = work / "opt-125m", work / "prompts.jsonl"
        offline_part(r, work, a)
    if "compile" in parts:
        r["seqs"], r["model_len"] = (4, 128) if a.quick else (16, 512)
        r["compile"] = [run_compile(work, n, r["seqs"], r["model_len"], a.timeout)
                        for n in ((2, 8) if a.quick else (12, 48))]
    if "launch" in parts:
        r["launch"] = {tag: run_launcher(work, tag, a.timeout) for tag in ("cold", "second")}
    r["load"].append(os.getloadavg()[0])
    r["total_s"] = time.perf_counter() - t0
    return r


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    keep = contextlib.nullcontext(str(a.workdir)) if a.workdir else tempfile.TemporaryDirectory(prefix="bench-startup-")
    with keep as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        md = render(bench(a, argv, work))  # reads the logs in the work dir
    print(md)
    if not a.no_write:
        from _docs import write_block

        parts = chosen_parts(a)
        name = SECTION if len(parts) == len(PARTS) else f"{SECTION}: {'+'.join(parts)}"
        write_block(a.out, name, md)
        log(f"wrote section {name!r} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
