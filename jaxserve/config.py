"""Frozen, validated configuration records.

YAML files under ``configs/`` and HF ``config.json`` files only *feed* these
dataclasses; everything downstream (model, engine, planner) reads the dataclass.

    configs/models/opt-13b.yaml --model_preset()-->  ModelConfig
    <hf folder>/config.json     --from_hf_dict()-->  ModelConfig
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_PRESETS_DIR = CONFIGS_DIR / "models"

_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of an OPT decoder-only model (field names follow HF ``OPTConfig``)."""

    name: str = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    word_embed_proj_dim: int = 768
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    # HF drops the final layer norm for post-LN models (OPT-350m) and when asked to.
    remove_final_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    dtype: str = "float32"  # parameter and activation dtype

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "ffn_dim", "word_embed_proj_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model config {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model config {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model config {self.name!r}: dtype must be one of {_DTYPES}, got {self.dtype!r}")

    # ---- derived shape facts -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_project(self) -> bool:
        """OPT-350m style: embeddings live in a smaller space and are projected in/out."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of K and V for one token across all layers."""
        b = dtype_bytes if dtype_bytes is not None else (4 if self.dtype == "float32" else 2)
        return 2 * self.num_hidden_layers * self.hidden_size * b

    def num_params(self) -> int:
        """Parameter count by the HF OPT formula (tied lm_head counted once)."""
        d, f, w = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim
        n = self.vocab_size * w + (self.max_position_embeddings + 2) * d
        if self.has_project:
            n += 2 * d * w  # project_in / project_out have no bias
        if self.has_final_layer_norm:
            n += 2 * d
        per_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * f + f) + (f * d + d)
        return n + self.num_hidden_layers * per_layer

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- constructors --------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json", name: str | None = None,
                     dtype: str = "float32") -> ModelConfig:
        """Build from a Hugging Face OPT ``config.json`` dict; rejects non-OPT configs."""
        model_type = d.get("model_type")
        if model_type != "opt":
            raise ConfigError(f"{source}: model_type is {model_type!r}, jaxserve serves only 'opt' models")
        act = d.get("activation_function", "relu")
        if act != "relu":
            raise ConfigError(f"{source}: activation_function {act!r} is not supported (OPT uses 'relu')")
        if d.get("enable_bias", True) is False or d.get("layer_norm_elementwise_affine", True) is False:
            raise ConfigError(f"{source}: OPT variants without biases or affine layer norms are not supported")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size")
                   if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        hidden = d["hidden_size"]
        return cls(
            name=name or d.get("_name_or_path") or "opt",
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            ffn_dim=d["ffn_dim"],
            word_embed_proj_dim=d.get("word_embed_proj_dim") or hidden,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            do_layer_norm_before=d.get("do_layer_norm_before", True),
            remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
            pad_token_id=d.get("pad_token_id", 1),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 2),
            dtype=dtype,
        )


