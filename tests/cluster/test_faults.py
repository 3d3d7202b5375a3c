"""Killing instance actors mid-run (Ray mode): failures are fast, contained, and leak nothing.

One local Ray (2 CPUs). Each test starts its own small deployment of tiny-model actors:
* 1 prefill + 2 decode actors; one decode actor is killed while it decodes and while KV is being
  handed to it: its requests end with ERROR within 5 s, the prefill actor frees what it held for
  it, and new requests are served (HF's exact tokens) by the survivors.
* 2 prefill + 1 decode actors; one prefill actor is killed with prompts queued on it: those end
  with ERROR within 5 s, requests already decoding carry on, new requests go to the survivor.
* the same, killed after it put a request's KV in the object store and before the hand-off: the
  request either still finishes exactly or ends with ERROR; nothing leaks either way.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray

from jaxserve.cluster.actors import ActorOptions
from jaxserve.cluster.ray_instance import launch_router
from jaxserve.config import EngineConfig
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Event, FinishReason, Request, SamplingParams
from jaxserve.runtime.api import NO_TOKEN
from jaxserve.runtime.router import Router
from tests.cluster.helpers import drained
from tests.model_fixtures import greedy_case

pytestmark = pytest.mark.timeout(600)


def _cfg(role: str) -> EngineConfig:
    return EngineConfig(mode=role, max_num_seqs=16, max_model_len=512)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return greedy_case(tmp_path_factory.mktemp("fault-model"), 5, [9, 33, 70, 120], 12)


def _launch(model_dir, roles: list[str]) -> Router:
    names, seen = [], {}
    for r in roles:
        names.append(f"{r}-{seen.get(r, 0)}")
        seen[r] = seen.get(r, 0) + 1
    return launch_router(model_dir, [(n, _cfg(r)) for n, r in zip(names, roles, strict=True)],
                         options=ActorOptions(num_cpus=0.5), timeout_s=60)


def _long(i: int, prompt: list[int]) -> Request:
    return Request(f"long{i}", prompt, SamplingParams(max_tokens=400, ignore_eos=True))


def _run_until(eng: Router, done, limit_s: float = 180.0) -> list:
    outs, t0 = [], time.monotonic()
    while not done():
        if time.monotonic() - t0 > limit_s:  # say where every request is (a CI failure's only clue)
            state = {rid: (getattr(eng.where.get(rid), "name", None), len(r.output_token_ids), r.finish_reason,
                           [e.kind.name for e in r.events][-3:]) for rid, r in eng.requests.items()}
            raise AssertionError(f"condition not reached in {limit_s} s: {state}; failures {eng.failures}")
        outs += eng.step()
    return outs


def _errors_within(eng: Router, ids: set[str], limit_s: float) -> dict:
    """Step until every id in ``ids`` ended with ERROR; asserts it took < limit_s."""
    t0, errors = time.monotonic(), {}
    while not ids <= set(errors):
        assert time.monotonic() - t0 < limit_s, f"not failed within {limit_s} s: {ids - set(errors)}"
        errors.update({o.request_id: o for o in eng.step() if o.finish_reason == FinishReason.ERROR})
    return errors


def test_killing_a_decode_actor(cluster, model):
    model_dir, prompts, refs = model
    with _launch(model_dir, ["prefill", "decode", "decode"]) as eng:
        reqs = [_long(i, prompts[i % 4]) for i in range(6)]
        for r in reqs:
            eng.add_request(r)
        # every request decoding (or, where one actor compiled slowly and another raced ahead, done)
        _run_until(eng, lambda: all(r.finish_reason is not None or (
            eng.where.get(r.request_id) in eng.decodes and len(r.output_token_ids) >= 2) for r in reqs))
        # one more prefilled request is on its way to a decode actor: that one dies
        extra = _long(99, prompts[2])
        eng.add_request(extra)
        _run_until(eng, lambda: extra.request_id in eng.transit)
        dead = eng.transit[extra.request_id].dst
        survivor = next(d for d in eng.decodes if d is not dead)
        doomed = {r.request_id for r in reqs if eng.where.get(r.request_id) is dead} | {extra.request_id}
        t_kill = time.monotonic()
        ray.kill(dead.inst.actor, no_restart=True)
        errors = _errors_within(eng, doomed, 5.0)
        assert time.monotonic() - t_kill < 5.0
        assert all(o.token_id == NO_TOKEN for o in errors.values())
        assert not dead.alive and dead.name in eng.failures[extra.request_id]
        for r in [*reqs, extra]:
            if r.request_id in doomed:
                assert r.finish_reason == FinishReason.ERROR and r.events[-1].kind == Event.ABORTED
            else:  # requests on the survivor carry on (a fast machine may finish them by length meanwhile)
                assert r.request_id not in eng.failures and r.finish_reason in (None, FinishReason.LENGTH)
                assert r.finish_reason is not None or eng.where[r.request_id] is survivor
        # new requests are served exactly, by the survivors
        fresh = [Request(f"new{i}", p_, SamplingParams(max_tokens=12)) for i, p_ in enumerate(prompts)]
        assert [t.token_ids for t in run_requests(eng, fresh)] == refs
        for r in reqs:
            eng.abort_request(r.request_id)
        assert not eng.has_unfinished()
        # the prefill actor freed the KV it held for the dead one; nothing leaks on the survivor
        assert drained(eng) == {"prefill-0": 0, survivor.name: 0}


def test_killing_a_prefill_actor(cluster, model):
    model_dir, prompts, refs = model
    with _launch(model_dir, ["prefill", "prefill", "decode"]) as eng:
        p0, p1 = eng.prefills
        d = eng.decodes[0]
        decoding = _long(0, prompts[0])
        eng.add_request(decoding)
        _run_until(eng, lambda: eng.where.get(decoding.request_id) is d and len(decoding.output_token_ids) >= 2)
        # queue long prompts on p0 only (p1 looks busy to the dispatcher until its next batch)
        p1.stats = dataclasses.replace(p1.stats, queued_tokens=10**9)
        queued = [Request(f"q{i}", prompts[3] * 3, SamplingParams(max_tokens=8)) for i in range(3)]
        for r in queued:
            eng.add_request(r)
        assert all(eng.where[r.request_id] is p0 for r in queued)
        t_kill = time.monotonic()
        ray.kill(p0.inst.actor, no_restart=True)
        _errors_within(eng, {r.request_id for r in queued}, 5.0)
        assert time.monotonic() - t_kill < 5.0 and not p0.alive
        assert all(r.finish_reason == FinishReason.ERROR for r in queued)
        # the request already decoding is untouched; new ones go to the surviving prefill actor
        fresh = [Request(f"new{i}", p_, SamplingParams(max_tokens=12)) for i, p_ in enumerate(prompts)]
        assert [t.token_ids for t in run_requests(eng, fresh)] == refs
        assert all(r.events[1].instance == "prefill-1" for r in fresh)
        # (a fast machine may finish its 400 tokens meanwhile: then it ended by length, not by error)
        assert decoding.finish_reason in (None, FinishReason.LENGTH) and eng.failures.get(decoding.request_id) is None
        assert len(decoding.output_token_ids) == 400 if decoding.finish_reason else len(decoding.output_token_ids) > 2
        assert Event.ABORTED not in [e.kind for e in decoding.events]
        eng.abort_request(decoding.request_id)
        assert drained(eng) == {"prefill-1": 0, "decode-0": 0}


def test_prefill_actor_dying_with_its_kv_in_the_object_store(cluster, model):
    """Killed right after its step put the KV in the object store, before the hand-off: the hand-off
    either still lands (the object may already be on the decode side; which happens is Ray's race)
    and the request finishes with HF's tokens, or it fails and the request ends with ERROR. Either
    way nothing leaks and the survivors serve."""
    model_dir, prompts, refs = model
    with _launch(model_dir, ["prefill", "prefill", "decode"]) as eng:
        p0, p1 = eng.prefills
        p1.stats = dataclasses.replace(p1.stats, queued_tokens=10**9)  # the request goes to p0
        req = Request("orphan", prompts[2], SamplingParams(max_tokens=12))
        real_pull, eng.pull = eng.pull, lambda: 0  # step and fold, but do not hand off yet
        eng.add_request(req)
        assert eng.where[req.request_id] is p0
        _run_until(eng, lambda: bool(p0.ready))
        assert [r for r, _ in p0.ready] == [req.request_id]  # its KV is in the object store, owned by p0
        ray.kill(p0.inst.actor, no_restart=True)
        eng.pull = real_pull
        _run_until(eng, lambda: req.finish_reason is not None, limit_s=30.0)
        if req.finish_reason == FinishReason.ERROR:
            assert req.request_id in eng.failures
        else:
            assert req.output_token_ids == refs[2]
        assert drained(eng) == {"prefill-1": 0, "decode-0": 0}
        fresh = [Request(f"new{i}", p_, SamplingParams(max_tokens=12)) for i, p_ in enumerate(prompts)]
        assert [t.token_ids for t in run_requests(eng, fresh)] == refs
