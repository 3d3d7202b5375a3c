"""Host-side paged-KV bookkeeping: free list, per-sequence block tables, ref counts.

    allocate(seq, n_tokens) / grow(seq, n_tokens) / free(seq)   (scheduler, pure Python)
        --> block_tables[seq] : list[int]  --> int32 arrays built for jit by model.inputs

Block 0 is reserved as the null block (padding writes go there) and is never
handed out. Freed blocks are handed out again first, so the pages a CPU host keeps
resident follow the most blocks in use at once, not every block ever used. Ref counts let several sequences share a block later (prefix
sharing); today every block has one owner. No jax import here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """Raised when an allocation is attempted without checking ``can_allocate`` first."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        self.tables: dict[Hashable, list[int]] = {}

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= len(self._free)

    def extra_blocks_for(self, seq: Hashable, num_tokens: int) -> int:
        """Blocks ``seq`` needs on top of what it holds to store ``num_tokens`` tokens."""
        have = len(self.tables.get(seq, ()))
        return max(0, blocks_needed(num_tokens, self.block_size) - have)

    def table(self, seq: Hashable) -> list[int]:
        return self.tables[seq]

    # ---- changes ---------------------------------------------------------------------------
    def grow(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Make ``seq`` hold enough blocks for ``num_tokens`` tokens; returns its block table."""
        extra = self.extra_blocks_for(seq, num_tokens)
        if extra > len(self._free):
            raise OutOfBlocks(f"sequence {seq!r} needs {extra} more blocks, {len(self._free)} free")
        table = self.tables.setdefault(seq, [])
        for _ in range(extra):
            b = self._free.popleft()
            self._ref[b] = 1
            table.append(b)
        return table

    def allocate_blocks(self, seq: Hashable, n_blocks: int) -> list[int]:
        """Give ``seq`` exactly ``n_blocks`` fresh blocks (a KV transfer destination)."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} already holds blocks")
        return self.grow(seq, n_blocks * self.block_size)

    def free(self, seq: Hashable) -> int:
        """Release every block of ``seq`` (no-op if it holds none); returns how many were released."""
        table = self.tables.pop(seq, None)
        if not table:
            return 0
        released = []
        for b in table:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                released.append(b)
        self._free.extendleft(reversed(released))  # reused first: their pages are already resident
        return len(released)

    def check_invariants(self) -> None:
        """Every block is free xor referenced; ref counts match the tables (for tests)."""
        counts = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        free = set(self._free)
        assert NULL_BLOCK not in free and counts[NULL_BLOCK] == 0, "null block handed out"
        assert len(free) == len(self._free), "duplicate free block"
        for b in range(1, self.num_blocks):
            assert counts[b] == self._ref[b], f"block {b}: ref {self._ref[b]} vs {counts[b]} owners"
            assert (b in free) == (counts[b] == 0), f"block {b}: free/used mismatch"
