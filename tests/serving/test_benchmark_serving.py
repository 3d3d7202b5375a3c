"""scripts/benchmark_serving.py against a test double of the server with hand-checkable timing.

The double (an aiohttp app on 127.0.0.1, a free port, its own thread) answers /health, /v1/models and
streaming /v1/completions: it waits FIRST seconds, sends one chunk, then max_tokens - 1 more chunks
STEP seconds apart, a usage chunk and [DONE]. So TTFT ~ FIRST and TPOT ~ STEP, and token counts are
known. A failing mode answers some requests with HTTP 500, or never finishes them (timeouts).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
FIRST = 0.25  # the double's first-token delay (s)
STEP = 0.04  # the double's delay between tokens (s)
MODEL = "double-opt"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_serving", ROOT / "scripts" / "benchmark_serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_serving"] = mod
    spec.loader.exec_module(mod)
    return mod


bs = _load_script()


class ServerDouble:
    """A fake OpenAI completions server; ``fail_every``/``hang_every`` pick failing requests by arrival order."""

    def __init__(self, fail_every: int = 0, hang_every: int = 0):
        self.fail_every, self.hang_every = fail_every, hang_every
        self.bodies: list[dict] = []
        self.open = self.max_open = 0  # streams open at once
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        k = len(self.bodies)
        if self.fail_every and k % self.fail_every == 0:
            return web.json_response({"error": {"message": f"injected failure {k}", "type": "server_error"}},
                                     status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.hang_every and k % self.hang_every == 0:
            await asyncio.sleep(30)  # the client's --request-timeout ends this
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self._tokens(resp, body, k)
        finally:
            self.open -= 1
        return resp

    async def _tokens(self, resp: web.StreamResponse, body: dict, k: int) -> None:
        n = body["max_tokens"]
        await asyncio.sleep(FIRST)
        for i in range(n):
            if i:
                await asyncio.sleep(STEP)
            chunk = {"id": f"cmpl-{k}", "object": "text_completion", "model": MODEL,
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> ServerDouble:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = bs.main([*argv, "--ready-timeout", "5"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_sweep_measures_the_doubles_delays(tmp_path, capsys):
    out, png = tmp_path / "res.json", tmp_path / "att.png"
    with ServerDouble() as srv:
        rc, stdout, _ = _run(["--url", srv.url, "--workload", "fixed:8:6", "--num-prompts", "20",
                              "--request-rates", "20,40", "--ttft-slo", "1.0", "--tpot-slo", "0.5",
                              "--devices", "2", "--vocab-size", "1000", "--out", str(out), "--plot", str(png),
                              "--per-request"], capsys)
        bodies = srv.bodies
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"schema", "config", "runs", "goodput"}
    assert res["schema"] == bs.SCHEMA
    assert res["config"]["model"] == MODEL  # from GET /v1/models
    assert res["config"]["slo"] == {"ttft": 1.0, "tpot": 0.5, "attainment": 0.9}
    assert [r["request_rate"] for r in res["runs"]] == [20.0, 40.0]
    # What the server received: 2 x 20 requests of 8 random ids in [3, 1000), max_tokens 6, streamed.
    assert len(bodies) == 40
    for b in bodies:
        assert b["model"] == MODEL and b["max_tokens"] == 6 and b["ignore_eos"] is True and b["stream"] is True
        assert b["temperature"] == 0 and b["stream_options"] == {"include_usage": True}
        assert len(b["prompt"]) == 8 and all(3 <= x < 1000 for x in b["prompt"])
    # Common random numbers: both rates send the same prompts.
    assert sorted(map(tuple, (b["prompt"] for b in bodies[:20]))) == sorted(map(tuple, (b["prompt"] for b in bodies[20:])))
    run_keys = {"request_rate", "offered_rate", "num_requests", "completed", "failed", "failures",
                "failure_examples", "duration_s", "total_input_tokens", "total_output_tokens",
                "output_len_mismatches", "request_throughput", "output_throughput", "total_token_throughput",
                "ttft_s", "tpot_s", "itl_s", "e2e_s", "client_lag_s", "slo_attainment", "ttft_attainment",
                "tpot_attainment", "meets_target", "slo_request_throughput", "requests"}
    for run in res["runs"]:
        assert set(run) == run_keys
        for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(run[k]) == {"mean", "median", "p90", "p99", "max"}
        assert run["num_requests"] == run["completed"] == 20 and run["failed"] == 0 and run["failures"] == {}
        assert run["total_output_tokens"] == 20 * 6 and run["total_input_tokens"] == 20 * 8
        assert run["output_len_mismatches"] == 0
        # Hand-checkable timing: TTFT >= FIRST, TPOT >= STEP, within 1.5x (a loaded 2-core box measured
        # medians of FIRST + 10-20% and STEP + 10-25%: asyncio sleeps overshoot there, and the client and
        # the double share one process).
        assert FIRST <= run["ttft_s"]["median"] < 1.5 * FIRST, run["ttft_s"]
        assert STEP <= run["tpot_s"]["median"] < 1.5 * STEP, run["tpot_s"]
        assert 0.75 * STEP <= run["itl_s"]["median"] < 1.5 * STEP, run["itl_s"]
        e2e = FIRST + 5 * STEP
        assert e2e <= run["e2e_s"]["median"] < 1.5 * e2e, run["e2e_s"]
        assert run["slo_attainment"] == run["ttft_attainment"] == run["tpot_attainment"] == 1.0
        assert run["meets_target"] is True
        # 20 requests over ~19/rate seconds (+ one request's latency).
        assert 19 / run["request_rate"] <= run["duration_s"] < 19 / run["request_rate"] + 1.5
        assert run["request_throughput"] == pytest.approx(20 / run["duration_s"])
        assert run["output_throughput"] == pytest.approx(120 / run["duration_s"])
        reqs = run["requests"]
        assert len(reqs) == 20 and all(r["ok"] and r["output_tokens"] == 6 and len(r["itl_s"]) == 5 for r in reqs)
        assert reqs[0]["scheduled_s"] == 0.0
    # Arrivals are the same sample time-rescaled: rate 40's schedule is rate 20's halved.
    slow = [r["scheduled_s"] for r in res["runs"][0]["requests"]]
    fast = [r["scheduled_s"] for r in res["runs"][1]["requests"]]
    assert fast == pytest.approx([x / 2 for x in slow])
    g = res["goodput"]
    assert g["rate"] == 40.0 and g["rates_meeting"] == [20.0, 40.0] and g["devices"] == 2
    assert g["per_device"] == 20.0 and g["attainment_target"] == 0.9
    assert [p["slo_attainment"] for p in g["per_rate"]] == [1.0, 1.0]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "TTFT ms" in stdout and "goodput" in stdout and "40 req/s" in stdout


def test_impossible_slo_gives_zero_attainment_and_max_concurrency_holds(tmp_path, capsys):
    out = tmp_path / "res.json"
    with ServerDouble() as srv:
        rc, stdout, _ = _run(["--url", srv.url, "--model", "m", "--workload", "fixed:4:3", "--num-prompts", "10",
                              "--request-rate", "50", "--ttft-slo", "0.01", "--tpot-slo", "0.001",
                              "--max-concurrency", "2", "--warmup-requests", "1", "--out", str(out),
                              "--disable-tqdm"], capsys)
        assert {b["model"] for b in srv.bodies} == {"m"}
        assert len(srv.bodies) == 11  # one warm-up request, not measured
        assert srv.max_open == 2
    assert rc == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["completed"] == 10
    assert run["slo_attainment"] == run["ttft_attainment"] == run["tpot_attainment"] == 0.0
    assert run["meets_target"] is False
    assert res["goodput"]["rate"] == 0.0 and res["goodput"]["rates_meeting"] == []
    assert res["goodput"]["per_device"] is None
    assert "no swept rate met the target" in stdout


def test_failures_are_counted_with_reasons(tmp_path, capsys):
    out = tmp_path / "res.json"
    with ServerDouble(fail_every=5, hang_every=7) as srv:
        rc, stdout, _ = _run(["--url", srv.url, "--workload", "fixed:4:3", "--num-prompts", "20",
                              "--request-rate", "40", "--ttft-slo", "1", "--tpot-slo", "1",
                              "--request-timeout", "1.0", "--out", str(out), "--disable-tqdm"], capsys)
    assert rc == 0
    (run,) = json.loads(out.read_text())["runs"]
    # Arrival order 5, 10, 15, 20 -> HTTP 500; 7, 14 -> hang past the timeout.
    assert run["failures"] == {"HTTP 500": 4, "timeout": 2}
    assert run["failure_examples"]["HTTP 500"].startswith("injected failure")
    assert run["completed"] == 14 and run["failed"] == 6
    assert run["total_output_tokens"] == 14 * 3
    assert run["slo_attainment"] == pytest.approx(14 / 20)  # failures miss the SLO
    assert "HTTP 500 x4" in stdout


def test_max_duration_stops_the_run_and_trace_prompts_are_sent(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    rows = [{"arrival_time": 0.1 * i, "prompt_len": 3, "output_len": 2, "prompt_token_ids": [10 + i, 11, 12]}
            for i in range(5)]
    rows += [{"arrival_time": 10.0 + i, "prompt_len": 3, "output_len": 2} for i in range(5)]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    t = time.perf_counter()
    with ServerDouble(hang_every=5) as srv:  # the 5th request never finishes
        rc, _, _ = _run(["--url", srv.url, "--trace", str(trace), "--num-prompts", "100",
                         "--max-duration", "2.0", "--out", str(out), "--disable-tqdm"], capsys)
        bodies = srv.bodies
    assert time.perf_counter() - t < 9  # the unsent half is scheduled at 10-14 s
    assert rc == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["request_rate"] is None  # recorded times replayed
    assert run["num_requests"] == 10 and run["completed"] == 4
    assert run["failures"] == {"cancelled (--max-duration)": 1, "not sent (--max-duration)": 5}
    assert 2.0 <= run["duration_s"] < 2.5
    assert sorted(b["prompt"][0] for b in bodies) == [10, 11, 12, 13, 14]
    assert all(b["max_tokens"] == 2 for b in bodies)
    assert res["goodput"] is None and "slo_attainment" not in run  # no SLO given


@pytest.mark.parametrize("args, message", [
    (["--request-rate", "0"], "--request-rate must be a positive"),
    (["--request-rate", "-2"], "--request-rate must be a positive"),
    (["--request-rates", ""], "--request-rates is empty"),
    (["--request-rates", "1,x"], "is not a number"),
    (["--trace", "/nonexistent/t.jsonl"], "file not found"),
    (["--ttft-slo", "0"], "--ttft-slo must be a positive"),
    (["--attainment", "1.5"], "--attainment must be in"),
    (["--plot", "x.png"], "--plot draws SLO attainment"),
    (["--url", "127.0.0.1:8000"], "--url must look like"),
    (["--trace", "t.jsonl", "--burstiness", "0.5"], "do not apply to a trace"),
    (["--num-prompts", "0"], "--num-prompts must be positive"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bs.parse_args(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_unreadable_and_bad_traces_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_time": 0, "prompt_len": 3}\n')
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    for path in (bad, binary, tmp_path):
        with pytest.raises(SystemExit) as e:
            bs.parse_args(["--trace", str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err, err


def test_burstiness_is_the_planners_gamma_arrivals():
    a = bs.parse_args(["--burstiness", "0.25", "--workload", "fixed:4:4"])
    assert a.workload_obj.arrival == "gamma" and a.workload_obj.cv == pytest.approx(2.0)
    assert bs.parse_args(["--cv", "2"]).burstiness == pytest.approx(0.25)
    p = bs.parse_args([])
    assert p.workload_obj.arrival == "poisson" and p.rates == [1.0] and p.workload_obj.name == "sharegpt"


def test_help_explains_every_flag():
    parser = bs.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    text = parser.format_help()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text


def test_unreachable_server_is_one_line_exit_1(capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = bs.main(["--url", f"http://127.0.0.1:{port}", "--ready-timeout", "0.3", "--disable-tqdm"])
    err = capsys.readouterr().err
    assert rc == 1 and "not ready" in err and err.count("\n") == 1
