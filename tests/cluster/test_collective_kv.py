"""KV hand-off between Ray actors over JAX collectives (one jax.distributed group; gloo on CPU).

One local Ray (2 CPUs). Each deployment's actors join one group coordinated from the driver (this
pytest process); every hand-off is a jitted ppermute between the prefill and decode processes.
Two deployments:
* prefill tp1 + prefill tp2 + decode tp1: greedy tokens equal HF's through each prefill actor (tp1 ->
  tp1, tp2 -> tp1, 2 prefill + 1 decode); aborts at every stage leave 0 blocks; 0 compiles after
  warm-up; then the decode side waits in a transfer whose source is killed: only that request ends,
  with an error, within 5 s, and the other prefill actor keeps serving exactly.
* prefill tp1 + decode tp2 + decode tp1: tokens equal HF's (tp1 -> tp2, tp1 -> tp1); then the prefill
  side waits in a transfer whose destination is killed: only that request ends, with an error, within
  5 s, the prefill actor frees its blocks and serves on through the surviving decode actor.
"Mid-transfer" is made certain by holding back one end's half of a hand-off (the proxy's call to the
other end is dropped), so the surviving end is inside the collective when its peer dies.
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
from jaxserve.runtime.router import Router, Slot
from tests.cluster.helpers import drained
from tests.model_fixtures import greedy_case

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return greedy_case(tmp_path_factory.mktemp("coll-model"), 7, [5, 17, 40, 130], 10)


def _launch(model_dir, layout: list[tuple[str, int]]) -> Router:
    """``layout``: (role, tp) per instance; a collective group over all of them, warmed up."""
    names, seen, configs = [], {}, []
    for role, tp in layout:
        names.append(f"{role}-{seen.get(role, 0)}")
        seen[role] = seen.get(role, 0) + 1
        configs.append(EngineConfig(mode=role, tp=tp, max_num_seqs=8, max_model_len=256))
    eng = launch_router(model_dir, list(zip(names, configs, strict=True)), options=ActorOptions(num_cpus=0.25),
                        timeout_s=60, transport="collective")
    eng.warmup()
    return eng


def _fresh(prompts, tag: str = "") -> list[Request]:
    return [Request(f"r{tag}{i}", p, SamplingParams(max_tokens=10)) for i, p in enumerate(prompts)]


def _run_until(eng: Router, done, limit_s: float = 60.0) -> None:
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < limit_s, "condition not reached"
        eng.step()


def _only(eng: Router, slot: Slot) -> None:
    """Send the next requests to this prefill slot: the others look busy until their next batch."""
    for s in eng.prefills:
        if s is not slot:
            s.stats = dataclasses.replace(s.stats, queued_tokens=10**9)


def _prefilled_by(reqs) -> set[str]:
    return {e.instance for r in reqs for e in r.events if e.kind == Event.PREFILL_BEGAN}


def _abort_at_every_stage(eng: Router, prompt: list[int]) -> None:
    """Abort while queued, while prefilled and held (pulls held back), just after the pull sent it to
    the decode actor (in transit), and while decoding; every abort ends the request as ABORT."""
    for stage in ("queued", "held", "transit", "decoding"):
        r = Request(f"a-{stage}", prompt, SamplingParams(max_tokens=200, ignore_eos=True))
        real_pull = eng.pull
        if stage in ("held", "transit"):
            eng.pull = lambda: 0  # fold batches, hand nothing off yet
        eng.add_request(r)
        if stage != "queued":
            _run_until(eng, lambda r=r: bool(r.event_times(Event.PREFILL_ENDED)))
        eng.pull = real_pull
        if stage == "transit":
            assert eng.pull() == 1 and r.request_id in eng.transit
        elif stage == "decoding":
            _run_until(eng, lambda r=r: len(r.output_token_ids) >= 2)
        eng.abort_request(r.request_id)
        assert r.finish_reason == FinishReason.ABORT, (stage, r.finish_reason)


def _hold_sends(eng: Router) -> list:
    """Hold back the source's half of the next hand-offs: the decode proxies' send_kv calls to their
    sources are recorded (actor, args), not sent, so the decode actor waits inside the collective.
    ``_restore_sends`` undoes it; a recorded call can be sent later."""
    held: list = []

    class Held:
        def __init__(self, proxy) -> None:
            self.proxy = proxy
            self.actor = type("A", (), {"send_kv": type("M", (), {"remote": staticmethod(
                lambda *a: held.append((proxy.actor, a)))})})()

        def _sent(self, *a) -> None:
            pass

    for s in eng.decodes:
        s.inst.peers = {n: Held(p) for n, p in s.inst.peers.items()}
    return held


def _restore_sends(eng: Router) -> None:
    for s in eng.decodes:
        s.inst.peers = {n: p.proxy for n, p in s.inst.peers.items()}


class _NoImport:
    """An actor handle whose import_kv calls are dropped: the source then waits inside the collective."""

    def __init__(self, actor) -> None:
        self._actor = actor
        self.import_kv = type("M", (), {"remote": staticmethod(lambda *a: ray.put(None))})()

    def __getattr__(self, name):
        return getattr(self._actor, name)


def _send_after_release(eng: Router, src: Slot, prompt: list[int]) -> None:
    """The source lets go of an export (aborted) before its send runs: it still runs every piece of
    the exchange, with a false flag, and the destination takes them all before it fails the fetch, so
    the two ends stay in step. ``prompt`` must span several pieces (130 tokens: 8 + 1 blocks)."""
    held = _hold_sends(eng)
    _only(eng, src)
    r = Request("late-send", prompt, SamplingParams(max_tokens=5))
    eng.add_request(r)
    _run_until(eng, lambda: r.request_id in eng.transit)
    assert len(held) == 1 and len(held[0][1][0].pieces) >= 2
    eng.abort_request(r.request_id)
    time.sleep(0.5)  # the source's loop applies the abort: the export is forgotten
    _restore_sends(eng)
    actor, args = held[0]
    actor.send_kv.remote(*args)


def _errors_within(eng: Router, rid: str, limit_s: float) -> float:
    t0 = time.monotonic()
    while rid not in eng.failures:
        assert time.monotonic() - t0 < limit_s, f"{rid} not failed within {limit_s} s"
        eng.step()
    return time.monotonic() - t0


def test_two_prefill_actors_tp2_and_tp1_into_tp1(cluster, model):
    model_dir, prompts, refs = model
    with _launch(model_dir, [("prefill", 1), ("prefill", 2), ("decode", 1)]) as eng:
        p0, p1 = eng.prefills
        for src in (p0, p1):  # tp1 -> tp1, then tp2 -> tp1
            _only(eng, src)
            reqs = _fresh(prompts, src.name)
            assert [t.token_ids for t in run_requests(eng, reqs)] == refs
            assert _prefilled_by(reqs) == {src.name}
            assert all(Event.TRANSFER_ENDED in [e.kind for e in r.events] for r in reqs)
        _abort_at_every_stage(eng, prompts[3])
        _send_after_release(eng, p0, prompts[3])
        _only(eng, p0)  # the same pair again: its two ends are in step
        assert [t.token_ids for t in run_requests(eng, _fresh(prompts, "in-step"))] == refs
        assert drained(eng) == {"prefill-0": 0, "prefill-1": 0, "decode-0": 0}
        assert eng.compilations_since_warmup == 0
        # the decode actor waits in a transfer from prefill-0; prefill-0 dies
        _hold_sends(eng)
        _only(eng, p0)
        victim = Request("victim", prompts[2], SamplingParams(max_tokens=10))
        eng.add_request(victim)
        _run_until(eng, lambda: victim.request_id in eng.transit)
        time.sleep(0.5)  # the decode actor's fetch is now inside the collective
        ray.kill(p0.inst.actor, no_restart=True)
        assert _errors_within(eng, victim.request_id, 5.0) < 5.0
        assert victim.finish_reason == FinishReason.ERROR
        _restore_sends(eng)  # proxies back to normal; the survivors serve exactly
        reqs = _fresh(prompts, "after")
        assert [t.token_ids for t in run_requests(eng, reqs)] == refs
        assert _prefilled_by(reqs) == {"prefill-1"}
        assert drained(eng) == {"prefill-1": 0, "decode-0": 0}


def test_tp1_into_tp2_and_a_decode_actor_dying_mid_transfer(cluster, model):
    model_dir, prompts, refs = model
    with _launch(model_dir, [("prefill", 1), ("decode", 2), ("decode", 1)]) as eng:
        d0, d1 = eng.decodes
        reqs = _fresh(prompts)
        assert [t.token_ids for t in run_requests(eng, reqs)] == refs
        decoded_on = {e.instance for r in reqs for e in r.events if e.kind == Event.DECODE_BEGAN}
        assert decoded_on <= {"decode-0", "decode-1"} and decoded_on
        assert eng.compilations_since_warmup == 0
        # the prefill actor waits in a transfer to decode-0; decode-0 dies
        real = d0.inst.actor
        d0.inst.actor = _NoImport(real)
        info = d1.inst.info
        d1.inst.info = dataclasses.replace(info, max_num_seqs=0)  # the pull picks decode-0
        victim = Request("victim", prompts[2], SamplingParams(max_tokens=10))
        eng.add_request(victim)
        _run_until(eng, lambda: victim.request_id in eng.transit)
        assert eng.transit[victim.request_id].dst is d0
        time.sleep(0.5)  # the prefill actor's send is now inside the collective
        ray.kill(real, no_restart=True)
        assert _errors_within(eng, victim.request_id, 5.0) < 5.0
        assert victim.finish_reason == FinishReason.ERROR
        # the prefill actor's send thread is free again: new requests go through decode-1, exactly
        d1.inst.info = info
        reqs = _fresh(prompts, "after")
        assert [t.token_ids for t in run_requests(eng, reqs)] == refs
        assert {e.instance for r in reqs for e in r.events if e.kind == Event.DECODE_BEGAN} == {"decode-1"}
        assert drained(eng) == {"prefill-0": 0, "decode-1": 0}
