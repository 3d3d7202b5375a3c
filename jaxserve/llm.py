"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``.

    prompts (str or token ids) --tokenize/validate--> Requests --engine--> RequestOutput per prompt (input order)

``model`` is an HF OPT folder, a converted (orbax) folder, or None for the
built-in demo model. Generation runs through the engine (``jaxserve.engine``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.model.checkpoint import load_model
from jaxserve.request import FinishReason, SamplingError, SamplingParams
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
    """Load a model once, then generate for batches of prompts."""

    def __init__(self, model: str | None = None, *, dtype: str = "float32", **engine_kw: Any) -> None:
        lm = load_model(model, dtype)
        self.cfg = lm.cfg
        self.model_name = lm.source
        self.tokenizer = Tokenizer.from_dir(lm.tokenizer_dir) if lm.tokenizer_dir is not None else None
        self.params = jax.tree_util.tree_map(jnp.asarray, lm.params)
        self.engine_kw = engine_kw

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
        limit = self.cfg.max_position_embeddings
        if len(ids) >= limit:
            raise SamplingError(f"prompt: {len(ids)} tokens; this model's context is {limit} positions, so the "
                                f"prompt may have at most {limit - 1}")
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: Callable[[int], Any] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in input order."""
        from jaxserve.model.generate import generate

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [self.tokenize(p) for p in prompts]
        gens = generate(self.params, self.cfg, ids, sampling_params, tokenizer=self.tokenizer)
        if progress is not None:
            progress(len(gens))
        return [RequestOutput(p if isinstance(p, str) else None, i, g.text, g.token_ids, g.finish_reason)
                for p, i, g in zip(prompts, ids, gens, strict=True)]
