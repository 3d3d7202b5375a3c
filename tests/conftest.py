"""Test-wide setup: 8 virtual CPU devices before jax is imported, offline HF, shared fixtures.

The persistent compilation cache (``jaxserve.compile_cache``) of everything a test starts (``LLM``, the
launcher and the offline script in subprocesses, Ray actors) is one temporary directory for the whole
run, removed at its end: tests never write into the user's ~/.cache, and a subprocess or actor loads
the programs an earlier one compiled instead of compiling them again. The native CPU kernel
(``jaxserve.native``) is built once per run into a temporary directory of its own the same way.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray (and its actors' JAX group) on 127.0.0.1 only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["JAXSERVE_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxserve-test-xla-")
os.environ["JAXSERVE_NATIVE_CACHE"] = tempfile.mkdtemp(prefix="jaxserve-test-native-")  # the C++ kernel, built once

import pytest


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["JAXSERVE_COMPILATION_CACHE"], ignore_errors=True)
    shutil.rmtree(os.environ["JAXSERVE_NATIVE_CACHE"], ignore_errors=True)


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
