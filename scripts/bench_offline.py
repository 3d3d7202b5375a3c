"""Issue 3: offline throughput against HF transformers, and batch-1 decode against the memory roofline.

    python scripts/bench_offline.py [--num-prompts 64] [--seed 0] [--hf-batch-size 16 ...] [--label "run 1"]
    python scripts/bench_offline.py --quick          # a small smoke run (~2-3 minutes)

One process, one set of random OPT-125m-shaped float32 weights (numpy RNG), on the CPU:

1. memory bandwidth: numpy read-only sum and copy over a 512 MiB array, and an XLA sum
   (the roofline inputs, measured in the same run);
2. our engine: one ``LLMEngine`` (colocated, prefill-first continuous batching), ``warmup()``
   compiles every bucket shape first (timed and reported separately), then all prompts are
   added at once and stepped to completion; generated tokens / wall time;
3. HF transformers: the same weights (``export_hf`` -> ``OPTForCausalLM.from_pretrained``) and
   the same prompts, batched, left-padded ``generate`` (greedy, ``min_new_tokens`` =
   ``max_new_tokens``). Static batching runs every row to its batch's longest request:
   *useful* tokens/s counts only each request's own requested tokens, *raw* tokens/s counts
   everything HF generated. Batches are sorted by requested output length (then prompt length)
   unless ``--hf-no-sort``; the best configuration is the baseline of the ratio;
4. batch-1 decode: one request (128-token prompt, 128 outputs) alone on the engine; the decode
   phase's per-token time from its ``Event.TOKEN`` stamps, against parameter bytes / bandwidth;
5. where a decode step's time goes: the engine step, the jitted forward alone (dispatch and
   compute), the forward with attention replaced by a no-op, a bare chain of the same matmuls,
   the lm_head alone, greedy sampling and host-side input packing, at batch 1 and at the
   largest decode batch.

Both systems generate exactly the requested number of tokens (``ignore_eos`` / ``min_new_tokens``).
Prints a summary and writes it to ``docs/performance.md`` between markers named by ``--label``
(other text in that file is kept). Figures vary with other load on the machine: the load
average is recorded at the start and end of each run.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import functools
import json
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _docs import write_block
from _timing import median_time
from tqdm import tqdm

from jaxserve.config import EngineConfig, ModelConfig, model_preset
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.executor import ModelExecutor
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.inputs import SeqChunk, StepInputs, StepShape, bucket_for, build_step_inputs
from jaxserve.model.loader import export_hf
from jaxserve.model.opt import Params
from jaxserve.model.sampling import greedy
from jaxserve.request import Event, Request, SamplingParams

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
SMALL_CACHE_BLOCKS = 65  # the breakdown's small KV cache
FIRST_ID = 4  # prompts use ids >= 4: no pad (1) / bos-eos (2) in random prompts


# ---- settings -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    num_prompts: int = 64
    prompt_len: tuple[int, int] = (32, 512)
    output_len: tuple[int, int] = (16, 256)
    max_model_len: int = 768
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # engine default: max_model_len
    block_size: int = 16
    hf_batch_sizes: tuple[int, ...] = (16,)
    hf_sort: bool = True
    b1_prompt: int = 128
    b1_output: int = 32
    bandwidth_mib: int = 512
    reps: int = 8  # timing repetitions for the breakdown

    @classmethod
    def quick(cls, num_prompts: int = 8) -> Spec:
        return cls(num_prompts=num_prompts, prompt_len=(32, 128), output_len=(16, 48), max_model_len=256,
                   max_num_seqs=8, hf_batch_sizes=(8,), b1_prompt=64, b1_output=48, bandwidth_mib=256, reps=8)


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    outputs: list[int]

    @classmethod
    def make(cls, spec: Spec, vocab: int, seed: int) -> Workload:
        rng = np.random.default_rng(seed)
        lens = rng.integers(spec.prompt_len[0], spec.prompt_len[1] + 1, spec.num_prompts)
        outs = rng.integers(spec.output_len[0], spec.output_len[1] + 1, spec.num_prompts)
        prompts = [rng.integers(FIRST_ID, vocab, n).tolist() for n in lens]
        return cls(prompts, [int(o) for o in outs])

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.outputs)


def cpu_s() -> float:
    """CPU seconds (user + system) used by this process so far, over all its threads."""
    t = os.times()
    return t.user + t.system


def cpu_pressure_us() -> float | None:
    """Linux PSI: total microseconds in which some runnable task waited for a CPU (None where unavailable)."""
    try:
        m = re.search(r"^some .*total=(\d+)", Path("/proc/pressure/cpu").read_text(), re.M)
    except OSError:
        return None
    return float(m.group(1)) if m else None


def pressure_share(start_us: float | None, wall_s: float) -> float | None:
    """Share of the wall time since ``start_us`` in which some task waited for a CPU (0 = no contention)."""
    now = cpu_pressure_us()
    if start_us is None or now is None or wall_s <= 0:
        return None
    return (now - start_us) / 1e6 / wall_s


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ---- machine and bandwidth ------------------------------------------------------------------

def machine_facts() -> dict[str, str]:
    import torch
    import transformers

    cpu = "?"
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else "?"
    except OSError:
        pass
    return {
        "cpu": f"{os.cpu_count()} cores ({cpu})",
        "python": platform.python_version(),
        "jax": f"{jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s))",
        "numpy": np.__version__,
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "transformers": transformers.__version__,
    }


def measure_bandwidth(mib: int) -> dict[str, float]:
    """GB/s (1e9 bytes/s): numpy read-only sum, numpy copy (read + write bytes), XLA sum; best of 5."""
    n = mib * MIB // 4
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    b = np.empty_like(a)
    nbytes = a.nbytes

    def best(fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    read = nbytes / best(a.sum) / 1e9
    copy = 2 * nbytes / best(functools.partial(np.copyto, b, a)) / 1e9
    x = jnp.asarray(a)
    xla_read = nbytes / best(functools.partial(_xla_sum, x)) / 1e9
    return {"numpy_read": read, "numpy_copy": copy, "xla_read": xla_read}


_jit_sum = jax.jit(jnp.sum)


def _xla_sum(x: jax.Array) -> jax.Array:
    return _jit_sum(x).block_until_ready()


# ---- our engine -----------------------------------------------------------------------------

@dataclasses.dataclass
class EngineRun:
    wall_s: float
    generated: int
    steps: int
    prefill_steps: int
    prefill_s: float
    decode_steps: int
    decode_s: float
    decode_batch_mean: float
    compiles_after_warmup: int
    tokens: dict[str, list[int]]
    decode_log: list[tuple[int, int, float]]  # per decode step: (rows, longest context, seconds)
    cpu_s: float  # process CPU seconds during the run (2 cores, no other load: up to 2x wall)
    pressure: float | None  # PSI cpu `some` share during the run

    @property
    def tok_s(self) -> float:
        return self.generated / self.wall_s

    def steps_with(self, rows: int) -> tuple[int, float, float, int]:
        """Decode steps of exactly ``rows`` sequences: (count, total s, median s, median longest context)."""
        sel = [(c, dt) for r, c, dt in self.decode_log if r == rows]
        if not sel:
            return 0, 0.0, float("nan"), 0
        return (len(sel), sum(dt for _, dt in sel), statistics.median(dt for _, dt in sel),
                int(statistics.median(c for c, _ in sel)))

    def by_bucket(self) -> dict[int, tuple[int, int, float, float, int]]:
        """Decode steps grouped by power-of-two row bucket: (steps, tokens, total s, median s, median context)."""
        groups: dict[int, list[tuple[int, int, float]]] = {}
        for r, c, dt in self.decode_log:
            groups.setdefault(1 << (r - 1).bit_length(), []).append((r, c, dt))
        return {b: (len(g), sum(r for r, _, _ in g), sum(dt for _, _, dt in g),
                    statistics.median(dt for _, _, dt in g), int(statistics.median(c for _, c, _ in g)))
                for b, g in sorted(groups.items())}

    @property
    def max_rows(self) -> int:
        return max((r for r, _, _ in self.decode_log), default=0)


def engine_requests(wl: Workload, tag: str) -> list[Request]:
    return [Request(f"{tag}-{i}", list(p), SamplingParams(max_tokens=o, ignore_eos=True))
            for i, (p, o) in enumerate(zip(wl.prompts, wl.outputs, strict=True))]


def run_engine(engine: LLMEngine, requests: Sequence[Request], desc: str) -> EngineRun:
    """Add every request at once, step to completion; per-step timing split into prefill/decode steps."""
    for r in requests:
        engine.add_request(r)
    total = sum(r.sampling.max_tokens for r in requests)
    steps = prefill_steps = decode_steps = decode_rows = 0
    prefill_s = decode_s = 0.0
    by_id = {r.request_id: r for r in requests}
    decode_log: list[tuple[int, int, float]] = []
    t_start, c_start, p_start = time.perf_counter(), cpu_s(), cpu_pressure_us()
    with tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False) as bar:
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            steps += 1
            if not outs:
                continue
            req = by_id[outs[0].request_id]
            # prefill-first: a step is all prompts (first token) or all decodes
            if len(req.output_token_ids) == 1:
                prefill_steps += 1
                prefill_s += dt
            else:
                decode_steps += 1
                decode_s += dt
                decode_rows += len(outs)
                decode_log.append((len(outs), max(by_id[o.request_id].num_tokens - 1 for o in outs), dt))
            bar.update(len(outs))
    wall, cpu = time.perf_counter() - t_start, cpu_s() - c_start
    tokens = {r.request_id: list(r.output_token_ids) for r in requests}
    for r in requests:
        if len(r.output_token_ids) != r.sampling.max_tokens:
            raise RuntimeError(f"{r.request_id}: {len(r.output_token_ids)} tokens, asked {r.sampling.max_tokens}")
    return EngineRun(wall, sum(len(t) for t in tokens.values()), steps, prefill_steps, prefill_s, decode_steps,
                     decode_s, decode_rows / max(decode_steps, 1), engine.compilations_since_warmup, tokens,
                     decode_log, cpu, pressure_share(p_start, wall))


@dataclasses.dataclass
class Batch1:
    prompt: int
    output: int
    ttft_s: float
    decode_median_s: float
    decode_mean_s: float
    step_median_s: float


def run_batch1(engine: LLMEngine, spec: Spec, vocab: int) -> Batch1:
    """One request alone: per-token decode time from its TOKEN stamps (and engine.step() times)."""
    rng = np.random.default_rng(1234)
    req = Request("b1", rng.integers(FIRST_ID, vocab, spec.b1_prompt).tolist(),
                  SamplingParams(max_tokens=spec.b1_output, ignore_eos=True))
    engine.add_request(req)
    step_times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    toks = req.event_times(Event.TOKEN)
    gaps = np.diff(toks)  # decode phase: token k-1 -> token k
    began = req.event_times(Event.PREFILL_BEGAN)[0]
    return Batch1(spec.b1_prompt, spec.b1_output, toks[0] - began, float(np.median(gaps)), float(np.mean(gaps)),
                  float(np.median(step_times[1:])))


# ---- where a decode step's time goes --------------------------------------------------------

def _no_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  positions: jax.Array, meta: Any, scale: float) -> jax.Array:
    """Attention replaced by the identity on q (the KV write before it still runs)."""
    return q


def decode_inputs(batch: int, bucket: int, context: int, max_blocks: int, num_blocks: int,
                  block_size: int) -> StepInputs:
    """A decode step of ``batch`` sequences (padded to ``bucket`` rows) at ``context`` tokens each; block tables
    alias when the cache is too small to give each sequence its own blocks."""
    need = -(-context // block_size)
    chunks = []
    for b in range(batch):
        table = [1 + (b * need + j) % (num_blocks - 1) for j in range(need)]
        chunks.append(SeqChunk([FIRST_ID + b], context - 1, table))
    return build_step_inputs([chunks], StepShape(bucket, bucket, False, ((bucket, 1, max_blocks),)), block_size)


def dense_chain_fn(cfg: ModelConfig) -> Callable[[Params, jax.Array], jax.Array]:
    """The decode step's matmuls only (q, k, v, o, fc1, fc2 per layer, then the tied lm_head): no norms,
    no attention, no KV. The floor XLA reaches for the same weight reads."""
    d = cfg.hidden_size

    @jax.jit
    def chain(params: Params, x: jax.Array) -> jax.Array:
        for p in params["layers"]:
            qkv = sum(x @ p[n]["kernel"].reshape(d, d) for n in ("q", "k", "v"))
            x = x + qkv @ p["o"]["kernel"].reshape(d, d)
            x = x + jax.nn.relu(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
        return jnp.einsum("bw,vw->bv", x, params["embed_tokens"])

    return chain


@jax.jit
def _lm_head(x: jax.Array, embed: jax.Array) -> jax.Array:
    return jnp.einsum("bw,vw->bv", x, embed, preferred_element_type=jnp.float32)


@dataclasses.dataclass
class Breakdown:
    batch: int
    context: int
    blocks: int  # block-table bucket
    engine_cache_blocks: int
    small_cache_blocks: int
    execute_s: float  # executor.execute + block on the engine's executor (its full-size KV cache)
    small_cache_s: float  # same step, XLA attention, on a small KV cache
    no_attention_s: float  # same step, attention = identity, small KV cache
    dense_chain_s: float
    lm_head_s: float
    dispatch_s: float  # executor.execute returning (async): host dispatch only
    sample_s: float  # greedy argmax + to host
    pack_s: float  # build_step_inputs on the host
    engine_step_s: float  # median engine.step() at this batch (measured in the engine runs)
    padded_s: float | None = None  # batch 1 only: the same step padded to 2 rows (a null row), engine's cache

    @property
    def cache_size_s(self) -> float:
        """What the engine's cache size costs on top of the same step on a small cache."""
        return self.execute_s - self.small_cache_s

    @property
    def attention_s(self) -> float:
        return self.small_cache_s - self.no_attention_s

    @property
    def host_s(self) -> float:
        """engine.step() minus the blocked forward: scheduling, packing, sampling, bookkeeping."""
        return self.engine_step_s - self.execute_s


