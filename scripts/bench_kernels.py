"""Time the Pallas attention kernels against their jnp references on the current backend.

    python scripts/bench_kernels.py [--batch 32 --heads 40 --head-dim 128 --context 1024 ...]

Prints one line per kernel: median milliseconds for the kernel and the reference, and
kernel/reference (below 1 means the kernel is faster). On GPU the kernel is compiled
(Triton); elsewhere it runs in the Pallas interpreter, so CPU ratios only show that the
script works. Both outputs are compared before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)


def median_ms(fn: Callable[[], jax.Array], iters: int) -> float:
    fn().block_until_ready()  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_decode(args: argparse.Namespace, dtype: jnp.dtype) -> None:
    rng = np.random.default_rng(0)
    b, h, d, bs = args.batch, args.heads, args.head_dim, args.block_size
    blocks_per_seq = -(-args.context // bs)
    num_blocks = 1 + b * blocks_per_seq
    q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
    k_pages = jnp.asarray(rng.standard_normal((num_blocks, bs, h, d)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((num_blocks, bs, h, d)), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, num_blocks)).reshape(b, blocks_per_seq), jnp.int32)
    lens = jnp.asarray(rng.integers(args.context // 2, args.context + 1, b), jnp.int32)
    call = (q, k_pages, v_pages, tables, lens)
    scale = d**-0.5
    kernel = lambda: paged_decode_attention(*call, sm_scale=scale)  # noqa: E731
    ref = lambda: paged_decode_attention_reference(*call, sm_scale=scale)  # noqa: E731
    err = float(jnp.max(jnp.abs(kernel().astype(jnp.float32) - ref().astype(jnp.float32))))
    report(
        f"decode  B={b} H={h} D={d} bs={bs} ctx<={args.context} {dtype.name}", kernel, ref, err, args.iters
    )


def bench_prefill(args: argparse.Namespace, dtype: jnp.dtype) -> None:
    rng = np.random.default_rng(1)
    h, d = args.heads, args.head_dim
    lens = rng.integers(args.tokens // 8, args.tokens // 2, 16)
    lens = lens[np.cumsum(lens) <= args.tokens]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    q, k, v = (jnp.asarray(rng.standard_normal((args.tokens, h, d)), dtype) for _ in range(3))
    scale = d**-0.5
    kernel = lambda: prefill_attention(q, k, v, cu, sm_scale=scale)  # noqa: E731
    ref = lambda: prefill_attention_reference(q, k, v, cu, sm_scale=scale)  # noqa: E731
    err = float(jnp.max(jnp.abs(kernel().astype(jnp.float32) - ref().astype(jnp.float32))))
    name = f"prefill T={args.tokens} ({len(lens)} seqs) H={h} D={d} {dtype.name}"
    report(name, kernel, ref, err, args.iters)


def report(name: str, kernel: Callable, ref: Callable, err: float, iters: int) -> None:
    k_ms, r_ms = median_ms(kernel, iters), median_ms(ref, iters)
    print(
        f"{name}: kernel {k_ms:.3f} ms, reference {r_ms:.3f} ms, ratio {k_ms / r_ms:.2f}, max|diff| {err:.2e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256, help="max keys per decode sequence")
    p.add_argument("--tokens", type=int, default=512, help="packed prefill tokens")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, f32 elsewhere)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    print(
        f"backend {backend} ({jax.devices()[0].device_kind}); kernel {'compiled' if backend == 'gpu' else 'interpreted'}"
    )
    bench_decode(args, dtype)
    bench_prefill(args, dtype)


if __name__ == "__main__":
    main()
