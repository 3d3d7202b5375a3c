"""Issue 4: cross-mesh KV transfer bandwidth against a plain device-to-device copy, and the latency
breakdown of a small disaggregated run.

    python scripts/bench_kv_transfer.py            # full run (~80 s on 2 quiet cores; peak RSS ~16 GB)
    python scripts/bench_kv_transfer.py --quick    # 160/512 tokens, 3 repetitions (~40 s)

One process, 8 virtual CPU devices (``--xla_force_host_platform_device_count=8``), float32.

1. Bandwidth. Executors hold an OPT-1.3b-shaped paged KV cache (24 layers, 32 heads, head_dim 64,
   16-token blocks: 393,216 bytes of K+V per token). To keep parameters small the model config
   shrinks ``vocab_size`` and ``ffn_dim`` (which do not touch the KV) and the weights are zeros
   (only the KV is moved). Instances: tp2 on devices 0-1, tp1 on device 2, pp2 (tp1 stages) on
   devices 3-4. For each request size and every pair of layouts, two transports, each timed to
   completion (``jax.block_until_ready`` on the destination cache; block ids differ on the two
   sides): ``LocalTransport()`` ("one-pass": on CPU meshes the destination reads the source pages
   through zero-copy views in one jitted loop) and ``LocalTransport(one_pass=False)`` ("staged":
   gather on the source mesh, ``device_put``, scatter into the donated destination cache, block
   count padded to a power-of-two bucket; the accelerator path). Baselines on the same bytes in
   the same run: ``jax.device_put`` of the 48 per-layer ``[n, 16, 32, 64]`` arrays from device 5 to
   device 6 ("copy"), the same bytes as one stacked array, and a numpy ``copyto`` on the host.
   GB/s = request KV bytes / median time (after a warm-up call, which compiles; 2048 tokens: half
   the repetitions unless ``--reps``). The copy and both transfers alternate in one loop, so load
   from other processes hits all alike; ratios are medians of per-repetition ratios. Minor page
   faults per one-pass transfer are counted. Exactness is checked once per pair and transport
   (random KV, gathered back).
2. Latency breakdown. A small model (OPT-125m width, 2 layers, small vocabulary) served
   disaggregated: prefill tp2 (devices 0-1) -> decode tp1 (device 2), through
   ``build_local`` + ``run_requests``. Per request, from its lifecycle events: prefill queue,
   prefill exec, transfer, decode queue, decode exec (``planner.simulator.SimResult.breakdown``,
   the planner's five-stage definition); mean and p90. Two transports: the engine's default
   ``LocalTransport`` (dispatched asynchronously: the stamps cover issuing the copy, and the copy
   itself when the CPU client runs it inline, as it does for a one-device decode mesh) and the
   same transport waiting for the copy to land.

Prints markdown tables (pasted into ``docs/performance.md``, section "KV transfer (issue 4)").
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from _timing import median_time

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxserve.config import EngineConfig, ModelConfig, model_preset
from jaxserve.engine.build import build_local
from jaxserve.engine.executor import ModelExecutor, compile_count, kv_bytes_per_block
from jaxserve.engine.frontend import run_requests
from jaxserve.engine.kv_transfer import LocalTransport, _bucket
from jaxserve.engine.pipeline import PipelineExecutor
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.opt import abstract_params
from jaxserve.request import Event, Request, SamplingParams
from planner.simulator import SimResult

BLOCK = 16
TARGET = 0.5
Executor = ModelExecutor | PipelineExecutor


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- 1. bandwidth -------------------------------------------------------------------------------
def kv_model() -> ModelConfig:
    """OPT-1.3b's KV shape (24 layers x 32 heads x 64) with a tiny vocabulary and FFN."""
    return model_preset("opt-1.3b").replace(vocab_size=512, ffn_dim=256)


def zero_params(cfg: ModelConfig) -> Any:
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))


def block_ids(n: int, num_blocks: int, reverse: bool) -> list[int]:
    """Source blocks 1..n; destination blocks taken from the top of the cache, so ids differ."""
    return list(range(num_blocks - 1, num_blocks - 1 - n, -1)) if reverse else list(range(1, n + 1))


def host_copy(src: list[np.ndarray], out: list[np.ndarray]) -> None:
    for o, a in zip(out, src, strict=True):
        np.copyto(o, a)