def ensure_host_devices(n: int) -> None:
    """On a CPU host, expose ``n`` virtual devices for a multi-instance deployment.

    Must run before jax initialises; an explicit device count in XLA_FLAGS wins."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(n, 1)}".strip()


def list_model_presets() -> list[str]:
    """Names of the OPT presets shipped in ``configs/models``."""
    return sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml"))


def model_preset(name: str, *, dtype: str = "float32") -> ModelConfig:
    """Load a published OPT shape by name (``opt-125m`` ... ``opt-175b``)."""
    path = MODEL_PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(list_model_presets())}")
    with open(path) as f:
        d = yaml.safe_load(f)
    return ModelConfig.from_dict({**d, "dtype": dtype}, source=str(path))


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file, turning parse errors into a ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


MODES = ("colocated", "chunked", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One engine instance: scheduling limits, KV cache size and shape buckets.

    ``mode``: ``colocated`` (prefill-first continuous batching), ``chunked``
    (Sarathi-style chunked prefill), ``prefill`` / ``decode`` (disaggregated roles).
    KV capacity: ``num_blocks`` if given, else ``kv_cache_gb`` of KV, else enough for
    ``max_num_seqs`` full-length sequences, or ``workload_blocks`` when fewer (an offline batch's
    requests at once), capped by device memory where known.
    """

    mode: str = "colocated"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # default: max_model_len (chunked: 512)
    max_model_len: int | None = None  # default: the model's max positions
    kv_cache_gb: float | None = None
    num_blocks: int | None = None
    workload_blocks: int | None = None  # the most KV blocks the workload can use at once (offline: known)
    tp: int = 1
    pp: int = 1
    attention: str = "auto"  # auto (Pallas on GPU, native kernel else XLA on CPU) | xla | native | pallas | pallas-interpret
    prefix_caching: bool = True  # automatic prefix caching (colocated, chunked and prefill instances)

    def __post_init__(self) -> None:
        if self.attention not in ("auto", "xla", "native", "pallas", "pallas-interpret"):
            raise ConfigError(f"attention must be auto, xla, native, pallas or pallas-interpret, got {self.attention!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        for f in ("block_size", "max_num_seqs", "tp", "pp"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        for f in ("max_num_batched_tokens", "max_model_len", "num_blocks", "workload_blocks"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ConfigError(f"kv_cache_gb must be positive, got {self.kv_cache_gb!r}")

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        n = self.max_model_len or model.max_position_embeddings
        if n > model.max_position_embeddings:
            raise ConfigError(f"max_model_len {n} exceeds the model's {model.max_position_embeddings} positions")
        return n

    def resolved_batched_tokens(self, model: ModelConfig) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 512 if self.mode == "chunked" else self.resolved_max_model_len(model)


ROLES = ("prefill", "decode", "colocated")
_INSTANCE_ENGINE_KEYS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_gb",
                         "num_blocks", "workload_blocks", "attention", "prefix_caching")


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One kind of instance in a deployment: role, layout, replicas, optional device ids, engine limits."""

    role: str
    tp: int = 1
    pp: int = 1
    replicas: int = 1
    devices: tuple[int, ...] | None = None  # explicit device ids for all replicas, in order
    engine: tuple[tuple[str, Any], ...] = ()  # EngineConfig overrides
    # plan JSON: per replica, the cluster node of each pipeline stage ([[0], [1]]: replica 0 on node 0, ...)
    nodes: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"instance role must be one of {ROLES}, got {self.role!r}")
        for f in ("tp", "pp", "replicas"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"instance {self.role}: {f} must be a positive integer, got {v!r}")
        if self.nodes is not None:
            if len(self.nodes) != self.replicas or any(
                    len(r) != self.pp or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in r)
                    for r in self.nodes):
                raise ConfigError(f"instance {self.role}: nodes must list, per replica ({self.replicas}), "
                                  f"the non-negative node index of each of its {self.pp} stage(s); got {self.nodes!r}")
        if self.devices is not None and len(self.devices) != self.tp * self.pp * self.replicas:
            raise ConfigError(f"instance {self.role}: {len(self.devices)} device ids given, tp*pp*replicas = "
                              f"{self.tp * self.pp * self.replicas}")

    def engine_config(self, mode_for_colocated: str = "colocated", **defaults: Any) -> EngineConfig:
        """This instance's engine limits; a colocated instance runs ``mode_for_colocated`` unless its
        own ``mode`` (colocated | chunked, e.g. from a chunked plan) says otherwise."""
        own = dict(self.engine)
        mode = own.pop("mode", mode_for_colocated) if self.role == "colocated" else self.role
        return EngineConfig(mode=mode, tp=self.tp, pp=self.pp, **{**defaults, **own})


def _engine_overrides(item: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """An instance item's engine limits, and ``mode`` (colocated | chunked) for a colocated instance."""
    out = tuple((k, item[k]) for k in _INSTANCE_ENGINE_KEYS if k in item)
    if "mode" in item:
        if item.get("role") != "colocated" or item["mode"] not in ("colocated", "chunked"):
            raise ConfigError(f"mode {item['mode']!r}: only a colocated instance takes a mode, colocated or chunked")
        out += (("mode", item["mode"]),)
    return out


def _nodes(raw: Any) -> tuple[tuple[int, ...], ...] | None:
    """A plan's ``nodes`` ([[node per stage] per replica]; a flat [n, ...] means one stage each)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ConfigError(f"nodes must be a list, got {raw!r}")
    return tuple(tuple(r) if isinstance(r, list) else (r,) for r in raw)


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """What instances to run. Fed by a deployment YAML (``configs/deploy/``) or the planner's plan JSON."""

    instances: tuple[InstanceSpec, ...]
    model: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        roles = [i.role for i in self.instances]
        if not roles:
            raise ConfigError("a deployment needs at least one instance")
        if "colocated" in roles and len(set(roles)) > 1:
            raise ConfigError("a deployment is either colocated or disaggregated (prefill + decode), not both")
        if "colocated" not in roles and not ("prefill" in roles and "decode" in roles):
            raise ConfigError(f"a disaggregated deployment needs prefill and decode instances, got {roles}")

    @property
    def num_devices(self) -> int:
        return sum(i.tp * i.pp * i.replicas for i in self.instances)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<deployment>") -> DeploymentConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        if d.get("feasible") is False:
            raise ConfigError(f"{source}: the plan is not feasible ({d.get('reason', 'no reason given')})")
        allowed = {"instances", "model", "dtype"}
        is_plan = "per_device_goodput" in d  # a planner plan carries many more fields; read what we need
        unknown = sorted(set(d) - allowed)
        if unknown and not is_plan:
            raise ConfigError(f"{source}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        raw = d.get("instances")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{source}: 'instances' must be a non-empty list")
        specs = []
        for n, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ConfigError(f"{source}: instances[{n}] must be a mapping")
            keys = {"role", "tp", "pp", "replicas", "devices", "nodes", "mode", *_INSTANCE_ENGINE_KEYS}
            extra = sorted(set(item) - keys)
            if extra and not is_plan:
                raise ConfigError(f"{source}: instances[{n}] has unknown keys {extra}")
            try:
                specs.append(InstanceSpec(
                    role=item.get("role"), tp=item.get("tp", 1), pp=item.get("pp", 1),
                    replicas=item.get("replicas", 1),
                    devices=tuple(item["devices"]) if item.get("devices") is not None else None,
                    nodes=_nodes(item.get("nodes")),
                    engine=_engine_overrides(item)))
            except ConfigError as e:
                raise ConfigError(f"{source}: instances[{n}]: {e}") from e
        return cls(tuple(specs), model=d.get("model") if not is_plan else None, dtype=d.get("dtype", "float32"))

    @classmethod
    def load(cls, path: str | Path) -> DeploymentConfig:
        """A deployment YAML, or a plan JSON written by ``python -m planner``."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: deployment file not found")
        try:
            d = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot parse ({e})") from e
        return cls.from_dict(d, source=str(path))
