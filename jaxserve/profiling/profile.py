"""Time one instance's jitted steps over a grid of batch shapes on the local devices, and fit them.

    --model DIR|preset  --load_for_profile()-->  ModelConfig + params (a preset gets random weights)
    first tp*pp local devices  -->  ModelExecutor (pp=1) or PipelineExecutor (pp>1), init_kv
    prefill grid (n prompts x length l)   --StepShape(T, R, packed) bucketed as the engine does-->  ms
    decode grid  (batch B x context c)    --StepShape(B, B, False, ((B, 1, MB),))-------------->  ms
      + mixed decodes (one context c among B-1 of the shortest), same shapes ----------------->  ms
       each shape: one warm-up call (compile excluded), then the median (or --stat min) of --repeats
       timed calls per pass, over --passes walks of the grid (executor.execute +
       jax.block_until_ready; host packing not timed)
    samples --planner.fit.fit_nonnegative (least squares; a fit with a negative coefficient is redone
            with it held at 0, as the simulator needs positive times)--> prefill / decode coefficients
            --fit_packed_prefill--> prefill_packed [a, b, c]: a + b*T + c*T^2 of one packed call of T
            padded tokens (the engine's own shapes: XLA attends over the whole packed call)
            --fit_padded_decode--> decode_padded [[rows, a, p, q]]: a + p*longest context + q*sum of
            contexts per padded row count
            --record.write_entries--> profile JSON (DistServe format) under the engine key (and, by
            default, the colocated key too: our colocated engine issues the same executor calls)
    engine_costs=True: engine_costs.measure_engine_costs runs LLMEngine in-process (tp=1, pp=1)

``context`` counts the tokens a decode attends to, including the one it writes this step. The
entry records what was measured (``profiled``: layers, pp, dtype, attention, device kind, grid).
A shallower model (``--layers``) is flagged there and in ``notes``; a pp>1 run is stored under
``tpN`` too (the planner's profile is per tp at pp=1; one pipeline step runs its stages in
sequence, so it is about the pp=1 time plus the hops).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxserve.config import ConfigError, ModelConfig, model_preset
from jaxserve.engine.executor import ModelExecutor
from jaxserve.engine.pipeline import PipelineExecutor
from jaxserve.engine.runner import Buckets
from jaxserve.model import demo
from jaxserve.model.checkpoint import load_model
from jaxserve.model.inputs import SeqChunk, StepInputs, StepShape, bucket_for, build_step_inputs
from jaxserve.model.loader import CheckpointError
from jaxserve.model.opt import dtype_of
from jaxserve.parallel.sharding import check_tp
from planner.errors import PlannerError
from planner.fit import Sample, fit_nonnegative, fit_packed_prefill, fit_padded_decode
from planner.latency import DISAGG_ENGINE

from .engine_costs import measure_engine_costs
from .grid import Grid
from .record import COLOCATED_ENGINE, Fitted, ProfileResult, write_entries

DEFAULT_GRID = Grid()


def load_for_profile(spec: str, dtype: str, layers: int | None = None, seed: int = 0, tp: int = 1
                     ) -> tuple[ModelConfig, Any, str, int]:
    """(config, params, default model key, full depth) from a folder, the demo name, or a preset.

    ``layers`` keeps only the first N decoder layers (a preset's random weights are drawn for
    those only). A preset's ``tp`` is checked before any weights are drawn.
    """
    if Path(spec).is_dir() or spec == demo.DEMO_NAME:
        try:
            loaded = load_model(spec, dtype)
        except (CheckpointError, ConfigError) as e:
            raise PlannerError(f"--model {spec}: {e}") from e
        cfg, params, full = loaded.cfg, loaded.params, loaded.cfg.num_hidden_layers
        if layers is not None:
            _check_layers(cfg, layers)
            cfg = cfg.replace(num_hidden_layers=layers)
            params = {**params, "layers": list(params["layers"][:layers])}
        return cfg, params, loaded.cfg.name, full
    try:
        cfg = model_preset(spec, dtype=dtype)
    except ConfigError as e:
        raise PlannerError(f"--model {spec!r} is not a folder and {e}") from e
    full = cfg.num_hidden_layers
    try:
        check_tp(cfg, tp)
    except ValueError as e:
        raise PlannerError(str(e)) from e
    if layers is not None:
        _check_layers(cfg, layers)
        cfg = cfg.replace(num_hidden_layers=layers)
    np_dt = np.dtype(dtype_of(dtype))
    params = jax.tree_util.tree_map(lambda a: a.astype(np_dt), demo.random_params_numpy(cfg, seed))
    return cfg, params, spec, full


def _check_layers(cfg: ModelConfig, layers: int) -> None:
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise PlannerError(f"--layers must be in 1..{cfg.num_hidden_layers} for {cfg.name}, got {layers}")


def _check_layout(cfg: ModelConfig, tp: int, pp: int, devices: Sequence[Any], engine_costs: bool) -> None:
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
    if len(devices) < tp * pp:
        raise PlannerError(f"tp={tp} x pp={pp} needs {tp * pp} local devices, found {len(devices)} "
                           f"{devices[0].platform} device(s) (on CPU set XLA_FLAGS="
                           f"--xla_force_host_platform_device_count={tp * pp} before starting)")


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


def times_ms(call: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` calls, each waited on with ``jax.block_until_ready``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class _Steps:
    """A grid point (per-request lengths) as the engine would run it: bucketed shape, real pages."""

    def __init__(self, cfg: ModelConfig, buckets: Buckets, block_size: int, seed: int) -> None:
        self.cfg, self.buckets, self.bs = cfg, buckets, block_size
        self.rng = np.random.default_rng(seed)

    def shape(self, lens: Sequence[int], decode: bool) -> StepShape:
        b_ = self.buckets
        if decode:
            return b_.decode_shape(len(lens))
        return StepShape(bucket_for(sum(lens), b_.prefill_tokens, "prefill tokens"),
                         bucket_for(len(lens), b_.prefill_rows, "prefill rows"), True)

    def inputs(self, lens: Sequence[int], shape: StepShape, decode: bool) -> StepInputs:
        out, nxt = [], 1  # distinct real blocks per sequence, so attention reads real pages
        for ln in lens:
            nb = -(-ln // self.bs)
            table = list(range(nxt, nxt + nb))
            nxt += nb
            if decode:  # the last token of a ln-token context; positions [0, ln-1) are cached
                out.append(SeqChunk([int(self.rng.integers(4, self.cfg.vocab_size))], ln - 1, table))
            else:
                out.append(SeqChunk(self.rng.integers(4, self.cfg.vocab_size, ln).tolist(), 0, table))
        return build_step_inputs([out], shape, self.bs)


def _time_groups(executor: Any, steps: _Steps, groups: Sequence[tuple[bool, list[list[int]]]], grid: Grid,
                 progress: bool) -> list[list[Sample]]:
    """Per group (decode?, points): (lengths, ms) of each point, ms the grid's statistic over every pass."""
    warmed: set[StepShape] = set()
    bar = tqdm(total=grid.passes * sum(len(pts) for _, pts in groups), desc="profiling", unit="shape",
               file=sys.stderr, disable=not progress)
    # prefill first: its writes fill the pages the decode steps then read. Several passes spread each
    # shape's repeats over the run, so a burst of other work on the host spoils at most one pass.
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(grid.passes):
        for g, (decode, points) in enumerate(groups):
            for k, lens in enumerate(points):
                shape = steps.shape(lens, decode)
                inputs = steps.inputs(lens, shape, decode)
                bar.set_postfix_str(f"{'decode' if decode else 'prefill'} {len(lens)}x{lens[0]}")
                if shape not in warmed:  # compile outside the timing
                    jax.block_until_ready(executor.execute(inputs))
                    warmed.add(shape)
                times.setdefault((g, k), []).extend(times_ms(lambda i=inputs: executor.execute(i), grid.repeats))
                bar.update()
    bar.close()
    stat = min if grid.stat == "min" else statistics.median
    return [[(list(lens), float(stat(times[(g, k)]))) for k, lens in enumerate(points)]
            for g, (_, points) in enumerate(groups)]


