"""Fuzzing /v1/completions and /v1/chat/completions of the real tiny engine (issue 7, reliability).

Hypothesis (derandomized, no example database) draws several hundred malformed or extreme
requests: every field with wrong types, huge / negative / NaN / infinite numbers, unicode,
emoji, lone surrogates and NUL characters, non-object JSON, random and invalid UTF-8 bytes,
truncated JSON, wrong content types; a fixed list adds deep nesting (10000 levels), empty
bodies and a 10 MB body. Every answer must be a 4xx in OpenAI's error shape or a well-formed
200 completion (streamed or not): never a 5xx, a traceback or a hang. Afterwards the server
still answers a greedy request exactly as HF does, nothing is in flight, the engine is idle,
every instance holds zero KV blocks, and the Prometheus counters agree with what was sent.
"""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jaxserve.serving.chat import render_chat
from tests.serving.test_api_server import MODEL, assert_drained, read_sse, serve
from tests.serving.test_metrics import parse_prometheus

ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_MODEL_LEN = 64
REQUEST_TIMEOUT_S = 60.0  # one request, start to end: a hang fails the test
NUM_EXAMPLES = 1000  # hypothesis examples, one request each (plus the fixed cases below)

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "stream", "stream_options", "n", "best_of", "echo", "logprobs",
          "top_logprobs", "suffix", "logit_bias", "presence_penalty", "frequency_penalty", "tools", "tool_choice",
          "functions", "response_format", "ignore_eos", "include_stop_str_in_output", "return_token_ids", "user"]
EXTREME_NUMBERS = [2**70, -(2**70), 10**400, -(10**400), 1e308, -1e308, 5e-324, -0.0, 0, -1, 1, 2**31, 2**31 - 1,
                   2**63, 2**63 - 1, 2**64, float("nan"), float("inf"), float("-inf"), 0.5, 100.0, 100.0001]
WEIRD_STRINGS = ["", " ", "inf", "-Infinity", "NaN", "1e999", "null", "true", "0", "1", "\x00", "a\x00b", "\ud800",
                 "x\udfffy", "\udc00\ud800", "🦊" * 40, "\u202e\u200b\ufeff", "\n\r\t", "</s>", "<pad>", "\\u0000",
                 "é" * 100, "\U0010ffff", "gpt-4", MODEL, MODEL + "\x00", "user", "assistant"]
# JSON routes answer any other content type 415 (before reading fields): draw JSON most of the time so
# that the fields themselves stay fuzzed
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/json; charset=latin-1", "application/octet-stream",
                 "image/png", None]
JSON_MOSTLY = st.sampled_from(["application/json"] * 21 + CONTENT_TYPES)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.sampled_from(EXTREME_NUMBERS),
    st.text(max_size=12), st.sampled_from(WEIRD_STRINGS),
    st.text(st.characters(categories=["Cs", "Cc", "So"]), max_size=6),  # surrogates, controls, emoji
)
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.sampled_from([*FIELDS, "role", "content", "type", "text", "include_usage"])
                                      | st.text(max_size=6), c, max_size=4), max_leaves=10)


def nested(depth: int, leaf: object = 2) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def field_values(vocab: int) -> dict[str, st.SearchStrategy]:
    """Per field: plausible-but-wrong values that get past the first type check (besides junk)."""
    ids = st.lists(st.integers(-3, vocab + 3), max_size=8)
    msg = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "bot", "", None,
                                                                     5, [], {}, ["user"]]) | junk,
                                              "content": st.text(max_size=10) | junk
                                              | st.lists(st.fixed_dictionaries(
                                                  {}, optional={"type": st.sampled_from(["text", "image_url"]) | junk,
                                                                "text": st.text(max_size=5) | junk}), max_size=3)})
    counts = st.integers(-5, 8) | st.sampled_from(EXTREME_NUMBERS)
    return {
        "prompt": st.one_of(st.text(max_size=30), st.sampled_from(WEIRD_STRINGS), ids, st.lists(ids, max_size=3),
                            st.lists(st.text(max_size=4), max_size=3), st.just([2] * MAX_MODEL_LEN),
                            st.just([2] * (MAX_MODEL_LEN - 1)), st.just("x" * 3000),
                            st.integers(1, 600).map(lambda d: nested(d))),
        "messages": st.one_of(st.lists(msg, max_size=4), st.lists(junk, max_size=3), st.just([]),
                              st.just([{"role": "user", "content": "y" * 3000}]),
                              st.just([{"role": "user", "content": ""}] * 5000)),
        "max_tokens": counts, "max_completion_tokens": counts, "top_k": counts, "n": counts, "best_of": counts,
        "seed": counts, "logprobs": counts, "top_logprobs": counts,
        "temperature": st.floats() | st.sampled_from(EXTREME_NUMBERS), "top_p": st.floats(-1, 2) | scalars,
        "presence_penalty": st.floats(), "frequency_penalty": st.floats(),
        "stop": st.one_of(st.lists(st.text(max_size=4) | st.sampled_from(WEIRD_STRINGS), max_size=6),
                          st.sampled_from(WEIRD_STRINGS), st.lists(junk, max_size=3)),
        "stop_token_ids": ids | st.lists(junk, max_size=3),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": scalars}) | junk,
        "model": st.sampled_from(WEIRD_STRINGS) | junk,
        "logit_bias": st.dictionaries(st.text(max_size=3), scalars, max_size=3),
    }


