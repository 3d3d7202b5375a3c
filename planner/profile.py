"""``python -m planner.profile``: time our engine's steps on the local devices and fit the planner's latency model.

    --model DIR|preset  --load_model() / model_preset()+random weights-->  ModelConfig + params
    first tp*pp local devices  -->  ModelExecutor (pp=1) or PipelineExecutor (pp>1), init_kv
    prefill grid (n prompts x length l)   --StepShape(T, R, packed) bucketed as the engine does-->  ms
    decode grid  (batch B x context c)    --StepShape(B, B, False, ((B, 1, MB),))-------------->  ms
      + mixed decodes (one context c among B-1 of the shortest), same shapes ----------------->  ms
       each shape: one warm-up call (compile excluded), then the median (or --stat min) of --repeats
       timed calls per pass, over --passes walks of the grid (executor.execute +
       jax.block_until_ready; host packing not timed)
    samples --planner.fit.fit_prefill / fit_decode (least squares; a fit with a negative coefficient
            is redone with it held at 0, as the simulator needs positive times)--> coefficients (ms)
            --planner.fit.write_profile--> profile JSON (DistServe format) under --engine
            (and, by default, the same entry under --colocated-engine so ``python -m planner`` finds
            a colocated baseline: our colocated engine issues the same executor calls)
    samples --fit_packed_prefill--> prefill_packed [a, b, c]: a + b*T + c*T^2 of one packed call of T
            padded tokens (the engine's own shapes: XLA attends over the whole packed call)
            --fit_padded_decode--> decode_padded [[rows, a, p, q]]: a + p*longest context + q*sum of
            contexts per padded row count
    --engine-costs: planner.engine_costs runs LLMEngine in-process and measures the host ms per call
            and per sequence around those calls, and the KV export/import ms per request (engine_costs)
    stdout: fit error (RMSE ms, max relative error) and a small measured-vs-fitted table

Coefficient semantics are those of ``configs/profiles/a100_80g.json``: prefill batch ms =
``a + b*sum(l) + c*sum(l^2)``; decode step ms = ``a + b*sum(context) + c*batch`` with
``decode_small`` below ``small_batch_threshold`` and ``decode_large`` from it on. ``context``
counts the tokens a decode attends to, including the one it writes this step.

The entry for ``tpN`` also records what was measured (``profiled``: layers, pp, dtype, attention,
device kind, grid) and the full fit error. A ``--layers`` run (a shallower model, for a quick CPU
profile) is stored under the model's name but flagged there and in ``notes``; its times are for
the shallower model. A pp>1 run is stored under ``tpN`` too (the planner's profile is per tp at
pp=1; one pipeline step runs its stages in sequence, so it is about the pp=1 time plus the hops).

Bad input (unknown preset, tp not dividing the heads, too few devices, ...) prints one
``error: ...`` line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxserve.config import ConfigError, ModelConfig, model_preset

from .errors import PlannerError
from .fit import Fit, Sample, fit_decode, fit_prefill, write_profile
from .latency import DISAGG_ENGINE

if TYPE_CHECKING:
    from jaxserve.model.inputs import StepInputs, StepShape

COLOCATED_ENGINE = "jaxserve_colocated"
DEFAULT_PREFILL_BATCHES = (1, 2, 4, 8)
DEFAULT_PREFILL_LENS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_DECODE_CONTEXTS = (16, 64, 256, 1024)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Which batch shapes to time."""

    prefill_batches: tuple[int, ...] = DEFAULT_PREFILL_BATCHES  # prompts per prefill batch
    prefill_lens: tuple[int, ...] = DEFAULT_PREFILL_LENS  # prompt length (all prompts of a batch alike)
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    decode_contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS  # tokens attended per sequence
    max_tokens: int = 2048  # cap on sum(l) of a prefill batch
    max_kv_tokens: int = 32768  # cap on sum(context) of a decode step (sizes the KV pages)
    repeats: int = 3
    stat: str = "median"  # of the repeats: "median" or "min" (min resists a busy host's noise)
    passes: int = 1  # times the whole grid is walked; the stat is over every pass's repeats
    block_size: int = 16
    max_num_seqs: int = 64  # the engine's batch limit (sets the shape buckets, as LLMEngine does)

    def prefill_points(self, max_len: int) -> list[list[int]]:
        return [[ln] * n for ln in sorted(set(self.prefill_lens)) for n in sorted(set(self.prefill_batches))
                if ln <= max_len and n * ln <= self.max_tokens and n <= self.max_num_seqs]

    def decode_points(self, max_len: int) -> list[list[int]]:
        return [[c] * b for c in sorted(set(self.decode_contexts)) for b in sorted(set(self.decode_batches))
                if c <= max_len and b * c <= self.max_kv_tokens and b <= self.max_num_seqs]

    def mixed_decode_points(self, max_len: int) -> list[list[int]]:
        """One long context among short ones (the shortest profiled): separates what a decode step pays
        per row up to the longest context from what it pays per context token actually cached."""
        short = min(self.decode_contexts)
        return [[c] + [short] * (b - 1) for c in sorted(set(self.decode_contexts)) if short < c <= max_len
                for b in sorted(set(self.decode_batches)) if 1 < b <= self.max_num_seqs]


