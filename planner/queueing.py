"""Closed-form queueing results the simulator is checked against (DistServe §3.1).

    D (prefill time of one request at pp=1), R (arrival rate), K (TP speedup)
        --> average TTFT of an M/D/1 server, a 2-stage pipeline, a TP=2 instance,
            and the rate where the pipeline and TP=2 curves cross.

Single server, no batching, Poisson arrivals, deterministic service D:
    M/D/1:  Avg TTFT = D + R D^2 / (2 (1 - R D))
    PP=2:   Avg TTFT = D_s + R D_m^2 / (2 (1 - R D_m)),  D_s = D, D_m = D / 2
    TP=2:   Avg TTFT = D/K + R (D/K)^2 / (2 (1 - R D/K))
Crossover: with u = R D, equating the two and clearing denominators gives
    (2 - 3K) u^2 + (3K^2 + 4K - 4) u + 8K(1 - K) = 0,
whose root in (0, K) is the crossover utilisation for 1 < K < 2 (below it TP=2 has
the lower TTFT, above it PP=2 does). K >= 2: TP=2 is never worse; K <= 1: PP=2 never is.

The PP=2 line is the paper's pipeline, which takes a new request every D/2. jaxserve does not
run that: it never overlaps consecutive steps (a step ends with its sampled tokens), and its
stages overlap only between the micro-batches of one multi-prompt call (``planner.latency``),
so its PP=2 prefill of lone prompts is the M/D/1 line with D (tests/planner/test_slo_queueing.py).
"""

from __future__ import annotations

import math


def md1_ttft(rate: float, d: float) -> float:
    """Mean TTFT (wait + service) of an M/D/1 queue; inf at or beyond saturation."""
    rho = rate * d
    return d + rate * d * d / (2 * (1 - rho)) if rho < 1 else math.inf


def pp2_ttft(rate: float, d: float) -> float:
    """Mean TTFT of a 2-stage pipeline: the queue sees D/2 per request, latency D."""
    dm = d / 2
    return d + rate * dm * dm / (2 * (1 - rate * dm)) if rate * dm < 1 else math.inf


def tp2_ttft(rate: float, d: float, k: float) -> float:
    """Mean TTFT of a TP=2 instance whose prefill runs K times faster than one device."""
    return md1_ttft(rate, d / k)


def crossover_rate(d: float, k: float) -> float | None:
    """Rate where PP=2 and TP=2 (speedup k) have equal mean TTFT; None if they never cross."""
    if not 1 < k < 2:
        return None
    a, b, c = 2 - 3 * k, 3 * k * k + 4 * k - 4, 8 * k * (1 - k)
    disc = b * b - 4 * a * c
    roots = [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1, -1)]
    u = min(r for r in roots if 0 < r < k)
    return u / d
