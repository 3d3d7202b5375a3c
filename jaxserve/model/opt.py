"""OPT decoder in Flax, as a pure function over a params pytree and an explicit KV cache.

    tokens [T], positions [T]  --embed-->  x [T, D]
    x, kv[i], meta            --layer i (i in a stage's range)-->  x, kv[i]'
    x[logits_index] [B, D]    --head (final LN, project_out, tied lm_head)-->  logits [B, V] (float32)

``forward(params, cfg, tokens, positions, kv, meta, logits_index)`` composes the
three pieces; pipeline stages call ``embed`` / ``run_layers`` / ``head`` on their
own slices of ``params["layers"]`` and ``kv``. The KV cache is a list (one entry
per layer) of ``(k_pages, v_pages)``, each ``[num_blocks, block_size, H, Dh]``;
it is passed in and returned (donate it under jit), never kept in a module.

Params (HF names in brackets):
    embed_tokens [V, Dw]           (decoder.embed_tokens)     also the tied lm_head
    embed_positions [P + 2, D]     (decoder.embed_positions)  OPT offsets positions by 2
    project_in [Dw, D], project_out [D, Dw]   only when Dw != D (OPT-350m)
    final_layer_norm {scale, bias} only for pre-LN models
    layers[i]: attn_ln, q/k/v {kernel [D, H, Dh], bias [H, Dh]}, o {kernel [H, Dh, D], bias [D]},
               ffn_ln, fc1 {kernel [D, F], bias [F]}, fc2 {kernel [F, D], bias [D]}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.model.attention import AttnMeta, attention_xla, write_kv

Params = dict[str, Any]
LayerKV = tuple[jax.Array, jax.Array]
KVCache = list[LayerKV]
POSITION_OFFSET = 2  # OPT's learned positional embedding starts at index 2

# attn_fn(q, k, v [T,H,Dh], k_pages, v_pages [N,bs,H,Dh], positions [T], meta, scale) -> [T, H, Dh]
AttnFn = Callable[..., jax.Array]


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class DecoderLayer(nn.Module):
    """One OPT block: self-attention over the paged cache, then a ReLU FFN."""

    cfg: ModelConfig
    attn_fn: AttnFn = attention_xla

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, kv: LayerKV, meta: AttnMeta
                 ) -> tuple[jax.Array, LayerKV]:
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        h, dh = cfg.num_attention_heads, cfg.head_dim

        def ln(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=dt, name=name)

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral((h, dh), dtype=dt, param_dtype=dt, name=name)

        pre = cfg.do_layer_norm_before
        residual = x  # [T, D]
        y = ln("attn_ln")(x).astype(dt) if pre else x
        q, k, v = proj("q")(y), proj("k")(y), proj("v")(y)  # [T, H, Dh] each
        k_pages, v_pages = write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        a = self.attn_fn(q, k, v, k_pages, v_pages, positions, meta, dh**-0.5)  # [T, H, Dh]
        y = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=dt, param_dtype=dt, name="o")(a)  # [T, D]
        x = residual + y
        if not pre:
            x = ln("attn_ln")(x).astype(dt)

        residual = x
        y = ln("ffn_ln")(x).astype(dt) if pre else x
        y = nn.relu(nn.Dense(cfg.ffn_dim, dtype=dt, param_dtype=dt, name="fc1")(y))  # [T, F]
        y = nn.Dense(cfg.hidden_size, dtype=dt, param_dtype=dt, name="fc2")(y)  # [T, D]
        x = residual + y
        if not pre:
            x = ln("ffn_ln")(x).astype(dt)
        return x, (k_pages, v_pages)


def _layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token + learned position embeddings: tokens, positions [T] -> x [T, D]."""
    dt = dtype_of(cfg.dtype)
    x = params["embed_tokens"][tokens].astype(dt)  # [T, Dw]
    if cfg.has_project:
        x = x @ params["project_in"].astype(dt)  # [T, D]
    return x + params["embed_positions"][positions + POSITION_OFFSET].astype(dt)


