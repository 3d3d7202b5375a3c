"""Replanning hook: a rolling profile of the live workload that can rerun the search.

    server (later): observe(arrival_time, prompt_len, output_len) per finished request
      --> WorkloadProfiler: recent window -> arrival rate, length histograms
      --to_workload()--> Workload (Poisson at the observed rate, lengths resampled from the window)
      --replan(spec)--> plan dict (planner.plan.make_plan) for the server to act on
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np

from .errors import PlannerError
from .plan import make_plan
from .search import SearchSpec
from .workload import Workload


class WorkloadProfiler:
    """Keeps the requests of the last ``window_s`` seconds (at most ``max_requests``)."""

    def __init__(self, window_s: float = 600.0, max_requests: int = 20000) -> None:
        self.window_s = window_s
        self.recent: deque[tuple[float, int, int]] = deque(maxlen=max_requests)

    def observe(self, arrival_time: float, prompt_len: int, output_len: int) -> None:
        self.recent.append((arrival_time, prompt_len, output_len))
        while self.recent and self.recent[0][0] < arrival_time - self.window_s:
            self.recent.popleft()

    def rate(self) -> float:
        """Observed arrival rate (req/s) over the window; 0.0 with fewer than 2 requests."""
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1][0] - self.recent[0][0]
        return (len(self.recent) - 1) / span if span > 0 else 0.0

    def histograms(self, bins: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(counts, bin edges) of prompt and output lengths in the window."""
        a = np.array(self.recent, dtype=np.float64).reshape(-1, 3)
        return {"prompt_len": np.histogram(a[:, 1], bins=bins), "output_len": np.histogram(a[:, 2], bins=bins)}

    def to_workload(self) -> Workload:
        """Poisson arrivals; (prompt, output) pairs resampled jointly from the window."""
        if not self.recent:
            raise PlannerError("workload profiler has seen no requests yet")
        pairs = np.array([(p, o) for _, p, o in self.recent], dtype=np.int64)

        def lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            idx = rng.integers(0, len(pairs), n)
            return pairs[idx, 0], pairs[idx, 1]
        return Workload("observed", lengths)

    def replan(self, spec: SearchSpec) -> dict[str, Any]:
        """Rerun the search on the observed workload at the observed rate."""
        rate = self.rate()
        return make_plan(dataclasses.replace(spec, workload=self.to_workload(), rate=rate if rate > 0 else None))