def _fit(samples: Sequence[list[Sample]], steps: _Steps, small_batch_threshold: int) -> Fitted:
    pre, dec, mix = samples
    pre_fit, dec_fit, refit = fit_nonnegative(pre, dec, small_batch_threshold)
    packed = fit_packed_prefill([(steps.shape(ls, False).num_tokens, t) for ls, t in pre])
    padded = fit_padded_decode([(steps.shape(ls, True).num_tokens, max(ls), sum(ls), t) for ls, t in dec + mix])
    return Fitted(pre_fit, dec_fit, refit, packed, padded)


def _engine_costs(cfg: ModelConfig, params: Any, device: Any, grid: Grid, max_len: int, seed: int,
                  progress: bool) -> dict[str, Any]:
    bar = tqdm(total=1, desc="engine costs", file=sys.stderr, disable=not progress)
    costs = measure_engine_costs(cfg, params, device, block_size=grid.block_size, max_num_seqs=grid.max_num_seqs,
                                 max_model_len=min(max_len, grid.max_tokens), token_budget=grid.max_tokens,
                                 repeats=grid.repeats, seed=seed)
    bar.update()
    bar.close()
    return costs


def profile_model(cfg: ModelConfig, params: Any, *, tp: int = 1, pp: int = 1, grid: Grid = DEFAULT_GRID,
                  out: str | Path = "profile.json", model_key: str | None = None, engine: str = DISAGG_ENGINE,
                  colocated_engine: str | None = COLOCATED_ENGINE, attention: str = "auto",
                  small_batch_threshold: int = 95, seed: int = 0, full_layers: int | None = None,
                  progress: bool = True, engine_costs: bool = False) -> ProfileResult:
    """Time the grid on the first tp*pp local devices, fit, and merge the entry into ``out``."""
    devices = jax.local_devices()
    _check_layout(cfg, tp, pp, devices, engine_costs)
    grid.check()
    max_len, bs = cfg.max_position_embeddings, grid.block_size
    pre_pts, dec_pts = grid.prefill_points(max_len), grid.decode_points(max_len)
    if len(pre_pts) < 3 or len(dec_pts) < 3:
        raise PlannerError(f"the grid gives {len(pre_pts)} prefill and {len(dec_pts)} decode points within "
                           f"--max-tokens {grid.max_tokens} / --max-kv-tokens {grid.max_kv_tokens} / "
                           f"{max_len} positions; need at least 3 of each")
    mix_pts = grid.mixed_decode_points(max_len)
    buckets = Buckets.for_limits(max_num_seqs=grid.max_num_seqs, max_model_len=max_len,
                                 max_num_batched_tokens=max(sum(p) for p in pre_pts), block_size=bs)
    need = max([sum(-(-ln // bs) for ln in p) for p in pre_pts] + [sum(-(-c // bs) for c in p) for p in dec_pts])
    used = devices[:tp * pp]
    if pp == 1:
        executor: Any = ModelExecutor(cfg, params, used, tp=tp, attention=attention)
    else:
        executor = PipelineExecutor(cfg, params, used, tp=tp, pp=pp, attention=attention)
    executor.init_kv(need + 1, bs)  # + the null block 0
    steps = _Steps(cfg, buckets, bs, seed)
    samples = _time_groups(executor, steps, ((False, pre_pts), (True, dec_pts), (True, mix_pts)), grid, progress)
    fits = _fit(samples, steps, small_batch_threshold)
    costs = _engine_costs(cfg, params, used[0], grid, max_len, seed, progress) if engine_costs else None
    dev = used[0]
    hardware = {"name": dev.device_kind, "platform": dev.platform,
                "memory_gib": _device_memory_gib(dev, len(devices)), "profiled_devices": tp * pp}
    profiled = {"layers": cfg.num_hidden_layers, "model_layers": full_layers or cfg.num_hidden_layers,
                "tp": tp, "pp": pp, "dtype": cfg.dtype, "attention": attention, "device_kind": dev.device_kind,
                "platform": dev.platform, "block_size": bs, "max_num_seqs": grid.max_num_seqs,
                "repeats": grid.repeats, "passes": grid.passes, "stat": grid.stat,
                "prefill_samples": len(samples[0]), "decode_samples": len(samples[1]),
                "decode_mixed_samples": len(samples[2]), "nonnegative_refit": fits.refit}
    return write_entries(out, engine=engine, colocated_engine=colocated_engine, key=model_key or cfg.name, tp=tp,
                         pp=pp, fits=fits, samples=samples, profiled=profiled, hardware=hardware, costs=costs)
