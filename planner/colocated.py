"""Simulator of the colocated baseline: one instance runs both phases (vLLM-style).

    Requests --dispatch (balanced: fewest queued prompt tokens, then least KV; jaxserve: fewest
              tokens to compute incl. one per decoding sequence, then idle, then the first)--> ColocatedLane
      prefill-first:  each iteration, if arrived prompts fit (KV + batch slots), run one
                      prefill batch (FCFS up to the token budget) and pause decoding;
                      otherwise run decode steps of the whole running batch.
      chunked:        (Sarathi-Serve) each iteration carries every running request's
                      decode token plus prompt chunks filling the rest of the token budget.
      --> SimResult (decode_admit = decode_start = prefill_end: there is no transfer)

Iteration times come from the instance's profile (the colocated engine's coefficients).
A mixed chunked iteration costs the decode step time plus the prefill terms
b*chunk + c*chunk*(chunk + done) of each chunk (and the larger fixed cost of the two); with
jaxserve's padded engine costs it is the engine's separate calls instead: one packed call for
the chunks that start a prompt, the decode call, one call per later chunk, each at its padded
shape and with its host cost, plus one step cost.
A pp-stage instance runs its steps as jaxserve does (planner.latency): one lane with all of its KV,
stages overlapping only between the micro-batches of a packed prefill call.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .latency import InstanceModel
from .simulator import INF, SimResult, kv_need
from .workload import Requests


class ColocatedLane:
    """One colocated instance; ``chunk`` > 0 switches to chunked prefill with that token budget."""

    def __init__(self, inst: InstanceModel, reqs: Requests, out: SimResult, *, capacity: int,
                 token_budget: int = 2048, max_batch: int = 256, chunk: int = 0) -> None:
        self.inst, self.out = inst, out
        self.arr = (reqs.arrival + inst.costs.dispatch_s).tolist()  # when the instance sees each request
        self.plen = reqs.prompt_len.tolist()
        self.olen = reqs.output_len.tolist()
        self.capacity, self.budget, self.max_batch, self.chunk = capacity, token_budget, max_batch, chunk
        self.batch = inst.decode_batch()
        self.t = 0.0
        self.reserved = 0
        self.waiting: deque[int] = deque()
        self.queued_tokens = 0  # prompt tokens not yet prefilled (counted off when their step starts)
        self.step_tokens = 0  # prompt tokens of the latest iteration (it ends at self.t)
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
        if not self.chunk:  # chunked: counted off chunk by chunk
            self.queued_tokens -= self.plen[rid]

    def queued_at(self, t: float) -> int:
        """jaxserve's dispatch key at ``t``: tokens still to compute, i.e. prompt tokens queued (those of a
        prefill step still running too: the driver learns of a step's progress from its reply) plus
        one per decoding sequence (its next token)."""
        return self.queued_tokens + (self.step_tokens if self.t > t else 0) + self.batch.B

    def busy_at(self, t: float) -> bool:
        return bool(self.t > t or self.batch.B or self.prefilling or self.waiting)

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
        self.step_tokens = 0
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
        tokens = 0
        while w and self.arr[w[0]] <= t and self._fits(w[0], self.batch.B + len(batch)):
            p = self.plen[w[0]]
            if batch and tokens + p > self.budget:
                break
            rid = w.popleft()
            self._reserve(rid)
            batch.append(rid)
            tokens += p
        if not batch:
            return False
        self.t += self.inst.prefill_step_time([self.plen[r] for r in batch])
        self.step_tokens = tokens
        for rid in batch:
            self.out.prefill_start[rid] = t
            self._prefilled(rid)
        return True

    def _chunked_iteration(self) -> bool:
        w, t, batch = self.waiting, self.t, self.batch
        while w and self.arr[w[0]] <= t and self._fits(w[0], batch.B + len(self.prefilling)):
            rid = w.popleft()
            self._reserve(rid)
            self.prefilling.append([rid, 0])
        room = max(self.chunk - batch.B, 0)
        x_tot = sq = 0
        plan = []
        for item in self.prefilling:
            if room <= 0:
                break
            x = min(room, self.plen[item[0]] - item[1])
            plan.append((item, x))
            if item[1] == 0:
                self.out.prefill_start[item[0]] = t  # its first chunk runs now
            x_tot += x
            sq += x * (x + item[1])
            room -= x
        if not plan:
            return False
        self.queued_tokens -= x_tot
        self.step_tokens = x_tot
        if self.inst.costs.padded:  # jaxserve: one packed call (first chunks), one decode call, one per later chunk
            dt = self._chunked_calls(plan)
            done = batch.advance(1)[1] if batch.B else []
        else:
            pre = self.inst.prefill_call_time(x_tot, sq, len(plan))
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


    def _chunked_calls(self, plan: list[tuple[list[int], int]]) -> float:
        """Seconds of one mixed step made of separate calls (before the decode batch advances)."""
        inst, k = self.inst, self.inst.costs
        first = [x for item, x in plan if item[1] == 0]
        if self.batch.B:
            dt = self.batch.time_of(1)  # includes the step and call costs
        else:
            dt = k.step_s
        if first:
            dt += inst.packed_call_time(first)
        dt += sum(inst.chunk_call_time(x, item[1] + x) for item, x in plan if item[1] > 0)
        return dt + k.prefill_factor * k.seq_s * len(plan)


DISPATCH = ("balanced", "jaxserve")


def run_colocated(instances: list[InstanceModel], reqs: Requests, *, token_budget: int = 2048,
                  max_batch: int = 256, chunk: int = 0, dispatch: str = "balanced") -> SimResult:
    """Simulate colocated replicas (prefill-first, or chunked prefill when ``chunk`` > 0).

    ``dispatch``: ``balanced`` sends a request to the replica with the fewest queued prompt tokens,
    then the least KV in use; ``jaxserve`` as jaxserve's driver does: fewest tokens still to compute
    (queued prompt tokens, a running prefill step's too, plus one per decoding sequence), then an
    idle replica before a busy one, then the first.
    """
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
    out = SimResult.empty(reqs)
    lanes = [ColocatedLane(m, reqs, out, capacity=m.kv_capacity_tokens(), token_budget=token_budget,
                           max_batch=max_batch, chunk=chunk) for m in instances]
    max_cap = max(lane.capacity for lane in lanes)
    need = np.array([kv_need(int(p), int(o)) for p, o in zip(reqs.prompt_len, reqs.output_len, strict=True)])
    for rid, t in enumerate(reqs.arrival.tolist()):
        if need[rid] > max_cap:
            continue  # can never be served: stays at inf
        if len(lanes) > 1:
            for lane in lanes:
                lane.advance_to(t)
            if dispatch == "balanced":
                min(lanes, key=lambda lane: (lane.queued_tokens, lane.reserved)).submit(rid)
            else:
                min(lanes, key=lambda lane: (lane.queued_at(t), lane.busy_at(t))).submit(rid)
        else:
            lanes[0].submit(rid)
    for lane in lanes:
        lane.advance_to(INF)
    return out
