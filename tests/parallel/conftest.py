"""Shared fixtures: a 4-layer tiny OPT per variant (so pp=4 has a layer per stage) and its reference run."""

import functools

import jax
import pytest

from jaxserve.model.loader import load_hf_checkpoint
from tests.model_fixtures import make_hf_opt
from tests.parallel.scenario import Scenario, reference_run

VARIANTS = ("pre_ln", "post_ln_project")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) >= 8, "tests/conftest.py should give 8 virtual CPU devices"
    return devs


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """variant -> (ModelConfig, numpy params) of a 4-layer, 4-head OPT; built once per session on demand."""

    @functools.cache
    def get(variant: str):
        d, _ = make_hf_opt(tmp_path_factory.mktemp(variant), variant, num_hidden_layers=4, seed=7)
        return load_hf_checkpoint(d)

    return get


@pytest.fixture(scope="session")
def reference(tiny):
    """variant -> the single-device run of the standard scenario (logits per step, final KV)."""

    @functools.cache
    def get(variant: str):
        cfg, params = tiny(variant)
        return reference_run(cfg, params, Scenario(cfg.vocab_size))

    return get
