"""Tiny tokenizer folders for tests: the demo BPE written in the layouts HF checkpoints use."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from jaxserve.model.demo_data import save_demo_tokenizer, train_demo_tokenizer

# What facebook/opt-* ship next to vocab.json + merges.txt (GPT2Tokenizer, </s> as BOS).
OPT_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False},
    "unk_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False},
    "pad_token": {"__type": "AddedToken", "content": "<pad>", "lstrip": False, "rstrip": False},
    "add_bos_token": True,
    "add_prefix_space": False,
    "errors": "replace",
}


@functools.cache
def demo_tokenizer_json() -> str:
    """The trained demo tokenizer as tokenizer.json text (trained once per test session)."""
    return train_demo_tokenizer().to_str()


def write_tokenizer_json_dir(directory: Path) -> Path:
    """A folder with tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast)."""
    save_demo_tokenizer(directory)
    return directory


def write_vocab_merges_dir(directory: Path) -> Path:
    """A folder laid out like facebook/opt-*: vocab.json, merges.txt, tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    HFTokenizer.from_str(demo_tokenizer_json()).model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))
    return directory
