"""Issue 4: cross-mesh KV transfer (export on the source, import on the destination) against a plain
device-to-device copy of the same bytes, and per-request transfer times in a small disaggregated run.

    python scripts/bench_kv_transfer.py            # full run (~2.5 min on 2 quiet cores; peak RSS ~15 GB)
    python scripts/bench_kv_transfer.py --quick    # 160/512 tokens, 3 repetitions

One process, 8 virtual CPU devices (``--xla_force_host_platform_device_count=8``), float32.

1. Bandwidth. Executors hold an OPT-1.3b-shaped paged KV cache (24 layers, 32 heads, head_dim 64,
   16-token blocks: 393,216 bytes of K+V per token). To keep parameters small the model config
   shrinks ``vocab_size`` and ``ffn_dim`` (which do not touch the KV) and the weights are zeros
   (only the KV is moved). Instances: tp2 on devices 0-1, tp1 on device 2, pp2 (tp1 stages) on
   devices 3-4. For each request size and every pair of layouts, three transports, each as
   ``handle = export_kv(src, ...)`` (waited for: ``jax.block_until_ready`` on the handle's arrays)
   then ``import_kv(dst, ..., handle)`` (waited for on the destination cache); block ids differ on
   the two sides:
   - "default": ``LocalTransport()``: the export gathers the request's blocks on the source mesh
     (padded to a power-of-two block bucket); on CPU meshes the import reads that export through
     zero-copy views and writes the donated destination pages in one jitted loop (2 passes in all);
   - "staged": ``LocalTransport(one_pass=False)``: the same export, ``device_put`` to the
     destination sharding, scatter into the donated pages (the accelerator path; 3 passes);
   - "host": ``HostTransport()``: the export as numpy arrays, the import puts it on the
     destination and scatters it (what crosses a process boundary).
   Baselines on the same bytes in the same run: ``jax.device_put`` of the 48 per-layer
   ``[n, 16, 32, 64]`` arrays from device 5 to device 6 ("copy", the roofline), the same bytes as
   one stacked array, and a numpy ``copyto`` on the host. Times are medians after a warm-up call
   (which compiles); 2048 tokens: half the repetitions unless ``--reps``. The copy and the three
   transports alternate in one loop, so load from other processes hits all alike; ratios
   (transfer time / copy time) are medians of per-repetition ratios. Minor page faults per default
   transfer are counted. Exactness is checked once per pair and transport (random KV, gathered back).
2. Per-request transfer in a small disaggregated run. A small model (OPT-125m width, 2 layers, small
   vocabulary) served disaggregated: prefill tp2 (devices 0-1) -> decode tp1 (device 2), through
   ``build_local`` (one ``LocalInstance`` thread per instance, one ``Router``; ``warmup()``, then an
   untimed pass) + ``run_requests``.
   The transport is the engine's default ``LocalTransport`` with a timer around ``export_kv`` (run
   on the prefill instance's thread) and ``import_kv`` (on the decode instance's thread): per
   request, export and import wall time, as issued (the engine default: nothing waits) and waited
   for (each blocks until its result is ready). Also the five stages from the lifecycle events
   (``planner.simulator.SimResult.breakdown``); there "transfer" is the import only (the engine
   stamps it on the destination), the export falls in "decode queue". Then the same requests' KV
   exported and imported alone (no instance threads), for the cost without contention.

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

from jaxserve.compile_cache import compile_count
from jaxserve.config import EngineConfig, ModelConfig, model_preset
from jaxserve.engine.block_manager import blocks_needed
from jaxserve.engine.build import build_local
from jaxserve.engine.executor import ModelExecutor, kv_bytes_per_block
from jaxserve.engine.frontend import run_requests
from jaxserve.engine.kv_transfer import HostTransport, KVTransport, LocalTransport
from jaxserve.engine.pipeline import PipelineExecutor
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.inputs import pow2_buckets
from jaxserve.model.opt import abstract_params
from jaxserve.request import Event, Request, SamplingParams
from planner.simulator import SimResult

BLOCK = 16
TARGET = 2.0  # transfer time <= 2x the copy's (bandwidth >= 0.5 of the copy)
Executor = ModelExecutor | PipelineExecutor
TRANSPORTS: dict[str, KVTransport] = {"default": LocalTransport(), "staged": LocalTransport(one_pass=False),
                                      "host": HostTransport()}


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


def transfer(transport: KVTransport, src: Executor, s_ids: list[int], dst: Executor, d_ids: list[int],
             tokens: int) -> tuple[float, float]:
    """Export then import, each waited for; returns (export s, import s)."""
    t0 = time.perf_counter()
    handle = transport.export_kv(src, s_ids, tokens)
    jax.block_until_ready(handle.layers)
    t1 = time.perf_counter()
    transport.import_kv(dst, d_ids, handle)
    jax.block_until_ready(dst.kv)
    return t1 - t0, time.perf_counter() - t1


def check_exact(transport: KVTransport, src: Executor, dst: Executor, n: int, num_blocks: int,
                rng: np.random.Generator) -> bool:
    cfg = src.cfg
    shape = (n, BLOCK, cfg.num_attention_heads, cfg.head_dim)
    data = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
            for _ in range(cfg.num_hidden_layers)]
    s_ids, d_ids = block_ids(n, num_blocks, False), block_ids(n, num_blocks, True)
    src.scatter_blocks(s_ids, data)
    transfer(transport, src, s_ids, dst, d_ids, n * BLOCK)
    got = dst.gather_blocks(d_ids)
    return all(np.array_equal(np.asarray(g), w) for gl, wl in zip(got, data, strict=True)
               for g, w in zip(gl, wl, strict=True))


def time_pair(src: Executor, dst: Executor, s_ids: list[int], d_ids: list[int], tokens: int, reps: int,
              arrs: Any, to: jax.Device) -> dict[str, Any]:
    """Copy and the three transports, interleaved ``reps`` times: medians and per-rep time ratios."""
    t: dict[str, list[float]] = {k: [] for k in ("copy", "faults", *(f"{n} {p}" for n in TRANSPORTS
                                                                     for p in ("export", "import", "total")))}
    for tr in TRANSPORTS.values():
        transfer(tr, src, s_ids, dst, d_ids, tokens)  # warm-up (compiles)
    device_copy(arrs, to)
    for _ in range(reps):  # interleaved, so load from elsewhere hits all alike
        t0 = time.perf_counter()
        device_copy(arrs, to)
        t["copy"].append(time.perf_counter() - t0)
        for name, tr in TRANSPORTS.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            e, i = transfer(tr, src, s_ids, dst, d_ids, tokens)
            t[f"{name} export"].append(e)
            t[f"{name} import"].append(i)
            t[f"{name} total"].append(e + i)
            if name == "default":
                t["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    x = {k: statistics.median(v) for k, v in t.items()}
    for name in TRANSPORTS:
        x[f"ratio {name}"] = statistics.median(tt / c for c, tt in zip(t["copy"], t[f"{name} total"], strict=True))
    return x


def bucket_of(tokens: int) -> int:
    """The export's block count for ``tokens``: the blocks, padded to a power of two."""
    return pow2_buckets(1, blocks_needed(tokens, BLOCK))[-1]


