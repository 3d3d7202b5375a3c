"""Overload at 3x the admission limit against the real tiny engine (issue 7, reliability).

The server admits at most ``max_queue`` requests at a time (8 here, while the engine runs 4
sequences per instance). 24 streaming requests arrive together: the excess get a quick 503
``queue_full`` with ``Retry-After`` (each within a second), every admitted one streams to its
full length with status 200, the orchestrator never holds more than ``max_queue`` requests
(sampled throughout), and afterwards nothing is in flight, the engine is idle, every instance
holds zero KV blocks and a second wave is served again.
"""

from __future__ import annotations

import asyncio
import time

from tests.serving.test_api_server import MODEL, assert_drained, read_sse, serve
from tests.serving.test_metrics import parse_prometheus

MAX_QUEUE = 8
LOAD = 3 * MAX_QUEUE
MAX_TOKENS = 40
REJECT_WITHIN_S = 1.0


def test_overload_excess_gets_fast_503_admitted_finish_and_nothing_leaks(real):
    eng, tok, _, cfg = real

    async def fn(client, _eng, orch):
        peak = 0
        sampling = True

        async def sample():
            nonlocal peak
            while sampling:
                peak = max(peak, orch.num_in_flight)
                await asyncio.sleep(0.002)

        async def one(i):
            route = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if i % 2:
                body["messages"] = [{"role": "user", "content": f"request {i}"}]
            else:
                body["prompt"] = [2, *range(30 + i, 38 + i)]
            t0 = time.perf_counter()
            resp = await client.post(route, json=body)
            if resp.status != 200:
                err = await resp.json()
                return resp.status, time.perf_counter() - t0, err, dict(resp.headers)
            events = await read_sse(resp)
            return resp.status, time.perf_counter() - t0, events, dict(resp.headers)

        async def wave():
            return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(LOAD)]), 120)

        sampler = asyncio.create_task(sample())
        results = await wave()
        ok = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        assert len(ok) + len(busy) == LOAD, [r[0] for r in results]
        assert len(ok) >= MAX_QUEUE and len(busy) >= MAX_QUEUE, (len(ok), len(busy))
        for _, took, err, headers in busy:
            assert err["error"]["code"] == "queue_full" and err["error"]["type"] == "server_error", err
            assert f"(limit {MAX_QUEUE})" in err["error"]["message"], err
            assert headers["Retry-After"] == "1"
            assert took < REJECT_WITHIN_S, took
        for _, _, events, _ in ok:
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
            assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS, events[-2]
            assert events[-3]["choices"][0]["finish_reason"] == "length"

        await assert_drained(orch, eng)
        assert orch.finished == {"length": len(ok)}, orch.finished

        # it recovers: a second wave is served the same way
        results2 = await wave()
        sampling = False
        await sampler
        ok2 = [r for r in results2 if r[0] == 200]
        assert len(ok2) >= MAX_QUEUE and all(r[0] in (200, 503) for r in results2)
        assert all(r[2][-2]["usage"]["completion_tokens"] == MAX_TOKENS for r in ok2)
        assert peak == MAX_QUEUE  # bounded: never more than max_queue requests held (and the limit was reached)

        await assert_drained(orch, eng)
        m = parse_prometheus(await (await client.get("/metrics")).text())
        lab = (("model_name", MODEL),)
        assert m[("jaxserve:request_rejected_total", (*lab, ("reason", "queue_full")))] == 2 * LOAD - len(ok) - len(ok2)
        assert m[("jaxserve:request_success_total", (("finished_reason", "length"), *lab))] == len(ok) + len(ok2)
        return len(ok), len(ok2)

    admitted = serve(fn, engine=eng, tokenizer=tok, max_model_len=eng.max_model_len, vocab_size=cfg.vocab_size,
                     max_queue=MAX_QUEUE)
    print(f"overload: admitted {admitted} of {LOAD} per wave")
