#!/usr/bin/env python
"""Serving benchmark client (issue 6): load a running jaxserve (OpenAI-compatible) server and measure
TTFT, TPOT, ITL, end-to-end latency, throughput, SLO attainment and goodput.

    python scripts/benchmark_serving.py --url http://127.0.0.1:8000 --workload sharegpt \\
        --request-rates 1,2,4 --num-prompts 200 --ttft-slo 0.25 --tpot-slo 0.1 \\
        --devices 2 --out results.json --plot attainment.png

    workload (planner/workload.py: a length mix, fixed:P:O, or a .csv/.jsonl trace)
      --Workload.sample(n, rate, seed)--> arrival times (Poisson, or gamma with --burstiness), lengths
      --> prompts: random token ids in [3, --vocab-size) of each prompt length (or the trace's prompts)
      --> per rate: one request per arrival, sent at its absolute time (open loop), streamed
          POST {url}/v1/completions {"prompt": [ids], "max_tokens": output_len, "ignore_eos": true,
                                     "stream": true, "stream_options": {"include_usage": true}, ...}
      --> per request: send, first-token, every chunk and end times, tokens (usage, else chunks)
      --> jaxserve.slo: TTFT, TPOT, attainment; stats; goodput = the highest swept rate meeting
          --attainment (per device with --devices)
      --> stdout table, JSON (--out), plot (--plot), tqdm progress on stderr

Definitions (jaxserve/slo.py, shared with the planner): TTFT = first token - send time; TPOT =
(latency - TTFT) / (output tokens - 1); latency (end-to-end) = end of stream - send time; ITL = the
gaps between successive token chunks of a request (all requests pooled). A request meets the SLO
when TTFT <= --ttft-slo and TPOT <= --tpot-slo; attainment is the share of *all* requests of a run
that meet it (failed or unsent requests count as misses). Throughputs divide by the run's wall time
(first scheduled arrival to the last response). The send time is when the request left the client;
``client_lag_s`` (send - scheduled) shows whether the client kept up with the schedule.

Rates in a sweep reuse one sample (same seed: same lengths and prompts, arrivals time-rescaled;
common random numbers, as in the planner). A trace without --request-rate(s) replays its recorded
arrival times. A trace may carry prompts: JSONL keys ``prompt`` (text) or ``prompt_token_ids``,
or a CSV ``prompt`` column.

Exit status: 0 when at least one request succeeded, 1 when none did or the server is not reachable,
2 for bad flags (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxserve import slo
from planner.errors import PlannerError
from planner.workload import Requests, Workload, load_trace, workload

SCHEMA = "jaxserve.benchmark_serving/1"
DEFAULT_VOCAB = 50272  # OPT
FIRST_TOKEN_ID = 3  # ids 0-2 are OPT's <s>/<pad>/</s>

Prompt = str | list[int]


# ----------------------------------------------------------------------------------------- flags


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout; appends a flag's default unless it is None/False or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in h:
            h += " (default: %(default)s)"
        return h


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive_float(name: str, text: str, parser: _Parser) -> float:
    try:
        v = float(text)
    except ValueError:
        parser.error(f"{name}: {text!r} is not a number")
    if not (math.isfinite(v) and v > 0):
        parser.error(f"{name} must be a positive finite number, got {text!r}")
    return v


def build_parser() -> _Parser:
    p = _Parser(prog="benchmark_serving.py", description=__doc__,
                formatter_class=_Formatter)
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="base URL of the running server (http[s]://host:port); only this server is contacted")
    p.add_argument("--model", default=None,
                   help="model id sent in each request; default: the first id from GET {url}/v1/models")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", default="sharegpt",
                     help="planner length mix: sharegpt|chatbot, humaneval|code, longbench|summarization, "
                          "fixed:PROMPT:OUTPUT, or a .csv/.jsonl trace path")
    src.add_argument("--trace", type=Path, default=None,
                     help="trace file (CSV with header arrival_time,prompt_len,output_len[,prompt], or JSONL "
                          "with those keys and optional prompt / prompt_token_ids); instead of --workload")
    p.add_argument("--num-prompts", type=int, default=200,
                   help="requests per rate (a trace yields at most its length)")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--request-rate", default=None,
                       help="mean arrival rate in req/s; default 1.0 (a trace without a rate replays its "
                            "recorded times)")
    rates.add_argument("--request-rates", default=None,
                       help="comma-separated rates to sweep, e.g. 1,2,4 (one run per rate; goodput = the "
                            "highest rate meeting --attainment)")
    burst = p.add_mutually_exclusive_group()
    burst.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the inter-arrival gaps: 1 = Poisson, < 1 burstier, > 1 smoother "
                            "(coefficient of variation = 1/sqrt(burstiness))")
    burst.add_argument("--cv", type=float, default=None,
                       help="the same as --burstiness 1/cv^2: coefficient of variation of the gaps, as the "
                            "planner's --cv")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals, lengths and prompt token ids")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help="random prompt token ids are drawn from [3, vocab-size)")
    p.add_argument("--ttft-slo", type=float, default=None, help="TTFT target in seconds (none: no TTFT target)")
    p.add_argument("--tpot-slo", type=float, default=None, help="TPOT target in seconds (none: no TPOT target)")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="target share of requests meeting the SLO; a rate 'meets' when attainment >= this")
    p.add_argument("--devices", type=int, default=None,
                   help="devices the server uses: adds goodput per device (req/s/device)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may take (send to end of stream) before it counts as failed")
    p.add_argument("--max-duration", type=float, default=None,
                   help="cap in seconds on one rate's run: no request is sent after it and requests still "
                        "open then are cancelled (counted as failures); default: no cap (every request "
                        "still ends within its --request-timeout)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests open at once (later arrivals wait in the client); "
                        "default: unbounded (open loop)")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="send this many requests one at a time before measuring (not counted)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait for GET {url}/health to answer 200 before giving up")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    p.add_argument("--per-request", action="store_true",
                   help="include every request's timings (ITLs included) in the JSON")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of SLO attainment vs request rate (needs --ttft-slo or --tpot-slo)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    u = urlsplit(a.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        p.error(f"--url must look like http://host:port, got {a.url!r}")
    a.url = a.url.rstrip("/")
    is_trace = a.trace is not None or a.workload.endswith((".csv", ".jsonl"))
    if a.request_rates is not None:
        parts = [s.strip() for s in a.request_rates.split(",") if s.strip()]
        if not parts:
            p.error("--request-rates is empty; give comma-separated rates such as 1,2,4")
        a.rates = [_positive_float("--request-rates", s, p) for s in parts]
    elif a.request_rate is not None:
        a.rates = [_positive_float("--request-rate", a.request_rate, p)]
    else:
        a.rates = [None] if is_trace else [1.0]
    if a.cv is not None:
        if not (math.isfinite(a.cv) and a.cv > 0):
            p.error(f"--cv must be positive, got {a.cv}")
        a.burstiness = 1.0 / a.cv**2
    if not (math.isfinite(a.burstiness) and a.burstiness > 0):
        p.error(f"--burstiness must be positive, got {a.burstiness}")
    if is_trace and a.burstiness != 1.0:
        p.error("--burstiness/--cv do not apply to a trace: its recorded arrival gaps are replayed (rescaled "
                "to --request-rate)")
    for name in ("num_prompts", "vocab_size", "devices", "max_concurrency"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if a.vocab_size <= FIRST_TOKEN_ID:
        p.error(f"--vocab-size must be > {FIRST_TOKEN_ID}, got {a.vocab_size}")
    if a.warmup_requests < 0:
        p.error(f"--warmup-requests must be >= 0, got {a.warmup_requests}")
    for name in ("request_timeout", "max_duration", "ttft_slo", "tpot_slo"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {v}")
    if not (math.isfinite(a.ready_timeout) and a.ready_timeout >= 0):
        p.error(f"--ready-timeout must be >= 0, got {a.ready_timeout}")
    if not (0.0 < a.attainment <= 1.0):
        p.error(f"--attainment must be in (0, 1], got {a.attainment}")
    a.has_slo = a.ttft_slo is not None or a.tpot_slo is not None
    try:  # the shared SLO validation (a missing target is "no limit")
        slo.SLO(a.ttft_slo or 1.0, a.tpot_slo or 1.0, a.attainment)
    except ValueError as e:
        p.error(str(e))
    if a.plot is not None and not a.has_slo:
        p.error("--plot draws SLO attainment: give --ttft-slo and/or --tpot-slo")
    try:
        a.workload_obj, a.trace_prompts = _load_workload(a)
    except (PlannerError, OSError, UnicodeDecodeError) as e:
        p.error(str(e))
    return a


# -------------------------------------------------------------------------------------- workload


def _load_workload(a: argparse.Namespace) -> tuple[Workload, list[Prompt | None] | None]:
    """The planner's Workload for the flags, and a trace's own prompts (sorted as the trace) if any."""
    arrival = "poisson" if a.burstiness == 1.0 else "gamma"
    cv = 1.0 / math.sqrt(a.burstiness)
    path: Path | None = a.trace
    if path is None and a.workload.endswith((".csv", ".jsonl")):
        path = Path(a.workload)
    if path is None:
        return workload(a.workload, arrival, cv), None
    if path.is_dir():
        raise PlannerError(f"trace {path}: is a directory")
    try:
        trace = load_trace(path)
        return Workload(path.name, trace=trace), _trace_prompts(path)
    except (OSError, UnicodeDecodeError) as e:
        raise PlannerError(f"trace {path}: cannot read it ({type(e).__name__}: {e})") from e


def _trace_prompts(path: Path) -> list[Prompt | None] | None:
    """Per-row prompts of a trace (``prompt`` / ``prompt_token_ids``), in load_trace's order; None if none."""
    rows: list[tuple[float, Prompt | None]] = []
    with open(path) as f:
        if path.suffix == ".csv":
            for r in csv.DictReader(f):
                rows.append((float(r["arrival_time"]), r.get("prompt") or None))
        else:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                prompt: Prompt | None = None
                if r.get("prompt_token_ids") is not None:
                    ids = r["prompt_token_ids"]
                    if not (isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids)):
                        raise PlannerError(f"trace {path}: line {i}: prompt_token_ids must be a non-empty "
                                           "list of non-negative ints")
                    prompt = ids
                elif r.get("prompt") is not None:
                    if not isinstance(r["prompt"], str) or not r["prompt"]:
                        raise PlannerError(f"trace {path}: line {i}: prompt must be a non-empty string")
                    prompt = r["prompt"]
                rows.append((float(r["arrival_time"]), prompt))
    if all(p is None for _, p in rows):
        return None
    order = np.argsort(np.array([t for t, _ in rows]), kind="stable")  # as load_trace sorts
    return [rows[i][1] for i in order]


