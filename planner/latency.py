"""Latency model of one instance layout, from a profile JSON or the analytic model.

    profile JSON (ms, pp=1 per tp)  --load_profile()-->  Profile
    Profile.phase(engine, model, tp) -->  PhaseModel (seconds; pp=1)
    hardware spec + model shape  --planner.hardware.analytic_phase()-->  PhaseModel
    PhaseModel + (tp, pp) + link bandwidth  -->  InstanceModel  --> simulator

Formulas (profile header): prefill batch time = a + b*sum(l) + c*sum(l^2);
decode step time = a + b*sum(context) + c*batch, with 'small' coefficients when
batch < small_batch_threshold and 'large' ones otherwise.

Engine costs (``EngineCosts``; all zero by default): what a real serving engine adds to the
profiled model calls, and how it pads their shapes. jaxserve pads every call to power-of-two
shapes (prefill tokens from 16, decode rows from 1); on the XLA path a packed prefill attends
over the whole padded call (``T^2``, fitted as ``prefill_packed`` = a + b*T + c*T^2) and a
decode step over rows x the batch's longest context. Per engine step, per executor call and
per sequence it spends host time (scheduling, packing, sampling, the driver's round trip) that
the profiler does not time; a disaggregated prefill puts each request's KV on the host inside
its step, and the decode side writes it in between its steps.

Pipeline stages (the profile covers pp=1; each stage runs 1/pp of the layers, so it takes the
pp=1 time / pp, plus receiving the previous stage's activations, hidden_size x 2 bytes per
token, over the link) are priced as jaxserve runs them (``jaxserve.engine.runner``): a step's
calls go one after another and the next step starts when this one's tokens are sampled, so
consecutive steps never overlap. A packed prefill call of several prompts is cut into
``microbatches`` (default pp) micro-batches of whole prompts (``split_runs``, as the runner
does) that flow through the stages in the ``wavefront`` schedule: M equal micro-batches take
(M + pp - 1) stage times. Decode steps and prompt continuations pass through the stages as one
micro-batch: the pp=1 time plus pp - 1 hops. The instance keeps one decode batch over all of
its KV.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxserve.config import ModelConfig
from jaxserve.microbatch import split_runs, wavefront

from .decode_batch import DecodeBatch
from .errors import PlannerError

DISAGG_ENGINE = "disaggregated_engine"
DTYPE_BYTES = 2  # fp16/bf16 weights and KV, as in the profiled runs
GPU_MEM_UTIL = 0.9  # share of device memory usable for weights + KV
ACTIVATION_RESERVE_BYTES = 2 * 2**30  # per device, for activations and workspace


def pow2_bucket(n: float, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo): the padded size jaxserve compiles a step shape at."""
    b = max(1, int(lo))
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass(frozen=True)
class EngineCosts:
    """What a serving engine adds to the profiled model calls (seconds), and how it pads shapes.

    The defaults add nothing: the published-profile model. ``jaxserve.profiling.engine_costs`` measures the
    host costs for jaxserve (``python -m jaxserve.profiling --engine-costs``); ``step_s`` (a driver's
    round trip) is not measured there.
    """

    padded: bool = False  # power-of-two shapes; packed prefill over T^2; decode over rows x longest context
    min_tokens: int = 16  # smallest prefill / chunk token bucket
    min_blocks: int = 4  # smallest blocks-per-sequence bucket (chunk calls)
    block_size: int = 16
    step_s: float = 0.0  # per engine step: scheduling, the driver's round trip
    call_s: float = 0.0  # per executor call: packing inputs, sampling, reading the tokens back
    seq_s: float = 0.0  # per sequence in a step: host bookkeeping, token delivery
    kv_export: tuple[float, float] = (0.0, 0.0)  # disaggregated prefill, inside its step: a + b*tokens per request
    kv_import: tuple[float, float] = (0.0, 0.0)  # decode side, between its steps (stalls the batch)
    prefill_factor: float = 1.0  # in situ / profiled time of prefill work (packed and chunk calls, KV export)
    decode_factor: float = 1.0  # in situ / profiled time of decode steps (and KV import)
    dispatch_s: float = 0.0  # a new request reaches the instance this long after it arrives

    @classmethod
    def from_ms_entry(cls, d: dict[str, Any], *, where: str) -> EngineCosts:
        """Parse a profile entry's ``engine_costs`` (ms; written by ``python -m jaxserve.profiling --engine-costs``)."""
        try:
            return cls(padded=True, call_s=float(d["call_ms"]) / 1e3, seq_s=float(d["seq_ms"]) / 1e3,
                       kv_export=(float(d["kv_export_ms"][0]) / 1e3, float(d["kv_export_ms"][1]) / 1e3),
                       kv_import=(float(d["kv_import_ms"][0]) / 1e3, float(d["kv_import_ms"][1]) / 1e3))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PlannerError(f"{where}.engine_costs: expected call_ms, seq_ms, kv_export_ms [a, b], "
                               f"kv_import_ms [a, b] ({e})") from e

    def export_time(self, tokens: float) -> float:
        return self.prefill_factor * (self.kv_export[0] + self.kv_export[1] * tokens) if any(self.kv_export) else 0.0

    def import_time(self, tokens: float) -> float:
        return self.decode_factor * (self.kv_import[0] + self.kv_import[1] * tokens) if any(self.kv_import) else 0.0


