"""Layers run as compiled groups (``engine.stage``) give the unrolled ``forward``'s logits, KV and tokens."""

import jax
import numpy as np
import pytest

from jaxserve.engine.stage import group_size, run_stage
from jaxserve.model.attention import attention_xla
from jaxserve.model.opt import init_kv_cache
from tests.parallel.scenario import BS, DECODES, NUM_BLOCKS, Scenario, max_kv_diff


def test_group_size_divides_the_stage():
    assert [group_size(n) for n in (1, 2, 3, 4, 6, 7, 12, 13, 24, 48, 96)] == [1, 2, 3, 4, 3, 1, 4, 1, 4, 4, 4]
    assert group_size(12, max_group=1) == 1 and group_size(6, max_group=2) == 2


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
@pytest.mark.parametrize("max_group", [1, 2, 4])
def test_grouped_layers_equal_the_unrolled_forward(variant, max_group, tiny, reference):
    """Packed prefill + 3 decodes of a 4-layer model as 4, 2 or 1 group calls: logits and KV within
    1e-5 of ``forward`` (one jitted program, layers unrolled), greedy tokens identical."""
    cfg, params = tiny(variant)
    ref_logits, ref_kv = reference(variant)
    dev = jax.devices()[0]
    repl = jax.sharding.SingleDeviceSharding(dev)
    params = jax.device_put(params, dev)
    kv = jax.device_put(init_kv_cache(cfg, NUM_BLOCKS, BS), dev)
    sc = Scenario(cfg.vocab_size)
    for step in range(DECODES + 1):
        inp = sc.inputs(step)
        tokens, positions, meta, index = jax.device_put((inp.tokens, inp.positions, inp.meta, inp.logits_index), dev)
        logits, kv = run_stage(params, cfg, attention_xla, tokens, positions, kv, meta, index,
                               first=True, last=True, replicated=repl, max_group=max_group)
        got = np.asarray(logits)[:len(sc.prompts)]
        assert np.max(np.abs(got - ref_logits[step])) <= 1e-5, step
        assert (got.argmax(-1) == ref_logits[step].argmax(-1)).all()
    assert max_kv_diff(kv, ref_kv) <= 1e-5
