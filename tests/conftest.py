"""Test-wide setup: 8 virtual CPU devices before jax is imported, offline HF, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny HF OPT folder: (folder, HF torch model, ModelConfig, jax params, Tokenizer)."""
    import jax
    import jax.numpy as jnp

    from jaxserve.model.loader import load_hf_checkpoint
    from jaxserve.tokenizer import Tokenizer
    from tests.model_fixtures import make_hf_opt

    d, model = make_hf_opt(tmp_path_factory.mktemp("engine-model"), "pre_ln")
    cfg, params = load_hf_checkpoint(d)
    return d, model, cfg, jax.tree_util.tree_map(jnp.asarray, params), Tokenizer.from_dir(d)


@pytest.fixture(scope="session")
def workload(tiny):
    """64 prompts of lengths 1..300 with different max_tokens, and HF's greedy output for each alone."""
    import numpy as np

    from tests.model_fixtures import hf_greedy

    _, model, cfg, _, _ = tiny
    rng = np.random.default_rng(7)
    lens = np.concatenate([[1, 2, 16, 17, 299, 300], rng.integers(1, 301, 58)])
    prompts = [[2, *rng.integers(3, cfg.vocab_size, int(n) - 1).tolist()] for n in lens]
    max_tokens = rng.integers(1, 40, len(prompts)).tolist()
    refs = [hf_greedy(model, p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    return prompts, max_tokens, refs
