"""Replanning hook: a rolling profile of the live workload that can rerun the search.

    server: observe(arrival_time, prompt_len, output_len) per request that ran to its end
      --> WorkloadProfiler (jaxserve.serving.workload.WorkloadWindow): recent window -> arrival
          rate, length histograms (the server's GET /v1/workload shows it, ?format=jsonl as a trace)
      --to_workload()--> Workload (Poisson at the observed rate, lengths resampled from the window)
      --replan(spec)--> plan dict (planner.plan.make_plan) for the server to act on
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxserve.serving.workload import WorkloadWindow

from .errors import PlannerError
from .plan import make_plan
from .search import SearchSpec
from .workload import Workload


class WorkloadProfiler(WorkloadWindow):
    """The server's workload window, plus the search on it."""

    def to_workload(self) -> Workload:
        """Poisson arrivals; (prompt, output) pairs resampled jointly from the window."""
        rows = self._rows()
        if not rows:
            raise PlannerError("workload profiler has seen no requests yet")
        pairs = np.array([(p, o) for _, p, o in rows], dtype=np.int64)

        def lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            idx = rng.integers(0, len(pairs), n)
            return pairs[idx, 0], pairs[idx, 1]
        return Workload("observed", lengths)

    def replan(self, spec: SearchSpec) -> dict[str, Any]:
        """Rerun the search on the observed workload at the observed rate."""
        rate = self.rate()
        return make_plan(dataclasses.replace(spec, workload=self.to_workload(), rate=rate if rate > 0 else None))
