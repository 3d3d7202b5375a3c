"""The connection layer (issue 15) on a real socket: slow clients, the connection cap, malformed HTTP,
browser origins and Host names, /metrics behind the key.

Each test runs the app as the launcher does (``AppRunner`` + ``GuardedSite`` on 127.0.0.1, a free
port) over the hand-checkable engine double, and talks to it with raw sockets where the client
must misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
from aiohttp import web

from jaxserve.launch import LINGER_S
from jaxserve.serving.api_server import create_app
from jaxserve.serving.connections import GuardedSite
from jaxserve.serving.orchestrator import Orchestrator
from jaxserve.serving.origins import LOOPBACK_NAMES, allowed_hosts
from tests.serving.doubles import CountingEngine
from tests.serving.test_api_server import CHARS, MODEL

BODY = {"prompt": "a", "max_tokens": 3}


def run_server(fn, *, keepalive_s=5.0, max_connections=1000, engine=None, **app_kw):
    """``await fn(port)`` against the app served like the launcher serves it."""
    engine = engine or CountingEngine()
    orch = Orchestrator(engine, CHARS, max_queue=64)
    orch.start()
    app = create_app(orch, CHARS, model_name=MODEL, max_model_len=engine.max_model_len, vocab_size=1000, **app_kw)

    async def main():
        runner = web.AppRunner(app, shutdown_timeout=1.0, keepalive_timeout=keepalive_s, lingering_time=LINGER_S)
        await runner.setup()
        site = GuardedSite(runner, "127.0.0.1", 0, max_connections=max_connections)
        await site.start()
        try:
            return await fn(site._server.sockets[0].getsockname()[1])
        finally:
            await runner.cleanup()

    try:
        return asyncio.run(main())
    finally:
        orch.stop()


async def completion(port, headers=None, timeout=10.0):
    """(status, JSON body, headers, seconds) of one normal request."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=BODY, headers=headers or {},
                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.json(content_type=None), r.headers, time.perf_counter() - t0


