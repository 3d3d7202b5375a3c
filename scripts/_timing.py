"""Shared by the benchmark scripts: the median wall time of a call.

    fn (blocks until its own result is ready) --median_time(reps, warmup)--> seconds
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (which must wait for its own results) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
