"""The built-in demo model, named ``jaxserve-demo-opt`` everywhere it shows up.

It lets the main job run on a fresh machine with no download. Shipped in the package
(``demo_weights/``): a ~2.5M-parameter OPT trained once by ``scripts/train_demo_model.py`` on the
standard library's docstrings, which answers in English-like words. Without that folder (a
source tree where it was not trained), a tiny random-weight OPT plus a small trained tokenizer,
which produces gibberish:

    DEMO_CONFIG + numpy RNG(seed) --export_hf--> ~/.cache/jaxserve/<name>/ (config.json, model.safetensors)
    demo_data.train_demo_tokenizer() ---------->              "               (tokenizer.json, ...)

The folder is an ordinary HF OPT folder, so the demo goes through the same
loading path as a real checkpoint. It is written once (atomically) and reused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.loader import export_hf
from jaxserve.model.opt import Params, is_shape_tuple, param_shapes
from jaxserve.paths import cache_root

DEMO_NAME = "jaxserve-demo-opt"
DEMO_VERSION = 1
DEMO_VOCAB = 512
DEMO_CONFIG = ModelConfig(
    name=DEMO_NAME, vocab_size=DEMO_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    ffn_dim=512, word_embed_proj_dim=128, max_position_embeddings=1024)


def random_params_numpy(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Params:
    """Deterministic random params from numpy (same bytes on every machine and jax version)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape_tuple)
    out = []
    for path, shape in leaves:
        name = jax.tree_util.keystr(path)
        if "ln" in name or "layer_norm" in name:
            out.append(np.ones(shape, np.float32) if name.endswith("['scale']") else np.zeros(shape, np.float32))
        else:
            out.append((std * rng.standard_normal(shape)).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def cache_dir() -> Path:
    return cache_root()


def build_demo_model(out_dir: str | Path) -> Path:
    """Write the demo model (weights + tokenizer) as an HF folder at ``out_dir``."""
    from jaxserve.model.demo_data import save_demo_tokenizer

    out = Path(out_dir)
    export_hf(random_params_numpy(DEMO_CONFIG, seed=0, std=0.1), DEMO_CONFIG, out)
    save_demo_tokenizer(out)
    return out


PACKAGED = Path(__file__).with_name("demo_weights")  # scripts/train_demo_model.py writes it; shipped in the package


def ensure_demo_model() -> Path:
    """Path of the demo model folder: the trained one shipped in the package, else the random one (built on
    first use)."""
    if (PACKAGED / "model.safetensors").is_file() and (PACKAGED / "tokenizer.json").is_file():
        return PACKAGED
    final = cache_dir() / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
    try:
        build_demo_model(tmp)
        if not final.exists():
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