def breakdown(engine: LLMEngine, small: ModelExecutor, cfg: ModelConfig, batch: int, context: int,
              reps: int, engine_step_s: float) -> Breakdown:
    """Time one decode step of ``batch`` sequences at ``context`` tokens in variants (see ``Breakdown``)."""
    ex = engine.executor
    bs = ex.block_size
    blocks = engine.runner.buckets.decode_blocks
    rows = bucket_for(batch, engine.runner.buckets.decode_batch)
    inputs = decode_inputs(batch, rows, context, blocks, ex.num_blocks, bs)
    small_inputs = decode_inputs(batch, rows, context, blocks, small.num_blocks, bs)

    def run_exec(e: ModelExecutor, i: StepInputs) -> Callable[[], Any]:
        return lambda: e.execute(i).block_until_ready()

    execute = median_time(run_exec(ex, inputs), reps, warmup=1)
    attn = small.attn_fn
    small_cache = median_time(run_exec(small, small_inputs), reps, warmup=1)
    small.attn_fn = _no_attention
    no_attn = median_time(run_exec(small, small_inputs), reps, warmup=1)
    small.attn_fn = attn
    ts = []
    for _ in range(reps):  # on the small cache: the same arguments to dispatch, less to wait for
        t0 = time.perf_counter()
        out = small.execute(small_inputs)
        ts.append(time.perf_counter() - t0)
        out.block_until_ready()
    dispatch = statistics.median(ts)
    x = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    chain = dense_chain_fn(cfg)
    dense = median_time(lambda: chain(ex.params, x).block_until_ready(), reps, warmup=1)
    head = median_time(lambda: _lm_head(x, ex.params["embed_tokens"]).block_until_ready(), reps, warmup=1)
    logits = ex.execute(inputs)
    sample = median_time(lambda: np.asarray(greedy(logits)), reps, warmup=1)
    shape = inputs.shape
    chunks = [SeqChunk([FIRST_ID + b], context - 1, list(range(1, 1 + -(-context // bs)))) for b in range(batch)]
    pack = median_time(lambda: build_step_inputs([chunks], shape, bs), reps, warmup=1)
    padded = None
    if batch == 1 and 2 in engine.runner.buckets.decode_batch:
        two = decode_inputs(1, 2, context, blocks, ex.num_blocks, bs)
        padded = median_time(run_exec(ex, two), reps, warmup=1)
    return Breakdown(batch, context, blocks, ex.num_blocks, small.num_blocks, execute, small_cache, no_attn, dense,
                     head, dispatch, sample, pack, engine_step_s, padded)


# ---- HF transformers ------------------------------------------------------------------------

@dataclasses.dataclass
class HFRun:
    batch_size: int
    sorted: bool
    wall_s: float
    useful: int  # each request's own requested tokens
    raw: int  # everything generated (rows run to their batch's max)
    tokens: dict[int, list[int]]
    cpu_s: float
    pressure: float | None
    batches: list[tuple[int, int, int, float]]  # (rows, padded prompt length, new tokens, seconds)

    @property
    def useful_tok_s(self) -> float:
        return self.useful / self.wall_s

    @property
    def raw_tok_s(self) -> float:
        return self.raw / self.wall_s

    @property
    def name(self) -> str:
        return f"HF bs={self.batch_size}{' sorted' if self.sorted else ''}"


def load_hf(params: Params, cfg: ModelConfig, folder: Path) -> Any:
    from transformers import OPTForCausalLM

    export_hf(params, cfg, folder)
    model = OPTForCausalLM.from_pretrained(folder, dtype="float32").eval()
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model


def pick_torch_threads(model: Any, choice: str, pad_id: int) -> dict[str, Any]:
    """Set torch's intra-op threads: a number, ``default`` (leave it), or ``auto``: time a short batched
    generate with the default and with 1 thread and keep the faster (with other load on 2 cores, torch's
    2 spinning threads can run several times slower than 1: the baseline should not be handicapped)."""
    import torch

    default = torch.get_num_threads()
    if choice == "default":
        return {"default": default, "used": default, "calibration_s": {}}
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return {"default": default, "used": int(choice), "calibration_s": {}}
    ids = torch.randint(FIRST_ID, 1000, (16, 96), generator=torch.Generator().manual_seed(0))
    timing = {}
    for n in dict.fromkeys((default, 1)):
        torch.set_num_threads(n)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           min_new_tokens=8, max_new_tokens=8, pad_token_id=pad_id)
            timing[n] = time.perf_counter() - t0
    best = min(timing, key=timing.__getitem__)
    torch.set_num_threads(best)
    log(f"torch threads: calibration {timing} -> {best}")
    return {"default": default, "used": best, "calibration_s": timing}


def run_hf(model: Any, wl: Workload, batch_size: int, sort: bool, pad_id: int) -> HFRun:
    import torch
    from _hf import batches, left_padded_generate
    from transformers import StoppingCriteria, StoppingCriteriaList

    raw = sum(len(b) * max(wl.outputs[i] for i in b) for b in batches(wl.prompts, wl.outputs, batch_size, sort))
    bar = tqdm(total=raw, desc=f"HF bs={batch_size}", unit="tok", file=sys.stderr, leave=False)

    class Tick(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
            bar.update(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    t_start, c_start, p_start = time.perf_counter(), cpu_s(), cpu_pressure_us()
    tokens, _, walls = left_padded_generate(model, wl.prompts, wl.outputs, batch_size, sort, pad_id,
                                            StoppingCriteriaList([Tick()]))
    wall, cpu = time.perf_counter() - t_start, cpu_s() - c_start
    bar.close()
    return HFRun(batch_size, sort, wall, wl.output_tokens, raw, tokens, cpu, pressure_share(p_start, wall), walls)


def agreement(engine_tokens: dict[str, list[int]], hf: HFRun, tag: str) -> tuple[float, float]:
    """(share of requests whose first token matches, mean share of each request's tokens before the first
    mismatch). Random weights give nearly flat logits, so float noise may flip a greedy choice."""
    first, prefix = [], []
    for i, want in hf.tokens.items():
        got = engine_tokens[f"{tag}-{i}"]
        first.append(got[0] == want[0])
        n = next((k for k, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))
        prefix.append(n / len(want))
    return float(np.mean(first)), float(np.mean(prefix))


# ---- report ---------------------------------------------------------------------------------

def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render(r: dict[str, Any]) -> str:
    """The results as markdown (also printed)."""
    spec: Spec = r["spec"]
    wl: Workload = r["workload"]
    eng: EngineRun = r["engine"]
    hf_runs: list[HFRun] = r["hf"]
    bw: dict[str, float] = r["bandwidth"]
    b1: Batch1 = r["batch1"]
    pbytes: int = r["param_bytes"]
    lines = [f"### {r['label']}", "",
             f"Command: `{r['command']}`  ", f"Started {r['started']}; total {r['total_s']:.0f} s; load average "
             f"(1 min) {r['load'][0]:.2f} at start, {r['load'][1]:.2f} at end"
             + (f"; CPU pressure (PSI `some`: share of the time some task waited for a core) "
                f"{100 * r['cpu_pressure']:.0f}% over the run" if r["cpu_pressure"] is not None else "") + ".", ""]
    lines += ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["machine"].items()]
    lines += ["", f"Model: `{r['model']}` shape, float32, random weights (numpy seed {r['seed']}, std 0.02), "
              f"{r['num_params'] / 1e6:.1f} M parameters = {pbytes / 1e6:.0f} MB.  ",
              f"Workload: {spec.num_prompts} prompts, lengths uniform {spec.prompt_len[0]}..{spec.prompt_len[1]} "
              f"({wl.prompt_tokens} prompt tokens), outputs uniform {spec.output_len[0]}..{spec.output_len[1]} "
              f"({wl.output_tokens} tokens), greedy, EOS ignored.  ",
              f"Engine: colocated (prefill-first), max_num_seqs {spec.max_num_seqs}, max_model_len "
              f"{spec.max_model_len}, max_num_batched_tokens {r['batched_tokens']}, block_size {spec.block_size}, "
              f"{r['num_blocks']} KV blocks (no preemption needed).", ""]
    lines += ["**Throughput** (generated tokens / wall time; warm-up excluded)", "",
              "| system | wall | CPU used / wall | CPU pressure | generated tok/s | notes |",
              "|---|---|---|---|---|---|",
              f"| jaxserve engine | {eng.wall_s:.1f} s | {eng.cpu_s / eng.wall_s:.2f} | {pct(eng.pressure)} | "
              f"**{eng.tok_s:.1f}** | "
              f"{eng.steps} steps: "
              f"{eng.prefill_steps} prefill ({eng.prefill_s:.1f} s), {eng.decode_steps} decode "
              f"({eng.decode_s:.1f} s, mean batch {eng.decode_batch_mean:.1f}, "
              f"{fmt_ms(eng.decode_s / max(eng.decode_steps, 1))}/step); "
              f"compilations after warm-up: {eng.compiles_after_warmup} |"]
    full_n, _, full_med, full_ctx = eng.steps_with(eng.max_rows)
    one_n, one_tot, one_med, _ = eng.steps_with(1)
    for h in hf_runs:
        lines.append(f"| {h.name} | {h.wall_s:.1f} s | {h.cpu_s / h.wall_s:.2f} | {pct(h.pressure)} | "
                     f"**{h.useful_tok_s:.1f}** useful ({h.raw_tok_s:.1f} raw) | "
                     f"{-(-spec.num_prompts // h.batch_size)} batches; {h.raw} tokens generated, {h.useful} "
                     f"requested ({100 * h.useful / h.raw:.0f}% useful); per batch (rows x padded prompt + new tokens: "
                     f"time): {', '.join(f'{n}x{p}+{t}: {w:.0f} s' for n, p, t, w in h.batches)} |")
    lines += ["", "CPU used / wall: process CPU seconds (all threads) per wall second; 2.00 = both cores all the time. "
              "Less means waiting (other load on the machine, or a serial phase). CPU pressure: Linux PSI `some`, the share "
              "of the time in which some runnable task (ours or another) waited for a core; near 0% = a quiet machine."]
    tt = r["torch_threads"]
    if tt:
        cal = ", ".join(f"{n} thread(s) {t:.1f} s" for n, t in tt["calibration_s"].items())
        lines += ["", f"torch threads: default {tt['default']}, used {tt['used']}"
                  + (f" (calibration, 16 x 96-token prompts + 8 tokens: {cal})" if cal else "") + "."]
    lines += ["", f"Engine warm-up (not in the figures above): {r['warmup_shapes']} shapes compiled in "
              f"{r['warmup_s']:.0f} s."]
    if hf_runs:
        best: HFRun = r["hf_best"]
        ratio = eng.tok_s / best.useful_tok_s
        lines += ["", f"**Ratio**: engine / best HF ({best.name}, useful tokens) = **{ratio:.2f}x** "
                  f"(target >= 5x: **{'met' if ratio >= 5 else 'MISSED'}**); against HF raw tokens/s "
                  f"{eng.tok_s / best.raw_tok_s:.2f}x.  ",
                  f"Same weights check: first generated token equal for {100 * r['agree'][0]:.0f}% of requests; "
                  f"on average {100 * r['agree'][1]:.0f}% of each request's tokens equal before the first "
                  "difference (random weights give near-flat logits, so float32 noise can flip a greedy pick)."]
    lines += ["", "**Batch-1 decode vs memory roofline**", "",
              "| bandwidth (measured in this run) | GB/s |", "|---|---|",
              f"| numpy copy, read+write bytes | {bw['numpy_copy']:.1f} |",
              f"| numpy read-only sum | {bw['numpy_read']:.1f} |",
              f"| XLA read-only sum | {bw['xla_read']:.1f} |", ""]
    copy_roof = pbytes / (bw["numpy_copy"] * 1e9)
    read_roof = pbytes / (bw["numpy_read"] * 1e9)
    d = b1.decode_median_s
    lines += [f"One request, {b1.prompt}-token prompt, {b1.output} outputs: decode {fmt_ms(d)}/token median "
              f"({fmt_ms(b1.decode_mean_s)} mean, from its TOKEN stamps; engine.step() median "
              f"{fmt_ms(b1.step_median_s)}); TTFT {fmt_ms(b1.ttft_s)}.", "",
              "| roofline = parameter bytes / bandwidth | roofline | decode / roofline | target <= 2x |",
              "|---|---|---|---|",
              f"| copy bandwidth (the issue's definition) | {fmt_ms(copy_roof)} | **{d / copy_roof:.2f}x** | "
              f"{'met' if d / copy_roof <= 2 else 'MISSED'} |",
              f"| read-only bandwidth | {fmt_ms(read_roof)} | **{d / read_roof:.2f}x** | "
              f"{'met' if d / read_roof <= 2 else 'MISSED'} |", ""]
    bds: list[Breakdown] = r["breakdown"]
    lines += ["**Where a decode step's time goes** (medians of repeated calls; all variants use the engine's "
              "params and the same packed step; the small cache aliases block tables, which costs the same reads)",
              "", "| | " + " | ".join(f"batch {b.batch}, context {b.context} ({b.blocks}-block table)" for b in bds)
              + " |", "|---|" + "---|" * len(bds)]

    def row(name: str, fn: Callable[[Breakdown], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(fn(b) for b in bds) + " |")

    row("engine.step() (from the runs above)", lambda b: fmt_ms(b.engine_step_s))
    row("forward: executor.execute + block, engine's cache", lambda b: f"{fmt_ms(b.execute_s)} "
        f"({b.engine_cache_blocks} blocks)")
    row("host part of the step (step - forward)", lambda b: fmt_ms(b.host_s))
    row("forward, engine's cache, padded to 2 rows (one null row)",
        lambda b: fmt_ms(b.padded_s) if b.padded_s is not None else "-")
    row("forward, same step on a small cache", lambda b: f"{fmt_ms(b.small_cache_s)} ({b.small_cache_blocks} blocks)")
    row("= cost of the cache size (engine's - small)", lambda b: fmt_ms(b.cache_size_s))
    row("forward, small cache, attention = identity", lambda b: fmt_ms(b.no_attention_s))
    row("= attention (gather, softmax, scatter)", lambda b: fmt_ms(b.attention_s))
    row("bare chain of the same matmuls (no norms, attention, KV)", lambda b: fmt_ms(b.dense_chain_s))
    row("lm_head matmul alone (154 MB of the weights)", lambda b: fmt_ms(b.lm_head_s))
    row("jit dispatch (execute returning, async)", lambda b: fmt_ms(b.dispatch_s))
    row("greedy sample + copy to host", lambda b: fmt_ms(b.sample_s))
    row("host packing (build_step_inputs)", lambda b: fmt_ms(b.pack_s))
    lines += ["", "Engine run, decode steps by batch bucket (the step's row count, padded to a power of two):", "",
              "| decode batch bucket | steps | tokens | time | median step | median longest context |",
              "|---|---|---|---|---|---|"]
    for bucket, (n, toks, tot, med, ctx) in eng.by_bucket().items():
        lines.append(f"| {bucket} | {n} | {toks} | {tot:.1f} s | {fmt_ms(med)} | {ctx} |")
    lines += ["", f"Engine run, decode steps at the full batch ({eng.max_rows} sequences): {full_n} steps, median "
              f"{fmt_ms(full_med)} (longest context {full_ctx}); at batch 1 (the tail): {one_n} steps, "
              f"{one_tot:.1f} s in all, median {fmt_ms(one_med)}."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, label: str, body: str) -> None:
    """This run's block (``bench_offline: LABEL``) of the markdown file; everything else stays."""
    write_block(path, f"bench_offline: {label}", body)


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--quick", action="store_true", help="small prompts/outputs and shapes: a smoke run")
    p.add_argument("--seed", type=int, default=0, help="weights and workload seed")
    p.add_argument("--model", default="opt-125m", help="model preset (shape only; weights are random)")
    p.add_argument("--hf-batch-size", type=int, action="append", default=None,
                   help="HF generate batch size; repeat to compare several (default 16; 8 with --quick)")
    p.add_argument("--hf-no-sort", action="store_true", help="batch HF prompts in workload order")
    p.add_argument("--skip-hf", action="store_true", help="engine figures only")
    p.add_argument("--torch-threads", default="auto",
                   help="HF's torch intra-op threads: auto (time default vs 1 on a short generate, keep the faster), "
                        "default, or a number")
    p.add_argument("--b1-output", type=int, default=None, help="batch-1 decode: tokens to generate (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine prefill token budget")
    p.add_argument("--label", default="latest", help="names this run's section in the markdown file")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw figures (per-step log) here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    spec = Spec.quick(args.num_prompts or 8) if args.quick else Spec(num_prompts=args.num_prompts or 64)
    if args.b1_output:
        spec = dataclasses.replace(spec, b1_output=args.b1_output)
    spec = dataclasses.replace(spec, hf_sort=not args.hf_no_sort,
                               max_num_batched_tokens=args.max_num_batched_tokens,
                               hf_batch_sizes=tuple(args.hf_batch_size or spec.hf_batch_sizes))
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    psi0 = cpu_pressure_us()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    cfg = model_preset(args.model)
    machine = machine_facts()
    log(f"machine: {machine}")

    log(f"bandwidth: {spec.bandwidth_mib} MiB arrays ...")
    bw = measure_bandwidth(spec.bandwidth_mib)
    log(f"  {bw}")

    params = random_params_numpy(cfg, seed=args.seed, std=0.02)
    num_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    param_bytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))
    wl = Workload.make(spec, cfg.vocab_size, args.seed)
    block_need = sum(-(-(len(p) + o) // spec.block_size) for p, o in zip(wl.prompts, wl.outputs, strict=True))
    num_blocks = block_need + 1
    ecfg = EngineConfig(mode="colocated", block_size=spec.block_size, max_num_seqs=spec.max_num_seqs,
                        max_model_len=spec.max_model_len, max_num_batched_tokens=spec.max_num_batched_tokens,
                        num_blocks=num_blocks)
    engine = LLMEngine(cfg, params, ecfg)
    log(f"engine warm-up: compiling every bucket shape (~{len(engine.runner.buckets.shapes(decode=True, prefill=True, chunks=False))} shapes) ...")
    t0 = time.perf_counter()
    shapes = engine.warmup()
    warmup_s = time.perf_counter() - t0
    log(f"  {shapes} shapes in {warmup_s:.0f} s")

    eng = run_engine(engine, engine_requests(wl, "w"), "engine")
    log(f"engine: {eng.generated} tokens in {eng.wall_s:.1f} s = {eng.tok_s:.1f} tok/s")

    b1 = run_batch1(engine, spec, cfg.vocab_size)
    log(f"batch-1 decode: {fmt_ms(b1.decode_median_s)}/token")

    log("decode-step breakdown ...")
    small = ModelExecutor(cfg, engine.executor.params, engine.executor.devices)  # shares the params
    small.init_kv(SMALL_CACHE_BLOCKS, spec.block_size)
    b1_ctx = spec.b1_prompt + spec.b1_output // 2
    bds = [breakdown(engine, small, cfg, 1, b1_ctx, spec.reps, b1.step_median_s)]
    n_full, _, full_step, full_ctx = eng.steps_with(eng.max_rows)
    if eng.max_rows > 1 and n_full:
        bds.append(breakdown(engine, small, cfg, eng.max_rows, full_ctx, max(3, spec.reps // 4), full_step))
    del small

    hf_runs: list[HFRun] = []
    agree = (float("nan"), float("nan"))
    hf_best = None
    torch_threads: dict[str, Any] = {}
    if not args.skip_hf:
        import torch

        with tempfile.TemporaryDirectory(prefix="bench-offline-hf-") as tmp:
            model = load_hf(params, cfg, Path(tmp))
        with torch.inference_mode():  # one-time torch/generate set-up outside the timing
            model.generate(input_ids=torch.tensor([wl.prompts[0][:16]]), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=cfg.pad_token_id)
        torch_threads = pick_torch_threads(model, args.torch_threads, cfg.pad_token_id)
        for bsz in spec.hf_batch_sizes:
            h = run_hf(model, wl, bsz, spec.hf_sort, cfg.pad_token_id)
            log(f"{h.name}: {h.useful_tok_s:.1f} useful tok/s ({h.raw_tok_s:.1f} raw) in {h.wall_s:.1f} s")
            hf_runs.append(h)
        hf_best = max(hf_runs, key=lambda h: h.useful_tok_s)
        agree = agreement(eng.tokens, hf_best, "w")
        del model

    command = "python scripts/bench_offline.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    result = {
        "label": args.label, "command": command.strip(), "started": started, "spec": spec, "workload": wl,
        "engine": eng, "hf": hf_runs, "hf_best": hf_best, "bandwidth": bw, "batch1": b1,
        "param_bytes": param_bytes, "num_params": num_params, "machine": machine, "model": args.model,
        "seed": args.seed, "warmup_s": warmup_s, "warmup_shapes": shapes, "agree": agree, "breakdown": bds,
        "batched_tokens": ecfg.resolved_batched_tokens(cfg), "num_blocks": num_blocks,
        "total_s": time.perf_counter() - t_start, "load": (load0, os.getloadavg()[0]),
        "cpu_pressure": pressure_share(psi0, time.perf_counter() - t_start),
        "torch_threads": torch_threads,
    }
    if args.json is not None:
        dump = {k: v for k, v in result.items() if k not in ("workload", "spec", "engine", "hf", "hf_best")}
        dump["spec"] = dataclasses.asdict(spec)
        dump["engine"] = {k: v for k, v in dataclasses.asdict(eng).items() if k != "tokens"}
        dump["hf"] = [{k: v for k, v in dataclasses.asdict(h).items() if k != "tokens"} for h in hf_runs]
        dump["breakdown"] = [dataclasses.asdict(b) for b in bds]
        args.json.write_text(json.dumps(dump, indent=1, default=str))
    md = render(result)
    print(md)
    if not args.no_write:
        write_section(args.out, args.label, md)
        log(f"wrote section {args.label!r} to {args.out}")


if __name__ == "__main__":
    main()
