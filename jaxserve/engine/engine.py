"""One engine instance: scheduler + runner + executor, in tokens (text lives in the front end).

    add_request(Request) --> Scheduler.waiting
    step():  schedule --> Runner.run (jitted calls on this instance's mesh) --> sampled tokens
             --> token-level stops (EOS, stop ids, length) --> [StepOutput]; finished requests free blocks
    abort_request(id): frees the request's blocks at once, wherever it is

Roles (``EngineConfig.mode``): ``colocated``/``chunked`` run whole requests. A
``prefill`` instance stops a request after its first token and *holds* its KV
blocks (``take_ready`` lists them); ``export_kv`` hands the transport a copy, and
``release`` frees them once a decode instance has the KV. A ``decode`` instance takes
requests in with ``import_kv`` (blocks allocated, KV written, or None: no room), then
decodes them by continuous batching. The engine stamps lifecycle events on its own
Request objects (the runtime's instance sends them on as messages). This is the
``EngineCore`` of ``jaxserve.runtime.instance.LocalInstance``: one thread drives it.
``compilations_since_warmup`` proves that serving after ``warmup()`` built no new program (compiled or
loaded from the persistent cache); ``warmup(progress)`` reports each shape to a ``(done, total)`` callback.
The KV pool's size comes from ``kv_budget.plan_kv`` over the machine's memory (``memory``:
measured here unless the caller passes the share it measured, or a test passes its own).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence as Seq
from typing import Any

import jax

from jaxserve.compile_cache import program_count
from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.attention_backends import reads_real_context
from jaxserve.engine.block_manager import NULL_BLOCK, BlockManager
from jaxserve.engine.executor import ModelExecutor, kv_bytes_per_block
from jaxserve.engine.kv_budget import plan_kv
from jaxserve.engine.kv_transfer import KVTransport, LocalTransport, block_buckets
from jaxserve.engine.runner import Buckets, Runner
from jaxserve.engine.scheduler import Scheduler, Sequence
from jaxserve.memory import MemoryInfo, measure_memory
from jaxserve.model.sampling import new_seed
from jaxserve.request import Event, FinishReason, Request
from jaxserve.runtime.api import InstanceInfo, InstanceStats, StepOutput
from jaxserve.stopping import token_finish_reason
from jaxserve.warmup_progress import ProgressFn

log = logging.getLogger(__name__)

POLICY_FOR_MODE = {"colocated": "prefill-first", "chunked": "chunked", "prefill": "prefill-only",
                   "decode": "prefill-first"}


_warm_baseline: int | None = None  # program count when the last warm-up in this process ended


def make_executor(cfg: ModelConfig, params: Any, devices: Seq[jax.Device], tp: int, pp: int,
                  attention: str = "auto") -> Any:
    if pp == 1:
        return ModelExecutor(cfg, params, devices, tp, attention)
    from jaxserve.engine.pipeline import PipelineExecutor
    return PipelineExecutor(cfg, params, devices, tp, pp)


class LLMEngine:
    """A single instance serving requests by continuous batching (driven by one thread)."""

    def __init__(self, cfg: ModelConfig, params: Any, config: EngineConfig | None = None, *,
                 devices: Seq[jax.Device] | None = None, name: str = "engine-0",
                 transport: KVTransport | None = None, memory: MemoryInfo | None = None,
                 executor: Any = None) -> None:
        config = config or EngineConfig()
        self.cfg, self.config, self.name = cfg, config, name
        n_dev = config.tp * config.pp
        if executor is not None:  # built by the caller (a pipeline spanning processes: jaxserve.cluster.stages)
            devices, n_dev = executor.devices, len(executor.devices)
        devices = list(devices) if devices is not None else jax.devices()[:n_dev]
        if len(devices) != n_dev:
            raise ConfigError(f"{name}: tp={config.tp} x pp={config.pp} needs {n_dev} devices, got {len(devices)}")
        self.max_model_len = config.resolved_max_model_len(cfg)
        batched = config.resolved_batched_tokens(cfg)
        # before anything is placed: the weights and the pool must fit in what the devices have
        self.kv_plan = plan_kv(cfg, config, self.max_model_len, kv_bytes_per_block(cfg, config.block_size),
                               memory if memory is not None else measure_memory(devices))
        log.info("%s: %s", name, self.kv_plan.describe())
        self.executor = executor or make_executor(cfg, params, devices, config.tp, config.pp, config.attention)
        self.executor.init_kv(self.kv_plan.num_blocks, config.block_size)
        # prefix caching where prompts are computed (a decode instance only receives KV)
        self.blocks = BlockManager(self.kv_plan.num_blocks, config.block_size,
                                   caching=config.prefix_caching and config.mode != "decode")
        self.policy = POLICY_FOR_MODE[config.mode]
        buckets = Buckets.for_limits(
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
            max_num_batched_tokens=batched, block_size=config.block_size, rare_prefill=config.mode == "decode",
            one_group_width=reads_real_context(self.executor), rare_chunks=self.policy != "chunked")
        self.scheduler = Scheduler(self.blocks, policy=self.policy, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=batched, max_model_len=self.max_model_len,
                                   score_chunk=buckets.score_rows)
        self.runner = Runner(self.executor, self.blocks.tables, buckets)
        self.transport: KVTransport = transport or LocalTransport()
        self.transfer_peers: list[LLMEngine] = []  # prefill role: the in-process decode instances
        self.warm_lock = threading.Lock()  # held while warming up; peers' hand-off warm-ups take it too
        self.seqs: dict[str, Sequence] = {}
        self.ready: dict[str, Sequence] = {}  # prefill role: prefilled, KV held for transfer
        self.num_steps = 0
        self.num_warmup_shapes = 0
        self._warm = False

    @property
    def eos_token_id(self) -> int | None:
        return self.cfg.eos_token_id

    # ---- lifecycle ---------------------------------------------------------------------------
    def info(self) -> InstanceInfo:
        return InstanceInfo(self.name, self.config.mode, self.cfg.vocab_size, self.cfg.eos_token_id,
                            self.max_model_len, self.config.block_size, self.blocks.capacity,
                            self.config.max_num_seqs, self.config.tp * self.config.pp, repr(self.cfg), None,
                            os.getpid())

    def stats(self) -> InstanceStats:
        s = self.scheduler
        return InstanceStats(self.name, self.blocks.num_free, self.blocks.num_used, self.num_queued_tokens,
                             len(s.running), len(s.waiting) + len(self.ready), self.has_unfinished(),
                             self.num_steps, self.blocks.query_tokens, self.blocks.hit_tokens,
                             self.config.block_size, self.blocks.caching)

    def warmup(self, progress: ProgressFn | None = None) -> int:
        """Compile every step shape and, for a prefill or decode instance, its hand-off gather / scatter
        per block bucket (a prefill instance also compiles the imports into its in-process peers);
        returns how many shapes. ``progress(done, total)`` follows along (``jaxserve.warmup_progress``);
        it hears ``done == total`` once everything, peers included, is compiled. Serving afterwards
        builds no new program."""
        global _warm_baseline
        # prompt chunks after a cached prefix run the chunk shapes too
        chunks, decode = self.policy == "chunked" or self.blocks.caching, self.policy != "prefill-only"
        handoffs = (block_buckets(self.executor, self.max_model_len)
                    if self.config.mode in ("prefill", "decode") else ())
        score = self.config.mode != "decode"  # prompts are computed here: they may be scored for logprobs
        total = len(self.runner.buckets.shapes(decode=decode, prefill=True, chunks=chunks, score=score)) + len(handoffs)

        def report(done: int, _: int = 0) -> None:
            if progress is not None and done < total:  # the end is reported below, after the peers
                progress(done, total)

        with self.warm_lock:
            # the hand-off's gather / scatter first: they need no attention kernel, which may still be building
            report(0)
            for i, b in enumerate(handoffs, 1):
                blocks = self.executor.gather_blocks([NULL_BLOCK] * b)
                if self.config.mode == "decode":  # writes the null block onto itself
                    self.executor.scatter_blocks([NULL_BLOCK] * b, blocks)
                jax.block_until_ready(blocks)
                report(i)
            self.runner.warmup(decode=decode, prefill=True, chunks=chunks, score=score,
                               progress=lambda done, _: done and report(done + len(handoffs)))
        for peer in self.transfer_peers:  # writes into the peer's pages: not while it warms up itself
            with peer.warm_lock:
                self.transport.warmup(self.executor, peer.executor, self.max_model_len)
        if progress is not None:
            progress(total, total)
        self.num_warmup_shapes = total
        self._warm = True
        _warm_baseline = program_count()
        self._mark_remote_warm()
        return total

    def _mark_remote_warm(self) -> None:
        if hasattr(self.executor, "mark_warm"):  # stages in other processes count from here too
            self.executor.mark_warm()

    def warm_more(self, fn: Any) -> Any:
        """Run ``fn`` as part of warm-up (a cross-process hand-off, warmed once both ends are warm):
        what it compiles is not counted as compiled after warm-up."""
        global _warm_baseline
        out = fn()
        _warm_baseline = program_count()
        self._mark_remote_warm()
        return out

    @property
    def compilations_since_warmup(self) -> int:
        """Programs built in this process since the last warm-up in it ended (instances share a process):
        compiled, or loaded from the persistent compilation cache (a shape warm-up missed, either way)."""
        if not self._warm or _warm_baseline is None:
            raise RuntimeError("warmup() has not run")
        remote = self.executor.remote_compilations() if hasattr(self.executor, "remote_compilations") else 0
        return program_count() - _warm_baseline + remote

    def check_request(self, request: Request) -> None:
        """Raise ValueError (naming the problem) if this request can never run on this engine."""
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        bad = [t for t, _ in request.sampling.logit_bias if t >= self.cfg.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        self.scheduler.check_fits(request)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.seqs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check_request(request)
        seq = Sequence(request, seed=_seed_of(request))
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        request.stamp(Event.PREFILL_QUEUED, instance=self.name)

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """Drop a request wherever it is (queued, running, or held for transfer); frees its blocks now.

        ``reason`` STOP is the front end ending a request on a stop string (stamped FINISHED)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if self.ready.pop(request_id, None) is not None:
            self.blocks.free(request_id)
            self._forget_export(request_id)
        else:
            self.scheduler.abort(request_id)
        seq.request.finish_reason = seq.request.finish_reason or reason
        seq.request.stamp(Event.ABORTED if reason == FinishReason.ABORT else Event.FINISHED, instance=self.name)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_queued_tokens(self) -> int:
        """Tokens this instance still has to compute for its current requests: prompt tokens not yet
        prefilled, plus one per decoding sequence (the dispatch key: balances prompt work and batch size)."""
        return sum(s.num_tokens - s.num_computed for s in [*self.scheduler.waiting, *self.scheduler.running])

    # ---- disaggregation ----------------------------------------------------------------------
    def take_ready(self) -> list[str]:
        """Prefill role: ids of prefilled requests whose KV waits to be pulled (oldest first)."""
        return list(self.ready)

    def export_kv(self, request_id: str) -> tuple[Any, int]:
        """Prefill role: (transport handle, tokens) of a held request's KV; the blocks stay held."""
        seq = self.ready[request_id]
        return self.transport.export_kv(self.executor, self.blocks.table(request_id), seq.num_computed,
                                        request_id=request_id), seq.num_computed

    def release(self, request_id: str) -> None:
        """Prefill role: the KV has been copied out; free the blocks and forget the request."""
        self.ready.pop(request_id)
        self.seqs.pop(request_id)
        self.blocks.free(request_id)
        self._forget_export(request_id)

    def _forget_export(self, request_id: str) -> None:
        forget = getattr(self.transport, "forget", None)  # transports that hold exports until release
        if forget is not None:
            forget(request_id)

    def fetch_kv(self, handle: Any) -> Any:
        """Decode role, on a transfer thread: bring a remote handle's KV here (touches no pages)."""
        return self.transport.fetch(handle)

    def can_admit(self, request: Request) -> bool:
        return self.scheduler.can_admit(request.num_tokens - 1)

    def import_kv(self, request: Request, handle: Any, source: str = "", began: float | None = None) -> int | None:
        """Decode role: take in a prefilled request and write its KV (stamped transfer began / ended,
        decode queued; ``began``: when a fetch of the KV began, if one ran first); returns the bytes
        written, or None if there is no room now."""
        rid = request.request_id
        if rid in self.seqs:
            raise ValueError(f"duplicate request id {rid!r}")
        if not self.can_admit(request):
            return None
        seq = Sequence(request, seed=_seed_of(request))
        table = self.scheduler.admit_prefilled(seq, request.num_tokens - 1)
        self.seqs[rid] = seq
        where = f"{source}->{self.name}"
        request.stamp(Event.TRANSFER_BEGAN, began, instance=where)
        try:
            nbytes = self.transport.import_kv(self.executor, list(table), handle)
        except BaseException:
            self.abort_request(rid, FinishReason.ERROR)
            raise
        request.stamp(Event.TRANSFER_ENDED, instance=where)
        request.stamp(Event.DECODE_QUEUED, instance=self.name)
        return nbytes

    # ---- the loop body -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        out = self.scheduler.schedule()
        for s in out.preempted:
            s.request.stamp(Event.PREEMPTED, instance=self.name)
        if not out.chunks:
            return []
        self.num_steps += 1
        for c in out.chunks:
            req = c.seq.request
            if not req.output_token_ids:  # its prompt (from its first token, or after a cached prefix)
                if not req.event_times(Event.PREFILL_BEGAN):
                    req.stamp(Event.PREFILL_BEGAN, instance=self.name)
            elif c.is_decode and not req.event_times(Event.DECODE_BEGAN):
                req.stamp(Event.DECODE_BEGAN, instance=self.name)
        tokens = self.runner.run(out.chunks)
        self.scheduler.on_step_done(out.chunks)
        return [self._postprocess(self.seqs[sid], tok) for sid, tok in tokens.items()]

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        req = seq.request
        req.output_token_ids.append(token)
        max_tokens = min(req.sampling.max_tokens, self.max_model_len - req.num_prompt_tokens)
        reason = token_finish_reason(token, len(req.output_token_ids), req.sampling, self.cfg.eos_token_id,
                                     max_tokens)
        if len(req.output_token_ids) == 1:
            req.stamp(Event.PREFILL_ENDED, instance=self.name)
        req.stamp(Event.TOKEN, instance=self.name)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.finish(seq)
            del self.seqs[seq.id]
            req.stamp(Event.FINISHED, instance=self.name)
        elif self.policy == "prefill-only":  # hand over: keep the blocks until a decode instance pulls them
            self.scheduler.detach(seq)
            self.ready[seq.id] = seq
        return StepOutput(seq.id, token, reason)

    # ---- introspection -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_held_blocks(self) -> int:
        return self.blocks.num_used


def _seed_of(request: Request) -> int:
    if request.sampling.seed is None:  # fix it once, so a moved or recomputed request samples the same
        request.sampling = dataclasses.replace(request.sampling, seed=new_seed())
    return request.sampling.seed
