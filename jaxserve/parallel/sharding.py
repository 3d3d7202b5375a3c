"""Every sharding in jaxserve comes from one logical-axis table.

    param path --param_logical_axes()--> logical axes ("heads", "mlp", "vocab", None ...)
    logical axes --LOGICAL_AXIS_RULES--> mesh axes ("tp" or replicated) --> NamedSharding on a ('pp','tp') mesh

Megatron-style tensor parallelism falls out of the table: Q/K/V and FC1 are
column-parallel (output heads / mlp split over ``tp``), the attention output
projection and FC2 are row-parallel (input heads / mlp split), embeddings and
the tied lm_head split the vocabulary. The KV cache splits heads. XLA inserts
the all-reduces. Layer norms, position embeddings and biases of row-parallel
layers are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ModelConfig
from jaxserve.model.opt import Params, is_shape_tuple, param_shapes

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "heads": "tp",
    "mlp": "tp",
    "vocab": "tp",
    "embed": None,
    "head_dim": None,
    "positions": None,
    "layers": None,
    "blocks": None,
    "block_slot": None,
}

# leaf name (last two path keys) -> logical axes of the array
_PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("q", "kernel"): ("embed", "heads", "head_dim"),
    ("k", "kernel"): ("embed", "heads", "head_dim"),
    ("v", "kernel"): ("embed", "heads", "head_dim"),
    ("q", "bias"): ("heads", "head_dim"),
    ("k", "bias"): ("heads", "head_dim"),
    ("v", "bias"): ("heads", "head_dim"),
    ("o", "kernel"): ("heads", "head_dim", "embed"),
    ("o", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"),
    ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"),
    ("fc2", "bias"): ("embed",),
}
_TOP_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "embed_positions": ("positions", "embed"),
    "project_in": ("embed", "embed"),
    "project_out": ("embed", "embed"),
}
KV_AXES = ("blocks", "block_slot", "heads", "head_dim")  # [N, bs, H, Dh]


def make_mesh(devices: Sequence[jax.Device], tp: int, pp: int = 1) -> Mesh:
    """A ('pp', 'tp') mesh over exactly tp * pp devices (stage-major)."""
    if len(devices) != tp * pp:
        raise ValueError(f"a tp={tp} x pp={pp} mesh needs {tp * pp} devices, got {len(devices)}")
    return Mesh(np.array(devices, dtype=object).reshape(pp, tp), ("pp", "tp"))


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    return PartitionSpec(*(LOGICAL_AXIS_RULES.get(a) if a is not None else None for a in axes))


def _leaf_axes(path: tuple[Any, ...], ndim: int) -> tuple[str | None, ...]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if len(keys) >= 2 and (keys[-2], keys[-1]) in _PARAM_AXES:
        return _PARAM_AXES[(keys[-2], keys[-1])]
    if keys and keys[0] in _TOP_AXES:
        return _TOP_AXES[keys[0]]
    return (None,) * ndim  # layer norms: replicated


def param_logical_axes(cfg: ModelConfig) -> Params:
    """The params pytree with a tuple of logical axis names at each leaf."""
    shapes = param_shapes(cfg)
    return jax.tree_util.tree_map_with_path(lambda p, s: _leaf_axes(p, len(s)), shapes, is_leaf=is_shape_tuple)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError if the model cannot be split ``tp`` ways."""
    for what, n in (("num_attention_heads", cfg.num_attention_heads), ("ffn_dim", cfg.ffn_dim),
                    ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide {cfg.name} {what}={n}")


def param_shardings(cfg: ModelConfig, mesh: Mesh, params: Params | None = None) -> Params:
    """NamedShardings for ``params`` (or the full model) on ``mesh``, from the logical table."""
    check_tp(cfg, mesh.shape["tp"])
    axes = param_logical_axes(cfg)
    if params is not None:  # a pipeline stage holds a subset of the layers / top-level entries
        axes = _restrict(axes, params)
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, logical_to_spec(a)), axes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def _restrict(axes: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _restrict(axes[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_restrict(axes[0], v) for v in like]  # every layer has the same axes
    return axes


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(KV_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
