"""Least-squares fits of the latency model, and the profile-JSON writer.

    timing samples from the engine (planner.profile, later)
      prefill: (prompt lengths of one batch, ms)  --fit_prefill()-->  Fit [a, b, c] of a + b*sum(l) + c*sum(l^2)
      decode:  (context lengths of one step, ms)  --fit_decode()-->   {"decode_small": Fit, "decode_large": Fit}
                                                                      of a + b*sum(context) + c*batch
      --write_profile()-->  profile JSON in the format planner.latency.load_profile reads
"""

from __future__ import annotations

import dataclasses
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
