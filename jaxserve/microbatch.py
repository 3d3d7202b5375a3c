"""How a pipeline-parallel instance cuts one call into micro-batches, and when its stages run them.

    sizes of the call's sequences (tokens, in order) --split_runs(sizes, n)--> index ranges, one per micro-batch
    durations[m][s] (micro-batch m on stage s)       --wavefront(durations)--> (start, end) of each (m, s)

Pure Python, no jax, so the planner may import it. The runner (``engine.runner``) splits a pp>1
packed prefill call with ``split_runs`` and ``engine.pipeline.PipelineExecutor.execute_many``
runs the micro-batches in the ``wavefront`` order (stage ``s`` of micro-batch ``m`` starts when stage ``s - 1`` has finished ``m``
and stage ``s`` has finished ``m - 1``). The planner (``planner.latency``) prices a pp>1 step with
the same two functions, so what it models is what the engine runs.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_runs(sizes: Sequence[int], n: int) -> list[range]:
    """Split items, in order, into ``min(n, len(sizes))`` non-empty contiguous runs of similar total size."""
    if n <= 0:
        raise ValueError(f"micro-batch count must be >= 1, got {n}")
    n = min(n, len(sizes))
    total = sum(sizes)
    out: list[range] = []
    start = acc = 0
    for i, size in enumerate(sizes):
        acc += size
        runs_left = n - len(out) - 1
        if runs_left and (acc * n >= total * (len(out) + 1) or len(sizes) - i - 1 == runs_left):
            out.append(range(start, i + 1))
            start = i + 1
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def wavefront(durations: Sequence[Sequence[float]]) -> list[list[tuple[float, float]]]:
    """(start, end) of micro-batch ``m`` on stage ``s`` for ``durations[m][s]``, from time 0.

    A stage runs its micro-batches in order, one at a time; a micro-batch enters stage ``s`` when
    stage ``s - 1`` has finished it. With ``M`` micro-batches of equal stage time ``d`` over ``pp``
    stages the last ends at ``(M + pp - 1) * d``.
    """
    out: list[list[tuple[float, float]]] = []
    free: list[float] = []  # when each stage finishes its latest micro-batch
    for row in durations:
        if free and len(row) != len(free):
            raise ValueError("every micro-batch needs one duration per stage")
        free = free or [0.0] * len(row)
        ready = 0.0
        spans = []
        for s, d in enumerate(row):
            start = max(ready, free[s])
            ready = free[s] = start + d
            spans.append((start, ready))
        out.append(spans)
    return out
