"""One engine instance: scheduler + runner + executor + per-request output trackers.

    add_request(Request) --> Scheduler.waiting
    step():  schedule --> Runner.run (jitted calls on this instance's mesh) --> sampled tokens
             --> OutputTracker (text delta, stop rules) --> [StepOutput]; finished requests free blocks at once
    abort_request(id): frees the request's blocks at once

``step()`` is the whole loop body (schedule, run, postprocess). The engine stamps
lifecycle events (prefill queued/began/ended, decode began, token, preempted,
finished/aborted) on each Request. ``compilations_since_warmup`` proves that a
serving run after ``warmup()`` compiled nothing new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

import jax

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.block_manager import BlockManager, blocks_needed
from jaxserve.engine.executor import ModelExecutor, compile_count, kv_bytes_per_block
from jaxserve.engine.runner import Buckets, Runner
from jaxserve.engine.scheduler import Scheduler, Sequence
from jaxserve.model.sampling import new_seed
from jaxserve.request import Event, FinishReason, Request
from jaxserve.stopping import OutputTracker

POLICY_FOR_MODE = {"colocated": "prefill-first", "chunked": "chunked", "prefill": "prefill-only",
                   "decode": "prefill-first"}


@dataclasses.dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finish_reason: FinishReason | None


def make_executor(cfg: ModelConfig, params: Any, devices: Seq[jax.Device], tp: int, pp: int,
                  attention: str = "auto") -> Any:
    if pp == 1:
        return ModelExecutor(cfg, params, devices, tp, attention)
    from jaxserve.parallel.pipeline import PipelineExecutor
    return PipelineExecutor(cfg, params, devices, tp, pp)


def resolve_num_blocks(cfg: ModelConfig, config: EngineConfig, max_len: int, devices: Seq[jax.Device]) -> int:
    """KV capacity in blocks (including the null block) from the config and device memory."""
    per_block = kv_bytes_per_block(cfg, config.block_size)
    if config.num_blocks is not None:
        n = config.num_blocks
    elif config.kv_cache_gb is not None:
        n = int(config.kv_cache_gb * 2**30 // per_block)
    else:
        n = config.max_num_seqs * blocks_needed(max_len, config.block_size) + 1
        stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
        if stats and "bytes_limit" in stats:  # accelerators: at most 90% of what is free, over all devices
            free = (0.9 * stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * len(devices)
            n = min(n, int(free // per_block))
    if n < 2:
        raise ConfigError(f"KV cache of {n} blocks is too small (a block of {config.block_size} tokens takes "
                          f"{per_block} bytes); raise --kv-cache-gb")
    return n


class LLMEngine:
    """A single instance serving requests by continuous batching."""

    def __init__(self, cfg: ModelConfig, params: Any, config: EngineConfig | None = None, *,
                 devices: Seq[jax.Device] | None = None, tokenizer: Any = None, name: str = "engine-0") -> None:
        config = config or EngineConfig()
        self.cfg, self.config, self.tokenizer, self.name = cfg, config, tokenizer, name
        n_dev = config.tp * config.pp
        devices = list(devices) if devices is not None else jax.devices()[:n_dev]
        if len(devices) != n_dev:
            raise ConfigError(f"{name}: tp={config.tp} x pp={config.pp} needs {n_dev} devices, got {len(devices)}")
        self.max_model_len = config.resolved_max_model_len(cfg)
        batched = config.resolved_batched_tokens(cfg)
        num_blocks = resolve_num_blocks(cfg, config, self.max_model_len, devices)
        self.executor = make_executor(cfg, params, devices, config.tp, config.pp, config.attention)
        self.executor.init_kv(num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.policy = POLICY_FOR_MODE[config.mode]
        self.scheduler = Scheduler(self.blocks, policy=self.policy, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=batched, max_model_len=self.max_model_len)
        self.runner = Runner(self.executor, self.blocks.tables, Buckets.for_limits(
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
            max_num_batched_tokens=batched, block_size=config.block_size))
        self.seqs: dict[str, Sequence] = {}
        self.trackers: dict[str, OutputTracker] = {}
        self._compiles_at_warmup: int | None = None
        self.num_warmup_shapes = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def warmup(self) -> int:
        """Compile every step shape; returns how many. Serving afterwards compiles nothing new."""
        self.num_warmup_shapes = self.runner.warmup(
            decode=self.policy != "prefill-only", prefill=True, chunks=self.policy == "chunked")
        self._compiles_at_warmup = compile_count()
        return self.num_warmup_shapes

    @property
    def compilations_since_warmup(self) -> int:
        if self._compiles_at_warmup is None:
            raise RuntimeError("warmup() has not run")
        return compile_count() - self._compiles_at_warmup

    def check_request(self, request: Request) -> None:
        """Raise ValueError (naming the problem) if this request can never run on this engine."""
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        self.scheduler.check_fits(request)
        if request.sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")

    def add_request(self, request: Request) -> None:
        if request.request_id in self.seqs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check_request(request)
        detok = self.tokenizer.detokenizer(request.prompt_token_ids) if self.tokenizer is not None else None
        self.trackers[request.request_id] = OutputTracker(
            request.sampling, self.cfg.eos_token_id, detok,
            max_tokens=self.max_model_len - request.num_prompt_tokens)
        seed = request.sampling.seed if request.sampling.seed is not None else new_seed()
        seq = Sequence(request, seed=seed)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        request.stamp(Event.PREFILL_QUEUED, instance=self.name)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is; its blocks are free on return."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(request_id)
        self.trackers.pop(request_id).abort()
        seq.request.finish_reason = seq.request.finish_reason or FinishReason.ABORT
        seq.request.stamp(Event.ABORTED, instance=self.name)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop body -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        out = self.scheduler.schedule()
        for s in out.preempted:
            s.request.stamp(Event.PREEMPTED, instance=self.name)
        if not out.chunks:
            return []
        for c in out.chunks:
            req = c.seq.request
            if c.start == 0 and not req.event_times(Event.PREFILL_BEGAN):
                req.stamp(Event.PREFILL_BEGAN, instance=self.name)
            elif c.is_decode and not req.event_times(Event.DECODE_BEGAN):
                req.stamp(Event.DECODE_BEGAN, instance=self.name)
        tokens = self.runner.run(out.chunks)
        self.scheduler.on_step_done(out.chunks)
        return [self._postprocess(self.seqs[sid], tok) for sid, tok in tokens.items()]

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        req = seq.request
        req.output_token_ids.append(token)
        delta, reason = self.trackers[seq.id].add(token)
        if len(req.output_token_ids) == 1:
            req.stamp(Event.PREFILL_ENDED, instance=self.name)
        req.stamp(Event.TOKEN, instance=self.name)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.finish(seq)
            del self.seqs[seq.id]
            req.stamp(Event.FINISHED, instance=self.name)
        return StepOutput(seq.id, [token], delta, reason)

    def output_text(self, request_id: str) -> str:
        return self.trackers[request_id].text

    def pop_tracker(self, request_id: str) -> OutputTracker:
        return self.trackers.pop(request_id)

    # ---- introspection -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_held_blocks(self) -> int:
        return self.blocks.num_used


def run_to_completion(engine: LLMEngine, requests: Seq[Request], progress: Any = None) -> list[OutputTracker]:
    """Add every request, step until all finish; returns their trackers in input order."""
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for o in engine.step():
            if o.finish_reason is not None and progress is not None:
                progress(1)
    return [engine.pop_tracker(r.request_id) for r in requests]
