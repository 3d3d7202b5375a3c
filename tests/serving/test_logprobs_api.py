"""Logprobs and penalties over HTTP (issue 16), on the real tiny disaggregated engine.

Completions: ``logprobs: k`` gives tokens / token_logprobs / top_logprobs / text_offset, HF's log-softmax
for each greedy token, the same streamed and not. Chat: ``logprobs`` + ``top_logprobs`` give
``content`` items with bytes. Penalties change greedy output as HF's processors do (engine tests hold
the exact comparison). Bad values are 400s naming the field.
"""

from __future__ import annotations

import torch

from tests.serving.test_api_server import MODEL, expect_400s, post, read_sse, serve


def _hf_rows(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_completion_logprobs_equal_hf_and_stream_equals_nonstream(real):
    eng, tok, model, _ = real

    async def fn(client, _eng, _orch):
        base = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "logprobs": 3, "return_token_ids": True}
        st, r = await post(client, "/v1/completions", base)
        assert st == 200, r
        ch = r["choices"][0]
        lp, ids = ch["logprobs"], ch["token_ids"]
        prompt = tok.encode(base["prompt"])
        rows = _hf_rows(model, prompt + ids)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        for i, t in enumerate(ids):
            assert abs(lp["token_logprobs"][i] - rows[len(prompt) - 1 + i][t]) < 1e-4
            top = lp["top_logprobs"][i]
            assert 1 <= len(top) <= 4 and max(top.values()) == lp["token_logprobs"][i]  # greedy: its own top
            assert lp["tokens"][i] == ("" if t == tok.eos_token_id else tok.token_bytes(t).decode("utf-8", "replace"))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert "".join(lp["tokens"]) == ch["text"]
        resp = await client.post("/v1/completions", json={**base, "stream": True})
        ev = await read_sse(resp)
        got = [c["choices"][0]["logprobs"] for c in ev[:-1]]
        assert [x for g in got for x in g["token_logprobs"]] == lp["token_logprobs"]
        assert [x for g in got for x in g["text_offset"]] == lp["text_offset"]
        st, r = await post(client, "/v1/completions", {**base, "logprobs": None})
        assert st == 200 and r["choices"][0]["logprobs"] is None

    serve(fn, engine=eng, tokenizer=tok, vocab_size=real[3].vocab_size)
    assert all(v == 0 for v in eng.held_blocks().values())


def test_chat_logprobs_and_top_logprobs(real):
    eng, tok, _, _ = real

    async def fn(client, _eng, _orch):
        base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}
        st, r = await post(client, "/v1/chat/completions", {**base, "logprobs": True, "top_logprobs": 2})
        assert st == 200, r
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 4
        for item in content:
            assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["logprob"] == item["logprob"]
            assert bytes(item["bytes"]).decode("utf-8", "replace") == item["token"]
        st, r = await post(client, "/v1/chat/completions", {**base, "logprobs": True})
        assert st == 200 and all(i["top_logprobs"] == [] for i in r["choices"][0]["logprobs"]["content"])
        resp = await client.post("/v1/chat/completions", json={**base, "logprobs": True, "top_logprobs": 2,
                                                               "stream": True})
        ev = await read_sse(resp)
        streamed = [i for c in ev[:-1] if c["choices"][0]["logprobs"] for i in c["choices"][0]["logprobs"]["content"]]
        assert streamed == content
        st, r = await post(client, "/v1/chat/completions", base)
        assert r["choices"][0]["logprobs"] is None

    serve(fn, engine=eng, tokenizer=tok, vocab_size=real[3].vocab_size)


def test_echo_with_logprobs_scores_the_prompt_as_hf(real):
    """What evaluation harnesses send: echo + logprobs (+ max_tokens 1): the prompt's tokens with their
    logprobs (the first null) equal HF's log-softmax, then the generated token; streamed the same."""
    eng, tok, model, cfg = real
    import numpy as np

    ids = [2, *np.random.default_rng(5).integers(4, cfg.vocab_size, 40).tolist()]  # 41 tokens: a piece of 64

    async def fn(client, _eng, _orch):
        base = {"prompt": ids, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 2}
        st, r = await post(client, "/v1/completions", base)
        assert st == 200, r
        lp = r["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 2 and lp["token_logprobs"][0] is None
        rows = _hf_rows(model, ids)
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - rows[j - 1][ids[j]]) < 1e-4, j
            assert len(lp["top_logprobs"][j]) <= 3
        assert "".join(lp["tokens"]) == r["choices"][0]["text"] and lp["text_offset"][0] == 0
        resp = await client.post("/v1/completions", json={**base, "stream": True})
        ev = await read_sse(resp)
        streamed = [x for c in ev[:-1] for x in c["choices"][0]["logprobs"]["token_logprobs"]]
        assert streamed == lp["token_logprobs"]

    serve(fn, engine=eng, tokenizer=tok, vocab_size=cfg.vocab_size)
    assert all(v == 0 for v in eng.held_blocks().values())


def test_bad_logprobs_and_penalty_values_are_400s(real):
    eng, tok, _, _ = real
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
             ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
             ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
             ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
             ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
             ("/v1/completions", {"prompt": "a", "frequency_penalty": "x"}, "frequency_penalty"),
             ("/v1/chat/completions", {**chat, "repetition_penalty": 0}, "repetition_penalty")]

    expect_400s(cases, engine=eng, tokenizer=tok, vocab_size=real[3].vocab_size)


def test_penalties_change_greedy_output_over_http(real):
    eng, tok, _, _ = real

    async def fn(client, _eng, _orch):
        base = {"prompt": "ab ab ab", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        _, plain = await post(client, "/v1/completions", base)
        _, pen = await post(client, "/v1/completions", {**base, "frequency_penalty": 2.0})
        ids = pen["choices"][0]["token_ids"]
        assert ids != plain["choices"][0]["token_ids"]

    serve(fn, engine=eng, tokenizer=tok, vocab_size=real[3].vocab_size)
