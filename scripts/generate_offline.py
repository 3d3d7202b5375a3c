#!/usr/bin/env python
"""Offline batch generation: a JSONL file of prompts in, a JSONL file of completions out.

    IN.jsonl  {"prompt": str} | {"prompt_token_ids": [int]}  (+ optional "max_tokens")   one per line
      --validate each line (bad lines are reported by line number and skipped)-->
    jaxserve.LLM.generate (greedy unless told otherwise)
      --> OUT.jsonl, in input order: {"prompt", "text", "token_ids", "finish_reason"}
          (a bad input line gets {"line": N, "error": "..."} in its place)

With no --model, the built-in demo model (random weights: the text is gibberish).
Compiled programs are kept in the persistent compilation cache (--compilation-cache, default
~/.cache/jaxserve/xla), so a second run with the same model and limits compiles nothing; shapes
compile as the batch first needs them, or all up front with --warmup (progress on stderr).
With --prompt instead of --input, prompts come from the command line and results
go to stdout. Exit status: 0 if any line was generated, 1 if nothing could be done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALLOWED_KEYS = {"prompt", "prompt_token_ids", "max_tokens"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate completions for a JSONL file of prompts with jaxserve (offline, batched).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF OPT folder or converted (orbax) folder; default: the built-in demo model")
    p.add_argument("--config", default=None,
                   help="deployment YAML (configs/deploy/) or a planner plan JSON: e.g. one prefill and one "
                        "decode instance; default: one colocated instance on one device")
    p.add_argument("--mode", default="colocated", choices=["colocated", "chunked"],
                   help="colocated: prefill-first continuous batching; chunked: Sarathi-style chunked prefill")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", type=Path, help='JSONL input: one {"prompt": ...} or {"prompt_token_ids": [...]} per line')
    src.add_argument("--prompt", action="append", help="a prompt given inline (repeatable), instead of --input")
    p.add_argument("--output", type=Path, default=None, help="JSONL output path (default: stdout)")
    p.add_argument("--max-tokens", type=int, default=64, help="default max new tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache in GiB (default: half the host memory left after the weights, at most what "
                        "--max-num-seqs sequences of --max-model-len tokens can use)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together (default: 64)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn off automatic prefix caching (prompts sharing leading blocks reuse their KV)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", action="store_true",
                   help="compile every shape the engine can run before generating, with progress on stderr; "
                        "without it, each shape compiles when the batch first needs it")
    p.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                   help="where compiled programs are kept between runs; off: compile at every run (unset: "
                        "$JAXSERVE_COMPILATION_CACHE, else $JAXSERVE_CACHE/xla, i.e. ~/.cache/jaxserve/xla)")
    args = p.parse_args(argv)
    if args.input is None and not args.prompt:
        args.prompt = ["Hello, my name is", "The weather today is"]
    if args.max_tokens <= 0:
        p.error(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        p.error(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    for name in ("max_model_len", "max_num_seqs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def read_lines(args: argparse.Namespace) -> list[tuple[int, Any]]:
    """(line number, parsed JSON object or an error string) for each non-blank input line."""
    if args.prompt:
        return [(i + 1, {"prompt": t}) for i, t in enumerate(args.prompt)]
    try:
        text = args.input.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read --input {args.input}: {e}") from e
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
    return out


def validate(obj: Any, llm: Any, base: Any) -> tuple[list[int], Any, Any]:
    """One input object -> (token ids, SamplingParams, prompt); raises ValueError naming the problem."""
    from jaxserve.request import SamplingParams

    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(ALLOWED_KEYS)}")
    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError('give exactly one of "prompt" or "prompt_token_ids"')
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f'"prompt" must be a string, got {type(prompt).__name__}')
    if prompt is None and not isinstance(obj["prompt_token_ids"], list):
        raise ValueError('"prompt_token_ids" must be a list of integers')
    sp = base
    if "max_tokens" in obj:
        sp = SamplingParams(**{**_fields(base), "max_tokens": obj["max_tokens"]})
    req = llm.make_request(prompt if prompt is not None else obj["prompt_token_ids"], sp)
    return req.prompt_token_ids, sp, prompt


def smallest_block_size(config: str | None) -> int:
    """The smallest KV block any instance uses (counting in it over-counts for larger blocks: a safe cap)."""
    from jaxserve.config import DeploymentConfig, EngineConfig

    default = EngineConfig().block_size
    if config is None:
        return default
    return min(dict(i.engine).get("block_size", default) for i in DeploymentConfig.load(config).instances)


def workload_blocks(lines: list[tuple[int, Any]], tokenizer: Any, base: Any, block_size: int) -> int | None:
    """KV blocks of ``block_size`` that every readable request needs at once (prompt + max_tokens each);
    lines that will be rejected count nothing. None when no line is readable."""
    total = 0
    for _, obj in lines:
        if not isinstance(obj, dict):
            continue
        prompt, ids = obj.get("prompt"), obj.get("prompt_token_ids")
        if isinstance(prompt, str) and tokenizer is not None:
            n = len(tokenizer.encode(prompt))
        elif isinstance(ids, list):
            n = len(ids)
        else:
            continue
        out = obj.get("max_tokens", base.max_tokens)
        out = out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else base.max_tokens
        total += -(-(n + out) // block_size)
    return total or None


def _fields(sp: Any) -> dict[str, Any]:
    import dataclasses
    return {f.name: getattr(sp, f.name) for f in dataclasses.fields(sp)}


def ensure_cpu_devices(config: str | None) -> None:
    """A multi-instance deployment on a CPU host needs that many virtual devices, set before jax starts."""
    if config is None:
        return
    from jaxserve.config import ConfigError, DeploymentConfig, ensure_host_devices

    try:
        ensure_host_devices(DeploymentConfig.load(config).num_devices)
    except ConfigError:
        return  # reported properly when the engine is built


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxserve import native

    native.build_in_background()  # the CPU kernels build (~4 s, once) while jax imports and the model loads
    ensure_cpu_devices(args.config)
    from tqdm import tqdm

    from jaxserve.compile_cache import enable_compilation_cache, setting
    from jaxserve.llm import LLM
    from jaxserve.logs import show_logs
    from jaxserve.model.checkpoint import load_model
    from jaxserve.request import SamplingError, SamplingParams
    from jaxserve.tokenizer import Tokenizer

    try:
        base = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    except SamplingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = read_lines(args)
    show_logs()  # the KV pool's size, and why
    engine_kw = {k: getattr(args, k) for k in ("kv_cache_gb", "max_model_len", "max_num_seqs", "mode", "config")
                 if getattr(args, k) is not None}
    if args.no_prefix_caching:
        engine_kw["prefix_caching"] = False
    cache = enable_compilation_cache(args.compilation_cache)  # before anything compiles; logs where
    try:
        lm = load_model(args.model, args.dtype)
        if args.kv_cache_gb is None:  # the KV pool holds what these requests can use at once, no more
            tok = Tokenizer.from_dir(lm.tokenizer_dir) if lm.tokenizer_dir is not None else None
            engine_kw["workload_blocks"] = workload_blocks(lines, tok, base, smallest_block_size(args.config))
        llm = LLM(lm, dtype=args.dtype, warmup=args.warmup, compilation_cache=setting(cache), **engine_kw)
        del lm  # the host copy of the weights: the engine holds its own
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results: dict[int, dict[str, Any]] = {}
    good: list[tuple[int, list[int], Any, Any]] = []
    for n, obj in lines:
        try:
            if isinstance(obj, str):
                raise ValueError(obj)
            ids, sp, prompt = validate(obj, llm, base)
            good.append((n, ids, sp, prompt))
        except ValueError as e:  # SamplingError is a ValueError
            print(f"line {n}: {e}", file=sys.stderr)
            results[n] = {"line": n, "error": str(e)}
    t0 = time.perf_counter()
    n_gen = 0
    if good:
        with tqdm(total=len(good), desc="generating", unit="req", file=sys.stderr) as bar:
            outs = llm.generate([g[1] for g in good], [g[2] for g in good], progress=bar.update)
        for (n, _, _, prompt), o in zip(good, outs, strict=True):
            results[n] = {"prompt": prompt if prompt is not None else o.prompt_token_ids, "text": o.text,
                          "token_ids": o.token_ids, "finish_reason": o.finish_reason.value}
            n_gen += len(o.token_ids)
    dt = time.perf_counter() - t0
    out_text = "".join(json.dumps(results[n], ensure_ascii=False) + "\n" for n, _ in lines)
    if args.output is None:
        sys.stdout.write(out_text)
    else:
        args.output.write_text(out_text, encoding="utf-8")
    n_prompt = sum(len(g[1]) for g in good)
    print(f"model {llm.model_name}: {len(good)} requests ({len(lines) - len(good)} rejected), "
          f"{n_prompt} prompt tokens, {n_gen} generated tokens in {dt:.2f} s "
          f"({n_gen / dt if dt > 0 else 0.0:.1f} tok/s)", file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