def bench_bandwidth(sizes: Sequence[int], reps: int, reps_large: int) -> dict[str, Any]:
    cfg = kv_model()
    devs = jax.devices()
    per_token = kv_bytes_per_block(cfg, 1)
    num_blocks = bucket_of(max(sizes)) + 2  # + null block; dst ids count down from the top
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
        bucket = bucket_of(tokens)
        nbytes = tokens * per_token
        log(f"{tokens} tokens ({nbytes / 2**20:.0f} MiB, {n} blocks -> bucket {bucket})")
        row: dict[str, Any] = {"tokens": tokens, "bytes": nbytes, "blocks": n, "bucket": bucket}
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
            s_ids, d_ids = block_ids(n, num_blocks, False), block_ids(n, num_blocks, True)
            x = time_pair(ex[a], ex[b], s_ids, d_ids, tokens, reps if tokens <= 512 else reps_large, arrs, devs[6])
            copies.append(x["copy"])
            row[f"{a}->{b}"] = x
            log(f"  {a}->{b}: copy {1e3 * x['copy']:.1f} ms; " + ", ".join(
                f"{k} {1e3 * x[f'{k} total']:.1f} ms ({x[f'ratio {k}']:.2f}x)" for k in TRANSPORTS))
        row["copy"] = statistics.median(copies)
        del arrs
        rows.append(row)
    return {"rows": rows, "pairs": [f"{a}->{b}" for a, b in pairs], "exact": exact, "per_token": per_token}


