"""The live workload, kept for replanning: what the server saw in the last few minutes.

    each request that ran to its end (stop / length) --observe(arrival, prompt_len, output_len)-->
    WorkloadWindow (the last ``window_s`` seconds, at most ``max_requests``)
      --summary()--> GET /v1/workload: arrival rate, length percentiles
      --trace_rows()--> GET /v1/workload?format=jsonl: a trace ``python -m planner --workload FILE.jsonl``
                        replays (arrival_time from the window's first request, prompt_len, output_len)
    planner.replan.WorkloadProfiler extends it with the search (to_workload, replan).

Aborted and failed requests are not kept: their output length says when the client left, not
what the workload asks for. Arrival times are seconds on any monotonic clock.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

import numpy as np


class WorkloadWindow:
    """The requests that arrived in the last ``window_s`` seconds (at most ``max_requests``).

    Requests are observed when they end, so not in arrival order; the window is taken by arrival
    time, relative to ``now`` when a reader gives it (the server does: an idle server's window
    empties) or else to the newest arrival seen."""

    def __init__(self, window_s: float = 600.0, max_requests: int = 20000) -> None:
        if not window_s > 0 or max_requests < 1:
            raise ValueError(f"window_s must be > 0 and max_requests >= 1, got {window_s}, {max_requests}")
        self.window_s = window_s
        self.recent: deque[tuple[float, int, int]] = deque(maxlen=max_requests)
        self._newest = -math.inf
        self._lock = threading.Lock()

    def observe(self, arrival_time: float, prompt_len: int, output_len: int) -> None:
        with self._lock:
            self.recent.append((arrival_time, prompt_len, output_len))
            self._newest = max(self._newest, arrival_time)
            while self.recent and self.recent[0][0] < self._newest - self.window_s:
                self.recent.popleft()  # the oldest observed; stragglers behind it are filtered in _rows

    def _rows(self, now: float | None = None) -> list[tuple[float, int, int]]:
        """The window's (arrival, prompt_len, output_len), by arrival."""
        with self._lock:
            cut = (self._newest if now is None else now) - self.window_s
            return sorted(r for r in self.recent if r[0] >= cut)

    @staticmethod
    def _rate(rows: list[tuple[float, int, int]]) -> float:
        if len(rows) < 2:
            return 0.0
        span = rows[-1][0] - rows[0][0]
        return (len(rows) - 1) / span if span > 0 else 0.0

    def rate(self, now: float | None = None) -> float:
        """Observed arrival rate (req/s) over the window; 0.0 with fewer than 2 requests."""
        return self._rate(self._rows(now))

    def histograms(self, bins: int = 16, now: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(counts, bin edges) of prompt and output lengths in the window."""
        a = np.array(self._rows(now), dtype=np.float64).reshape(-1, 3)
        return {"prompt_len": np.histogram(a[:, 1], bins=bins), "output_len": np.histogram(a[:, 2], bins=bins)}

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Window, request count, arrival rate and length statistics (JSON-ready)."""
        rows = self._rows(now)
        out: dict[str, Any] = {"window_s": self.window_s, "requests": len(rows), "rate_rps": self._rate(rows)}
        for i, key in ((1, "prompt_len"), (2, "output_len")):
            v = np.array([r[i] for r in rows], dtype=np.float64)
            out[key] = ({"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
                         "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
                         "max": int(v.max())} if len(v) else None)
        return out

    def trace_rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """The window as trace records, arrival times from its first request (the planner's trace format)."""
        rows = self._rows(now)
        t0 = rows[0][0] if rows else 0.0
        return [{"arrival_time": round(t - t0, 6), "prompt_len": p, "output_len": o} for t, p, o in rows]
