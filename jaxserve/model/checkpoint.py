"""Converted-params checkpoints (orbax) and the one ``load_model`` entry point.

    HF folder --load_hf_checkpoint--> params --save_converted--> <out>/params (orbax) + jaxserve_model.json
    <out> --restore_converted(shardings?)--> params, placed straight onto the target devices

``load_model(spec)`` accepts the demo model name, an HF OPT folder, or a folder
written by ``save_converted`` (so a 66B model converts once), and returns the
config, params and the folder the tokenizer lives in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.memory import check_weights_fit, measure_memory
from jaxserve.model.loader import CheckpointError, load_hf_checkpoint
from jaxserve.model.opt import Params, abstract_params

CONVERTED_MARKER = "jaxserve_model.json"


def save_converted(params: Params, cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Save params with orbax next to the model config; returns the folder."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out / "params", params, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    (out / CONVERTED_MARKER).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return out


def restore_converted(ckpt_dir: str | Path, shardings: Any = None, dtype: str | None = None
                      ) -> tuple[ModelConfig, Params]:
    """Restore params saved by ``save_converted``; ``shardings`` (a matching pytree) places them."""
    import orbax.checkpoint as ocp

    d = Path(ckpt_dir).absolute()
    marker = d / CONVERTED_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing (not a jaxserve converted checkpoint)")
    cfg = ModelConfig.from_dict(json.loads(marker.read_text()), source=str(marker))
    if dtype is not None and dtype != cfg.dtype:
        raise CheckpointError(f"{d}: saved as {cfg.dtype}, asked for {dtype}; convert again from the HF folder")
    if shardings is None:  # everything lands on the default device: check it can hold the weights
        check_weights_fit(cfg, measure_memory(jax.devices()[:1]))
    target = abstract_params(cfg)
    if shardings is not None:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    ckpt = ocp.StandardCheckpointer()
    try:
        params = ckpt.restore(d / "params", target)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{d / 'params'}: cannot restore ({e})") from e
    finally:
        ckpt.close()
    return cfg, params


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    params: Params  # numpy (HF) or jax arrays (orbax)
    tokenizer_dir: Path | None  # where tokenizer files live, if any
    source: str


def load_model(spec: str | Path | None, dtype: str = "float32") -> LoadedModel:
    """``None``/"demo" -> built-in demo model; an HF folder; or a converted (orbax) folder."""
    from jaxserve.model import demo

    if spec is None or str(spec) == demo.DEMO_NAME:
        path = demo.ensure_demo_model()
        cfg, params = load_hf_checkpoint(path, dtype)
        return LoadedModel(cfg, params, path, demo.DEMO_NAME)
    path = Path(spec)
    if (path / CONVERTED_MARKER).is_file():
        cfg, params = restore_converted(path, dtype=dtype)
        return LoadedModel(cfg, params, path if _has_tokenizer(path) else None, str(path))
    cfg, params = load_hf_checkpoint(path, dtype)
    return LoadedModel(cfg, params, path if _has_tokenizer(path) else None, str(path))


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


def tree_equal(a: Params, b: Params) -> bool:
    """Exact equality of two params pytrees (structure, shapes, dtypes and values)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True))