def run_layers(layers: Sequence[Params], cfg: ModelConfig, x: jax.Array, positions: jax.Array,
               kv: Sequence[LayerKV], meta: AttnMeta, attn_fn: AttnFn = attention_xla
               ) -> tuple[jax.Array, KVCache]:
    """Apply a contiguous run of decoder layers; ``kv`` holds exactly those layers' pages."""
    if len(layers) != len(kv):
        raise ValueError(f"run_layers: {len(layers)} layers but {len(kv)} KV entries")
    module = DecoderLayer(cfg, attn_fn)
    new_kv: KVCache = []
    for p, layer_kv in zip(layers, kv, strict=True):
        x, layer_kv = module.apply({"params": p}, x, positions, layer_kv, meta)
        new_kv.append(layer_kv)
    return x, new_kv


def head(params: Params, cfg: ModelConfig, x: jax.Array, logits_index: jax.Array) -> jax.Array:
    """Logits for the sampled positions only: x [T, D], logits_index [B] -> [B, V] float32."""
    dt = dtype_of(cfg.dtype)
    y = x[logits_index]  # [B, D]
    if cfg.has_final_layer_norm:
        y = _layer_norm(params["final_layer_norm"], y, cfg.layer_norm_eps).astype(dt)
    if cfg.has_project:
        y = y @ params["project_out"].astype(dt)  # [B, Dw]
    return jnp.einsum("bw,vw->bv", y, params["embed_tokens"].astype(dt), preferred_element_type=jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, kv: KVCache,
            meta: AttnMeta, logits_index: jax.Array, attn_fn: AttnFn = attention_xla
            ) -> tuple[jax.Array, KVCache]:
    """Whole model, one packed step: returns logits [B, V] (float32) and the updated cache."""
    x = embed(params, cfg, tokens, positions)
    x, kv = run_layers(params["layers"], cfg, x, positions, kv, meta, attn_fn)
    return head(params, cfg, x, logits_index), kv


# ---- parameters -------------------------------------------------------------------------------

def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random parameters of the right shapes and dtype (normal(std) weights, LN = identity)."""
    return _init(cfg, rng, std)


def _init(cfg: ModelConfig, rng: jax.Array, std: float) -> Params:
    dt = dtype_of(cfg.dtype)
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape_tuple)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, shape), key in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "ln" in name or "layer_norm" in name:
            val = jnp.ones(shape, dt) if name.endswith("['scale']") else jnp.zeros(shape, dt)
        else:
            val = (std * jax.random.normal(key, shape, jnp.float32)).astype(dt)
        out.append(val)
    return jax.tree_util.tree_unflatten(treedef, out)


def param_shapes(cfg: ModelConfig) -> Params:
    """The params pytree with shape tuples as leaves (no allocation)."""
    d, h, dh, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.ffn_dim
    w, v = cfg.word_embed_proj_dim, cfg.vocab_size

    def ln() -> dict[str, tuple[int, ...]]:
        return {"scale": (d,), "bias": (d,)}

    def qkv() -> dict[str, tuple[int, ...]]:
        return {"kernel": (d, h, dh), "bias": (h, dh)}

    layer = {
        "attn_ln": ln(), "q": qkv(), "k": qkv(), "v": qkv(),
        "o": {"kernel": (h, dh, d), "bias": (d,)},
        "ffn_ln": ln(),
        "fc1": {"kernel": (d, f), "bias": (f,)},
        "fc2": {"kernel": (f, d), "bias": (d,)},
    }
    p: Params = {
        "embed_tokens": (v, w),
        "embed_positions": (cfg.max_position_embeddings + POSITION_OFFSET, d),
        "layers": [copy.deepcopy(layer) for _ in range(cfg.num_hidden_layers)],
    }
    if cfg.has_project:
        p["project_in"] = (w, d)
        p["project_out"] = (d, w)
    if cfg.has_final_layer_norm:
        p["final_layer_norm"] = ln()
    return p


def is_shape_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: ModelConfig) -> Params:
    """``jax.eval_shape`` of ``init_params``: ShapeDtypeStructs, nothing allocated (works for 175B)."""
    return jax.eval_shape(lambda k: _init(cfg, k, 0.02), jax.random.key(0))


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def init_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, num_layers: int | None = None,
                  dtype: str | None = None) -> KVCache:
    """Zeroed paged cache: ``num_layers`` x (k, v) pages ``[num_blocks, block_size, H, Dh]``."""
    shape = (num_blocks, block_size, cfg.num_attention_heads, cfg.head_dim)
    dt = dtype_of(dtype or cfg.dtype)
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(n)]
