"""scripts/gpu_check.py --dry-run: the GPU check runs end to end on CPU (tiny shapes, interpreted kernels)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_passes_and_writes_its_table(tmp_path):
    out = tmp_path / "perf.md"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "<!-- gpu_check begin -->" in text and "--dry-run" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert {row.split("|")[1].strip() for row in rows} == {"kernels", "bf16", "roofline", "transfer"}
    assert all("FAILED" not in row for row in rows), rows
    kernel_rows = [row for row in rows if "kernels" in row]
    assert len(kernel_rows) == 2 and all("| ok |" in row for row in kernel_rows)


def test_gpu_check_refuses_to_run_without_a_gpu():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "no GPU here" in r.stderr and "Traceback" not in r.stderr
