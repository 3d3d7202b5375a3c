"""Train the built-in demo model once: a ~2.5M-parameter OPT on the Python standard library's docstrings.

    python scripts/train_demo_model.py                   # ~12 min on 2 CPU cores; writes jaxserve/model/demo_weights/
    python scripts/train_demo_model.py --minutes 1 --out /tmp/demo   # a quick look

What flows through, all offline:

    every importable stdlib module (pkgutil) --inspect.getdoc of it, its classes, functions and methods-->
      + pydoc's help topics (pydoc_data.topics: the language reference) --> ~1.5 MB of English (the
      Python Software Foundation's documentation, PSF license)
    --tokenizers' byte-level BPE trainer (vocab 2048, OPT's special tokens </s> etc.)--> tokenizer.json
    --random 128-token windows, batch 16, AdamW (hand-written), cosine decay, the engine's own forward
      (jaxserve.model.opt.forward in packed mode: the exact function that serves it) --> weights
    --export_hf (float32, 9 MB)--> an HF OPT folder the loader reads like any checkpoint

The result answers in English-like words (it is tiny: no facts, no reasoning). Tests keep using random
tiny models; the launcher serves this one when no --model is given.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxserve.config import ModelConfig
from jaxserve.model.attention import AttnMeta
from jaxserve.model.demo import DEMO_NAME, random_params_numpy
from jaxserve.model.loader import export_hf
from jaxserve.model.opt import forward

OUT = Path(__file__).resolve().parent.parent / "jaxserve" / "model" / "demo_weights"
SEQ = 128
CONFIG = ModelConfig(name=DEMO_NAME, vocab_size=2048, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                     ffn_dim=768, word_embed_proj_dim=192, max_position_embeddings=512)
SKIP = ("idlelib", "tkinter", "turtle", "test", "lib2to3", "ensurepip", "venv", "antigravity", "this", "__main__")


def docstrings() -> str:
    """Documentation strings of the standard library (modules, classes, functions, methods), deduplicated."""
    seen, parts = set(), []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix)
                   and "site-packages" not in str(m.module_finder.path))
    for name in names:
        if name.startswith("_") or name.startswith(SKIP):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod, *(v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v))]
        for cls in [o for o in objs if inspect.isclass(o)]:
            objs += [v for _, v in inspect.getmembers(cls) if inspect.isfunction(v)]
        for o in objs:
            doc = inspect.getdoc(o)
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                parts.append(doc.strip())
    from pydoc_data.topics import topics  # the language reference's help topics (pydoc), English prose

    parts += [t.strip() for t in topics.values() if t not in seen]
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def window_loss(params, tokens):  # tokens [SEQ + 1]: one window, as one packed prompt
    positions = jnp.arange(SEQ, dtype=jnp.int32)
    meta = AttnMeta(jnp.zeros(SEQ, jnp.int32), (), jnp.zeros(SEQ, jnp.int32))
    kv = [(jnp.zeros((1, 16, CONFIG.num_attention_heads, CONFIG.head_dim)),) * 2] * CONFIG.num_hidden_layers
    logits, _ = forward(params, CONFIG, tokens[:-1], positions, kv, meta, positions)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[1:, None], -1))


def loss_fn(params, tokens):  # tokens [B, SEQ + 1]
    return jnp.mean(jax.vmap(window_loss, in_axes=(None, 0))(params, tokens))


@jax.jit
def step(params, opt, tokens, lr):
    loss, g = jax.value_and_grad(loss_fn)(params, tokens)
    m, v, t = opt
    t = t + 1
    m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
    v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
    c1, c2 = 1 - 0.9**t, 1 - 0.999**t

    def upd(p, a, b):
        return p - lr * (a / c1 / (jnp.sqrt(b / c2) + 1e-8) + 0.01 * p * (p.ndim > 1))

    return jax.tree_util.tree_map(upd, params, m, v), (m, v, t), loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    text = docstrings()
    print(f"corpus: {len(text) / 1e6:.1f} MB of docstrings ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    tok = train_tokenizer(text, CONFIG.vocab_size)
    ids = np.asarray(tok.encode(text).ids, np.int32)
    print(f"tokens: {len(ids) / 1e6:.2f} M", file=sys.stderr)
    rng = np.random.default_rng(a.seed)
    params = jax.tree_util.tree_map(jnp.asarray, random_params_numpy(CONFIG, seed=a.seed, std=0.02))
    opt = (jax.tree_util.tree_map(jnp.zeros_like, params), jax.tree_util.tree_map(jnp.zeros_like, params), 0)
    budget, start, n, ema = a.minutes * 60, time.perf_counter(), 0, None
    while (elapsed := time.perf_counter() - start) < budget:
        at = rng.integers(0, len(ids) - SEQ - 1, a.batch)
        batch = np.stack([ids[i:i + SEQ + 1] for i in at])
        lr = a.lr * min(1.0, (n + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        params, opt, loss = step(params, opt, jnp.asarray(batch), jnp.float32(lr))
        n += 1
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if n % 50 == 0:
            print(f"step {n}: loss {ema:.3f} ({elapsed:.0f} s)", file=sys.stderr)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    export_hf(jax.tree_util.tree_map(np.asarray, params), CONFIG, out)  # float32: 9 MB
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "model_max_length": 512}, indent=2) + "\n")
    print(f"wrote {out} after {n} steps, loss {ema:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
