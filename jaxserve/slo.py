"""The one definition of TTFT, TPOT, SLO attainment and goodput.

The planner's simulator and the server's metrics both call these functions, so a
predicted figure and a measured one mean the same thing. Pure Python/numpy; no jax.

    per-request arrays (arrival, first_token, finish, output_len)
        --ttft()/tpot()-->          per-request TTFT, TPOT (seconds)
        --attainment()-->           share meeting both SLOs
    attainment_at_rate(rate)  --goodput_by_bisection()-->  max rate meeting the target
        --per_device_goodput()-->   req/s per device

Definitions (DistServe §2, vLLM's benchmark):
  TTFT = first token time - arrival time.
  TPOT = (latency - TTFT) / (output_len - 1), latency = finish - arrival;
         0 for a request with a single output token (it has no decoding phase).
  A request meets the SLO when TTFT <= ttft_slo and TPOT <= tpot_slo.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets in seconds and the attainment target (share of requests)."""

    ttft: float
    tpot: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ttft", "tpot"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {v!r}")
        if not (0.0 < self.attainment <= 1.0):
            raise ValueError(f"SLO attainment must be in (0, 1], got {self.attainment!r}")


def ttft(arrival: np.ndarray, first_token: np.ndarray) -> np.ndarray:
    """Time to first token per request, in seconds."""
    return np.asarray(first_token, dtype=np.float64) - np.asarray(arrival, dtype=np.float64)


def tpot(ttft_s: np.ndarray, latency_s: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """Time per output token: (latency - TTFT) / (output_len - 1); 0 where output_len <= 1."""
    ttft_s = np.asarray(ttft_s, dtype=np.float64)
    latency_s = np.asarray(latency_s, dtype=np.float64)
    out = np.asarray(output_len, dtype=np.float64)
    denom = np.maximum(out - 1.0, 1.0)
    return np.where(out > 1, (latency_s - ttft_s) / denom, 0.0)


def meets_slo(ttft_s: np.ndarray, latency_s: np.ndarray, output_len: np.ndarray,
              ttft_slo: float, tpot_slo: float) -> np.ndarray:
    """Boolean per request: both TTFT and TPOT within their targets."""
    t = np.asarray(ttft_s, dtype=np.float64)
    return (t <= ttft_slo) & (tpot(t, latency_s, output_len) <= tpot_slo)


def attainment(ttft_s: np.ndarray, latency_s: np.ndarray, output_len: np.ndarray,
               ttft_slo: float, tpot_slo: float) -> float:
    """Share of requests meeting both SLOs (0.0 for no requests)."""
    ok = meets_slo(ttft_s, latency_s, output_len, ttft_slo, tpot_slo)
    return float(ok.mean()) if ok.size else 0.0


def goodput_by_bisection(attainment_at_rate: Callable[[float], float], target: float,
                         lo: float, hi: float, *, rel_tol: float = 0.02, max_iter: int = 40,
                         expand: bool = True, max_expand: int = 30) -> float:
    """Highest rate (req/s) at which ``attainment_at_rate(rate) >= target``, by bisection.

    Assumes attainment does not rise with rate. ``lo`` and ``hi`` bracket the answer; if
    ``hi`` still meets the target and ``expand`` is set, ``hi`` is doubled (up to
    ``max_expand`` times). If even ``lo`` misses the target, ``lo`` is halved down to
    ``lo / 2**max_expand``; if that fails too, the answer is 0.0 (no rate is feasible).
    Stops when the bracket is within ``rel_tol`` of its upper end; returns the lower end,
    a rate that was seen to meet the target.
    """
    if not (lo > 0 and hi > lo):
        raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    shrunk = False
    for _ in range(max_expand + 1):
        if attainment_at_rate(lo) >= target:
            break
        hi, lo, shrunk = lo, lo / 2.0, True
    else:
        return 0.0
    if expand and not shrunk:
        for _ in range(max_expand):
            if attainment_at_rate(hi) < target:
                break
            lo, hi = hi, hi * 2.0
        else:
            return lo
    for _ in range(max_iter):
        if hi - lo <= rel_tol * hi:
            break
        mid = 0.5 * (lo + hi)
        if attainment_at_rate(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def per_device_goodput(rate: float, devices: int) -> float:
    """Goodput per device: the max rate meeting the target divided by devices used."""
    if devices <= 0:
        raise ValueError(f"devices must be positive, got {devices!r}")
    return rate / devices


STAGES = ("prefill_queue", "prefill_exec", "transfer", "decode_queue", "decode_exec")


def breakdown(events: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The paper's five stages of one request (seconds) from its lifecycle events ``(kind, time)``.

    prefill_queue = first prefill began - arrived;  prefill_exec = first prefill ended - first prefill
    began (chunked prefill: across its chunks);  transfer = transfer ended - transfer began;
    decode_queue = decode began - prefill ended - transfer (waiting to be pulled / to join a batch);
    decode_exec = last event - decode began. A stage a request never had is 0 (colocated: no transfer).
    """
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for kind, t in events:
        k = getattr(kind, "value", kind)
        first.setdefault(k, t)
        last[k] = t
    if not events or "arrived" not in first:
        return dict.fromkeys(STAGES, 0.0)
    end = max(t for _, t in events)
    arrived = first["arrived"]
    pb = first.get("prefill_began", arrived)
    pe = first.get("prefill_ended", pb)
    transfer = max(0.0, last.get("transfer_ended", 0.0) - last.get("transfer_began", 0.0)) \
        if "transfer_ended" in last else 0.0
    db = first.get("decode_began", pe)
    return {"prefill_queue": pb - arrived, "prefill_exec": pe - pb, "transfer": transfer,
            "decode_queue": max(0.0, db - pe - transfer), "decode_exec": end - db}
