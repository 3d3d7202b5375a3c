"""jaxserve.slo.breakdown: the five latency stages from a request's lifecycle events."""

import pytest

from jaxserve.request import Event
from jaxserve.slo import STAGES, breakdown


def test_disaggregated_request_stages_add_up():
    ev = [(Event.ARRIVED, 0.0), (Event.PREFILL_QUEUED, 0.01), (Event.PREFILL_BEGAN, 0.5), (Event.PREFILL_ENDED, 0.9),
          (Event.TOKEN, 0.9), (Event.TRANSFER_BEGAN, 1.2), (Event.TRANSFER_ENDED, 1.25),
          (Event.DECODE_QUEUED, 1.25), (Event.DECODE_BEGAN, 1.4), (Event.TOKEN, 1.5), (Event.FINISHED, 3.0)]
    b = breakdown(ev)
    assert b == pytest.approx({"prefill_queue": 0.5, "prefill_exec": 0.4, "transfer": 0.05,
                               "decode_queue": 0.45, "decode_exec": 1.6})
    assert sum(b.values()) == pytest.approx(3.0)  # the stages tile arrival -> finish


def test_colocated_and_degenerate_requests():
    ev = [("arrived", 1.0), ("prefill_began", 1.0), ("prefill_ended", 1.2), ("decode_began", 1.3), ("finished", 2.0)]
    assert breakdown(ev) == pytest.approx({"prefill_queue": 0.0, "prefill_exec": 0.2, "transfer": 0.0,
                                           "decode_queue": 0.1, "decode_exec": 0.7})
    one_token = [("arrived", 0.0), ("prefill_began", 0.1), ("prefill_ended", 0.3), ("finished", 0.3)]
    assert breakdown(one_token)["decode_exec"] == pytest.approx(0.0)
    assert breakdown([]) == dict.fromkeys(STAGES, 0.0)
