"""Pipeline-parallel instance: ``pp`` stages of contiguous layers, each on its own ``tp`` sub-mesh.

    StepInputs (numpy) --device_put(replicated, every stage)--> tokens / positions / meta / logits_index
    stage 0     (sub-mesh 0):  tokens --embed--> x [T, D] --layers[r0]--> x   (KV of r0 donated)
        --device_put(x, replicated on sub-mesh 1)-->
    stage s     (sub-mesh s):  x --layers[rs]--> x                           (KV of rs donated)
        ...
    stage pp-1  (sub-mesh pp-1): x --layers[r_last]--> head --> logits [R, V] (on sub-mesh pp-1)

Devices are taken stage-major: stage ``s`` owns ``devices[s*tp:(s+1)*tp]`` as a
``('pp', 'tp')`` mesh of shape ``(1, tp)``, and holds only its layers' params and
KV pages, sharded over ``tp`` by the logical-axis table (``sharding.py``). Stage 0
also holds ``embed_tokens`` / ``embed_positions`` (and ``project_in``); the last
stage holds the final layer norm, ``project_out`` and its own copy of
``embed_tokens`` for the tied lm_head. ``kv``, ``gather_blocks`` and
``scatter_blocks`` speak per-layer lists in layer order across all stages, the
same as ``engine.executor.ModelExecutor``, so KV transfer treats both alike.
``mesh`` is the whole ``(pp, tp)`` mesh (for the record; a KV sharding derived from
it would replicate over ``pp``: place blocks with ``scatter_blocks``). ``attention``
is a backend name as for ``ModelExecutor`` (``engine.attention_backends``), resolved
per stage so Pallas kernels under TP are shard_mapped over that stage's sub-mesh.

How stages overlap (inter-op parallelism). ``execute_many`` takes the micro-batches of one
call (disjoint sequences, each a ``StepInputs``) and hands each stage's work to that stage's own
worker thread: stage ``s`` runs its micro-batches in order and starts micro-batch ``m`` when stage
``s - 1`` has finished it, so while stage ``s + 1`` works on ``m``, stage ``s`` already works on
``m + 1`` (the ``jaxserve.microbatch.wavefront`` schedule, which the planner prices). A thread per
stage is what makes this true on every backend: the CPU client runs a single-device program
inline on the calling thread (so one dispatching thread would run tp=1 stages one after
another), while on GPUs each stage's devices have their own streams and the threads only
dispatch. Stage ``s`` touches only its own params and KV (donated, so its calls run in order);
``execute_many`` returns once every stage has issued every micro-batch. ``execute`` (one
micro-batch) runs the stages on the calling thread. The runner (``engine.runner``) splits a pp>1
packed prefill call of several prompts into ``microbatches`` (default ``pp``) micro-batches;
decode and prompt-continuation calls go through the stages as one micro-batch (why, and the
figures: ``docs/planner.md``, "Pipeline stages: the engine and the model"). ``record_timeline()`` makes
each stage wait for its result and log ``StageSpan``s: an instrumented run, for tests and benches.

Segments. ``stages=range(a, b)`` builds an executor of only those stages (a process's share of a
pipeline whose stages span processes, ``jaxserve.cluster.stages``): ``execute`` runs from tokens when it
holds stage 0, ``execute_from(inputs, x)`` from the previous segment's x otherwise; it returns logits
only if it holds the last stage; ``kv`` and ``kv_stages`` count layers from its own first layer.

Limits. A single micro-batch never overlaps its own stages, and consecutive calls do not overlap
(a step ends with its sampled tokens). On the CPU backend the virtual devices share the host's
cores (2 here): two stages running at once each took 1.5-1.8x as long as alone, so micro-batched
calls took about what the stages in turn take (``scripts/bench_pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import ModelConfig
from jaxserve.engine.attention_backends import make_attention
from jaxserve.engine.executor import gather_pages, scatter_pages
from jaxserve.engine.stage import run_stage
from jaxserve.memory import zeros_untouched
from jaxserve.microbatch import split_runs
from jaxserve.model.inputs import SeqChunk, StepInputs
from jaxserve.model.opt import AttnFn, KVCache, Params, dtype_of
from jaxserve.model.sampling import Sampled, SamplingArrays, sample_tokens
from jaxserve.parallel.sharding import check_tp, kv_sharding, make_mesh, param_shardings, replicated

_FIRST_KEYS = ("embed_tokens", "embed_positions", "project_in")
_LAST_KEYS = ("final_layer_norm", "project_out", "embed_tokens")


def split_layers(num_layers: int, pp: int) -> list[range]:
    """``pp`` contiguous layer ranges, sizes differing by at most one (earlier stages get the extra)."""
    if pp <= 0:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if pp > num_layers:
        raise ValueError(f"pp={pp} stages need at least {pp} layers, the model has {num_layers}")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def stage_params(params: Params, layers: range, first: bool, last: bool) -> Params:
    """The subset of ``params`` one stage holds (same tree structure, fewer entries)."""
    p: Params = {"layers": [params["layers"][i] for i in layers]}
    for k in (_FIRST_KEYS if first else ()) + (_LAST_KEYS if last else ()):
        if k in params:
            p[k] = params[k]
    return p


def split_microbatches(chunks: Sequence[SeqChunk], n: int) -> list[list[SeqChunk]]:
    """Split one step's chunks, in order, into ``min(n, len(chunks))`` non-empty runs of similar token count."""
    return [[chunks[i] for i in r] for r in split_runs([len(c.token_ids) for c in chunks], n)]


