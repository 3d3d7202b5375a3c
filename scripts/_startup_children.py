"""The programs bench_startup.py runs as whole processes of their own (besides generate_offline and the
launcher), so that each pays its own imports and nothing of the driver's:

    python scripts/_startup_children.py inputs --dir WORK --num-prompts 48 [--quick] [--seed 0]
      OPT-125m-shaped random float32 weights --export_hf--> WORK/opt-125m; bench_offline's Workload -->
      WORK/prompts.jsonl ({"prompt_token_ids", "max_tokens"} per line), WORK/workload.json (its summary)
    python scripts/_startup_children.py hf --model DIR --input IN.jsonl --output OUT.jsonl [--batch-size 16] [--sort]
      IN ({"prompt_token_ids", "max_tokens"} per line) --import torch/transformers, from_pretrained(DIR),
      left-padded greedy batched generate (min_new_tokens = max_new_tokens = the batch's longest)-->
      OUT ({"token_ids"} per line, input order)
    python scripts/_startup_children.py compile --layers N --output R.json [--max-num-seqs 16] [--max-model-len 512]
      OPT-125m width, N layers, random params --LLMEngine (colocated), compilation cache off,
      warmup() timed, with JAX's trace / lower / XLA-compile timers--> R.json {layers, shapes, warmup_s,
      compiled, programs, jaxpr_trace_duration, jaxpr_to_mlir_module_duration, backend_compile_duration}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# jax.monitoring duration events, per program: tracing to a jaxpr, lowering to MLIR, XLA's compile
COMPILE_PHASES = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")


def inputs_child(argv: list[str]) -> None:
    """Write the checkpoint folder, the prompts and the workload's summary under ``--dir``."""
    p = argparse.ArgumentParser(prog="_startup_children.py inputs")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="bench_offline's quick workload (short prompts)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from bench_offline import Spec, Workload

    from jaxserve.config import model_preset
    from jaxserve.model.demo import random_params_numpy
    from jaxserve.model.loader import export_hf

    cfg = model_preset("opt-125m")
    export_hf(random_params_numpy(cfg, seed=a.seed, std=0.02), cfg, a.dir / "opt-125m")
    spec = Spec.quick(a.num_prompts) if a.quick else Spec(num_prompts=a.num_prompts)
    wl = Workload.make(spec, cfg.vocab_size, a.seed)
    (a.dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": o}) + "\n"
                                                 for p, o in zip(wl.prompts, wl.outputs, strict=True)))
    (a.dir / "workload.json").write_text(json.dumps({
        "num_prompts": spec.num_prompts, "prompt_len": spec.prompt_len, "output_len": spec.output_len,
        "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens}))


def hf_child(argv: list[str]) -> None:
    """One whole HF process: import, load the folder, batched left-padded greedy generate, JSONL out."""
    p = argparse.ArgumentParser(prog="_startup_children.py hf")
    for name in ("--model", "--input", "--output"):
        p.add_argument(name, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sort", action="store_true", help="batch by (output length, prompt length)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    import torch
    from transformers import OPTForCausalLM

    torch.set_num_threads(a.threads)
    t1 = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(a.model, dtype="float32").eval()
    t2 = time.perf_counter()
    from _hf import left_padded_generate

    rows = [json.loads(line) for line in Path(a.input).read_text().splitlines() if line.strip()]
    tokens, raw, _ = left_padded_generate(model, [r["prompt_token_ids"] for r in rows], [r["max_tokens"] for r in rows],
                                          a.batch_size, a.sort, model.config.pad_token_id)
    Path(a.output).write_text("".join(json.dumps({"token_ids": tokens[i]}) + "\n" for i in range(len(rows))))
    print(f"hf: import {t1 - t0:.1f} s, load {t2 - t1:.1f} s, generate {time.perf_counter() - t2:.1f} s "
          f"({raw} tokens generated, {sum(r['max_tokens'] for r in rows)} requested)", file=sys.stderr)



def compile_child(argv: list[str]) -> None:
    """A fresh process, cache off: build an LLMEngine of OPT-125m width and ``--layers`` layers, time warm-up."""
    p = argparse.ArgumentParser(prog="_startup_children.py compile")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    import jax

    from jaxserve.compile_cache import compile_count, enable_compilation_cache, program_count

    enable_compilation_cache("off")
    from jaxserve.config import EngineConfig, model_preset
    from jaxserve.engine.engine import LLMEngine
    from jaxserve.model.demo import random_params_numpy

    cfg = dataclasses.replace(model_preset("opt-125m"), num_hidden_layers=a.layers,
                              name=f"opt-125m-width-{a.layers}-layers")
    blocks = 4 * a.max_model_len // 16 + 1  # a small pool: shapes do not depend on it, memory does
    engine = LLMEngine(cfg, random_params_numpy(cfg, seed=0), EngineConfig(
        mode="colocated", max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, num_blocks=blocks))
    phases = dict.fromkeys(COMPILE_PHASES, 0.0)

    def on_duration(name: str, secs: float, **_: object) -> None:  # JAX's own compile-phase timers
        key = name.rsplit("/", 1)[-1]
        if key in phases:
            phases[key] += secs

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    c0, p0 = compile_count(), program_count()
    t0 = time.perf_counter()
    shapes = engine.warmup()
    dt = time.perf_counter() - t0
    Path(a.output).write_text(json.dumps({"layers": a.layers, "shapes": shapes, "warmup_s": dt, **phases,
                                          "compiled": compile_count() - c0, "programs": program_count() - p0}))


if __name__ == "__main__":
    {"inputs": inputs_child, "hf": hf_child, "compile": compile_child}[sys.argv[1]](sys.argv[2:])