def device_copy(arrays: Any, device: jax.Device) -> None:
    jax.block_until_ready(jax.device_put(arrays, device))


def transfer(transport: LocalTransport, src: Executor, s_ids: list[int], dst: Executor, d_ids: list[int],
             tokens: int) -> None:
    """The serving path's copy, waited for on the destination cache."""
    transport.copy(src, s_ids, dst, d_ids, tokens)
    jax.block_until_ready(dst.kv)


TRANSPORTS = {"one-pass": LocalTransport(), "staged": LocalTransport(one_pass=False)}


def check_exact(transport: LocalTransport, src: Executor, dst: Executor, n: int, num_blocks: int,
                rng: np.random.Generator) -> bool:
    cfg = src.cfg
    shape = (n, BLOCK, cfg.num_attention_heads, cfg.head_dim)
    data = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
            for _ in range(cfg.num_hidden_layers)]
    s_ids, d_ids = block_ids(n, num_blocks, False), block_ids(n, num_blocks, True)
    src.scatter_blocks(s_ids, data)
    transport.copy(src, s_ids, dst, d_ids, n * BLOCK)
    got = dst.gather_blocks(d_ids)
    return all(np.array_equal(np.asarray(g), w) for gl, wl in zip(got, data, strict=True)
               for g, w in zip(gl, wl, strict=True))


