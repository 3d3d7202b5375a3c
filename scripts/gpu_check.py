#!/usr/bin/env python
"""One command for a GPU machine: kernels vs references, bf16 vs float32, decode vs roofline, KV hand-off GB/s.

    python scripts/gpu_check.py            # on a GPU machine (at most a few minutes); writes docs/performance.md
    python scripts/gpu_check.py --dry-run  # on CPU: tiny shapes, interpreted kernels (CI runs this)

Needs only jax (with CUDA on a GPU), flax and numpy: no ray, no network. The checks live in
``jaxserve.profiling.gpu_check``; this script runs them, prints the table and writes it between the
``gpu_check`` markers of docs/performance.md (not in a dry run unless --out is given).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted kernels (a smoke run)")
    p.add_argument("--checks", default="kernels,bf16,roofline,transfer", help="comma-separated subset")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: docs/performance.md, "
                                                          "except in a dry run)")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    import jax

    from jaxserve.profiling.gpu_check import CHECKS, render

    names = a.checks.split(",")
    bad = [n for n in names if n not in CHECKS]
    if bad:
        p.error(f"--checks: unknown {bad}; choose from {', '.join(CHECKS)}")
    if not a.dry_run and jax.default_backend() != "gpu":
        p.error(f"no GPU here (jax backend {jax.default_backend()!r}); use --dry-run on CPU")
    start, rows = time.time(), []
    for n in names:
        print(f"gpu_check: {n} ...", file=sys.stderr, flush=True)
        rows += CHECKS[n](a.dry_run)
    table = render(rows)
    print(table)
    out = a.out if a.out is not None else (None if a.dry_run else REPO / "docs" / "performance.md")
    if out is not None:
        from _docs import write_block

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dev = jax.devices()[0]
        head = (f"## GPU check\n\nCommand: `python scripts/gpu_check.py{' --dry-run' if a.dry_run else ''}`  \n"
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
                f"{time.time() - start:.0f} s; {len(jax.devices())} x {dev.device_kind} ({dev.platform}), "
                f"jax {jax.__version__}, Python {platform.python_version()}.\n\n")
        write_block(out, "gpu_check", head + table)
    return 1 if any(r.verdict == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
