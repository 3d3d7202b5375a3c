"""Host-side output handling for one request: detokenize, apply stop rules, stream safely.

    sampled token id --OutputTracker.add()--> (text delta to stream, finish reason or None)

Rules, checked after each token:
  * EOS (unless ``ignore_eos``) and ``stop_token_ids`` end the request; their text is not added.
  * none of these end it before ``min_tokens`` tokens (as vLLM: a stop string completed earlier
    does not count later); the sampler bans EOS until then
  * a ``stop`` string ends it with the text cut *before* the stop string
    (kept with ``include_stop_str_in_output``);
  * ``max_tokens`` (or the context limit the caller passes) ends it with reason ``length``.
While stop strings are set, the last ``len(longest stop) - 1`` characters are held
back from the stream (they might be the start of a stop string) and flushed at the end,
so the concatenated deltas always equal the final text. The engine, the simple
generator and the server all use this one tracker.
"""

from __future__ import annotations

from typing import Any

from jaxserve.request import FinishReason, SamplingParams


def token_finish_reason(token_id: int, num_output_tokens: int, sampling: SamplingParams,
                        eos_token_id: int | None, max_tokens: int) -> FinishReason | None:
    """The token-level rules (EOS, stop ids, length) that engines apply without a tokenizer; EOS and
    stop ids end a request only once it has ``min_tokens`` (the sampler bans EOS before that)."""
    stop = (token_id == eos_token_id and not sampling.ignore_eos) or token_id in sampling.stop_token_ids
    if stop and num_output_tokens >= sampling.min_tokens:
        return FinishReason.STOP
    if num_output_tokens >= max_tokens:
        return FinishReason.LENGTH
    return None


class OutputTracker:
    """Per-request output state: token ids, text, streamed prefix, finish reason."""

    def __init__(self, sampling: SamplingParams, eos_token_id: int | None, detokenizer: Any = None,
                 max_tokens: int | None = None) -> None:
        if sampling.stop and detokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.sampling = sampling
        self.eos_token_id = eos_token_id
        self.detok = detokenizer
        self.max_tokens = sampling.max_tokens if max_tokens is None else min(max_tokens, sampling.max_tokens)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._streamed = 0
        self._hold = max((len(s) for s in sampling.stop), default=1) - 1

    def add(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Record one sampled token; returns (new text to stream, finish reason or None)."""
        if self.finish_reason is not None:
            raise RuntimeError("request already finished")
        sp = self.sampling
        self.token_ids.append(token_id)
        reason = token_finish_reason(token_id, len(self.token_ids), sp, self.eos_token_id, self.max_tokens)
        stop_token = reason == FinishReason.STOP
        piece = "" if stop_token or self.detok is None else self.detok.add(token_id)
        before = len(self.text)
        self.text += piece
        if sp.stop and piece and len(self.token_ids) >= sp.min_tokens and self._cut_at_stop(before):
            reason = FinishReason.STOP
        elif reason is not None:
            self._flush_detok()
        self.finish_reason = reason
        return self._delta(), self.finish_reason

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def _flush_detok(self) -> None:
        if self.detok is not None:
            self.text += self.detok.finish()

    def _cut_at_stop(self, before: int) -> bool:
        lo = max(0, before - self._hold)  # only a stop string overlapping the new piece is new
        hits = [(i, s) for s in self.sampling.stop if (i := self.text.find(s, lo)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.sampling.include_stop_str_in_output else self.text[:i]
        return True

    def _delta(self) -> str:
        end = len(self.text) if self.finish_reason is not None else max(self._streamed, len(self.text) - self._hold)
        delta = self.text[self._streamed:end]
        self._streamed = end
        return delta