def make_prompts(reqs: Requests, vocab_size: int, seed: int,
                 trace_prompts: list[Prompt | None] | None) -> list[Prompt]:
    """One prompt per request: the trace's own, else random token ids of the planned prompt length."""
    rng = np.random.default_rng([seed, 1])
    out: list[Prompt] = []
    for i, n in enumerate(reqs.prompt_len.tolist()):
        given = trace_prompts[i] if trace_prompts is not None and i < len(trace_prompts) else None
        out.append(given if given is not None else rng.integers(FIRST_TOKEN_ID, vocab_size, int(n)).tolist())
    return out


# ---------------------------------------------------------------------------------------- client


@dataclasses.dataclass
class RequestResult:
    """One request's measurements; times in seconds since the run started."""

    index: int
    scheduled: float
    prompt_len: int
    max_tokens: int
    sent: float | None = None
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    ok: bool = False
    error: str | None = None  # reason category (the key of "failures")
    error_detail: str | None = None

    def fail(self, reason: str, detail: str) -> None:
        self.ok, self.error, self.error_detail = False, reason, detail[:300]


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return str(obj["error"].get("message", body))
    except json.JSONDecodeError:
        pass
    return body.strip()[:300] or "(empty body)"


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], r: RequestResult,
                  t0: float) -> None:
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            text = (await resp.content.read(4096)).decode(errors="replace")
            r.end = time.perf_counter() - t0
            r.fail(f"HTTP {resp.status}", _error_message(text))
            return
        done = False
        usage_tokens: int | None = None
        async for raw in resp.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments, event: lines
            data = line[5:].strip()
            now = time.perf_counter() - t0
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                r.end = now
                r.fail("bad stream", f"not JSON: {data[:100]!r}")
                return
            if not isinstance(obj, dict):
                r.end = now
                r.fail("bad stream", f"not a JSON object: {data[:100]!r}")
                return
            if "error" in obj:
                r.end = now
                err = obj["error"]
                r.fail("stream error", str(err.get("message", err) if isinstance(err, dict) else err))
                return
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
                if isinstance(usage.get("prompt_tokens"), int):
                    r.prompt_tokens = usage["prompt_tokens"]
            choices = obj.get("choices") or []
            if choices and isinstance(choices[0], dict):
                c = choices[0]
                fin = c.get("finish_reason")
                # A chunk is a token event unless it is an empty closing chunk (finish_reason only);
                # an empty text without finish_reason is a token the detokenizer held back.
                if c.get("text") or fin is None:
                    if r.first_token is None:
                        r.first_token = now
                    r.chunk_times.append(now)
                if fin is not None:
                    r.finish_reason = str(fin)
        r.end = time.perf_counter() - t0
        if not r.chunk_times:
            r.fail("no tokens", "the stream ended without a completion chunk")
        elif not done and r.finish_reason is None:
            r.fail("truncated stream", "the stream ended without finish_reason or [DONE]")
        else:
            r.output_tokens = usage_tokens if usage_tokens is not None else len(r.chunk_times)
            r.ok = True


