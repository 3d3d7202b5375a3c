"""The one router: requests in, instances chosen, KV pulled, messages folded into request records.

    add_request(Request) --check (vocabulary, every instance's limits), seed fixed-->
        the live entry instance (prefill, or a colocated replica) with the fewest queued tokens:
        inst.add(copy)                        [the caller's Request is the router's record]
    step(): wait (up to ``poll_s``) until an instance published a batch, then
        fold:  RequestUpdate -> events (moved onto this clock) and tokens appended to the record,
               one StepOutput per new token;  KVReady -> the source's ready queue (FCFS);
               Imported -> the request now lives on the decode instance, the source releases its
               blocks (or, refused: back to the head of the queue);  Failed -> the request ends
               with ERROR;  a dead instance -> every request it held ends with ERROR
        pull:  each prefilled request, oldest first per prefill instance, goes to a live decode
               instance with room: one on the source's node if any, then the one with the most free
               blocks: dst.import_kv(request, handle)
        -> the StepOutputs folded
    abort_request(id): ends the record now; the holder (and the target of an import in flight)
                       is told to free its blocks

The same code routes for instances in threads of this process (``LocalInstance``), Ray actors
(``jaxserve.cluster.ray_instance.RayInstance``) and test doubles. Nothing here imports jax and
nothing here waits on an instance: instances step on their own, and a decode instance never waits
for a prefill step.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxserve.engine.block_manager import blocks_needed
from jaxserve.engine.scheduler import check_fits
from jaxserve.errors import EngineUnavailable
from jaxserve.request import Event, FinishReason, Request
from jaxserve.runtime.api import (
    NO_TOKEN,
    Batch,
    Failed,
    Imported,
    Instance,
    InstanceStats,
    KVReady,
    RequestUpdate,
    StepOutput,
    copy_request,
)

log = logging.getLogger(__name__)


class ClusterError(EngineUnavailable):
    """The deployment cannot serve (no live instance of a role): HTTP 503."""


@dataclasses.dataclass(eq=False)
class Slot:
    """The router's view of one instance."""

    inst: Instance
    stats: InstanceStats
    ready: list[tuple[str, Any]] = dataclasses.field(default_factory=list)  # prefill: (id, KV handle), FCFS
    error: str | None = None
    full: bool = False  # decode: refused an import; none more until its next batch

    @property
    def name(self) -> str:
        return self.inst.info.name

    @property
    def alive(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class _Transit:
    src: Slot
    dst: Slot
    handle: Any


class Router:
    def __init__(self, instances: Sequence[Instance], *, poll_s: float = 0.02) -> None:
        slots = [Slot(i, _empty_stats(i)) for i in instances]
        self.prefills = [s for s in slots if s.inst.info.role == "prefill"]
        self.decodes = [s for s in slots if s.inst.info.role == "decode"]
        self.colocated = [s for s in slots if s.inst.info.role == "colocated"]
        if self.colocated and (self.prefills or self.decodes):
            raise ValueError("a deployment runs either colocated replicas or prefill + decode instances")
        if not self.colocated and (not self.prefills or not self.decodes):
            raise ValueError("disaggregation needs at least one prefill and one decode instance")
        self.slots = slots
        first = slots[0].inst.info
        if any(s.inst.info.model != first.model or s.inst.info.vocab_size != first.vocab_size for s in slots):
            raise ValueError("instances serve different models: " + ", ".join(s.name for s in slots))
        self.vocab_size, self.eos_token_id = first.vocab_size, first.eos_token_id
        self.max_model_len = min(s.inst.info.max_model_len for s in slots)
        self.poll_s = poll_s
        self.after_warmup: Callable[[], None] | None = None  # e.g. warming hand-offs that need both ends warm
        self.keep_alive: Any = None  # what must live as long as the router (a collective group's coordinator)
        self.requests: dict[str, Request] = {}  # the records, owned here
        self.where: dict[str, Slot] = {}  # request id -> the slot holding it (the source mid-transfer)
        self.transit: dict[str, _Transit] = {}
        self.failures: dict[str, str] = {}  # request id -> why it ended with ERROR
        self.num_transfers = 0
        self.transfer_bytes = 0
        self._outs: list[StepOutput] = []
        self._wake = threading.Event()
        self._started = False
        self._rng = random.Random()
        # a router dropped without shutdown() still stops its instances' threads (they hold the engines)
        weakref.finalize(self, _stop_all, [s.inst for s in slots])

    @property
    def entries(self) -> list[Slot]:
        """Where new requests go: the prefill instances, or the colocated replicas."""
        return self.prefills or self.colocated

    @property
    def instances(self) -> list[Instance]:
        return [s.inst for s in self.slots]

    def start(self) -> None:
        if not self._started:
            self._started = True
            for s in self.slots:
                s.inst.start(self._wake)

    def wake(self) -> None:
        """Make a waiting ``step`` return now (new commands for the caller's thread)."""
        self._wake.set()

    # ---- requests ----------------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise ValueError (naming the problem) if the request could never run here; ClusterError if
        a role has no live instance. From each instance's limits: no round trip."""
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        for group, role in ((self.entries, "colocated" if self.colocated else "prefill"), (self.decodes, "decode")):
            live = [s for s in group if s.alive]
            if group and not live:
                raise ClusterError(f"no live {role} instance ({_why(group)})")
            for s in live:
                i = s.inst.info
                check_fits(request, max_model_len=i.max_model_len, block_size=i.block_size, capacity=i.capacity,
                           cache=f"{i.name}'s cache")

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        self.check_request(request)
        self.start()
        if request.sampling.seed is None:  # fixed here, so the prefill and decode sides sample alike
            request.sampling = dataclasses.replace(request.sampling, seed=self._rng.randrange(2**31))
        slot = min((s for s in self.entries if s.alive), key=lambda s: s.stats.queued_tokens)
        self.requests[rid] = request
        self.where[rid] = slot
        slot.inst.add(copy_request(request))
        slot.stats = dataclasses.replace(slot.stats, queued_tokens=slot.stats.queued_tokens + request.num_prompt_tokens)

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request now and free its blocks wherever they are (commands sent, not awaited)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        slot = self.where.pop(request_id)
        t = self.transit.pop(request_id, None)
        if t is not None and t.dst.alive:  # mid hand-off: the import may land; it is freed after it
            t.dst.inst.abort(request_id, reason)
        for s in self.prefills:
            s.ready = [(r, h) for r, h in s.ready if r != request_id]
        if slot.alive:
            slot.inst.abort(request_id, reason)
        self._outs = [o for o in self._outs if o.request_id != request_id]
        if req.finish_reason is None:
            req.finish_reason = reason
            req.stamp(Event.ABORTED if reason == FinishReason.ABORT else Event.FINISHED, instance=slot.name)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._outs)

    def step(self) -> list[StepOutput]:
        """Wait up to ``poll_s`` for instance batches, fold them in, pull, return the outputs folded."""
        self.start()
        if not self._outs and self.requests:
            self._wake.wait(self.poll_s)
        self._wake.clear()
        for s in self.slots:
            if s.alive:
                self._fold(s, s.inst.outputs())
        self.pull()
        outs, self._outs = self._outs, []
        return outs

    # ---- folding messages ----------------------------------------------------------------------
    def _fold(self, slot: Slot, batch: Batch) -> None:
        refused = False
        for m in batch.messages:
            if isinstance(m, RequestUpdate):
                self._update(slot, m)
            elif isinstance(m, KVReady):
                if self.where.get(m.request_id) is slot and m.request_id not in self.transit:
                    slot.ready.append((m.request_id, m.handle))
            elif isinstance(m, Imported):
                refused = refused or m.nbytes is None
                self._landed(slot, m)
            elif isinstance(m, Failed):
                if self.where.get(m.request_id) is slot or getattr(self.transit.get(m.request_id), "dst", None) is slot:
                    self._drop_transit(m.request_id)
                    self._fail_request(m.request_id, m.why)
        if batch.stats is not None:  # a decode instance that refused waits for its next batch
            slot.stats, slot.full = batch.stats, refused
        if batch.error is not None:
            self._fail_instance(slot, batch.error)

    def _update(self, slot: Slot, u: RequestUpdate) -> None:
        req = self.requests.get(u.request_id)
        if req is None or self.where.get(u.request_id) is not slot:
            return  # ended here already (aborted, failed), or a late word from a former holder
        u.apply(req, slot.inst.clock_offset)
        for i, tok in enumerate(u.new_token_ids):
            last = i == len(u.new_token_ids) - 1
            self._outs.append(StepOutput(u.request_id, tok, u.finish_reason if last else None))
        if u.finish_reason is not None:
            if not u.new_token_ids:
                self._outs.append(StepOutput(u.request_id, NO_TOKEN, u.finish_reason))
            del self.requests[u.request_id]
            del self.where[u.request_id]

    def _landed(self, dst: Slot, m: Imported) -> None:
        rid = m.request_id
        t = self.transit.get(rid)
        if t is None or t.dst is not dst:
            return  # aborted or failed meanwhile (its abort was queued behind this import)
        del self.transit[rid]
        if m.nbytes is None:  # no room after all: back into the source's queue, in arrival order
            dst.full = True
            if t.src.alive and self.where.get(rid) is t.src:
                t.src.ready.append((rid, t.handle))
                t.src.ready.sort(key=lambda e: self.requests[e[0]].arrival_time)
            return
        self.where[rid] = dst
        self.num_transfers += 1
        self.transfer_bytes += m.nbytes
        if t.src.alive:
            t.src.inst.release(rid)

    def _drop_transit(self, rid: str) -> None:
        """A hand-off that will not land: the source frees the KV it holds for it, and the destination
        drops what it may already have fetched or imported (a no-op if nothing arrived)."""
        t = self.transit.pop(rid, None)
        if t is None:
            return
        for end in (t.src, t.dst):
            if end.alive:
                end.inst.abort(rid, FinishReason.ERROR)

    def _fail_request(self, rid: str, why: str) -> None:
        self.where.pop(rid, None)
        self.transit.pop(rid, None)
        for s in self.prefills:
            s.ready = [(r, h) for r, h in s.ready if r != rid]
        req = self.requests.pop(rid, None)
        if req is None:
            return
        req.finish_reason = FinishReason.ERROR
        req.stamp(Event.ABORTED, instance=why.split(":", 1)[0])
        self.failures[rid] = why
        self._outs.append(StepOutput(rid, NO_TOKEN, FinishReason.ERROR))

    def _fail_instance(self, slot: Slot, why: str) -> None:
        """Mark an instance dead; every request it held, or that was moving to or from it, ends with ERROR."""
        if not slot.alive:
            return
        slot.error = why if why.startswith(slot.name) else f"{slot.name}: {why}"
        log.error("instance failed: %s", slot.error)
        for rid, t in list(self.transit.items()):
            if t.dst is slot:  # into the dead one: the source still holds the KV
                self._drop_transit(rid)
                self._fail_request(rid, slot.error)
            elif t.src is slot and t.dst.alive:  # from the dead one: free whatever lands on the target
                t.dst.inst.abort(rid, FinishReason.ERROR)
        for rid, s in list(self.where.items()):
            if s is slot:
                self._fail_request(rid, slot.error)
        slot.ready.clear()
        slot.inst.shutdown()

    # ---- KV hand-off ---------------------------------------------------------------------------
    def pull(self) -> int:
        """Hand every prefilled request that a decode instance has room for to one (oldest first per
        prefill instance); the import runs on the decode instance's thread. Returns how many."""
        sent = 0
        live_decodes = [d for d in self.decodes if d.alive]
        for p in (s for s in self.prefills if s.alive):
            if not live_decodes:
                for rid, _ in p.ready:
                    p.inst.abort(rid, FinishReason.ERROR)
                    self._fail_request(rid, f"no live decode instance ({_why(self.decodes)})")
                continue
            while p.ready:
                rid, handle = p.ready[0]
                cands = [d for d in live_decodes if not d.full and d.stats.running + self._incoming(d)
                         < d.inst.info.max_num_seqs]
                if not cands:
                    break
                n = self.requests[rid].num_tokens
                fits = [d for d in cands if d.stats.free_blocks >= blocks_needed(n, d.inst.info.block_size)]
                if not fits:
                    break  # keep FCFS order on this prefill instance; its memory is the queue buffer
                # the source's node first (KV stays on the intra-node link), then the most free blocks
                node = p.inst.info.node_id
                d = max(fits, key=lambda s: (node is not None and s.inst.info.node_id == node, s.stats.free_blocks))
                need = blocks_needed(n, d.inst.info.block_size)
                p.ready.pop(0)
                self.transit[rid] = _Transit(p, d, handle)
                d.inst.import_kv(copy_request(self.requests[rid]), handle, p.name)
                d.stats = dataclasses.replace(d.stats, free_blocks=d.stats.free_blocks - need)
                sent += 1
        return sent

    def _incoming(self, d: Slot) -> int:
        return sum(t.dst is d for t in self.transit.values())

    # ---- the deployment ------------------------------------------------------------------------
    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.alive]

    def stats(self) -> list[InstanceStats]:
        """Each live instance's load as of its last batch (no round trip: for gauges)."""
        return [s.stats for s in self.live()]

    def held_blocks(self) -> dict[str, int]:
        """KV blocks in use on each live instance, asked now (after every command already sent)."""
        out = {}
        for s in self.live():
            try:
                s.stats = s.inst.stats()  # fresher than the last batch (a reference swap: safe from any thread)
                out[s.name] = s.stats.held_blocks
            except Exception as e:  # an instance that cannot answer is failed
                self._fail_instance(s, f"stats failed: {type(e).__name__}: {e}")
        return out

    def warmup(self, progress: bool = False) -> int:
        """Compile every instance's shapes, before serving; returns the number of shapes. All instances
        warm up at once, in-process ones too (each on its own thread; XLA compiles in parallel: the
        demo's two instances were ready in 18 s instead of 28 s on 2 cores). ``progress``: each
        instance reports its warm-up on its own process's stderr (``jaxserve.warmup_progress``)."""
        live = self.live()
        with ThreadPoolExecutor(max(1, len(live)), thread_name_prefix="jaxserve-warmup") as pool:
            shapes = sum(pool.map(lambda s: s.inst.warmup(progress), live))
        if self.after_warmup is not None:
            self.after_warmup()
        return shapes

    @property
    def compilations_since_warmup(self) -> int:
        """Compilations since warm-up, counted once per process (instances of one process share a count)."""
        per_pid: dict[Any, int] = {}
        for s in self.live():
            per_pid[s.inst.info.pid or id(s)] = s.inst.compilations_since_warmup()
        return sum(per_pid.values())

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                s.inst.shutdown()
            except Exception:  # already gone
                log.debug("shutdown of %s failed", s.name, exc_info=True)
        if hasattr(self.keep_alive, "shutdown"):
            self.keep_alive.shutdown()
            self.keep_alive = None

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _stop_all(instances: list[Instance]) -> None:
    for i in instances:
        i.stop_soon()


def _empty_stats(inst: Instance) -> InstanceStats:
    i = inst.info
    return InstanceStats(i.name, i.capacity, 0, 0, 0, 0)


def _why(slots: Sequence[Slot]) -> str:
    return "; ".join(s.error or f"{s.name}: alive" for s in slots)
