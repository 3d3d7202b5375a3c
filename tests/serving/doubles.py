"""A hand-checkable test double of the engine for the orchestrator's and the server's own tests."""

import dataclasses
import time

from jaxserve.engine.engine import StepOutput
from jaxserve.request import FinishReason, Request


@dataclasses.dataclass(frozen=True)
class _Cfg:
    eos_token_id: int = 2


class CountingEngine:
    """Test double: request r emits 100, 101, ... one per step, up to max_tokens; prompt [666] is rejected."""

    cfg = _Cfg()

    def __init__(self, fail_at_step=None, max_model_len=1000, step_sleep=0.0, max_running=None):
        self.reqs: dict[str, Request] = {}
        self.added: list[Request] = []
        self.max_running = max_running  # only the oldest this many requests advance
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.max_model_len = max_model_len
        self.step_sleep = step_sleep

    def add_request(self, r):
        if r.prompt_token_ids == [666]:
            raise ValueError("prompt: 666 is not allowed")
        self.reqs[r.request_id] = r
        self.added.append(r)

    def abort_request(self, rid, reason=FinishReason.ABORT):
        if self.reqs.pop(rid, None) is not None:
            self.aborted.append(rid)
            return True
        return False

    def has_unfinished(self):
        return bool(self.reqs)

    def step(self):
        self.steps += 1
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.fail_at_step == self.steps:
            raise RuntimeError("boom")
        out = []
        for rid, r in list(self.reqs.items())[: self.max_running]:
            tok = 100 + len(r.output_token_ids)
            r.output_token_ids.append(tok)
            done = len(r.output_token_ids) >= r.sampling.max_tokens
            out.append(StepOutput(rid, tok, FinishReason.LENGTH if done else None))
            if done:
                del self.reqs[rid]
        return out
