"""One pipeline instance whose stages sit in several processes (on several nodes), over JAX collectives.

    plan nodes of a replica, per stage (e.g. [0, 0, 1, 1]) --segments()--> [(node 0, stages 0-1), (node 1, stages 2-3)]
    leader (the instance actor, first segment): scheduler, runner, sampler, its stages' params and KV
    StageActor per further segment (its own process, on its node): its stages' params and KV pages
    one step (SpanningExecutor.execute):
        leader --segment.run.remote(StepInputs as numpy)--> every StageActor (queued in call order)
        leader: tokens --its stages--> x [T, D] --send_array (ppermute over a 2-device mesh)--> segment 1
        segment k: recv_array(x) --its stages--> x --send_array--> segment k+1 ... the last sends
            logits [R, V] back to the leader, which samples them
    KV hand-off through Ray's object store, per segment (``StagedKV``): each segment exports its
        layers' blocks as an object on its own node; a destination segment imports the parts that
        hold its layers (a plan that puts the same layers of prefill and decode on one node keeps
        the KV on that node); ``gather_blocks`` / ``scatter_blocks`` also cover every layer, through
        the leader, for any other transport

Every process of the instance joins the deployment's collective group (``jaxserve.cluster.collective``):
the activations cross over gloo on CPU and NCCL on GPUs. A segment runs its calls one at a time in
the order the leader sent them, and every exchange pairs one sender with one receiver at the same
point of the same step, so the chain cannot deadlock. The leader's warm-up runs every step shape
through the whole chain, so each segment compiles its programs (and the exchanges) then;
``compilations_since_warmup`` adds the segments' counts. Limits: a step's stages run one after
another (no micro-batch overlap across processes); a segment that dies fails the leader's step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.errors import InstanceLost


def segments(nodes: Sequence[int]) -> list[tuple[int, range]]:
    """(node, stages) per run of consecutive stages on one plan node: [0, 0, 1] -> [(0, 0..1), (1, 2)]."""
    out: list[tuple[int, range]] = []
    for s, node in enumerate(nodes):
        if out and out[-1][0] == node:
            out[-1] = (node, range(out[-1][1].start, s + 1))
        else:
            out.append((node, range(s, s + 1)))
    return out


@dataclasses.dataclass(frozen=True)
class Segment:
    """A further segment of a leader's pipeline: its actor, stages and process in the group."""

    actor: Any
    stages: range
    process_id: int


@dataclasses.dataclass(frozen=True)
class StagedKV:
    """One request's KV as per-segment parts: (first layer, end layer, ObjectRef of a KVPayload)."""

    num_tokens: int
    block_size: int
    parts: tuple[tuple[int, int, Any], ...]


def overlapping(parts: Sequence[tuple[int, int, Any]], layers: range) -> list[tuple[int, int, Any]]:
    return [p for p in parts if p[0] < layers.stop and layers.start < p[1]]


def layers_of(parts: Sequence[tuple[int, int, Any]], payloads: Sequence[Any], layers: range) -> list[Any]:
    """The per-layer (k, v) of ``layers`` taken from parts covering them (payloads in parts' order)."""
    out: list[Any] = []
    for (a, b, _), p in zip(parts, payloads, strict=True):
        lo, hi = max(a, layers.start), min(b, layers.stop)
        out += p.layers[lo - a:hi - a] if lo < hi else []
    if len(out) != len(layers):
        raise ValueError(f"the parts {[(a, b) for a, b, _ in parts]} do not cover layers {layers}")
    return out


