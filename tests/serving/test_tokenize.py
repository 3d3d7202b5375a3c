"""vLLM's /tokenize, /detokenize and /version, and the X-Request-Id echo (issue 16)."""

from __future__ import annotations

from tests.serving.test_api_server import CHARS, post, serve


def test_tokenize_detokenize_version_and_request_id():
    async def fn(client, eng, orch):
        st, r = await post(client, "/tokenize", {"prompt": "ab"})
        assert st == 200 and r == {"count": 3, "max_model_len": eng.max_model_len, "tokens": [2, 97, 98]}
        st, r = await post(client, "/tokenize", {"prompt": "ab", "add_special_tokens": False})
        assert r["tokens"] == [97, 98]
        st, r = await post(client, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
        assert st == 200 and r["count"] == len(r["tokens"]) > 3  # the chat template around "hi"
        st, r = await post(client, "/detokenize", {"tokens": [2, 104, 105]})
        assert st == 200 and r == {"prompt": "hi"}
        for route, body, param in [("/tokenize", {"prompt": "a", "frob": 1}, "frob"),
                                   ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                                   ("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
                                   ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
                                   ("/detokenize", {"tokens": [5000]}, "tokens"),
                                   ("/detokenize", {"tokens": "ab"}, "tokens")]:
            st, r = await post(client, route, body)
            assert st in (400, 404) and r["error"]["param"] == param, (route, body, r)
        resp = await client.get("/version")
        assert resp.status == 200 and (await resp.json())["version"]
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                                 headers={"X-Request-Id": "trace-42"})
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "trace-42"
        resp = await client.get("/health", headers={"X-Request-Id": "x" * 200})  # too long: not echoed
        assert "X-Request-Id" not in resp.headers

    serve(fn)


def test_token_routes_need_the_key_when_one_is_set():
    async def fn(client, eng, orch):
        st, r = await post(client, "/tokenize", {"prompt": "ab"})
        assert st == 401
        st, r = await post(client, "/tokenize", {"prompt": "ab"}, headers={"Authorization": "Bearer k"})
        assert st == 200 and r["count"] == 3
        assert (await client.get("/version")).status == 200

    serve(fn, api_key="k", tokenizer=CHARS)