async def send_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], r: RequestResult,
                       t0: float, timeout: float, sem: asyncio.Semaphore | None) -> None:
    """Send one request and record it; every failure is recorded in ``r``, never raised."""
    async with sem if sem is not None else contextlib.nullcontext():
        r.sent = time.perf_counter() - t0
        try:
            await asyncio.wait_for(_stream(session, url, body, r, t0), timeout)
        except asyncio.TimeoutError:
            r.fail("timeout", f"no complete response within --request-timeout {timeout:g} s")
        except aiohttp.ClientConnectorError as e:
            r.fail("connection error", str(e))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
            r.fail("connection lost", f"{type(e).__name__}: {e}")
        except aiohttp.ClientError as e:
            r.fail("client error", f"{type(e).__name__}: {e}")
        except Exception as e:  # a benchmark records, it does not crash
            r.fail("client exception", f"{type(e).__name__}: {e}")
        if r.end is None:
            r.end = time.perf_counter() - t0


def request_body(model: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def run_schedule(session: aiohttp.ClientSession, url: str, model: str, reqs: Requests,
                       prompts: list[Prompt], *, timeout: float, max_duration: float | None,
                       max_concurrency: int | None, desc: str, disable_tqdm: bool
                       ) -> tuple[list[RequestResult], float]:
    """Send ``reqs`` at their absolute arrival times (open loop); return the results and the wall time."""
    results = [RequestResult(i, float(t), int(p), int(o)) for i, (t, p, o)
               in enumerate(zip(reqs.arrival.tolist(), reqs.prompt_len.tolist(), reqs.output_len.tolist(),
                                strict=True))]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    endpoint = f"{url}/v1/completions"
    bar = tqdm(total=len(results), desc=desc, unit="req", file=sys.stderr, disable=disable_tqdm,
               dynamic_ncols=True)
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter()
    deadline = None if max_duration is None else t0 + max_duration
    for r in results:
        target = t0 + r.scheduled
        if deadline is not None and target >= deadline:
            break
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send_request(session, endpoint, request_body(model, prompts[r.index],
                                                                              r.max_tokens),
                                                r, t0, timeout, sem))
        task.add_done_callback(lambda _t: bar.update(1))
        tasks.append(task)
    if tasks:
        wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=wait)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    bar.close()
    for r in results:
        if not r.ok and r.error is None:
            if r.sent is None:
                r.fail("not sent (--max-duration)", f"scheduled at {r.scheduled:.3f} s, past --max-duration")
            else:
                r.fail("cancelled (--max-duration)", "still open when --max-duration ran out")
    return results, wall


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float) -> str | None:
    """Poll GET /health until 200; None when ready, else why not."""
    deadline = time.perf_counter() + timeout
    why = "no answer"
    while True:
        try:
            async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return None
                why = f"GET /health answered HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            why = f"{type(e).__name__}: {e}"
        if time.perf_counter() >= deadline:
            return why
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.perf_counter())))


