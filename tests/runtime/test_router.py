"""The router over free-running instances, with test-double cores (hand-checkable tokens, settable step times)."""

import dataclasses
import time

import pytest

from jaxserve.engine.frontend import run_requests
from jaxserve.request import Event, FinishReason, Request, SamplingParams
from jaxserve.runtime.api import NO_TOKEN
from jaxserve.runtime.fake import FakeCore
from jaxserve.runtime.instance import LocalInstance
from jaxserve.runtime.router import ClusterError, Router
from tests.runtime.interference import DECODE_S, PREFILL_S, decode_gaps_during_burst


def _router(*cores, **kw):
    return Router([LocalInstance(c) for c in cores], **kw)


def test_decode_never_waits_for_a_prefill_step():
    """Prefill steps of 400 ms, decode steps of 10 ms: while a burst of prompts is prefilled, every decode
    inter-token gap stays under 50 ms (a lock-step runtime makes each gap a whole prefill step)."""
    with _router(FakeCore("prefill-0", "prefill", prefill_s=PREFILL_S, max_running=1),
                 FakeCore("decode-0", "decode", decode_s=DECODE_S)) as router:
        gaps, burst, _, span = decode_gaps_during_burst(router)
    assert span >= 4 * PREFILL_S * 0.95  # four prefill steps, one prompt each
    assert len(gaps) > 50 and max(gaps) < 0.05, (len(gaps), max(gaps))
    assert [r.output_token_ids for r in burst] == [[100, 101, 102]] * 4


def test_tokens_events_and_dispatch_over_two_prefill_instances():
    with _router(FakeCore("prefill-0", "prefill"), FakeCore("prefill-1", "prefill"),
                 FakeCore("decode-0", "decode")) as router:
        reqs = [Request(f"r{i}", [2] * (i + 1), SamplingParams(max_tokens=1 + i % 5)) for i in range(12)]
        trackers = run_requests(router, reqs)
        assert [t.token_ids for t in trackers] == [list(range(100, 101 + i % 5)) for i in range(12)]
        assert {r.events[1].instance for r in reqs} == {"prefill-0", "prefill-1"}
        assert router.num_transfers == sum(1 + i % 5 > 1 for i in range(12))
        for r in reqs:
            kinds = [e.kind for e in r.events]
            assert kinds[:2] == [Event.ARRIVED, Event.PREFILL_QUEUED] and kinds[-1] == Event.FINISHED
            assert [e.time for e in r.events] == sorted(e.time for e in r.events)
            if len(r.output_token_ids) > 1:
                i = kinds.index(Event.TRANSFER_BEGAN)
                assert kinds[i:i + 4] == [Event.TRANSFER_BEGAN, Event.TRANSFER_ENDED, Event.DECODE_QUEUED,
                                          Event.DECODE_BEGAN]
        assert not router.has_unfinished() and not router.where and not router.transit
        assert router.held_blocks() == {"prefill-0": 0, "prefill-1": 0, "decode-0": 0}


def test_colocated_replicas_share_the_requests():
    with _router(FakeCore("colocated-0"), FakeCore("colocated-1")) as router:
        reqs = [Request(f"c{i}", [2, 3], SamplingParams(max_tokens=4)) for i in range(8)]
        assert [t.token_ids for t in run_requests(router, reqs)] == [[100, 101, 102, 103]] * 8
        assert {r.events[1].instance for r in reqs} == {"colocated-0", "colocated-1"}


def test_pull_prefers_a_decode_instance_on_the_sources_node():
    """Two nodes, a prefill and a decode instance on each: KV stays on its node even when the other
    node's decode instance has more free blocks (a low node-affinity plan's intra-node hand-off)."""
    cores = [FakeCore("prefill-a", "prefill", node_id="a"), FakeCore("prefill-b", "prefill", node_id="b"),
             FakeCore("decode-a", "decode", node_id="a", capacity=256), FakeCore("decode-b", "decode", node_id="b")]
    with _router(*cores) as router:
        reqs = [Request(f"n{i}", [2] * (3 + i), SamplingParams(max_tokens=4)) for i in range(12)]
        assert [t.token_ids for t in run_requests(router, reqs)] == [[100, 101, 102, 103]] * 12
        hops = {e.instance for r in reqs for e in r.events if e.kind == Event.TRANSFER_BEGAN}
        assert hops == {"prefill-a->decode-a", "prefill-b->decode-b"}


def test_pull_waits_for_room_and_keeps_fcfs():
    """A decode instance with room for 2: the rest wait on the prefill side, in order, and all finish."""
    with _router(FakeCore("prefill-0", "prefill"), FakeCore("decode-0", "decode", max_running=2)) as router:
        reqs = [Request(f"q{i}", [2, 3], SamplingParams(max_tokens=6)) for i in range(6)]
        assert [t.token_ids for t in run_requests(router, reqs)] == [list(range(100, 106))] * 6
        began = sorted(reqs, key=lambda r: r.event_times(Event.DECODE_BEGAN)[0])
        assert [r.request_id for r in began[:2]] == ["q0", "q1"] or set(r.request_id for r in began[:2]) <= {
            "q0", "q1", "q2"}


