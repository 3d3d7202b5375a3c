"""Every jitted serving program lowers for CUDA on this CPU machine (``jax.export``), Pallas kernels as Triton.

    stage programs (engine/stage.py): embed, k-layer group (packed prefill | decode | prompt chunk), row select,
    head; samplers; KV hand-off gather / scatter; at tp=1, tp=2 (Pallas kernels under shard_map) and for pp
    stages (a first stage's and a last stage's layer slice); the cross-process hand-off's transfer program
    (a ppermute over a 2-device mesh: NCCL on GPUs) and its reshapes
      --jax.export(platforms=["cuda"])--> StableHLO for CUDA: decode and packed prefill hold a Triton call

Lowering is not compiling: Triton's compile to PTX and the speed need a GPU (scripts/gpu_check.py, issue 14).
The in-process one-pass KV import (``kv_transfer._fused_copy``) is CPU-only by design and is not lowered here.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxserve.config import ModelConfig
from jaxserve.engine import stage
from jaxserve.engine.attention_backends import make_attention
from jaxserve.engine.executor import gather_pages, scatter_pages
from jaxserve.engine.pipeline import split_layers, stage_params
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.inputs import StepShape, dummy_step_inputs
from jaxserve.model.opt import init_kv_cache
from jaxserve.model.sampling import greedy, sample_full
from jaxserve.parallel.sharding import kv_sharding, make_mesh, param_shardings, replicated

CFG = ModelConfig(name="lower", vocab_size=256, hidden_size=64, num_hidden_layers=4, ffn_dim=128,
                  num_attention_heads=4, max_position_embeddings=512)
BS, NUM_BLOCKS = 16, 32
TRITON = "__gpu$xla.gpu.triton"
SHAPES = {"prefill": StepShape(64, 4, True), "decode": StepShape(8, 8, False, ((8, 1, 8),)),
          "chunk": StepShape(16, 1, False, ((1, 16, 8),))}


def lower_for_cuda(fn, *args, devices: int = 1) -> str:
    """The StableHLO text of ``fn(*args)`` lowered for CUDA over ``devices`` devices (Triton calls allowed)."""
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    assert exp.platforms == ("cuda",) and exp.nr_devices == devices
    return exp.mlir_module()


@pytest.fixture(scope="module")
def placed():
    """tp -> (mesh, replicated sharding, params, KV) on a (1, tp) mesh of CPU devices."""
    params = random_params_numpy(CFG, 0)
    out = {}
    for tp in (1, 2):
        mesh = make_mesh(jax.devices()[:tp], tp, 1)
        kv = jax.device_put(init_kv_cache(CFG, NUM_BLOCKS, BS), kv_sharding(mesh))
        out[tp] = mesh, replicated(mesh), jax.device_put(params, param_shardings(CFG, mesh)), kv
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["prefill", "decode", "chunk"])
def test_layer_group_lowers_for_cuda(kind, tp, placed):
    mesh, repl, params, kv = placed[tp]
    attn = make_attention("pallas", mesh)
    inp = dummy_step_inputs(SHAPES[kind], BS)
    x = jax.device_put(jnp.zeros((SHAPES[kind].num_tokens, CFG.hidden_size)), repl)
    text = lower_for_cuda(lambda layers, x, pos, kv, meta: stage._layers(layers, CFG, attn, x, pos, kv, meta, repl),
                          params["layers"], x, inp.positions, kv, inp.meta, devices=tp)
    # decodes and packed prompts run the Pallas kernels; a prompt chunk after a cached prefix the XLA path
    assert (TRITON in text) == (kind != "chunk")
    if tp == 2:  # params split over two devices; the attention per shard inside shard_map
        assert "sdy.sharding" in text and "sdy.manual_computation" in text


def test_embed_head_samplers_and_handoffs_lower_for_cuda(placed):
    _, repl, params, kv = placed[1]
    top = {k: v for k, v in params.items() if k != "layers"}
    inp = dummy_step_inputs(SHAPES["prefill"], BS)
    lower_for_cuda(lambda top, t, p: stage._embed(top, CFG, t, p, repl), top, inp.tokens, inp.positions)
    x = jnp.zeros((64, CFG.hidden_size))
    lower_for_cuda(stage._select, x, inp.logits_index)
    lower_for_cuda(lambda top, y: stage._head(top, CFG, y), top, x[:4])
    logits = jnp.zeros((4, CFG.vocab_size))
    lower_for_cuda(greedy, logits)
    rows = (jnp.ones(4), jnp.zeros(4, jnp.int32), jnp.ones(4), jnp.zeros(4, jnp.uint32), jnp.zeros(4, jnp.uint32),
            jnp.zeros(4, jnp.int32), jnp.full(4, -1, jnp.int32), jnp.zeros(4), jnp.full((4, 64), -1, jnp.int32),
            jnp.zeros((4, 64)))
    pen = (jnp.zeros((4, CFG.vocab_size)), jnp.zeros((4, CFG.vocab_size), jnp.bool_), jnp.ones((4, 3)))
    lower_for_cuda(sample_full, logits, *pen, jnp.bool_(True), *rows)
    idx = jnp.arange(4, dtype=jnp.int32)
    lower_for_cuda(gather_pages, kv, idx)
    blocks = [(k[:4], v[:4]) for k, v in kv]
    lower_for_cuda(scatter_pages, kv, idx, blocks)


def test_pipeline_stages_lower_for_cuda():
    """A pp=2 split: the first stage (embed + its layers) and the last (its layers + head), each its own mesh."""
    params = random_params_numpy(CFG, 0)
    ranges = split_layers(CFG.num_hidden_layers, 2)
    inp = dummy_step_inputs(SHAPES["decode"], BS)
    for s, layers in enumerate(ranges):
        mesh = make_mesh(jax.devices()[s:s + 1], 1, 1)
        repl = replicated(mesh)
        p = stage_params(params, layers, s == 0, s == 1)
        p = jax.device_put(p, param_shardings(CFG, mesh, p))
        kv = jax.device_put(init_kv_cache(CFG, NUM_BLOCKS, BS, num_layers=len(layers)), kv_sharding(mesh))
        h = inp.tokens if s == 0 else jnp.zeros((8, CFG.hidden_size))
        attn = make_attention("pallas", mesh)
        def run(p, h, pos, kv, meta, li, attn=attn, first=s == 0, repl=repl):
            return stage.run_stage(p, CFG, attn, h, pos, kv, meta, li, first=first, last=not first, replicated=repl)

        text = lower_for_cuda(run, p, h, inp.positions, kv, inp.meta, inp.logits_index)
        assert TRITON in text


def test_cross_process_transfer_lowers_for_cuda():
    """The collective transport's exchange (jaxserve.cluster.collective): per layer k and v, plus the flag,
    one collective-permute each from the source device to the destination device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxserve.cluster.collective import _exchange_fn, _reshapers

    mesh, fn = _exchange_fn(*jax.devices()[:2])
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    piece = jax.ShapeDtypeStruct((2, 4, BS, 4, 16), jnp.bfloat16, sharding=sharding)
    flag = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=sharding)
    text = lower_for_cuda(fn, [piece] * 4, flag, devices=2)
    assert text.count("collective_permute") == 5, text.count("collective_permute")
    expand, squeeze = _reshapers()
    lower_for_cuda(expand, [jnp.zeros((4, BS, 4, 16))] * 4)
    lower_for_cuda(squeeze, [jnp.zeros((1, 4, BS, 4, 16))] * 4)