def bench_bandwidth(sizes: Sequence[int], reps: int, reps_large: int) -> dict[str, Any]:
    cfg = kv_model()
    devs = jax.devices()
    per_token = kv_bytes_per_block(cfg, 1)
    num_blocks = _bucket(-(-max(sizes) // BLOCK)) + 2  # + null block; dst ids count down from the top
    log(f"building executors (KV {per_token} B/token, {num_blocks} blocks each)")
    params = zero_params(cfg)
    ex: dict[str, Executor] = {
        "tp2": ModelExecutor(cfg, params, devs[0:2], tp=2),
        "tp1": ModelExecutor(cfg, params, devs[2:3], tp=1),
        "pp2": PipelineExecutor(cfg, params, devs[3:5], tp=1, pp=2),
    }
    del params
    for e in ex.values():
        e.init_kv(num_blocks, BLOCK)
    pairs = [("tp2", "tp1"), ("tp1", "tp2"), ("pp2", "tp1"), ("pp2", "tp2"), ("tp1", "pp2")]
    rng = np.random.default_rng(0)
    exact = {f"{name} {a}->{b}": check_exact(tr, ex[a], ex[b], 4, num_blocks, rng)
             for a, b in pairs for name, tr in TRANSPORTS.items()}
    log(f"exactness: {exact}")
    rows = []
    shape_of = (BLOCK, cfg.num_attention_heads, cfg.head_dim)
    for tokens in sizes:
        n = -(-tokens // BLOCK)
        nbytes = tokens * per_token
        log(f"{tokens} tokens ({nbytes / 2**20:.0f} MiB, {n} blocks -> bucket {_bucket(n)})")
        row: dict[str, Any] = {"tokens": tokens, "bytes": nbytes, "blocks": n, "bucket": _bucket(n)}
        # baselines on the same bytes: host memcpy, one device to another (48 arrays, and stacked)
        host = [rng.standard_normal((n, *shape_of), np.float32) for _ in range(2 * cfg.num_hidden_layers)]
        out = [np.empty_like(a) for a in host]
        row["numpy"] = median_time(functools.partial(host_copy, host, out), reps)
        del out
        stacked = jax.device_put(np.stack(host), devs[5])
        row["copy1"] = median_time(functools.partial(device_copy, stacked, devs[6]), reps)
        del stacked
        arrs = jax.device_put(host, devs[5])
        del host
        copies: list[float] = []
        for a, b in pairs:
            src, dst = ex[a], ex[b]
            s_ids, d_ids = block_ids(n, num_blocks, False), block_ids(n, num_blocks, True)
            t: dict[str, list[float]] = {k: [] for k in ("copy", *TRANSPORTS, "faults")}
            for tr in TRANSPORTS.values():
                transfer(tr, src, s_ids, dst, d_ids, tokens)  # warm-up (compiles)
            device_copy(arrs, devs[6])
            for _ in range(reps if tokens <= 512 else reps_large):  # interleaved, so load from elsewhere hits all alike
                t0 = time.perf_counter()
                device_copy(arrs, devs[6])
                t["copy"].append(time.perf_counter() - t0)
                for name, tr in TRANSPORTS.items():
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    transfer(tr, src, s_ids, dst, d_ids, tokens)
                    t[name].append(time.perf_counter() - t0)
                    if name == "one-pass":
                        t["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            copies += t["copy"]
            x = {k: statistics.median(v) for k, v in t.items()}
            for name in TRANSPORTS:
                x[f"ratio {name}"] = statistics.median(c / tt for c, tt in zip(t["copy"], t[name], strict=True))
            row[f"{a}->{b}"] = x
            log(f"  {a}->{b}: one-pass {nbytes / x['one-pass'] / 1e9:.2f} GB/s, staged "
                f"{nbytes / x['staged'] / 1e9:.2f} GB/s, copy {nbytes / x['copy'] / 1e9:.2f} GB/s, "
                f"ratio {x['ratio one-pass']:.2f} / {x['ratio staged']:.2f}")
        row["copy"] = statistics.median(copies)
        del arrs
        rows.append(row)
    return {"rows": rows, "pairs": [f"{a}->{b}" for a, b in pairs], "exact": exact,
            "per_token": per_token}


def bandwidth_tables(res: dict[str, Any]) -> str:
    rows, pairs = res["rows"], res["pairs"]

    def gbs(nbytes: int, t: float) -> str:
        return f"{nbytes / t / 1e9:.2f}"

    out = ["| request | KV MiB | blocks (bucket) | numpy copyto | device_put copy (48 arrays) | "
           "device_put copy (1 array) | " + " | ".join(f"{p} one-pass | {p} staged" for p in pairs) + " |",
           "|---" * (6 + 2 * len(pairs)) + "|"]
    for r in rows:
        out.append(f"| {r['tokens']} tokens | {r['bytes'] / 2**20:.0f} | {r['blocks']} ({r['bucket']}) | "
                   f"{gbs(r['bytes'], r['numpy'])} | {gbs(r['bytes'], r['copy'])} | {gbs(r['bytes'], r['copy1'])} | "
                   + " | ".join(f"{gbs(r['bytes'], r[p]['one-pass'])} | {gbs(r['bytes'], r[p]['staged'])}"
                                for p in pairs) + " |")
    for name in TRANSPORTS:
        out += ["", f"Transfer / copy, {name} (median of per-repetition ratios; target >= {TARGET}):", "",
                "| request | " + " | ".join(pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
        for r in rows:
            out.append(f"| {r['tokens']} tokens | "
                       + " | ".join(f"{r[p][f'ratio {name}']:.2f}" for p in pairs) + " |")
    out += ["", "One-pass transfer, ms (median) against the copy of the same repetitions, with minor page "
            "faults per transfer:", "",
            "| request | pair | one-pass | staged | copy | page faults / one-pass transfer |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        for p in pairs:
            x = r[p]
            out.append(f"| {r['tokens']} | {p} | {1e3 * x['one-pass']:.1f} | {1e3 * x['staged']:.1f} | "
                       f"{1e3 * x['copy']:.1f} | {x['faults']:.0f} |")
    out += ["", f"Exact (random KV through each pair and transport, gathered back): {res['exact']}"]
    return "\n".join(out)


# ---- 2. latency breakdown -----------------------------------------------------------------------
class WaitingTransport(LocalTransport):
    """``LocalTransport`` that returns only when the destination cache holds the copy."""

    def copy(self, src: Any, src_blocks: Sequence[int], dst: Any, dst_blocks: Sequence[int],
             num_tokens: int) -> None:
        super().copy(src, src_blocks, dst, dst_blocks, num_tokens)
        jax.block_until_ready(dst.kv)


def breakdown(requests: Sequence[Request]) -> dict[str, np.ndarray]:
    """Five stages per request from its events, via the planner's ``SimResult.breakdown``.

    Decode queue = (transfer began - prefill ended) + (decode began - transfer ended); the
    timestamps are shifted so the planner's stage order (queue, then transfer) gives exactly that.
    """
    def t(r: Request, kind: Event) -> float:
        return r.event_times(kind)[0]

    reqs = [r for r in requests if r.event_times(Event.TRANSFER_BEGAN)]
    pq = np.array([t(r, Event.PREFILL_QUEUED) for r in reqs])
    pb = np.array([t(r, Event.PREFILL_BEGAN) for r in reqs])
    pe = np.array([t(r, Event.PREFILL_ENDED) for r in reqs])
    tb = np.array([t(r, Event.TRANSFER_BEGAN) for r in reqs])
    te = np.array([t(r, Event.TRANSFER_ENDED) for r in reqs])
    db = np.array([t(r, Event.DECODE_BEGAN) for r in reqs])
    fin = np.array([t(r, Event.FINISHED) for r in reqs])
    admit = pe + (tb - pe) + (db - te)
    res = SimResult(pq, np.array([len(r.output_token_ids) for r in reqs]), pb, pe, admit, admit + (te - tb), fin)
    return res.breakdown()


def make_requests(n: int, max_prompt: int, out_len: int, vocab: int, tag: str) -> list[Request]:
    rng = np.random.default_rng(1)
    lens = rng.integers(max_prompt // 8, max_prompt + 1, n)
    return [Request(f"{tag}-{i}", rng.integers(4, vocab, int(p)).tolist(),
                    SamplingParams(max_tokens=out_len, ignore_eos=True)) for i, p in enumerate(lens)]


def bench_latency(n: int, max_prompt: int, out_len: int) -> dict[str, Any]:
    cfg = model_preset("opt-125m").replace(num_hidden_layers=2, vocab_size=1024)
    params = random_params_numpy(cfg)
    layouts = [("prefill", EngineConfig(mode="prefill", tp=2, max_num_seqs=4, max_model_len=256)),
               ("decode", EngineConfig(mode="decode", tp=1, max_num_seqs=16, max_model_len=256))]
    eng = build_local(cfg, params, layouts, jax.devices())
    # a first pass of the same workload compiles exactly the shapes the timed passes use (scheduling is
    # step-driven, so the batches repeat); cheaper than engine.warmup()'s every-bucket compile
    t0 = time.perf_counter()
    run_requests(eng, make_requests(n, max_prompt, out_len, cfg.vocab_size, "warm"))
    log(f"latency: warm-up pass {time.perf_counter() - t0:.1f} s")
    out: dict[str, Any] = {"n": n, "max_prompt": max_prompt, "out_len": out_len, "layout": "prefill tp2 -> decode tp1",
                           "model": "opt-125m width (768, 12 heads), 2 layers, vocab 1024", "runs": {}}
    for name, transport in (("async (engine default)", LocalTransport()),
                            ("waiting for the copy", WaitingTransport())):
        eng.transport = transport
        reqs = make_requests(n, max_prompt, out_len, cfg.vocab_size, name[:5])
        c0, t0 = compile_count(), time.perf_counter()
        run_requests(eng, reqs)
        wall = time.perf_counter() - t0
        out["runs"][name] = {"wall": wall, "stages": breakdown(reqs), "compiles": compile_count() - c0}
        log(f"latency [{name}]: {wall:.2f} s, {compile_count() - c0} compilations")
    return out


def latency_table(res: dict[str, Any]) -> str:
    out = [f"{res['n']} requests arriving together, prompts {res['max_prompt'] // 8}-{res['max_prompt']} "
           f"tokens, {res['out_len']} output tokens each; {res['model']}; {res['layout']}.", ""]
    for name, run in res["runs"].items():
        out += [f"Transport: {name}; wall {run['wall']:.2f} s; {run['compiles']} compilations in the timed pass.",
                "",
                "| stage | mean ms | p90 ms |", "|---|---|---|"]
        for stage, v in run["stages"].items():
            out.append(f"| {stage.replace('_', ' ')} | {1e3 * v.mean():.1f} | {1e3 * np.percentile(v, 90):.1f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--latency-requests", type=int, default=None, help="requests in the disaggregated run")
    ap.add_argument("--skip-latency", action="store_true")
    a = ap.parse_args()
    sizes = [160, 512] if a.quick else [160, 512, 2048]
    reps = a.reps or (3 if a.quick else 5)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, "
          f"load {load0[0]:.2f}\n")
    bw = bench_bandwidth(sizes, reps, a.reps or max(2, reps // 2))
    print("## Bandwidth (GB/s = request KV bytes / median time)\n")
    print(bandwidth_tables(bw))
    if not a.skip_latency:
        lat = bench_latency(a.latency_requests or (16 if a.quick else 24), 192, 16 if a.quick else 32)
        print("\n## Latency breakdown\n")
        print(latency_table(lat))
    print(f"total {time.perf_counter() - t0:.0f} s, load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