class StageActor:
    """A segment of a pipeline instance in its own process (see the module docstring)."""

    def __init__(self, model: str | None, config: EngineConfig, stages: range, group: Any, process_id: int,
                 prev_process: int, next_process: int, dtype: str = "float32",
                 compilation_cache: str | None = None) -> None:
        from jaxserve.cluster.actors import pin_threads
        from jaxserve.cluster.collective import join_group

        pin_threads()
        join_group(group, process_id)  # before anything starts JAX's backends
        import jax

        from jaxserve.compile_cache import enable_compilation_cache, program_count
        from jaxserve.engine.pipeline import PipelineExecutor
        from jaxserve.model.checkpoint import load_model

        enable_compilation_cache(compilation_cache)
        loaded = load_model(model, dtype)
        n = config.tp * len(stages)
        self.executor = PipelineExecutor(loaded.cfg, loaded.params, jax.local_devices()[:n], config.tp, config.pp,
                                         config.attention, stages=stages)
        self.prev, self.next = prev_process, next_process
        self.x_dtype = loaded.cfg.dtype
        self._baseline = program_count()

    def node(self) -> tuple[str | None, int]:
        import ray
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        self.executor.init_kv(num_blocks, block_size)

    def run(self, inputs: Any) -> None:
        """One step of this segment: x from the previous process, x (or logits) to the next."""
        from jaxserve.cluster.collective import recv_array, send_array
        from jaxserve.model.opt import dtype_of

        ex = self.executor
        x = recv_array(self.prev, (len(inputs.tokens), ex.cfg.hidden_size), dtype_of(self.x_dtype))
        try:
            out = ex.execute_from(inputs, x)
        except Exception:  # the next process waits for our output: send zeros, then fail this call
            shape = ((len(inputs.logits_index), ex.cfg.vocab_size), np.float32) if ex.holds_last else \
                ((len(inputs.tokens), ex.cfg.hidden_size), dtype_of(self.x_dtype))
            send_array(self.next, np.zeros(*shape))
            raise
        send_array(self.next, out)

    def gather(self, block_ids: Sequence[int], num_blocks: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer (k, v) of this segment's layers, the first ``num_blocks`` of ``block_ids``, as numpy."""
        return [(np.asarray(k)[:num_blocks], np.asarray(v)[:num_blocks])
                for k, v in self.executor.gather_blocks(block_ids)]

    def export_part(self, block_ids: Sequence[int], num_tokens: int) -> Any:
        """A ``KVPayload`` of this segment's layers (returned into the object store on this node)."""
        from jaxserve.engine.kv_transfer import HostTransport

        return HostTransport().export_kv(self.executor, block_ids, num_tokens)

    def scatter(self, block_ids: Sequence[int], layers: list[Any]) -> None:
        import jax
        self.executor.scatter_blocks(block_ids, layers)
        jax.block_until_ready(self.executor.kv)

    def import_parts(self, block_ids: Sequence[int], spans: Sequence[tuple[int, int]], *payloads: Any) -> None:
        """Write this segment's layers from parts (``payloads``: resolved by Ray, fetched to this node)."""
        from jaxserve.engine.kv_transfer import KVPayload, import_host

        staged = [(a, b, None) for a, b in spans]
        layers = layers_of(staged, payloads, self.executor.layers)
        import_host(self.executor, block_ids, KVPayload(payloads[0].num_tokens, payloads[0].block_size, layers))

    def compilations_since_warmup(self) -> int:
        from jaxserve.compile_cache import program_count
        return program_count() - self._baseline

    def mark_warm(self) -> None:
        from jaxserve.compile_cache import program_count
        self._baseline = program_count()


class SpanningExecutor:
    """The leader's executor: its own stages (a ``PipelineExecutor`` segment) plus ``Segment``s in other
    processes; the engine's runner and transports see one executor of every layer."""

    def __init__(self, local: Any, segs: Sequence[Segment], timeout_s: float = 300.0) -> None:
        if not local.holds_first or not segs or segs[-1].stages.stop != local.pp:
            raise ValueError("a spanning pipeline's leader holds stage 0 and its segments the rest")
        self.local, self.segs, self.timeout_s = local, list(segs), timeout_s
        self.cfg, self.tp, self.pp = local.cfg, local.tp, local.pp
        self.microbatches = 1  # a step's stages run one after another across processes
        self.num_blocks = self.block_size = 0
        from jaxserve.engine.pipeline import split_layers
        split = split_layers(self.cfg.num_hidden_layers, self.pp)
        self.seg_layers = [local.layers] + [range(split[s.stages.start].start, split[s.stages.stop - 1].stop)
                                            for s in self.segs]

    @property
    def devices(self) -> list[Any]:
        return self.local.devices

    @property
    def kv(self) -> Any:
        return self.local.kv  # this process's pages (the segments hold the rest)

    def _get(self, refs: Any) -> Any:
        import ray
        return ray.get(refs, timeout=self.timeout_s)

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        self.local.init_kv(num_blocks, block_size)
        self._get([s.actor.init_kv.remote(num_blocks, block_size) for s in self.segs])
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, inputs: Any) -> Any:
        """One step through every segment; logits [R, V] on this process's first device."""
        import jax
        import jax.numpy as jnp

        from jaxserve.cluster.collective import recv_array, send_array
        from jaxserve.model.opt import dtype_of

        refs = [s.actor.run.remote(inputs) for s in self.segs]
        error = None
        try:
            x = self.local.execute(inputs)
        except Exception as e:  # keep the chain in step (the segments wait for x), then fail the step
            error, x = e, np.zeros((len(inputs.tokens), self.cfg.hidden_size), dtype_of(self.cfg.dtype))
        try:
            send_array(self.segs[0].process_id, x)
            logits = recv_array(self.segs[-1].process_id, (len(inputs.logits_index), self.cfg.vocab_size),
                                jnp.float32)
            self._get(refs)
        except Exception as e:  # a stage process died or failed: the chain's state is unknown
            first = str(e).splitlines()[0] if str(e) else ""
            raise InstanceLost(f"a stage process of this pipeline failed: {type(e).__name__}: {first}") from e
        if error is not None:
            raise error
        return jax.block_until_ready(logits)

    def execute_many(self, microbatches: Sequence[Any]) -> list[Any]:
        return [self.execute(mb) for mb in microbatches]

    def sample(self, logits: Any, arrays: Any) -> Any:  # sampling.Sampled
        from jaxserve.model.sampling import sample_tokens
        return sample_tokens(logits, arrays, next(iter(logits.devices())))

    # ---- KV blocks: every layer (through this process), or per segment (StagedKV) ---------------
    def gather_blocks(self, block_ids: Sequence[int]) -> list[Any]:
        """Per-layer (k, v) of every layer: this process's as device arrays, the segments' as numpy."""
        rest = self._get([s.actor.gather.remote(list(block_ids), len(block_ids)) for s in self.segs])
        return self.local.gather_blocks(block_ids) + [layer for part in rest for layer in part]

    def scatter_blocks(self, block_ids: Sequence[int], blocks: Sequence[Any]) -> None:
        n = len(self.local.layers)
        refs = [s.actor.scatter.remote(list(block_ids), [tuple(map(np.asarray, b)) for b in blocks[r.start:r.stop]])
                for s, r in zip(self.segs, self.seg_layers[1:], strict=True)]
        self.local.scatter_blocks(block_ids, list(blocks[:n]))
        self._get(refs)

    def export_staged(self, block_ids: Sequence[int], num_tokens: int) -> StagedKV:
        """Each segment's layers as an object on its own node (this process's through ``ray.put``)."""
        import ray

        from jaxserve.engine.kv_transfer import HostTransport

        own = HostTransport().export_kv(self.local, block_ids, num_tokens)
        parts = [(self.seg_layers[0].start, self.seg_layers[0].stop, ray.put(own))]
        parts += [(r.start, r.stop, s.actor.export_part.remote(list(block_ids), num_tokens))
                  for s, r in zip(self.segs, self.seg_layers[1:], strict=True)]
        return StagedKV(num_tokens, self.block_size, tuple(parts))

    def import_staged(self, block_ids: Sequence[int], handle: StagedKV) -> int:
        """Each segment fetches the parts holding its layers (on its node when the plan paired them)."""
        from jaxserve.engine.block_manager import blocks_needed
        from jaxserve.engine.executor import kv_bytes_per_block
        from jaxserve.engine.kv_transfer import KVPayload, import_host

        refs = []
        for s, r in zip(self.segs, self.seg_layers[1:], strict=True):
            mine = overlapping(handle.parts, r)
            refs.append(s.actor.import_parts.remote(list(block_ids), [(a, b) for a, b, _ in mine], *[p[2] for p in mine]))
        own = overlapping(handle.parts, self.seg_layers[0])
        layers = layers_of(own, self._get([p[2] for p in own]), self.seg_layers[0])
        import_host(self.local, block_ids, KVPayload(handle.num_tokens, handle.block_size, layers))
        self._get(refs)
        return blocks_needed(handle.num_tokens, handle.block_size) * kv_bytes_per_block(self.cfg, handle.block_size)

    # ---- the segments' compile counts (the engine's warm-up accounting) -------------------------
    def mark_warm(self) -> None:
        self._get([s.actor.mark_warm.remote() for s in self.segs])

    def remote_compilations(self) -> int:
        return sum(self._get([s.actor.compilations_since_warmup.remote() for s in self.segs]))
