"""ServerMetrics: hand-checked TTFT/TPOT/e2e from jaxserve.slo, Prometheus text that parses, engine gauges."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from jaxserve.request import Event, Request
from jaxserve.runtime.api import InstanceStats
from jaxserve.serving.metrics import Histogram, ServerMetrics, instance_gauges, transfer_durations

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict little parser of the text format: {(name, sorted labels): value}; checks HELP/TYPE order."""
    assert text.endswith("\n")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types_: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types_, line
            types_[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, _, body, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types_ else name
        assert family in types_, f"{name} has no TYPE line"
        labels, pos = [], 0
        while body and pos < len(body):
            lm = _LABEL.match(body, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")))
            pos = lm.end()
        key = (name, tuple(sorted(labels)))
        assert key not in out, f"duplicate series {key}"
        out[key] = float(value.replace("+Inf", "inf"))
    return out


def _buckets(m, name, labels=(("model_name", "m"),)):
    rows = [(float(dict(k[1])["le"].replace("+Inf", "inf")), v) for k, v in m.items()
            if k[0] == name + "_bucket" and tuple(x for x in k[1] if x[0] != "le") == labels]
    return sorted(rows)


def test_histogram_is_cumulative_with_sum_and_count():
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 20.0, float("nan")):
        h.observe(v)
    lines = list(h.lines("x", {"a": "b"}))
    assert lines == ['x_bucket{a="b",le="0.1"} 2', 'x_bucket{a="b",le="1.0"} 3', 'x_bucket{a="b",le="10.0"} 3',
                     'x_bucket{a="b",le="+Inf"} 4', 'x_sum{a="b"} 20.65', 'x_count{a="b"} 4']


def _finished_request(rid: str, transfers=()) -> Request:
    r = Request(rid, [2, 3, 4], arrival_time=100.0)
    for b, e in transfers:
        r.stamp(Event.TRANSFER_BEGAN, b)
        r.stamp(Event.TRANSFER_ENDED, e)
    return r


def test_observe_finished_uses_the_slo_definitions_and_renders():
    m = ServerMetrics("m")
    m.observe_admitted(3)
    # arrival 100, first token 100.5, last 102.5, 5 tokens: TTFT 0.5, TPOT (2.5 - 0.5) / 4 = 0.5, e2e 2.5
    m.observe_finished(_finished_request("a", [(100.5, 100.503)]), arrival=100.0, first_token=100.5,
                       finish=102.5, num_output_tokens=5, finish_reason="length")
    m.observe_admitted(3)
    m.observe_finished(_finished_request("b"), arrival=100.0, first_token=100.02, finish=100.02,
                       num_output_tokens=1, finish_reason="stop")
    m.observe_admitted(3)
    m.observe_finished(_finished_request("c"), arrival=100.0, first_token=None, finish=130.0,
                       num_output_tokens=0, finish_reason="abort")
    m.observe_rejected("queue_full")
    text = m.render()
    p = parse_prometheus(text)
    lab = (("model_name", "m"),)
    assert p[("jaxserve:request_success_total", (("finished_reason", "length"), *lab))] == 1
    assert p[("jaxserve:request_success_total", (("finished_reason", "stop"), *lab))] == 1
    assert p[("jaxserve:request_success_total", (("finished_reason", "abort"), *lab))] == 1
    assert p[("jaxserve:request_rejected_total", (*lab, ("reason", "queue_full")))] == 1
    assert p[("jaxserve:prompt_tokens_total", lab)] == 9 and p[("jaxserve:generation_tokens_total", lab)] == 6
    assert p[("jaxserve:time_to_first_token_seconds_count", lab)] == 2  # the aborted one has no latency
    assert p[("jaxserve:time_to_first_token_seconds_sum", lab)] == pytest.approx(0.52)
    assert p[("jaxserve:time_per_output_token_seconds_count", lab)] == 1  # one token: no decoding phase
    assert p[("jaxserve:time_per_output_token_seconds_sum", lab)] == pytest.approx(0.5)
    assert p[("jaxserve:e2e_request_latency_seconds_sum", lab)] == pytest.approx(2.52)
    assert p[("jaxserve:kv_transfer_seconds_count", lab)] == 1
    assert p[("jaxserve:kv_transfer_seconds_sum", lab)] == pytest.approx(0.003)
    ttft = _buckets(p, "jaxserve:time_to_first_token_seconds")
    assert [v for le, v in ttft if le in (0.01, 0.02, 0.25, 0.5, math.inf)] == [0, 1, 1, 2, 2]
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(ttft))  # cumulative
    for fam in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                "kv_transfer_seconds"):
        assert f"# TYPE jaxserve:{fam} histogram" in text
    assert "# TYPE jaxserve:prompt_tokens_total counter" in text


