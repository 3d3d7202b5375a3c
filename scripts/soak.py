#!/usr/bin/env python
"""Soak test (issue 7): the real server under steady Poisson load for a long time; does it leak?

    python scripts/soak.py                       # demo model, 600 s at 0.7x measured capacity
    python scripts/soak.py --duration 40 --no-doc                     # a quick try
    python scripts/soak.py --server-args "--mode chunked --max-num-seqs 8"
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 12345    # a server already running

What flows through it:

    launcher: python -m jaxserve.launch --host 127.0.0.1 --port FREE [--server-args ...]
        (log in a file; "jaxserve: ready" in it = ready; exits early or times out -> its log tail)
      or --url of a running server (--pid PID for its RSS)
    --> a few warm-up requests, one per mix entry
    --> capacity: --concurrency closed-loop clients for --capacity-seconds; capacity = completed
        req/s over the run's last three quarters   (skipped with --capacity C or --rate R)
    --> soak: Poisson arrivals at --load x capacity (or --rate) for --duration seconds, each a
        streamed POST /v1/completions (benchmark_serving.py's client: ignore_eos, temperature 0,
        usage) drawn from a fixed mix of random token-id and text prompts with mixed max_tokens,
        every request bounded by --request-timeout
    --> every --sample-every seconds: RSS of the server's process tree (VmRSS of the pid and all
        its descendants, from /proc), requests sent / completed / failed, e2e latency p50/p99 of
        the requests that ended in the last interval, and /metrics gauges (KV use, running,
        waiting); one progress line each
    --> drain: wait for every request still in flight (each within its timeout)
    --> /metrics: kv_cache_usage_perc must be 0 on every instance and num_requests_running 0
        (polled for up to --settle-timeout seconds: the engine frees blocks just after the last token)
    --> SIGINT to the server (only the one this script started): it must exit 0 with
        "jaxserve: stopped" and no traceback in its log
    --> a table on stdout; the "soak" section of docs/reliability.md replaced (--no-doc: not);
        the whole summary as JSON with --json PATH

Targets: 0 errors (non-200 answers, broken or short streams, timeouts, connection errors, in the
capacity run and the soak); RSS growth < 5% from the first sample at or after --rss-warmup seconds
into the soak to the last sample under load; 0 KV blocks held at the end; exit status 0.

Exit status: 0 when every target is met, 1 when one is missed, 2 for bad flags, a taken port,
a server that fails to start or cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_serving, next to this file

from benchmark_serving import RequestResult, fetch_model, request_body, send_request, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- soak begin -->", "<!-- soak end -->"
FIRST_TOKEN_ID = 3  # OPT's <s>/<pad>/</s> are 0-2


class SoakError(Exception):
    """The soak cannot run (port taken, server does not start or answer); exit 2 with this message."""


# ------------------------------------------------------------------------------------------ the mix


@dataclasses.dataclass(frozen=True)
class MixEntry:
    """One kind of request: a prompt (``int``: that many random token ids; ``str``: that text) and max_tokens."""

    prompt: int | str
    max_tokens: int

    def label(self) -> str:
        p = f"{self.prompt} ids" if isinstance(self.prompt, int) else f"text({len(self.prompt)} chars)"
        return f"{p} -> {self.max_tokens}"


# Drawn uniformly. Longest prompt + output is 232 tokens, inside the demo model's 512-token context.
MIX: tuple[MixEntry, ...] = (
    MixEntry(16, 16),
    MixEntry(64, 64),
    MixEntry(200, 32),
    MixEntry(32, 128),
    MixEntry("Hello, my name is", 8),
    MixEntry("Once upon a time, in a small village by the sea, there lived an old fisherman who every "
             "morning rowed out past the rocks to check his nets.", 48),
)


def make_prompt(entry: MixEntry, rng: np.random.Generator, vocab_size: int) -> str | list[int]:
    if isinstance(entry.prompt, str):
        return entry.prompt
    return rng.integers(FIRST_TOKEN_ID, vocab_size, entry.prompt).tolist()


# ----------------------------------------------------------------------------------------- flags


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default not in (None, False, "", argparse.SUPPRESS) and "default" not in h:
            h += " (default: %(default)s)"
        return h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, validated (a bad one exits 2 with one line on stderr)."""
    p = _Parser(prog="soak.py", description=__doc__, formatter_class=_Formatter)
    srv = p.add_argument_group("server")
    srv.add_argument("--url", default=None,
                     help="soak a server that is already running at this base URL (http://host:port) instead "
                          "of starting one; it is not stopped afterwards")
    srv.add_argument("--pid", type=int, default=None,
                     help="with --url: the server's process id, for RSS (without it RSS is not measured)")
    srv.add_argument("--port", type=int, default=None,
                     help="port for the server this script starts on 127.0.0.1 (default: a free one); "
                          "a taken port is an error")
    srv.add_argument("--server-args", default="",
                     help="extra flags for python -m jaxserve.launch, one shell-quoted string, e.g. "
                          "--server-args=\"--mode chunked\" or --server-args=\"--model /path/to/opt-125m\"")
    srv.add_argument("--server-log", type=Path, default=None,
                     help="write the server's output here (default: a file in a new temporary folder)")
    srv.add_argument("--ready-timeout", type=float, default=900.0,
                     help="seconds to wait for the server to load, compile and say it is ready")
    load = p.add_argument_group("load")
    load.add_argument("--duration", type=float, default=600.0, help="seconds of Poisson load")
    load.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of measured capacity")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--capacity", type=float, default=None,
                      help="capacity in req/s, instead of measuring it (the soak runs at --load x this)")
    rate.add_argument("--rate", type=float, default=None,
                      help="soak at exactly this many req/s (no capacity run; --load is ignored)")
    load.add_argument("--capacity-seconds", type=float, default=40.0,
                      help="length of the closed-loop capacity run")
    load.add_argument("--concurrency", type=int, default=32,
                      help="closed-loop clients in the capacity run; more than the server's batch size "
                           "(the demo runs 16 sequences per instance), so that it saturates")
    load.add_argument("--request-timeout", type=float, default=120.0,
                      help="seconds one request may take (send to end of stream) before it counts as an error")
    load.add_argument("--vocab-size", type=int, default=512,
                      help="random prompt token ids are drawn from [3, vocab-size); 512 (the demo's) suits "
                           "every OPT model")
    load.add_argument("--seed", type=int, default=0, help="seed of the arrivals, mix choices and prompt ids")
    rep = p.add_argument_group("sampling and report")
    rep.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples (progress lines)")
    rep.add_argument("--rss-warmup", type=float, default=60.0,
                     help="RSS growth is measured from the first sample at or after this many seconds into "
                          "the soak (the first sample if the run is shorter)")
    rep.add_argument("--max-rss-growth", type=float, default=5.0, help="target: RSS growth below this, percent")
    rep.add_argument("--settle-timeout", type=float, default=15.0,
                     help="after the drain, seconds to wait for KV use and running requests to reach 0")
    rep.add_argument("--doc", type=Path, default=DOC,
                     help="Markdown file whose soak section (between <!-- soak begin/end --> markers) is "
                          "replaced; created with the reliability doc's headings if missing")
    rep.add_argument("--no-doc", action="store_true", help="do not write the doc (trial runs)")
    rep.add_argument("--json", type=Path, default=None, help="also write the full summary (every sample) here")
    a = p.parse_args(argv)
    if a.url is not None:
        if not re.match(r"^https?://[^/\s]+", a.url):
            p.error(f"--url must look like http://host:port, got {a.url!r}")
        a.url = a.url.rstrip("/")
        if a.port is not None or a.server_args or a.server_log is not None:
            p.error("--port, --server-args and --server-log are for the server this script starts; not with --url")
    elif a.pid is not None:
        p.error("--pid goes with --url (the server this script starts is measured anyway)")
    if a.port is not None and not 0 < a.port < 65536:
        p.error(f"--port must be in 1..65535, got {a.port}")
    for name in ("duration", "load", "capacity", "rate", "capacity_seconds", "request_timeout",
                 "sample_every", "max_rss_growth", "ready_timeout"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in ("rss_warmup", "settle_timeout"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v >= 0):
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if a.concurrency <= 0:
        p.error(f"--concurrency must be positive, got {a.concurrency}")
    if a.vocab_size <= FIRST_TOKEN_ID + 1:
        p.error(f"--vocab-size must be > {FIRST_TOKEN_ID + 1}, got {a.vocab_size}")
    try:
        a.server_argv = shlex.split(a.server_args)
    except ValueError as e:
        p.error(f"--server-args: {e}")
    if any(x in ("--port", "--host") or x.startswith(("--port=", "--host=")) for x in a.server_argv):
        p.error("--server-args: the script sets --host 127.0.0.1 and --port itself (use --port)")
    return a


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ the server


@dataclasses.dataclass
class Server:
    """The launcher this script started."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    command: list[str]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port (SO_REUSEADDR, as aiohttp binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def start_server(args: argparse.Namespace) -> Server:
    """Start the launcher on 127.0.0.1 and wait until its log says it is ready; SoakError if it does not."""
    host = "127.0.0.1"
    if args.port is not None:
        if not port_is_free(host, args.port):
            raise SoakError(f"port {args.port} on {host} is taken (another server?); pick another --port or "
                            "leave --port out for a free one")
        port = args.port
    else:
        port = free_port(host)
    log_path = args.server_log
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="jaxserve-soak-")) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "jaxserve.launch", "--host", host, "--port", str(port), *args.server_argv]
    log(f"starting the server: {shlex.join(['python', *cmd[1:]])}")
    log(f"server log: {log_path}")
    with open(log_path, "wb") as out:
        # Its own session: a Ctrl-C on this script reaches the server only through stop_server (clean exit).
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://{host}:{port}", log_path, cmd)
    t0 = time.monotonic()
    seen = 0
    next_note = 60.0
    try:
        while True:
            text = log_path.read_text(errors="replace")
            for line in text.splitlines()[seen:]:
                if line.startswith("jaxserve:") or line.startswith("error"):
                    log(f"  server: {line}")
            seen = len(text.splitlines())
            if "jaxserve: ready" in text:
                log(f"server ready after {time.monotonic() - t0:.0f} s (pid {proc.pid})")
                return server
            if proc.poll() is not None:
                raise SoakError(f"the server exited with status {proc.returncode} before it was ready; the last "
                                f"lines of {log_path}:\n{log_tail(log_path)}")
            waited = time.monotonic() - t0
            if waited > args.ready_timeout:
                stop_server(server, quiet=True)
                raise SoakError(f"the server was not ready after {args.ready_timeout:g} s (--ready-timeout); the "
                                f"last lines of {log_path}:\n{log_tail(log_path)}")
            if waited >= next_note:
                log(f"  still starting ({waited:.0f} s; compiling every shape takes a while on a busy CPU)")
                next_note += 60.0
            time.sleep(0.5)
    except BaseException:
        if proc.poll() is None:
            stop_server(server, quiet=True)
        raise


def stop_server(server: Server, timeout: float = 120.0, quiet: bool = False) -> dict[str, Any]:
    """SIGINT, wait; kill after ``timeout``. Exit status, seconds taken, what the log says."""
    t0 = time.monotonic()
    killed = False
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
            server.proc.kill()
            server.proc.wait()
    text = server.log_path.read_text(errors="replace")
    res = {"returncode": server.proc.returncode, "seconds": time.monotonic() - t0, "killed": killed,
           "stopped_line": "jaxserve: stopped" in text, "tracebacks": text.count("Traceback (most recent call last)")}
    res["ok"] = res["returncode"] == 0 and res["stopped_line"] and not killed and res["tracebacks"] == 0
    if not quiet:
        log(f"server exit status {res['returncode']} after SIGINT ({res['seconds']:.1f} s)"
            + (", killed after the timeout" if killed else "")
            + (", 'jaxserve: stopped' logged" if res["stopped_line"] else ", no 'jaxserve: stopped' in its log")
            + (f", {res['tracebacks']} traceback(s) in its log" if res["tracebacks"] else ""))
    return res


# -------------------------------------------------------------------------------------- sampling


def process_tree_rss_kib(pid: int) -> tuple[int, int] | None:
    """(summed VmRSS in KiB, number of processes) of ``pid`` and all its descendants; None if it is gone."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])  # after "(comm) ": state ppid ...
        children.setdefault(ppid, []).append(int(d))
    total, n, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if p == pid:
                return None
            continue
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.M)
        total += int(m.group(1)) if m else 0  # a zombie has no VmRSS
        n += 1
        todo.extend(children.get(p, []))
    return total, n


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) per sample line of the text exposition format."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            continue
    return out


