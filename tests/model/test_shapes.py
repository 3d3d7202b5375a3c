"""Every published OPT preset: eval_shape parameter counts equal HF's, with nothing allocated."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from jaxserve.config import ConfigError, ModelConfig, list_model_presets, model_preset
from jaxserve.model.opt import abstract_params, count_params


def test_all_presets_present():
    assert list_model_presets() == sorted(
        ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "opt-175b"])


def _hf_count(cfg: ModelConfig) -> int:
    hc = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                   ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_attention_heads,
                   word_embed_proj_dim=cfg.word_embed_proj_dim, do_layer_norm_before=cfg.do_layer_norm_before,
                   max_position_embeddings=cfg.max_position_embeddings)
    with torch.device("meta"):
        m = OPTForCausalLM(hc)
    return sum(p.numel() for p in m.parameters())  # tied lm_head counted once


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "opt-13b", "opt-66b", "opt-175b"])
def test_param_counts_match_hf(name):
    cfg = model_preset(name)
    n = count_params(abstract_params(cfg))
    assert n == cfg.num_params() == _hf_count(cfg)


def test_published_sizes():
    sizes = {n: model_preset(n).num_params() / 1e9 for n in ("opt-125m", "opt-13b", "opt-66b", "opt-175b")}
    assert abs(sizes["opt-125m"] - 0.125) < 0.01
    assert abs(sizes["opt-13b"] - 12.85) < 0.1
    assert abs(sizes["opt-66b"] - 65.7) < 0.3
    assert abs(sizes["opt-175b"] - 174.6) < 0.5


def test_350m_is_post_ln_with_projection():
    cfg = model_preset("opt-350m")
    assert not cfg.do_layer_norm_before and cfg.has_project and not cfg.has_final_layer_norm
    p = abstract_params(cfg)
    assert p["project_in"].shape == (512, 1024) and p["project_out"].shape == (1024, 512)


def test_bf16_abstract():
    p = abstract_params(model_preset("opt-66b", dtype="bfloat16"))
    assert p["layers"][0]["fc1"]["kernel"].dtype.name == "bfloat16"


def test_bad_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown model preset 'opt-7b'"):
        model_preset("opt-7b")
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="int8")
