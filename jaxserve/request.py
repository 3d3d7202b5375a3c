"""Requests, their sampling parameters, and lifecycle events.

A ``Request`` is created by the API server (or the offline ``LLM``) from a prompt's
token ids and a ``SamplingParams``. Every stage it passes through stamps a
``LifecycleEvent`` on it; metrics, benchmarks and the planner's fidelity check all
read the same events:

    arrived -> prefill_queued -> prefill_began -> prefill_ended (first token)
            -> transfer_began -> transfer_ended -> decode_queued -> decode_began
            -> token (one per output token) ... -> finished | aborted
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

MAX_LOGIT_BIAS = 64  # logit_bias entries per request (the sampler's fixed width)
MAX_LOGPROBS = 20  # alternatives per token the sampler returns (vLLM's default max_logprobs)


class SamplingError(ValueError):
    """A sampling parameter is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # EOS cannot be sampled before this many tokens (the sampler masks it)
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's (0: off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), at most MAX_LOGIT_BIAS
    presence_penalty: float = 0.0  # subtracted once from each token already generated (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the generated tokens (OpenAI's)
    repetition_penalty: float = 1.0  # HF's: logits of prompt and generated tokens divided (>0) / multiplied (<0)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely (<= MAX_LOGPROBS)
    prompt_logprobs: int | None = None  # as logprobs, for every prompt token (echo + logprobs); the first: None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> SamplingError:
            return SamplingError(f"{field}: {why}, got {getattr(self, field)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be a positive integer")
        if not _is_num(self.temperature) or not (0.0 <= self.temperature <= 100.0):
            raise bad("temperature", "must be a number in [0, 100]")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            raise bad("top_k", "must be an integer in [-1, 2**31) (0 or -1 disables it)")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2**63)):
            raise bad("seed", "must be a non-negative integer below 2**63")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        for f in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, f)) or not -2.0 <= getattr(self, f) <= 2.0:
                raise bad(f, "must be a number in [-2, 2]")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be a number in (0, 10]")
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(f, f"must be an integer in [0, {MAX_LOGPROBS}]")
        pairs = tuple(dict(self.logit_bias).items())
        if len(pairs) > MAX_LOGIT_BIAS or not all(
                _is_int(t) and t >= 0 and _is_num(b) and -100.0 <= b <= 100.0 for t, b in pairs):
            raise bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to numbers in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple((t, float(b)) for t, b in pairs))
        # normalise list inputs into tuples so the record stays hashable and frozen
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # rejects NaN


class Event(str, enum.Enum):
    ARRIVED = "arrived"
    PREFILL_QUEUED = "prefill_queued"
    PREFILL_BEGAN = "prefill_began"
    PREFILL_ENDED = "prefill_ended"
    TRANSFER_BEGAN = "transfer_began"
    TRANSFER_ENDED = "transfer_ended"
    DECODE_QUEUED = "decode_queued"
    DECODE_BEGAN = "decode_began"
    TOKEN = "token"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class LifecycleEvent:
    kind: Event
    time: float  # time.perf_counter() seconds
    instance: str = ""


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclasses.dataclass
class Request:
    """One generation request as it moves through the system (host-side state only)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    prompt: str | None = None
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    # with sampling.logprobs: per output token (its logprob, ((id, logprob) of the most likely, best first)))
    output_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    events: list[LifecycleEvent] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    # with sampling.prompt_logprobs: one per prompt token (None for the first), filled as the prompt is computed
    prompt_logprobs: list[TokenLogprobs | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise SamplingError("prompt: must contain at least one token")
        if not self.events:
            self.stamp(Event.ARRIVED, self.arrival_time)

    def stamp(self, kind: Event, t: float | None = None, instance: str = "") -> None:
        self.events.append(LifecycleEvent(kind, time.perf_counter() if t is None else t, instance))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt still needs logprobs: computed in pieces with logits at every position, no cache."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def event_times(self, kind: Event) -> list[float]:
        return [e.time for e in self.events if e.kind == kind]