def server_state(text: str) -> dict[str, Any]:
    """The gauges and counters the soak checks, from a /metrics body."""
    st: dict[str, Any] = {"kv": {}, "running": None, "waiting": None, "in_flight": None, "kv_total": None,
                          "finished": {}, "rejected": {}}
    for name, labels, v in parse_prometheus(text):
        inst = labels.get("instance")
        if name == "jaxserve:kv_cache_usage_perc":
            if inst is None:
                st["kv_total"] = v
            else:
                st["kv"][inst] = v
        elif name in ("jaxserve:num_requests_running", "jaxserve:num_requests_waiting") and inst is None:
            st[name.rsplit("_", 1)[1]] = int(v)
        elif name == "jaxserve:num_requests_in_flight":
            st["in_flight"] = int(v)
        elif name == "jaxserve:request_success_total":
            st["finished"][labels.get("finished_reason", "?")] = int(v)
        elif name == "jaxserve:request_rejected_total":
            st["rejected"][labels.get("reason", "?")] = int(v)
    return st


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            return server_state(await resp.text())
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


def idle(st: dict[str, Any] | None) -> bool:
    """Every instance holds 0 KV blocks and nothing runs (False when that cannot be read)."""
    return bool(st and st["kv"] and all(v == 0 for v in st["kv"].values()) and st["running"] == 0)


