"""Which batch shapes the profiler times.

    CLI flags --> Grid --check()--> PlannerError on bad values
    Grid --prefill_points / decode_points / mixed_decode_points(max_len)--> per-request lengths of each batch
"""

from __future__ import annotations

import dataclasses

from planner.errors import PlannerError

DEFAULT_PREFILL_BATCHES = (1, 2, 4, 8)
DEFAULT_PREFILL_LENS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_DECODE_CONTEXTS = (16, 64, 256, 1024)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Which batch shapes to time."""

    prefill_batches: tuple[int, ...] = DEFAULT_PREFILL_BATCHES  # prompts per prefill batch
    prefill_lens: tuple[int, ...] = DEFAULT_PREFILL_LENS  # prompt length (all prompts of a batch alike)
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    decode_contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS  # tokens attended per sequence
    max_tokens: int = 2048  # cap on sum(l) of a prefill batch
    max_kv_tokens: int = 32768  # cap on sum(context) of a decode step (sizes the KV pages)
    repeats: int = 3
    stat: str = "median"  # of the repeats: "median" or "min" (min resists a busy host's noise)
    passes: int = 1  # times the whole grid is walked; the stat is over every pass's repeats
    block_size: int = 16
    max_num_seqs: int = 64  # the engine's batch limit (sets the shape buckets, as LLMEngine does)

    def check(self) -> None:
        for name in ("repeats", "passes", "block_size", "max_num_seqs", "max_tokens", "max_kv_tokens"):
            if getattr(self, name) < 1:
                raise PlannerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stat not in ("median", "min"):
            raise PlannerError(f"--stat must be median or min, got {self.stat!r}")
        if self.block_size & (self.block_size - 1):
            raise PlannerError(f"--block-size must be a power of two, got {self.block_size}")

    def prefill_points(self, max_len: int) -> list[list[int]]:
        return [[ln] * n for ln in sorted(set(self.prefill_lens)) for n in sorted(set(self.prefill_batches))
                if ln <= max_len and n * ln <= self.max_tokens and n <= self.max_num_seqs]

    def decode_points(self, max_len: int) -> list[list[int]]:
        return [[c] * b for c in sorted(set(self.decode_contexts)) for b in sorted(set(self.decode_batches))
                if c <= max_len and b * c <= self.max_kv_tokens and b <= self.max_num_seqs]

    def mixed_decode_points(self, max_len: int) -> list[list[int]]:
        """One long context among short ones (the shortest profiled): separates what a decode step pays
        per row up to the longest context from what it pays per context token actually cached."""
        short = min(self.decode_contexts)
        return [[c] + [short] * (b - 1) for c in sorted(set(self.decode_contexts)) if short < c <= max_len
                for b in sorted(set(self.decode_batches)) if 1 < b <= self.max_num_seqs]
