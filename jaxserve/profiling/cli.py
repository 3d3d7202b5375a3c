"""``python -m jaxserve.profiling``: time our engine's steps on the local devices and fit the planner's latency model.

    argv --build_parser()--> flags --> XLA host devices for tp*pp (on CPU, unless XLA_FLAGS sets a count)
      --profile.load_for_profile / profile_model--> profile JSON (see ``jaxserve.profiling.profile``)
      --record.format_report--> stdout: fit error (RMSE ms, max relative error) and a measured-vs-fitted table

Bad input (unknown preset, tp not dividing the heads, too few devices, ...) prints one
``error: ...`` line on stderr and exits 2. jax is imported only once the device count is set.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from jaxserve.config import ConfigError
from planner.errors import PlannerError
from planner.latency import DISAGG_ENGINE

from .grid import (
    DEFAULT_DECODE_BATCHES,
    DEFAULT_DECODE_CONTEXTS,
    DEFAULT_PREFILL_BATCHES,
    DEFAULT_PREFILL_LENS,
    Grid,
)
from .record import COLOCATED_ENGINE, fit_warnings, format_report


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


def _add_model_args(ap: argparse.ArgumentParser) -> None:
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
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "native", "pallas"],
                    help="attention backend (auto: Pallas on GPU, the native kernel else XLA on CPU)")


def _add_grid_args(ap: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxserve.profiling",
        description="Time jaxserve's real prefill and decode steps over a grid of batch shapes on the local "
                    "devices, fit the planner's latency coefficients by least squares (prefill ms = a + b*sum(l) "
                    "+ c*sum(l^2); decode ms = a + b*sum(context) + c*batch) and merge them into a profile JSON "
                    "that `python -m planner --profile` reads. Compile time is excluded (one warm-up call per "
                    "shape); each point is the median of --repeats calls. On CPU, --tp*--pp virtual devices are "
                    "created when XLA_FLAGS does not set a device count.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(ap)
    _add_grid_args(ap)
    ap.add_argument("--small-batch-threshold", type=int, default=95)
    ap.add_argument("--seed", type=int, default=0, help="random weights / token ids")
    ap.add_argument("--engine-costs", action="store_true",
                    help="also run the engine in-process (tp=1, pp=1) and measure what its steps add to the model "
                         "calls: host ms per call and per sequence, KV export/import ms per request (a + b*tokens); "
                         "stored as the entry's engine_costs (jaxserve.profiling.engine_costs)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _ensure_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` host devices unless jax is already up or XLA_FLAGS fixes a count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _run(a: argparse.Namespace) -> int:
    if a.tp < 1 or a.pp < 1:
        raise PlannerError(f"--tp and --pp must be >= 1, got tp={a.tp} pp={a.pp}")
    if a.layers is not None and a.layers < 1:
        raise PlannerError(f"--layers must be >= 1, got {a.layers}")
    _ensure_cpu_devices(a.tp * a.pp)
    import jax  # only now: XLA reads the device count when jax starts

    from .profile import load_for_profile, profile_model

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
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _run(a)
    except (PlannerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
