"""The front end of an engine: tokens in from the engine, text and stop strings out.

    Requests --Frontend.add--> the router (jaxserve.runtime.router: any deployment, in-process or Ray)
    router.step() -> [StepOutput(request_id, token_id, token-level finish)]
        --Frontend.on_output (OutputTracker per request: detokenize, stop strings, hold-back)-->
    Delta(request_id, text, token_ids, finish_reason); a stop string ends a request here and the
    engine is told to drop it (its blocks are freed at once)

Engines never see text, so a request can move between instances (and processes)
without carrying a tokenizer; this is the one place stop strings are applied. The
offline loop (``run_requests``) and the server's orchestrator both use ``Frontend``.
``engine`` is a ``Stepper``: the ``Router``, or one ``LLMEngine`` stepped on the caller's thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jaxserve.request import FinishReason, Request, TokenLogprobs
from jaxserve.runtime.api import Stepper
from jaxserve.stopping import OutputTracker


@dataclasses.dataclass
class Delta:
    """What one request gained in one engine step."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] | None = None  # one per token id, with sampling.logprobs


class Frontend:
    """Per-request output trackers over one engine (not thread-safe: call from the engine's thread)."""

    def __init__(self, engine: Stepper, tokenizer: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.trackers: dict[str, OutputTracker] = {}
        self.requests: dict[str, Request] = {}  # the engine's record: where a token's logprobs land

    def add(self, request: Request) -> None:
        """Check and add one request (raises ValueError naming the problem; nothing is kept then)."""
        if request.sampling.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this model has none")
        detok = self.tokenizer.detokenizer(request.prompt_token_ids) if self.tokenizer is not None else None
        tracker = OutputTracker(request.sampling, self.engine.eos_token_id, detok,
                                max_tokens=self.engine.max_model_len - request.num_prompt_tokens)
        self.engine.add_request(request)
        self.trackers[request.request_id] = tracker
        self.requests[request.request_id] = request

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> OutputTracker | None:
        tracker = self.trackers.pop(request_id, None)
        self.requests.pop(request_id, None)
        self.engine.abort_request(request_id, reason)
        if tracker is not None:
            tracker.abort(reason)
        return tracker

    def on_output(self, o: Any) -> Delta | None:
        """Fold one engine output into its request; returns the delta (None if the request is gone)."""
        tracker = self.trackers.get(o.request_id)
        if tracker is None:
            return None
        if o.finish_reason == FinishReason.ERROR:  # the instance holding it failed; no token
            tracker.abort(FinishReason.ERROR)
            del self.trackers[o.request_id]
            del self.requests[o.request_id]
            return Delta(o.request_id, "", [], FinishReason.ERROR)
        text, reason = tracker.add(o.token_id)
        request = self.requests[o.request_id]
        lps = request.output_logprobs
        n = len(tracker.token_ids)
        logprobs = [lps[n - 1]] if request.sampling.logprobs is not None and len(lps) >= n else None
        if reason is not None:
            if o.finish_reason is None:  # a stop string: the engine did not know
                self.engine.abort_request(o.request_id, FinishReason.STOP)
            del self.trackers[o.request_id]
            del self.requests[o.request_id]
        return Delta(o.request_id, text, [o.token_id], reason, logprobs)

    def step(self) -> list[Delta]:
        return [d for o in self.engine.step() if (d := self.on_output(o)) is not None]


def run_requests(engine: Stepper, requests: Sequence[Request], tokenizer: Any = None,
                 progress: Callable[[int], Any] | None = None) -> list[OutputTracker]:
    """Add every request, step the engine until all finish; returns their trackers in input order."""
    fe = Frontend(engine, tokenizer)
    for r in requests:
        fe.add(r)
    trackers = [fe.trackers[r.request_id] for r in requests]
    while fe.trackers:
        deltas = fe.step()
        if not deltas and not engine.has_unfinished() and fe.trackers:
            raise RuntimeError(f"engine went idle with {len(fe.trackers)} requests unfinished")
        if progress is not None:
            for d in deltas:
                if d.finish_reason is not None:
                    progress(1)
    return trackers