def bandwidth_tables(res: dict[str, Any]) -> str:
    rows, pairs = res["rows"], res["pairs"]

    def gbs(nbytes: int, t: float) -> str:
        return f"{nbytes / t / 1e9:.2f}"

    out = ["Baselines (GB/s = the request's KV bytes / median time):", "",
           "| request | KV MiB | blocks (bucket) | numpy copyto | device_put copy (48 arrays) | device_put copy (1 array) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['tokens']} tokens | {r['bytes'] / 2**20:.0f} | {r['blocks']} ({r['bucket']}) | "
                   f"{gbs(r['bytes'], r['numpy'])} | {gbs(r['bytes'], r['copy'])} | {gbs(r['bytes'], r['copy1'])} |")
    for name in TRANSPORTS:
        out += ["", f"Transfer time / copy time, {name} (median of per-repetition ratios; target <= {TARGET}, "
                "i.e. >= 0.5 of the copy's bandwidth):", "",
                "| request | " + " | ".join(pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
        for r in rows:
            out.append(f"| {r['tokens']} tokens | " + " | ".join(f"{r[p][f'ratio {name}']:.2f}" for p in pairs) + " |")
    out += ["", "ms (median; each transfer = export, waited for, then import, waited for), default's minor "
            "page faults per transfer:", "",
            "| request | pair | copy | default export | default import | default | staged | host | "
            "default GB/s | page faults / default |", "|---" * 10 + "|"]
    for r in rows:
        for p in pairs:
            x = r[p]
            out.append(f"| {r['tokens']} | {p} | {1e3 * x['copy']:.1f} | {1e3 * x['default export']:.1f} | "
                       f"{1e3 * x['default import']:.1f} | {1e3 * x['default total']:.1f} | "
                       f"{1e3 * x['staged total']:.1f} | {1e3 * x['host total']:.1f} | "
                       f"{gbs(r['bytes'], x['default total'])} | {x['faults']:.0f} |")
    out += ["", f"Exact (random KV through each pair and transport, gathered back): "
            f"{'all' if all(res['exact'].values()) else res['exact']}"]
    return "\n".join(out)


# ---- 2. per-request transfer in a disaggregated run -----------------------------------------------
class TimedTransport(LocalTransport):
    """The engine's default transport, timing each request's export (on the source instance's thread)
    and import (on the destination's); with ``wait`` each blocks until its result is ready."""

    def __init__(self) -> None:
        super().__init__()
        self.wait = False
        self.exports: dict[int, float] = {}  # id(handle) -> s; a handle lives until its import
        self.times: list[tuple[float, float]] = []

    def export_kv(self, src: Any, block_ids: Sequence[int], num_tokens: int, request_id: str = "") -> Any:
        t0 = time.perf_counter()
        handle = super().export_kv(src, block_ids, num_tokens)
        if self.wait:
            jax.block_until_ready(handle.layers)
        self.exports[id(handle)] = time.perf_counter() - t0
        return handle

    def import_kv(self, dst: Any, block_ids: Sequence[int], handle: Any) -> int:
        t0 = time.perf_counter()
        nbytes = super().import_kv(dst, block_ids, handle)
        if self.wait:
            jax.block_until_ready(dst.kv)
        self.times.append((self.exports.pop(id(handle), float("nan")), time.perf_counter() - t0))
        return nbytes


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
    timer = TimedTransport()
    out: dict[str, Any] = {"n": n, "max_prompt": max_prompt, "out_len": out_len, "layout": "prefill tp2 -> decode tp1",
                           "model": "opt-125m width (768, 12 heads), 2 layers, vocab 1024",
                           "kv_per_token": kv_bytes_per_block(cfg, 1), "runs": {}}
    with build_local(cfg, params, layouts, jax.devices(), transport=timer) as eng:
        # every shape (instances step freely, so batches differ from run to run), then one untimed pass
        t0 = time.perf_counter()
        shapes = eng.warmup()
        run_requests(eng, make_requests(n, max_prompt, out_len, cfg.vocab_size, "warm"))
        log(f"latency: warm-up {shapes} shapes + one pass, {time.perf_counter() - t0:.1f} s")
        for name, wait in (("as issued (engine default)", False), ("each waited for", True)):
            timer.wait, timer.times = wait, []
            reqs = make_requests(n, max_prompt, out_len, cfg.vocab_size, "waited" if wait else "issued")
            c0, t0 = compile_count(), time.perf_counter()
            run_requests(eng, reqs)
            wall = time.perf_counter() - t0
            ex, im = (np.array(v) for v in zip(*timer.times, strict=True))
            out["runs"][name] = {"wall": wall, "stages": breakdown(reqs), "compiles": compile_count() - c0,
                                 "transfer": {"export": ex, "import": im, "export + import": ex + im}}
            log(f"latency [{name}]: {wall:.2f} s, {compile_count() - c0} compilations, "
                f"export+import mean {1e3 * (ex + im).mean():.2f} ms")
    out["alone"] = transfer_alone(cfg, params, [len(r.prompt_token_ids) for r in reqs])
    log(f"latency: export+import alone mean {1e3 * out['alone']['export + import'].mean():.2f} ms")
    return out


def transfer_alone(cfg: ModelConfig, params: Any, lengths: Sequence[int]) -> dict[str, np.ndarray]:
    """Each request's KV exported and imported (each waited for) with no instance threads running: the
    same layouts and devices, fresh executors, ``LocalTransport.warmup`` first."""
    devs = jax.devices()
    src, dst = ModelExecutor(cfg, params, devs[0:2], tp=2), ModelExecutor(cfg, params, devs[2:3], tp=1)
    n = blocks_needed(max(lengths), BLOCK) + 1
    src.init_kv(n, BLOCK)
    dst.init_kv(2 * n, BLOCK)
    tr = TimedTransport()
    tr.wait = True
    tr.warmup(src, dst, max(lengths))
    for tokens in lengths:
        k = blocks_needed(tokens, BLOCK)
        tr.import_kv(dst, list(range(n, n + k)), tr.export_kv(src, list(range(1, k + 1)), tokens))
    ex, im = (np.array(v) for v in zip(*tr.times, strict=True))
    return {"export": ex, "import": im, "export + import": ex + im}


def latency_table(res: dict[str, Any]) -> str:
    kib = res["kv_per_token"] / 1024
    out = [f"{res['n']} requests arriving together, prompts {res['max_prompt'] // 8}-{res['max_prompt']} "
           f"tokens ({kib:.0f} KiB of KV per token), {res['out_len']} output tokens each; {res['model']}; "
           f"{res['layout']}.", ""]
    for name, run in res["runs"].items():
        out += [f"Export + import {name}; wall {run['wall']:.2f} s; {run['compiles']} compilations in the timed pass.",
                "", "| per request | mean ms | p90 ms |", "|---|---|---|"]
        rows = [*run["transfer"].items(), *((f"stage: {k.replace('_', ' ')}", v) for k, v in run["stages"].items())]
        for label, v in rows:
            out.append(f"| {label} | {1e3 * v.mean():.2f} | {1e3 * np.percentile(v, 90):.2f} |")
        out.append("")
    out += ["Export + import of the same requests alone (each waited for; no instance threads: fresh tp2 and "
            "tp1 executors on the same devices, after `LocalTransport.warmup`):", "",
            "| per request | mean ms | p90 ms |", "|---|---|---|"]
    out += [f"| {k} | {1e3 * v.mean():.2f} | {1e3 * np.percentile(v, 90):.2f} |" for k, v in res["alone"].items()]
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
    print("## Bandwidth\n")
    print(bandwidth_tables(bw))
    if not a.skip_latency:
        lat = bench_latency(a.latency_requests or (16 if a.quick else 24), 192, 16 if a.quick else 32)
        print("\n## Per-request transfer in a disaggregated run\n")
        print(latency_table(lat) + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"total {time.perf_counter() - t0:.0f} s, peak RSS {peak:.1f} GB, "
          f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
