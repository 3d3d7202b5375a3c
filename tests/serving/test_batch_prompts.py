"""A list of prompts in one completions request (issue 16): a choice per prompt, in order, usage summed;
streamed chunks carry their prompt's index; a bad prompt names itself; a client that leaves aborts all."""

from __future__ import annotations

import asyncio

from tests.serving.doubles import CountingEngine
from tests.serving.test_api_server import assert_drained, post, read_sse, serve


def test_batch_of_prompts_non_streaming_and_streaming():
    async def fn(client, eng, orch):
        body = {"prompt": ["a", "bc", [2, 5]], "max_tokens": 3}
        st, r = await post(client, "/v1/completions", body)
        assert st == 200, r
        assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == [
            (0, "def", "length"), (1, "def", "length"), (2, "def", "length")]
        assert r["usage"] == {"prompt_tokens": 2 + 3 + 2, "completion_tokens": 9, "total_tokens": 16}
        assert [q.prompt_token_ids for q in eng.added[-3:]] == [[2, 97], [2, 98, 99], [2, 5]]
        resp = await client.post("/v1/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
        events = await read_sse(resp)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [e for e in events[:-1] if e["choices"]]
        assert len({c["id"] for c in events[:-1]}) == 1
        for i in range(3):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
            assert "".join(c["text"] for c in mine) == "def" and mine[-1]["finish_reason"] == "length"
            assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
        await assert_drained(orch, eng)

    serve(fn)


def test_a_bad_prompt_in_a_batch_names_itself_and_nothing_runs():
    async def fn(client, eng, orch):
        for prompt, param in ((["a", [2, 5000]], "prompt[1]"), (["a", ""], "prompt[1]"), (["a", [2, "x"]], "prompt[1]"),
                              (["a"] * 65, "prompt"), (["a", 5], "prompt")):
            st, r = await post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
            assert st == 400 and r["error"]["param"] == param, (prompt, r)
        assert not eng.added

    serve(fn)


def test_a_batch_over_the_queue_gets_503_and_a_client_leaving_aborts_every_prompt():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert st == 503 and r["error"]["code"] == "queue_full"
        resp = await client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 900, "stream": True})
        assert len(await read_sse(resp, limit=4)) == 4
        resp.close()
        for _ in range(300):
            if len(eng.aborted) == 2 and orch.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert len(eng.aborted) == 2 and orch.num_in_flight == 0
        await assert_drained(orch, eng)

    serve(fn, engine=CountingEngine(step_sleep=0.005), max_queue=2)
