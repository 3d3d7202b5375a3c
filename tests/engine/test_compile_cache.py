"""The persistent compilation cache: a second process with the same cache directory compiles nothing
and gives the same tokens; where the directory comes from; an unusable directory turns it off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxserve import compile_cache
from jaxserve.compile_cache import describe, enable_compilation_cache, resolve_cache_dir

ROOT = Path(__file__).resolve().parents[2]

# one fresh process: the cache on, a tiny engine warmed up and serving two greedy requests
CHILD = """
import json, sys, time
from jaxserve.compile_cache import cache_hit_count, compile_count, enable_compilation_cache, program_count
enable_compilation_cache(sys.argv[1])
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.model.demo import random_params_numpy
from jaxserve.request import Request, SamplingParams

cfg = ModelConfig(name="t", vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32)
engine = LLMEngine(cfg, random_params_numpy(cfg, seed=3, std=0.2),
                   EngineConfig(max_num_seqs=2, max_model_len=32))
t0 = time.perf_counter()
shapes = engine.warmup()
warm_s = time.perf_counter() - t0
reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
        for i, p in enumerate([[2, 5, 9, 11], [2, *range(40, 60)]])]
tokens = [t.token_ids for t in run_requests(engine, reqs)]
print(json.dumps({"compiles": compile_count(), "hits": cache_hit_count(), "programs": program_count(),
                  "shapes": shapes, "tokens": tokens, "warmup_s": warm_s,
                  "after_warmup": engine.compilations_since_warmup}))
"""


def _start(cache: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", CHILD, str(cache)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_start_with_the_same_cache_compiles_nothing(tmp_path):
    cache = tmp_path / "xla"
    cold, warm = _start(cache), _start(cache)
    # cold: everything compiles (a hit there could only be a program this process already built under
    # another jit object)
    assert cold["compiles"] > cold["shapes"] > 0 and cold["hits"] < cold["compiles"]
    assert warm["compiles"] == 0 and warm["hits"] == warm["programs"] == cold["programs"]
    assert warm["tokens"] == cold["tokens"] and all(len(t) == 6 for t in cold["tokens"])
    assert cold["after_warmup"] == warm["after_warmup"] == 0
    assert any(cache.iterdir())


@pytest.fixture
def jax_cache_restored():
    """Put the test process's JAX cache settings back as they were (enable_compilation_cache changes them)."""
    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    from jax.experimental.compilation_cache import compilation_cache as cc
    cc.reset_cache()


def test_where_the_cache_directory_comes_from(monkeypatch, tmp_path):
    for var in ("JAXSERVE_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path / "root"))
    assert resolve_cache_dir(None) == tmp_path / "root" / "xla"  # beside the demo model
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert resolve_cache_dir(None) == tmp_path / "jax"
    monkeypatch.setenv("JAXSERVE_COMPILATION_CACHE", "off")
    assert resolve_cache_dir(None) is None
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"  # an explicit spec wins over the environment
    assert compile_cache.setting(None) == "off" and resolve_cache_dir(compile_cache.setting(None)) is None


def test_an_unwritable_directory_warns_and_turns_the_cache_off(tmp_path, caplog, jax_cache_restored):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="jaxserve.compile_cache"):
        assert enable_compilation_cache(blocker / "xla") is None
    assert f"compilation cache {blocker / 'xla'} is not usable" in caplog.text
    assert not jax.config.jax_enable_compilation_cache
    assert "off" in describe(None)
    good = enable_compilation_cache(tmp_path / "ok")
    assert good == tmp_path / "ok" and jax.config.jax_compilation_cache_dir == str(good)
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_persistent_cache_min_compile_time_secs == 0
