"""The one-command GPU check: kernels against their references, bf16 against float32, the decode step
against the memory roofline, and KV hand-off bandwidth, each a small table of figures.

    check_kernels(dry)   Pallas paged decode / prefill attention (compiled on GPU, interpreted in a dry run)
                         vs the jnp references: max error and time per call, per shape and dtype
    check_bf16(dry)      one packed prefill of a small random OPT: bf16 logits vs float32 (error, top-1 agreement)
    check_roofline(dry)  a batch-1 decode step of an OPT-1.3b-shaped bf16 model vs parameter bytes / the
                         device's measured copy bandwidth
    check_transfer(dry)  export + import of one request's KV (LocalTransport) between two instances' meshes
                         (the same device when only one is present): GB/s vs a plain device copy
      --> rows of (check, what, figure, verdict) --> markdown (scripts/gpu_check.py writes it to docs)

Runs with what a GPU machine has (jax with CUDA, flax, numpy; no ray, no network). ``dry=True`` runs
everything on CPU with tiny shapes and interpreted kernels, so the script is exercised in CI.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig, model_preset
from jaxserve.profiling.profile import times_ms


@dataclasses.dataclass
class Row:
    check: str
    what: str
    figure: str
    verdict: str


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` (its result waited for), after one call that compiles."""
    jax.block_until_ready(fn())
    return float(np.median(times_ms(fn, reps))) / 1e3


def _tol(dtype: Any) -> float:
    return 2e-2 if dtype == jnp.bfloat16 else 2e-3


def _compare(what: str, kernel: Callable[[], Any], ref: Callable[[], Any], tol: float, reps: int) -> Row:
    err = float(jnp.max(jnp.abs(kernel().astype(jnp.float32) - ref().astype(jnp.float32))))
    t_k, t_r = timed(kernel, reps), timed(ref, reps)
    return Row("kernels", what, f"max err {err:.1e}; {t_k * 1e3:.3f} ms vs reference {t_r * 1e3:.3f} ms",
               "ok" if err <= tol else "FAILED")


