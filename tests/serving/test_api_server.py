"""The HTTP server in process (aiohttp TestServer on a free port): every endpoint, error shape and header.

Most tests drive a hand-checkable engine double (request r emits tokens 100, 101, ... one per
step) behind a character tokenizer (token t is chr(t): 100 -> "d"), so texts are exact; the
real tiny OPT engine (disaggregated: one prefill, one decode instance) checks tokens against
HF, stop strings, usage, and that clients leaving mid-stream free every KV block.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jaxserve.serving.api_server import create_app
from jaxserve.serving.chat import ChatError, render_chat
from jaxserve.serving.metrics import ServerMetrics
from jaxserve.serving.orchestrator import Orchestrator
from tests.serving.doubles import CountingEngine
from tests.serving.test_metrics import parse_prometheus

MODEL = "tiny-opt"


class CharTokenizer:
    """Characters are tokens: encode("ab") = [2, 97, 98]; token t decodes to chr(t)."""

    bos_token_id = 2

    def encode(self, text, add_bos=True):
        return [2] * add_bos + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) for t in ids if t != 2 or not skip_special_tokens)

    def token_bytes(self, t):
        return chr(t).encode()

    def detokenizer(self, prompt_ids):
        return _CharDetok()


class _CharDetok:
    def add(self, t):
        return chr(t)

    def finish(self):
        return ""


CHARS = CharTokenizer()


def serve(fn, engine=None, tokenizer=CHARS, max_queue=8, **kw):
    """Run ``await fn(client, engine, orchestrator)`` against a fresh app; returns its result."""
    engine = engine or CountingEngine()
    orch = Orchestrator(engine, tokenizer, max_queue=max_queue)
    orch.start()
    kw.setdefault("model_name", MODEL)
    kw.setdefault("max_model_len", engine.max_model_len)
    kw.setdefault("vocab_size", 1000)
    app = create_app(orch, tokenizer, **kw)

    async def main():
        async with TestClient(TestServer(app)) as client:
            return await fn(client, engine, orch)

    try:
        return asyncio.run(main())
    finally:
        orch.stop()


def expect_400s(cases, **serve_kw):
    """Each (path, body, field) is answered 400 naming ``field``."""
    async def fn(client, _eng, _orch):
        for path, body, field in cases:
            st, r = await post(client, path, body)
            assert st == 400 and r["error"]["param"] == field, (body, r)

    serve(fn, **serve_kw)


async def read_sse(resp, limit=None):
    """Parsed ``data:`` payloads ("[DONE]" kept as a string); stops after ``limit`` of them."""
    out = []
    while limit is None or len(out) < limit:
        line = await resp.content.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
        else:
            assert line == "", line
    return out


async def post(client, path, body, **kw):
    resp = await client.post(path, json=body, **kw)
    return resp.status, await resp.json()


# ---- completions ------------------------------------------------------------------------------

async def assert_drained(orch, eng, tries: int = 500) -> None:
    """Wait (bounded) until nothing is in flight and no instance holds a KV block; assert it."""
    for _ in range(tries):
        if orch.num_in_flight == 0 and not eng.has_unfinished() and not any(eng.held_blocks().values()):
            break
        await asyncio.sleep(0.02)
    assert orch.num_in_flight == 0 and not eng.has_unfinished()
    assert all(v == 0 for v in eng.held_blocks().values()), eng.held_blocks()


def test_completion_object_usage_and_default_max_tokens():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"model": MODEL, "prompt": "ab", "max_tokens": 5,
                                                        "temperature": 0, "return_token_ids": True})
        assert st == 200, r
        assert r["id"].startswith("cmpl-") and r["object"] == "text_completion" and r["model"] == MODEL
        assert isinstance(r["created"], int)
        assert r["choices"] == [{"index": 0, "text": "defgh", "logprobs": None, "finish_reason": "length",
                                 "token_ids": [100, 101, 102, 103, 104], "prompt_token_ids": [2, 97, 98]}]
        assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        st, r = await post(client, "/v1/completions", {"prompt": [2, 7]})  # model omitted: the served one
        assert st == 200 and r["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
        assert r["choices"][0]["text"] == "".join(chr(100 + i) for i in range(16))
        assert "token_ids" not in r["choices"][0]

    serve(fn)


def test_completion_stream_chunks_usage_and_done():
    async def fn(client, eng, orch):
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4, "stream": True,
                                                          "stream_options": {"include_usage": True}})
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        ev = await read_sse(resp)
        assert ev[-1] == "[DONE]"
        chunks, usage = ev[:-2], ev[-2]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "defg"
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
        assert all(c["object"] == "text_completion" and c["usage"] is None and c["id"] == chunks[0]["id"]
                   and c["choices"][0]["logprobs"] is None for c in chunks)
        assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                             "total_tokens": 7}
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "stream": True})
        ev = await read_sse(resp)
        assert ev[-1] == "[DONE]" and len(ev) == 3 and "usage" not in ev[0]  # no usage chunk unless asked

    serve(fn)


def test_stop_strings_cut_the_text_stream_and_not():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": "a", "max_tokens": 10, "stop": ["xyz", "g"]})
        assert st == 200 and r["choices"][0]["text"] == "def" and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == 4  # d e f g: g completed the stop string
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "stop": "fg",
                                                          "stream": True, "include_stop_str_in_output": True})
        ev = await read_sse(resp)
        assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "defg"
        assert ev[-2]["choices"][0]["finish_reason"] == "stop"
        await asyncio.sleep(0.05)
        assert not eng.reqs  # the engine was told to drop them

    serve(fn)


def test_token_id_prompt_without_tokenizer():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": [2, 7, 9], "max_tokens": 3,
                                                        "return_token_ids": True})
        assert st == 200 and r["choices"][0]["token_ids"] == [100, 101, 102] and r["choices"][0]["text"] == ""
        assert r["usage"]["prompt_tokens"] == 3
        st, r = await post(client, "/v1/completions", {"prompt": "hello"})
        assert st == 400 and r["error"]["param"] == "prompt" and "tokenizer" in r["error"]["message"]
        st, r = await post(client, "/v1/completions", {"prompt": [2, 7], "stop": "x"})
        assert st == 400 and r["error"]["param"] == "stop"  # the orchestrator refuses stop strings here

    serve(fn, tokenizer=None)


# ---- chat -------------------------------------------------------------------------------------
def test_render_chat_template_and_errors():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "user", "content": "Bye"}]
    assert render_chat(msgs) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
    # "developer" is OpenAI's current name for the system role
    assert render_chat([{"role": "developer", "content": "Be brief."}, *msgs[1:]]) == render_chat(msgs)
    for bad, param in [([], "messages"), ("hi", "messages"), ([{"role": "bot", "content": "x"}], "messages[0].role"),
                       ([{"role": "user"}], "messages[0].content"), ([{"role": "user", "content": 5}], "messages[0].content"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
                       ([{"role": "user", "content": "a"}, 7], "messages[1]")]:
        with pytest.raises(ChatError) as e:
            render_chat(bad)
        assert e.value.param == param and str(e.value).startswith(param)


def test_chat_completions_stream_and_not():
    msgs = [{"role": "user", "content": "hi"}]
    n_prompt = len(CharTokenizer().encode(render_chat(msgs)))

    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 3})
        assert st == 200, r
        assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
        assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "def"}, "logprobs": None,
                                 "finish_reason": "length"}]
        assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3}
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs, "max_completion_tokens": 2})
        assert st == 200 and r["choices"][0]["message"]["content"] == "de"
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs})  # default: the rest of the context
        assert r["usage"]["total_tokens"] == eng.max_model_len
        resp = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True,
                                                               "stream_options": {"include_usage": True}})
        ev = await read_sse(resp)
        assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == 3 and ev[-2]["choices"] == []
        chunks = ev[:-2]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "d"}
        assert [c["choices"][0]["delta"] for c in chunks[1:]] == [{"content": "e"}, {"content": "f"}]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        st, r = await post(client, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
        assert st == 400 and r["error"]["param"] == "messages[0].role"
        st, r = await post(client, "/v1/chat/completions", {"max_tokens": 3})
        assert st == 400 and r["error"]["param"] == "messages"

    serve(fn, engine=CountingEngine(max_model_len=64))


# ---- errors -----------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": -1}, "temperature"), ({"temperature": 1e6}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 10**400}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": [1]}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.0}, "top_k"), ({"top_k": False}, "top_k"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": "1"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop": 5}, "stop"), ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["a", 3]}, "stop"),
    ({"stop_token_ids": [5000]}, "stop_token_ids"), ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"n": 0}, "n"), ({"n": True}, "n"), ({"best_of": 0}, "best_of"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"echo": "yes"}, "echo"),
    ({"logprobs": 21}, "logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"stream": "yes"}, "stream"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "y"}}, "include_usage"),
    ({"model": 5}, "model"), ({"prompt": None}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [2, 1000]}, "prompt"), ({"prompt": [2, -1]}, "prompt"), ({"prompt": [2, True]}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt"), ({"prompt": {"text": "a"}}, "prompt"), ({"prompt": 12}, "prompt"),
    # vLLM's fields this server does not act on, set to a non-default value; fields in no schema
    ({"repetition_penalty": -1}, "repetition_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 4}, "min_tokens"), ({"min_tokens": 2, "stop_token_ids": [5]}, "min_tokens"),
    ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": {"5000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": [5]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(65)}}, "logit_bias"), ({"min_p": 2}, "min_p"), ({"min_p": "x"}, "min_p"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"allowed_token_ids": [5]}, "allowed_token_ids"), ({"bad_words": ["x"]}, "bad_words"),
    ({"truncate_prompt_tokens": 4}, "truncate_prompt_tokens"), ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"guided_json": {}}, "guided_json"), ({"frobnicate": 1}, "frobnicate"), ({"messages": []}, "messages"),
]


def test_fields_at_their_default_or_null_are_accepted():
    """What the server does not act on is fine at its default (the output is what it would be anyway)."""
    async def fn(client, eng, orch):
        for patch in ({"repetition_penalty": 1.0}, {"min_tokens": 0}, {"skip_special_tokens": True},
                      {"prompt_logprobs": None}, {"user": "someone"}, {"logprobs": None}, {"echo": False},
                      {"best_of": 1}, {"n": 1}):
            st, r = await post(client, "/v1/completions", {"prompt": "ab", "max_tokens": 3, **patch})
            assert st == 200 and r["choices"][0]["text"] == "def", (patch, r)
        st, r = await post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "max_completion_tokens": 2, "prompt": "x"})
        assert st == 400 and r["error"]["param"] == "prompt" and r["error"]["code"] == "unsupported_parameter"

    serve(fn)


def test_invalid_fields_are_400_naming_the_field():
    async def fn(client, eng, orch):
        for patch, param in BAD_FIELDS:
            body = {"prompt": "ab", "max_tokens": 3, **patch}
            st, r = await post(client, "/v1/completions", body)  # NaN/inf go out as JSON NaN/Infinity
            assert st == 400, (patch, r)
            err = r["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["param"] == param and err["type"] == "invalid_request_error", (patch, err)
            assert param in err["message"], (patch, err)
        # the same checks guard chat
        st, r = await post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "temperature": "warm"})
        assert st == 400 and r["error"]["param"] == "temperature"
        assert not eng.reqs and orch.num_in_flight == 0

    serve(fn)


def test_context_length_and_max_tokens_cap():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": [2] * 32, "max_tokens": 1})
        assert st == 400 and r["error"]["param"] == "prompt" and r["error"]["code"] == "context_length_exceeded"
        assert "32" in r["error"]["message"]
        st, r = await post(client, "/v1/completions", {"prompt": "x" * 40})
        assert st == 400 and r["error"]["code"] == "context_length_exceeded"
        st, r = await post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]})
        assert st == 400 and r["error"]["code"] == "context_length_exceeded" and r["error"]["param"] == "messages"
        st, r = await post(client, "/v1/completions", {"prompt": [2] * 29, "max_tokens": 10**30})
        assert st == 200 and r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"

    serve(fn, engine=CountingEngine(max_model_len=32))


def test_unknown_model_404_and_models_list():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"model": "gpt-4", "prompt": "a"})
        assert st == 404 and r["error"]["code"] == "model_not_found" and "gpt-4" in r["error"]["message"]
        resp = await client.get("/v1/models")
        assert resp.status == 200
        assert await resp.json() == {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": (await resp.json())["data"][0]["created"],
             "owned_by": "jaxserve", "max_model_len": 1000}]}
        resp = await client.get(f"/v1/models/{MODEL}")
        assert resp.status == 200 and (await resp.json())["id"] == MODEL
        resp = await client.get("/v1/models/other")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
        resp = await client.get("/v1/nothing")
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "invalid_request_error"
        resp = await client.get("/v1/completions")
        assert resp.status == 405 and "error" in await resp.json()

    serve(fn)


def test_api_key_401():
    async def fn(client, eng, orch):
        body = {"prompt": "a", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}):
            resp = await client.post("/v1/completions", json=body, headers=headers)
            r = await resp.json()
            assert resp.status == 401 and r["error"]["code"] == "invalid_api_key", headers
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        for path in ("/v1/models", "/v1/workload"):
            assert (await client.get(path)).status == 401
        resp = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 200
        resp = await client.get("/v1/models", headers={"Authorization": "bearer s3cret"})
        assert resp.status == 200
        assert (await client.get("/health")).status == 200  # probes and scrapes need no key
        assert (await client.get("/metrics")).status == 200

    serve(fn, api_key="s3cret")


def test_malformed_and_huge_bodies():
    async def fn(client, eng, orch):
        for raw, what in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "empty"),
                          (b"\xff\xfe{}", "not valid JSON"), (b"[" * 4000, "not valid JSON"),
                          (b'"prompt"', "JSON object")]:
            resp = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
            r = await resp.json()
            assert resp.status == 400 and what in r["error"]["message"], (raw[:20], r)
        resp = await client.post("/v1/completions", data=b'{"prompt": "' + b"a" * 5000 + b'"}')
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
        resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 5000}]})
        assert resp.status == 413

    serve(fn, max_body_bytes=4096)


def test_not_ready_503_then_health_ok():
    ready = {"ok": False}

    async def fn(client, eng, orch):
        resp = await client.get("/health")
        assert resp.status == 503 and await resp.json() == {"status": "starting"}
        st, r = await post(client, "/v1/completions", {"prompt": "a"})
        assert st == 503 and r["error"]["code"] == "not_ready" and r["error"]["type"] == "server_error"
        ready["ok"] = True
        resp = await client.get("/health")
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
        st, r = await post(client, "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert st == 200

    serve(fn, is_ready=lambda: ready["ok"])


def test_queue_full_503_and_disconnect_aborts():
    async def fn(client, eng, orch):
        body = {"prompt": "a", "max_tokens": 900, "stream": True}
        streams = [await client.post("/v1/completions", json=body) for _ in range(2)]
        for s in streams:
            assert len(await read_sse(s, limit=2)) == 2
        resp = await client.post("/v1/completions", json={"prompt": "a"})
        r = await resp.json()
        assert resp.status == 503 and r["error"]["code"] == "queue_full" and resp.headers["Retry-After"] == "1"
        for s in streams:
            s.close()  # the client leaves mid-stream
        for _ in range(500):
            if len(eng.aborted) == 2 and orch.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert len(eng.aborted) == 2 and not eng.reqs and orch.num_in_flight == 0
        st, r = await post(client, "/v1/completions", {"prompt": "a", "max_tokens": 2})  # room again
        assert st == 200
        text = await (await client.get("/metrics")).text()
        m = parse_prometheus(text)
        assert m[("jaxserve:request_rejected_total", (("model_name", MODEL), ("reason", "queue_full")))] == 1
        assert m[("jaxserve:request_success_total", (("finished_reason", "abort"), ("model_name", MODEL)))] == 2

    serve(fn, engine=CountingEngine(step_sleep=0.005), max_queue=2)


def test_client_leaving_before_its_first_token_aborts_it():
    async def fn(client, eng, orch):
        running = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 900, "stream": True})
        assert len(await read_sse(running, limit=1)) == 1
        with pytest.raises(asyncio.TimeoutError):  # queued behind it: no first token, the client gives up
            await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "b", "max_tokens": 5}), 0.3)
        for _ in range(300):
            if eng.aborted:
                break
            await asyncio.sleep(0.01)
        assert [r.prompt_token_ids for r in eng.added if r.request_id in eng.aborted] == [[2, 98]]
        running.close()

    serve(fn, engine=CountingEngine(step_sleep=0.005, max_running=1))


def test_workload_window_summary_and_trace_for_the_planner(tmp_path):
    """Requests that ran to their end are kept with their lengths; refused and abandoned ones are not; the
    JSONL export is a trace the planner reads."""
    from planner.workload import load_trace

    async def fn(client, eng, orch):
        empty = await (await client.get("/v1/workload")).json()
        assert empty["requests"] == 0 and empty["rate_rps"] == 0.0 and empty["prompt_len"] is None
        for prompt, n in (("a", 2), ("abc", 3), ("abcdef", 4)):  # prompt tokens: BOS + one per character
            assert (await post(client, "/v1/completions", {"prompt": prompt, "max_tokens": n}))[0] == 200
        assert (await post(client, "/v1/completions", {"prompt": "a", "max_tokens": -1}))[0] == 400
        gone = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 900, "stream": True})
        assert len(await read_sse(gone, limit=2)) == 2
        gone.close()
        for _ in range(500):
            if eng.aborted and orch.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert len(eng.aborted) == 1 and orch.num_in_flight == 0

        summary = await (await client.get("/v1/workload")).json()
        assert summary["requests"] == 3 and summary["window_s"] == 600.0 and summary["rate_rps"] > 0
        assert summary["prompt_len"]["max"] == 7 and summary["prompt_len"]["mean"] == pytest.approx(13 / 3)
        assert summary["output_len"]["max"] == 4 and summary["output_len"]["p50"] == 3.0
        resp = await client.get("/v1/workload", params={"format": "jsonl"})
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        (tmp_path / "live.jsonl").write_text(await resp.text())
        resp = await client.get("/v1/workload", params={"format": "xml"})
        r = await resp.json()
        assert resp.status == 400 and r["error"]["param"] == "format"

    serve(fn, engine=CountingEngine(step_sleep=0.002))
    trace = load_trace(tmp_path / "live.jsonl")
    assert [(int(p), int(o)) for p, o in zip(trace.prompt_len, trace.output_len, strict=True)] == \
        [(2, 2), (4, 3), (7, 4)]
    assert trace.arrival[0] == 0.0 and list(trace.arrival) == sorted(trace.arrival)


def test_a_request_the_deployment_can_never_hold_is_400():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": [2] * 40, "max_tokens": 5})
        assert st == 400 and "cache holds 2 blocks" in r["error"]["message"], r
        assert orch.num_in_flight == 0

    serve(fn, engine=CountingEngine(capacity=2))


def test_engine_failure_is_500_or_an_error_chunk():
    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": "a", "max_tokens": 10})
        assert st == 500 and r["error"]["type"] == "server_error" and r["error"]["code"] == "engine_error"
        eng.fail_at_step = eng.steps + 3
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "stream": True})
        ev = await read_sse(resp)
        assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "engine_error"
        assert [c["choices"][0]["text"] for c in ev[:-2]] == ["d", "e"]

    serve(fn, engine=CountingEngine(fail_at_step=2))


def test_metrics_endpoint_counts_move():
    async def fn(client, eng, orch):
        for n in (1, 3, 5):
            st, _ = await post(client, "/v1/completions", {"prompt": "ab", "max_tokens": n})
            assert st == 200
        await post(client, "/v1/completions", {"prompt": "ab", "n": 0})
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        m = parse_prometheus(await resp.text())
        lab = (("model_name", MODEL),)
        assert m[("jaxserve:request_success_total", (("finished_reason", "length"), *lab))] == 3
        assert m[("jaxserve:prompt_tokens_total", lab)] == 9
        assert m[("jaxserve:generation_tokens_total", lab)] == 9
        assert m[("jaxserve:time_to_first_token_seconds_count", lab)] == 3
        assert m[("jaxserve:time_per_output_token_seconds_count", lab)] == 2  # one-token requests have no TPOT
        assert m[("jaxserve:e2e_request_latency_seconds_count", lab)] == 3
        assert m[("jaxserve:request_rejected_total", (("model_name", MODEL), ("reason", "invalid")))] == 1
        assert m[("jaxserve:num_requests_in_flight", lab)] == 0

    metrics = ServerMetrics(MODEL)
    serve(fn, metrics=metrics)
    assert metrics.finished == {"length": 3}


# ---- the real tiny engine ---------------------------------------------------------------------
def test_real_engine_greedy_stream_equals_nonstream_equals_hf_and_stop(real):
    from tests.model_fixtures import hf_greedy

    eng, tok, model, cfg = real

    async def fn(client, _eng, orch):
        prompt = "The quick brown fox"
        ids = tok.encode(prompt)
        want = hf_greedy(model, ids, 12)
        base = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        st, r = await post(client, "/v1/completions", {**base, "return_token_ids": True})
        assert st == 200, r
        ch = r["choices"][0]
        assert ch["token_ids"][: len(want)] == want and ch["prompt_token_ids"] == ids
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
        text = ch["text"]
        resp = await client.post("/v1/completions", json={**base, "stream": True, "return_token_ids": True,
                                                          "stream_options": {"include_usage": True}})
        ev = await read_sse(resp)
        assert "".join(c["choices"][0]["text"] for c in ev[:-2]) == text
        assert [t for c in ev[:-2] for t in c["choices"][0]["token_ids"]] == ch["token_ids"]
        assert ev[-2]["usage"] == r["usage"]
        # token-id prompt, HF's reference
        st, r2 = await post(client, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                         "return_token_ids": True})
        assert r2["choices"][0]["token_ids"] == want
        # a stop string taken from the greedy text: the text ends just before its first occurrence
        stop = text[len(text) // 2: len(text) // 2 + 2]
        st, r3 = await post(client, "/v1/completions", {**base, "stop": [stop]})
        assert st == 200 and r3["choices"][0]["finish_reason"] == "stop"
        assert r3["choices"][0]["text"] == text[: text.find(stop)]
        # chat over the real tokenizer
        st, r4 = await post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4, "temperature": 0})
        assert st == 200 and r4["usage"]["prompt_tokens"] == len(tok.encode(render_chat(
            [{"role": "user", "content": "hi"}])))

    serve(fn, engine=eng, tokenizer=tok, max_model_len=eng.max_model_len, vocab_size=cfg.vocab_size)


def test_real_engine_clients_leaving_mid_stream_free_every_block(real):
    eng, tok, _, cfg = real
    clients = 50  # issue 6: 50 clients leave mid-stream, and every block comes back

    async def fn(client, _eng, orch):
        async def leaver(i):
            resp = await client.post("/v1/completions", json={
                "prompt": [2, *range(10 + i, 20 + i)], "max_tokens": 50, "ignore_eos": True, "stream": True,
                "temperature": 0})
            assert resp.status == 200
            got = await read_sse(resp, limit=1 + i % 3)
            assert len(got) == 1 + i % 3 and got[-1] != "[DONE]"
            resp.close()

        await asyncio.gather(*[leaver(i) for i in range(clients)])
        await assert_drained(orch, eng, tries=3000)
        assert orch.finished == {"abort": clients}  # each was still in the engine when its client left
        m = parse_prometheus(await (await client.get("/metrics")).text())
        lab = (("model_name", MODEL),)
        assert m[("jaxserve:request_success_total", (("finished_reason", "abort"), *lab))] == clients
        for inst in ("prefill-0", "decode-0"):
            assert m[("jaxserve:kv_cache_usage_perc", (("instance", inst), *lab))] == 0.0
        assert m[("jaxserve:kv_transfer_seconds_count", lab)] >= 1  # some got to the decode instance

    serve(fn, engine=eng, tokenizer=tok, max_model_len=eng.max_model_len, vocab_size=cfg.vocab_size, max_queue=64)


def test_engine_with_no_live_instance_is_503_unavailable():
    from jaxserve.errors import EngineUnavailable

    class Dead(CountingEngine):
        def add_request(self, r):
            raise EngineUnavailable("no live decode instance (decode-1: actor died)")

    async def fn(client, eng, orch):
        st, r = await post(client, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert st == 503 and r["error"]["code"] == "unavailable" and "decode-1: actor died" in r["error"]["message"]
        m = parse_prometheus(await (await client.get("/metrics")).text())
        assert m[("jaxserve:request_rejected_total", (("model_name", MODEL), ("reason", "unavailable")))] == 1

    serve(fn, engine=Dead())


def test_non_ascii_authorization_bytes_are_401_not_500():
    """Latin-1 / invalid UTF-8 bytes in the Authorization header (sent raw): 401 like any wrong key."""
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()

    async def fn(client, eng, orch):
        out = []
        for auth in (b"Bearer \xe9t\xe9", b"Bearer \xff\xfe\x80", b"\xe9 s3cret"):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nAuthorization: %s\r\nConnection: close\r\n\r\n%s"
                         % (len(body), auth, body))
            await writer.drain()
            out.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        return out

    for answer in serve(fn, api_key="s3cret"):
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b'"invalid_api_key"' in answer


def test_requests_cut_at_shutdown_end_as_a_503_error_not_a_success():
    """The orchestrator stops while a stream and a plain request run: the stream ends with a
    server_shutdown error chunk and [DONE] (no chunk with finish_reason "abort"); the plain one gets 503."""
    async def fn(client, eng, orch):
        body = {"prompt": "ab", "max_tokens": 500, "ignore_eos": True}
        resp = await client.post("/v1/completions", json={**body, "stream": True})
        first = await read_sse(resp, limit=2)
        plain = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, orch.stop)
        rest = await read_sse(resp)
        p = await plain
        return first + rest, p.status, await p.json(), p.headers.get("Retry-After")

    events, status, plain, retry = serve(fn, engine=CountingEngine(step_sleep=0.02))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown", events[-3:]
    assert all(c["choices"][0]["finish_reason"] is None for c in events[:-2]), events[-4:]
    assert status == 503 and plain["error"]["code"] == "server_shutdown" and retry == "1"


def test_json_routes_need_a_json_content_type():
    """What a web page can send without a CORS preflight (text/plain, a form, no type) gets 415."""
    body = json.dumps({"prompt": "ab", "max_tokens": 2}).encode()

    async def fn(client, eng, orch):
        out = []
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            resp = await client.post("/v1/completions", data=body, headers={"Content-Type": ctype})
            out.append((ctype, resp.status, (await resp.json())["error"]["code"]))
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)  # no Content-Type at all
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        resp = await client.post("/v1/completions", data=body, headers={"Content-Type": "application/json; charset=utf-8"})
        return out, raw, resp.status

    out, raw, ok = serve(fn)
    assert all(status == 415 and code == "unsupported_media_type" for _, status, code in out), out
    assert raw.startswith(b"HTTP/1.1 415") and b"unsupported_media_type" in raw, raw[:200]
    assert ok == 200


def test_large_prompts_do_not_stall_the_event_loop():
    """8 prompts of ~1 MB at once while a stream runs: JSON and tokenization happen off the event loop
    and a text that cannot fit the context is refused before tokenizing, so /health answers in under
    100 ms and the stream's gaps stay under 250 ms (the prompts took 0.6-0.9 s of loop time each)."""
    big = json.dumps({"prompt": "ab " * 330_000, "max_tokens": 1}).encode()  # ~1 MB, under the body limit

    async def fn(client, eng, orch):
        resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 60, "ignore_eos": True,
                                                           "stream": True})
        health, stamps = [], []

        async def read_stream():
            while line := await resp.content.readline():
                if line.startswith(b"data: "):
                    stamps.append(time.perf_counter())

        async def probe():
            while len(stamps) < 55:
                t0 = time.perf_counter()
                assert (await client.get("/health")).status == 200
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

        async def flood():
            answers = await asyncio.gather(*[client.post("/v1/completions", data=big,
                                                         headers={"Content-Type": "application/json"})
                                             for _ in range(8)])
            return [(a.status, (await a.json())["error"]["code"]) for a in answers]

        reader = asyncio.ensure_future(read_stream())
        while len(stamps) < 5:
            await asyncio.sleep(0.01)
        _, refused = await asyncio.gather(probe(), flood())
        await reader
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        return refused, max(health), max(gaps), len(stamps)

    refused, worst_health, worst_gap, n = serve(fn, engine=CountingEngine(step_sleep=0.02), max_queue=16)
    print(f"large prompts: worst /health {1e3 * worst_health:.1f} ms, worst stream gap {1e3 * worst_gap:.1f} ms")
    assert refused == [(400, "context_length_exceeded")] * 8
    assert n >= 60 and worst_health < 0.1 and worst_gap < 0.25, (worst_health, worst_gap)
