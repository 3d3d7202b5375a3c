"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``.

    compilation_cache (a dir, "off", None: the default) --> JAX's persistent cache, before anything compiles
    prompts (str or token ids) --tokenize/validate--> Requests --engine--> RequestOutput per prompt (input order)

``model`` is an HF OPT folder, a converted (orbax) folder, or None for the
built-in demo model. Generation runs through the engine (``jaxserve.engine``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from jaxserve.compile_cache import enable_compilation_cache
from jaxserve.config import DeploymentConfig, EngineConfig
from jaxserve.engine.build import build_engine
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.model.checkpoint import LoadedModel, load_model
from jaxserve.request import FinishReason, Request, SamplingError, SamplingParams
from jaxserve.runtime.instance import LocalInstance
from jaxserve.runtime.router import Router
from jaxserve.tokenizer import Tokenizer

Prompt = str | Sequence[int]


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason


class LLM:
    """Load a model once, then generate for batches of prompts through the runtime's router.

    Keyword arguments go to ``EngineConfig`` (``mode``, ``kv_cache_gb``, ``num_blocks``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``block_size``, ``tp``, ``pp``).
    ``config`` (a deployment YAML, a planner plan JSON, or a DeploymentConfig) runs the listed
    instances instead, e.g. one prefill and one decode instance (then the keywords fill in
    every instance's unset limits, and ``mode`` applies to colocated instances). ``model`` may also be
    a ``LoadedModel`` already loaded (e.g. to size ``workload_blocks`` with its tokenizer first).
    Shapes compile on first use; pass ``warmup=True`` to compile them all up front (with a progress
    report on stderr unless ``warmup_progress=False``). Compiled programs are kept in the persistent
    compilation cache ``compilation_cache`` (a directory, "off", or None for the default of
    ``jaxserve.compile_cache.resolve_cache_dir``; the directory used is ``self.compilation_cache``),
    so the next process with the same model and limits compiles nothing.
    """

    def __init__(self, model: str | LoadedModel | None = None, *, dtype: str = "float32", warmup: bool = False,
                 config: str | DeploymentConfig | None = None, compilation_cache: str | None = None,
                 warmup_progress: bool = True, **engine_kw: Any) -> None:
        self.compilation_cache = enable_compilation_cache(compilation_cache)
        deployment = DeploymentConfig.load(config) if isinstance(config, str) else config
        if model is None and deployment is not None:
            model = deployment.model
        lm = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        self.cfg = lm.cfg
        self.model_name = lm.source
        self.tokenizer = Tokenizer.from_dir(lm.tokenizer_dir) if lm.tokenizer_dir is not None else None
        self.engine: Router
        if deployment is None:
            self.engine = Router([LocalInstance(LLMEngine(lm.cfg, lm.params, EngineConfig(**engine_kw),
                                                          name="colocated-0"))])
        else:
            mode = engine_kw.pop("mode", "colocated")
            self.engine = build_engine(lm.cfg, lm.params, deployment, mode_for_colocated=mode, **engine_kw)
        if warmup:
            self.engine.warmup(progress=warmup_progress)
        self._counter = itertools.count()

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Validate one prompt and return its token ids (raises SamplingError naming the problem)."""
        if isinstance(prompt, str):
            if not prompt:
                raise SamplingError("prompt: must not be empty")
            if self.tokenizer is None:
                raise SamplingError("prompt: this model folder has no tokenizer; pass prompt_token_ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not ids:
                raise SamplingError("prompt_token_ids: must not be empty")
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise SamplingError(f"prompt_token_ids: {bad[0]!r} is not a token id in [0, {self.cfg.vocab_size})")
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise SamplingError(f"prompt: {len(ids)} tokens; the context is {limit} positions, so the "
                                f"prompt may have at most {limit - 1}")
        return ids

    def make_request(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Request:
        """Tokenize and check one prompt; raises ValueError naming the problem if it can never run."""
        ids = self.tokenize(prompt)
        req = Request(f"llm-{next(self._counter)}", ids, sampling or SamplingParams(),
                      prompt=prompt if isinstance(prompt, str) else None)
        self.engine.check_request(req)
        if req.sampling.stop and self.tokenizer is None:
            raise SamplingError("stop: stop strings need a tokenizer, and this model folder has none")
        return req

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: Callable[[int], Any] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (all batched together); outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        sps = (list(sampling_params) if isinstance(sampling_params, list | tuple)
               else [sampling_params] * len(prompts))
        if len(sps) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sps)} sampling params")
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, sps, strict=True)]
        trackers = run_requests(self.engine, reqs, self.tokenizer, progress)
        return [RequestOutput(r.prompt, r.prompt_token_ids, t.text, t.token_ids, t.finish_reason)
                for r, t in zip(reqs, trackers, strict=True)]
