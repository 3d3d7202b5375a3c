"""bench_startup.py's results as markdown: one dict of figures in, the issue-13 section out.

    r (Proc records for the offline runs and launcher starts, compile JSONs, workload, context)
      --render--> "## Start-up and offline speed (issue 13)" with tables, ratios and a targets table
                  (a run of some --parts only: a "###" section of its own, below the full run's)
"""

from __future__ import annotations

import re
from typing import Any

GIB = 2**30
TARGETS = {"cold": 2.0, "warm": 3.0, "depth": 1.3, "ready_cold": 20.0, "ready_second": 8.0, "rss_gib": 3.0}
GENERATED = r"\d+ generated tokens in [\d.]+ s.*"
WARM_LINE = r"\d+ step shapes ready.*"
HF_LINE = r"(?<=hf: ).*"


def grep(text: str, pattern: str) -> str:
    m = re.search(pattern, text, re.M)
    return m.group(0).strip() if m else "-"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def render_offline(r: dict[str, Any]) -> list[str]:
    cold, warm, hf = r["ours"]["cold"], r["ours"]["warm"], r["hf"]
    w = r["workload"]
    lines = [f"Workload (bench_offline's generator, seed {r['seed']}): {w['num_prompts']} prompts of random token ids, "
             f"lengths uniform {w['prompt_len'][0]}..{w['prompt_len'][1]} ({w['prompt_tokens']} tokens), outputs "
             f"uniform {w['output_len'][0]}..{w['output_len'][1]} ({w['output_tokens']} tokens), greedy, EOS ignored, as "
             "`prompt_token_ids` lines; OPT-125m-shaped random float32 weights in an HF folder. Ours: "
             "`generate_offline.py --model DIR --input IN --output OUT --ignore-eos --compilation-cache DIR`, every "
             "other flag at its default (no `--warmup`: a shape compiles when a batch first needs it; 64 sequences, "
             "KV pool from host memory). Wall = the whole process, start to exit, compilation included.", ""]
    lines += ["### Whole-process offline run vs HF transformers", "",
             "| process | wall | peak RSS | its own log |", "|---|---|---|---|"]
    for name, p in (("ours, cold cache (empty dir)", cold), ("ours, warm cache (same dir, second run)", warm)):
        lines.append(f"| {name} | **{p.wall_s:.1f} s** | {p.max_rss_gib:.2f} GiB | {grep(p.text(), GENERATED)}; "
                     f"{grep(p.text(), r'KV pool .*')} |")
    for key, p in hf.items():
        lines.append(f"| HF bs={r['hf_batch']} {'sorted by (output, prompt) length: the baseline' if key == 'sorted' else 'in workload order'} "
                     f"| **{p.wall_s:.1f} s** | {p.max_rss_gib:.2f} GiB | {grep(p.text(), HF_LINE)} |")
    lines += ["", "| ratio HF wall / our wall | cold cache | warm cache |", "|---|---|---|"]
    for key, p in hf.items():
        rc, rw = p.wall_s / cold.wall_s, p.wall_s / warm.wall_s
        tgt = (f" (target >= {TARGETS['cold']:g}x: {verdict(rc >= TARGETS['cold'])})",
               f" (target >= {TARGETS['warm']:g}x: {verdict(rw >= TARGETS['warm'])})") if key == "sorted" else ("", "")
        lines.append(f"| vs HF {key} | **{rc:.2f}x**{tgt[0]} | **{rw:.2f}x**{tgt[1]} |")
    first, prefix = r["agree"]
    lines += ["", f"Sanity: first generated token equal to HF's (baseline) for {100 * first:.0f}% of requests; on average "
              f"{100 * prefix:.0f}% of each request's tokens equal before the first difference (random weights give "
              "near-flat logits, so float32 noise can flip a greedy pick). Cold and warm runs gave "
              f"{'the same' if r['same_tokens'] else '**different**'} tokens. The cold run left {r['cache_files']} "
              f"files ({r['cache_mb']:.1f} MB) in the compilation cache. HF runs with 2 torch threads; its wall time "
              "includes importing torch and transformers and loading the folder, as ours includes importing jax.", ""]
    return lines


def compile_s(c: dict[str, Any]) -> float:
    """Seconds spent compiling during warm-up: tracing + lowering + XLA, from JAX's own timers."""
    return c["jaxpr_trace_duration"] + c["jaxpr_to_mlir_module_duration"] + c["backend_compile_duration"]


