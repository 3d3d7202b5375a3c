"""Disaggregated prefill/decode through Ray actors on CPU: exact tokens, true Request records, no leaks, failures.

One local Ray (2 CPUs) per module. One prefill actor + one decode actor serve the tiny HF OPT folder
for the token, seed and abort tests; a second pair (decode pages in blocks of 8, so transfers are
re-paged) serves the failure test, which kills its decode actor. The KV of each request goes
prefill actor -> object store -> decode actor as numpy.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from transformers import OPTForCausalLM

from jaxserve.cluster.actors import ActorOptions, start_instance
from jaxserve.cluster.ray_instance import connect, estimate_clock_offset, launch_router
from jaxserve.compile_cache import resolve_cache_dir
from jaxserve.config import EngineConfig
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Event, FinishReason, Request, SamplingParams
from jaxserve.runtime.api import NO_TOKEN
from jaxserve.runtime.router import ClusterError, Router
from tests.model_fixtures import hf_greedy, make_hf_opt
from tests.runtime.interference import DECODE_S, PREFILL_S, decode_gaps_during_burst

LENS = [1, 2, 16, 17, 60, 130, 299, 300]


def _cfg(role: str, **kw) -> EngineConfig:
    return EngineConfig(**{"mode": role, "max_num_seqs": 16, "max_model_len": 512, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d, _ = make_hf_opt(tmp_path_factory.mktemp("ray-model"), "pre_ln")
    return d


@pytest.fixture(scope="module")
def actors(cluster, model_dir):
    """Two prefill/decode pairs, started at once so their model loads overlap the HF reference run; half
    a CPU each so all four fit on the 2-CPU cluster. The second pair is the failure test's to kill."""
    opts = ActorOptions(num_cpus=0.5)
    configs = [_cfg("prefill"), _cfg("decode"), _cfg("prefill"),
               _cfg("decode", block_size=8)]  # the second pair re-pages KV from blocks of 16 to 8
    names = ["prefill-0", "decode-0", "prefill-1", "decode-1"]
    handles = [start_instance(model_dir, c, n, options=opts) for n, c in zip(names, configs, strict=True)]
    yield handles
    for h in handles:
        ray.kill(h)


@pytest.fixture(scope="module")
def model(model_dir):
    """The tiny HF folder, 8 prompts, and HF's greedy output for each alone."""
    hf = OPTForCausalLM.from_pretrained(model_dir).eval()
    rng = np.random.default_rng(11)
    prompts = [[2, *rng.integers(3, hf.config.vocab_size, n - 1).tolist()] for n in LENS]
    max_tokens = [1, *rng.integers(2, 40, len(LENS) - 1).tolist()]
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    return model_dir, prompts, max_tokens, refs


@pytest.fixture(scope="module")
def engine(actors, model):
    eng = Router(connect(actors[:2], timeout_s=120))
    yield eng
    eng.shutdown()


def test_two_actors_equal_hf_tokens(engine, model):
    _, prompts, max_tokens, refs = model
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=m)) for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    trackers = run_requests(engine, reqs)
    for i, t in enumerate(trackers):
        assert t.token_ids == refs[i], f"request {i} (prompt of {LENS[i]} tokens)"
    assert engine.num_transfers == sum(len(r) > 1 and r[0] != 2 for r in refs)
    assert engine.transfer_bytes > 0
    held = engine.held_blocks()
    assert set(held) == {"prefill-0", "decode-0"} and all(v == 0 for v in held.values()), held
    assert not engine.has_unfinished() and not engine.where and not engine.requests
    for r, ref in zip(reqs, refs, strict=True):
        # the driver's Request objects were kept true by the actors' replies
        assert r.output_token_ids == ref and r.finished and r.sampling.seed is not None
        kinds = [e.kind for e in r.events]
        assert [e.time for e in r.events] == sorted(e.time for e in r.events), kinds
        assert kinds[:5] == [Event.ARRIVED, Event.PREFILL_QUEUED, Event.PREFILL_BEGAN, Event.PREFILL_ENDED,
                             Event.TOKEN]
        assert kinds[-1] == Event.FINISHED and kinds.count(Event.TOKEN) == len(ref)
        assert r.events[1].instance == "prefill-0"
        if len(ref) > 1:
            i = kinds.index(Event.TRANSFER_BEGAN)
            assert kinds[i:i + 4] == [Event.TRANSFER_BEGAN, Event.TRANSFER_ENDED, Event.DECODE_QUEUED,
                                      Event.DECODE_BEGAN]
            assert r.events[i].instance == "prefill-0->decode-0" and r.events[-1].instance == "decode-0"
    # one host, one CLOCK_MONOTONIC: no offset applied, and the estimator's bound holds on a real actor
    assert all(i.clock_offset == 0.0 for i in engine.instances)
    offset, err = estimate_clock_offset(lambda: ray.get(engine.decodes[0].inst.actor.clock.remote(), timeout=30))
    assert abs(offset) <= err + 1e-6 and err < 1.0


