"""Hugging Face OPT folders -> (ModelConfig, params pytree of numpy arrays), and back.

    <dir>/config.json                                   -> ModelConfig (rejects non-OPT)
    <dir>/model.safetensors                             \
    <dir>/model.safetensors.index.json + shards          |-> {hf name: array} -> convert() -> params
    <dir>/pytorch_model.bin (+ .index.json + shards)    /        (torch [out, in] transposed to x @ W)

Safetensors are read with a small memory-mapped reader of our own (any dtype,
bfloat16 included, no torch); ``.bin`` files need torch and say so if it is
missing. Every problem (missing folder, non-OPT config, missing key, wrong shape,
unreadable file) raises one ``CheckpointError`` naming the file and the problem;
no partial model is returned. ``export_hf`` writes our params back out as an HF
folder (the demo model uses it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.memory import check_weights_fit, host_memory
from jaxserve.model.opt import Params, is_shape_tuple, param_shapes


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ---- reading tensors -----------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file into {name: array} (read-only views)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        lo, hi = info["data_offsets"]
        if hi > mm.size:
            raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
        out[name] = mm[lo:hi].view(dt).reshape(info["shape"])
    return out


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch (pip install torch), "
                              "or convert the folder to safetensors") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt pickles
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    out = {}
    for k, t in sd.items():
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_hf_tensors(model_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """All tensors of an HF folder, plus the file each came from (for error messages)."""
    candidates: list[tuple[str, Callable[[Path], dict[str, np.ndarray]]]] = [
        ("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch_bin)]
    for single, reader in candidates:
        index = model_dir / f"{single}.index.json"
        if (model_dir / single).is_file():
            files = [model_dir / single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file (need a 'weight_map' object: {e})") from e
            files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        else:
            continue
        tensors: dict[str, np.ndarray] = {}
        origin: dict[str, Path] = {}
        for f in files:
            for k, v in reader(f).items():
                tensors[k] = v
                origin[k] = f
        return tensors, origin
    raise CheckpointError(f"{model_dir}: no weights found (expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


# ---- HF names <-> our pytree ---------------------------------------------------------------

def _hf_layout(cfg: ModelConfig) -> list[tuple[str, tuple[Any, ...], Callable, Callable]]:
    """(hf name, our path, hf->ours, ours->hf) for every parameter."""
    d, h, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim

    def ident(x: np.ndarray) -> np.ndarray:
        return x

    def t(x: np.ndarray) -> np.ndarray:
        return x.T

    entries: list[tuple[str, tuple[Any, ...], Callable, Callable]] = [
        ("decoder.embed_tokens.weight", ("embed_tokens",), ident, ident),
        ("decoder.embed_positions.weight", ("embed_positions",), ident, ident),
    ]
    if cfg.has_project:
        entries += [("decoder.project_in.weight", ("project_in",), t, t),
                    ("decoder.project_out.weight", ("project_out",), t, t)]
    if cfg.has_final_layer_norm:
        entries += [("decoder.final_layer_norm.weight", ("final_layer_norm", "scale"), ident, ident),
                    ("decoder.final_layer_norm.bias", ("final_layer_norm", "bias"), ident, ident)]
    for i in range(cfg.num_hidden_layers):
        pre = f"decoder.layers.{i}."
        lp = ("layers", i)
        for hf_ln, ours in (("self_attn_layer_norm", "attn_ln"), ("final_layer_norm", "ffn_ln")):
            entries += [(f"{pre}{hf_ln}.weight", (*lp, ours, "scale"), ident, ident),
                        (f"{pre}{hf_ln}.bias", (*lp, ours, "bias"), ident, ident)]
        for proj in ("q", "k", "v"):
            entries += [
                (f"{pre}self_attn.{proj}_proj.weight", (*lp, proj, "kernel"),
                 lambda x: x.T.reshape(d, h, dh), lambda x: x.reshape(d, h * dh).T),
                (f"{pre}self_attn.{proj}_proj.bias", (*lp, proj, "bias"),
                 lambda x: x.reshape(h, dh), lambda x: x.reshape(h * dh)),
            ]
        entries += [
            (f"{pre}self_attn.out_proj.weight", (*lp, "o", "kernel"),
             lambda x: x.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T),
            (f"{pre}self_attn.out_proj.bias", (*lp, "o", "bias"), ident, ident),
            (f"{pre}fc1.weight", (*lp, "fc1", "kernel"), t, t),
            (f"{pre}fc1.bias", (*lp, "fc1", "bias"), ident, ident),
            (f"{pre}fc2.weight", (*lp, "fc2", "kernel"), t, t),
            (f"{pre}fc2.bias", (*lp, "fc2", "bias"), ident, ident),
        ]
    return entries


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def _normalise_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def convert_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                       origin: dict[str, Path] | None = None, source: str = "checkpoint") -> Params:
    """HF-named tensors -> our params pytree (numpy, in ``cfg.dtype``); validates every key and shape."""
    origin = origin or {}
    by_name = {_normalise_name(k): k for k in tensors}
    shapes = param_shapes(cfg)
    params: Params = _empty_like(shapes)
    dtype = _NP_DTYPES[cfg.dtype]
    missing = []
    for hf_name, path, to_ours, _ in _hf_layout(cfg):
        raw_name = by_name.get(hf_name)
        if raw_name is None:
            missing.append(hf_name)
            continue
        arr = tensors[raw_name]
        want = _get(shapes, path)
        where = origin.get(raw_name, source)
        try:
            converted = to_ours(arr)
        except ValueError as e:
            raise CheckpointError(f"{where}: tensor {raw_name!r} has shape {tuple(arr.shape)}, "
                                  f"which does not fit the config ({e})") from e
        if tuple(converted.shape) != want:
            raise CheckpointError(f"{where}: tensor {raw_name!r} has shape {tuple(arr.shape)}; the config "
                                  f"needs {want} after conversion")
        _set(params, path, np.ascontiguousarray(converted.astype(dtype, copy=False)))  # no copy when it fits
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")
    return params


def _empty_like(shapes: Any) -> Any:
    if isinstance(shapes, dict):
        return {k: _empty_like(v) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [_empty_like(v) for v in shapes]
    assert is_shape_tuple(shapes)
    return None


def params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> HF-named float arrays (``model.`` prefix, as ``save_pretrained`` writes)."""
    return {f"model.{hf}": np.ascontiguousarray(np.asarray(to_hf(np.asarray(_get(params, path)))))
            for hf, path, _, to_hf in _hf_layout(cfg)}


