"""The orchestrator: async streams over an engine thread, with a hand-checkable test double and the real engine."""

import asyncio

import jax
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.build import build_local
from jaxserve.request import FinishReason, Request, SamplingParams
from jaxserve.serving.orchestrator import Orchestrator, QueueFull
from tests.serving.doubles import CountingEngine


async def _collect(orch, req):
    out = []
    async for d in orch.generate(req):
        out.append(d)
    return out


def _req(i, n=5, prompt=(2, 7)):
    return Request(f"r{i}", list(prompt), SamplingParams(max_tokens=n))


@pytest.fixture
def counting():
    eng = CountingEngine()
    orch = Orchestrator(eng, max_queue=8)
    orch.start()
    yield eng, orch
    orch.stop()
    eng.shutdown()


def test_streams_in_order_concurrently(counting):
    _, orch = counting

    async def main():
        return await asyncio.gather(*[_collect(orch, _req(i, n=3 + i)) for i in range(8)])

    results = asyncio.run(main())
    for i, deltas in enumerate(results):
        assert [t for d in deltas for t in d.token_ids] == list(range(100, 103 + i))
        assert [d.finish_reason for d in deltas][-1] == FinishReason.LENGTH
        assert all(d.finish_reason is None for d in deltas[:-1])
    assert orch.num_in_flight == 0 and orch.finished["length"] == 8


def test_bad_request_and_queue_full(counting):
    eng, orch = counting

    async def main():
        bad = await _collect(orch, _req(0, prompt=(666,)))  # refused by the instance: ends with an error
        assert bad[-1].finish_reason == FinishReason.ERROR and not bad[-1].token_ids
        with pytest.raises(ValueError, match="outside the vocabulary"):  # refused before dispatch
            await _collect(orch, _req(0, prompt=(5000,)))
        gens = [orch.generate(_req(i, n=10_000)) for i in range(1, 9)]
        firsts = [await g.__anext__() for g in gens]  # 8 in flight = the limit
        assert all(f.token_ids for f in firsts)
        with pytest.raises(QueueFull):
            await _collect(orch, _req(99))
        for g in gens:
            await g.aclose()

    asyncio.run(main())
    assert "r0" not in eng.reqs


def test_consumer_that_leaves_aborts_its_request(counting):
    eng, orch = counting

    async def main():
        g = orch.generate(_req(1, n=10_000))
        async for d in g:
            if d.token_ids[0] >= 103:
                break
        await g.aclose()
        for _ in range(200):  # the abort reaches the engine thread promptly
            if "r1" in eng.aborted:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert eng.aborted == ["r1"] and not eng.reqs and orch.num_in_flight == 0


def test_engine_failure_ends_requests_with_error():
    eng = CountingEngine(fail_at_step=2)
    orch = Orchestrator(eng)
    orch.start()
    try:
        deltas = asyncio.run(_collect(orch, _req(1, n=10)))
        assert deltas[-1].finish_reason == FinishReason.ERROR and orch.finished["error"] == 1
        assert [t for d in deltas for t in d.token_ids] == [100]
        again = asyncio.run(_collect(orch, _req(2, n=3)))  # the loop carries on
        assert [t for d in again for t in d.token_ids] == [100, 101, 102]
    finally:
        orch.stop()


def test_real_disaggregated_engine_streams_and_frees_on_disconnect(tiny, workload):
    _, _, cfg, params, tok = tiny
    prompts, max_tokens, refs = workload
    eng = build_local(cfg, params, [("prefill", EngineConfig(mode="prefill", max_model_len=512)),
                                    ("decode", EngineConfig(mode="decode", max_model_len=512, max_num_seqs=16))],
                      jax.devices())
    orch = Orchestrator(eng, tok)
    orch.start()
    picks = [1, 4, 9, 13, 20, 30]

    async def main():
        full = [Request(f"f{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i])) for i in picks]
        leavers = [Request(f"l{i}", prompts[i], SamplingParams(max_tokens=200, ignore_eos=True)) for i in range(10)]

        async def leave_after(req, n):
            got = 0
            async for _ in orch.generate(req):
                got += 1
                if got == n:
                    break

        res = await asyncio.gather(*[_collect(orch, r) for r in full],
                                   *[leave_after(r, 1 + i % 3) for i, r in enumerate(leavers)])
        return res[: len(full)]

    try:
        results = asyncio.run(main())
        for i, deltas in zip(picks, results, strict=True):
            assert [t for d in deltas for t in d.token_ids] == refs[i]
        for _ in range(300):
            if not eng.has_unfinished() and all(v == 0 for v in eng.held_blocks().values()):
                break
            asyncio.run(asyncio.sleep(0.01))
        assert all(v == 0 for v in eng.held_blocks().values()), eng.held_blocks()
        assert not eng.has_unfinished()
    finally:
        orch.stop()
