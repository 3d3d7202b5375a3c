"""Latency model of one instance layout, from a profile JSON or the analytic model.

    profile JSON (ms, pp=1 per tp)  --load_profile()-->  Profile
    Profile.phase(engine, model, tp) -->  PhaseModel (seconds; pp=1)
    hardware spec + model shape  --planner.hardware.analytic_phase()-->  PhaseModel
    PhaseModel + (tp, pp) + link bandwidth  -->  InstanceModel  --> simulator

Formulas (profile header): prefill batch time = a + b*sum(l) + c*sum(l^2);
decode step time = a + b*sum(context) + c*batch, with 'small' coefficients when
batch < small_batch_threshold and 'large' ones otherwise.

Pipeline stages (an assumption, the profile only covers pp=1): a pp-stage instance
runs 1/pp of the layers per stage, so every term of the pp=1 time divides by pp per
stage, plus sending the activations (hidden_size x 2 bytes per token) to the next
stage over the link. A prefill batch therefore takes ~T end to end but a new batch
can enter every T/pp. A pp-stage decode instance keeps pp micro-batches in flight:
it behaves as pp independent "lanes", each with the pp=1 step time (plus the hops)
and 1/pp of the instance's KV capacity.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxserve.config import ModelConfig

from .errors import PlannerError

DISAGG_ENGINE = "disaggregated_engine"
DTYPE_BYTES = 2  # fp16/bf16 weights and KV, as in the profiled runs
GPU_MEM_UTIL = 0.9  # share of device memory usable for weights + KV
ACTIVATION_RESERVE_BYTES = 2 * 2**30  # per device, for activations and workspace


@dataclasses.dataclass(frozen=True)
class PhaseModel:
    """Iteration-time coefficients (seconds) of one engine/model/tp entry at pp=1."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    small_batch_threshold: int
    source: str = "profile"  # "profile" or "analytic"

    def prefill_time(self, sum_l: float, sum_l2: float) -> float:
        a, b, c = self.prefill
        return a + b * sum_l + c * sum_l2

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
        return cls(coeffs("prefill"), coeffs("decode_small"), coeffs("decode_large"), int(thr))


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
    """One instance: its layout, pp=1 phase model, memory, and link speed between stages."""

    model: ModelConfig
    tp: int
    pp: int
    phase: PhaseModel
    memory_gib: float
    stage_link_bw: float = 300e9  # bytes/s between pipeline stages

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def _hop(self, tokens: float) -> float:
        return tokens * self.model.hidden_size * DTYPE_BYTES / self.stage_link_bw

    def prefill_stage_time(self, sum_l: float, sum_l2: float) -> float:
        """Time one prefill batch occupies each pipeline stage (incl. the send onward)."""
        t = self.phase.prefill_time(sum_l, sum_l2) / self.pp
        return t + (self._hop(sum_l) if self.pp > 1 else 0.0)

    def decode_lane_coeffs(self, batch: int) -> tuple[float, float, float]:
        """(a, b, c) of one decode lane's step time: pp=1 time plus the (pp-1) hops."""
        a, b, c = self.phase.decode_coeffs(batch)
        if self.pp > 1:
            c = c + (self.pp - 1) * self._hop(1.0)
        return a, b, c

    def weight_bytes(self) -> float:
        return float(self.model.num_params()) * DTYPE_BYTES

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the whole instance can hold after weights and workspace."""
        usable = self.devices * (self.memory_gib * 2**30 * GPU_MEM_UTIL - ACTIVATION_RESERVE_BYTES)
        free = usable - self.weight_bytes()
        return max(0, int(free // self.model.kv_bytes_per_token(DTYPE_BYTES)))

    def fits(self, min_tokens: int) -> bool:
        """Weights fit and at least ``min_tokens`` of KV fit beside them."""
        return self.kv_capacity_tokens() >= min_tokens


def kv_transfer_time(model: ModelConfig, prompt_len: float, link_bw: float, parallel_links: int = 1) -> float:
    """Seconds to move one request's KV (all layers) over ``parallel_links`` links of ``link_bw`` B/s."""
    return prompt_len * model.kv_bytes_per_token(DTYPE_BYTES) / (link_bw * parallel_links)
