"""A test double of an engine core: hand-checkable tokens and settable step times, no jax.

    add_request --> waiting;  step(): a prefill step (sleeps ``prefill_s``; every waiting request's
    first token) if prompts wait (prefill-first), else a decode step (sleeps ``decode_s``; one token
    for every running request). Token k of every request is ``100 + k``; a request ends with
    ``length`` at ``max_tokens``. The prompt ``[666]`` is refused (ValueError). ``fail_at_step``
    makes that step raise (``lost_at_step``: raise ``InstanceLost``). A prefill core holds prefilled requests until ``release``; its handle is
    ``("fake-kv", id, tokens)``; a decode core admits up to ``max_running`` requests.

It plugs into the real ``LocalInstance`` and ``Router`` (and a Ray actor), so router and runtime
tests exercise everything but the model. ``time.sleep`` releases the GIL as a JAX step does.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from jaxserve.errors import InstanceLost
from jaxserve.request import Event, FinishReason, Request
from jaxserve.runtime.api import InstanceInfo, InstanceStats, StepOutput


@dataclasses.dataclass
class FakeCore:
    name: str
    mode: str = "colocated"  # prefill | decode | colocated
    prefill_s: float = 0.0
    decode_s: float = 0.0
    max_running: int = 64
    capacity: int = 1024  # "blocks" of 16 tokens
    max_model_len: int = 1000
    fail_at_step: int | None = None
    lost_at_step: int | None = None  # that step raises InstanceLost (a part of the instance died)
    node_id: str | None = None  # where it "runs" (the router prefers decode instances on a source's node)

    def __post_init__(self) -> None:
        self.waiting: list[Request] = []
        self.running: dict[str, Request] = {}
        self.ready: dict[str, Request] = {}
        self.steps = 0
        self.aborted: list[str] = []

    # ---- the EngineCore surface ----------------------------------------------------------------
    def info(self) -> InstanceInfo:
        return InstanceInfo(self.name, self.mode, 1000, 2, self.max_model_len, 16, self.capacity,
                            self.max_running, model="fake", node_id=self.node_id, pid=os.getpid())

    def stats(self) -> InstanceStats:
        held = sum(_blocks(r) for r in [*self.running.values(), *self.ready.values()])
        queued = sum(r.num_prompt_tokens for r in self.waiting) + len(self.running)
        return InstanceStats(self.name, self.capacity - held, held, queued, len(self.running),
                             len(self.waiting) + len(self.ready), self.has_unfinished(), self.steps)

    def add_request(self, request: Request) -> None:
        if request.prompt_token_ids == [666]:
            raise ValueError("prompt: 666 is not allowed")
        self.waiting.append(request)
        request.stamp(Event.PREFILL_QUEUED, instance=self.name)

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        for r in [*self.waiting, *self.running.values(), *self.ready.values()]:
            if r.request_id == request_id:
                self.waiting = [w for w in self.waiting if w is not r]
                self.running.pop(request_id, None)
                self.ready.pop(request_id, None)
                self.aborted.append(request_id)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and (self.mode != "colocated"
                                                              or len(self.running) < self.max_running))

    def step(self) -> list[StepOutput]:
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("boom")
        if self.lost_at_step == self.steps:
            raise InstanceLost("a stage process died")
        room = self.max_running - (len(self.running) if self.mode == "colocated" else 0)
        if self.waiting and room > 0:
            return self._prefill(room)
        return self._decode()

    def take_ready(self) -> list[str]:
        return list(self.ready)

    def export_kv(self, request_id: str) -> tuple[Any, int]:
        r = self.ready[request_id]
        return ("fake-kv", request_id, r.num_tokens - 1), r.num_tokens - 1

    def release(self, request_id: str) -> None:
        self.ready.pop(request_id)

    def import_kv(self, request: Request, handle: Any, source: str = "", began: float | None = None) -> int | None:
        if handle[1] != request.request_id:
            raise ValueError(f"KV of {handle[1]!r} offered for {request.request_id!r}")
        if len(self.running) >= self.max_running:
            return None
        where = f"{source}->{self.name}"
        request.stamp(Event.TRANSFER_BEGAN, began, instance=where)
        request.stamp(Event.TRANSFER_ENDED, instance=where)
        request.stamp(Event.DECODE_QUEUED, instance=self.name)
        self.running[request.request_id] = request
        return 8 * handle[2]

    def warmup(self, progress: Any = None) -> int:
        return 0

    @property
    def compilations_since_warmup(self) -> int:
        return 0

    # ---- steps ---------------------------------------------------------------------------------
    def _prefill(self, room: int) -> list[StepOutput]:
        batch, self.waiting = self.waiting[:room], self.waiting[room:]
        for r in batch:
            r.stamp(Event.PREFILL_BEGAN, instance=self.name)
        time.sleep(self.prefill_s)
        outs = []
        for r in batch:
            out = self._token(r, first=True)
            if out.finish_reason is None:
                (self.ready if self.mode == "prefill" else self.running)[r.request_id] = r
            outs.append(out)
        return outs

    def _decode(self) -> list[StepOutput]:
        batch = list(self.running.values())
        for r in batch:
            if not r.event_times(Event.DECODE_BEGAN):
                r.stamp(Event.DECODE_BEGAN, instance=self.name)
        time.sleep(self.decode_s)
        outs = [self._token(r) for r in batch]
        for o in outs:
            if o.finish_reason is not None:
                del self.running[o.request_id]
        return outs

    def _token(self, r: Request, first: bool = False) -> StepOutput:
        tok = 100 + len(r.output_token_ids)
        r.output_token_ids.append(tok)
        if first:
            r.stamp(Event.PREFILL_ENDED, instance=self.name)
        r.stamp(Event.TOKEN, instance=self.name)
        reason = FinishReason.LENGTH if len(r.output_token_ids) >= r.sampling.max_tokens else None
        if reason is not None:
            r.finish_reason = reason
            r.stamp(Event.FINISHED, instance=self.name)
        return StepOutput(r.request_id, tok, reason)


def _blocks(r: Request) -> int:
    return -(-r.num_tokens // 16)