@dataclasses.dataclass(frozen=True)
class StageSpan:
    """Stage ``stage`` ran micro-batch ``mb`` of ``execute_many`` call number ``call`` from ``start``
    to ``end`` (``time.perf_counter`` seconds; recorded only in an instrumented run)."""

    call: int
    stage: int
    mb: int
    start: float
    end: float


class PipelineExecutor:
    """Params + paged KV of one instance split into ``pp`` stages of ``tp`` devices each."""

    def __init__(self, cfg: ModelConfig, params: Params, devices: Sequence[jax.Device], tp: int = 1,
                 pp: int = 1, attention: str | AttnFn = "auto", microbatches: int | None = None,
                 stages: range | None = None) -> None:
        devices = list(devices)
        check_tp(cfg, tp)
        # ``stages``: the pipeline's stages this executor holds (a segment of a pipeline spanning
        # processes, ``jaxserve.cluster.stages``); the others run elsewhere
        self.stages = range(pp) if stages is None else stages
        n = len(self.stages)
        if not n or self.stages.start < 0 or self.stages.stop > pp:
            raise ValueError(f"stages {self.stages} are not a segment of a {pp}-stage pipeline")
        if len(devices) != tp * n:
            raise ValueError(f"tp={tp} x {n} stage(s) needs {tp * n} devices, got {len(devices)}")
        self.cfg, self.tp, self.pp = cfg, tp, pp
        self.microbatches = pp if microbatches is None else microbatches  # per packed prefill call (runner)
        if self.microbatches <= 0:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        self.stage_layers = split_layers(cfg.num_hidden_layers, pp)[self.stages.start:self.stages.stop]
        self.layers = range(self.stage_layers[0].start, self.stage_layers[-1].stop)
        self.holds_first, self.holds_last = self.stages.start == 0, self.stages.stop == pp
        self.mesh = make_mesh(devices, tp, n)  # [stages here, tp]
        self.stage_meshes = [Mesh(self.mesh.devices[s:s + 1], ("pp", "tp")) for s in range(n)]  # [1, tp]
        self._repl = [replicated(m) for m in self.stage_meshes]
        # a backend name gives each stage its own attention (Pallas under TP is shard_mapped over that
        # stage's sub-mesh); a function is used as is by every stage
        self.stage_attn: list[AttnFn] = [make_attention(attention, m) if isinstance(attention, str)
                                         else attention for m in self.stage_meshes]
        self._kv_sharding = [kv_sharding(m) for m in self.stage_meshes]
        self.stage_params: list[Params] = []
        for s, (layers, mesh) in enumerate(zip(self.stage_layers, self.stage_meshes, strict=True)):
            p = stage_params(params, layers, self.stages[s] == 0, self.stages[s] == pp - 1)
            self.stage_params.append(jax.device_put(p, param_shardings(cfg, mesh, p)))
        self.stage_kv: list[KVCache] = [[] for _ in range(n)]
        self.num_blocks = 0
        self.block_size = 0
        self._workers: list[ThreadPoolExecutor] | None = None  # one thread per stage, made on first use
        self._calls = 0
        self.timeline: list[StageSpan] | None = None

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)  # stage-major

    @property
    def kv(self) -> KVCache:
        """Per-layer (k, v) pages in layer order, each on its stage's sub-mesh."""
        return [layer for stage in self.stage_kv for layer in stage]

    @kv.setter
    def kv(self, kv: KVCache) -> None:
        if len(kv) != len(self.layers):
            raise ValueError(f"kv has {len(kv)} layers, this executor holds {len(self.layers)}")
        at = self.layers.start
        self.stage_kv = [list(kv[r.start - at:r.stop - at]) for r in self.stage_layers]

    def kv_stages(self) -> list[tuple[Mesh, range]]:
        """(sub-mesh, layers) of each stage (layer numbers count from this executor's first layer)."""
        at = self.layers.start
        return [(m, range(r.start - at, r.stop - at)) for m, r in zip(self.stage_meshes, self.stage_layers, strict=True)]

    def set_stage_kv(self, stage: int, kv: KVCache) -> None:
        self.stage_kv[stage] = list(kv)

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        """Zeroed pages ``[num_blocks, block_size, H, Dh]`` per layer, on the layer's stage, heads over tp."""
        shape = (num_blocks, block_size, self.cfg.num_attention_heads, self.cfg.head_dim)
        dt = dtype_of(self.cfg.dtype)
        self.stage_kv = []
        for layers, sharding in zip(self.stage_layers, self._kv_sharding, strict=True):
            self.stage_kv.append([(zeros_untouched(shape, dt, sharding), zeros_untouched(shape, dt, sharding))
                                  for _ in layers])
        self.num_blocks, self.block_size = num_blocks, block_size

    # ---- steps -----------------------------------------------------------------------------
    def execute(self, inputs: StepInputs) -> jax.Array:
        """Run one step through all stages; logits [R, V] (float32, on the last stage). Updates the KV."""
        return self.execute_many([inputs])[0]

    def execute_from(self, inputs: StepInputs, x: jax.Array) -> jax.Array:
        """A segment that does not hold stage 0: its stages on the previous segment's output ``x [T, D]``
        (any placement); ``x`` of its last stage, or logits ``[R, V]`` if it holds the pipeline's last."""
        return self.execute_many([inputs], first_input=x)[0]

    def execute_many(self, microbatches: Sequence[StepInputs], first_input: Any = None) -> list[jax.Array]:
        """Run micro-batches (disjoint sequences of one call) with stages overlapping; logits per micro-batch.

        Stage ``s`` runs on its own worker thread and starts micro-batch ``m`` once stage ``s - 1``
        has finished it (see the module docstring). Returns when every stage has issued every
        micro-batch. The result equals running ``execute`` on each micro-batch in order.
        """
        n, pp = len(microbatches), len(self.stages)
        # host -> every stage: step metadata, replicated on the stage's sub-mesh
        placed = [[jax.device_put((mb.positions, mb.meta), r) for r in self._repl] for mb in microbatches]
        h: list[Any] = ([jax.device_put(mb.tokens, self._repl[0]) for mb in microbatches] if first_input is None
                        else [first_input])
        idx = [jax.device_put(mb.logits_index, self._repl[-1]) for mb in microbatches]
        call, self._calls = self._calls, self._calls + 1
        if n == 1 or pp == 1:  # nothing to overlap: the stages one after another, on this thread
            for m in range(n):
                for s in range(pp):
                    h[m] = self._run_stage(s, m, call, h[m], *placed[m][s], idx[m])
            return h
        if self._workers is None:
            self._workers = [ThreadPoolExecutor(1, thread_name_prefix=f"pp-stage{s}") for s in range(pp)]
        futures: list[Future] = []
        for m in range(n):  # each stage's queue holds its micro-batches in order
            for s in range(pp):
                h[m] = self._workers[s].submit(self._run_stage, s, m, call, h[m], *placed[m][s], idx[m])
                futures.append(h[m])
        for f in futures:  # let every stage finish (or fail) before returning or raising
            f.exception()
        return [f.result() for f in h]

    def _run_stage(self, s: int, m: int, call: int, h: Any, positions: jax.Array, meta: Any,
                   logits_index: jax.Array) -> jax.Array:
        """Stage ``s`` of micro-batch ``m``: tokens or the previous stage's x (or its future) -> x or logits."""
        if isinstance(h, Future):
            h = h.result()
        first, last = self.stages[s] == 0, self.stages[s] == self.pp - 1
        if not first:  # activation x [T, D] from stage s-1's sub-mesh (or another process) to stage s's
            h = jax.device_put(h, self._repl[s])
        start = time.perf_counter()
        h, self.stage_kv[s] = run_stage(self.stage_params[s], self.cfg, self.stage_attn[s], h, positions,
                                        self.stage_kv[s], meta, logits_index if last else None, first=first,
                                        last=last, replicated=self._repl[s])
        if self.timeline is not None:
            jax.block_until_ready(h)
            self.timeline.append(StageSpan(call, s, m, start, time.perf_counter()))
        return h

    def record_timeline(self) -> list[StageSpan]:
        """Instrument every later call: each stage waits for its own result and appends a
        ``StageSpan`` to the returned list. For tests and benchmarks; ``stop_timeline`` ends it."""
        self.timeline = []
        return self.timeline

    def stop_timeline(self) -> None:
        self.timeline = None

    def sample(self, logits: jax.Array, arrays: SamplingArrays) -> Sampled:
        """Token ids [R] (numpy) from logits on the last stage."""
        return sample_tokens(logits, arrays, self._repl[-1])

    # ---- KV blocks (transfer between instances) ------------------------------------------
    def gather_blocks(self, block_ids: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer (k, v) ``[n, bs, H, Dh]`` copies of the given blocks, layer order, each on its stage."""
        out: list[tuple[jax.Array, jax.Array]] = []
        for kv, r in zip(self.stage_kv, self._repl, strict=True):
            out.extend(gather_pages(kv, jax.device_put(np.asarray(block_ids, np.int32), r)))
        return out

    def scatter_blocks(self, block_ids: Sequence[int], blocks: list[tuple[jax.Array, jax.Array]]) -> None:
        """Write per-layer (k, v) ``[n, bs, H, Dh]`` (this executor's layers in order, any placement)
        into the given blocks."""
        if len(blocks) != len(self.layers):
            raise ValueError(f"{len(blocks)} layers of blocks for an executor of {len(self.layers)} layers")
        ids = np.asarray(block_ids, np.int32)
        for s, (_, layers) in enumerate(self.kv_stages()):
            part = jax.device_put(list(blocks[layers.start:layers.stop]), self._kv_sharding[s])
            self.stage_kv[s] = scatter_pages(self.stage_kv[s], jax.device_put(ids, self._repl[s]), part)
