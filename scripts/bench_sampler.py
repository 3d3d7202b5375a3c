"""The sampler without a sort vs the sort-based one it replaced: step time and compile time, side by side.

    python scripts/bench_sampler.py [--vocab 50272] [--rows 8,64] [--reps 10] [--no-write]

Both samplers take the same logits [B, V] (random normal, float32) and per-row settings and return
token ids. The baseline is the sampler jaxserve had until commit aa8e947 (kept here): a stable
argsort of every row, top-k / top-p / min-p applied in sorted order, jax.random.categorical.
Ours is ``jaxserve.model.sampling.sample_full`` (thresholds instead of a sort, Gumbel-max over a
counter-based hash; on the CPU the filter is a C++ custom call), called as the engine calls it, with
neutral penalty inputs and no logprobs. Settings: temperature 1 (the OpenAI default), top-p 0.9,
top-k 50. Compile time: ``jit(...).lower(...).compile()`` for 16 rows over a 2,048 vocabulary (the
demo model's), median of 3 fresh functions. Writes a section to docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from _docs import write_block

from jaxserve.model import sampling
from jaxserve.request import SamplingParams

SECTION = "Sampling without a sort"
SETTINGS = {"temperature 1": {"temperature": 1.0}, "top-p 0.9, T 0.8": {"temperature": 0.8, "top_p": 0.9},
            "top-k 50, T 0.8": {"temperature": 0.8, "top_k": 50}}


def sort_sampler(logits, temperature, top_k, top_p, seed_lo, seed_hi, step, ban, min_p, bias_ids, bias_vals):
    """The replaced sampler (bias, ban, then a stable argsort of each row)."""
    v = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[rows, jnp.where(bias_ids < 0, v, bias_ids)].add(bias_vals, mode="drop")
    logits = jnp.where(jnp.arange(v)[None, :] == ban[:, None], -jnp.inf, logits)
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sl = jnp.take_along_axis(logits, order, axis=-1) / t[:, None]
    rank = jnp.arange(v)[None, :]
    keep = jnp.where(top_k[:, None] > 0, rank < top_k[:, None], True)
    probs = jax.nn.softmax(jnp.where(keep, sl, -jnp.inf), axis=-1)
    keep = keep & (((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (rank == 0))
    keep = keep & (sl - sl[:, :1] >= jnp.log(min_p)[:, None])
    keys = jax.vmap(lambda lo, hi, s: jax.random.fold_in(jax.random.fold_in(jax.random.key(lo), hi), s))(
        seed_lo, seed_hi, step)
    pick = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, sl, -jnp.inf))
    sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where((temperature > 0) & (top_k != 1), sampled, greedy_tok)


def _inputs(rows: int, vocab: int, kw: dict) -> tuple:
    arr = sampling.SamplingArrays.from_params([SamplingParams(**kw)] * rows, list(range(rows)), [0] * rows, rows)
    logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    return logits, arr


def _ours(logits: jax.Array, arr: sampling.SamplingArrays) -> tuple:
    b, v = logits.shape
    return (logits, *sampling._neutral(b, v, None), np.bool_(False), *arr.fields())


def _time(fn, args: tuple, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def _compile_s(make, args: tuple) -> float:
    out = []
    for _ in range(3):
        f = jax.jit(make())  # a fresh function each time: nothing cached in this process
        t0 = time.perf_counter()
        f.lower(*args).compile()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def run(a: argparse.Namespace) -> str:
    load0 = os.getloadavg()[0]
    lines = ["| rows | setting | sort-based (baseline) | ours | ratio |", "|---|---|---|---|---|"]
    base = jax.jit(sort_sampler)
    for rows in a.rows:
        for name, kw in SETTINGS.items():
            logits, arr = _inputs(rows, a.vocab, kw)
            t_base = _time(base, (logits, *arr.fields()), a.reps)
            t_ours = _time(sampling.sample_full, _ours(logits, arr), a.reps)
            lines.append(f"| {rows} | {name} | {t_base * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | "
                         f"**{t_base / t_ours:.1f}x** |")
            print(lines[-1], file=sys.stderr)
    logits, arr = _inputs(16, 2048, {})
    c_base = _compile_s(lambda: (lambda *x: sort_sampler(*x)), (logits, *arr.fields()))
    c_ours = _compile_s(lambda: (lambda *x: sampling.sample_full.__wrapped__(*x)), _ours(logits, arr))
    cmd = "python scripts/bench_sampler.py " + " ".join(sys.argv[1:])
    return "\n".join([
        f"### {SECTION}", "",
        f"Command: `{cmd.strip()}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end; {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"vocabulary {a.vocab}, median of {a.reps} calls after one warm call.", "",
        "One sampling call (host to host), the replaced sort-based sampler vs `sample_full`:", "", *lines, "",
        f"Compile, 16 rows x 2,048 vocabulary (median of 3 fresh functions): sort-based {c_base:.2f} s, "
        f"ours {c_ours:.2f} s ({c_base / c_ours:.1f}x less). The sort-based sampler also needed a second "
        "program per row count for penalties and logprobs; `sample_full` is the only one.", ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    md = run(a)
    print(md)
    if not a.no_write:
        from pathlib import Path

        write_block(Path(__file__).resolve().parents[1] / "docs" / "performance.md", SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
