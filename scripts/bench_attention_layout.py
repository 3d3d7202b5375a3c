"""Would a head-major KV page layout speed up CPU decode attention? Measured, side by side.

    python scripts/bench_attention_layout.py                 # the default grid (~1 minute)
    python scripts/bench_attention_layout.py --shapes 64x512,8x300 --heads 12

For each (batch, context): random pages, random block tables; the engine's decode attention
(``jaxserve.model.attention.paged_decode_attention_xla``, pages ``[N, bs, H, Dh]``, a block pair per
loop iteration with an online softmax) against the same algorithm on head-major pages
``[N, H, bs, Dh]`` (each block's keys of one head contiguous, so the per-block scores are plain
batched mat-vecs), with 1, 2 and 4 blocks per iteration. Both are checked against each other
(max abs difference printed); times are medians of interleaved repetitions on one jit each.
OPT-125m head shape (12 heads x 64) by default, float32, 16-token blocks. One attention call is
one layer of a decode step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxserve.model.attention import NEG_INF, AttnGroup, paged_decode_attention_xla


def head_major_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, group: AttnGroup, scale: float,
                      per: int) -> jax.Array:
    """``paged_decode_attention_xla`` on pages ``[N, H, bs, Dh]``: [B, 1, H, Dh]."""
    b, mb = group.block_tables.shape
    _, h, bs, d = k_pages.shape
    qb = q[jnp.minimum(group.query_index[:, 0], q.shape[0] - 1)].astype(jnp.float32)
    ctx = group.context_lens
    tables = jnp.pad(group.block_tables, ((0, 0), (0, (-mb) % per)))
    n_iter = (jnp.max(ctx) + per * bs - 1) // (per * bs)

    def body(i, carry):
        m, denom, acc = carry
        blk = jax.lax.dynamic_slice_in_dim(tables, i * per, per, axis=1)
        k = jnp.moveaxis(k_pages[blk], 1, 2).reshape(b, h, per * bs, d)
        v = jnp.moveaxis(v_pages[blk], 1, 2).reshape(b, h, per * bs, d)
        s = jnp.einsum("bhd,bhtd->bht", qb, k, preferred_element_type=jnp.float32) * scale
        kpos = i * per * bs + jnp.arange(per * bs, dtype=jnp.int32)
        s = jnp.where(kpos[None, None, :] < ctx[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        return m_new, denom * alpha + p.sum(-1), acc * alpha[..., None] + jnp.einsum("bht,bhtd->bhd", p, v)

    init = (jnp.full((b, h), NEG_INF, jnp.float32), jnp.zeros((b, h), jnp.float32), jnp.zeros((b, h, d), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, n_iter, body, init)
    return (acc / jnp.maximum(denom, 1e-30)[..., None])[:, None]


def run(batch: int, context: int, heads: int, head_dim: int, block: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    mb = -(-context // block)
    n = batch * mb + 1
    kp = jnp.asarray(rng.standard_normal((n, block, heads, head_dim), np.float32))
    vp = jnp.asarray(rng.standard_normal((n, block, heads, head_dim), np.float32))
    kh, vh = jnp.transpose(kp, (0, 2, 1, 3)), jnp.transpose(vp, (0, 2, 1, 3))
    tables = jnp.asarray(rng.permutation(np.arange(1, n))[: batch * mb].reshape(batch, mb).astype(np.int32))
    group = AttnGroup(jnp.arange(batch, dtype=jnp.int32)[:, None], tables, jnp.full((batch,), context, jnp.int32))
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim), np.float32))
    scale = head_dim ** -0.5
    fns = {"engine [N,bs,H,Dh]": (jax.jit(functools.partial(paged_decode_attention_xla, scale=scale)), kp, vp)}
    for per in (1, 2, 4):
        fns[f"head-major x{per}"] = (jax.jit(functools.partial(head_major_decode, scale=scale, per=per)), kh, vh)
    ref = None
    diff = 0.0
    for f, k, v in fns.values():
        out = np.asarray(f(q, k, v, group))
        ref = out if ref is None else ref
        diff = max(diff, float(np.abs(out - ref).max()))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):  # interleaved
        for name, (f, k, v) in fns.items():
            t0 = time.perf_counter()
            f(q, k, v, group).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["max_abs_diff"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x512,8x300,32x512,64x300,64x512,16x1024",
                    help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        ap.error(f"--shapes: expected BATCHxCONTEXT,... with positive integers, got {a.shapes!r}")
    print(f"# {os.cpu_count()} cores, jax {jax.__version__}, {a.heads} heads x {a.head_dim}, "
          f"block {a.block_size}, float32, load {os.getloadavg()[0]:.2f}\n")
    rows = [(b, c, run(b, c, a.heads, a.head_dim, a.block_size, a.reps)) for b, c in shapes]
    names = [k for k in rows[0][2] if k != "max_abs_diff"]
    print("| batch x context | " + " | ".join(f"{n} (ms)" for n in names) + " | best head-major speedup | max abs diff |")
    print("|---" * (len(names) + 3) + "|")
    for b, c, r in rows:
        best = min(r[n] for n in names[1:])
        print(f"| {b} x {c} | " + " | ".join(f"{1e3 * r[n]:.1f}" for n in names)
              + f" | {r[names[0]] / best:.2f}x | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
