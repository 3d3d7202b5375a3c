"""The server's workload window: by arrival time, though requests are observed when they end."""

import pytest

from jaxserve.serving.workload import WorkloadWindow


def test_a_late_finishing_old_request_leaves_the_window():
    w = WorkloadWindow(window_s=60.0)
    for t in range(1, 60):
        w.observe(float(t), 10, 5)
    w.observe(-500.0, 10, 5)  # arrived long ago, finished only now
    w.observe(61.0, 10, 5)
    rows = w.trace_rows()
    assert len(rows) == 60 and [r["arrival_time"] for r in rows[-2:]] == [58.0, 60.0]  # arrivals 1..59, 61
    assert w.rate() == pytest.approx(59 / 60)


def test_window_is_relative_to_now_when_given():
    w = WorkloadWindow(window_s=10.0)
    for t in (100.0, 101.0, 104.0):
        w.observe(t, 3, 2)
    assert w.summary(now=105.0)["requests"] == 3 and w.rate(now=105.0) == pytest.approx(2 / 4)
    assert w.summary(now=112.0)["requests"] == 1  # 100 and 101 are over 10 s old
    idle = w.summary(now=200.0)
    assert idle["requests"] == 0 and idle["rate_rps"] == 0.0 and idle["prompt_len"] is None
    assert w.trace_rows(now=200.0) == []


def test_bad_window():
    with pytest.raises(ValueError, match="window_s"):
        WorkloadWindow(window_s=0)
