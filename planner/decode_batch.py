"""A continuous-batching decode batch that jumps over many steps at once.

    admit(rid, context, steps) / advance(n) / steps_to_reach(dt) / steps_to_next_finish()
        <-- DecodeLane and ColocatedLane (planner.simulator, planner.colocated)

Between two events (a request joins or one finishes) the batch is constant, so the
step time grows linearly: step j from now takes a + b*(C + B*(k+j)) + c*B, where B is
the batch size, k the lane's step counter and C = sum(context_i - k_i). The time of n
steps is then a closed-form quadratic in n, and the next event is found by a heap
(finishes) or by solving that quadratic (a timed arrival): O(log B) per event, no
per-step loop. Pure Python scalars: for batches of tens to hundreds this beats numpy.

``padded`` (jaxserve's shapes): a step runs ``Bp = pow2(B)`` rows and its attention loops to
the batch's *longest* context M, while the pages it reads grow with the contexts cached; with
``padded(Bp) -> (a, p, q)`` step j takes a + p*(M + j) + q*(C + B*(k + j)): still linear in j
between events. ``per_seq`` adds host time per running sequence to every step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable


class DecodeBatch:
    """Running requests of one lane; ``coeffs(batch) -> (a, b, c)`` gives the step model."""

    __slots__ = ("B", "C", "coeffs", "heap", "k", "maxheap", "offsets", "padded", "per_seq")

    def __init__(self, coeffs: Callable[[int], tuple[float, float, float]], *,
                 padded: Callable[[int], tuple[float, float, float]] | None = None, per_seq: float = 0.0) -> None:
        self.coeffs = coeffs
        self.padded, self.per_seq = padded, per_seq
        self.B = 0
        self.C = 0.0  # sum over running of (context - k at join)
        self.k = 0  # steps taken so far by this lane
        self.heap: list[tuple[int, int]] = []  # (finish step, rid)
        self.maxheap: list[tuple[float, int]] = []  # padded: (-offset, rid), stale entries dropped lazily
        self.offsets: dict[int, float] = {}

    def admit(self, rid: int, context: int, steps: int) -> None:
        """Join now with ``context`` tokens in cache; finishes after ``steps`` more steps."""
        off = context - self.k
        self.offsets[rid] = off
        self.C += off
        self.B += 1
        heapq.heappush(self.heap, (self.k + steps, rid))
        if self.padded is not None:
            heapq.heappush(self.maxheap, (-off, rid))

    def _lin_quad(self) -> tuple[float, float]:
        if self.padded is not None and self.B:
            rows = 1
            while rows < self.B:
                rows *= 2
            top = self.maxheap
            while top[0][1] not in self.offsets:
                heapq.heappop(top)
            a, p, qs = self.padded(rows)
            inc = p + qs * self.B
            first = a + p * (self.k - top[0][0]) + qs * (self.C + self.B * self.k) + self.per_seq * self.B
            return first - 0.5 * inc, 0.5 * inc
        a, b, c = self.coeffs(self.B)
        q = 0.5 * b * self.B
        first = a + c * self.B + b * (self.C + self.B * self.k) + self.per_seq * self.B
        return first - q, q

    def time_of(self, n: int) -> float:
        """Seconds for the next ``n`` steps with the current batch."""
        lin, q = self._lin_quad()
        return lin * n + q * n * n

    def steps_to_next_finish(self) -> int:
        return self.heap[0][0] - self.k

    def steps_to_reach(self, dt: float) -> int:
        """Fewest steps (>= 1) whose total time is >= ``dt``."""
        if dt <= 0:
            return 1
        lin, q = self._lin_quad()
        if q > 0:
            n = (-lin + math.sqrt(lin * lin + 4 * q * dt)) / (2 * q)
        else:
            n = dt / lin
        n = max(1, math.ceil(n - 1e-9))
        while lin * n + q * n * n < dt - 1e-12:
            n += 1
        return n

    def advance(self, n: int) -> tuple[float, list[int]]:
        """Run ``n`` steps (no finish strictly inside); returns (elapsed, finished rids)."""
        dt = self.time_of(n)
        self.k += n
        done = []
        heap = self.heap
        while heap and heap[0][0] <= self.k:
            _, rid = heapq.heappop(heap)
            self.C -= self.offsets.pop(rid)
            self.B -= 1
            done.append(rid)
        return dt, done
