"""HF folder loading in every on-disk format, and clear errors for bad folders."""

import json
import re

import ml_dtypes
import numpy as np
import pytest

from jaxserve.model.checkpoint import tree_equal
from jaxserve.model.loader import CheckpointError, load_hf_checkpoint, params_to_hf
from tests.model_fixtures import make_hf_opt


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d, _ = make_hf_opt(tmp_path_factory.mktemp("ref"), "post_ln_project", "safetensors")
    return load_hf_checkpoint(d)


@pytest.mark.parametrize("fmt", ["sharded", "bin", "bin_sharded"])
def test_all_formats_give_identical_params(tmp_path, reference, fmt):
    d, _ = make_hf_opt(tmp_path, "post_ln_project", fmt)
    cfg, params = load_hf_checkpoint(d)
    assert cfg.replace(name="x") == reference[0].replace(name="x")
    assert tree_equal(params, reference[1])


def test_config_fields(reference):
    cfg = reference[0]
    assert (cfg.has_project, cfg.has_final_layer_norm, cfg.word_embed_proj_dim) == (True, False, 32)


def test_bfloat16_load(tmp_path):
    d, model = make_hf_opt(tmp_path, "pre_ln")
    cfg, params = load_hf_checkpoint(d, dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert params["embed_tokens"].dtype == ml_dtypes.bfloat16
    ref = model.model.decoder.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(params["embed_tokens"].astype(np.float32), ref, rtol=1e-2, atol=1e-3)


def test_export_round_trip(reference):
    cfg, params = reference
    hf = params_to_hf(params, cfg)
    from jaxserve.model.loader import convert_hf_tensors
    assert tree_equal(convert_hf_tensors(hf, cfg), params)


def _good(tmp_path):
    d, _ = make_hf_opt(tmp_path / "m", "pre_ln")
    return d


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")


def test_missing_config(tmp_path):
    d = _good(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_hf_checkpoint(d)


def test_not_opt(tmp_path):
    d = _good(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="gpt2"):
        load_hf_checkpoint(d)


def test_no_weights(tmp_path):
    d = _good(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf_checkpoint(d)


def _rewrite(d, edit):
    from safetensors.numpy import load_file, save_file
    t = load_file(d / "model.safetensors")
    edit(t)
    save_file(t, d / "model.safetensors")


def test_missing_tensor(tmp_path):
    d = _good(tmp_path)
    _rewrite(d, lambda t: t.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder.layers.1.fc2.bias'\]"):
        load_hf_checkpoint(d)


def test_wrong_shape(tmp_path):
    d = _good(tmp_path)
    _rewrite(d, lambda t: t.update({"model.decoder.layers.0.fc1.weight": np.zeros((7, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.decoder.layers.0.fc1.weight' has shape \(7, 64\)"):
        load_hf_checkpoint(d)


def test_truncated_file(tmp_path):
    d = _good(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf_checkpoint(d)


def test_garbage_file(tmp_path):
    d = _good(tmp_path)
    (d / "model.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        load_hf_checkpoint(d)


def test_index_names_missing_shard(tmp_path):
    d, _ = make_hf_opt(tmp_path / "s", "pre_ln", "sharded")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"names shard {shard.name}, which is missing")):
        load_hf_checkpoint(d)
