"""Event times from actors on other nodes move onto the driver's clock (NTP-style offset estimate)."""

from jaxserve.cluster.ray_instance import estimate_clock_offset
from jaxserve.request import Event, LifecycleEvent, Request, SamplingParams
from jaxserve.runtime.api import RequestUpdate


def test_offset_comes_from_the_shortest_round_trip():
    # local clock readings, two per sample: round trips of 4, 1 and 3 ms
    local = iter([10.000, 10.004, 20.000, 20.001, 30.000, 30.003])
    # the remote clock is 100 s ahead; its readings land off-centre except in the short trip
    remote = iter([110.003, 120.0005, 130.0])
    offset, err = estimate_clock_offset(lambda: next(remote), samples=3, local_clock=lambda: next(local))
    assert abs(offset - 100.0) < 1e-9 and abs(err - 0.0005) < 1e-12


def test_update_moves_event_times_onto_the_driver_clock():
    req = Request("r", [2, 5], SamplingParams(max_tokens=4))
    ev = [LifecycleEvent(Event.PREFILL_QUEUED, 105.0, "prefill-0"), LifecycleEvent(Event.TOKEN, 106.5, "prefill-0")]
    RequestUpdate("r", ev, [7], None, 3).apply(req, clock_offset=100.0)
    assert [(e.kind, e.time, e.instance) for e in req.events[-2:]] == [
        (Event.PREFILL_QUEUED, 5.0, "prefill-0"), (Event.TOKEN, 6.5, "prefill-0")]
    assert req.output_token_ids == [7] and req.sampling.seed == 3
    RequestUpdate("r", [LifecycleEvent(Event.TOKEN, 7.0)], [8], None, None).apply(req)  # same node: as is
    assert req.events[-1].time == 7.0
