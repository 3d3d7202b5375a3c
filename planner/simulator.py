"""Discrete-event simulator of disaggregated serving (prefill -> KV transfer -> decode).

    Requests (arrival, prompt_len, output_len)
      --dispatch: prefill instance with fewest queued tokens-->  PrefillInstance
            FCFS batches up to a token budget, one step at a time (pp>1: micro-batches within a step)
      --KV transfer (bytes / link bandwidth), pulled by the decode side-->
      --dispatch: decode instance with most free KV-->  DecodeLane (one per instance)
            continuous batching, limited by KV capacity and batch size; FCFS pull admission
      --> SimResult: per-request timestamps -> TTFT, TPOT, five-stage breakdown

Engine costs (``InstanceModel.costs``, zero by default): a prefill step also pays each prompt's
KV export, and a decode lane stalls for each KV import before the request joins (a pulled
hand-off that the decode instance itself writes, as jaxserve's Ray actors do).

Lifecycle per request: arrival -> prefill_start -> prefill_end (first token) ->
decode_admit (KV reserved on decode, transfer starts) -> decode_start (transfer done,
joined the batch at the next step boundary) -> finish. A request with output_len 1
ends at prefill_end. Its KV is reserved whole (prompt + output, in 16-token blocks)
at admission, so decode never preempts. The prefill side's memory is not a limit
(requests wait there for the pull); links between instances are not contended.

Instances advance lazily (``advance_to``), so the dispatcher sees each instance's state
at the moment it decides, and a lone instance needs no dispatch bookkeeping at all.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque

import numpy as np

from jaxserve import slo

from .latency import InstanceModel, kv_transfer_time
from .workload import Requests

BLOCK = 16
INF = math.inf


def kv_need(prompt_len: int, output_len: int) -> int:
    """KV tokens a request reserves on a decode instance, rounded up to whole blocks."""
    return -(-(prompt_len + output_len) // BLOCK) * BLOCK


@dataclasses.dataclass
class SimResult:
    """Per-request timestamps (seconds); inf where a request could never be served."""

    arrival: np.ndarray
    output_len: np.ndarray
    prefill_start: np.ndarray
    prefill_end: np.ndarray
    decode_admit: np.ndarray
    decode_start: np.ndarray
    finish: np.ndarray

    @classmethod
    def empty(cls, reqs: Requests) -> SimResult:
        n = len(reqs)
        return cls(reqs.arrival, reqs.output_len, *(np.full(n, INF) for _ in range(5)))

    def ttft(self) -> np.ndarray:
        return slo.ttft(self.arrival, self.prefill_end)

    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    def tpot(self) -> np.ndarray:
        return slo.tpot(self.ttft(), self.latency(), self.output_len)

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        return slo.attainment(self.ttft(), self.latency(), self.output_len, ttft_slo, tpot_slo)

    def breakdown(self) -> dict[str, np.ndarray]:
        """Five stages per request: prefill queue/exec, transfer, decode queue/exec."""
        return {
            "prefill_queue": self.prefill_start - self.arrival,
            "prefill_exec": self.prefill_end - self.prefill_start,
            "decode_queue": self.decode_admit - self.prefill_end,
            "transfer": self.decode_start - self.decode_admit,
            "decode_exec": self.finish - self.decode_start,
        }


class PrefillInstance:
    """FCFS batching up to ``token_budget`` tokens / ``max_batch`` requests; a batch starts when the
    previous step has ended (``InstanceModel.prefill_step_time``: pp stages overlap only within it)."""

    def __init__(self, inst: InstanceModel, reqs: Requests, out: SimResult, *,
                 token_budget: int = 2048, max_batch: int = 256) -> None:
        self.inst, self.out = inst, out
        self.arr = (reqs.arrival + inst.costs.dispatch_s).tolist()  # when the instance sees each request
        self.plen = reqs.prompt_len.tolist()
        self.budget, self.max_batch = token_budget, max_batch
        self.free = 0.0  # when the running step ends
        self.queue: deque[int] = deque()
        self.queued_tokens = 0

    def submit(self, rid: int) -> None:
        self.queue.append(rid)
        self.queued_tokens += self.plen[rid]

    def advance_to(self, t: float) -> None:
        """Start (and run to its end) each batch whose start time is <= t."""
        q, arr, plen = self.queue, self.arr, self.plen
        pre_start, pre_end = self.out.prefill_start, self.out.prefill_end
        while q:
            s = max(self.free, arr[q[0]])
            if s > t:
                return
            batch = [q.popleft()]
            tokens = plen[batch[0]]
            while q and len(batch) < self.max_batch and arr[q[0]] <= s and tokens + plen[q[0]] <= self.budget:
                r = q.popleft()
                batch.append(r)
                tokens += plen[r]
            self.queued_tokens -= tokens
            d = self.inst.prefill_step_time([plen[r] for r in batch])
            if any(self.inst.costs.kv_export):  # each prompt's KV to the host, inside the step
                d += sum(self.inst.costs.export_time(plen[r]) for r in batch)
            f = self.free = s + d
            for r in batch:
                pre_start[r] = s
                pre_end[r] = f


class DecodeLane:
    """The decode batch of one instance (any pp: its steps pass through the stages one after another)."""

    def __init__(self, inst: InstanceModel, reqs: Requests, out: SimResult, ready: np.ndarray,
                 transfer: np.ndarray, *, capacity: int, max_batch: int = 256) -> None:
        self.out, self.ready, self.transfer = out, ready, transfer
        self.plen, self.olen = reqs.prompt_len, reqs.output_len
        self.capacity, self.max_batch = capacity, max_batch
        self.batch = inst.decode_batch()
        self.costs = inst.costs
        self.t = 0.0
        self.reserved = 0
        self.pending_need = 0
        self.pending: deque[int] = deque()
        self.joining: list[tuple[float, int]] = []
        self.need: dict[int, int] = {}

    def free_kv(self) -> int:
        return self.capacity - self.reserved - self.pending_need

    def submit(self, rid: int) -> None:
        need = kv_need(int(self.plen[rid]), int(self.olen[rid]))
        self.need[rid] = need
        self.pending_need += need
        self.pending.append(rid)

    def _head_fits(self) -> bool:
        return (bool(self.pending) and self.batch.B + len(self.joining) < self.max_batch
                and self.reserved + self.need[self.pending[0]] <= self.capacity)

    def _admit_and_join(self) -> None:
        t, out = self.t, self.out
        while self._head_fits() and self.ready[self.pending[0]] <= t + 1e-12:
            rid = self.pending.popleft()
            need = self.need[rid]
            self.pending_need -= need
            self.reserved += need
            out.decode_admit[rid] = t
            heapq.heappush(self.joining, (t + self.transfer[rid], rid))
        while self.joining and self.joining[0][0] <= self.t + 1e-12:
            _, rid = heapq.heappop(self.joining)
            self.t += self.costs.import_time(int(self.plen[rid]))  # the KV write stalls this lane
            out.decode_start[rid] = self.t
            self.batch.admit(rid, int(self.plen[rid]) + 1, int(self.olen[rid]) - 1)

    def _next_external(self) -> float:
        e = self.joining[0][0] if self.joining else INF
        if self._head_fits():
            e = min(e, self.ready[self.pending[0]])
        return e

    def advance_to(self, t_limit: float) -> None:
        """Run events until the lane sits at a step boundary >= t_limit (or has nothing to do)."""
        batch, out = self.batch, self.out
        while True:
            self._admit_and_join()
            if self.t >= t_limit:
                return
            e = min(self._next_external(), t_limit)
            if batch.B == 0:
                if e == INF:
                    return
                self.t = max(self.t, e)
                continue
            n = batch.steps_to_next_finish()
            if e < INF:
                n = min(n, batch.steps_to_reach(e - self.t))
            dt, done = batch.advance(n)
            self.t += dt
            for rid in done:
                out.finish[rid] = self.t
                self.reserved -= self.need.pop(rid)


def _finish_single_token(out: SimResult, reqs: Requests) -> np.ndarray:
    """Requests with output_len 1 end at prefill; returns the mask of those needing decode."""
    one = reqs.output_len <= 1
    out.decode_admit[one] = out.prefill_end[one]
    out.decode_start[one] = out.prefill_end[one]
    out.finish[one] = out.prefill_end[one]
    return ~one


def run_prefill(instances: list[InstanceModel], reqs: Requests, out: SimResult | None = None, *,
                token_budget: int = 2048, max_batch: int = 256) -> SimResult:
    """Prefill phase only: fills prefill_start/prefill_end of ``out``."""
    out = out if out is not None else SimResult.empty(reqs)
    insts = [PrefillInstance(m, reqs, out, token_budget=token_budget, max_batch=max_batch) for m in instances]
    if len(insts) == 1:
        for rid in range(len(reqs)):
            insts[0].submit(rid)
    else:
        for rid, t in enumerate(reqs.arrival.tolist()):
            for p in insts:
                p.advance_to(t)
            min(insts, key=lambda p: (p.queued_tokens, p.free)).submit(rid)
    for p in insts:
        p.advance_to(INF)
    return out


def run_decode(instances: list[InstanceModel], reqs: Requests, ready: np.ndarray, transfer: np.ndarray,
               out: SimResult, *, max_batch: int = 256) -> SimResult:
    """Decode phase: requests become pullable at ``ready``; fills decode_* and finish of ``out``."""
    need_decode = _finish_single_token(out, reqs)
    lanes = [DecodeLane(m, reqs, out, ready, transfer, capacity=m.kv_capacity_tokens(), max_batch=max_batch)
             for m in instances]
    max_cap = max(lane.capacity for lane in lanes)
    order = np.argsort(ready, kind="stable")
    order = order[need_decode[order] & np.isfinite(ready[order])]
    plen, olen = reqs.prompt_len, reqs.output_len
    for rid in order.tolist():
        if kv_need(int(plen[rid]), int(olen[rid])) > max_cap:
            continue  # can never fit: stays at inf (an SLO miss)
        t = float(ready[rid])
        if len(lanes) > 1:
            for lane in lanes:
                lane.advance_to(t)
            max(lanes, key=lambda lane: lane.free_kv()).submit(rid)
        else:
            lanes[0].submit(rid)
    for lane in lanes:
        lane.advance_to(INF)
    return out


def run_disaggregated(prefill: list[InstanceModel], decode: list[InstanceModel], reqs: Requests, *,
                      kv_link_bw: float, kv_parallel_links: int = 1, token_budget: int = 2048,
                      max_batch: int = 256) -> SimResult:
    """Whole pipeline: prefill replicas -> KV transfer -> decode replicas."""
    out = run_prefill(prefill, reqs, token_budget=token_budget, max_batch=max_batch)
    transfer = kv_transfer_time(decode[0].model, reqs.prompt_len.astype(np.float64), kv_link_bw,
                                kv_parallel_links)
    return run_decode(decode, reqs, out.prefill_end, transfer, out, max_batch=max_batch)