def test_abort_anywhere_frees_everything():
    pre = FakeCore("prefill-0", "prefill", prefill_s=0.05, max_running=1)
    dec = FakeCore("decode-0", "decode", decode_s=0.01, max_running=1)
    with _router(pre, dec) as router:
        reqs = [Request(f"a{i}", [2, 3], SamplingParams(max_tokens=10_000)) for i in range(4)]
        for r in reqs:
            router.add_request(r)
        t0 = time.monotonic()
        while not (router.transit or any(s is router.decodes[0] for s in router.where.values())) \
                or not router.prefills[0].ready:
            assert time.monotonic() - t0 < 10
            router.step()
        held = router.prefills[0].ready[-1][0]
        for rid in [held, *[r.request_id for r in reqs if r.request_id != held]]:
            assert router.abort_request(rid)
        assert not router.abort_request("a0") and not router.has_unfinished()
        assert router.held_blocks() == {"prefill-0": 0, "decode-0": 0}
        assert all(r.finish_reason == FinishReason.ABORT and r.events[-1].kind == Event.ABORTED for r in reqs)
        assert sorted(set(pre.aborted) | set(dec.aborted)) <= [r.request_id for r in reqs]


def test_a_failing_step_ends_only_that_instances_requests():
    with _router(FakeCore("colocated-0", fail_at_step=2, decode_s=0.01)) as router:
        r = Request("x", [2], SamplingParams(max_tokens=10))
        t = run_requests(router, [r])[0]
        assert t.finish_reason == FinishReason.ERROR and r.finish_reason == FinishReason.ERROR
        assert "step raised RuntimeError: boom" in router.failures["x"]
        again = Request("y", [2], SamplingParams(max_tokens=3))  # the instance carries on
        assert run_requests(router, [again])[0].token_ids == [100, 101, 102]


def test_a_lost_instance_is_failed_and_routed_around():
    """A core that can never step again (InstanceLost: a stage process died): its requests end with an
    error, the instance is reported failed, and later requests go to the other instance."""
    with _router(FakeCore("colocated-0", lost_at_step=2, decode_s=0.01), FakeCore("colocated-1", decode_s=0.01)) as router:
        router.slots[1].stats = dataclasses.replace(router.slots[1].stats, queued_tokens=10**9)
        r = Request("x", [2], SamplingParams(max_tokens=10))
        assert run_requests(router, [r])[0].finish_reason == FinishReason.ERROR
        t0 = time.monotonic()
        while router.slots[0].alive:
            assert time.monotonic() - t0 < 5
            router.step()
        assert "a stage process died" in router.slots[0].error
        again = Request("y", [2], SamplingParams(max_tokens=3))
        assert run_requests(router, [again])[0].token_ids == [100, 101, 102]
        assert router.where == {} and [s.name for s in router.live()] == ["colocated-1"]


def test_bad_requests_are_refused_before_dispatch():
    with _router(FakeCore("prefill-0", "prefill"), FakeCore("decode-0", "decode")) as router:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            router.add_request(Request("v", [5000]))
        with pytest.raises(ValueError, match="prompt has 1000 tokens"):
            router.add_request(Request("long", [2] * 1000))
        router.add_request(Request("ok", [2]))
        with pytest.raises(ValueError, match="duplicate request id"):
            router.add_request(Request("ok", [2]))
        router.add_request(Request("bad", [666]))  # refused by the instance itself: ends with ERROR
        outs = []
        while router.has_unfinished():
            outs += router.step()
        assert any(o.request_id == "bad" and o.token_id == NO_TOKEN and o.finish_reason == FinishReason.ERROR
                   for o in outs)


def test_a_dead_instance_fails_its_requests_and_survivors_serve():
    with _router(FakeCore("prefill-0", "prefill"), FakeCore("decode-0", "decode", decode_s=0.01),
                 FakeCore("decode-1", "decode", decode_s=0.01)) as router:
        reqs = [Request(f"k{i}", [2], SamplingParams(max_tokens=10_000)) for i in range(4)]
        for r in reqs:
            router.add_request(r)
        while sum(s in router.decodes for s in router.where.values()) < 4:
            router.step()
        dead = router.decodes[0]
        doomed = {rid for rid, s in router.where.items() if s is dead}
        router._fold(dead, type(dead.inst.outputs())([], error="decode-0: gone"))
        assert not dead.alive and doomed and all(router.failures[rid].startswith("decode-0") for rid in doomed)
        fresh = run_requests(router, [Request("new", [2], SamplingParams(max_tokens=3))])
        assert fresh[0].token_ids == [100, 101, 102]
        for r in reqs:
            router.abort_request(r.request_id)
        with pytest.raises(ClusterError, match="no live decode"):
            router._fail_instance(router.decodes[1], "decode-1: gone")
            router.add_request(Request("late", [2]))