def window_stats(results: list[RequestResult], a: float, b: float) -> dict[str, Any]:
    """Over the requests that ended in (a, b]: completed, errors, req/s, e2e and TTFT p50/p99 of the good ones."""
    ended = [r for r in results if r.end is not None and a < r.end <= b and (r.ok or r.error is not None)]
    ok = [r for r in ended if r.ok]
    e2e = np.array([r.end - r.sent for r in ok])
    ttft = np.array([r.first_token - r.sent for r in ok])

    def pct(x: np.ndarray, q: float) -> float | None:
        return float(np.percentile(x, q)) if x.size else None

    return {"completed": len(ok), "errors": len(ended) - len(ok), "req_s": len(ok) / (b - a) if b > a else 0.0,
            "out_tok_s": sum(r.output_tokens for r in ok) / (b - a) if b > a else 0.0,
            "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99), "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99)}


# ----------------------------------------------------------------------------------------- load


class Client:
    """One aiohttp session against the server; every request is recorded, none raises."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, args: argparse.Namespace) -> None:
        self.session, self.url, self.model, self.args = session, url, model, args
        self.endpoint = f"{url}/v1/completions"

    async def one(self, r: RequestResult, prompt: str | list[int], t0: float) -> None:
        await send_request(self.session, self.endpoint, request_body(self.model, prompt, r.max_tokens), r, t0,
                           self.args.request_timeout, None)
        if r.ok and r.output_tokens != r.max_tokens:  # ignore_eos: exactly max_tokens, or something is wrong
            r.fail("wrong length", f"{r.output_tokens} tokens streamed for max_tokens={r.max_tokens}")


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


async def warm_up(client: Client, rng: np.random.Generator) -> list[RequestResult]:
    """One request per mix entry, one at a time (not counted in any figure, but an error is reported)."""
    out = []
    t0 = time.perf_counter()
    for i, e in enumerate(MIX):
        r = RequestResult(i, 0.0, e.prompt if isinstance(e.prompt, int) else 0, e.max_tokens)
        await client.one(r, make_prompt(e, rng, client.args.vocab_size), t0)
        if not r.ok:
            log(f"warm-up request {e.label()} failed: {r.error}: {r.error_detail}")
        out.append(r)
    return out


async def measure_capacity(client: Client, rng: np.random.Generator) -> tuple[float, list[RequestResult]]:
    """Closed loop: --concurrency clients, each sending its next request when the last ends, for
    --capacity-seconds; capacity = completed req/s over the last three quarters (the first is ramp-up)."""
    a = client.args
    seconds, results = a.capacity_seconds, []
    t0 = time.perf_counter()

    async def worker() -> None:
        while time.perf_counter() - t0 < seconds:
            e = MIX[int(rng.integers(len(MIX)))]
            r = RequestResult(len(results), time.perf_counter() - t0, e.prompt if isinstance(e.prompt, int) else 0,
                              e.max_tokens)
            results.append(r)
            await client.one(r, make_prompt(e, rng, a.vocab_size), t0)

    log(f"capacity: {a.concurrency} closed-loop clients for {seconds:g} s")
    tasks = [asyncio.create_task(worker()) for _ in range(a.concurrency)]
    k = 1
    while not all(t.done() for t in tasks):
        await asyncio.sleep(min(0.5, max(0.0, t0 + k * a.sample_every - time.perf_counter())))
        now = time.perf_counter() - t0
        if now >= k * a.sample_every and now < seconds:
            w = window_stats(results, 0.0, now)
            log(f"  capacity {now:4.0f}/{seconds:g} s: {w['completed']} done, {w['errors']} errors")
            k += 1
    await asyncio.gather(*tasks)
    skip = seconds / 4
    w = window_stats(results, skip, seconds)
    log(f"capacity: {w['req_s']:.3f} req/s ({w['out_tok_s']:.0f} output tok/s) with {a.concurrency} clients, "
        f"e2e p50 {_fmt_s(w['e2e_p50'])} s; {sum(not r.ok for r in results)} errors")
    return w["req_s"], results


@dataclasses.dataclass
class Sample:
    t: float
    rss_kib: int | None
    nprocs: int | None
    sent: int
    in_flight: int
    completed: int
    errors: int
    window: dict[str, Any]
    server: dict[str, Any] | None


async def soak(client: Client, rate: float, rss_pid: int | None
               ) -> tuple[list[RequestResult], list[Sample], float, float]:
    """Poisson arrivals at ``rate`` for --duration; samples every --sample-every. (results, samples,
    seconds from the first arrival to the last response, seconds the drain took)."""
    a = client.args
    rng = np.random.default_rng([a.seed, 2])
    results: list[RequestResult] = []
    tasks: set[asyncio.Task[None]] = set()
    samples: list[Sample] = []
    t0 = time.perf_counter()

    async def arrivals() -> None:
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / rate))
            if t >= a.duration:
                return
            e = MIX[int(rng.integers(len(MIX)))]
            prompt = make_prompt(e, rng, a.vocab_size)
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            r = RequestResult(len(results), t, e.prompt if isinstance(e.prompt, int) else 0, e.max_tokens)
            results.append(r)
            task = asyncio.create_task(client.one(r, prompt, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def sampler() -> None:
        times = [k * a.sample_every for k in range(1, int(a.duration / a.sample_every + 1e-9) + 1)]
        if not times or times[-1] < a.duration - 1e-6:
            times.append(a.duration)
        prev = 0.0
        for t in times:
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            now = time.perf_counter() - t0
            rss = process_tree_rss_kib(rss_pid) if rss_pid is not None else None
            st = await scrape(client.session, client.url)
            done = sum(r.ok for r in results)
            errs = sum(r.error is not None for r in results)
            s = Sample(now, rss[0] if rss else None, rss[1] if rss else None, len(results), len(tasks), done, errs,
                       window_stats(results, prev, now), st)
            samples.append(s)
            prev = now
            log(progress_line(s, samples, a))

    await asyncio.gather(arrivals(), sampler())
    t_load = time.perf_counter()
    if tasks:
        log(f"draining: {len(tasks)} requests in flight (each within --request-timeout {a.request_timeout:g} s)")
        await asyncio.gather(*list(tasks))
    drain = time.perf_counter() - t_load
    ends = [r.end for r in results if r.end is not None]
    wall = max([a.duration, *ends]) if ends else a.duration
    return results, samples, wall, drain


def rss_baseline(samples: list[Sample], warmup: float) -> Sample | None:
    with_rss = [s for s in samples if s.rss_kib is not None]
    if not with_rss:
        return None
    after = [s for s in with_rss[:-1] if s.t >= warmup - 1e-6]
    return after[0] if after else with_rss[0]


def progress_line(s: Sample, samples: list[Sample], a: argparse.Namespace) -> str:
    w = s.window
    text = (f"soak {s.t:5.0f}/{a.duration:g} s: sent {s.sent}, done {s.completed}, in flight {s.in_flight}, "
            f"errors {s.errors} | last {a.sample_every:g} s: {w['req_s']:.2f} req/s, e2e p50 {_fmt_s(w['e2e_p50'])} "
            f"p99 {_fmt_s(w['e2e_p99'])} s")
    if s.rss_kib is not None:
        text += f" | RSS {s.rss_kib / 1024:.1f} MiB"
        base = rss_baseline(samples, a.rss_warmup)
        if base is not None and base is not s and base.t >= a.rss_warmup - 1e-6:
            text += f" ({100 * (s.rss_kib / base.rss_kib - 1):+.2f}% since {base.t:.0f} s)"
    if s.server is not None:
        kv = s.server["kv"]
        text += (f" | KV {', '.join(f'{k} {100 * v:.0f}%' for k, v in kv.items()) or '?'}, running "
                 f"{s.server['running']}, waiting {s.server['waiting']}")
    else:
        text += " | /metrics: no answer"
    return text


# --------------------------------------------------------------------------------------- summary


def summarize(args: argparse.Namespace, *, model: str, server_cmd: list[str] | None, capacity: float | None,
              rate: float, warm: list[RequestResult], cap_results: list[RequestResult],
              results: list[RequestResult], samples: list[Sample], wall: float, drain: float,
              end_state: dict[str, Any] | None, settle_s: float, rss_end: int | None,
              stop: dict[str, Any] | None, load_start: tuple[float, float, float],
              load_end: tuple[float, float, float], started_at: str, git: str) -> dict[str, Any]:
    """Every figure of the run, and a verdict per target."""
    ok = [r for r in results if r.ok]
    e2e = np.array([r.end - r.sent for r in ok])
    ttft = np.array([r.first_token - r.sent for r in ok])
    lag = [r.sent - r.scheduled for r in results if r.sent is not None]
    pct = (lambda x, q: float(np.percentile(x, q)) if x.size else None)  # noqa: E731
    errors = Counter(r.error for r in results if not r.ok)
    cap_errors = Counter(r.error for r in [*warm, *cap_results] if not r.ok)
    examples: dict[str, str] = {}
    for r in [*warm, *cap_results, *results]:
        if not r.ok and r.error not in examples:
            examples[str(r.error)] = str(r.error_detail)
    base = rss_baseline(samples, args.rss_warmup)
    last = next((s for s in reversed(samples) if s.rss_kib is not None), None)
    rss: dict[str, Any] = {"measured": base is not None}
    if base is not None and last is not None:
        post = [s for s in samples if s.rss_kib is not None and s.t >= base.t]
        slope = (float(np.polyfit([s.t / 60 for s in post], [s.rss_kib / 1024 for s in post], 1)[0])
                 if len(post) >= 2 else 0.0)
        rss.update({"baseline_t": base.t, "baseline_mib": base.rss_kib / 1024, "last_t": last.t,
                    "last_mib": last.rss_kib / 1024, "growth_pct": 100 * (last.rss_kib / base.rss_kib - 1),
                    "slope_mib_per_min": slope,
                    "peak_mib": max(s.rss_kib for s in samples if s.rss_kib is not None) / 1024,
                    "first_mib": samples[0].rss_kib / 1024 if samples[0].rss_kib is not None else None,
                    "after_drain_mib": rss_end / 1024 if rss_end is not None else None,
                    "processes": last.nprocs, "short_run": base.t < args.rss_warmup - 1e-6})
        rss["ok"] = rss["growth_pct"] < args.max_rss_growth
    else:
        rss["ok"] = None
    held = {"state": end_state, "settle_s": settle_s, "ok": idle(end_state)}
    if end_state is not None:
        held["ok"] = held["ok"] and not end_state["waiting"] and not end_state["in_flight"]
    verdicts = {"errors": not errors and not cap_errors, "rss": rss["ok"], "held_blocks": held["ok"],
                "shutdown": None if stop is None else stop["ok"]}
    return {
        "schema": "jaxserve.soak/1", "started_at": started_at, "git": git,
        "command": shlex.join(["python", "scripts/soak.py", *sys.argv[1:]]),
        "server_command": shlex.join(["python", *server_cmd[1:]]) if server_cmd else None,
        "url": args.url, "model": model, "mix": [e.label() for e in MIX],
        "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": load_end,
        "capacity_req_s": capacity, "load": None if args.rate is not None else args.load, "rate_req_s": rate,
        "duration_s": args.duration, "request_timeout_s": args.request_timeout,
        "capacity_run": {"requests": len(cap_results), "completed": sum(r.ok for r in cap_results),
                         "seconds": args.capacity_seconds if cap_results else 0, "concurrency": args.concurrency},
        "requests": len(results), "completed": len(ok), "errors": dict(errors),
        "client_completed_total": sum(r.ok for r in [*warm, *cap_results, *results]),
        "capacity_run_errors": dict(cap_errors), "error_examples": examples,
        "offered_req_s": len(results) / args.duration,
        "throughput_req_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tok_s": sum(r.output_tokens for r in ok) / wall if wall > 0 else 0.0,
        "wall_s": wall, "drain_s": drain,
        "e2e_s": {"p50": pct(e2e, 50), "p99": pct(e2e, 99), "max": float(e2e.max()) if e2e.size else None},
        "ttft_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "client_lag_s": {"max": max(lag) if lag else None, "mean": float(np.mean(lag)) if lag else None},
        "rss": rss, "held": held, "shutdown": stop, "verdicts": verdicts,
        "max_rss_growth": args.max_rss_growth,
        "passed": all(v is not False for v in verdicts.values()),
        "samples": [dataclasses.asdict(s) for s in samples],
        "minutes": minute_rows(results, samples),
    }


def minute_rows(results: list[RequestResult], samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per minute of the soak (and the last sample): RSS, counts, and the minute's rate/latency."""
    rows, prev = [], 0.0
    for i, s in enumerate(samples):  # the first sample of each new minute (1 s slack), and the last one
        if i != len(samples) - 1 and (s.t + 1) // 60 == (prev + 1) // 60:
            continue
        w = window_stats(results, prev, s.t)
        kv = s.server["kv"] if s.server else {}
        rows.append({"t": s.t, "rss_mib": None if s.rss_kib is None else s.rss_kib / 1024, "completed": s.completed,
                     "errors": s.errors, "req_s": w["req_s"], "e2e_p50": w["e2e_p50"], "e2e_p99": w["e2e_p99"],
                     "kv_max": max(kv.values()) if kv else None,
                     "running": s.server["running"] if s.server else None})
        prev = s.t
    return rows