def bodies(vocab: int) -> st.SearchStrategy:
    """(route, body bytes, content type): mostly a valid request with some fields broken."""
    values = field_values(vocab)
    base_completion = st.fixed_dictionaries({
        "prompt": st.text(min_size=1, max_size=20) | st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12),
        "max_tokens": st.integers(1, 4)}, optional={"temperature": st.sampled_from([0, 0.7, 1.0]),
                                                    "seed": st.integers(0, 2**63 - 1), "stream": st.booleans()})
    base_chat = st.fixed_dictionaries({
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                    "content": st.text(max_size=10)}), min_size=1, max_size=3),
        "max_tokens": st.integers(1, 4)}, optional={"temperature": st.sampled_from([0, 0.7]), "stream": st.booleans()})
    change = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), values.get(k, junk) | junk))
    drop = st.sets(st.sampled_from(["prompt", "messages", "max_tokens", "stream"]), max_size=2)

    changes = st.lists(change, min_size=1, max_size=4)

    @st.composite
    def mutated(draw, changes=changes, drops=drop):
        route = draw(st.sampled_from(ROUTES))
        body = dict(draw(base_chat if route.endswith("chat/completions") else base_completion))
        for k in draw(drops):
            body.pop(k, None)
        body.update(draw(changes))
        if body.get("stream") is True and draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
        return route, json.dumps(body).encode(), draw(JSON_MOSTLY)

    non_object = st.tuples(st.sampled_from(ROUTES), junk.map(lambda v: json.dumps(v).encode()),
                           JSON_MOSTLY)
    raw = st.tuples(st.sampled_from(ROUTES), st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=16).map(lambda b: b'{"prompt": "' + b + b'", "max_tokens": 2}'),  # invalid UTF-8 inside
        st.integers(0, 60).map(lambda n: b'{"prompt": "hello", "max_tokens": 2, "stream": true}'[:n]),  # truncated
        st.sampled_from([b"\xff\xfe{}", b"\xc3\x28", b"\xed\xa0\x80", b'{"prompt": NaN}', b'{"prompt": "a",}',
                         b"{'prompt': 'a'}", b'{"prompt": "a"}{"prompt": "b"}', b"\x00" * 32, b" \n\t ",
                         '{"prompt": "a", "max_tokens": 2}'.encode("utf-16"), b'{"prompt": "\\ud800"}',
                         b'{"messages": [{"role": "user", "content": "\\udfff"}]}'])), JSON_MOSTLY)
    valid = mutated(changes=st.just([("stream", True)]) | st.just([]), drops=st.just(()))  # the engine runs
    return st.one_of(mutated(), mutated(), mutated(), non_object, raw, valid)


