"""Hardware specs and the analytic latency model for hardware without a profile.

    HardwareSpec (peak FLOP/s, HBM bandwidth, links, memory) + ModelConfig + tp
        --analytic_phase()-->  PhaseModel (same a/b/c form as a measured profile)

Roofline-style terms, each divided by tp, with efficiency factors:
  prefill:  a = weight read + per-layer launch/all-reduce latency
            b = 2 * P_layers FLOPs/token at ``mfu`` + all-reduce bytes/token over the link
            c = 4 * layers * hidden FLOPs per (token x context) at ``attn_eff`` of peak
  decode:   a = weight read at ``bw_eff`` of HBM bandwidth + per-layer latency
            b = KV bytes per context token read at ``bw_eff``
            c = 2 * P FLOPs per sequence (incl. lm_head) at ``mfu`` + all-reduce bytes/seq
The efficiencies default to values that put OPT-13B/66B on A100-80GB within about
a factor 1.5 of the published profile; docs/planner.md has the comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxserve.config import ModelConfig

from .errors import PlannerError
from .latency import DTYPE_BYTES, PhaseModel


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One accelerator type and its links. Bandwidths in bytes/s, FLOP/s dense fp16/bf16."""

    name: str
    peak_flops: float
    mem_bw: float
    memory_gib: float
    intra_node_bw: float  # per-direction device-to-device (NVLink)
    inter_node_bw: float  # per device across nodes (NIC)
    mfu: float = 0.75
    attn_eff: float = 0.25
    bw_eff: float = 0.8
    layer_latency: float = 30e-6  # s per layer per step (launches, all-reduce latency)

    def __post_init__(self) -> None:
        for f in ("peak_flops", "mem_bw", "memory_gib", "intra_node_bw", "inter_node_bw",
                  "mfu", "attn_eff", "bw_eff"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise PlannerError(f"hardware {self.name!r}: {f} must be a positive number, got {v!r}")


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "a100-80g": HardwareSpec("a100-80g", 312e12, 2.039e12, 80, 300e9, 25e9),
    "h100-80g": HardwareSpec("h100-80g", 989e12, 3.35e12, 80, 450e9, 50e9),
    "h200": HardwareSpec("h200", 989e12, 4.8e12, 141, 450e9, 50e9),
}
# names a profile's "hardware.name" may carry -> preset supplying its link speeds
_PROFILE_HW_ALIASES = {"a100-80gb-sxm": "a100-80g", "a100-80gb": "a100-80g", "h100-80gb-sxm": "h100-80g"}


def hardware_spec(name_or_path: str) -> HardwareSpec:
    """A preset by name, or a JSON file with HardwareSpec's fields."""
    key = name_or_path.lower()
    if key in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[key]
    if key in _PROFILE_HW_ALIASES:
        return HARDWARE_PRESETS[_PROFILE_HW_ALIASES[key]]
    path = Path(name_or_path)
    if not path.is_file():
        raise PlannerError(f"unknown hardware {name_or_path!r}; presets: {', '.join(HARDWARE_PRESETS)} "
                           "or a JSON file with HardwareSpec fields")
    try:
        d = json.loads(path.read_text())
        return HardwareSpec(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise PlannerError(f"hardware file {path}: {e}") from e


def analytic_phase(model: ModelConfig, tp: int, hw: HardwareSpec) -> PhaseModel:
    """Analytic a/b/c coefficients (seconds) for one instance of ``tp`` devices at pp=1."""
    L, h = model.num_hidden_layers, model.hidden_size
    embed = model.vocab_size * model.word_embed_proj_dim + (model.max_position_embeddings + 2) * h
    p_layers = model.num_params() - embed
    weight_bytes = model.num_params() * DTYPE_BYTES
    flops = hw.peak_flops * tp
    # two all-reduces of hidden activations per layer; ring all-reduce moves 2(tp-1)/tp of the data
    ar_bytes_per_token = 0.0 if tp == 1 else 2 * L * h * DTYPE_BYTES * 2 * (tp - 1) / tp
    ar_time_per_token = ar_bytes_per_token / hw.intra_node_bw
    fixed = L * hw.layer_latency * (2.0 if tp > 1 else 1.0)
    w_read = weight_bytes / (tp * hw.mem_bw * hw.bw_eff)
    prefill = (w_read + fixed, 2 * p_layers / (flops * hw.mfu) + ar_time_per_token,
               4 * L * h / (flops * hw.attn_eff))
    decode = (w_read + fixed, model.kv_bytes_per_token(DTYPE_BYTES) / (tp * hw.mem_bw * hw.bw_eff),
              2 * (p_layers + model.vocab_size * h) / (flops * hw.mfu) + ar_time_per_token)
    return PhaseModel(prefill, decode, decode, 1 << 30, source="analytic")
