"""The contracts of the runtime above one instance: typed messages, the instance interface, the core.

    Router --commands (add / abort / import_kv / release)--> Instance
    Router <--Batch(messages, stats) from outputs()-------- Instance

An ``Instance`` runs on its own (a thread in this process, or a Ray actor) and never shares a
mutable object with the router: commands carry copies, and everything that happens to a request
comes back as a message. The router owns each request's record and applies the messages to it.

Messages (one per request per batch, in the order they happened):
    RequestUpdate  new lifecycle events (instance clock), new token ids, finish reason, the seed
    KVReady        prefill role: the request's KV is exported (``handle``); blocks held until release
    Imported       decode role: an import landed (``nbytes``) or was refused for lack of room (None)
    Failed         a command for one request failed (bad request, a failed import); the request ended

An ``EngineCore`` is what an instance drives: one engine (``jaxserve.engine.engine.LLMEngine``) or
a test double with hand-checkable tokens and settable step times. Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from jaxserve.request import FinishReason, LifecycleEvent, Request, TokenLogprobs

NO_TOKEN = -1  # token_id of a StepOutput that ends a request without a token (ERROR)


@dataclasses.dataclass
class StepOutput:
    """One token of one request (or its end without a token), in the order they happened."""

    request_id: str
    token_id: int  # NO_TOKEN: the request failed (finish_reason ERROR)
    finish_reason: FinishReason | None  # token-level (EOS, stop ids, length); stop strings are the front end's


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """What the router needs to know about an instance; fixed at start."""

    name: str
    mode: str  # prefill | decode | colocated | chunked
    vocab_size: int
    eos_token_id: int | None
    max_model_len: int
    block_size: int
    capacity: int  # KV blocks (the null block excluded)
    max_num_seqs: int = 1 << 30  # running sequences at most
    num_devices: int = 1
    model: str = ""  # model identity: instances of one deployment must agree
    node_id: str | None = None  # Ray node, when the instance is an actor
    pid: int | None = None

    @property
    def role(self) -> str:
        return "decode" if self.mode == "decode" else "prefill" if self.mode == "prefill" else "colocated"


@dataclasses.dataclass(frozen=True)
class InstanceStats:
    """A snapshot of an instance's load (dispatch keys and gauges)."""

    name: str
    free_blocks: int
    held_blocks: int
    queued_tokens: int  # tokens still to compute for its requests (dispatch key)
    running: int
    waiting: int  # queued for prefill, or prefilled and waiting to be pulled
    has_unfinished: bool = False
    steps: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of which found cached
    block_size: int = 0  # its KV cache's configuration (the metrics' cache_config_info); 0: not reported
    prefix_caching: bool = False


@dataclasses.dataclass
class RequestUpdate:
    """What happened to one request on an instance since its previous batch."""

    request_id: str
    events: list[LifecycleEvent]
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    seed: int | None = None
    new_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # with sampling.logprobs
    num_cached_tokens: int = 0  # prompt tokens the instance took from its prefix cache
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token, when asked for

    def apply(self, request: Request, clock_offset: float = 0.0) -> None:
        """Bring the router's record up to date; event times minus ``clock_offset`` (the instance's
        clock minus the router's)."""
        if clock_offset:
            request.events.extend(dataclasses.replace(e, time=e.time - clock_offset) for e in self.events)
        else:
            request.events.extend(self.events)
        request.output_token_ids.extend(self.new_token_ids)
        request.output_logprobs.extend(self.new_logprobs)
        request.num_cached_tokens = max(request.num_cached_tokens, self.num_cached_tokens)
        if self.prompt_logprobs:
            request.prompt_logprobs = list(self.prompt_logprobs)
        if self.finish_reason is not None and request.finish_reason is None:
            request.finish_reason = self.finish_reason
        if request.sampling.seed is None and self.seed is not None:
            request.sampling = dataclasses.replace(request.sampling, seed=self.seed)


@dataclasses.dataclass
class KVReady:
    request_id: str
    handle: Any  # a transport's handle (jaxserve.engine.kv_transfer); opaque to the router
    num_tokens: int


@dataclasses.dataclass
class Imported:
    request_id: str
    nbytes: int | None  # None: refused (no room now); the source keeps holding the KV


@dataclasses.dataclass
class Failed:
    request_id: str
    why: str


Message = RequestUpdate | KVReady | Imported | Failed


@dataclasses.dataclass
class Batch:
    """An instance's messages since the last batch, and its load right after them."""

    messages: list[Message]
    stats: InstanceStats | None = None
    error: str | None = None  # set once: the instance is dead; every request on it is lost


class Instance(Protocol):
    """One instance as the router sees it: every method returns at once (work happens on the
    instance's own thread or process); ``outputs`` never blocks. ``wake`` is set by the instance
    whenever a batch is ready, so the router can sleep until something happens."""

    info: InstanceInfo
    clock_offset: float  # the instance's event clock minus the router's (0 on the router's host)

    def start(self, wake: Any) -> None: ...
    def add(self, request: Request) -> None: ...
    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None: ...
    def import_kv(self, request: Request, handle: Any, source: str) -> None: ...
    def release(self, request_id: str) -> None: ...
    def outputs(self) -> Batch: ...
    def stats(self) -> InstanceStats: ...
    def warmup(self, progress: bool = False) -> int: ...  # progress: reported on the instance's stderr
    def compilations_since_warmup(self) -> int: ...
    def stop_soon(self) -> None: ...  # no waiting: safe from a finalizer
    def shutdown(self) -> None: ...


class EngineCore(Protocol):
    """One engine, driven by exactly one thread (its instance's). Mutates its own Request copies."""

    name: str

    def info(self) -> InstanceInfo: ...
    def add_request(self, request: Request) -> None: ...
    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool: ...
    def step(self) -> list[Any]: ...
    def has_unfinished(self) -> bool: ...
    def take_ready(self) -> list[str]: ...
    def export_kv(self, request_id: str) -> tuple[Any, int]: ...
    def release(self, request_id: str) -> None: ...
    def import_kv(self, request: Request, handle: Any, source: str, began: float | None = None) -> int | None: ...
    def stats(self) -> InstanceStats: ...
    def warmup(self, progress: Any = None) -> int: ...  # progress: a (done, total) callback or None
    @property
    def compilations_since_warmup(self) -> int: ...


class Stepper(Protocol):
    """What the front end drives: the ``Router`` (any deployment), or one engine core stepped directly
    on the caller's thread (tests and offline benchmarks of a single instance)."""

    eos_token_id: int | None
    max_model_len: int

    def add_request(self, request: Request) -> None: ...
    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool: ...
    def step(self) -> list[StepOutput]: ...
    def has_unfinished(self) -> bool: ...


def copy_request(request: Request) -> Request:
    """A request an instance may mutate: its own lists, nothing shared with the router's record."""
    return dataclasses.replace(request, prompt_token_ids=list(request.prompt_token_ids),
                               output_token_ids=list(request.output_token_ids), events=list(request.events),
                               output_logprobs=list(request.output_logprobs),
                               prompt_logprobs=list(request.prompt_logprobs))