# ---- folders -----------------------------------------------------------------------------

def load_hf_config(model_dir: str | Path, dtype: str = "float32") -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a Hugging Face model folder needs config.json)")
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    try:
        return ModelConfig.from_hf_dict(d, source=str(cfg_path), name=d.get("_name_or_path") or model_dir.name,
                                         dtype=dtype)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def load_hf_checkpoint(model_dir: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Load an HF OPT folder into (config, numpy params). Raises CheckpointError, never returns partial."""
    model_dir = Path(model_dir)
    cfg = load_hf_config(model_dir, dtype)
    check_weights_fit(cfg, host_memory())  # before reading: a clear error, not the kernel's OOM killer
    tensors, origin = read_hf_tensors(model_dir)
    return cfg, convert_hf_tensors(tensors, cfg, origin, source=str(model_dir))


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the HF OPT layout."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = {
        "_name_or_path": cfg.name, "model_type": "opt", "architectures": ["OPTForCausalLM"], "activation_function": "relu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "ffn_dim": cfg.ffn_dim, "word_embed_proj_dim": cfg.word_embed_proj_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "do_layer_norm_before": cfg.do_layer_norm_before, "_remove_final_layer_norm": cfg.remove_final_layer_norm,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    tensors = {k: v.astype(np.float32) for k, v in params_to_hf(params, cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