def depth_ratios(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Deepest / shallowest per shape: (compile seconds, warm-up wall)."""
    lo, hi = rows[0], rows[-1]
    return ((compile_s(hi) / hi["shapes"]) / (compile_s(lo) / lo["shapes"]),
            (hi["warmup_s"] / hi["shapes"]) / (lo["warmup_s"] / lo["shapes"]))


def render_compile(r: dict[str, Any]) -> list[str]:
    rows = r["compile"]
    lines = ["### Compile seconds per shape vs depth (OPT-125m width: D 768, 12 heads, ffn 3072, vocab 50272)", "",
             f"A fresh process per depth, compilation cache off, `LLMEngine` colocated, max_num_seqs {r['seqs']}, "
             f"max_model_len {r['model_len']}; `engine.warmup()` timed; programs from "
             "`jaxserve.compile_cache.compile_count()`; compiling = JAX's own timers (`jax.monitoring` durations: "
             "trace to jaxpr + lower to MLIR + XLA backend compile). The rest of the warm-up wall is running each "
             "compiled shape once (deeper models run more layers) and host work.", "",
             "| layers | shapes | programs compiled | warm-up wall | compiling (trace + lower + XLA) | "
             "compile s / shape | warm-up s / shape | process peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['layers']} | {c['shapes']} | {c['compiled']} | {c['warmup_s']:.1f} s | "
                     f"{compile_s(c):.1f} s ({c['jaxpr_trace_duration']:.1f} + {c['jaxpr_to_mlir_module_duration']:.1f}"
                     f" + {c['backend_compile_duration']:.1f}) | {compile_s(c) / c['shapes']:.2f} | "
                     f"{c['warmup_s'] / c['shapes']:.2f} | {c['max_rss_gib']:.2f} GiB |")
    ratio, wall = depth_ratios(rows)
    lines += ["", f"Compile seconds per shape, {rows[-1]['layers']} layers / {rows[0]['layers']} layers = "
              f"**{ratio:.2f}x** (target within {TARGETS['depth']:g}x: {verdict(ratio <= TARGETS['depth'])}); "
              f"warm-up wall per shape {wall:.2f}x.", ""]
    return lines


def render_launch(r: dict[str, Any]) -> list[str]:
    lines = ["### `python -m jaxserve.launch` (demo model, defaults) to ready", "",
             "$JAXSERVE_CACHE and the compilation cache start empty: the cold start also builds the native CPU kernels "
             "(the demo model is shipped trained). Default deployment: one prefill and one decode instance in one process. Time from "
             "process start to the line `jaxserve: ready`; then SIGINT.", "",
             "| start | to ready | target | warm-up line | peak RSS |", "|---|---|---|---|---|"]
    for key, tgt in (("cold", "ready_cold"), ("second", "ready_second")):
        p = r["launch"][key]
        lines.append(f"| {key} | **{p.ready_s:.1f} s** | <= {TARGETS[tgt]:g} s: {verdict(p.ready_s <= TARGETS[tgt])} | "
                     f"{grep(p.text(), WARM_LINE)} | {p.max_rss_gib:.2f} GiB |")
    return [*lines, ""]


def render(r: dict[str, Any]) -> str:
    title = "## Start-up and offline speed (issue 13)" if not r["partial"] else \
        f"### Start-up and offline speed (issue 13): a separate run of {', '.join(r['parts'])} only"
    lines = [title, "", f"Command: `{r['command']}`  ",
             f"Started {r['started']}, {r['total_s'] / 60:.0f} min in all; commit {r['ctx']['commit']}; load average "
             f"(1 min) {r['load'][0]:.2f} at start, {r['load'][1]:.2f} at end; {r['ctx']['machine']}.", ""]

    if "ours" in r:
        lines += render_offline(r)
    if "compile" in r:
        lines += render_compile(r)
    if "launch" in r:
        lines += render_launch(r)
    lines += ["### Targets", "", "| target | figure | |", "|---|---|---|"]
    lines += [f"| {name} | {fig} | {verdict(ok)} |" for name, fig, ok in summary(r)]
    if r["partial"]:  # one level down, under the title
        lines = [lines[0]] + ["#" + x if x.startswith("### ") else x for x in lines[1:]]
    return "\n".join(lines) + "\n"


def summary(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out = []
    if "ours" in r:
        base, (cold, warm) = r["hf"]["sorted"].wall_s, (r["ours"][k] for k in ("cold", "warm"))
        out += [(f"offline vs HF, cold cache >= {TARGETS['cold']:g}x", f"{base / cold.wall_s:.2f}x",
                 base / cold.wall_s >= TARGETS["cold"]),
                (f"offline vs HF, warm cache >= {TARGETS['warm']:g}x", f"{base / warm.wall_s:.2f}x",
                 base / warm.wall_s >= TARGETS["warm"]),
                (f"offline peak RSS < {TARGETS['rss_gib']:g} GB", f"{cold.max_rss_gib * GIB / 1e9:.2f} GB cold, "
                 f"{warm.max_rss_gib * GIB / 1e9:.2f} GB warm", max(cold.max_rss_gib, warm.max_rss_gib) * GIB / 1e9
                 < TARGETS["rss_gib"])]
    if "compile" in r:
        ratio, wall = depth_ratios(r["compile"])
        out.append((f"compile s/shape, deep / shallow <= {TARGETS['depth']:g}x",
                    f"{ratio:.2f}x (warm-up wall per shape {wall:.2f}x)", ratio <= TARGETS["depth"]))
    if "launch" in r:
        for key, tgt in (("cold", "ready_cold"), ("second", "ready_second")):
            s = r["launch"][key].ready_s
            out.append((f"launcher to ready, {key} <= {TARGETS[tgt]:g} s", f"{s:.1f} s", s <= TARGETS[tgt]))
    return out

