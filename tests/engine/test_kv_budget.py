"""KV pool size from the machine's memory: the rule, the start-up errors, and the CLIs' one-line errors.

Memory is given to the code under test (a ``MemoryInfo`` saying "this much is available"), so
the figures do not depend on the machine running the tests.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.block_manager import BlockManager, blocks_needed
from jaxserve.engine.build import build_local
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.executor import kv_bytes_per_block
from jaxserve.engine.kv_budget import plan_kv
from jaxserve.memory import GiB, MemoryInfo, weight_bytes, zeros_untouched
from jaxserve.model.demo import random_params_numpy

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
CFG = ModelConfig(name="small-opt", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=512)
PER_BLOCK = kv_bytes_per_block(CFG, 16)  # 2 x 2 layers x 16 tokens x 64 x 4 bytes = 16 KiB
ONE_SEQ = blocks_needed(512, 16) + 1  # 33 blocks: one sequence of the full context, plus the null block


@pytest.fixture(scope="module")
def params():
    return random_params_numpy(CFG)


def test_default_pool_is_the_fraction_of_what_the_weights_leave():
    w = weight_bytes(CFG)
    mem = MemoryInfo(w + 4 * MiB, "test", fraction=0.5)
    plan = plan_kv(CFG, EngineConfig(), 512, PER_BLOCK, mem)
    assert plan.num_blocks == 2 * MiB // PER_BLOCK == 128 and plan.nbytes == 128 * PER_BLOCK
    assert "50% of the" in plan.why and "test" in plan.why


def test_default_pool_is_capped_by_max_num_seqs_times_max_model_len():
    mem = MemoryInfo(GiB, "test", fraction=0.5)
    plan = plan_kv(CFG, EngineConfig(max_num_seqs=3), 512, PER_BLOCK, mem)
    assert plan.num_blocks == 3 * 32 + 1 and "capped by max_num_seqs 3 x max_model_len 512" in plan.why
    shorter = plan_kv(CFG, EngineConfig(max_num_seqs=3, max_model_len=100), 100, PER_BLOCK, mem)
    assert shorter.num_blocks == 3 * 7 + 1


def test_host_share_splits_memory_between_instances():
    w = weight_bytes(CFG)
    whole = MemoryInfo(2 * (w + 4 * MiB), "test")
    half = plan_kv(CFG, EngineConfig(), 512, PER_BLOCK, whole.share(2))
    assert half.num_blocks == 128 and "/ 2 instances" in half.why


def test_kv_cache_gb_overrides_the_fraction_but_must_fit_beside_the_weights():
    w = weight_bytes(CFG)
    mem = MemoryInfo(w + 4 * MiB, "test", fraction=0.5)
    plan = plan_kv(CFG, EngineConfig(kv_cache_gb=3 / 1024), 512, PER_BLOCK, mem)  # 3 MiB: above the 50%
    assert plan.num_blocks == 3 * MiB // PER_BLOCK and plan.why == "--kv-cache-gb"
    with pytest.raises(ConfigError) as e:
        plan_kv(CFG, EngineConfig(kv_cache_gb=5 / 1024), 512, PER_BLOCK, mem)
    msg = str(e.value)
    assert "does not fit" in msg and "GiB of KV (--kv-cache-gb)" in msg and "available (test)" in msg
    assert "lower --kv-cache-gb" in msg


def test_too_large_model_error_names_the_numbers():
    w = weight_bytes(CFG)
    mem = MemoryInfo(w + ONE_SEQ * PER_BLOCK, "test", fraction=0.5)  # 50% of what is left: half a sequence
    with pytest.raises(ConfigError) as e:
        plan_kv(CFG, EngineConfig(), 512, PER_BLOCK, mem)
    msg = str(e.value)
    assert f"{w / GiB:.2f} GiB of weights (float32)" in msg
    assert f"{ONE_SEQ * PER_BLOCK / GiB:.2f} GiB of KV for one sequence of max_model_len 512" in msg
    assert f"{mem.available / GiB:.2f} GiB available (test)" in msg
    for fix in ("--max-model-len", "--kv-cache-gb", "tp/pp"):
        assert fix in msg
    plan_kv(CFG, EngineConfig(max_model_len=128), 128, PER_BLOCK, mem)  # a shorter context fits
    with pytest.raises(ConfigError, match=r"GiB of weights .* available"):
        plan_kv(CFG, EngineConfig(num_blocks=4), 512, PER_BLOCK, MemoryInfo(w // 2, "test"))


def test_engine_sizes_its_pool_from_the_memory_it_is_given(params):
    w = weight_bytes(CFG)
    eng = LLMEngine(CFG, params, EngineConfig(), memory=MemoryInfo(w + 4 * MiB, "test", fraction=0.5))
    assert eng.blocks.num_blocks == 128 and eng.executor.kv[0][0].shape[0] == 128
    with pytest.raises(ConfigError, match="does not fit"):
        LLMEngine(CFG, params, EngineConfig(), memory=MemoryInfo(w + PER_BLOCK, "test"))


def test_instances_on_one_host_share_one_measurement(params, monkeypatch):
    w = weight_bytes(CFG)
    monkeypatch.setattr("jaxserve.engine.build.host_memory", lambda: MemoryInfo(2 * (w + 4 * MiB), "fake host"))
    router = build_local(CFG, params, [("prefill", EngineConfig(mode="prefill")),
                                       ("decode", EngineConfig(mode="decode"))], jax.devices()[:2])
    plans = [s.inst.core.kv_plan for s in router.slots]
    assert [p.num_blocks for p in plans] == [128, 128]
    assert all("fake host / 2 instances" in p.why for p in plans)


def test_weights_are_checked_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    from jaxserve.model.loader import export_hf, load_hf_checkpoint

    export_hf(random_params_numpy(CFG), CFG, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # reading it would fail differently
    monkeypatch.setattr("jaxserve.model.loader.host_memory", lambda: MemoryInfo(1000, "fake host"))
    with pytest.raises(ConfigError, match=r"the weights need .* only 0.00 GiB is available \(fake host\)"):
        load_hf_checkpoint(tmp_path)


def test_freed_blocks_are_reused_first():
    bm = BlockManager(10, 4)
    bm.grow("a", 8)
    bm.grow("b", 8)
    assert bm.table("a") == [1, 2] and bm.table("b") == [3, 4]
    bm.free("a")
    assert bm.grow("c", 12) == [1, 2, 5]
    bm.check_invariants()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
def test_untouched_zeros_cost_no_resident_memory():
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    before = rss()
    x = zeros_untouched((64, MiB), jnp.float32, sharding)  # 256 MiB
    assert rss() - before < 64 * MiB
    y = jax.jit(lambda a: a.at[3, :8].set(1.0), donate_argnums=0)(x)
    assert float(y.sum()) == 8.0 and np.asarray(y[3, :9]).tolist() == [1.0] * 8 + [0.0]
    assert rss() - before < 64 * MiB


def _small_model(tmp_path: Path) -> Path:
    from jaxserve.model.loader import export_hf

    return export_hf(random_params_numpy(CFG), CFG, tmp_path / "small")


@pytest.mark.parametrize("cmd", [["scripts/generate_offline.py", "--input", "IN"],
                                 ["-m", "jaxserve.launch", "--no-warmup", "--port", "1"]])
def test_clis_print_one_line_when_the_kv_cache_cannot_fit(cmd, tmp_path):
    model = _small_model(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"prompt_token_ids": [2, 5]}\n')
    cmd = [str(tmp_path / "in.jsonl") if a == "IN" else a for a in cmd]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAXSERVE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, *cmd, "--model", str(model), "--kv-cache-gb", "1000000"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode in (1, 2), r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "does not fit" in errors[0] and "1000000.00 GiB of KV (--kv-cache-gb)" in errors[0]