@dataclasses.dataclass
class ProfileResult:
    """Fitted coefficients, their errors and the raw samples of one profiling run."""

    model_key: str
    tp: int
    pp: int
    prefill: Fit
    decode: dict[str, Any]
    prefill_samples: list[Sample]
    decode_samples: list[Sample]
    entry: dict[str, Any]  # what was written under engines.<engine>.<model_key>.tp<tp>
    out: Path
    engines: list[str]


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _csv(vals: Sequence[int]) -> str:
    return ",".join(map(str, vals))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m planner.profile",
        description="Time jaxserve's real prefill and decode steps over a grid of batch shapes on the local "
                    "devices, fit the planner's latency coefficients by least squares (prefill ms = a + b*sum(l) "
                    "+ c*sum(l^2); decode ms = a + b*sum(context) + c*batch) and merge them into a profile JSON "
                    "that `python -m planner --profile` reads. Compile time is excluded (one warm-up call per "
                    "shape); each point is the median of --repeats calls. On CPU, --tp*--pp virtual devices are "
                    "created when XLA_FLAGS does not set a device count.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF OPT folder, jaxserve converted folder, 'jaxserve-demo-opt', or a preset name "
                         "(e.g. opt-125m; random weights)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the profiled instance")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (PipelineExecutor when > 1)")
    ap.add_argument("--out", default="profile.json", help="profile JSON to create or merge into")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights/activations/KV dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--layers", type=int, default=None,
                    help="profile only the first N decoder layers (quick CPU runs); recorded in the JSON")
    ap.add_argument("--model-key", default=None,
                    help="model name in the JSON (default: the preset name / the model's config name); "
                         "`python -m planner --model` must be a preset name to use it")
    ap.add_argument("--engine", default=DISAGG_ENGINE, help="engine key the entry is written under")
    ap.add_argument("--colocated-engine", default=COLOCATED_ENGINE,
                    help="also write the same entry under this engine key (the planner's colocated baseline; "
                         "our colocated engine runs the same step calls); '' to skip")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"],
                    help="attention backend (auto: Pallas on GPU, XLA elsewhere)")
    ap.add_argument("--prefill-batches", type=_ints, default=DEFAULT_PREFILL_BATCHES,
                    help=f"prompts per prefill batch (default {_csv(DEFAULT_PREFILL_BATCHES)})")
    ap.add_argument("--prefill-lens", type=_ints, default=DEFAULT_PREFILL_LENS,
                    help=f"prompt lengths (default {_csv(DEFAULT_PREFILL_LENS)})")
    ap.add_argument("--max-tokens", type=int, default=2048, help="largest sum(l) of a prefill batch")
    ap.add_argument("--decode-batches", type=_ints, default=DEFAULT_DECODE_BATCHES,
                    help=f"decode batch sizes (default {_csv(DEFAULT_DECODE_BATCHES)}); include sizes >= "
                         "--small-batch-threshold to fit decode_large separately")
    ap.add_argument("--decode-contexts", type=_ints, default=DEFAULT_DECODE_CONTEXTS,
                    help=f"tokens each decode attends to (default {_csv(DEFAULT_DECODE_CONTEXTS)})")
    ap.add_argument("--max-kv-tokens", type=int, default=32768,
                    help="largest sum(context) of a decode step (sizes the KV cache)")
    ap.add_argument("--max-num-seqs", type=int, default=64,
                    help="engine batch limit; the shape buckets follow LLMEngine's for this limit")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per shape (median)")
    ap.add_argument("--passes", type=int, default=1,
                    help="walk the whole grid this many times and take the statistic over every pass's repeats "
                         "(a burst of other work on a shared host then spoils at most one pass)")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="statistic over the repeats (min resists noise from other work on the host)")
    ap.add_argument("--small-batch-threshold", type=int, default=95)
    ap.add_argument("--seed", type=int, default=0, help="random weights / token ids")
    ap.add_argument("--engine-costs", action="store_true",
                    help="also run the engine in-process (tp=1, pp=1) and measure what its steps add to the model "
                         "calls: host ms per call and per sequence, KV export/import ms per request (a + b*tokens); "
                         "stored as the entry's engine_costs (planner.engine_costs)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _ensure_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` host devices unless jax is already up or XLA_FLAGS fixes a count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def load_for_profile(spec: str, dtype: str, layers: int | None = None, seed: int = 0, tp: int = 1
                     ) -> tuple[ModelConfig, Any, str, int]:
    """(config, params, default model key, full depth) from a folder, the demo name, or a preset.

    ``layers`` keeps only the first N decoder layers (a preset's random weights are drawn for
    those only). A preset's ``tp`` is checked before any weights are drawn.
    """
    import numpy as np

    from jaxserve.model import demo
    from jaxserve.model.checkpoint import load_model
    from jaxserve.model.loader import CheckpointError
    from jaxserve.model.opt import dtype_of
    from jaxserve.parallel.sharding import check_tp

    if Path(spec).is_dir() or spec == demo.DEMO_NAME:
        try:
            loaded = load_model(spec, dtype)
        except (CheckpointError, ConfigError) as e:
            raise PlannerError(f"--model {spec}: {e}") from e
        cfg, params, key = loaded.cfg, loaded.params, loaded.cfg.name
        full = cfg.num_hidden_layers
    else:
        try:
            cfg = model_preset(spec, dtype=dtype)
        except ConfigError as e:
            raise PlannerError(f"--model {spec!r} is not a folder and {e}") from e
        key, full = spec, cfg.num_hidden_layers
        try:
            check_tp(cfg, tp)
        except ValueError as e:
            raise PlannerError(str(e)) from e
        if layers is not None:
            _check_layers(cfg, layers)
            cfg = cfg.replace(num_hidden_layers=layers)
        np_dt = np.dtype(dtype_of(dtype))
        params = _tree_map(lambda a: a.astype(np_dt), demo.random_params_numpy(cfg, seed))
        return cfg, params, key, full
    if layers is not None:
        _check_layers(cfg, layers)
        cfg = cfg.replace(num_hidden_layers=layers)
        params = {**params, "layers": list(params["layers"][:layers])}
    return cfg, params, key, full


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(fn, tree)


