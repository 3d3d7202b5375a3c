"""Simulator of the colocated baseline: one instance runs both phases (vLLM-style).

    Requests --dispatch: replica with fewest queued prompt tokens--> ColocatedLane
      prefill-first:  each iteration, if arrived prompts fit (KV + batch slots), run one
                      prefill batch (FCFS up to the token budget) and pause decoding;
                      otherwise run decode steps of the whole running batch.
      chunked:        (Sarathi-Serve) each iteration carries every running request's
                      decode token plus prompt chunks filling the rest of the token budget.
      --> SimResult (decode_admit = decode_start = prefill_end: there is no transfer)

Iteration times come from the instance's profile (the colocated engine's coefficients).
A mixed chunked iteration costs the decode step time plus the prefill terms
b*chunk + c*chunk*(chunk + done) of each chunk (and the larger fixed cost of the two).
A pp-stage colocated instance is pp lanes, as in decoding (planner.latency).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .decode_batch import DecodeBatch
from .latency import InstanceModel
from .simulator import INF, SimResult, kv_need
from .workload import Requests


class ColocatedLane:
    """One colocated lane; ``chunk`` > 0 switches to chunked prefill with that token budget."""

    def __init__(self, inst: InstanceModel, reqs: Requests, out: SimResult, *, capacity: int,
                 token_budget: int = 2048, max_batch: int = 256, chunk: int = 0) -> None:
        self.inst, self.out = inst, out
        self.arr = reqs.arrival.tolist()
        self.plen = reqs.prompt_len.tolist()
        self.olen = reqs.output_len.tolist()
        self.capacity, self.budget, self.max_batch, self.chunk = capacity, token_budget, max_batch, chunk
        self.batch = DecodeBatch(inst.decode_lane_coeffs)
        self.t = 0.0
        self.reserved = 0
        self.waiting: deque[int] = deque()
        self.queued_tokens = 0
        self.prefilling: list[list[int]] = []  # chunked mode: [rid, tokens done]
        self.need: dict[int, int] = {}

    def submit(self, rid: int) -> None:
        self.waiting.append(rid)
        self.queued_tokens += self.plen[rid]

    def _fits(self, rid: int, slots: int) -> bool:
        return slots < self.max_batch and self.reserved + kv_need(self.plen[rid], self.olen[rid]) <= self.capacity

    def _reserve(self, rid: int) -> None:
        need = kv_need(self.plen[rid], self.olen[rid])
        self.need[rid] = need
        self.reserved += need
        self.queued_tokens -= self.plen[rid]

    def _prefill_time(self, tokens: float, sq: float) -> float:
        return self.inst.pp * self.inst.prefill_stage_time(tokens, sq)

    def _prefilled(self, rid: int) -> None:
        out, t = self.out, self.t
        out.prefill_end[rid] = out.decode_admit[rid] = out.decode_start[rid] = t
        if self.olen[rid] > 1:
            self.batch.admit(rid, self.plen[rid] + 1, self.olen[rid] - 1)
        else:
            out.finish[rid] = t
            self.reserved -= self.need.pop(rid)

    def _decode(self, t_limit: float) -> bool:
        """Decode steps up to the next event; False if there is nothing to do before t_limit."""
        w = self.waiting
        e = self.arr[w[0]] if w and self._fits(w[0], self.batch.B + len(self.prefilling)) else INF
        e = min(e, t_limit)
        if self.batch.B == 0:
            if e == INF:
                return False
            self.t = max(self.t, e)
            return True
        n = self.batch.steps_to_next_finish()
        if e < INF:
            n = min(n, self.batch.steps_to_reach(e - self.t))
        dt, done = self.batch.advance(n)
        self.t += dt
        for rid in done:
            self.out.finish[rid] = self.t
            self.reserved -= self.need.pop(rid)
        return True

    def advance_to(self, t_limit: float) -> None:
        step = self._chunked_iteration if self.chunk else self._prefill_first_iteration
        while self.t < t_limit:
            if not step() and not self._decode(t_limit):
                return

    def _prefill_first_iteration(self) -> bool:
        w, t = self.waiting, self.t
        batch: list[int] = []
        tokens = sq = 0
        while w and self.arr[w[0]] <= t and self._fits(w[0], self.batch.B + len(batch)):
            p = self.plen[w[0]]
            if batch and tokens + p > self.budget:
                break
            rid = w.popleft()
            self._reserve(rid)
            batch.append(rid)
            tokens += p
            sq += p * p
        if not batch:
            return False
        self.t += self._prefill_time(tokens, sq)
        for rid in batch:
            self.out.prefill_start[rid] = t
            self._prefilled(rid)
        return True

    def _chunked_iteration(self) -> bool:
        w, t, batch = self.waiting, self.t, self.batch
        while w and self.arr[w[0]] <= t and self._fits(w[0], batch.B + len(self.prefilling)):
            rid = w.popleft()
            self._reserve(rid)
            self.out.prefill_start[rid] = t
            self.prefilling.append([rid, 0])
        room = max(self.chunk - batch.B, 0)
        x_tot = sq = 0
        plan = []
        for item in self.prefilling:
            if room <= 0:
                break
            x = min(room, self.plen[item[0]] - item[1])
            plan.append((item, x))
            x_tot += x
            sq += x * (x + item[1])
            room -= x
        if not plan:
            return False
        pre = self._prefill_time(x_tot, sq)
        if batch.B:
            a_p = self.inst.phase.prefill[0]
            dec = batch.time_of(1)
            dt = dec + pre - min(a_p, batch.coeffs(batch.B)[0])
            _, done = batch.advance(1)
        else:
            dt, done = pre, []
        self.t += dt
        for rid in done:
            self.out.finish[rid] = self.t
            self.reserved -= self.need.pop(rid)
        for item, x in plan:
            item[1] += x
            if item[1] >= self.plen[item[0]]:
                self._prefilled(item[0])
        self.prefilling = [it for it in self.prefilling if it[1] < self.plen[it[0]]]
        return True


def run_colocated(instances: list[InstanceModel], reqs: Requests, *, token_budget: int = 2048,
                  max_batch: int = 256, chunk: int = 0) -> SimResult:
    """Simulate colocated replicas (prefill-first, or chunked prefill when ``chunk`` > 0)."""
    out = SimResult.empty(reqs)
    lanes = [ColocatedLane(m, reqs, out, capacity=m.kv_capacity_tokens() // m.pp,
                           token_budget=token_budget, max_batch=max_batch, chunk=chunk)
             for m in instances for _ in range(m.pp)]
    max_cap = max(lane.capacity for lane in lanes)
    need = np.array([kv_need(int(p), int(o)) for p, o in zip(reqs.prompt_len, reqs.output_len, strict=True)])
    for rid, t in enumerate(reqs.arrival.tolist()):
        if need[rid] > max_cap:
            continue  # can never be served: stays at inf
        if len(lanes) > 1:
            for lane in lanes:
                lane.advance_to(t)
            min(lanes, key=lambda lane: (lane.queued_tokens, lane.reserved)).submit(rid)
        else:
            lanes[0].submit(rid)
    for lane in lanes:
        lane.advance_to(INF)
    return out
