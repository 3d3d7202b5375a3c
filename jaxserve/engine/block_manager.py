"""Host-side paged-KV bookkeeping: free list, per-sequence block tables, ref counts, prefix cache.

    allocate(seq, n_tokens) / grow(seq, n_tokens) / free(seq)   (scheduler, pure Python)
        --> block_tables[seq] : list[int]  --> int32 arrays built for jit by model.inputs
    with caching: lookup(tokens, limit) -> cached blocks of the longest cached prefix;
        share(seq, blocks); register(seq, tokens, num_computed) after each step

Block 0 is reserved as the null block (padding writes go there) and is never
handed out. Freed blocks are handed out again first, so the pages a CPU host keeps
resident follow the most blocks in use at once, not every block ever used.

Automatic prefix caching (``caching=True``): a full block is keyed by the SHA-256 of (its parent's
key, its tokens), a chain, so a key stands for every token up to the block's end (a cryptographic
digest: a client cannot craft a prompt whose key collides with another's, as with Python's hash). Blocks whose
tokens have KV are registered under their key; a new sequence shares the cached blocks of its
longest cached prefix (ref counts), and its prefill starts after them. A block no sequence holds
any more keeps its KV and key in an LRU of evictable blocks: it counts as free, is handed out only
when no plain free block is left (oldest first; a released sequence's last block first, so a prefix
loses its tail before its head), and loses its key then. No jax import here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence

import numpy as np

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """Raised when an allocation is attempted without checking ``can_allocate`` first."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        self.tables: dict[Hashable, list[int]] = {}
        self.caching = caching
        self._by_key: dict[bytes, int] = {}  # cache key (digest) -> block
        self._key_of: dict[int, bytes] = {}  # block -> its cache key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; oldest first
        self.hashes: dict[Hashable, list[bytes]] = {}  # per sequence: keys of its registered full blocks
        self.query_tokens = 0  # prefix-cache lookups, in prompt tokens (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of which found cached (prefix_cache_hits)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: plain free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= self.num_free

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
        if extra > self.num_free:
            raise OutOfBlocks(f"sequence {seq!r} needs {extra} more blocks, {self.num_free} free")
        table = self.tables.setdefault(seq, [])
        for _ in range(extra):
            b = self._take()
            self._ref[b] = 1
            table.append(b)
        return table

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        b, _ = self._evictable.popitem(last=False)  # the least recently released cached block
        del self._by_key[self._key_of.pop(b)]
        return b

    def allocate_blocks(self, seq: Hashable, n_blocks: int) -> list[int]:
        """Give ``seq`` exactly ``n_blocks`` fresh blocks (a KV transfer destination)."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} already holds blocks")
        return self.grow(seq, n_blocks * self.block_size)

    def free(self, seq: Hashable) -> int:
        """Release every block of ``seq`` (no-op if it holds none); returns how many were released."""
        table = self.tables.pop(seq, None)
        self.hashes.pop(seq, None)
        if not table:
            return 0
        released = []
        for b in reversed(table):  # the tail of a prefix becomes evictable before its head
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None  # keeps its KV for a later hit; newest last
                else:
                    released.append(b)
        released.reverse()
        self._free.extendleft(reversed(released))  # reused first: their pages are already resident
        return len(released)

    # ---- prefix caching ----------------------------------------------------------------------
    def _key(self, parent: bytes, tokens: Sequence[int], i: int) -> bytes:
        bs = self.block_size
        block = np.asarray(tokens[i * bs:(i + 1) * bs], np.int64).tobytes()
        return hashlib.sha256(parent + block).digest()

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Cached blocks holding the longest prefix of ``tokens`` in whole blocks, at most ``limit`` tokens."""
        if not self.caching:
            return []
        out: list[int] = []
        parent = b""
        for i in range(limit // self.block_size):
            key = self._key(parent, tokens, i)
            b = self._by_key.get(key)
            if b is None:
                break
            out.append(b)
            parent = key
        return out

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        """Count one admitted sequence's lookup (the metrics' prefix_cache_queries / hits)."""
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def evictable_among(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` nobody holds (sharing them takes them out of the free count)."""
        return sum(1 for b in blocks if b in self._evictable)

    def share(self, seq: Hashable, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        """Give ``seq`` (holding nothing yet) the cached ``blocks`` of its prefix ``tokens``."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} already holds blocks")
        hashes, parent = [], b""
        for i, b in enumerate(blocks):
            self._evictable.pop(b, None)
            self._ref[b] += 1
            parent = self._key(parent, tokens, i)
            hashes.append(parent)
        self.tables[seq] = list(blocks)
        self.hashes[seq] = hashes

    def register(self, seq: Hashable, tokens: Sequence[int], num_computed: int) -> None:
        """Key every full block of ``seq`` whose tokens all have KV now (first ``num_computed`` tokens).
        A block whose key another block already has stays unkeyed (it is freed as usual)."""
        if not self.caching or seq not in self.tables:
            return
        table, hashes = self.tables[seq], self.hashes.setdefault(seq, [])
        for i in range(len(hashes), min(num_computed // self.block_size, len(table))):
            key = self._key(hashes[-1] if hashes else b"", tokens, i)
            hashes.append(key)
            b = table[i]
            if key not in self._by_key and b not in self._key_of:
                self._by_key[key] = b
                self._key_of[b] = key

    def check_invariants(self) -> None:
        """Every block is free xor referenced; ref counts match the tables (for tests)."""
        counts = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                counts[b] += 1
        free = set(self._free) | set(self._evictable)
        assert NULL_BLOCK not in free and counts[NULL_BLOCK] == 0, "null block handed out"
        assert len(free) == len(self._free) + len(self._evictable), "duplicate free block"
        assert all(b in self._key_of for b in self._evictable), "an evictable block without a key"
        assert all(self._by_key[k] == b for b, k in self._key_of.items()), "cache maps disagree"
        for b in range(1, self.num_blocks):
            assert counts[b] == self._ref[b], f"block {b}: ref {self._ref[b]} vs {counts[b]} owners"
            assert (b in free) == (counts[b] == 0), f"block {b}: free/used mismatch"