def _verdict(v: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[v]


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())) if errors else "0"


def figure_rows(s: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) rows shared by the stdout table and the doc."""
    v = s["verdicts"]
    rss, held, stop = s["rss"], s["held"], s["shutdown"]
    n_err, n_cap = sum(s["errors"].values()), sum(s["capacity_run_errors"].values())
    rows = [("errors (soak)", f"{n_err} of {s['requests']}" + (f": {_errors_text(s['errors'])}" if n_err else ""),
             "0", _verdict(not n_err)),
            ("errors (warm-up + capacity run)", f"{n_cap} of {s['capacity_run']['requests'] + len(MIX)}"
             + (f": {_errors_text(s['capacity_run_errors'])}" if n_cap else ""), "0", _verdict(not n_cap))]
    if s["capacity_req_s"] is not None:
        rows.append(("capacity (closed loop)", f"{s['capacity_req_s']:.3f} req/s", "", ""))
    rows += [("offered load", f"{s['rate_req_s']:.3f} req/s"
              + (f" ({s['load']:g} x capacity)" if s["load"] is not None else "")
              + f", {s['requests']} requests in {s['duration_s']:g} s", "", ""),
             ("throughput", f"{s['throughput_req_s']:.3f} req/s, {s['output_tok_s']:.1f} output tok/s "
              f"({s['completed']} completed)", "", ""),
             ("latency e2e p50 / p99 / max", f"{_fmt_s(s['e2e_s']['p50'])} / {_fmt_s(s['e2e_s']['p99'])} / "
              f"{_fmt_s(s['e2e_s']['max'])} s", "", ""),
             ("TTFT p50 / p99", f"{_fmt_s(s['ttft_s']['p50'])} / {_fmt_s(s['ttft_s']['p99'])} s", "", "")]
    if rss["measured"]:
        note = " (short run: from the first sample)" if rss["short_run"] else ""
        rows += [("RSS growth after warm-up",
                  f"{rss['growth_pct']:+.2f}%: {rss['baseline_mib']:.1f} MiB at {rss['baseline_t']:.0f} s -> "
                  f"{rss['last_mib']:.1f} MiB at {rss['last_t']:.0f} s{note}",
                  f"< {s['max_rss_growth']:g}%", _verdict(rss["ok"])),
                 ("RSS trend / peak / first / after drain",
                  f"{rss['slope_mib_per_min']:+.2f} MiB/min / {rss['peak_mib']:.1f} / "
                  f"{rss['first_mib']:.1f} / "
                  + ("-" if rss["after_drain_mib"] is None else f"{rss['after_drain_mib']:.1f}")
                  + f" MiB ({rss['processes']} process(es))", "", "")]
    else:
        rows.append(("RSS growth after warm-up", "not measured (give --pid with --url)",
                     f"< {s['max_rss_growth']:g}%", "n/a"))
    st = held["state"]
    if st is None:
        held_text = "/metrics did not answer"
    else:
        kv = ", ".join(f"{k} {v:g}" for k, v in st["kv"].items()) or "no per-instance series"
        held_text = (f"kv_cache_usage_perc {kv}; running {st['running']}, waiting {st['waiting']}, "
                     f"in flight {st['in_flight']}" + (f" (after {held['settle_s']:.1f} s)" if held["settle_s"] > 0.05
                                                       else ""))
    rows.append(("KV blocks held at the end", held_text, "0", _verdict(v["held_blocks"])))
    if st is not None:
        rows.append(("server counters (/metrics)",
                     "finished " + ", ".join(f"{k} {c}" for k, c in sorted(st["finished"].items()))
                     + ("; rejected " + ", ".join(f"{k} {c}" for k, c in sorted(st["rejected"].items()))
                        if st["rejected"] else "")
                     + f" (the client completed {s['client_completed_total']} in all)", "", ""))
    if stop is None:
        rows.append(("shutdown (SIGINT)", "not checked: a server this script did not start", "exit 0", "n/a"))
    else:
        rows.append(("shutdown (SIGINT)", f"exit {stop['returncode']} in {stop['seconds']:.1f} s"
                     + (", 'jaxserve: stopped'" if stop["stopped_line"] else ", no 'jaxserve: stopped'")
                     + (f", {stop['tracebacks']} traceback(s) in the log" if stop["tracebacks"] else ", no traceback")
                     + (", KILLED" if stop["killed"] else ""), "exit 0", _verdict(v["shutdown"])))
    lag = s["client_lag_s"]["max"]
    if lag is not None:
        rows.append(("client lag (send - schedule), max", f"{1e3 * lag:.0f} ms", "", ""))
    return rows


def format_table(s: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", ""), *figure_rows(s)]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"verdict: {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(lines)


def doc_section(s: dict[str, Any]) -> str:
    """The Markdown between the soak markers."""
    la0, la1 = s["load_avg_start"], s["load_avg_end"]
    out = [BEGIN, "## Soak", "",
           "`scripts/soak.py` (issue 7) starts the real launcher, measures its capacity with a closed-loop run, "
           "then sends streamed completions as Poisson arrivals at a fraction of that capacity, sampling the "
           "server's RSS (its whole process tree), errors and latency every few seconds; afterwards it checks "
           "that no KV blocks are held and that SIGINT stops the server with exit status 0. "
           "Every request has a timeout; a non-200 answer, a broken or short stream or a timeout is an error.",
           "",
           f"Run {s['started_at']}, {s['git']}:",
           "",
           f"    {s['command']}",
           ""]
    if s["server_command"]:
        out += [f"Server: `{s['server_command']}` (model `{s['model']}`).", ""]
    else:
        out += [f"Server: {s['url']} (model `{s['model']}`), started outside the script.", ""]
    out += [f"Host: {s['cpu_count']} CPU cores shared by the server and this client (so the capacity is the "
            f"pair's); 1-minute load average {la0[0]:.2f} before the server started and {la1[0]:.2f} at the end "
            f"(which includes the soak's own server and client).",
            f"Mix (uniform): {'; '.join(s['mix'])} (prompt -> max_tokens; ignore_eos, temperature 0); request "
            f"timeout {s['request_timeout_s']:g} s.", "",
            "| figure | value | target | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in figure_rows(s)]
    out += ["", f"Verdict: **{'PASS' if s['passed'] else 'FAIL'}**.", "",
            "Per minute (rate and latency over the minute before; KV = the fullest instance at the sample):", "",
            "| t (s) | RSS (MiB) | completed | errors | req/s | e2e p50 (s) | e2e p99 (s) | KV used | running |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in s["minutes"]:
        rss = "-" if r["rss_mib"] is None else f"{r['rss_mib']:.1f}"
        kv = "-" if r["kv_max"] is None else f"{100 * r['kv_max']:.0f}%"
        running = "-" if r["running"] is None else str(r["running"])
        out.append(f"| {r['t']:.0f} | {rss} | {r['completed']} | {r['errors']} | {r['req_s']:.2f} | "
                   f"{_fmt_s(r['e2e_p50'])} | {_fmt_s(r['e2e_p99'])} | {kv} | {running} |")
    out.append(END)
    return "\n".join(out)


DOC_SKELETON = """# Reliability

