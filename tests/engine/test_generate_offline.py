"""scripts/generate_offline.py as a user runs it: JSONL in/out, bad lines named, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAXSERVE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_offline.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_jsonl_round_trip_with_bad_lines(tiny, workload, tmp_path):
    d, _, _, _, _ = tiny
    prompts, _, refs = workload
    lines = [
        json.dumps({"prompt_token_ids": prompts[3], "max_tokens": 5}),
        "{not json",
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "The weather today"}),
        json.dumps({"prompt": "x", "temperature": 3}),
        json.dumps({"prompt_token_ids": [2] * 600}),
        json.dumps({"prompt": "hi", "max_tokens": -1}),
        json.dumps([1, 2]),
        "",
        json.dumps({"prompt_token_ids": prompts[5], "max_tokens": 7}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run(["--model", str(d), "--input", str(inp), "--output", str(out), "--max-tokens", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 9  # the blank line is skipped, every other line answered in order
    assert rows[0]["token_ids"] == refs[3][:5] and rows[0]["finish_reason"] in ("length", "stop")
    assert rows[8]["token_ids"] == refs[5][:7]
    assert rows[3]["prompt"] == "The weather today" and len(rows[3]["token_ids"]) <= 4
    errors = {row["line"]: row["error"] for row in rows if "error" in row}
    assert set(errors) == {2, 3, 5, 6, 7, 8}
    assert "not valid JSON" in errors[2] and "must not be empty" in errors[3]
    assert "unknown key(s) ['temperature']" in errors[5] and "at most 511" in errors[6]
    assert "max_tokens" in errors[7] and "expected a JSON object" in errors[8]
    for n in errors:
        assert f"line {n}:" in r.stderr
    assert "3 requests (6 rejected)" in r.stderr and "tok/s" in r.stderr


def test_kv_pool_holds_what_the_requests_can_use(tiny, workload, tmp_path):
    """Without --kv-cache-gb the pool is the blocks every request needs at once (prompt + max_tokens,
    16-token blocks), not max_num_seqs x max_model_len; the tokens are the same."""
    d, _, _, _, _ = tiny
    prompts, _, refs = workload
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt_token_ids": prompts[3], "max_tokens": 5}) + "\n"
                   + json.dumps({"prompt_token_ids": prompts[5]}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run(["--model", str(d), "--input", str(inp), "--output", str(out), "--max-tokens", "7"], tmp_path)
    assert r.returncode == 0, r.stderr
    need = -(-(len(prompts[3]) + 5) // 16) + -(-(len(prompts[5]) + 7) // 16)
    assert f"KV pool {need + 1} blocks" in r.stderr and f"the {need} blocks the workload can use at once" in r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["token_ids"] == refs[3][:5] and rows[1]["token_ids"] == refs[5][:7]


def test_nothing_to_do_exits_nonzero(tiny, tmp_path):
    d, _, _, _, _ = tiny
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": ""}\nnope\n')
    r = _run(["--model", str(d), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")], tmp_path)
    assert r.returncode == 1
    assert "line 1:" in r.stderr and "line 2:" in r.stderr


def test_request_too_big_for_kv_cache_is_rejected(tiny, tmp_path):
    d, _, _, _, _ = tiny
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt_token_ids": [2] * 300, "max_tokens": 100}) + "\n"
                   + json.dumps({"prompt_token_ids": [2, 5], "max_tokens": 3}) + "\n")
    # 64 KiB of KV = 8 blocks of 16 tokens for this model (2 layers x 64 hidden x 4 bytes x 2)
    r = _run(["--model", str(d), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
              "--kv-cache-gb", str(64 / 2**20)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "line 1: request needs up to 400 tokens of KV cache" in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert "error" in rows[0] and len(rows[1]["token_ids"]) == 3


def test_bad_arguments_and_missing_model(tmp_path):
    r = _run(["--max-tokens", "0"], tmp_path)
    assert r.returncode == 2 and "--max-tokens must be positive, got 0" in r.stderr
    r = _run(["--model", str(tmp_path / "missing"), "--prompt", "hi"], tmp_path)
    assert r.returncode == 1 and "model folder does not exist" in r.stderr and "Traceback" not in r.stderr


def test_disaggregated_config_gives_the_same_output(tiny, workload, tmp_path):
    d, _, _, _, _ = tiny
    prompts, _, refs = workload
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": prompts[i], "max_tokens": 6}) + "\n" for i in (1, 4, 9)))
    outs = {}
    for name, extra in (("colocated", []), ("disagg", ["--config", str(ROOT / "configs/deploy/disagg-1p1d.yaml")]),
                        ("tp2-2dec", ["--config", str(ROOT / "configs/deploy/disagg-tp2-tp1x2.yaml")])):
        out = tmp_path / f"{name}.jsonl"
        r = _run(["--model", str(d), "--input", str(inp), "--output", str(out), *extra], tmp_path)
        assert r.returncode == 0, r.stderr
        outs[name] = [json.loads(x)["token_ids"] for x in out.read_text().splitlines()]
    assert outs["colocated"] == outs["disagg"] == outs["tp2-2dec"] == [refs[i][:6] for i in (1, 4, 9)]


def test_bad_config_is_named(tiny, tmp_path):
    d, _, _, _, _ = tiny
    bad = tmp_path / "bad.yaml"
    bad.write_text("instances:\n  - role: prefill\n    tp: 2\n    colour: red\n  - role: decode\n")
    r = _run(["--model", str(d), "--prompt", "hi", "--config", str(bad)], tmp_path)
    assert r.returncode == 1 and "instances[0] has unknown keys ['colour']" in r.stderr
    assert "Traceback" not in r.stderr
