"""Host costs of jaxserve's engine around the profiled model calls (``python -m jaxserve.profiling --engine-costs``).

    LLMEngine (colocated mode) on the profiled device, its ``executor.execute`` timed to completion
      decode:  B requests decoding together; per step, the wall time of ``engine.step()`` and of the
               model call in it --> host time = wall - call --least squares--> call_ms + seq_ms * B
      prefill: n prompts per step, the same --> call_ms + seq_ms * n (reported, not used by the fit)
      KV hand-off (the Ray path: numpy through the object store), per request:
               export = HostTransport.export_kv (the blocks copied to host) + pickle (protocol 5)
               import = unpickle + HostTransport.import_kv (written into the cache's pages)
               --least squares--> a + b * tokens (ms) each
    --> dict (ms) stored as the profile entry's ``engine_costs``; ``planner.latency.EngineCosts`` reads it

The profiler times only ``execute`` (host packing excluded), so these are what a step adds on
top: packing the inputs, sampling, reading tokens back, scheduling and bookkeeping. Not measured
here: the round trip a driver adds between an actor's steps (a Ray call, its reply, the serving
loop); ``scripts/planner_fidelity.py`` takes that from the experiment's unloaded TPOT.
"""

from __future__ import annotations

import pickle
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import blocks_needed
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.kv_transfer import HostTransport
from jaxserve.request import Request, SamplingParams
from planner.fit import fit_line

Row = tuple[int, float, float]  # (sequences in the step, step wall ms, model-call ms)


class _TimedEngine:
    """An LLMEngine whose model calls are waited on and timed (the runner calls ``executor.execute``)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.spent = 0.0
        ex = engine.executor
        execute = ex.execute

        def timed(inputs: Any) -> Any:
            t = time.perf_counter()
            out = execute(inputs)
            jax.block_until_ready(out)
            self.spent += time.perf_counter() - t
            return out

        ex.execute = timed

    def step(self) -> tuple[float, float]:
        """One engine step: (wall ms, model-call ms)."""
        self.spent = 0.0
        t = time.perf_counter()
        self.engine.step()
        return (time.perf_counter() - t) * 1e3, self.spent * 1e3


def _step_rows(timed: _TimedEngine, cfg: Any, batches: Sequence[int], prompt_len: int, steps: int,
               rng: np.random.Generator) -> tuple[list[Row], list[Row]]:
    """(decode rows, prefill rows) of each batch size; a first pass per batch compiles its shapes."""
    engine = timed.engine
    dec_rows: list[Row] = []
    pre_rows: list[Row] = []
    for b in batches:
        for rep in range(2):  # the first pass compiles this batch's shapes
            reqs = [Request(f"b{b}-{rep}-{i}", rng.integers(4, cfg.vocab_size, prompt_len).tolist(),
                            SamplingParams(max_tokens=steps + 2, ignore_eos=True)) for i in range(b)]
            for r in reqs:
                engine.add_request(r)
            while any(not r.output_token_ids for r in reqs):
                before = sum(1 for r in reqs if r.output_token_ids)
                wall, call = timed.step()
                n = sum(1 for r in reqs if r.output_token_ids) - before
                if rep:
                    pre_rows.append((n, wall, call))
            for _ in range(steps):
                wall, call = timed.step()
                if rep:
                    dec_rows.append((b, wall, call))
            while engine.has_unfinished():
                engine.step()
    return dec_rows, pre_rows


def _kv_rows(ex: Any, first_block: int, block_size: int, kv_tokens: Sequence[int], repeats: int
             ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(export rows, import rows): (tokens, min ms) of a request's KV through host numpy, pickled as Ray would."""
    transport = HostTransport()
    exp_rows: list[tuple[int, float]] = []
    imp_rows: list[tuple[int, float]] = []
    next_block = first_block
    for tokens in kv_tokens:
        nb = blocks_needed(tokens, block_size)
        src = list(range(next_block, next_block + nb))
        dst = list(range(next_block + nb, next_block + 2 * nb))
        next_block += 2 * nb
        e_t, i_t = [], []
        for rep in range(repeats + 1):  # the first round compiles this block bucket's gather/scatter
            t = time.perf_counter()
            blob = pickle.dumps(transport.export_kv(ex, src, tokens), protocol=5)
            t1 = time.perf_counter()
            transport.import_kv(ex, dst, pickle.loads(blob))
            jax.block_until_ready(ex.kv)
            t2 = time.perf_counter()
            if rep:
                e_t.append((t1 - t) * 1e3)
                i_t.append((t2 - t1) * 1e3)
        exp_rows.append((tokens, min(e_t)))
        imp_rows.append((tokens, min(i_t)))
    return exp_rows, imp_rows


def _host(rows: list[Row]) -> tuple[float, float]:
    """call_ms + seq_ms * sequences of the host time (wall - model call)."""
    return fit_line([r[0] for r in rows], [r[1] - r[2] for r in rows])


def measure_engine_costs(cfg: Any, params: Any, device: Any, *, block_size: int = 16, max_num_seqs: int = 32,
                         max_model_len: int = 768, token_budget: int = 768, batches: Sequence[int] = (1, 4, 16, 32),
                         prompt_len: int = 64, steps: int = 6, kv_tokens: Sequence[int] = (32, 128, 512),
                         repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Measure the engine's host time per step/call/sequence and the KV export/import cost (ms)."""
    batches = [b for b in batches if b <= max_num_seqs]
    per_seq = blocks_needed(prompt_len + steps + 4, block_size)
    kv_blocks = 2 * sum(blocks_needed(t, block_size) for t in kv_tokens)
    num_blocks = max(batches) * per_seq + kv_blocks + 2
    engine = LLMEngine(cfg, params, EngineConfig(
        mode="colocated", block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        max_num_batched_tokens=token_budget, num_blocks=num_blocks), devices=[device], name="engine-costs")
    timed = _TimedEngine(engine)
    dec_rows, pre_rows = _step_rows(timed, cfg, batches, prompt_len, steps, np.random.default_rng(seed))
    exp_rows, imp_rows = _kv_rows(engine.executor, max(batches) * per_seq + 1, block_size, kv_tokens, repeats)
    call_ms, seq_ms = _host(dec_rows)
    pre_call, pre_seq = _host(pre_rows) if len({r[0] for r in pre_rows}) > 1 else (
        statistics.median(r[1] - r[2] for r in pre_rows), 0.0)
    return {
        "call_ms": call_ms, "seq_ms": seq_ms,
        "prefill_call_ms": pre_call, "prefill_seq_ms": pre_seq,
        "kv_export_ms": list(fit_line(*zip(*exp_rows, strict=True))),
        "kv_import_ms": list(fit_line(*zip(*imp_rows, strict=True))),
        "samples": {
            "decode": [[b, round(w, 3), round(c, 3)] for b, w, c in dec_rows],
            "prefill": [[n, round(w, 3), round(c, 3)] for n, w, c in pre_rows],
            "kv_export": [[t, round(v, 3)] for t, v in exp_rows],
            "kv_import": [[t, round(v, 3)] for t, v in imp_rows],
            "columns": "decode/prefill: [sequences in the step, step wall ms, model-call ms]; kv: [tokens, min ms]",
        },
        "setup": {"block_size": block_size, "max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
                  "token_budget": token_budget, "prompt_len": prompt_len, "steps": steps},
    }
