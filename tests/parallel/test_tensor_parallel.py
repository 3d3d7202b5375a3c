"""Tensor parallelism through ModelExecutor: same numbers as one device, params and KV really split."""

import numpy as np
import pytest

from jaxserve.engine.executor import ModelExecutor
from jaxserve.parallel.sharding import make_mesh, param_shardings
from tests.parallel.conftest import VARIANTS
from tests.parallel.scenario import BS, NUM_BLOCKS, Scenario, max_kv_diff, run_executor


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_forward_equals_single_device(variant, tp, tiny, reference, devices):
    """Packed prefill + 3 paged decode steps: logits and final KV within 1e-5 of the unsharded forward."""
    cfg, params = tiny(variant)
    ref_logits, ref_kv = reference(variant)
    ex = ModelExecutor(cfg, params, devices[8 - tp:], tp=tp)
    logits = run_executor(ex, Scenario(cfg.vocab_size))
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert np.max(np.abs(got - want)) <= 1e-5, f"step {step}"
    assert max_kv_diff(ex.kv, ref_kv) <= 1e-5


def test_tp2_params_and_kv_are_split(tiny, devices):
    cfg, params = tiny("pre_ln")
    h, dh, f, v = cfg.num_attention_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    ex = ModelExecutor(cfg, params, devices[2:4], tp=2)
    ex.init_kv(NUM_BLOCKS, BS)
    layer = ex.params["layers"][1]

    def shard_shapes(a):
        assert {s.device for s in a.addressable_shards} == set(devices[2:4])
        return sorted(s.data.shape for s in a.addressable_shards)

    assert shard_shapes(layer["q"]["kernel"]) == [(cfg.hidden_size, h // 2, dh)] * 2  # column-parallel
    assert shard_shapes(layer["o"]["kernel"]) == [(h // 2, dh, cfg.hidden_size)] * 2  # row-parallel
    assert shard_shapes(layer["fc1"]["kernel"]) == [(cfg.hidden_size, f // 2)] * 2
    assert shard_shapes(layer["fc2"]["kernel"]) == [(f // 2, cfg.hidden_size)] * 2
    assert shard_shapes(ex.params["embed_tokens"]) == [(v // 2, cfg.word_embed_proj_dim)] * 2
    assert shard_shapes(layer["attn_ln"]["scale"]) == [(cfg.hidden_size,)] * 2  # replicated
    # the two q shards hold different heads: together they are the whole kernel
    q = np.concatenate([np.asarray(s.data) for s in sorted(layer["q"]["kernel"].addressable_shards,
                                                              key=lambda s: s.index[1].start)], axis=1)
    np.testing.assert_array_equal(q, params["layers"][1]["q"]["kernel"])
    k_pages, _ = ex.kv[0]
    assert shard_shapes(k_pages) == [(NUM_BLOCKS, BS, h // 2, dh)] * 2


def test_tp_not_dividing_heads_is_rejected(tiny, devices):
    cfg, params = tiny("pre_ln")  # 4 heads
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        ModelExecutor(cfg, params, devices[:3], tp=3)
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        param_shardings(cfg, make_mesh(devices[:3], 3))


def test_mesh_needs_exactly_tp_times_pp_devices(devices):
    with pytest.raises(ValueError, match="needs 4 devices, got 3"):
        make_mesh(devices[:3], 2, 2)
