"""Serving-test fixtures: the real tiny engine (one prefill + one decode instance on 2 CPU devices)."""

import pytest


@pytest.fixture(scope="module")
def real(tiny):
    """(engine, tokenizer, HF model, ModelConfig): a small disaggregated engine over the tiny model,
    one per test module (a module's tests share it; each must leave it idle with no blocks held)."""
    import jax

    from jaxserve.config import EngineConfig
    from jaxserve.engine.build import build_local

    _, model, cfg, params, tok = tiny
    small = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64)
    eng = build_local(cfg, params, [("prefill", EngineConfig(mode="prefill", **small)),
                                    ("decode", EngineConfig(mode="decode", **small))], jax.devices()[:2])
    return eng, tok, model, cfg