def _check_layers(cfg: ModelConfig, layers: int) -> None:
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise PlannerError(f"--layers must be in 1..{cfg.num_hidden_layers} for {cfg.name}, got {layers}")


def _device_memory_gib(dev: Any, n_devices: int) -> float:
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    if stats.get("bytes_limit"):
        return round(stats["bytes_limit"] / 2**30, 2)
    try:  # host devices share the host's memory
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return round(total / 2**30 / max(1, n_devices), 2)
    except (ValueError, OSError):
        return 0.0


def _times_ms(call: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` calls, each waited on with ``jax.block_until_ready``."""
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def nonnegative_fit(x: Any, y: Any) -> Fit:
    """Least squares with every coefficient >= 0: the best over column subsets (the others held at 0).

    Three coefficients make the exhaustive active set cheap; the intercept alone is always feasible
    (times are positive), so a fit always exists.
    """
    import itertools

    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sub, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (sub < 0).any():
                continue
            coef = np.zeros(x.shape[1])
            coef[list(cols)] = sub
            sse = float(np.sum((x @ coef - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, coef)
    assert best is not None
    pred = x @ best[1]
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    c = best[1]
    return Fit((float(c[0]), float(c[1]), float(c[2])), float(np.sqrt(np.mean((pred - y) ** 2))),
               float(rel.max()), len(y))


def _prefill_rows(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    return [[1.0, float(sum(ls)), float(sum(v * v for v in ls))] for ls, _ in samples], [t for _, t in samples]


def _decode_rows(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    return [[1.0, float(sum(ls)), float(len(ls))] for ls, _ in samples], [t for _, t in samples]


def fit_nonnegative(pre_samples: Sequence[Sample], dec_samples: Sequence[Sample], small_batch_threshold: int
                    ) -> tuple[Fit, dict[str, Any], list[str]]:
    """``fit_prefill`` / ``fit_decode``; a fit with a negative coefficient is redone with it held at 0.

    The planner needs non-negative step times for every batch it simulates (a negative decode ``c``
    makes large batches take negative time). Returns the fits and the names that were refit.
    """
    refit: list[str] = []
    pre = fit_prefill(pre_samples)
    if min(pre.coeffs) < 0:
        pre = nonnegative_fit(*_prefill_rows(pre_samples))
        refit.append("prefill")
    dec = fit_decode(dec_samples, small_batch_threshold)
    small = [s for s in dec_samples if len(s[0]) < small_batch_threshold]
    large = [s for s in dec_samples if len(s[0]) >= small_batch_threshold]
    shared = dec["decode_small"] is dec["decode_large"]
    for name, side in (("decode_small", small), ("decode_large", large)):
        if min(dec[name].coeffs) >= 0 or (shared and name == "decode_large"):
            continue
        rows = side if len(side) >= 3 else (large if name == "decode_small" else small)
        dec[name] = nonnegative_fit(*_decode_rows(rows))
        refit.append(name)
    if shared:
        dec["decode_large"] = dec["decode_small"]
    return pre, dec, refit


def fit_packed_prefill(samples: Sequence[tuple[int, float]]) -> Fit:
    """Non-negative fit of one packed prefill call: ms = a + b*T + c*T^2, T the padded token count.

    On the XLA path a packed call attends over all its T tokens (block-diagonal mask over
    ``[T, T]``), so its time depends on the padded T, not on how the prompts split it."""
    x = [[1.0, float(t), float(t) * t] for t, _ in samples]
    return nonnegative_fit(x, [ms for _, ms in samples])


def fit_padded_decode(samples: Sequence[tuple[int, int, int, float]]) -> dict[int, Fit]:
    """Per padded decode batch (rows), a non-negative fit of ms = a + p * M + q * S from
    (rows, M = longest context, S = sum of contexts, ms) samples.

    jaxserve runs a decode step at a power-of-two row count and its attention loops over every row
    up to the batch's longest context (p, per row count), while the pages it really reads grow with
    the contexts actually cached (q; shorter rows read the null block). The a + b*sum(context) +
    c*batch form misses how the cost bends with the batch (the weights are read once per step,
    whatever the rows). Row counts with fewer than 2 distinct M are left out; where every sample has
    S = rows * M (uniform contexts, or one row) the fit has q = 0."""
    by_rows: dict[int, list[tuple[int, int, float]]] = {}
    for rows, m, total, ms in samples:
        by_rows.setdefault(rows, []).append((m, total, ms))
    out = {}
    for rows, pts in sorted(by_rows.items()):
        if len({m for m, _, _ in pts}) < 2:
            continue
        mixed = any(total != rows * m for m, total, _ in pts) and rows > 1
        x = [[1.0, float(m), float(total) if mixed else 0.0] for m, total, _ in pts]
        out[rows] = nonnegative_fit(x, [ms for _, _, ms in pts])
    return out


def profile_model(cfg: ModelConfig, params: Any, *, tp: int = 1, pp: int = 1, grid: Grid = Grid(),
                  out: str | Path = "profile.json", model_key: str | None = None, engine: str = DISAGG_ENGINE,
                  colocated_engine: str | None = COLOCATED_ENGINE, attention: str = "auto",
                  small_batch_threshold: int = 95, seed: int = 0, full_layers: int | None = None,
                  progress: bool = True, engine_costs: bool = False) -> ProfileResult:
    """Time the grid on the first tp*pp local devices, fit, and merge the entry into ``out``."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxserve.engine.executor import ModelExecutor
    from jaxserve.engine.runner import Buckets
    from jaxserve.model.inputs import SeqChunk, StepShape, bucket_for, build_step_inputs
    from jaxserve.parallel.pipeline import PipelineExecutor
    from jaxserve.parallel.sharding import check_tp

    if tp < 1 or pp < 1:
        raise PlannerError(f"--tp and --pp must be >= 1, got tp={tp} pp={pp}")
    try:
        check_tp(cfg, tp)
    except ValueError as e:
        raise PlannerError(str(e)) from e
    if engine_costs and (tp, pp) != (1, 1):
        raise PlannerError("--engine-costs measures a tp=1, pp=1 instance")
    if pp > cfg.num_hidden_layers:
        raise PlannerError(f"pp={pp} stages need at least {pp} layers, the model has {cfg.num_hidden_layers}")
    devices = jax.local_devices()
    if len(devices) < tp * pp:
        raise PlannerError(f"tp={tp} x pp={pp} needs {tp * pp} local devices, found {len(devices)} "
                           f"{devices[0].platform} device(s) (on CPU set XLA_FLAGS="
                           f"--xla_force_host_platform_device_count={tp * pp} before starting)")
    for name in ("repeats", "passes", "block_size", "max_num_seqs", "max_tokens", "max_kv_tokens"):
        if getattr(grid, name) < 1:
            raise PlannerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(grid, name)}")
    if grid.stat not in ("median", "min"):
        raise PlannerError(f"--stat must be median or min, got {grid.stat!r}")
    if grid.block_size & (grid.block_size - 1):
        raise PlannerError(f"--block-size must be a power of two, got {grid.block_size}")
    max_len = cfg.max_position_embeddings
    pre_pts, dec_pts = grid.prefill_points(max_len), grid.decode_points(max_len)
    if len(pre_pts) < 3 or len(dec_pts) < 3:
        raise PlannerError(f"the grid gives {len(pre_pts)} prefill and {len(dec_pts)} decode points within "
                           f"--max-tokens {grid.max_tokens} / --max-kv-tokens {grid.max_kv_tokens} / "
                           f"{max_len} positions; need at least 3 of each")

    bs = grid.block_size
    buckets = Buckets.for_limits(max_num_seqs=grid.max_num_seqs, max_model_len=max_len,
                                 max_num_batched_tokens=max(sum(p) for p in pre_pts), block_size=bs)
    need = max([sum(-(-ln // bs) for ln in p) for p in pre_pts] + [sum(-(-c // bs) for c in p) for p in dec_pts])
    used = devices[:tp * pp]
    if pp == 1:
        executor: Any = ModelExecutor(cfg, params, used, tp=tp, attention=attention)
    else:
        executor = PipelineExecutor(cfg, params, used, tp=tp, pp=pp, attention=attention)
    executor.init_kv(need + 1, bs)  # + the null block 0
    rng = np.random.default_rng(seed)

    def chunks(lens: Sequence[int], decode: bool) -> list[SeqChunk]:
        out_, nxt = [], 1  # distinct real blocks per sequence, so attention reads real pages
        for ln in lens:
            nb = -(-ln // bs)
            table = list(range(nxt, nxt + nb))
            nxt += nb
            if decode:  # the last token of a ln-token context; positions [0, ln-1) are cached
                out_.append(SeqChunk([int(rng.integers(4, cfg.vocab_size))], ln - 1, table))
            else:
                out_.append(SeqChunk(rng.integers(4, cfg.vocab_size, ln).tolist(), 0, table))
        return out_

    def shape_of(lens: Sequence[int], decode: bool) -> StepShape:
        if decode:
            b = bucket_for(len(lens), buckets.decode_batch, "decode batch")
            mb = bucket_for(max(-(-c // bs) for c in lens), buckets.blocks, "blocks per sequence")
            return StepShape(b, b, False, ((b, 1, mb),))
        return StepShape(bucket_for(sum(lens), buckets.prefill_tokens, "prefill tokens"),
                         bucket_for(len(lens), buckets.prefill_rows, "prefill rows"), True)

    warmed: set[StepShape] = set()
    pre_samples: list[Sample] = []
    dec_samples: list[Sample] = []
    mix_samples: list[Sample] = []
    mix_pts = grid.mixed_decode_points(max_len)
    groups = ((False, pre_pts, pre_samples), (True, dec_pts, dec_samples), (True, mix_pts, mix_samples))
    bar = tqdm(total=grid.passes * (len(pre_pts) + len(dec_pts) + len(mix_pts)), desc="profiling", unit="shape",
               file=sys.stderr, disable=not progress)
    # prefill first: its writes fill the pages the decode steps then read. Several passes spread each
    # shape's repeats over the run, so a burst of other work on the host spoils at most one pass.
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(grid.passes):
        for g, (decode, points, _samples) in enumerate(groups):
            for k, lens in enumerate(points):
                shape = shape_of(lens, decode)
                inputs: StepInputs = build_step_inputs([chunks(lens, decode)], shape, bs)
                bar.set_postfix_str(f"{'decode' if decode else 'prefill'} {len(lens)}x{lens[0]}")
                if shape not in warmed:  # compile outside the timing
                    jax.block_until_ready(executor.execute(inputs))
                    warmed.add(shape)
                times.setdefault((g, k), []).extend(_times_ms(lambda i=inputs: executor.execute(i), grid.repeats))
                bar.update()
    bar.close()
    for g, (_decode, points, samples) in enumerate(groups):
        for k, lens in enumerate(points):
            t = times[(g, k)]
            samples.append((list(lens), float(min(t) if grid.stat == "min" else statistics.median(t))))

    pre_fit, dec_fit, refit = fit_nonnegative(pre_samples, dec_samples, small_batch_threshold)
    packed_fit = fit_packed_prefill([(shape_of(ls, False).num_tokens, t) for ls, t in pre_samples])
    padded_dec = fit_padded_decode([(shape_of(ls, True).num_tokens, max(ls), sum(ls), t)
                                    for ls, t in dec_samples + mix_samples])
    costs = None
    if engine_costs:
        from .engine_costs import measure_engine_costs

        bar = tqdm(total=1, desc="engine costs", file=sys.stderr, disable=not progress)
        costs = measure_engine_costs(cfg, params, used[0], block_size=bs, max_num_seqs=grid.max_num_seqs,
                                     max_model_len=min(max_len, grid.max_tokens), token_budget=grid.max_tokens,
                                     repeats=grid.repeats, seed=seed)
        bar.update()
        bar.close()
    dev = used[0]
    hardware = {"name": dev.device_kind, "platform": dev.platform,
                "memory_gib": _device_memory_gib(dev, len(devices)), "profiled_devices": tp * pp}
    key = model_key or cfg.name
    out = Path(out)
    profiled = {"layers": cfg.num_hidden_layers, "model_layers": full_layers or cfg.num_hidden_layers,
                "tp": tp, "pp": pp, "dtype": cfg.dtype, "attention": attention, "device_kind": dev.device_kind,
                "platform": dev.platform, "block_size": bs, "max_num_seqs": grid.max_num_seqs,
                "repeats": grid.repeats, "passes": grid.passes, "stat": grid.stat,
                "prefill_samples": len(pre_samples), "decode_samples": len(dec_samples),
                "decode_mixed_samples": len(mix_samples),
                "nonnegative_refit": refit}
    engines = [engine] + ([colocated_engine] if colocated_engine and colocated_engine != engine else [])
    for eng in engines:
        write_profile(out, engine=eng, model=key, tp=tp, prefill=pre_fit, decode=dec_fit, hardware=hardware)
    doc = json.loads(out.read_text())
    notes = doc.setdefault("notes", {})
    if colocated_engine and colocated_engine != engine:
        notes[colocated_engine] = (f"same measured entries as {engine}: jaxserve's colocated engine issues the "
                                   "same packed-prefill and decode executor calls")
    notes.pop(f"{key}/tp{tp}", None)  # this run replaces the entry, so its old notes go too
    notes.pop(f"{key}/tp{tp}/pp", None)
    if profiled["layers"] != profiled["model_layers"]:
        notes[f"{key}/tp{tp}"] = (f"profiled with {profiled['layers']} of {profiled['model_layers']} decoder "
                                  "layers (--layers): times are for the shallower model")
    if pp > 1:
        notes[f"{key}/tp{tp}/pp"] = (f"measured with pp={pp} (one step runs its stages in sequence); the "
                                     "planner reads tpN entries as pp=1 times")
    entry: dict[str, Any] = {}
    for eng in engines:
        entry = doc["engines"][eng][key][f"tp{tp}"]
        entry["fit_error"].update({
            "prefill_max_rel_err": pre_fit.max_rel_err,
            "decode_small_max_rel_err": dec_fit["decode_small"].max_rel_err,
            "decode_large_max_rel_err": dec_fit["decode_large"].max_rel_err,
            "prefill_n": pre_fit.n, "decode_small_n": dec_fit["decode_small"].n,
            "decode_large_n": dec_fit["decode_large"].n})
        entry["profiled"] = profiled
        entry["prefill_packed"] = list(packed_fit.coeffs)
        if padded_dec:
            entry["decode_padded"] = [[rows, *f.coeffs] for rows, f in padded_dec.items()]
            entry["fit_error"]["decode_padded_max_rel_err"] = max(f.max_rel_err for f in padded_dec.values())
        entry["fit_error"].update({"prefill_packed_rmse_ms": packed_fit.rmse_ms,
                                   "prefill_packed_max_rel_err": packed_fit.max_rel_err})
        if costs is not None:
            entry["engine_costs"] = costs
        entry["samples"] = {"prefill": [[len(ls), ls[0], round(t, 4)] for ls, t in pre_samples],
                            "decode": [[len(ls), ls[0], round(t, 4)] for ls, t in dec_samples],
                            "decode_mixed": [[len(ls), ls[0], ls[-1], round(t, 4)] for ls, t in mix_samples],
                            "columns": "[batch, length (prompt or context) of each request, median ms]"}
    out.write_text(json.dumps(doc, indent=1))
    return ProfileResult(key, tp, pp, pre_fit, dec_fit, pre_samples, dec_samples, entry, out, engines)


def _pick_rows(n: int, worst: int, k: int = 10) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} | {worst})


def format_report(r: ProfileResult) -> str:
    """Fit errors, coefficients and a short measured-vs-fitted table."""
    import numpy as np

    def pred_prefill(ls: Sequence[int]) -> float:
        a, b, c = r.prefill.coeffs
        return a + b * sum(ls) + c * sum(x * x for x in ls)

    def pred_decode(ls: Sequence[int]) -> float:
        fit = r.decode["decode_small" if len(ls) < r.decode["small_batch_threshold"] else "decode_large"]
        a, b, c = fit.coeffs
        return a + b * sum(ls) + c * len(ls)

    p = r.entry["profiled"]
    lines = [f"profiled {r.model_key} ({p['layers']}/{p['model_layers']} layers, {p['dtype']}) tp={r.tp} pp={r.pp} "
             f"on {p['device_kind']} ({p['platform']}), attention {p['attention']}"]
    a, b, c = r.prefill.coeffs
    lines.append(f"prefill ms = {a:.4g} + {b:.4g}*sum(l) + {c:.4g}*sum(l^2)   RMSE {r.prefill.rmse_ms:.3f} ms, "
                 f"max rel err {r.prefill.max_rel_err:.1%} over {r.prefill.n} samples")
    if "prefill_packed" in r.entry:
        a, b, c = r.entry["prefill_packed"]
        err = r.entry["fit_error"]
        lines.append(f"prefill_packed ms = {a:.4g} + {b:.4g}*T + {c:.4g}*T^2 (T: padded tokens of the call)   RMSE "
                     f"{err['prefill_packed_rmse_ms']:.3f} ms, max rel err {err['prefill_packed_max_rel_err']:.1%}")
    if "decode_padded" in r.entry:
        rows = ", ".join(f"{int(b)}: {a:.3g} + {p_:.3g}*M + {q:.3g}*S" for b, a, p_, q in r.entry["decode_padded"])
        lines.append(f"decode_padded ms per padded batch (M: longest context, S: sum of contexts) {rows}   max rel err "
                     f"{r.entry['fit_error']['decode_padded_max_rel_err']:.1%}")
    ec = r.entry.get("engine_costs")
    if ec:
        lines.append(f"engine costs: host {ec['call_ms']:.3g} ms/call + {ec['seq_ms']:.3g} ms/sequence (decode), "
                     f"{ec['prefill_call_ms']:.3g} + {ec['prefill_seq_ms']:.3g}/prompt (prefill); KV export "
                     f"{ec['kv_export_ms'][0]:.3g} + {ec['kv_export_ms'][1]:.3g}*tokens ms, import "
                     f"{ec['kv_import_ms'][0]:.3g} + {ec['kv_import_ms'][1]:.3g}*tokens ms")
    seen: set[int] = set()
    for name in ("decode_small", "decode_large"):
        f = r.decode[name]
        if id(f) in seen:
            lines.append(f"{name}: same fit as decode_small (no samples with batch >= "
                         f"{r.decode['small_batch_threshold']})")
            continue
        seen.add(id(f))
        a, b, c = f.coeffs
        lines.append(f"{name} ms = {a:.4g} + {b:.4g}*sum(ctx) + {c:.4g}*batch   RMSE {f.rmse_ms:.3f} ms, "
                     f"max rel err {f.max_rel_err:.1%} over {f.n} samples")
    for title, samples, pred in (("prefill", r.prefill_samples, pred_prefill),
                                 ("decode", r.decode_samples, pred_decode)):
        rel = [abs(pred(ls) - t) / t for ls, t in samples]
        lines.append(f"{title:<8} {'batch':>5} {'len':>5} {'measured ms':>12} {'fitted ms':>10} {'err':>7}")
        for i in _pick_rows(len(samples), int(np.argmax(rel))):
            ls, t = samples[i]
            lines.append(f"{'':<8} {len(ls):>5} {ls[0]:>5} {t:>12.3f} {pred(ls):>10.3f} {rel[i]:>7.1%}")
    lines.append(f"wrote engines.{{{','.join(r.engines)}}}.{r.model_key}.tp{r.tp} to {r.out}")
    return "\n".join(lines)


def fit_warnings(r: ProfileResult) -> list[str]:
    """Fits whose unconstrained least squares gave a negative coefficient (refit with it at 0)."""
    return [f"{name}: least squares gave a negative coefficient (noise, or a curve a + b*x + c*y does not "
            "capture); refit with it held at 0 so every simulated batch has a positive time"
            for name in r.entry["profiled"]["nonnegative_refit"]]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.tp < 1 or a.pp < 1:
            raise PlannerError(f"--tp and --pp must be >= 1, got tp={a.tp} pp={a.pp}")
        if a.layers is not None and a.layers < 1:
            raise PlannerError(f"--layers must be >= 1, got {a.layers}")
        _ensure_cpu_devices(a.tp * a.pp)
        import jax

        dtype = a.dtype if a.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        n_dev = len(jax.local_devices())
        if n_dev < a.tp * a.pp:
            raise PlannerError(f"tp={a.tp} x pp={a.pp} needs {a.tp * a.pp} local devices, found {n_dev} "
                               f"{jax.default_backend()} device(s) (on CPU set XLA_FLAGS="
                               f"--xla_force_host_platform_device_count={a.tp * a.pp} before starting)")
        cfg, params, key, full = load_for_profile(a.model, dtype, a.layers, a.seed, a.tp)
        grid = Grid(prefill_batches=a.prefill_batches, prefill_lens=a.prefill_lens,
                    decode_batches=a.decode_batches, decode_contexts=a.decode_contexts, max_tokens=a.max_tokens,
                    max_kv_tokens=a.max_kv_tokens, repeats=a.repeats, block_size=a.block_size,
                    max_num_seqs=a.max_num_seqs, stat=a.stat, passes=a.passes)
        result = profile_model(cfg, params, tp=a.tp, pp=a.pp, grid=grid, out=a.out, model_key=a.model_key or key,
                               engine=a.engine, colocated_engine=a.colocated_engine or None,
                               attention=a.attention, small_batch_threshold=a.small_batch_threshold,
                               seed=a.seed, full_layers=full, progress=not a.no_progress,
                               engine_costs=a.engine_costs)
        print(format_report(result))
        for w in fit_warnings(result):
            print(f"warning: {w}", file=sys.stderr)
        if not all(math.isfinite(x) for x in result.prefill.coeffs):
            print("error: the prefill fit is not finite (grid too small or degenerate)", file=sys.stderr)
            return 1
    except (PlannerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
