"""Least-squares fits of the latency model, and the profile-JSON writer.

    timing samples from the engine (measured by ``python -m jaxserve.profiling``)
      prefill: (prompt lengths of one batch, ms)  --fit_prefill()-->  Fit [a, b, c] of a + b*sum(l) + c*sum(l^2)
      decode:  (context lengths of one step, ms)  --fit_decode()-->   {"decode_small": Fit, "decode_large": Fit}
                                                                      of a + b*sum(context) + c*batch
      both     --fit_nonnegative()--> the same, a fit with a negative coefficient redone with it held at 0
      (padded tokens T of one packed prefill call, ms) --fit_packed_prefill()--> a + b*T + c*T^2
      (rows, longest context, sum of contexts, ms)     --fit_padded_decode()--> per row count a + p*M + q*S
      (x, ms)                                          --fit_line()--> non-negative a + b*x (engine costs)
      --write_profile()-->  profile JSON in the format planner.latency.load_profile reads

Pure numpy: the planner reads and the profiler writes profiles without this module touching jax.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PlannerError

Sample = tuple[Sequence[int], float]  # (lengths in the batch, measured time in ms)


@dataclasses.dataclass(frozen=True)
class Fit:
    coeffs: tuple[float, float, float]  # a (ms), b (ms/token), c
    rmse_ms: float
    max_rel_err: float  # largest |fit - measured| / measured over the samples
    n: int


def _lstsq(x: np.ndarray, y: np.ndarray) -> Fit:
    if len(y) < 3:
        raise PlannerError(f"need at least 3 timing samples to fit 3 coefficients, got {len(y)}")
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), float(np.sqrt(np.mean((pred - y) ** 2))),
               float(rel.max()), len(y))


def fit_prefill(samples: Sequence[Sample]) -> Fit:
    """Fit prefill batch time = a + b*sum(l) + c*sum(l^2)."""
    x = np.array([[1.0, float(np.sum(ls)), float(np.sum(np.square(np.asarray(ls, np.float64))))]
                  for ls, _ in samples]).reshape(-1, 3)
    return _lstsq(x, np.array([t for _, t in samples], np.float64))


def fit_decode(samples: Sequence[Sample], small_batch_threshold: int = 95) -> dict[str, Any]:
    """Fit decode step time = a + b*sum(context) + c*batch, separately below/above the threshold.

    A side with fewer than 3 samples reuses the other side's fit.
    """
    rows = [(1.0, float(np.sum(ctx)), float(len(ctx)), float(t)) for ctx, t in samples]
    small = [r for r in rows if r[2] < small_batch_threshold]
    large = [r for r in rows if r[2] >= small_batch_threshold]
    fits: dict[str, Fit] = {}
    for name, part in (("decode_small", small), ("decode_large", large)):
        if len(part) >= 3:
            a = np.array(part)
            fits[name] = _lstsq(a[:, :3], a[:, 3])
    if not fits:
        raise PlannerError(f"need at least 3 decode timing samples, got {len(rows)}")
    fits.setdefault("decode_small", fits.get("decode_large"))  # type: ignore[arg-type]
    fits.setdefault("decode_large", fits["decode_small"])
    return {**fits, "small_batch_threshold": small_batch_threshold}


def nonnegative_fit(x: Any, y: Any) -> Fit:
    """Least squares with every coefficient >= 0: the best over column subsets (the others held at 0).

    Three coefficients make the exhaustive active set cheap; the intercept alone is always feasible
    (times are positive), so a fit always exists.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sub, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (sub < 0).any():
                continue
            coef = np.zeros(x.shape[1])
            coef[list(cols)] = sub
            sse = float(np.sum((x @ coef - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, coef)
    assert best is not None
    pred = x @ best[1]
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    c = best[1]
    return Fit((float(c[0]), float(c[1]), float(c[2])), float(np.sqrt(np.mean((pred - y) ** 2))),
               float(rel.max()), len(y))


def _prefill_rows(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    return [[1.0, float(sum(ls)), float(sum(v * v for v in ls))] for ls, _ in samples], [t for _, t in samples]


def _decode_rows(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    return [[1.0, float(sum(ls)), float(len(ls))] for ls, _ in samples], [t for _, t in samples]


def fit_nonnegative(pre_samples: Sequence[Sample], dec_samples: Sequence[Sample], small_batch_threshold: int
                    ) -> tuple[Fit, dict[str, Any], list[str]]:
    """``fit_prefill`` / ``fit_decode``; a fit with a negative coefficient is redone with it held at 0.

    The planner needs non-negative step times for every batch it simulates (a negative decode ``c``
    makes large batches take negative time). Returns the fits and the names that were refit.
    """
    refit: list[str] = []
    pre = fit_prefill(pre_samples)
    if min(pre.coeffs) < 0:
        pre = nonnegative_fit(*_prefill_rows(pre_samples))
        refit.append("prefill")
    dec = fit_decode(dec_samples, small_batch_threshold)
    small = [s for s in dec_samples if len(s[0]) < small_batch_threshold]
    large = [s for s in dec_samples if len(s[0]) >= small_batch_threshold]
    shared = dec["decode_small"] is dec["decode_large"]
    for name, side in (("decode_small", small), ("decode_large", large)):
        if min(dec[name].coeffs) >= 0 or (shared and name == "decode_large"):
            continue
        rows = side if len(side) >= 3 else (large if name == "decode_small" else small)
        dec[name] = nonnegative_fit(*_decode_rows(rows))
        refit.append(name)
    if shared:
        dec["decode_large"] = dec["decode_small"]
    return pre, dec, refit


def fit_packed_prefill(samples: Sequence[tuple[int, float]]) -> Fit:
    """Non-negative fit of one packed prefill call: ms = a + b*T + c*T^2, T the padded token count.

    On the XLA path a packed call attends over all its T tokens (block-diagonal mask over
    ``[T, T]``), so its time depends on the padded T, not on how the prompts split it."""
    x = [[1.0, float(t), float(t) * t] for t, _ in samples]
    return nonnegative_fit(x, [ms for _, ms in samples])


def fit_padded_decode(samples: Sequence[tuple[int, int, int, float]]) -> dict[int, Fit]:
    """Per padded decode batch (rows), a non-negative fit of ms = a + p * M + q * S from
    (rows, M = longest context, S = sum of contexts, ms) samples.

    jaxserve runs a decode step at a power-of-two row count and its attention loops over every row
    up to the batch's longest context (p, per row count), while the pages it really reads grow with
    the contexts actually cached (q; shorter rows read the null block). The a + b*sum(context) +
    c*batch form misses how the cost bends with the batch (the weights are read once per step,
    whatever the rows). Row counts with fewer than 2 distinct M are left out; where every sample has
    S = rows * M (uniform contexts, or one row) the fit has q = 0."""
    by_rows: dict[int, list[tuple[int, int, float]]] = {}
    for rows, m, total, ms in samples:
        by_rows.setdefault(rows, []).append((m, total, ms))
    out = {}
    for rows, pts in sorted(by_rows.items()):
        if len({m for m, _, _ in pts}) < 2:
            continue
        mixed = any(total != rows * m for m, total, _ in pts) and rows > 1
        x = [[1.0, float(m), float(total) if mixed else 0.0] for m, total, _ in pts]
        out[rows] = nonnegative_fit(x, [ms for _, _, ms in pts])
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Non-negative least squares of y = a + b*x."""
    x = np.array([[1.0, float(v), 0.0] for v in xs])
    f = nonnegative_fit(x, np.asarray(ys, np.float64))
    return f.coeffs[0], f.coeffs[1]


def write_profile(path: str | Path, *, engine: str, model: str, tp: int, prefill: Fit,
                  decode: dict[str, Any], hardware: dict[str, Any] | None = None) -> None:
    """Merge one (engine, model, tp) entry into a profile JSON (created if absent), in ms."""
    path = Path(path)
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
        "description": "Fitted iteration-latency model written by jaxserve's planner. Times in milliseconds.",
        "hardware": hardware or {},
        "prefill_ms": "a + b * sum(prompt_len) + c * sum(prompt_len^2)   over the requests in one prefill "
                      "batch (one instance, pp=1)",
        "decode_ms": "a + b * sum(context_len) + c * batch_size   over the requests in one decode step (one "
                     "instance, pp=1); use 'decode_small' when batch_size < small_batch_threshold, else "
                     "'decode_large'",
        "engines": {},
    }
    if hardware:
        doc["hardware"] = hardware
    doc.setdefault("engines", {}).setdefault(engine, {}).setdefault(model, {})[f"tp{tp}"] = {
        "prefill": list(prefill.coeffs),
        "decode_small": list(decode["decode_small"].coeffs),
        "decode_large": list(decode["decode_large"].coeffs),
        "small_batch_threshold": int(decode["small_batch_threshold"]),
        "fit_error": {"prefill_rmse_ms": prefill.rmse_ms, "decode_small_rmse_ms": decode["decode_small"].rmse_ms,
                      "decode_large_rmse_ms": decode["decode_large"].rmse_ms},
    }
    path.write_text(json.dumps(doc, indent=1))