def fixed_cases() -> list[tuple[str, bytes, str | None, tuple[int, str, str]]]:
    """Cases too big or too specific for hypothesis to draw, each with the answer it must get:
    (route, body, content type, (status, error field, its value))."""
    deep = b"[" * 10000 + b"]" * 10000
    bad_json = (400, "code", "invalid_json")
    cases: list[tuple[bytes, tuple[int, str, str], tuple[int, str, str]]] = [  # body, completions', chat's answer
        (deep, bad_json, bad_json),
        (b'{"prompt": ' + deep + b"}", bad_json, bad_json),
        (b'{"messages": ' + deep + b"}", bad_json, bad_json),
        (b'{"prompt": "a", "stop": ' + deep + b"}", bad_json, bad_json),
        (b'{"prompt": "a", "stream": true, "stream_options": ' + b'{"x": ' * 10000 + b"1" + b"}" * 10000 + b"}",
         bad_json, bad_json),
        # a field of the other route is named as not a field of this one
        (json.dumps({"prompt": nested(500), "max_tokens": 1}).encode(), (400, "param", "prompt"),
         (400, "param", "prompt")),
        (b"", bad_json, bad_json), (b" \r\n ", bad_json, bad_json), (b"[]", bad_json, bad_json),
        (b"null", bad_json, bad_json), (b"0", bad_json, bad_json), (b"1e999", bad_json, bad_json),
        (b'"prompt"', bad_json, bad_json), (b"true", bad_json, bad_json), (b"\xff\xfe\x00", bad_json, bad_json),
        (b"{}", (400, "param", "prompt"), (400, "param", "messages")),
        (b'{"prompt": "\\ud800 fox", "max_tokens": 1}', (400, "param", "prompt"), (400, "param", "prompt")),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', (400, "param", "messages"),
         (400, "param", "messages")),
        (b'{"messages": [{"role": ["user"], "content": "x"}]}', (400, "param", "messages"),
         (400, "param", "messages[0].role")),
        (b'{"prompt": "' + b"a" * (10 << 20) + b'"}', (413, "code", "request_too_large"),  # 10 MB: over 1 MB
         (413, "code", "request_too_large")),
        (b"\xff" * (10 << 20), (413, "code", "request_too_large"), (413, "code", "request_too_large")),
        (json.dumps({"prompt": "ab " * 300_000, "max_tokens": 1}).encode(),  # ~900 KB prompt, under the limit
         (400, "code", "context_length_exceeded"), (400, "param", "prompt")),
    ]
    return [(route, body, "application/json", want) for body, *wants in cases
            for route, want in zip(ROUTES, wants, strict=True)]


def check_answer(status: int, headers: dict[str, str], payload: object, route: str) -> None:
    """A 4xx in OpenAI's error shape, or a well-formed 200 completion; nothing else."""
    assert status < 500, (status, payload)
    if status != 200:
        assert status in (400, 404, 413, 415), (status, payload)
        assert isinstance(payload, dict) and set(payload) == {"error"}, payload
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)
        assert "Traceback" not in err["message"]
        return
    chat = route.endswith("chat/completions")
    if headers["Content-Type"].startswith("text/event-stream"):
        assert payload and payload[-1] == "[DONE]", payload
        chunks = [c for c in payload[:-1] if c["choices"]]
        assert all("error" not in c for c in payload[:-1]), payload
        assert chunks and all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") and
                              c["model"] == MODEL for c in chunks)
        for i in sorted({c["choices"][0]["index"] for c in chunks}):  # a batch of prompts: a choice each
            mine = [c for c in chunks if c["choices"][0]["index"] == i]
            assert [c["choices"][0]["finish_reason"] for c in mine][:-1] == [None] * (len(mine) - 1)
            assert mine[-1]["choices"][0]["finish_reason"] in ("stop", "length"), mine[-1]
        return
    assert payload["object"] == ("chat.completion" if chat else "text_completion") and payload["model"] == MODEL
    assert [c["index"] for c in payload["choices"]] == list(range(len(payload["choices"])))
    for choice in payload["choices"]:
        assert choice["finish_reason"] in ("stop", "length"), choice
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str)
    u, n = payload["usage"], len(payload["choices"])
    assert 1 <= u["prompt_tokens"] < n * MAX_MODEL_LEN and 0 <= u["completion_tokens"] <= n * MAX_MODEL_LEN
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def num_choices(headers: dict[str, str], payload: object, body: bytes = b"") -> int:
    """Requests a 200 answer stands for (a batch of prompts and n samples: one each; best_of: best_of per
    n choices, the others were generated and dropped)."""
    if headers["Content-Type"].startswith("text/event-stream"):
        return len({c["choices"][0]["index"] for c in payload[:-1] if c["choices"]})
    try:
        sent = json.loads(body)
        n, best_of = sent.get("n") or 1, sent.get("best_of") or sent.get("n") or 1
    except (ValueError, AttributeError):
        n = best_of = 1
    return len(payload["choices"]) * best_of // n


