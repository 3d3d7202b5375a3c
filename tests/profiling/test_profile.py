"""The profiler (``python -m jaxserve.profiling``): times a tiny random OPT on CPU, fits the planner's coefficients, writes a profile
the planner reads, and turns bad input into one error line (exit 2)."""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.loader import export_hf
from jaxserve.profiling.cli import main
from jaxserve.profiling.record import COLOCATED_ENGINE
from planner.__main__ import main as planner_main
from planner.latency import DISAGG_ENGINE, load_profile

# wide enough FFN that prompt tokens, not dispatch overhead, dominate a prefill on a busy CPU
TINY = ModelConfig(name="tiny-opt", vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                   ffn_dim=2048, word_embed_proj_dim=256, max_position_embeddings=512)
# the planner's --model must be a preset; the tiny model's profile is filed under one to check the format
KEY = "opt-125m"
# 5 prefill shapes, 3 decode shapes (contexts 16 and 64 share a blocks bucket); min of 7 calls resists noise
GRID = ["--prefill-batches", "1,4", "--prefill-lens", "16,64,256", "--max-tokens", "256",
        "--decode-batches", "1,2,4", "--decode-contexts", "16,64", "--max-kv-tokens", "1024",
        "--repeats", "7", "--stat", "min", "--no-progress"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    folder = export_hf(random_params_numpy(TINY, seed=1), TINY, tmp / "tiny")
    out = tmp / "profile.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--model", str(folder), "--out", str(out), "--model-key", KEY, *GRID])
    return rc, buf.getvalue(), out


def test_profile_json_has_fitted_coefficients_for_the_layout(profiled):
    rc, _, out = profiled
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["hardware"]["name"] == "cpu" and doc["hardware"]["memory_gib"] > 0
    entry = doc["engines"][DISAGG_ENGINE][KEY]["tp1"]
    assert doc["engines"][COLOCATED_ENGINE][KEY]["tp1"]["prefill"] == entry["prefill"]
    for k in ("prefill", "decode_small", "decode_large"):
        assert len(entry[k]) == 3 and all(math.isfinite(x) for x in entry[k])
    assert entry["small_batch_threshold"] == 95
    assert entry["profiled"]["layers"] == entry["profiled"]["model_layers"] == 2
    assert (entry["profiled"]["tp"], entry["profiled"]["pp"]) == (1, 1)
    assert len(entry["samples"]["prefill"]) == entry["profiled"]["prefill_samples"] == 5
    assert len(entry["samples"]["decode"]) == entry["profiled"]["decode_samples"] == 6
    # the fit is not garbage: more prompt tokens cost more, and the fit follows the measurements
    a, b, c = entry["prefill"]
    assert b > 0
    meas = np.array([t for _, _, t in entry["samples"]["prefill"]])
    fitted = np.array([a + b * n * ln + c * n * ln * ln for n, ln, _ in entry["samples"]["prefill"]])
    assert fitted[np.argmax(meas)] > fitted[np.argmin(meas)]
    err = entry["fit_error"]
    for k in ("prefill_rmse_ms", "decode_small_rmse_ms", "prefill_max_rel_err", "decode_small_max_rel_err"):
        assert math.isfinite(err[k]) and err[k] >= 0
    assert err["prefill_rmse_ms"] < 0.5 * (meas.max() - meas.min())
    # the planner's reader accepts it
    phase = load_profile(out).phase(DISAGG_ENGINE, KEY, 1)
    assert phase is not None and phase.prefill_time(512, 512 * 256) > 0


def test_report_prints_fit_error_and_table(profiled):
    _, text, out = profiled
    assert "RMSE" in text and "max rel err" in text
    assert "measured ms" in text and "fitted ms" in text
    assert str(out) in text


def test_planner_consumes_the_written_profile(profiled, capsys):
    _, _, out = profiled
    rc = planner_main(["--model", KEY, "--profile", str(out), "--link-hardware", "a100-80g", "--nodes", "1",
                       "--gpus-per-node", "2", "--ttft", "5", "--tpot", "1", "--requests", "100",
                       "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # every mode is scored from the measured profile; on one CPU core per instance colocation can win
    assert re.search(r"chosen: (disaggregated: prefill tp=1 pp=1|colocated: colocated tp=1|chunked: colocated tp=1)",
                     out), out
    assert "   1  (1,1) x 1" in out and "colocated (1,1)" in out and "chunked   (1,1)" in out


@pytest.mark.parametrize("args, msg", [
    (["--model", "opt-nope"], "unknown model preset 'opt-nope'"),
    (["--model", "opt-125m", "--tp", "5"], "tp=5 does not divide"),
    (["--model", "opt-125m", "--tp", "4", "--pp", "4", "--layers", "4"], "needs 16 local devices"),
    (["--model", "opt-125m", "--layers", "13"], "--layers must be in 1..12"),
    (["--model", "opt-125m", "--tp", "0"], "must be >= 1"),
])
def test_bad_input_is_one_line_exit_2(args, msg, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "p.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "least squares" in text and "--layers" in text


def test_profile_has_the_padded_engine_model(profiled):
    _, text, out = profiled
    entry = json.loads(out.read_text())["engines"][DISAGG_ENGINE][KEY]["tp1"]
    # a packed prefill call over its padded tokens, and a decode step per padded row count
    assert len(entry["prefill_packed"]) == 3 and min(entry["prefill_packed"]) >= 0
    rows = [r[0] for r in entry["decode_padded"]]
    assert rows == sorted(rows) and set(rows) <= {1, 2, 4}
    assert all(len(r) == 4 and min(r[1:]) >= 0 for r in entry["decode_padded"])
    # one long context among short ones, for every batch > 1
    assert [b for b, *_ in entry["samples"]["decode_mixed"]] == [2, 4]
    assert entry["profiled"]["passes"] == 1 and "engine_costs" not in entry
    assert "prefill_packed ms" in text and "decode_padded ms" in text
    ph = load_profile(out).phase(DISAGG_ENGINE, KEY, 1)
    assert ph.prefill_packed is not None and ph.decode_padded is not None and ph.engine_costs is None
