"""Continuous-batching scheduler (pure Python, no jax): which tokens run in the next step.

    add(Sequence) -> waiting queue
    schedule() -> SchedulerOutput(chunks=[ScheduledChunk(seq, start, n)], preempted=[...])
    (runner executes the chunks; engine appends sampled tokens)
    on_step_done(chunks) / finish(seq) / abort(request_id)

Sequence states::

    WAITING --admitted (blocks allocated)--> RUNNING --EOS/stop/length--> FINISHED (blocks freed)
       ^                                        |
       +------- preempted (blocks freed, KV recomputed from scratch later) --+

Policies:
* ``prefill-first`` (vLLM-style colocated): if prompts wait and fit (token budget,
  ``max_num_seqs``, free blocks), the step is a prefill of whole prompts; otherwise
  every running sequence decodes one token.
* ``chunked`` (Sarathi-Serve): each step carries all decodes, then fills the rest of
  the token budget with prompt chunks (a long prompt spans several steps).
* ``prefill-only`` (a disaggregated prefill instance): whole prompts, FCFS, up to the budget;
  nothing decodes here.
When a decode needs a block and none is free, the most recently admitted running
sequence is preempted (recompute) and goes back to the front of the queue.
With prefix caching (``BlockManager(caching=True)``) a sequence admitted from the queue first
takes the cached blocks of its longest cached prefix (never its last token) and its prompt chunk
starts after them; after every step the blocks its computed tokens fill are registered.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from jaxserve.engine.block_manager import BlockManager, blocks_needed
from jaxserve.request import Request


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """Scheduler-side state of one request."""

    request: Request
    num_computed: int = 0  # tokens whose K/V are in this instance's cache
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    seed: int = 0  # sampling seed (the request's, or a fresh one)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed)
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so a token is sampled from it."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


POLICIES = ("prefill-first", "chunked", "prefill-only")


def check_fits(request: Request, *, max_model_len: int, block_size: int, capacity: int,
               cache: str = "the cache") -> None:
    """Raise ValueError if ``request`` could never run on an instance with these limits (its prompt
    past the context, or its worst-case KV past the whole pool), whatever else is running."""
    n = request.num_prompt_tokens
    if n >= max_model_len:
        raise ValueError(f"prompt has {n} tokens; the limit is {max_model_len - 1} (max_model_len {max_model_len})")
    worst = min(n + request.sampling.max_tokens, max_model_len)
    need = blocks_needed(worst, block_size)
    if need > capacity:
        raise ValueError(f"request needs up to {worst} tokens of KV cache ({need} blocks) but {cache} holds "
                         f"{capacity} blocks of {block_size}; lower max_tokens or raise the KV cache size")


class Scheduler:
    def __init__(self, blocks: BlockManager, *, policy: str = "prefill-first", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 2048, score_chunk: int = 16) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy != "chunked" and max_num_batched_tokens < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                             f"({max_model_len}) unless prompts are chunked")
        self.blocks = blocks
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.score_chunk = score_chunk  # prompt tokens per step of a prompt scored for its logprobs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- admission ---------------------------------------------------------------------------
    def check_fits(self, request: Request) -> None:
        """Raise ValueError if the request could never run here, whatever else is running."""
        check_fits(request, max_model_len=self.max_model_len, block_size=self.blocks.block_size,
                   capacity=self.blocks.capacity)

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.request)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        preempted: list[Sequence] = []
        if self.policy == "chunked":
            decodes = self._schedule_decodes(preempted)
            budget = self.max_num_batched_tokens - len(decodes)
            return SchedulerOutput(decodes + self._schedule_prompts(budget, chunk=True), preempted)
        prompts = self._schedule_prompts(self.max_num_batched_tokens, chunk=False)
        if prompts or self.policy == "prefill-only":
            return SchedulerOutput(prompts, preempted)
        return SchedulerOutput(self._schedule_decodes(preempted), preempted)

    def _schedule_prompts(self, budget: int, chunk: bool) -> list[ScheduledChunk]:
        out: list[ScheduledChunk] = []
        # running sequences still in their prompt (chunked mode, or a prompt scored in pieces) continue first
        candidates = [s for s in self.running if s.num_computed < s.num_tokens - 1]
        for seq in candidates:
            c = self._admit_chunk(seq, budget, chunk)
            if c is None:
                return out
            out.append(c)
            budget -= c.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            c = self._admit_chunk(self.waiting[0], budget, chunk)
            if c is None:
                break
            seq = self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(c)
            budget -= c.num_tokens
        return out

    def _admit_chunk(self, seq: Sequence, budget: int, chunk: bool) -> ScheduledChunk | None:
        bm = self.blocks
        cached: list[int] = []
        fresh = seq.num_computed == 0 and seq.id not in bm.tables  # a new (or preempted) sequence: its cached prefix
        # at least the last token is computed; a prefill-only instance keeps 2, so the rest is never a
        # 1-token chunk (that runs as a decode-shaped call, which such an instance does not compile)
        limit = seq.num_tokens - (2 if self.policy == "prefill-only" else 1)
        scoring = seq.request.scoring_prompt  # logits at every prompt position: no cache, in pieces
        if fresh and not scoring:
            cached = bm.lookup(seq.token_ids, limit)
        start = len(cached) * bm.block_size
        remaining = seq.num_tokens - max(seq.num_computed, start)
        if scoring:
            remaining = min(remaining, self.score_chunk)
        n = min(remaining, budget) if chunk else remaining
        if n <= 0 or n > budget:
            return None
        have = len(bm.tables.get(seq.id, cached))
        # a prompt scored in pieces takes its whole prompt's blocks at once: a piece never waits for blocks
        # (two half-scored prompts could otherwise hold them all, with nothing to decode or preempt)
        grow_to = seq.num_tokens if scoring else max(seq.num_computed, start) + n
        need = blocks_needed(grow_to, bm.block_size) - have
        if need > bm.num_free - bm.evictable_among(cached):
            return None
        if fresh and bm.caching and not scoring:
            bm.record_lookup(max(0, limit), start)
        if cached:
            bm.share(seq.id, cached, seq.token_ids)
            seq.num_computed = start
            seq.request.num_cached_tokens = max(seq.request.num_cached_tokens,
                                                min(start, seq.request.num_prompt_tokens))
        bm.grow(seq.id, max(grow_to, seq.num_computed + n))
        return ScheduledChunk(seq, seq.num_computed, n)

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[ScheduledChunk]:
        """Every running sequence past its prompt decodes one token (a mid-prompt one waits its turn)."""
        queue = deque(s for s in self.running if s.num_computed == s.num_tokens - 1)
        out: list[ScheduledChunk] = []
        while queue:
            seq = queue.popleft()
            while self.blocks.extra_blocks_for(seq.id, seq.num_tokens) > self.blocks.num_free:
                victim = self._pick_victim(exclude=[*(c.seq for c in out), seq])
                if victim is None:  # nothing else to take from: this sequence waits itself
                    victim = seq
                self._preempt(victim, preempted)
                if victim in queue:
                    queue.remove(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.id, seq.num_tokens)
                out.append(ScheduledChunk(seq, seq.num_tokens - 1, 1))
        return out

    def _pick_victim(self, exclude: list[Sequence]) -> Sequence | None:
        for s in reversed(self.running):  # most recently admitted first
            if s not in exclude:
                return s
        return None

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        if seq.request.scoring_prompt:  # its prompt is scored again from the start
            seq.request.prompt_logprobs.clear()
        self.blocks.free(seq.id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        preempted.append(seq)

    # ---- after the step ----------------------------------------------------------------------
    def on_step_done(self, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            c.seq.num_computed = c.start + c.num_tokens
            self.blocks.register(c.seq.id, c.seq.token_ids, c.seq.num_computed)  # full blocks: cacheable now

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.id)
        seq.status = SeqStatus.FINISHED

    # ---- disaggregation: hand a prefilled sequence over, take one in ------------------------
    def detach(self, seq: Sequence) -> list[int]:
        """Prefill side: stop scheduling ``seq`` but keep its blocks (until ``finish``); returns them."""
        self.running.remove(seq)
        return self.blocks.table(seq.id)

    def can_admit(self, num_tokens: int) -> bool:
        """Decode side: room for one more running sequence whose first ``num_tokens`` have KV."""
        need = blocks_needed(num_tokens + 1, self.blocks.block_size)  # + the next token's slot
        return len(self.running) < self.max_num_seqs and self.blocks.can_allocate(need)

    def admit_prefilled(self, seq: Sequence, num_computed: int) -> list[int]:
        """Decode side: allocate blocks for ``num_computed`` tokens of KV arriving by transfer."""
        self.check_fits(seq.request)
        table = self.blocks.grow(seq.id, num_computed)
        seq.num_computed = num_computed
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return table

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.running, *self.waiting]:
            if seq.id == request_id:
                self.finish(seq)
                return seq
        return None
