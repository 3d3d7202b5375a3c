"""Placement search: each phase's (tp, pp), replica counts, and nodes, for max per-device goodput.

    SearchSpec (model, latency source, cluster, workload, SLO, affinity, rate)
      --score_layout()-->  per-instance max rate meeting the SLO (bisection over the simulator)
            prefill layouts: TTFT attainment;  decode: TPOT attainment;  colocated / chunked: both
      --search_high() / search_low()-->  ranked Candidates (disaggregated);  best_colocated(): ranked
            colocated (prefill-first) and chunked-prefill layouts
      --> planner.plan.build_plan() writes the plan JSON

High node-affinity: prefill and decode layouts are scored independently and paired; a
pair's ideal per-device goodput is 1 / (dev_p / R_p + dev_d / R_d), then integer
replicas are chosen (to meet --rate, or to use the cluster at the best ratio). KV moves
over the inter-node links. Low node-affinity: a model split into `inter` pipeline
segments across `inter` nodes; on every node, the prefill and decode segments that
hold the same layers sit together, so KV moves over the intra-node link only; the
search runs over inter, each phase's intra-node (tp, pp) and segment counts per node.
Layouts whose tp the profile lacks are skipped (listed in ``skipped``), not inferred;
use --hardware to plan from the analytic model instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.slo import SLO, goodput_by_bisection

from .assumptions import DISTSERVE_PREFILL_TOKENS, DISTSERVE_STEP_TOKENS, JAXSERVE, Assumptions, slo_score
from .colocated import run_colocated
from .hardware import HardwareSpec, analytic_phase
from .latency import DISAGG_ENGINE, InstanceModel, PhaseModel, Profile
from .simulator import SimResult, kv_need, run_decode, run_disaggregated, run_prefill
from .workload import MAX_CONTEXT, Workload

ROLES = ("prefill", "decode", "colocated", "chunked")
COLOCATED_ROLES = ("colocated", "chunked")  # one instance runs both phases: prefill-first, or chunked prefill


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    model_name: str
    model: ModelConfig
    profile: Profile | None  # None: analytic model from ``hardware``
    hardware: HardwareSpec
    slo: SLO
    workload: Workload
    nodes: int
    gpus_per_node: int
    affinity: str = "high"
    rate: float | None = None
    n_requests: int = 2000
    seed: int = 0
    token_budget: int = 2048
    max_batch: int = 256
    chunk: int = 512  # the chunked mode's token budget per iteration (the engine's default); 0: not considered
    assumptions: Assumptions = JAXSERVE  # what is modelled: jaxserve's engine, or DistServe's simulator

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class LayoutScore:
    role: str
    tp: int
    pp: int
    rate: float  # max req/s of one instance meeting the SLO share
    source: str

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    @property
    def per_device(self) -> float:
        return self.rate / self.devices


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A disaggregated unit: n_p prefill + n_d decode instances (x groups in low affinity)."""

    prefill: LayoutScore
    decode: LayoutScore
    n_p: int
    n_d: int
    inter: int = 0  # low affinity: pipeline segments across nodes; 0 in high affinity

    @property
    def devices(self) -> int:
        return self.n_p * self.prefill.devices + self.n_d * self.decode.devices

    @property
    def rate(self) -> float:
        return min(self.n_p * self.prefill.rate, self.n_d * self.decode.rate)

    @property
    def per_device(self) -> float:
        return self.rate / self.devices

    @property
    def ideal_per_device(self) -> float:
        """Per-device goodput with fractional replicas at the best prefill:decode ratio."""
        return 1.0 / (self.prefill.devices / self.prefill.rate + self.decode.devices / self.decode.rate)

    def sort_key(self) -> tuple[float, float, int]:
        return (-round(self.per_device, 6), -self.ideal_per_device, self.devices)