async def raw(port, data: bytes, wait_s=5.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_header_connections_close_within_the_timeout_while_requests_keep_their_latency():
    """300 connections trickle header bytes: each is closed within the 1 s header timeout (+ margin);
    normal requests meanwhile answer as fast as without them."""
    async def fn(port):
        base = [(await completion(port))[3] for _ in range(5)]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        t0 = time.monotonic()

        async def trickle(reader, writer):
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            with contextlib.suppress(ConnectionError):
                while not reader.at_eof():
                    writer.write(b"a")
                    await writer.drain()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(reader.read(1 << 16), 0.2)
            return time.monotonic() - t0

        slow = asyncio.gather(*[trickle(r, w) for r, w in conns])
        during = [(await completion(port))[3] for _ in range(5)]
        closed_after = await asyncio.wait_for(slow, 10)
        for _, w in conns:
            w.close()
        return base, during, closed_after

    base, during, closed_after = run_server(fn, keepalive_s=1.0)
    assert max(closed_after) < 3.0, max(closed_after)  # 1 s timeout + scheduling on 2 busy cores
    assert max(during) < max(0.5, 5 * max(base)), (base, during)


def test_connections_over_the_cap_get_503_and_one_warning(caplog):
    async def fn(port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.1)
        refused = [await raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") for _ in range(20)]
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.2)
        return refused, await completion(port)

    with caplog.at_level(logging.WARNING, logger="jaxserve.serving.connections"):
        refused, after = run_server(fn, max_connections=4)
    for answer in refused:
        status, body = split(answer)
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert b"Retry-After: 1" in answer
    assert after[0] == 200
    lines = [r for r in caplog.records if r.name == "jaxserve.serving.connections"]
    assert len(lines) == 1 and "max-connections 4" in lines[0].getMessage()


MARK = b"EVIL-MARKER-1234"
MALFORMED = {
    "a 64 KB header": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + MARK + b"x" * 65536 + b"\r\n\r\n",
    "200 headers": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-H%d: " % i + MARK + b"\r\n" for i in range(200)) + b"\r\n",
    "CL + TE": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + MARK,
    "a bad chunk size": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + MARK + b"\r\n{}\r\n0\r\n\r\n",
    "a bad request line": MARK + b" / HTTP/1.1\r\n\r\n",
}


def test_malformed_http_gets_json_400_without_echo_and_one_quiet_log_line(caplog):
    async def fn(port):
        return {k: await raw(port, v) for k, v in MALFORMED.items()}, await completion(port)

    with caplog.at_level(logging.DEBUG):
        answers, after = run_server(fn)
    for what, answer in answers.items():
        status, body = split(answer)
        assert status == 400 and body["error"]["code"] == "invalid_http", what
        assert b"application/json" in answer and MARK not in answer, what
    assert after[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "HTTP 400" in r.getMessage()]
    assert len(warned) == 1  # one client address: one line a minute at most


def test_a_body_that_does_not_arrive_gets_408():
    async def fn(port):
        t0 = time.monotonic()
        answer = await raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                 b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        return answer, time.monotonic() - t0

    answer, took = run_server(fn, body_timeout_s=0.5)
    status, body = split(answer)
    assert status == 408 and body["error"]["code"] == "request_timeout" and took < 3.0


def test_origins_hosts_and_metrics_behind_the_key():
    key = {"Authorization": "Bearer k"}

    async def fn(port):
        out = {"evil": await completion(port, {**key, "Origin": "http://evil.example"}),
               "ok": await completion(port, {**key, "Origin": "http://ok.example"}),
               "no origin": await completion(port, key),
               "rebound": await completion(port, {**key, "Host": f"attacker.example:{port}"}),
               "localhost": await completion(port, {**key, "Host": f"localhost:{port}"}),
               "v6": await completion(port, {**key, "Host": f"[::1]:{port}"})}
        async with aiohttp.ClientSession() as s:
            async with s.options(f"http://127.0.0.1:{port}/v1/completions", headers={
                    "Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}) as r:
                out["preflight"] = (r.status, dict(r.headers))
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                out["metrics"] = r.status
            async with s.get(f"http://127.0.0.1:{port}/metrics", headers=key) as r:
                out["metrics+key"] = r.status
        return out

    out = run_server(fn, api_key="k", allowed_origins=["http://ok.example"], allowed_hosts=LOOPBACK_NAMES,
                     metrics_need_key=True)
    assert out["evil"][0] == 403 and out["evil"][1]["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in out["evil"][2]
    assert out["ok"][0] == 200 and out["ok"][2]["Access-Control-Allow-Origin"] == "http://ok.example"
    assert out["no origin"][0] == 200 and "Access-Control-Allow-Origin" not in out["no origin"][2]
    assert out["rebound"][0] == 403 and out["rebound"][1]["error"]["code"] == "host_not_allowed"
    assert out["localhost"][0] == 200 and out["v6"][0] == 200
    status, headers = out["preflight"]
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://ok.example"
    assert "POST" in headers["Access-Control-Allow-Methods"] and "Authorization" in headers["Access-Control-Allow-Headers"]
    assert (out["metrics"], out["metrics+key"]) == (401, 200)


def test_allowed_hosts_defaults():
    assert allowed_hosts(None, "127.0.0.1") == LOOPBACK_NAMES
    assert allowed_hosts(None, "::1") == LOOPBACK_NAMES
    assert allowed_hosts(None, "0.0.0.0") is None  # bound to every address: names are the operator's
    assert allowed_hosts("*", "127.0.0.1") is None
    assert allowed_hosts("Box.Local, localhost", "127.0.0.1") == frozenset({"box.local", "localhost"})


def test_a_loopback_bind_answers_any_loopback_address():
    async def fn(port):
        return (await completion(port, {"Host": f"127.0.0.2:{port}"}))[0], \
            (await completion(port, {"Host": "localhost.evil.example"}))[0]

    assert run_server(fn, allowed_hosts=allowed_hosts(None, "127.0.0.2")) == (200, 403)


def test_a_half_closed_client_gets_its_answer_and_a_client_that_left_is_aborted():
    """shutdown(SHUT_WR) after the request: the answer still comes (before: none, an abort). A client that
    closes entirely while its request waits is still found gone (interim 100 probes) and aborted."""
    import socket

    engine = CountingEngine(step_sleep=0.005, max_running=1)
    req = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    def body(d):
        b = json.dumps(d).encode()
        return req + b"Content-Length: %d\r\n\r\n" % len(b) + b

    async def fn(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(body({"prompt": "a", "max_tokens": 3}))
        await writer.drain()
        writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        async with aiohttp.ClientSession() as s:  # a long one runs; the next waits for a slot, then leaves
            running = await s.post(f"http://127.0.0.1:{port}/v1/completions",
                                   json={"prompt": "a", "max_tokens": 900, "stream": True})
            await running.content.readline()
            _, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(body({"prompt": "b", "max_tokens": 5}))
            await w2.drain()
            await asyncio.sleep(0.3)
            w2.close()
            t0 = time.monotonic()
            while not engine.aborted and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.02)
            running.close()
            return answer, time.monotonic() - t0

    answer, took = run_server(fn, engine=engine)
    final = answer.split(b"HTTP/1.1 ")[-1]  # interim 100s (if any) come first
    assert final.startswith(b"200") and json.loads(final.partition(b"\r\n\r\n")[2])["choices"][0]["text"] == "def"
    assert [r.prompt_token_ids for r in engine.added if r.request_id in engine.aborted] == [[2, 98]]
    assert took < 2.0, took