Evidence that the server stays correct under bad input, overload, faults and long steady load.
Each section names what produces its evidence; rerun it to refresh the figures.

## Bad input (fuzzer)

Covered by `tests/serving/test_fuzz.py` (malformed and extreme requests against the real tiny engine).

## Overload

Covered by `tests/serving/test_overload.py` (more requests than the admission limit at once).

## Faults

Covered by `tests/cluster/test_faults.py` (instance actors killed mid-run, Ray mode).

"""


def write_doc(path: Path, section: str) -> None:
    """Replace the soak section between the markers (or append it; create the doc if missing)."""
    text = path.read_text() if path.exists() else DOC_SKELETON
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def git_describe() -> str:
    """The commit checked out, and whether the server's code (jaxserve/) differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxserve"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    return f"commit {head or '?'}" + (", with uncommitted changes under jaxserve/" if dirty else ", jaxserve/ clean")


# ------------------------------------------------------------------------------------------ main


async def run_load(args: argparse.Namespace, url: str, rss_pid: int | None) -> dict[str, Any]:
    """Everything between a ready server and stopping it; the pieces of the summary."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        why = await wait_ready(session, url, 30.0 if args.url is None else args.ready_timeout)
        if why is not None:
            raise SoakError(f"the server at {url} is not ready ({why})")
        try:
            model = await fetch_model(session, url)
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise SoakError(f"cannot read the model id from {url}/v1/models: {e}") from e
        client = Client(session, url, model, args)
        rng = np.random.default_rng([args.seed, 1])
        log(f"model {model!r}; warm-up: {len(MIX)} requests, one per mix entry")
        warm = await warm_up(client, rng)
        cap_results: list[RequestResult] = []
        capacity: float | None
        if args.rate is not None:
            capacity, rate = None, args.rate
        elif args.capacity is not None:
            capacity, rate = args.capacity, args.load * args.capacity
        else:
            capacity, cap_results = await measure_capacity(client, rng)
            if capacity <= 0:
                raise SoakError("the capacity run completed no request; see the errors above")
            rate = args.load * capacity
        log(f"soak: Poisson arrivals at {rate:.3f} req/s for {args.duration:g} s"
            + (f" ({args.load:g} x {capacity:.3f} req/s)" if args.rate is None else ""))
        results, samples, wall, drain = await soak(client, rate, rss_pid)
        t_settle = time.perf_counter()
        state = await scrape(session, url)
        while not idle(state) and time.perf_counter() - t_settle < args.settle_timeout:
            await asyncio.sleep(0.5)
            state = await scrape(session, url)
        settle = time.perf_counter() - t_settle
        log("after the drain: " + ("/metrics did not answer" if state is None else
                                   f"KV {state['kv']}, running {state['running']}, waiting {state['waiting']}, "
                                   f"in flight {state['in_flight']}"))
        rss_end = process_tree_rss_kib(rss_pid) if rss_pid is not None else None
        return {"model": model, "capacity": capacity, "rate": rate, "warm": warm, "cap_results": cap_results,
                "results": results, "samples": samples, "wall": wall, "drain": drain, "end_state": state,
                "settle_s": settle, "rss_end": rss_end[0] if rss_end else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    git = git_describe()  # now: the code the server is about to load
    server: Server | None = None
    stop: dict[str, Any] | None = None
    try:
        if args.url is None:
            server = start_server(args)
            url, rss_pid = server.url, server.proc.pid
        else:
            url, rss_pid = args.url, args.pid
            if rss_pid is not None and process_tree_rss_kib(rss_pid) is None:
                raise SoakError(f"--pid {rss_pid}: no such process")
            if rss_pid is None:
                log("no --pid: RSS is not measured")
        try:
            parts = asyncio.run(run_load(args, url, rss_pid))
        finally:
            if server is not None:
                log("stopping the server (SIGINT)")
                stop = stop_server(server)
    except SoakError as e:
        print(f"soak.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak.py: interrupted" + (f" (server stopped: exit {stop['returncode']})" if stop else ""),
              file=sys.stderr)
        return 130
    if server is not None and stop is not None and not stop["ok"]:
        log(f"server log tail ({server.log_path}):\n{log_tail(server.log_path)}")
    summary = summarize(args, model=parts["model"], server_cmd=server.command if server else None,
                        capacity=parts["capacity"], rate=parts["rate"], warm=parts["warm"],
                        cap_results=parts["cap_results"], results=parts["results"], samples=parts["samples"],
                        wall=parts["wall"], drain=parts["drain"], end_state=parts["end_state"],
                        settle_s=parts["settle_s"], rss_end=parts["rss_end"], stop=stop, load_start=load_start,
                        load_end=os.getloadavg(), started_at=started_at, git=git)
    print()
    print(format_table(summary))
    if summary["error_examples"]:
        print("error examples: " + "; ".join(f"{k}: {v}" for k, v in summary["error_examples"].items()))
    if not args.no_doc:
        write_doc(args.doc, doc_section(summary))
        print(f"doc: {args.doc} (soak section replaced)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"json: {args.json}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
