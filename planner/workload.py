"""Workloads: request arrival times and (prompt_len, output_len) pairs.

    name ("sharegpt", "fixed:512:128", "trace.csv", ...)  --workload()-->  Workload
    Workload.sample(n, rate, seed)  -->  Requests(arrival, prompt_len, output_len)  --> simulator

Length mixes (all lengths in tokens, prompt_len + output_len <= 2048, OPT's context):
  fixed:P:O     every request P prompt tokens, O output tokens.
  sharegpt      chatbot (ShareGPT-like): prompt ~ lognormal(median 400, sigma 1.0) clipped
                to [4, 1800]; output ~ lognormal(median 150, sigma 0.9) clipped to
                [2, 2048 - prompt]. Means ~ 560 prompt / ~210 output tokens.
  humaneval     code completion (HumanEval-like): prompt ~ normal(150, 50) clipped to
                [40, 500]; output ~ lognormal(median 90, sigma 0.5) clipped to [8, 400].
  longbench     summarization (LongBench-like): output ~ uniform integers [16, 148];
                prompt ~ uniform integers [1900, 2048 - output] (long prompts, short outputs).
  sharegpt-anchor  the ShareGPT-like lengths DistServe's simulator ran on for the anchor figures of
                docs/planner.md: prompt ~ lognormal(median 470, sigma 0.65), mean ~580; output ~
                lognormal(median 120, sigma 0.9), mean ~180; prompt + output < 2048.
Aliases: chatbot = sharegpt, code = humaneval, summarization = longbench.

Arrivals: Poisson (exponential gaps), or gamma gaps with coefficient of variation
``cv`` (cv > 1 is burstier than Poisson; cv = 1 is Poisson), mean gap 1/rate.
Trace replay: CSV (header with arrival_time, prompt_len, output_len) or JSONL (one
object per line with those keys). ``sample(rate=...)`` rescales the trace's time axis
so its mean rate becomes ``rate``; ``rate=None`` keeps the recorded times.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import PlannerError

MAX_CONTEXT = 2048


@dataclasses.dataclass(frozen=True)
class Requests:
    """Arrays of one sampled workload, sorted by arrival (seconds, tokens)."""

    arrival: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival.size)

    def scaled(self, factor: float) -> Requests:
        """Same requests with the time axis divided by ``factor`` (rate multiplied)."""
        return Requests(self.arrival / factor, self.prompt_len, self.output_len)


LengthSampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _lognormal_int(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return np.rint(rng.lognormal(np.log(median), sigma, n)).astype(np.int64)


def _sharegpt(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(_lognormal_int(rng, n, 400, 1.0), 4, 1800)
    o = np.clip(_lognormal_int(rng, n, 150, 0.9), 2, MAX_CONTEXT - p)
    return p, o


def _sharegpt_anchor(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic ShareGPT-like lengths DistServe's simulator was run on for the anchor figures."""
    p = np.clip(_lognormal_int(rng, n, 470, 0.65), 4, 1800)
    o = np.clip(_lognormal_int(rng, n, 120, 0.9), 2, MAX_CONTEXT - 1 - p)
    return p, o


