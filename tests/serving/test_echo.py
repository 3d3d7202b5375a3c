"""``echo`` on completions (issue 16): the prompt's text comes before the generated text, streamed or not,
per prompt of a batch; a token-id prompt is decoded; the chat route refuses it."""

from __future__ import annotations

from tests.serving.test_api_server import post, read_sse, serve


def test_echo_puts_the_prompt_before_the_completion():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": "ab", "max_tokens": 3, "echo": True})
        assert st == 200 and r["choices"][0]["text"] == "abdef" and r["usage"]["completion_tokens"] == 3
        st, r = await post(client, "/v1/completions", {"prompt": [2, 120, 121], "max_tokens": 2, "echo": True})
        assert st == 200 and r["choices"][0]["text"] == "xyde"  # token ids decoded (BOS skipped)
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "echo": True,
                                                          "stream": True})
        events = await read_sse(resp)
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == "abdef"
        st, r = await post(client, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 1, "echo": True})
        assert [c["text"] for c in r["choices"]] == ["ad", "bd"]
        st, r = await post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "echo": True})
        assert st == 400 and r["error"]["param"] == "echo"

    serve(fn)
