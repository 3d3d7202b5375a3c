"""One stage's forward pass as a few compiled programs whose count and size do not grow with depth.

    tokens [T] --embed program--> x [T, D]                          (first stage only)
    x, kv[g:g+k] --layer-group program (k layers, unrolled)--> x, kv'  once per group of k layers
    x [T, D] --select rows (tiny)--> [R, D] --head program--> logits [R, V] float32   (last stage only)

A stage of ``L`` layers runs the one layer-group program ``L / k`` times with each group's own
params and KV pages (donated), so a step shape compiles one program of ``k`` layers plus a small
embed and head program, whatever the depth: OPT-125m (12 layers) and OPT-66b (64 layers) compile
the same amount per shape. ``k`` is the largest divisor of ``L`` up to ``MAX_GROUP`` (measured on
the 2-core CPU for OPT-125m width, decode batch 8: one call per layer cost ~7% more per step than
a single unrolled program, while ``jax.lax.scan`` over stacked layer params cost ~50% more
because XLA copies each layer's weights out of the stack on every iteration; a group of 4 keeps
the dispatch overhead small and the compile time flat). The head compiles per row count ``R``
only: the rows that sample are picked from ``x [T, D]`` by a tiny program of its own (the demo's two
instances: 26 head programs, 6 s of compiling, before this split).

Activations cross program boundaries replicated on the stage's mesh (a sharding constraint in
each program), so every group call sees the same input sharding and reuses one executable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxserve.config import ModelConfig
from jaxserve.model.opt import KVCache, Params, embed, head, run_layers

MAX_GROUP = 4  # layers per compiled group program (see the module docstring)


def group_size(num_layers: int, max_group: int = MAX_GROUP) -> int:
    """The largest divisor of ``num_layers`` that is at most ``max_group``."""
    return next(k for k in range(min(max_group, num_layers), 0, -1) if num_layers % k == 0)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _embed(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
           out: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(embed(params, cfg, tokens, positions), out)


@functools.partial(jax.jit, static_argnums=(1, 2, 7), donate_argnums=(5,))
def _layers(layers: Sequence[Params], cfg: ModelConfig, attn_fn: Any, x: jax.Array, positions: jax.Array,
            kv: KVCache, meta: Any, out: NamedSharding) -> tuple[jax.Array, KVCache]:
    x, kv = run_layers(layers, cfg, x, positions, kv, meta, attn_fn)
    return jax.lax.with_sharding_constraint(x, out), kv


@jax.jit
def _select(x: jax.Array, logits_index: jax.Array) -> jax.Array:
    return x[logits_index]  # [T, D] -> [R, D]: the rows that sample


@functools.partial(jax.jit, static_argnums=(1,))
def _head(params: Params, cfg: ModelConfig, y: jax.Array) -> jax.Array:
    return head(params, cfg, y, jnp.arange(y.shape[0]))


def run_stage(params: Params, cfg: ModelConfig, attn_fn: Any, h: jax.Array, positions: jax.Array, kv: KVCache,
              meta: Any, logits_index: jax.Array | None, *, first: bool, last: bool,
              replicated: NamedSharding, max_group: int = MAX_GROUP) -> tuple[jax.Array, KVCache]:
    """One stage: (tokens [T] if first else x [T, D]) -> (logits [R, V] if last else x [T, D]), new KV.

    ``params["layers"]`` and ``kv`` hold exactly this stage's layers; ``kv`` is consumed (each
    group's pages are donated to its call) and the returned list replaces it."""
    layers = params["layers"]
    top = {name: v for name, v in params.items() if name != "layers"}  # embeddings, final LN
    x = _embed(top, cfg, h, positions, replicated) if first else h
    k = group_size(len(layers), max_group)
    new_kv: KVCache = []
    for g in range(0, len(layers), k):
        x, part = _layers(layers[g:g + k], cfg, attn_fn, x, positions, kv[g:g + k], meta, replicated)
        new_kv += part
    return (_head(top, cfg, _select(x, logits_index)) if last else x), new_kv