def check_kernels(dry: bool) -> list[Row]:
    from pallas_kernels import (
        paged_decode_attention,
        paged_decode_attention_reference,
        prefill_attention,
        prefill_attention_reference,
    )

    interpret, reps = (True, 1) if dry else (False, 20)
    rows, rng = [], np.random.default_rng(0)
    configs = [(4, 64, 16, jnp.float32)] if dry else [(b, d, bs, dt) for b in (1, 64) for d in (64, 128)
                                                      for bs in (16, 32) for dt in (jnp.float32, jnp.bfloat16)]
    for batch, dh, bs, dt in configs:
        h, ctx = 4 if dry else 32, 40 if dry else 1000
        mb = -(-ctx // bs)
        n = batch * mb + 1
        q = jnp.asarray(rng.standard_normal((batch, h, dh)), dt)
        kp = jnp.asarray(rng.standard_normal((n, bs, h, dh)), dt)
        vp = jnp.asarray(rng.standard_normal((n, bs, h, dh)), dt)
        tables = jnp.asarray(rng.permutation(np.arange(1, n)).reshape(batch, mb), jnp.int32)
        lens = jnp.full((batch,), ctx, jnp.int32)
        kernel = functools.partial(paged_decode_attention, q, kp, vp, tables, lens, sm_scale=dh ** -0.5,
                                   interpret=interpret)
        ref = functools.partial(paged_decode_attention_reference, q, kp, vp, tables, lens, sm_scale=dh ** -0.5)
        rows.append(_compare(f"paged decode B={batch} H={h} Dh={dh} bs={bs} ctx={ctx} {jnp.dtype(dt).name}",
                             kernel, ref, _tol(dt), reps))
    for t, dt in ([(64, jnp.float32)] if dry else [(2048, jnp.float32), (2048, jnp.bfloat16)]):
        h, dh = (4, 64) if dry else (32, 128)
        q, k, v = (jnp.asarray(rng.standard_normal((t, h, dh)), dt) for _ in range(3))
        cu = jnp.asarray([0, t // 4, t // 2, t], jnp.int32)
        kernel = functools.partial(prefill_attention, q, k, v, cu, sm_scale=dh ** -0.5, interpret=interpret)
        ref = functools.partial(prefill_attention_reference, q, k, v, cu, sm_scale=dh ** -0.5)
        rows.append(_compare(f"prefill T={t} H={h} Dh={dh} (3 prompts) {jnp.dtype(dt).name}", kernel, ref,
                             _tol(dt), reps))
    return rows


def _small_cfg(dtype: str) -> ModelConfig:
    return ModelConfig(name="check", vocab_size=1024, hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                       num_attention_heads=4, max_position_embeddings=512, dtype=dtype)


def _prefill_logits(cfg: ModelConfig, params: Any, tokens: np.ndarray) -> np.ndarray:
    from jaxserve.engine.executor import ModelExecutor
    from jaxserve.model.inputs import SeqChunk, StepShape, build_step_inputs

    ex = ModelExecutor(cfg, params, jax.devices()[:1])
    ex.init_kv(-(-len(tokens) // 16) + 1, 16)
    inp = build_step_inputs([[SeqChunk(tokens.tolist(), 0, list(range(1, -(-len(tokens) // 16) + 1)))]],
                            StepShape(len(tokens), 1, True), 16)
    return np.asarray(ex.execute(inp), np.float32)


def check_bf16(dry: bool) -> list[Row]:
    from jaxserve.model.demo import random_params_numpy

    params = random_params_numpy(_small_cfg("float32"), 0, std=0.05)
    tokens = np.random.default_rng(1).integers(3, 1024, 32 if dry else 256)
    f32 = _prefill_logits(_small_cfg("float32"), params, tokens)
    bf = _prefill_logits(_small_cfg("bfloat16"), jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), params), tokens)
    rel = float(np.max(np.abs(bf - f32)) / np.max(np.abs(f32)))
    return [Row("bf16", f"packed prefill of {len(tokens)} tokens, 4-layer random OPT: bf16 vs float32 logits",
                f"max error {rel:.2%} of the largest logit; top-1 equal {bool(bf.argmax() == f32.argmax())}",
                "ok" if rel <= 0.05 else "CHECK")]


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Device read+write bytes per second of a jitted copy (x + 0 into a new buffer)."""
    x = jnp.zeros(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 0)
    return 2 * nbytes / timed(lambda: copy(x), reps)


def check_roofline(dry: bool) -> list[Row]:
    from jaxserve.engine.executor import ModelExecutor
    from jaxserve.model.demo import random_params_numpy
    from jaxserve.model.inputs import SeqChunk, StepShape, build_step_inputs

    cfg = _small_cfg("bfloat16") if dry else model_preset("opt-1.3b", dtype="bfloat16")
    params = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), random_params_numpy(
        dataclasses.replace(cfg, dtype="float32"), 0))
    pbytes = sum(int(a.size) * 2 for a in jax.tree.leaves(params))
    ex = ModelExecutor(cfg, params, jax.devices()[:1])
    ex.init_kv(40, 16)
    inp = build_step_inputs([[SeqChunk([5], 127, list(range(1, 9)))]], StepShape(1, 1, False, ((1, 1, 32),)), 16)
    step = timed(lambda: ex.execute(inp), 3 if dry else 30)
    bw = copy_bandwidth(64 * 2**20 if dry else 2 * 2**30, 3 if dry else 10)
    roof = pbytes / bw
    return [Row("roofline", f"{cfg.name} bf16 decode step, batch 1, context 128 ({pbytes / 1e9:.2f} GB of weights)",
                f"{step * 1e3:.2f} ms vs roofline {roof * 1e3:.2f} ms (copy {bw / 1e9:.0f} GB/s): {step / roof:.2f}x",
                "ok" if step / roof <= 2.0 else "SLOW")]


def _hand_off(transport: Any, src: Any, dst: Any, ids: list[int], tokens: int) -> Any:
    transport.import_kv(dst, ids, transport.export_kv(src, ids, tokens))
    return dst.kv


def check_transfer(dry: bool) -> list[Row]:
    from jaxserve.engine.executor import ModelExecutor
    from jaxserve.engine.kv_transfer import LocalTransport
    from jaxserve.model.demo import random_params_numpy

    cfg = _small_cfg("float32") if dry else model_preset("opt-1.3b", dtype="bfloat16")
    params = random_params_numpy(dataclasses.replace(cfg, dtype="float32"), 0)
    if cfg.dtype == "bfloat16":
        params = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), params)
    devs = jax.devices()
    src = ModelExecutor(cfg, params, devs[:1])
    dst = ModelExecutor(cfg, params, devs[1:2] if len(devs) > 1 else devs[:1])
    rows, transport = [], LocalTransport(one_pass=False)  # the staged path: what accelerators run
    for tokens in ((64,) if dry else (160, 512, 2048)):
        n = -(-tokens // 16)
        for ex in (src, dst):
            ex.init_kv(2 * n + 2, 16)
        t = timed(functools.partial(_hand_off, transport, src, dst, list(range(1, n + 1)), tokens), 3 if dry else 20)
        nbytes = 2 * cfg.num_hidden_layers * tokens * cfg.hidden_size * (2 if cfg.dtype == "bfloat16" else 4)
        plain = timed(functools.partial(jax.device_put, src.kv, dst.devices[0]), 3 if dry else 20)
        pool = sum(int(k.nbytes) + int(v.nbytes) for k, v in src.kv)
        rows.append(Row("transfer", f"{cfg.name} KV of {tokens} tokens ({nbytes / 1e6:.1f} MB), "
                        f"{'two devices' if len(devs) > 1 else 'one device'}",
                        f"{t * 1e3:.2f} ms = {nbytes / t / 1e9:.1f} GB/s; plain device_put of the pool "
                        f"{pool / plain / 1e9:.1f} GB/s", "-"))
    return rows


CHECKS: dict[str, Callable[[bool], list[Row]]] = {
    "kernels": check_kernels, "bf16": check_bf16, "roofline": check_roofline, "transfer": check_transfer}


def render(rows: list[Row]) -> str:
    lines = ["| check | what | figure | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.what} | {r.figure} | {r.verdict} |" for r in rows]
    return "\n".join(lines) + "\n"