def test_fuzzed_requests_get_4xx_or_a_completion_and_leave_nothing_behind(real):
    from tests.model_fixtures import hf_greedy

    eng, tok, model, cfg = real
    seen: dict[int | str, int] = {}  # status -> count (and "200 streamed")

    async def fn(client, _eng, orch):
        loop = asyncio.get_running_loop()

        async def send(route: str, body: bytes, ctype: str | None) -> tuple[int, dict[str, str], object]:
            headers = {"Content-Type": ctype} if ctype else {}
            async with client.post(route, data=body, headers=headers) as resp:
                if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    payload = await read_sse(resp)
                else:
                    raw = await resp.read()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = raw[:300]  # check_answer then fails, showing it
                return resp.status, dict(resp.headers), payload

        def request(route: str, body: bytes, ctype: str | None, want: tuple[int, str, str] | None = None) -> None:
            # runs in a worker thread (hypothesis is synchronous); the request runs on the server's loop
            fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(send(route, body, ctype), REQUEST_TIMEOUT_S), loop)
            status, headers, payload = fut.result(REQUEST_TIMEOUT_S + 5)
            seen[status] = seen.get(status, 0) + 1
            if status == 200 and headers["Content-Type"].startswith("text/event-stream"):
                seen["200 streamed"] = seen.get("200 streamed", 0) + 1
            check_answer(status, headers, payload, route)
            if status == 200:
                seen["requests finished"] = seen.get("requests finished", 0) + num_choices(headers, payload, body)
            if want is not None:
                assert (status, payload["error"][want[1]]) == (want[0], want[2]), (route, body[:80], payload)

        @settings(max_examples=NUM_EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
        @given(bodies(cfg.vocab_size))
        def fuzz(case):
            request(*case)

        def run_all() -> None:
            for case in fixed_cases():
                request(*case)
            fuzz()

        await asyncio.to_thread(run_all)
        total = sum(v for k, v in seen.items() if isinstance(k, int))
        assert total >= 500, seen
        assert seen.get(200, 0) >= 50 and seen.get("200 streamed", 0) >= 20, seen  # valid ones ran the engine
        assert seen.get(400, 0) >= 300 and seen.get(413, 0) >= 4 and seen.get(415, 0) >= 50, seen

        # the server is unharmed: greedy equals HF's, and nothing is left behind
        ids = tok.encode("The quick brown fox")
        resp = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                          "return_token_ids": True})
        r = await resp.json()
        assert resp.status == 200, r
        assert r["choices"][0]["token_ids"] == hf_greedy(model, ids, 12)
        await assert_drained(orch, eng)
        assert orch.num_errors == 0 and "error" not in orch.finished and "abort" not in orch.finished, orch.finished
        m = parse_prometheus(await (await client.get("/metrics")).text())
        lab = (("model_name", MODEL),)
        rejected = m[("jaxserve:request_rejected_total", (("model_name", MODEL), ("reason", "invalid")))]
        assert rejected == total - seen.get(200, 0)  # every 4xx was counted as a rejected request
        done = sum(v for (name, labels), v in m.items() if name == "jaxserve:request_success_total")
        assert done == seen.get("requests finished", 0) + 1, m  # every completion (and the greedy check) finished
        assert m[("jaxserve:num_requests_in_flight", lab)] == 0
        return total

    total = serve(fn, engine=eng, tokenizer=tok, max_model_len=eng.max_model_len, vocab_size=cfg.vocab_size)
    print(f"fuzz: {total} requests, answers by status {seen}")


def test_chat_template_of_fuzzed_messages_never_crashes():
    """render_chat raises ChatError (a 400) for any message list, never another exception."""
    from jaxserve.serving.chat import ChatError

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(st.lists(junk, max_size=4) | field_values(100)["messages"] | junk)
    def check(messages):
        try:
            assert isinstance(render_chat(messages), str)
        except ChatError as e:
            assert e.param and str(e).startswith(e.param)

    check()
