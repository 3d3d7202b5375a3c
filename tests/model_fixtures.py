"""Tiny random OPT checkpoints in Hugging Face layout, built with transformers (no network).

    make_hf_opt(dir, variant, fmt) -> (dir, OPTForCausalLM)
      variant: "pre_ln" (OPT-125m style) | "post_ln_project" (OPT-350m style: post-LN, project_in/out)
      fmt:     "safetensors" | "sharded" (safetensors + index) | "bin" | "bin_sharded" (torch .bin + index)

The demo tokenizer (trained by ``tokenizers`` on a few KB of text) is saved into
the same folder, so a test folder looks like a real HF model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

from jaxserve.model.demo_data import save_demo_tokenizer

VOCAB = 512  # the demo tokenizer's vocabulary


def hf_config(variant: str = "pre_ln", **kw) -> OPTConfig:
    pre = variant == "pre_ln"
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=64 if pre else 32,
                do_layer_norm_before=pre, init_std=0.1, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    base.update(kw)
    return OPTConfig(**base)


def make_hf_opt(out_dir: Path, variant: str = "pre_ln", fmt: str = "safetensors", seed: int = 0,
                **kw) -> tuple[Path, OPTForCausalLM]:
    torch.manual_seed(seed)
    model = OPTForCausalLM(hf_config(variant, **kw)).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(out_dir)
    elif fmt == "sharded":
        model.save_pretrained(out_dir, max_shard_size="100KB")
        assert (out_dir / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
    elif fmt in ("bin", "bin_sharded"):
        # transformers 5 writes safetensors only; write the classic torch format the old way
        model.config.save_pretrained(out_dir)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        if fmt == "bin":
            torch.save(sd, out_dir / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
            weight_map = {}
            for i, part in enumerate(halves):
                name = f"pytorch_model-0000{i + 1}-of-00002.bin"
                torch.save({k: sd[k] for k in part}, out_dir / name)
                weight_map.update(dict.fromkeys(part, name))
            (out_dir / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    save_demo_tokenizer(out_dir)
    return out_dir, model


def hf_greedy(model: OPTForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF's greedy continuation of one prompt alone, cut after EOS (HF pads after it; we stop)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    ref = out[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return ref[: ref.index(eos) + 1] if eos in ref else ref


def greedy_case(out_dir: Path, seed: int, lengths: list[int], max_new_tokens: int
                ) -> tuple[Path, list[list[int]], list[list[int]]]:
    """A tiny pre-LN HF folder, random prompts of ``lengths`` (BOS first) and HF's greedy output for each."""
    import numpy as np

    d, _ = make_hf_opt(out_dir, "pre_ln")
    hf = OPTForCausalLM.from_pretrained(d).eval()
    rng = np.random.default_rng(seed)
    prompts = [[2, *rng.integers(3, hf.config.vocab_size, n - 1).tolist()] for n in lengths]
    return d, prompts, [hf_greedy(hf, p, max_new_tokens) for p in prompts]
