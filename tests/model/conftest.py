"""Session fixtures: tiny HF OPT folders (both architecture variants) and their jax params."""

import jax
import jax.numpy as jnp
import pytest

from jaxserve.model.loader import load_hf_checkpoint
from tests.model_fixtures import make_hf_opt


@pytest.fixture(scope="session", params=["pre_ln", "post_ln_project"])
def hf_model(request, tmp_path_factory):
    """(folder, HF torch model, ModelConfig, jax params) for one architecture variant."""
    d, model = make_hf_opt(tmp_path_factory.mktemp(request.param), request.param)
    cfg, params = load_hf_checkpoint(d)
    return d, model, cfg, jax.tree_util.tree_map(jnp.asarray, params)