def test_text_parses_with_prometheus_client_too():
    parser = pytest.importorskip("prometheus_client.parser")
    m = ServerMetrics('we"ird\\name\n')
    m.observe_finished(None, arrival=0.0, first_token=0.1, finish=0.3, num_output_tokens=3, finish_reason="stop")
    fams = {f.name: f for f in parser.text_string_to_metric_families(m.render([_stats("e0", 3, 15, 2, 1)]))}
    assert fams["jaxserve:time_to_first_token_seconds"].type == "histogram"
    usage = [s for s in fams["jaxserve:kv_cache_usage_perc"].samples if s.labels.get("instance") == "e0"]
    assert usage[0].value == pytest.approx(0.2) and usage[0].labels["model_name"] == 'we"ird\\name\n'


def test_transfer_durations_pair_began_with_ended():
    r = _finished_request("x", [(1.0, 1.25), (2.0, 2.5)])
    r.stamp(Event.TRANSFER_BEGAN, 3.0)  # still in flight: not counted
    assert transfer_durations(r) == [0.25, 0.5]


def _stats(name, held, capacity, waiting, running):
    return InstanceStats(name, capacity - held, held, 0, running, waiting)


def test_instance_gauges_from_the_routers_stats():
    one = _stats("colocated-0", 3, 12, 2, 1)
    assert instance_gauges([one]) == [{"name": "colocated-0", "held": 3, "capacity": 12, "running": 1, "waiting": 2}]
    disagg = [_stats("prefill-0", 4, 16, 7, 0), _stats("decode-0", 8, 16, 0, 3)]
    g = instance_gauges(disagg)
    assert [(x["name"], x["waiting"], x["running"]) for x in g] == [("prefill-0", 7, 0), ("decode-0", 0, 3)]
    assert instance_gauges([]) == []

    p = parse_prometheus(ServerMetrics("m").render(disagg, num_in_flight=9))
    lab = (("model_name", "m"),)
    assert p[("jaxserve:num_requests_waiting", lab)] == 7  # the total has no instance label
    assert p[("jaxserve:num_requests_waiting", (("instance", "prefill-0"), *lab))] == 7
    assert p[("jaxserve:num_requests_running", (("instance", "decode-0"), *lab))] == 3
    assert p[("jaxserve:kv_cache_usage_perc", (("instance", "prefill-0"), *lab))] == 0.25
    assert p[("jaxserve:kv_cache_usage_perc", lab)] == pytest.approx(12 / 32)
    assert p[("jaxserve:num_requests_in_flight", lab)] == 9


def test_vllm_request_phase_metrics_from_lifecycle_events():
    """Hand-checked: queue 0.5 s, prefill 0.25 s, tokens at 1.0, 1.5, 2.5 s (gaps 0.5, 1.0; decode 1.5 s),
    one preemption; prompt 7 tokens, 3 generated; an aborted request adds only its preemption."""
    from jaxserve.serving.metrics import buckets_1_2_5

    r = Request("r", [2] * 7)
    r.events.clear()  # (the constructor stamps its own arrival, now)
    for kind, t in ((Event.ARRIVED, 0.0), (Event.PREFILL_BEGAN, 0.5), (Event.PREFILL_ENDED, 0.75),
                    (Event.TOKEN, 1.0), (Event.PREEMPTED, 1.2), (Event.TOKEN, 1.5), (Event.TOKEN, 2.5)):
        r.stamp(kind, t)
    gone = Request("g", [2])
    gone.stamp(Event.PREEMPTED, 0.1)
    m = ServerMetrics("m", max_model_len=100)
    m.observe_finished(r, arrival=0.0, first_token=1.0, finish=2.5, num_output_tokens=3, finish_reason="length")
    m.observe_finished(gone, arrival=0.0, first_token=None, finish=0.2, num_output_tokens=0, finish_reason="abort")
    got = parse_prometheus(m.render())
    lab = (("model_name", "m"),)

    def total(name):
        return got[(f"jaxserve:{name}_sum", lab)], got[(f"jaxserve:{name}_count", lab)]

    assert total("inter_token_latency_seconds") == (1.5, 2)
    assert total("request_queue_time_seconds") == (0.5, 1)
    assert total("request_prefill_time_seconds") == (0.25, 1)
    assert total("request_decode_time_seconds") == (1.5, 1)
    assert total("request_inference_time_seconds") == (1.75, 1)
    assert total("request_prompt_tokens") == (7, 1) and total("request_generation_tokens") == (3, 1)
    assert got[("jaxserve:request_prompt_tokens_bucket", (("le", "5.0"), ("model_name", "m")))] == 0
    assert got[("jaxserve:request_prompt_tokens_bucket", (("le", "10.0"), ("model_name", "m")))] == 1
    assert got[("jaxserve:num_preemptions_total", lab)] == 2
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
