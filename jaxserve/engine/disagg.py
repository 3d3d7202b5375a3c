"""Disaggregated serving in one process: prefill instances and decode instances on disjoint meshes.

    add_request --> the prefill instance with the fewest queued prompt tokens
    step():
      every instance with work steps, each in its own thread, at the same time (disjoint devices;
      JAX releases the GIL while a step runs): prefill instances run FCFS prompt batches up to
      their token budget (first token out), decode instances run continuous batching
      pull:  then, for each prefilled request (oldest first), the decode instance with the most
             free blocks that has room admits it: blocks allocated there, KV copied by the
             transport (dispatched asynchronously), blocks released on the prefill side; it
             decodes from the next step on
    abort_request: wherever the request is (prefill queue, held for transfer, decoding), its
                   blocks are freed at once

``DisaggEngine`` has the same surface as ``LLMEngine`` (``add_request``, ``step``,
``abort_request``, ``has_unfinished``, ``cfg``, ``max_model_len``), so the front end, the
offline ``LLM`` and the server drive either. Lifecycle events: the prefill instance stamps
queued/began/ended; this class stamps transfer began/ended and decode queued; the decode
instance stamps decode began, tokens and finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from jaxserve.engine.engine import LLMEngine, StepOutput
from jaxserve.engine.executor import compile_count
from jaxserve.engine.kv_transfer import KVTransport, LocalTransport
from jaxserve.request import Event, FinishReason, Request


class DisaggEngine:
    def __init__(self, prefills: Sequence[LLMEngine], decodes: Sequence[LLMEngine],
                 transport: KVTransport | None = None) -> None:
        if not prefills or not decodes:
            raise ValueError("disaggregation needs at least one prefill and one decode instance")
        for e in prefills:
            if e.policy != "prefill-only":
                raise ValueError(f"instance {e.name} is {e.config.mode!r}, expected a prefill instance")
        for e in decodes:
            if e.config.mode != "decode":
                raise ValueError(f"instance {e.name} is {e.config.mode!r}, expected a decode instance")
        self.prefills = list(prefills)
        self.decodes = list(decodes)
        self.transport = transport or LocalTransport()
        self.cfg = self.prefills[0].cfg
        self.max_model_len = min(e.max_model_len for e in [*self.prefills, *self.decodes])
        self.where: dict[str, LLMEngine] = {}
        self.num_transfers = 0
        self._pool: ThreadPoolExecutor | None = None  # one thread per instance, made on first use
        self._compiles_at_warmup: int | None = None

    @property
    def instances(self) -> list[LLMEngine]:
        return [*self.prefills, *self.decodes]

    def warmup(self) -> int:
        n = sum(e.warmup() for e in self.instances)
        warm = getattr(self.transport, "warmup", None)  # optional for a transport
        if warm is not None:
            for p in self.prefills:
                for d in self.decodes:
                    warm(p.executor, d.executor)
        self._compiles_at_warmup = compile_count()  # process-wide: after every instance's warm-up
        return n

    @property
    def compilations_since_warmup(self) -> int:
        if self._compiles_at_warmup is None:
            raise RuntimeError("warmup() has not run")
        return compile_count() - self._compiles_at_warmup

    def check_request(self, request: Request) -> None:
        for e in (self.prefills[0], *self.decodes):
            e.check_request(request)  # must fit on the prefill side and on a decode instance

    def add_request(self, request: Request) -> None:
        if request.request_id in self.where:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check_request(request)
        p = min(self.prefills, key=lambda e: e.num_queued_tokens)
        p.add_request(request)
        self.where[request.request_id] = p

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        e = self.where.pop(request_id, None)
        return e is not None and e.abort_request(request_id, reason)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() or e.ready for e in self.instances)

    def step(self) -> list[StepOutput]:
        busy = [e for e in self.instances if e.has_unfinished()]
        outs: list[StepOutput] = []
        if len(busy) == 1:
            outs += busy[0].step()
        elif busy:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.instances), thread_name_prefix="jaxserve-instance")
            for f in [self._pool.submit(e.step) for e in busy]:  # prefill and decode overlap
                outs += f.result()
        self.pull()
        for o in outs:
            if o.finish_reason is not None:
                self.where.pop(o.request_id, None)
        return outs

    def pull(self) -> int:
        """Move every prefilled request a decode instance has room for; returns how many moved."""
        moved = 0
        for p in self.prefills:
            for rid in p.take_ready():
                req = p.seqs[rid].request
                room = [d for d in self.decodes if d.can_admit(req)]
                if not room:
                    break  # keep FCFS order on this prefill instance; its memory is the queue buffer
                d = max(room, key=lambda e: e.num_free_blocks)
                self.transfer(p, d, req)
                moved += 1
        return moved

    def transfer(self, p: LLMEngine, d: LLMEngine, req: Request) -> None:
        rid = req.request_id
        req.stamp(Event.TRANSFER_BEGAN, instance=f"{p.name}->{d.name}")
        src_blocks, n = p.kv_of(rid)
        dst_blocks = d.admit(req)
        self.transport.copy(p.executor, src_blocks, d.executor, dst_blocks, n)
        p.release(rid)
        self.where[rid] = d
        req.stamp(Event.TRANSFER_ENDED, instance=f"{p.name}->{d.name}")
        req.stamp(Event.DECODE_QUEUED, instance=d.name)
        self.num_transfers += 1

    def held_blocks(self) -> dict[str, int]:
        return {e.name: e.num_held_blocks for e in self.instances}
