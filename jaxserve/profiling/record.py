"""The profiler's output: fitted entries merged into a profile JSON, and the report of a run.

    Fitted (coefficients) + samples + what was measured (layout, device, grid)
      --write_entries()--> profile JSON engines.<engine>.<model>.tp<N> (planner.fit.write_profile, plus
         prefill_packed, decode_padded, engine_costs, samples, fit errors and notes) --> ProfileResult
    ProfileResult --format_report()--> coefficients, fit errors and a measured-vs-fitted table
                  --fit_warnings()--> one line per fit refit with a coefficient held at 0

Coefficient semantics are those of ``configs/profiles/a100_80g.json``: prefill batch ms =
``a + b*sum(l) + c*sum(l^2)``; decode step ms = ``a + b*sum(context) + c*batch`` with
``decode_small`` below ``small_batch_threshold`` and ``decode_large`` from it on. No jax here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner.fit import Fit, Sample, write_profile

COLOCATED_ENGINE = "jaxserve_colocated"


@dataclasses.dataclass(frozen=True)
class Fitted:
    """Every fit of one run (ms)."""

    prefill: Fit  # a + b*sum(l) + c*sum(l^2)
    decode: dict[str, Any]  # planner.fit.fit_decode's dict
    refit: list[str]  # fits redone with a negative coefficient held at 0
    packed: Fit  # a + b*T + c*T^2 of one packed prefill call of T padded tokens
    padded: dict[int, Fit]  # per padded decode row count: a + p*M + q*S


@dataclasses.dataclass
class ProfileResult:
    """Fitted coefficients, their errors and the raw samples of one profiling run."""

    model_key: str
    tp: int
    pp: int
    prefill: Fit
    decode: dict[str, Any]
    prefill_samples: list[Sample]
    decode_samples: list[Sample]
    entry: dict[str, Any]  # what was written under engines.<engine>.<model_key>.tp<tp>
    out: Path
    engines: list[str]


def _write_notes(doc: dict[str, Any], *, key: str, tp: int, pp: int, engine: str, engines: list[str],
                 profiled: dict[str, Any]) -> None:
    notes = doc.setdefault("notes", {})
    for eng in engines[1:]:
        notes[eng] = (f"same measured entries as {engine}: jaxserve's colocated engine issues the "
                      "same packed-prefill and decode executor calls")
    notes.pop(f"{key}/tp{tp}", None)  # this run replaces the entry, so its old notes go too
    notes.pop(f"{key}/tp{tp}/pp", None)
    if profiled["layers"] != profiled["model_layers"]:
        notes[f"{key}/tp{tp}"] = (f"profiled with {profiled['layers']} of {profiled['model_layers']} decoder "
                                  "layers (--layers): times are for the shallower model")
    if pp > 1:
        notes[f"{key}/tp{tp}/pp"] = (f"measured with pp={pp} (one step runs its stages in sequence); the "
                                     "planner reads tpN entries as pp=1 times")


def _fill_entry(entry: dict[str, Any], fits: Fitted, samples: Sequence[list[Sample]], profiled: dict[str, Any],
                costs: dict[str, Any] | None) -> None:
    pre, dec = fits.prefill, fits.decode
    pre_samples, dec_samples, mix_samples = samples
    entry["fit_error"].update({
        "prefill_max_rel_err": pre.max_rel_err,
        "decode_small_max_rel_err": dec["decode_small"].max_rel_err,
        "decode_large_max_rel_err": dec["decode_large"].max_rel_err,
        "prefill_n": pre.n, "decode_small_n": dec["decode_small"].n, "decode_large_n": dec["decode_large"].n})
    entry["profiled"] = profiled
    entry["prefill_packed"] = list(fits.packed.coeffs)
    if fits.padded:
        entry["decode_padded"] = [[rows, *f.coeffs] for rows, f in fits.padded.items()]
        entry["fit_error"]["decode_padded_max_rel_err"] = max(f.max_rel_err for f in fits.padded.values())
    entry["fit_error"].update({"prefill_packed_rmse_ms": fits.packed.rmse_ms,
                               "prefill_packed_max_rel_err": fits.packed.max_rel_err})
    if costs is not None:
        entry["engine_costs"] = costs
    entry["samples"] = {"prefill": [[len(ls), ls[0], round(t, 4)] for ls, t in pre_samples],
                        "decode": [[len(ls), ls[0], round(t, 4)] for ls, t in dec_samples],
                        "decode_mixed": [[len(ls), ls[0], ls[-1], round(t, 4)] for ls, t in mix_samples],
                        "columns": "[batch, length (prompt or context) of each request, median ms]"}


def write_entries(out: str | Path, *, engine: str, colocated_engine: str | None, key: str, tp: int, pp: int,
                  fits: Fitted, samples: Sequence[list[Sample]], profiled: dict[str, Any],
                  hardware: dict[str, Any], costs: dict[str, Any] | None) -> ProfileResult:
    """Merge the run's entry into ``out`` under ``engine`` (and ``colocated_engine``, unless None or the same).

    ``samples``: the (prefill, decode, mixed decode) samples."""
    out = Path(out)
    engines = [engine] + ([colocated_engine] if colocated_engine and colocated_engine != engine else [])
    for eng in engines:
        write_profile(out, engine=eng, model=key, tp=tp, prefill=fits.prefill, decode=fits.decode,
                      hardware=hardware)
    doc = json.loads(out.read_text())
    _write_notes(doc, key=key, tp=tp, pp=pp, engine=engine, engines=engines, profiled=profiled)
    entry: dict[str, Any] = {}
    for eng in engines:
        entry = doc["engines"][eng][key][f"tp{tp}"]
        _fill_entry(entry, fits, samples, profiled, costs)
    out.write_text(json.dumps(doc, indent=1))
    return ProfileResult(key, tp, pp, fits.prefill, fits.decode, list(samples[0]), list(samples[1]), entry, out,
                         engines)


def _pick_rows(n: int, worst: int, k: int = 10) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} | {worst})


def _engine_lines(r: ProfileResult) -> list[str]:
    """The packed/padded fits and the engine costs, where the run has them."""
    lines = []
    if "prefill_packed" in r.entry:
        a, b, c = r.entry["prefill_packed"]
        err = r.entry["fit_error"]
        lines.append(f"prefill_packed ms = {a:.4g} + {b:.4g}*T + {c:.4g}*T^2 (T: padded tokens of the call)   RMSE "
                     f"{err['prefill_packed_rmse_ms']:.3f} ms, max rel err {err['prefill_packed_max_rel_err']:.1%}")
    if "decode_padded" in r.entry:
        rows = ", ".join(f"{int(b)}: {a:.3g} + {p_:.3g}*M + {q:.3g}*S" for b, a, p_, q in r.entry["decode_padded"])
        lines.append(f"decode_padded ms per padded batch (M: longest context, S: sum of contexts) {rows}   max rel err "
                     f"{r.entry['fit_error']['decode_padded_max_rel_err']:.1%}")
    ec = r.entry.get("engine_costs")
    if ec:
        lines.append(f"engine costs: host {ec['call_ms']:.3g} ms/call + {ec['seq_ms']:.3g} ms/sequence (decode), "
                     f"{ec['prefill_call_ms']:.3g} + {ec['prefill_seq_ms']:.3g}/prompt (prefill); KV export "
                     f"{ec['kv_export_ms'][0]:.3g} + {ec['kv_export_ms'][1]:.3g}*tokens ms, import "
                     f"{ec['kv_import_ms'][0]:.3g} + {ec['kv_import_ms'][1]:.3g}*tokens ms")
    return lines


def _decode_lines(r: ProfileResult) -> list[str]:
    lines = []
    seen: set[int] = set()
    for name in ("decode_small", "decode_large"):
        f = r.decode[name]
        if id(f) in seen:
            lines.append(f"{name}: same fit as decode_small (no samples with batch >= "
                         f"{r.decode['small_batch_threshold']})")
            continue
        seen.add(id(f))
        a, b, c = f.coeffs
        lines.append(f"{name} ms = {a:.4g} + {b:.4g}*sum(ctx) + {c:.4g}*batch   RMSE {f.rmse_ms:.3f} ms, "
                     f"max rel err {f.max_rel_err:.1%} over {f.n} samples")
    return lines


def _table_lines(r: ProfileResult) -> list[str]:
    """Measured against fitted ms for about ten samples of each phase, the worst fitted included."""
    def pred_prefill(ls: Sequence[int]) -> float:
        a, b, c = r.prefill.coeffs
        return a + b * sum(ls) + c * sum(x * x for x in ls)

    def pred_decode(ls: Sequence[int]) -> float:
        fit = r.decode["decode_small" if len(ls) < r.decode["small_batch_threshold"] else "decode_large"]
        a, b, c = fit.coeffs
        return a + b * sum(ls) + c * len(ls)

    lines = []
    for title, samples, pred in (("prefill", r.prefill_samples, pred_prefill),
                                 ("decode", r.decode_samples, pred_decode)):
        rel = [abs(pred(ls) - t) / t for ls, t in samples]
        lines.append(f"{title:<8} {'batch':>5} {'len':>5} {'measured ms':>12} {'fitted ms':>10} {'err':>7}")
        for i in _pick_rows(len(samples), int(np.argmax(rel))):
            ls, t = samples[i]
            lines.append(f"{'':<8} {len(ls):>5} {ls[0]:>5} {t:>12.3f} {pred(ls):>10.3f} {rel[i]:>7.1%}")
    return lines


def format_report(r: ProfileResult) -> str:
    """Fit errors, coefficients and a short measured-vs-fitted table."""
    p = r.entry["profiled"]
    lines = [f"profiled {r.model_key} ({p['layers']}/{p['model_layers']} layers, {p['dtype']}) tp={r.tp} pp={r.pp} "
             f"on {p['device_kind']} ({p['platform']}), attention {p['attention']}"]
    a, b, c = r.prefill.coeffs
    lines.append(f"prefill ms = {a:.4g} + {b:.4g}*sum(l) + {c:.4g}*sum(l^2)   RMSE {r.prefill.rmse_ms:.3f} ms, "
                 f"max rel err {r.prefill.max_rel_err:.1%} over {r.prefill.n} samples")
    lines += _engine_lines(r) + _decode_lines(r) + _table_lines(r)
    lines.append(f"wrote engines.{{{','.join(r.engines)}}}.{r.model_key}.tp{r.tp} to {r.out}")
    return "\n".join(lines)


def fit_warnings(r: ProfileResult) -> list[str]:
    """Fits whose unconstrained least squares gave a negative coefficient (refit with it at 0)."""
    return [f"{name}: least squares gave a negative coefficient (noise, or a curve a + b*x + c*y does not "
            "capture); refit with it held at 0 so every simulated batch has a positive time"
            for name in r.entry["profiled"]["nonnegative_refit"]]