def test_actors_compile_into_the_drivers_compilation_cache(engine):
    """Each actor was given the driver's resolved cache directory (this test session's) before it compiled."""
    def cache_dir(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: __import__("jax").config.jax_compilation_cache_dir),
                       timeout=30)
    want = str(resolve_cache_dir(None))
    assert want == os.environ["JAXSERVE_COMPILATION_CACHE"]
    assert [cache_dir(s.inst.actor) for s in (*engine.prefills, *engine.decodes)] == [want, want]


def test_sampled_request_carries_its_seed(engine, model):
    _, prompts, _, _ = model
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, ignore_eos=True)
    a = Request("s-a", prompts[4], sp)
    engine.add_request(a)
    assert a.sampling.seed is not None  # fixed by the driver, so both sides sample alike
    b = Request("s-b", prompts[4], a.sampling)  # same seed: the same tokens, whichever instance samples
    engine.add_request(b)
    while engine.has_unfinished():
        engine.step()
    assert len(a.output_token_ids) == 12 and b.output_token_ids == a.output_token_ids


def _step_until(eng, cond, limit_s=120.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit_s, "condition not reached"
        eng.step()


def test_abort_anywhere_frees_blocks(engine, model):
    """Abort while queued, while held for transfer, mid hand-off and mid decode: every block comes back."""
    _, prompts, _, _ = model
    reqs = [Request(f"a{i}", prompts[i], SamplingParams(max_tokens=200, ignore_eos=True)) for i in range(2, 8)]
    for r in reqs:
        engine.add_request(r)
    p, d = engine.prefills[0], engine.decodes[0]
    assert engine.abort_request("a7")  # queued on the prefill actor
    real_pull, engine.pull = engine.pull, lambda: 0  # hold the hand-offs back: KV waits on the prefill side
    _step_until(engine, lambda: len(p.ready) >= 2)
    held = p.ready[-1][0]
    assert engine.abort_request(held)  # KV held on the prefill side for transfer
    engine.pull = real_pull
    assert engine.pull() >= 1 and engine.transit
    in_flight = next(iter(engine.transit))
    assert engine.abort_request(in_flight)  # mid hand-off: the import may land, then it is freed there
    _step_until(engine, lambda: any(s is d for s in engine.where.values()))
    decoding = next(rid for rid, s in engine.where.items() if s is d)
    _step_until(engine, lambda: len(engine.requests[decoding].output_token_ids) >= 2)
    assert engine.abort_request(decoding)  # mid-decode
    for r in reqs:
        engine.abort_request(r.request_id)
    assert not engine.has_unfinished()
    assert all(v == 0 for v in engine.held_blocks().values()), engine.held_blocks()
    for r in reqs:
        assert r.finish_reason == FinishReason.ABORT and r.events[-1].kind == Event.ABORTED, r.request_id
    assert len(reqs[-1].output_token_ids) == 0
    assert len(next(r for r in reqs if r.request_id == decoding).output_token_ids) >= 2


def test_dead_decode_actor_fails_its_requests(actors, model):
    _, prompts, max_tokens, refs = model
    with Router(connect(actors[2:4], timeout_s=60, own_actors=True)) as eng:
        ok = [Request(f"ok{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i])) for i in range(1, 4)]
        assert [t.token_ids for t in run_requests(eng, ok)] == refs[1:4]  # block size 16 -> 8
        # long enough that none can finish before all three are decoding, however loaded the machine
        reqs = [Request(f"x{i}", prompts[i], SamplingParams(max_tokens=400, ignore_eos=True)) for i in (1, 2, 3)]
        for r in reqs:
            eng.add_request(r)
        dec = eng.decodes[0]
        _step_until(eng, lambda: all(eng.where.get(r.request_id) is dec for r in reqs))
        ray.kill(dec.inst.actor, no_restart=True)
        t0, outs = time.monotonic(), []
        while eng.has_unfinished():
            outs += eng.step()
        assert time.monotonic() - t0 < 5.0
        errors = {o.request_id: o for o in outs if o.finish_reason == FinishReason.ERROR}
        assert set(errors) == {r.request_id for r in reqs} and all(o.token_id == NO_TOKEN for o in errors.values())
        for r in reqs:
            assert r.finish_reason == FinishReason.ERROR and r.events[-1].kind == Event.ABORTED
            assert "decode-1" in eng.failures[r.request_id]
        assert not dec.alive and eng.held_blocks() == {"prefill-1": 0}
        with pytest.raises(ClusterError, match="no live decode instance"):
            eng.add_request(Request("late", prompts[1]))


def test_an_actor_that_stops_answering_is_failed(cluster, model_dir):
    """A poll past its deadline fails the instance like a death (every call has a deadline)."""
    actor = start_instance(None, _cfg("colocated"), "colocated-0", options=ActorOptions(num_cpus=0),
                           fake={"decode_s": 0.01})
    (proxy,) = connect([actor], timeout_s=0.5, own_actors=True)
    proxy.poll_wait_s = 0.05
    with Router([proxy]) as eng:
        r = Request("slow", [2], SamplingParams(max_tokens=10_000))
        eng.add_request(r)
        _step_until(eng, lambda: len(r.output_token_ids) >= 3, 30)
        # the poll thread gets stuck (behind a call in its group): the actor is alive but silent
        actor.__ray_call__.options(concurrency_group="poll").remote(lambda self: time.sleep(600))
        _step_until(eng, lambda: r.finished, 10)
        assert r.finish_reason == FinishReason.ERROR and "no reply within" in eng.failures["slow"]


def test_decode_actor_never_waits_for_a_prefill_step(cluster):
    """The interference scenario with Ray actors: decode inter-token gaps stay under 50 ms while
    400 ms prefill steps run."""
    fake = [{"prefill_s": PREFILL_S, "max_running": 1}, {"decode_s": DECODE_S}]
    with launch_router(None, [("prefill-0", _cfg("prefill")), ("decode-0", _cfg("decode"))],
                       options=ActorOptions(num_cpus=0), fake=fake) as router:
        assert router.warmup(progress=True) == 0  # a fake core has nothing to compile
        gaps, burst, _, span = decode_gaps_during_burst(router, n_decoding=1)
    assert span >= 4 * PREFILL_S * 0.95
    assert len(gaps) > 25 and max(gaps) < 0.05, (len(gaps), max(gaps))
    assert [r.output_token_ids for r in burst] == [[100, 101, 102]] * 4


def test_actors_with_other_layouts_equal_hf(cluster, model):
    """tp2 prefill actor -> tp1 pp2 decode actor: heads and layers re-split through the object store."""
    model_dir, prompts, max_tokens, refs = model
    configs = [("prefill-0", _cfg("prefill", tp=2)), ("decode-0", _cfg("decode", pp=2))]
    with launch_router(model_dir, configs, options=ActorOptions(num_cpus=0), timeout_s=120) as eng:
        reqs = [Request(f"l{i}", p, SamplingParams(max_tokens=m))
                for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
        assert [t.token_ids for t in run_requests(eng, reqs)] == refs
        assert eng.num_transfers == sum(len(r) > 1 and r[0] != 2 for r in refs)
        assert eng.held_blocks() == {"prefill-0": 0, "decode-0": 0}


def test_colocated_replicas_share_requests_and_equal_hf(cluster, model):
    """Two colocated replicas behind one Router: requests spread over both, HF's tokens, no leaks."""
    model_dir, prompts, max_tokens, refs = model
    opts = ActorOptions(num_cpus=0)  # the module's four actors hold the cluster's CPUs
    handles = [start_instance(model_dir, _cfg("colocated"), f"colocated-{i}", options=opts) for i in range(2)]
    with Router(connect(handles, timeout_s=120, own_actors=True)) as eng:
        reqs = [Request(f"c{i}", p, SamplingParams(max_tokens=m))
                for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
        assert [t.token_ids for t in run_requests(eng, reqs)] == refs
        assert {r.events[1].instance for r in reqs} == {"colocated-0", "colocated-1"}
        assert eng.num_transfers == 0 and not eng.has_unfinished()
        assert eng.held_blocks() == {"colocated-0": 0, "colocated-1": 0}


def test_staged_kv_imports_into_a_single_process_instance(cluster, tiny):
    """A KV hand-off in per-segment parts (from a pipeline spanning processes) into an instance that
    holds every layer: the parts are fetched from the object store and joined in layer order."""
    import jax

    from jaxserve.cluster.actors import ObjectStoreTransport
    from jaxserve.cluster.stages import StagedKV
    from jaxserve.engine.executor import ModelExecutor
    from jaxserve.engine.kv_transfer import HostTransport, KVPayload

    _, _, cfg, params, _ = tiny
    src = ModelExecutor(cfg, params, jax.devices()[:1])
    dst = ModelExecutor(cfg, params, jax.devices()[1:2])
    src.init_kv(8, 4)
    dst.init_kv(8, 4)
    rng = np.random.default_rng(0)
    pages = [tuple(rng.normal(size=(2, 4, cfg.num_attention_heads, cfg.head_dim)).astype(np.float32)
                   for _ in range(2)) for _ in range(cfg.num_hidden_layers)]
    src.scatter_blocks([1, 2], pages)
    whole = HostTransport().export_kv(src, [1, 2], 7)
    cut = cfg.num_hidden_layers // 2
    spans = [(0, cut), (cut, cfg.num_hidden_layers)]
    parts = tuple((a, b, ray.put(KVPayload(7, 4, whole.layers[a:b]))) for a, b in spans)
    ObjectStoreTransport().import_kv(dst, [5, 3], StagedKV(7, 4, parts))
    for (k, v), (k2, v2) in zip(dst.gather_blocks([5, 3]), pages, strict=True):
        np.testing.assert_array_equal(np.asarray(k), k2)
        np.testing.assert_array_equal(np.asarray(v), v2)
