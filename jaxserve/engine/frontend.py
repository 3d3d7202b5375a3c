"""The front end of an engine: tokens in from the engine, text and stop strings out.

    Requests --engine.add_request--> engine (colocated, or a disaggregated cluster)
    engine.step() -> [StepOutput(request_id, token_id, token-level finish)]
        --OutputTracker per request (detokenize, stop strings, streaming hold-back)-->
    a stop string ends a request here, and the engine is told to drop it (blocks freed at once)

Engines never see text, so a request can move between instances (and processes)
without carrying a tokenizer; this is the one place stop strings are applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxserve.request import FinishReason, Request
from jaxserve.stopping import OutputTracker


def make_tracker(request: Request, tokenizer: Any, eos_token_id: int, max_model_len: int) -> OutputTracker:
    detok = tokenizer.detokenizer(request.prompt_token_ids) if tokenizer is not None else None
    return OutputTracker(request.sampling, eos_token_id, detok,
                         max_tokens=max_model_len - request.num_prompt_tokens)


def run_requests(engine: Any, requests: Sequence[Request], tokenizer: Any = None,
                 progress: Callable[[int], Any] | None = None) -> list[OutputTracker]:
    """Add every request, step the engine until all finish; returns their trackers in input order."""
    trackers = {r.request_id: make_tracker(r, tokenizer, engine.cfg.eos_token_id, engine.max_model_len)
                for r in requests}
    for r in requests:
        engine.add_request(r)
    pending = set(trackers)
    while pending:
        outs = engine.step()
        if not outs and not engine.has_unfinished():
            raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
        for o in outs:
            if o.request_id not in pending:
                continue
            if o.finish_reason == FinishReason.ERROR:  # the instance holding it failed; no token
                trackers[o.request_id].abort(FinishReason.ERROR)
                pending.discard(o.request_id)
                continue
            _, reason = trackers[o.request_id].add(o.token_id)
            if reason is not None and o.finish_reason is None:  # a stop string: the engine did not know
                engine.abort_request(o.request_id, FinishReason.STOP)
            if reason is not None:
                pending.discard(o.request_id)
                if progress is not None:
                    progress(1)
    return [trackers[r.request_id] for r in requests]