class Scorer:
    """Scores layouts by simulation; caches per (role, tp, pp)."""

    def __init__(self, spec: SearchSpec, progress: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.reqs = spec.workload.sample(spec.n_requests, 1.0, seed=spec.seed)
        a = spec.assumptions
        # prefill batches: whole prompts up to the budget, or (DistServe) the whole queue up to its cap
        self.token_budget = spec.token_budget if a.whole_queue else DISTSERVE_PREFILL_TOKENS
        self.max_batch = spec.max_batch if a.whole_queue and a.kv_capacity else 10**6
        self.cache: dict[tuple[str, int, int], LayoutScore | None] = {}
        self.bounds: dict[tuple[str, int, int], float | None] = {}
        self.skipped: list[str] = []
        self.progress = progress

    def engine(self, role: str) -> str:
        if role in COLOCATED_ROLES and self.spec.profile is not None:
            return self.spec.profile.colocated_engine()
        return DISAGG_ENGINE

    def tps(self, role: str) -> list[int]:
        s = self.spec
        if s.profile is not None:
            tps = s.profile.tps(self.engine(role), s.model_name)
        else:
            tps = [t for t in (1, 2, 4, 8) if s.model.num_attention_heads % t == 0]
        return [t for t in tps if t <= s.gpus_per_node]

    def phase(self, role: str, tp: int) -> PhaseModel | None:
        s = self.spec
        if s.profile is None:
            return analytic_phase(s.model, tp, s.hardware)
        return s.profile.phase(self.engine(role), s.model_name, tp)

    def instance(self, role: str, tp: int, pp: int) -> InstanceModel | None:
        ph = self.phase(role, tp)
        if ph is None:
            return None
        s = self.spec
        bw = s.hardware.intra_node_bw if tp * pp <= s.gpus_per_node else s.hardware.inter_node_bw
        kv = None if s.assumptions.kv_capacity else DISTSERVE_STEP_TOKENS
        return InstanceModel(s.model, tp, pp, ph, s.hardware.memory_gib, stage_link_bw=bw, kv_tokens=kv)

    def layouts(self, role: str, max_devices: int) -> list[tuple[int, int]]:
        L = self.spec.model.num_hidden_layers
        out = []
        for tp in self.tps(role):
            pp = 1
            while tp * pp <= max_devices and pp <= L:
                if L % pp == 0:
                    out.append((tp, pp))
                pp *= 2
        return out

    def saturated_prefill_rate(self, inst: InstanceModel) -> float:
        """Req/s of one prefill instance whose queue never empties: the sampled prompts, in order,
        packed FCFS into batches as the simulator does (whole prompts up to the token budget and
        max_batch), one batch per step time (``prefill_step_time``). Prompts that do not pair up
        leave part of each batch's budget unused, so this is below ``budget / mean prompt``
        prompts per batch."""
        k = inst.costs
        total, tokens, batch = 0.0, 0, []
        export = 0.0
        for pl in self.reqs.prompt_len.tolist():
            if batch and (len(batch) >= self.max_batch or tokens + pl > self.token_budget):
                total += inst.prefill_step_time(batch) + export
                tokens, batch, export = 0, [], 0.0
            tokens += pl
            batch.append(pl)
            if any(k.kv_export):
                export += k.export_time(pl)
        total += inst.prefill_step_time(batch) + export
        return len(self.reqs) / total

    def max_rate(self, role: str, inst: InstanceModel) -> float:
        """Throughput bound (req/s) of one instance on this workload: no rate above it is sustainable.

        A finite simulation at an overload rate can still meet a TPOT target (the backlog is
        spread over many tokens), so bisection never looks above this bound.

        Prefill: ``saturated_prefill_rate``.

        Decode (Little's law, one batch per instance): a request reserves ``kv_need(p, o)`` KV tokens for its
        ``n = o - 1`` decode steps, so at rate r and step time s the reserved KV is r*s*E[need*n]
        and the batch r*s*E[n]; with KV full the batch is ``cap * E[n] / E[need*n]``. Long
        outputs hold their KV longest, so this is below ``cap / E[p + o]`` (by ~20% on ShareGPT).
        A running request's context, averaged over its steps, is E[n*p + n*(n+1)/2] / E[n].
        """
        reqs = self.reqs
        pre_rate = self.saturated_prefill_rate(inst)
        if role == "prefill":
            return pre_rate
        p = reqs.prompt_len.astype(np.float64)
        n = np.maximum(reqs.output_len.astype(np.float64) - 1, 0)  # output_len 1 ends at prefill
        mean_n = max(float(np.mean(n)), 1e-9)
        need = kv_need(reqs.prompt_len, reqs.output_len)  # per request (integer arrays)
        cap = inst.kv_capacity_tokens()
        b = int(max(1, min(self.max_batch, cap * mean_n / max(float(np.mean(need * n)), 1e-9))))
        ctx = float(np.mean(n * p + n * (n + 1) / 2)) / mean_n
        a, per_ctx, per_seq = inst.decode_lane_coeffs(b)  # the pp=1 step plus the hops between stages
        step = a + per_ctx * b * ctx + per_seq * b
        dec_rate = b / (mean_n * step)
        if role == "decode":
            return dec_rate
        return 1.0 / (1.0 / pre_rate + 1.0 / dec_rate)

    def slo_score(self, ttft: np.ndarray | None, tpot: np.ndarray | None) -> float:
        """What bisection compares with the attainment target (``planner.assumptions.slo_score``);
        a phase scored alone passes None for the other metric."""
        s = self.spec
        n = len(ttft if ttft is not None else tpot)
        zero = np.zeros(n)
        return slo_score(zero if ttft is None else ttft, zero if tpot is None else tpot, s.slo.ttft, s.slo.tpot,
                         s.slo.attainment, s.assumptions)

    def _attainment_fn(self, role: str, inst: InstanceModel) -> Callable[[float], float]:
        reqs = self.reqs

        def att(rate: float) -> float:
            r = reqs.scaled(rate)
            if role == "prefill":
                res = run_prefill([inst], r, token_budget=self.token_budget, max_batch=self.max_batch)
                return self.slo_score(res.ttft(), None)
            if role == "decode":
                res = run_decode([inst], r, r.arrival, np.zeros(len(r)), SimResult.empty(r), max_batch=self.max_batch)
                return self.slo_score(None, (res.finish - r.arrival) / np.maximum(r.output_len - 1, 1))
            res = run_colocated([inst], r, token_budget=self.token_budget, max_batch=self.max_batch,
                                chunk=self.chunk_of(role))
            return self.slo_score(res.ttft(), res.tpot())
        return att

    def bound(self, role: str, tp: int, pp: int) -> float | None:
        """The layout's throughput bound (``max_rate``, req/s), cached; None where it cannot serve (not in
        the profile, or no room for KV: ``score`` says which)."""
        key = (role, tp, pp)
        if key not in self.bounds:
            inst = self.instance(role, tp, pp)
            ok = inst is not None and inst.kv_capacity_tokens() >= MAX_CONTEXT
            self.bounds[key] = self.max_rate(role, inst) if ok else None
        return self.bounds[key]

    def score(self, role: str, tp: int, pp: int) -> LayoutScore | None:
        key = (role, tp, pp)
        if key in self.cache:
            return self.cache[key]
        inst = self.instance(role, tp, pp)
        result = None
        hi = self.bound(role, tp, pp)
        if inst is None:
            self.skipped.append(f"{role} tp={tp} pp={pp}: not in the profile")
        elif hi is None:
            self.skipped.append(f"{role} tp={tp} pp={pp}: weights leave too little memory for KV")
        else:
            rate = goodput_by_bisection(self._attainment_fn(role, inst), self.spec.slo.attainment, hi / 64, hi,
                                        rel_tol=0.02, expand=False)
            result = LayoutScore(role, tp, pp, rate, inst.phase.source)
        self.cache[key] = result
        if self.progress:
            self.progress()
        return result

    def e2e_attainment(self, cand: Candidate, groups: int, rate: float, n: int) -> SimResult:
        s = self.spec
        p = self.instance("prefill", cand.prefill.tp, cand.prefill.pp)
        d = self.instance("decode", cand.decode.tp, cand.decode.pp)
        assert p is not None and d is not None
        if cand.inter:  # low affinity: KV slices move in parallel over each node's intra-node link
            bw, links = s.hardware.intra_node_bw, cand.inter
        else:
            bw, links = s.hardware.inter_node_bw, min(p.devices, d.devices)
        if not s.assumptions.kv_transfer:
            bw = math.inf
        reqs = s.workload.sample(n, rate, seed=s.seed + 1)
        return run_disaggregated([p] * (cand.n_p * groups), [d] * (cand.n_d * groups), reqs, kv_link_bw=bw,
                                 kv_parallel_links=links, token_budget=self.token_budget, max_batch=self.max_batch)

    def chunk_of(self, role: str) -> int:
        """The chunked-prefill budget a colocated role runs with (0: prefill-first)."""
        return self.spec.chunk if role == "chunked" else 0

    def colocated_result(self, score: LayoutScore, replicas: int, rate: float, n: int) -> SimResult:
        s = self.spec
        inst = self.instance(score.role, score.tp, score.pp)
        assert inst is not None
        reqs = s.workload.sample(n, rate, seed=s.seed + 1)
        return run_colocated([inst] * replicas, reqs, token_budget=self.token_budget, max_batch=self.max_batch,
                             chunk=self.chunk_of(score.role))


def _best_counts(p: LayoutScore, d: LayoutScore, budget: int, rate: float | None) -> tuple[int, int] | None:
    """Replica counts within ``budget`` devices: fewest meeting ``rate``, else best per-device."""
    if p.rate <= 0 or d.rate <= 0:
        return None
    if rate is not None:
        n_p, n_d = math.ceil(rate / p.rate - 1e-9), math.ceil(rate / d.rate - 1e-9)
        return (n_p, n_d) if n_p * p.devices + n_d * d.devices <= budget else None
    best: tuple[float, float, int, int] | None = None
    for n_p in range(1, budget // p.devices + 1):
        for n_d in range(1, (budget - n_p * p.devices) // d.devices + 1):
            r = min(n_p * p.rate, n_d * d.rate)
            key = (round(r / (n_p * p.devices + n_d * d.devices), 4), r, n_p, n_d)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else (best[2], best[3])


def search_high(sc: Scorer) -> list[Candidate]:
    """Disaggregated candidates under high node-affinity, best first."""
    s = sc.spec
    pre = [x for tp, pp in sc.layouts("prefill", s.devices) if (x := sc.score("prefill", tp, pp)) and x.rate > 0]
    dec = [x for tp, pp in sc.layouts("decode", s.devices) if (x := sc.score("decode", tp, pp)) and x.rate > 0]
    cands = []
    for p in pre:
        for d in dec:
            if not s.assumptions.pairs:  # DistServe: one prefill and one decode instance per layout
                counts = (1, 1) if p.devices + d.devices <= s.devices else None
            else:
                counts = _best_counts(p, d, s.devices, s.rate)
            if counts:
                cands.append(Candidate(p, d, *counts))
    return sorted(cands, key=Candidate.sort_key)


def search_low(sc: Scorer) -> list[Candidate]:
    """Low node-affinity: per-node segments of prefill and decode holding the same layers."""
    s = sc.spec
    L, G = s.model.num_hidden_layers, s.gpus_per_node
    cands = []
    for inter in range(1, s.nodes + 1):
        if L % inter:
            continue
        groups_max = s.nodes // inter
        seg = {role: [(tp, pp // inter) for tp, pp in sc.layouts(role, inter * G)
                      if pp % inter == 0 and tp * (pp // inter) <= G] for role in ("prefill", "decode")}
        for tp_p, ip in seg["prefill"]:
            p = sc.score("prefill", tp_p, ip * inter)
            if not p or p.rate <= 0:
                continue
            for tp_d, idd in seg["decode"]:
                d = sc.score("decode", tp_d, idd * inter)
                if not d or d.rate <= 0:
                    continue
                best = None
                for n_p in range(1, G // (tp_p * ip) + 1):
                    for n_d in range(1, (G - n_p * tp_p * ip) // (tp_d * idd) + 1):
                        c = Candidate(p, d, n_p, n_d, inter)
                        if s.rate is not None and math.ceil(s.rate / c.rate - 1e-9) > groups_max:
                            continue
                        if best is None or (round(c.per_device, 4), c.rate) > (round(best.per_device, 4), best.rate):
                            best = c
                if best:
                    cands.append(best)
    return sorted(cands, key=Candidate.sort_key)


def best_colocated(sc: Scorer, role: str = "colocated", keep: int = 2) -> list[LayoutScore]:
    """Colocated (or chunked) layouts under the same cluster, best per-device first (those meeting
    --rate). Layouts are scored in order of their throughput bound per device, and once ``keep``
    scores beat the next bound the rest are left out (a score never exceeds its bound)."""
    s = sc.spec
    if role == "chunked" and not s.chunk:
        return []
    bounds = [((b / (tp * pp) if (b := sc.bound(role, tp, pp)) is not None else math.inf), tp, pp)
              for tp, pp in sc.layouts(role, s.devices)]  # inf: scored first, so score() says why it cannot serve
    out: list[LayoutScore] = []
    for bound, tp, pp in sorted(bounds, key=lambda b: (-b[0], b[1] * b[2])):
        if len(out) >= keep and bound <= sorted(x.per_device for x in out)[-keep]:
            break
        x = sc.score(role, tp, pp)
        if x and x.rate > 0 and (s.rate is None or math.ceil(s.rate / x.rate - 1e-9) * x.devices <= s.devices):
            out.append(x)
    return sorted(out, key=lambda x: (-x.per_device, x.devices))