def _humaneval(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(np.rint(rng.normal(150, 50, n)).astype(np.int64), 40, 500)
    o = np.clip(_lognormal_int(rng, n, 90, 0.5), 8, 400)
    return p, o


def _longbench(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    o = rng.integers(16, 149, n)
    p = rng.integers(1900, MAX_CONTEXT - o + 1)
    return p, o


def _fixed(prompt: int, output: int) -> LengthSampler:
    return lambda n, rng: (np.full(n, prompt, np.int64), np.full(n, output, np.int64))


LENGTH_MIXES: dict[str, LengthSampler] = {"sharegpt": _sharegpt, "humaneval": _humaneval, "longbench": _longbench,
                                          "sharegpt-anchor": _sharegpt_anchor}
ALIASES = {"chatbot": "sharegpt", "code": "humaneval", "summarization": "longbench"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A length mix plus an arrival process; or a recorded trace."""

    name: str
    lengths: LengthSampler | None = None
    arrival: str = "poisson"  # "poisson" | "gamma"
    cv: float = 1.0
    trace: Requests | None = None

    def sample(self, n: int, rate: float | None, seed: int = 0) -> Requests:
        """``n`` requests at mean ``rate`` req/s (a trace yields its first n, time-rescaled)."""
        if self.trace is not None:
            t = self.trace
            k = min(n, len(t))
            arr = t.arrival[:k] - t.arrival[0]
            if rate is not None and k > 1 and arr[-1] > 0:
                arr = arr * ((k - 1) / arr[-1]) / rate
            return Requests(arr, t.prompt_len[:k], t.output_len[:k])
        rng = np.random.default_rng(seed)
        rate = 1.0 if rate is None else rate
        if self.arrival == "gamma":
            shape = 1.0 / (self.cv**2)
            gaps = rng.gamma(shape, 1.0 / (shape * rate), n)
        else:
            gaps = rng.exponential(1.0 / rate, n)
        assert self.lengths is not None
        p, o = self.lengths(n, rng)
        return Requests(np.cumsum(gaps), p.astype(np.int64), o.astype(np.int64))

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "arrival": "trace" if self.trace is not None else self.arrival}
        if self.arrival == "gamma" and self.trace is None:
            d["cv"] = self.cv
        return d


def workload(name: str, arrival: str = "poisson", cv: float = 1.0) -> Workload:
    """Build a Workload from a mix name, ``fixed:P:O``, or a .csv/.jsonl trace path."""
    if arrival not in ("poisson", "gamma"):
        raise PlannerError(f"unknown arrival process {arrival!r}; use 'poisson' or 'gamma'")
    if not cv > 0:
        raise PlannerError(f"gamma cv must be positive, got {cv!r}")
    key = ALIASES.get(name, name)
    if key in LENGTH_MIXES:
        return Workload(key, LENGTH_MIXES[key], arrival, cv)
    if key.startswith("fixed:"):
        parts = key.split(":")
        try:
            p, o = int(parts[1]), int(parts[2])
            ok = len(parts) == 3 and p >= 1 and o >= 1 and p + o <= MAX_CONTEXT
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise PlannerError(f"bad fixed workload {name!r}; use fixed:PROMPT:OUTPUT with sum <= {MAX_CONTEXT}")
        return Workload(key, _fixed(p, o), arrival, cv)
    if key.endswith((".csv", ".jsonl")):
        return Workload(Path(key).name, trace=load_trace(key))
    raise PlannerError(f"unknown workload {name!r}; use one of {', '.join([*LENGTH_MIXES, *ALIASES])}, "
                       "fixed:P:O, or a .csv/.jsonl trace")


def load_trace(path: str | Path) -> Requests:
    """Read a CSV or JSONL trace of (arrival_time, prompt_len, output_len); sorted by arrival."""
    path = Path(path)
    rows: list[tuple[float, int, int]] = []
    keys = ("arrival_time", "prompt_len", "output_len")
    try:
        with open(path) as f:
            if path.suffix == ".csv":
                reader = csv.DictReader(f)
                missing = [k for k in keys if k not in (reader.fieldnames or [])]
                if missing:
                    raise PlannerError(f"trace {path}: missing columns {missing}")
                recs = [(i + 2, r) for i, r in enumerate(reader)]
            else:
                recs = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            recs.append((i, json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise PlannerError(f"trace {path}: line {i} is not JSON ({e.msg})") from e
            for line_no, r in recs:
                try:
                    t, p, o = float(r[keys[0]]), int(r[keys[1]]), int(r[keys[2]])
                except (KeyError, TypeError, ValueError) as e:
                    raise PlannerError(f"trace {path}: line {line_no} has a bad or missing field ({e})") from e
                if not (t >= 0 and p >= 1 and o >= 1):
                    raise PlannerError(f"trace {path}: line {line_no}: need arrival_time >= 0, "
                                       f"prompt_len >= 1, output_len >= 1, got {t}, {p}, {o}")
                rows.append((t, p, o))
    except FileNotFoundError as e:
        raise PlannerError(f"trace {path}: file not found") from e
    if not rows:
        raise PlannerError(f"trace {path}: no requests")
    a = np.array(rows, dtype=np.float64)
    a = a[np.argsort(a[:, 0], kind="stable")]
    return Requests(a[:, 0], a[:, 1].astype(np.int64), a[:, 2].astype(np.int64))
