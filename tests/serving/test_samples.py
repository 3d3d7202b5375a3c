"""``n`` and ``best_of`` (issue 16) on the real tiny disaggregated engine.

n=4 with a seed: four choices, each the single-sample answer of its derived seed (seed + j); the
prompt's full blocks are prefilled once (the later samples hit the prefill instance's prefix cache);
no block held after. best_of=3, n=1: the sample with the highest cumulative logprob, usage counting
all three. Streaming n=2: chunks by choice index. Bad values: 400s naming the field.
"""

from __future__ import annotations

import numpy as np

from tests.serving.test_api_server import expect_400s, post, read_sse, serve


def _hits(eng):
    return sum(s.prefix_cache_hits for s in eng.stats())


def test_n_samples_share_one_prefill_and_equal_their_seeds(real):
    eng, tok, _, cfg = real
    prompt = [2, *np.random.default_rng(123).integers(4, cfg.vocab_size, 39).tolist()]  # 40 tokens: 2 full blocks
    base = {"prompt": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 7, "return_token_ids": True,
            "ignore_eos": True}

    async def fn(client, _eng, _orch):
        before = _hits(eng)
        st, r = await post(client, "/v1/completions", {**base, "n": 4})
        assert st == 200, r
        assert _hits(eng) - before == 3 * 32  # samples 1-3 found the first's 2 full blocks (prefill-only keeps 2)
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert r["usage"]["completion_tokens"] == 20 and r["usage"]["prompt_tokens"] == 40  # the prompt once
        for j, c in enumerate(r["choices"]):
            st, one = await post(client, "/v1/completions", {**base, "seed": 7 + j})
            assert c["token_ids"] == one["choices"][0]["token_ids"], j
        assert len({tuple(c["token_ids"]) for c in r["choices"]}) > 1  # different seeds, different samples
        resp = await client.post("/v1/completions", json={**base, "n": 2, "stream": True})
        ev = await read_sse(resp)
        by_index = {0: [], 1: []}
        for e in ev[:-1]:
            for c in e["choices"]:
                by_index[c["index"]] += c["token_ids"]
        assert [by_index[0], by_index[1]] == [c["token_ids"] for c in r["choices"][:2]]

    serve(fn, engine=eng, tokenizer=tok, vocab_size=cfg.vocab_size)
    assert all(v == 0 for v in eng.held_blocks().values())


def test_best_of_returns_the_highest_cumulative_logprob(real):
    eng, tok, _, cfg = real
    base = {"prompt": "The quick brown", "max_tokens": 6, "temperature": 1.0, "seed": 3, "return_token_ids": True,
            "ignore_eos": True}

    async def fn(client, _eng, _orch):
        st, r = await post(client, "/v1/completions", {**base, "best_of": 3})
        assert st == 200, r
        assert len(r["choices"]) == 1 and r["choices"][0]["logprobs"] is None  # ranked, not shown
        assert r["usage"]["completion_tokens"] == 18  # all three were generated
        singles = []
        for j in range(3):
            _, one = await post(client, "/v1/completions", {**base, "seed": 3 + j, "logprobs": 0})
            c = one["choices"][0]
            singles.append((sum(c["logprobs"]["token_logprobs"]), c["token_ids"]))
        assert r["choices"][0]["token_ids"] == max(singles)[1]

    serve(fn, engine=eng, tokenizer=tok, vocab_size=cfg.vocab_size)


def test_bad_n_and_best_of_are_400s(real):
    eng, tok, _, cfg = real
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [("/v1/completions", {"prompt": "a", "n": 0}, "n"), ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
             ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 1}, "best_of"),
             ("/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, "best_of"),
             ("/v1/completions", {"prompt": "a", "n": "2"}, "n"),
             ("/v1/chat/completions", {**chat, "best_of": 2}, "best_of")]

    expect_400s(cases, engine=eng, tokenizer=tok, vocab_size=cfg.vocab_size)


def test_chat_n_gives_a_message_per_sample(real):
    eng, tok, _, cfg = real

    async def fn(client, _eng, _orch):
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1.0, "seed": 11,
                "n": 2, "ignore_eos": True}
        st, r = await post(client, "/v1/chat/completions", body)
        assert st == 200, r
        assert [c["index"] for c in r["choices"]] == [0, 1] and r["usage"]["completion_tokens"] == 8
        for j, c in enumerate(r["choices"]):
            _, one = await post(client, "/v1/chat/completions", {**body, "n": 1, "seed": 11 + j})
            assert c["message"]["content"] == one["choices"][0]["message"]["content"]

    serve(fn, engine=eng, tokenizer=tok, vocab_size=cfg.vocab_size)
