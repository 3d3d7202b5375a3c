"""A hand-checkable deployment for the orchestrator's and the server's own tests: the real Router and
LocalInstance over one test-double core (``jaxserve.runtime.fake.FakeCore``).

Request r's tokens are 100, 101, ... (a prefill step gives the first, each decode step one more), up to
max_tokens; the prompt [666] is refused by the instance (the request ends with ERROR). ``step_sleep``
is each step's time, ``max_running`` caps the requests that advance, ``fail_at_step`` makes that step
raise (the requests on the instance end with ERROR; it carries on)."""

from jaxserve.runtime.fake import FakeCore
from jaxserve.runtime.instance import LocalInstance
from jaxserve.runtime.router import Router


class CountingEngine(Router):
    def __init__(self, fail_at_step=None, max_model_len=1000, step_sleep=0.0, max_running=64, capacity=1024):
        self.core = FakeCore("colocated-0", "colocated", prefill_s=step_sleep, decode_s=step_sleep,
                             max_running=max_running, max_model_len=max_model_len, fail_at_step=fail_at_step,
                             capacity=capacity)
        self.added = []
        super().__init__([LocalInstance(self.core)], poll_s=0.01)

    def add_request(self, request):
        super().add_request(request)
        self.added.append(request)

    @property
    def reqs(self):
        """Requests the instance still holds."""
        c = self.core
        return {r.request_id: r for r in [*c.waiting, *c.running.values()]}

    @property
    def aborted(self):
        return self.core.aborted

    @property
    def steps(self):
        return self.core.steps

    @property
    def fail_at_step(self):
        return self.core.fail_at_step

    @fail_at_step.setter
    def fail_at_step(self, v):
        self.core.fail_at_step = v
