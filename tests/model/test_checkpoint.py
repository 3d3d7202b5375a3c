"""orbax round trip of converted params, restore onto a sharded target, and the demo model."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.model import demo
from jaxserve.model.checkpoint import load_model, restore_converted, save_converted, tree_equal
from jaxserve.model.generate import generate
from jaxserve.model.loader import load_hf_checkpoint
from jaxserve.request import SamplingParams
from jaxserve.tokenizer import Tokenizer


def test_orbax_round_trip_is_identical(hf_model, tmp_path):
    d, _, _, _ = hf_model
    cfg, params = load_hf_checkpoint(d)
    out = save_converted(params, cfg, tmp_path / "conv")
    cfg2, restored = restore_converted(out)
    assert cfg2 == cfg
    assert tree_equal(restored, params)
    lm = load_model(out)
    assert lm.cfg == cfg and tree_equal(lm.params, params)


def test_restore_onto_other_sharding(hf_model, tmp_path):
    d, _, _, _ = hf_model
    cfg, params = load_hf_checkpoint(d)
    out = save_converted(params, cfg, tmp_path / "conv")
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

    def spec(x):
        return NamedSharding(mesh, PartitionSpec("tp") if x.ndim >= 2 and x.shape[0] % 2 == 0 else PartitionSpec())

    shardings = jax.tree_util.tree_map(spec, params)
    _, restored = restore_converted(out, shardings=shardings)
    emb = restored["embed_tokens"]
    assert emb.sharding == shardings["embed_tokens"] and len(emb.addressable_shards) == 2
    assert tree_equal(restored, params)


def test_demo_model_is_deterministic_and_generates(tmp_path, monkeypatch):
    a = demo.build_demo_model(tmp_path / "a")
    b = demo.build_demo_model(tmp_path / "b")
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path / "cache"))
    lm = load_model(None)
    assert lm.cfg.name == demo.DEMO_NAME and lm.source == demo.DEMO_NAME
    tok = Tokenizer.from_dir(lm.tokenizer_dir)
    params = jax.tree_util.tree_map(jax.numpy.asarray, lm.params)
    g = generate(params, lm.cfg, [tok.encode("Hello there")], SamplingParams(max_tokens=8, ignore_eos=True),
                 tokenizer=tok)[0]
    assert len(g.token_ids) == 8 and g.text == tok.decode(g.token_ids)