async def fetch_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models answered HTTP {resp.status}")
        obj = await resp.json(content_type=None)
    try:
        return str(obj["data"][0]["id"])
    except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"GET /v1/models: no model id in {json.dumps(obj)[:200]}") from e


# --------------------------------------------------------------------------------------- metrics


def stats(x: np.ndarray | list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99, max (None for no samples)."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(a.max())}


def summarize(results: list[RequestResult], wall: float, rate: float | None, reqs: Requests,
              args: argparse.Namespace) -> dict[str, Any]:
    """One run's metrics (the JSON ``runs[i]``), via jaxserve.slo."""
    n = len(results)
    ok = [r for r in results if r.ok]
    sent = np.array([r.sent for r in ok], dtype=np.float64)
    first = np.array([r.first_token for r in ok], dtype=np.float64)
    end = np.array([r.end for r in ok], dtype=np.float64)
    out_len = np.array([r.output_tokens for r in ok], dtype=np.int64)
    ttft_s = slo.ttft(sent, first)
    latency = end - sent
    tpot_s = slo.tpot(ttft_s, latency, out_len)
    itl = [g for r in ok for g in np.diff(r.chunk_times).tolist()]
    lag = [r.sent - r.scheduled for r in results if r.sent is not None]
    span = float(reqs.arrival[-1] - reqs.arrival[0]) if n > 1 else 0.0
    total_out = int(out_len.sum())
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    run: dict[str, Any] = {
        "request_rate": rate,
        "offered_rate": (n - 1) / span if span > 0 else None,
        "num_requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "failures": dict(Counter(r.error for r in results if not r.ok)),
        "failure_examples": {},
        "duration_s": wall,
        "total_input_tokens": int(total_in),
        "total_output_tokens": total_out,
        "output_len_mismatches": sum(r.output_tokens != r.max_tokens for r in ok),
        "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "output_throughput": total_out / wall if wall > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / wall if wall > 0 else 0.0,
        "ttft_s": stats(ttft_s),
        "tpot_s": stats(tpot_s[out_len > 1]),
        "itl_s": stats(itl),
        "e2e_s": stats(latency),
        "client_lag_s": {"mean": float(np.mean(lag)) if lag else None, "max": float(np.max(lag)) if lag else None},
    }
    for r in results:
        if not r.ok and r.error not in run["failure_examples"]:
            run["failure_examples"][r.error] = r.error_detail
    if args.has_slo:
        ttft_slo = args.ttft_slo if args.ttft_slo is not None else math.inf
        tpot_slo = args.tpot_slo if args.tpot_slo is not None else math.inf
        met = slo.meets_slo(ttft_s, latency, out_len, ttft_slo, tpot_slo)
        met_ttft = slo.meets_slo(ttft_s, latency, out_len, ttft_slo, math.inf)
        met_tpot = slo.meets_slo(ttft_s, latency, out_len, math.inf, tpot_slo)
        # Over all n requests: a failed or unsent request misses its SLO.
        att = float(met.sum()) / n if n else 0.0
        run.update({
            "slo_attainment": att,
            "ttft_attainment": float(met_ttft.sum()) / n if n else 0.0,
            "tpot_attainment": float(met_tpot.sum()) / n if n else 0.0,
            "meets_target": att >= args.attainment,
            "slo_request_throughput": float(met.sum()) / wall if wall > 0 else 0.0,
        })
    if args.per_request:
        run["requests"] = [_request_record(r) for r in results]
    return run


def _request_record(r: RequestResult) -> dict[str, Any]:
    d: dict[str, Any] = {"index": r.index, "scheduled_s": r.scheduled, "sent_s": r.sent,
                         "prompt_len": r.prompt_len, "max_tokens": r.max_tokens, "ok": r.ok}
    if r.ok:
        t = float(slo.ttft(np.array([r.sent]), np.array([r.first_token]))[0])
        lat = r.end - r.sent
        d.update({"ttft_s": t, "e2e_s": lat,
                  "tpot_s": float(slo.tpot(np.array([t]), np.array([lat]), np.array([r.output_tokens]))[0]),
                  "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens,
                  "finish_reason": r.finish_reason, "itl_s": np.diff(r.chunk_times).tolist()})
    else:
        d.update({"error": r.error, "error_detail": r.error_detail})
    return d


def goodput_summary(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any] | None:
    """Goodput = the highest swept rate whose attainment meets --attainment (0.0 when none does)."""
    if not args.has_slo:
        return None
    per_rate = [{"rate": _rate_of(r), "slo_attainment": r["slo_attainment"], "meets_target": r["meets_target"]}
                for r in runs]
    meeting = [p["rate"] for p in per_rate if p["meets_target"] and p["rate"] is not None]
    rate = max(meeting) if meeting else 0.0
    return {"attainment_target": args.attainment, "rate": rate,
            "devices": args.devices,
            "per_device": slo.per_device_goodput(rate, args.devices) if args.devices else None,
            "rates_meeting": sorted(meeting), "per_rate": per_rate}


def _rate_of(run: dict[str, Any]) -> float | None:
    return run["request_rate"] if run["request_rate"] is not None else run["offered_rate"]


# ---------------------------------------------------------------------------------------- output


def _ms(d: dict[str, float | None], *keys: str) -> str:
    return "/".join("-" if d[k] is None else f"{1e3 * d[k]:.1f}" for k in keys)


def _rate_label(run: dict[str, Any]) -> str:
    rate = _rate_of(run)
    label = "-" if rate is None else f"{rate:.3g}"
    return label if run["request_rate"] is not None else f"trace@{label}"


def format_table(result: dict[str, Any]) -> str:
    """Human-readable table: one row per rate."""
    cols = ["rate", "ok", "fail", "req/s", "out tok/s", "TTFT ms mean/p50/p90/p99", "TPOT ms mean/p50/p90/p99",
            "ITL ms mean/p99", "E2E s mean/p99"]
    has_slo = result["config"]["slo"] is not None
    if has_slo:
        cols.append("attain")
    rows = []
    for r in result["runs"]:
        row = [_rate_label(r),
               str(r["completed"]), str(r["failed"]), f"{r['request_throughput']:.2f}",
               f"{r['output_throughput']:.1f}", _ms(r["ttft_s"], "mean", "median", "p90", "p99"),
               _ms(r["tpot_s"], "mean", "median", "p90", "p99"), _ms(r["itl_s"], "mean", "p99"),
               "/".join("-" if r["e2e_s"][k] is None else f"{r['e2e_s'][k]:.2f}" for k in ("mean", "p99"))]
        if has_slo:
            row.append(f"{r['slo_attainment']:.3f}")
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    for r in result["runs"]:
        if r["failures"]:
            out.append(f"failures at rate {_rate_label(r)}: "
                       + ", ".join(f"{k} x{v} ({r['failure_examples'].get(k)})" for k, v in r["failures"].items()))
        if r["output_len_mismatches"]:
            out.append(f"note: at rate {_rate_label(r)}, {r['output_len_mismatches']} responses had a token count "
                       "different from max_tokens")
    g = result["goodput"]
    if g is not None:
        s = result["config"]["slo"]
        targets = [f"{k.upper()} <= {s[k]:g} s" for k in ("ttft", "tpot") if s[k] is not None]
        text = f"goodput ({', '.join(targets)}, attainment >= {g['attainment_target']:g}): {g['rate']:.3g} req/s"
        if g["per_device"] is not None:
            text += f", {g['per_device']:.3g} req/s per device ({g['devices']} devices)"
        if not g["rates_meeting"]:
            text += " (no swept rate met the target)"
        out.append(text)
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Attainment (both SLOs, TTFT only, TPOT only) vs request rate, with the target and the goodput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in result["runs"] if _rate_of(r) is not None), key=_rate_of)
    x = [_rate_of(r) for r in runs]
    g = result["goodput"]
    s = result["config"]["slo"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * r["slo_attainment"] for r in runs], "o-", label="both SLOs")
    if s["ttft"] is not None and s["tpot"] is not None:
        ax.plot(x, [100 * r["ttft_attainment"] for r in runs], "s--", alpha=0.7, label=f"TTFT <= {s['ttft']} s")
        ax.plot(x, [100 * r["tpot_attainment"] for r in runs], "^--", alpha=0.7, label=f"TPOT <= {s['tpot']} s")
    ax.axhline(100 * g["attainment_target"], color="gray", ls=":", label=f"target {100 * g['attainment_target']:g}%")
    if g["rate"] > 0:
        ax.axvline(g["rate"], color="green", ls=":", label=f"goodput {g['rate']:g} req/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{result['config']['model']} - {result['config']['workload']['name']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Preflight (health, model id), optional warm-up, one run per rate; the JSON result."""
    n_conn = args.max_concurrency or max(args.num_prompts, 1)
    connector = aiohttp.TCPConnector(limit=n_conn, limit_per_host=n_conn)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        why = await wait_ready(session, args.url, args.ready_timeout)
        if why is not None:
            raise RuntimeError(f"server at {args.url} not ready after {args.ready_timeout:g} s ({why})")
        model = args.model or await fetch_model(session, args.url)
        wl: Workload = args.workload_obj
        base = wl.sample(args.num_prompts, None, args.seed)
        prompts = make_prompts(base, args.vocab_size, args.seed, args.trace_prompts)
        for i in range(min(args.warmup_requests, len(base))):
            r = RequestResult(i, 0.0, int(base.prompt_len[i]), int(base.output_len[i]))
            await send_request(session, f"{args.url}/v1/completions",
                               request_body(model, prompts[i], r.max_tokens), r, time.perf_counter(),
                               args.request_timeout, None)
            if not r.ok:
                print(f"warning: warm-up request {i} failed: {r.error}: {r.error_detail}", file=sys.stderr)
        runs = []
        for rate in args.rates:
            reqs = wl.sample(args.num_prompts, rate, args.seed)
            reqs = Requests(reqs.arrival - reqs.arrival[0], reqs.prompt_len, reqs.output_len)  # first at t=0
            desc = "trace replay" if rate is None else f"rate {rate:g} req/s"
            results, wall = await run_schedule(
                session, args.url, model, reqs, prompts, timeout=args.request_timeout,
                max_duration=args.max_duration, max_concurrency=args.max_concurrency, desc=desc,
                disable_tqdm=args.disable_tqdm)
            run = summarize(results, wall, rate, reqs, args)
            if run["client_lag_s"]["max"] is not None and run["client_lag_s"]["max"] > 0.05:
                print(f"warning: {desc}: the client sent up to {run['client_lag_s']['max'] * 1e3:.0f} ms behind "
                      "schedule", file=sys.stderr)
            runs.append(run)
    desc_wl = wl.describe()
    if wl.trace is None:
        desc_wl["burstiness"] = args.burstiness
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "config": {
            "url": args.url, "model": model, "workload": desc_wl, "num_prompts": args.num_prompts,
            "request_rates": args.rates, "seed": args.seed, "vocab_size": args.vocab_size,
            "request_timeout_s": args.request_timeout, "max_duration_s": args.max_duration,
            "max_concurrency": args.max_concurrency, "warmup_requests": args.warmup_requests,
            "slo": ({"ttft": args.ttft_slo, "tpot": args.tpot_slo, "attainment": args.attainment}
                    if args.has_slo else None),
            "devices": args.devices,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "runs": runs,
    }
    result["goodput"] = goodput_summary(runs, args)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run_benchmark(args))
    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        print(f"benchmark_serving.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {args.out}")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0 if any(r["completed"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
