"""Warm-up progress for people: shapes done of total, persistent-cache hits, elapsed time and an estimate.

    Router.warmup(progress=True) --> each instance's own process: WarmupProgress(instance name)
      --> LLMEngine.warmup(progress) --> Runner.warmup calls progress(done, total) before the first
          shape and after each one --> stderr:
            a terminal: one tqdm bar, rewritten in place (done/total, elapsed, estimate, cache hits)
            a log (Ray actor logs, CI, a redirected launcher): a line at the start, at every tenth of
            the way and at the end, so a log shows signs of life without one line per shape

The engine and the runner only call a ``(done, total)`` callback; this reporter is the one that
prints. Cache hits are those of the warming thread (``jaxserve.compile_cache.thread_cache_hit_count``)
since the reporter was made: the instances of one process warm up at once, each on its own thread, so
a process-wide count would mix theirs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

ProgressFn = Callable[[int, int], None]  # (shapes done, total); called from the warming thread


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s // 60:.0f} min {s % 60:02.0f} s"


class WarmupProgress:
    """A ``ProgressFn`` that reports on ``stream`` (default stderr); see the module docstring.

    ``tty`` overrides the stream's own answer; a log gets a line at every ``1 / steps`` of the way;
    ``clock`` and ``hits`` (a cache-hit counter) are there for tests."""

    def __init__(self, label: str = "warm-up", *, stream: TextIO | None = None, tty: bool | None = None,
                 steps: int = 10, clock: Callable[[], float] = time.monotonic,
                 hits: Callable[[], int] | None = None) -> None:
        if hits is None:
            from jaxserve.compile_cache import thread_cache_hit_count
            hits = thread_cache_hit_count
        self.label, self.steps, self.clock, self._hits = label, steps, clock, hits
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self._hits0, self._t0 = hits(), clock()
        self._next = 0  # the next step (in 1 / steps of the way) that gets a log line
        self._bar: Any = None
        self.done, self.total = 0, 0

    @property
    def hits(self) -> int:
        return self._hits() - self._hits0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.tty:
            self._draw(done, total)
        elif done >= total or done * self.steps >= self._next * total:
            print(self.line(done, total), file=self.stream, flush=True)
            self._next = done * self.steps // max(total, 1) + 1

    def line(self, done: int, total: int) -> str:
        """The log line for ``done`` of ``total`` shapes, now."""
        elapsed = self.clock() - self._t0
        if done >= total:
            return f"{self.label}: {total} shapes ready in {_secs(elapsed)} ({self.hits} from the compilation cache)"
        eta = f", about {_secs(elapsed / done * (total - done))} left" if done else ""
        return (f"{self.label}: {done}/{total} shapes ({100 * done // total}%), {self.hits} cache hits, "
                f"{_secs(elapsed)} elapsed{eta}")

    def _draw(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.label, unit="shape", file=self.stream, leave=True,
                             mininterval=0.2)
        self._bar.total = total
        self._bar.set_postfix_str(f"{self.hits} cache hits", refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