@dataclasses.dataclass(frozen=True)
class PhaseModel:
    """Iteration-time coefficients (seconds) of one engine/model/tp entry at pp=1."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    small_batch_threshold: int
    source: str = "profile"  # "profile" or "analytic"
    # a + b*T + c*T^2 of one packed prefill call of T (padded) tokens, when the profile has it
    prefill_packed: tuple[float, float, float] | None = None
    engine_costs: EngineCosts | None = None  # the profiled engine's host costs, when measured
    # per padded decode batch (rows): (rows, a, p, q), step = a + p * longest context + q * sum of contexts
    decode_padded: tuple[tuple[int, float, float, float], ...] | None = None

    def prefill_time(self, sum_l: float, sum_l2: float) -> float:
        a, b, c = self.prefill
        return a + b * sum_l + c * sum_l2

    def packed_time(self, tokens: float) -> float:
        """One packed prefill call of ``tokens`` (already padded) tokens; falls back to ``prefill``."""
        a, b, c = self.prefill_packed or self.prefill
        return a + b * tokens + c * tokens * tokens

    def padded_decode(self, rows: int) -> tuple[float, float, float]:
        """(a, p, q) of one padded decode step of ``rows`` rows: a + p * longest context + q * sum of
        contexts (seconds).

        From ``decode_padded`` (linear between profiled row counts, extrapolated from the last two
        beyond them), else from the a + b*sum(context) + c*batch form with c paid for every row."""
        tab = self.decode_padded
        if not tab:
            a, b, c = self.decode_coeffs(rows)
            return a + c * rows, 0.0, b
        if len(tab) == 1 or rows <= tab[0][0]:
            return tab[0][1:]
        for lo, hi in itertools.pairwise(tab):
            if rows <= hi[0] or hi is tab[-1]:
                w = (rows - lo[0]) / (hi[0] - lo[0])
                a, p, q = (x + w * (y - x) for x, y in zip(lo[1:], hi[1:], strict=True))
                return a, max(0.0, p), max(0.0, q)
        raise AssertionError("unreachable")

    def decode_coeffs(self, batch: int) -> tuple[float, float, float]:
        return self.decode_small if batch < self.small_batch_threshold else self.decode_large

    def decode_time(self, sum_ctx: float, batch: int) -> float:
        a, b, c = self.decode_coeffs(batch)
        return a + b * sum_ctx + c * batch

    @classmethod
    def from_ms_entry(cls, entry: dict[str, Any], *, where: str) -> PhaseModel:
        """Parse one ``tpN`` entry of the profile JSON (milliseconds) into seconds."""
        def coeffs(key: str) -> tuple[float, float, float]:
            v = entry.get(key)
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise PlannerError(f"{where}: '{key}' must be a list of 3 numbers [a, b, c], got {v!r}")
            return (v[0] / 1e3, v[1] / 1e3, v[2] / 1e3)
        thr = entry.get("small_batch_threshold", 1 << 30)
        packed = coeffs("prefill_packed") if "prefill_packed" in entry else None
        ec = entry.get("engine_costs")
        costs = EngineCosts.from_ms_entry(ec, where=where) if isinstance(ec, dict) else None
        dp = entry.get("decode_padded")
        table = None
        if dp is not None:
            if not (isinstance(dp, list) and dp and all(
                    isinstance(r, list) and len(r) in (3, 4) and all(isinstance(x, (int, float)) for x in r)
                    for r in dp)):
                raise PlannerError(f"{where}: 'decode_padded' must be a list of [rows, a_ms, p_ms, q_ms], got {dp!r}")
            table = tuple(sorted((int(r[0]), r[1] / 1e3, r[2] / 1e3, (r[3] if len(r) > 3 else 0.0) / 1e3)
                                 for r in dp))
        pm = cls(coeffs("prefill"), coeffs("decode_small"), coeffs("decode_large"), int(thr),
                 prefill_packed=packed, engine_costs=costs, decode_padded=table)
        pm.check(where)
        return pm

    def check(self, where: str) -> None:
        """Raise a PlannerError if the coefficients give a non-finite or non-positive step time
        anywhere in the range the simulator uses (a bad fit, e.g. a negative decode slope, would
        otherwise surface as a crash or a nonsense plan deep inside the search). Single
        coefficients may be negative (the published A100 prefill c is); the step times may not."""
        for n in (1, 16, 128, 512, 2048):
            t = self.prefill_time(n, n * n)
            if not (math.isfinite(t) and t > 0):
                raise PlannerError(f"{where}: the prefill model gives {t * 1e3:.4g} ms for one {n}-token "
                                   "prompt; a step time must be positive (check the 'prefill' coefficients)")
        for batch in sorted({1, 2, 8, max(1, self.small_batch_threshold - 1),
                             min(self.small_batch_threshold, 1024), 256, 1024}):
            for ctx in (1, 512, 2048):
                t = self.decode_time(batch * ctx, batch)
                if not (math.isfinite(t) and t > 0):
                    raise PlannerError(
                        f"{where}: the decode model gives {t * 1e3:.4g} ms for a step of {batch} sequences of "
                        f"{ctx} tokens; a step time must be positive (check 'decode_small'/'decode_large')")


@dataclasses.dataclass(frozen=True)
class Profile:
    """A parsed profile JSON: per engine, per model, per tp, a PhaseModel."""

    path: str
    hardware_name: str
    memory_gib: float
    engines: dict[str, dict[str, dict[int, PhaseModel]]]

    def colocated_engine(self) -> str:
        names = [e for e in self.engines if e != DISAGG_ENGINE]
        if not names:
            raise PlannerError(f"{self.path}: no colocated engine entry (only {sorted(self.engines)})")
        return names[0]

    def tps(self, engine: str, model: str) -> list[int]:
        return sorted(self.engines.get(engine, {}).get(model, {}))

    def require_model(self, engine: str, model: str) -> None:
        """Raise a PlannerError naming what is missing if the profile lacks this model."""
        if engine not in self.engines:
            raise PlannerError(f"profile {self.path} has no engine {engine!r} (has {sorted(self.engines)})")
        if model not in self.engines[engine]:
            raise PlannerError(f"profile {self.path} has no layout for model {model!r} in engine {engine!r} "
                               f"(has {sorted(self.engines[engine])})")

    def phase(self, engine: str, model: str, tp: int) -> PhaseModel | None:
        return self.engines.get(engine, {}).get(model, {}).get(tp)


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON in the published DistServe format; errors name the bad field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PlannerError(f"profile {path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlannerError(f"profile {path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("engines"), dict):
        raise PlannerError(f"profile {path}: missing the 'engines' object")
    hw = raw.get("hardware", {})
    engines: dict[str, dict[str, dict[int, PhaseModel]]] = {}
    for eng, models in raw["engines"].items():
        if not isinstance(models, dict):
            raise PlannerError(f"profile {path}: engines.{eng} must be an object")
        for model, tps in models.items():
            if not isinstance(tps, dict):
                raise PlannerError(f"profile {path}: engines.{eng}.{model} must be an object")
            for key, entry in tps.items():
                if not (key.startswith("tp") and key[2:].isdigit()):
                    raise PlannerError(f"profile {path}: engines.{eng}.{model} has key {key!r}, expected 'tpN'")
                if not isinstance(entry, dict):
                    raise PlannerError(f"profile {path}: engines.{eng}.{model}.{key} must be an object")
                pm = PhaseModel.from_ms_entry(entry, where=f"profile {path}: engines.{eng}.{model}.{key}")
                engines.setdefault(eng, {}).setdefault(model, {})[int(key[2:])] = pm
    return Profile(str(path), str(hw.get("name", "unknown")), float(hw.get("memory_gib", 80)), engines)


@dataclasses.dataclass(frozen=True)
class InstanceModel:
    """One instance: its layout, pp=1 phase model, memory, link speed between stages, engine costs."""

    model: ModelConfig
    tp: int
    pp: int
    phase: PhaseModel
    memory_gib: float
    stage_link_bw: float = 300e9  # bytes/s between pipeline stages
    kv_tokens: int | None = None  # KV capacity in tokens, when known (an engine's configured cache)
    costs: EngineCosts = EngineCosts()
    microbatches: int | None = None  # per packed prefill call when pp > 1 (None: pp, the engine's default)

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def _hop(self, tokens: float) -> float:
        return tokens * self.model.hidden_size * DTYPE_BYTES / self.stage_link_bw

    def prefill_call_time(self, sum_l: float, sum_l2: float, n: int = 1) -> float:
        """One prefill step of ``n`` prompts run as a single call through every stage (no micro-batches),
        incl. the hops and the engine's per-step, per-call and per-sequence costs."""
        k = self.costs
        tokens = pow2_bucket(sum_l, k.min_tokens) if k.padded else sum_l
        t = self.phase.packed_time(tokens) if k.padded else self.phase.prefill_time(sum_l, sum_l2)
        return k.prefill_factor * (t + k.call_s + k.seq_s * n) + k.step_s + (self.pp - 1) * self._hop(tokens)

    def packed_call_time(self, lens: Sequence[float]) -> float:
        """The packed prefill call of prompts ``lens`` (with its per-call costs; no step or per-sequence
        cost): pp=1, one call; pp>1, the engine's micro-batches (``split_runs``) in the ``wavefront``
        schedule, each micro-batch's activations received by stages 1..pp-1 before they run."""
        k = self.costs
        n = self.microbatches or self.pp
        durations = []
        for r in split_runs(lens, n if self.pp > 1 else 1):
            part = lens[r.start:r.stop]
            if k.padded:
                tokens = pow2_bucket(sum(part), k.min_tokens)
                work = self.phase.packed_time(tokens)
            else:
                tokens = sum(part)
                work = self.phase.prefill_time(tokens, sum(x * x for x in part))
            stage = k.prefill_factor * work / self.pp
            durations.append([stage] + [stage + self._hop(tokens)] * (self.pp - 1))
        return wavefront(durations)[-1][-1][1] + k.prefill_factor * k.call_s * len(durations)

    def prefill_step_time(self, lens: Sequence[float]) -> float:
        """One prefill step of prompts ``lens`` (a batch; order as scheduled), as the engine runs it:
        the packed call plus the per-step and per-sequence costs."""
        k = self.costs
        return self.packed_call_time(lens) + k.prefill_factor * k.seq_s * len(lens) + k.step_s

    def chunk_call_time(self, tokens: int, context: int) -> float:
        """One prompt chunk of ``tokens`` after a cached prefix, ``context`` keys in all (no step cost).

        Padded: the call is ``[1, Q]`` queries over ``blocks x block_size`` keys, both bucketed."""
        k = self.costs
        if k.padded:
            a, b, c = self.phase.prefill_packed or self.phase.prefill
            q = pow2_bucket(tokens, k.min_tokens)
            keys = pow2_bucket(-(-context // k.block_size), k.min_blocks) * k.block_size
            return k.prefill_factor * (a + b * q + c * q * keys + k.call_s) + (self.pp - 1) * self._hop(q)
        _, b, c = self.phase.prefill
        return k.prefill_factor * (b * tokens + c * tokens * context) + (self.pp - 1) * self._hop(tokens)

    def decode_lane_coeffs(self, batch: int) -> tuple[float, float, float]:
        """(a, b, c) of one decode step of the instance's batch (its one lane): the pp=1 time plus the
        (pp-1) hops, plus the engine's per-step and per-call costs in ``a``."""
        a, b, c = self.phase.decode_coeffs(batch)
        f = self.costs.decode_factor
        a, b, c = f * (a + self.costs.call_s), f * b, f * c
        if self.pp > 1:
            c = c + (self.pp - 1) * self._hop(1.0)
        return a + self.costs.step_s, b, c

    def padded_decode_coeffs(self, rows: int) -> tuple[float, float, float]:
        """(a, p, q) of one padded decode step (``rows`` rows; p per token of the longest context, q per
        context token in the batch), with the engine's per-step and per-call costs in ``a``."""
        a, p, q = self.phase.padded_decode(rows)
        f = self.costs.decode_factor
        a, p, q = f * (a + self.costs.call_s), f * p, f * q
        if self.pp > 1:
            a += (self.pp - 1) * self._hop(rows)
        return a + self.costs.step_s, p, q

    def decode_batch(self) -> DecodeBatch:
        """An empty decode batch with this instance's step model."""
        return DecodeBatch(self.decode_lane_coeffs, padded=self.padded_decode_coeffs if self.costs.padded else None,
                           per_seq=self.costs.decode_factor * self.costs.seq_s)

    def weight_bytes(self) -> float:
        return float(self.model.num_params()) * DTYPE_BYTES

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the whole instance can hold after weights and workspace (or ``kv_tokens``)."""
        if self.kv_tokens is not None:
            return self.kv_tokens
        usable = self.devices * (self.memory_gib * 2**30 * GPU_MEM_UTIL - ACTIVATION_RESERVE_BYTES)
        free = usable - self.weight_bytes()
        return max(0, int(free // self.model.kv_bytes_per_token(DTYPE_BYTES)))

    def fits(self, min_tokens: int) -> bool:
        """Weights fit and at least ``min_tokens`` of KV fit beside them."""
        return self.kv_capacity_tokens() >= min_tokens


def kv_transfer_time(model: ModelConfig, prompt_len: float, link_bw: float, parallel_links: int = 1) -> float:
    """Seconds to move one request's KV (all layers) over ``parallel_links`` links of ``link_bw`` B/s."""
    return prompt_len * model.kv_bytes_per_token(DTYPE_BYTES) / (link_bw * parallel_links)
