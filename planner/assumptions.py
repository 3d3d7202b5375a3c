"""What the planner models, as switches: jaxserve's engine (the default) or DistServe's simulator.

    --assumptions jaxserve | distserve | distserve+NAME,...  -->  Assumptions  -->  Scorer / evaluate

DistServe's ``simdistserve`` (LLMServe/DistServe, read for this; nothing copied) differs from our
model in six ways, each a switch here, so each gap between the two planners has a named cause:

  joint_slo      ours: the share of requests meeting both TTFT and TPOT must reach the attainment
                 target; DistServe: P90 TTFT < its SLO and, separately, P90 TPOT < its SLO
  kv_transfer    ours: KV moves over the link (and the engine's export / import costs); DistServe:
                 the hand-off is instantaneous
  kv_capacity    ours: a decode instance holds what its memory holds (whole requests reserved);
                 DistServe: no memory limit, only a cap on the tokens of context in one decode step
                 (50,000); modelled as that many tokens of KV
  whole_queue    ours: a prefill batch is whole prompts up to 2,048 tokens; DistServe: FCFS up to
                 its profiled token cap (~65k for OPT-13B), i.e. the whole queue in practice
  pp_overlap     ours: jaxserve runs pipeline stages in turn; DistServe: stages overlap perfectly
                 (not modelled yet: with it off, pp layouts score as jaxserve runs them)
  pairs          ours: prefill and decode replica counts chosen for the best ratio; DistServe: one
                 prefill and one decode instance per layout, per-GPU = their goodput / their GPUs

``distserve+kv_capacity`` means DistServe's assumptions with ours for kv_capacity switched back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SWITCHES = ("joint_slo", "kv_transfer", "kv_capacity", "whole_queue", "pp_overlap", "pairs")
DISTSERVE_STEP_TOKENS = 50_000  # simdistserve's cap on one decode step's context tokens
DISTSERVE_PREFILL_TOKENS = 65_536  # its per-batch prefill token cap (profiled; ~65k for OPT-13B tp1)
DISTSERVE_PERCENTILE = 90


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """True: what jaxserve's engine does (the planner's default); False: DistServe's simplification."""

    joint_slo: bool = True
    kv_transfer: bool = True
    kv_capacity: bool = True
    whole_queue: bool = True
    pp_overlap: bool = True
    pairs: bool = True

    @property
    def name(self) -> str:
        """``jaxserve``, ``distserve``, or ``distserve+SWITCH,...`` (the form ``parse`` reads)."""
        if self == JAXSERVE:
            return "jaxserve"
        on = [s for s in SWITCHES if getattr(self, s)]
        return "distserve" + ("+" + ",".join(on) if on else "")

    def describe(self) -> dict[str, bool]:
        return {s: getattr(self, s) for s in SWITCHES}


JAXSERVE = Assumptions()
DISTSERVE = Assumptions(*(False for _ in SWITCHES))


def parse(spec: str) -> Assumptions:
    """``jaxserve``, ``distserve``, or ``distserve+SWITCH,...`` (DistServe's, with ours for those)."""
    base, _, back = spec.partition("+")
    if base not in ("jaxserve", "distserve") or (back and base != "distserve"):
        raise ValueError(f"--assumptions {spec!r}: use jaxserve, distserve, or distserve+SWITCH[,SWITCH] "
                         f"(switches: {', '.join(SWITCHES)})")
    if base == "jaxserve":
        return JAXSERVE
    names = [n.strip() for n in back.split(",") if n.strip()]
    bad = [n for n in names if n not in SWITCHES]
    if bad:
        raise ValueError(f"--assumptions {spec!r}: unknown switch {bad[0]!r} (switches: {', '.join(SWITCHES)})")
    return dataclasses.replace(DISTSERVE, **{n: True for n in names})


def slo_score(ttft: np.ndarray, tpot: np.ndarray, ttft_slo: float, tpot_slo: float, attainment: float,
              a: Assumptions) -> float:
    """What goodput bisection compares with the attainment target: the share of requests meeting both
    SLOs (ours), or, DistServe's way, 1.0 when the P90 TTFT and the P90 TPOT are each below their SLO
    and 0.0 otherwise."""
    if a.joint_slo:
        return float(np.mean((ttft <= ttft_slo) & (tpot <= tpot_slo)))
    q = DISTSERVE_PERCENTILE
    ok = bool(np.percentile(ttft, q) < ttft_slo and np.percentile(tpot, q) < tpot_slo)
    return 1.0 if ok else 0.0
