"""Engine costs measured on a tiny engine: host time around the model calls, KV export/import per request."""

import jax
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.demo import random_params_numpy
from jaxserve.profiling.engine_costs import measure_engine_costs
from planner.latency import EngineCosts


def test_engine_costs_are_measured_on_a_tiny_engine():
    tiny = ModelConfig(name="tiny-opt", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       ffn_dim=256, word_embed_proj_dim=64, max_position_embeddings=256)
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), random_params_numpy(tiny, seed=0))
    c = measure_engine_costs(tiny, params, jax.devices()[0], max_num_seqs=4, max_model_len=128, token_budget=128,
                             batches=(1, 2, 4), prompt_len=16, steps=3, kv_tokens=(16, 64), repeats=2)
    assert min(c["call_ms"], c["seq_ms"], *c["kv_export_ms"], *c["kv_import_ms"]) >= 0
    assert [b for b, *_ in c["samples"]["decode"]] == [1] * 3 + [2] * 3 + [4] * 3
    assert all(wall >= call > 0 for _, wall, call in c["samples"]["decode"])  # the model call is inside the step
    assert [t for t, _ in c["samples"]["kv_export"]] == [16, 64]
    costs = EngineCosts.from_ms_entry(c, where="test")
    assert costs.padded and costs.call_s == pytest.approx(c["call_ms"] / 1e3)
