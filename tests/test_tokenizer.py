"""Tokenizer wrapper: loading, OPT-style encode/decode, streaming detokenization, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from jaxserve.model.demo_data import DEMO_CORPUS, train_demo_tokenizer
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from tests.helpers_tokenizer import demo_tokenizer_json, write_tokenizer_json_dir, write_vocab_merges_dir

TEXTS = [
    "Hello, world.",
    "The weather was grey and cool, about 12 degrees.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\ttabbed",
    "café, naïve, crème brûlée, Zürich",
    "東京 and 大阪 are cities",
    "emoji 🙂🎉🚀 and 👩‍👩‍👧 family",
    "symbols € £ ° ± α β λ",
    "unseen bytes: \u0000 \u00ff \U0001f9ea ✓",
    "",
]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_json_dir(tmp_path_factory.mktemp("tok_json"))


@pytest.fixture(scope="module")
def vm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab_merges_dir(tmp_path_factory.mktemp("tok_vm"))


@pytest.fixture(scope="module")
def tok(json_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(json_dir)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    """Pieces from feeding `ids` one at a time, then finish()'s remainder as the last piece."""
    det = tok.detokenizer(prompt_ids if prompt_ids is not None else [tok.bos_token_id])
    pieces = [det.add(i) for i in ids]
    pieces.append(det.finish())
    assert det.text == "".join(pieces)
    return pieces


# ---- demo tokenizer -------------------------------------------------------------------------


def test_demo_tokenizer_is_deterministic_and_opt_shaped() -> None:
    first, second = train_demo_tokenizer(), train_demo_tokenizer()
    assert first.to_str() == second.to_str()
    assert [first.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert first.get_vocab_size() == 512
    assert len(DEMO_CORPUS.encode()) > 2000


# ---- encode / decode / special tokens -------------------------------------------------------


def test_special_token_ids(tok: Tokenizer, vm_dir: Path) -> None:
    for t in (tok, Tokenizer.from_dir(vm_dir)):
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.vocab_size) == (2, 2, 1, 512)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_single_bos(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == 2 and 2 not in ids[1:]
    assert ids[1:] == tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "</s>" + text


def test_post_processor_bos_is_not_doubled(tmp_path: Path) -> None:
    raw = HFTokenizer.from_str(demo_tokenizer_json())
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    raw.save(str(tmp_path / "tokenizer.json"))
    assert raw.encode("Hello").ids[:2] == [2, 43]  # the file itself would add a BOS
    assert Tokenizer.from_dir(tmp_path).encode("Hello") == [2, 43, 72, 288, 82]


def test_vocab_merges_gives_same_ids(tok: Tokenizer, vm_dir: Path) -> None:
    vm = Tokenizer.from_dir(vm_dir)
    for text in [*TEXTS, DEMO_CORPUS, "a </s> inside <pad> text"]:
        assert vm.encode(text) == tok.encode(text)
        assert vm.decode(vm.encode(text)) == tok.decode(tok.encode(text))


def test_config_overrides_special_tokens(tmp_path: Path) -> None:
    write_tokenizer_json_dir(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "<unk>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 2, 3)
    assert t.encode("Hi")[0] == 0


def test_matches_transformers(json_dir: Path, vm_dir: Path, tok: Tokenizer) -> None:
    """HF's OPT tokenizer (GPT2Tokenizer on vocab/merges) adds </s> like we do; the fast
    PreTrainedTokenizerFast on our tokenizer.json has no post-processor, so it adds none."""
    transformers = pytest.importorskip("transformers")
    fast = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    slow = transformers.AutoTokenizer.from_pretrained(str(vm_dir))
    assert type(slow).__name__ == "GPT2Tokenizer"
    for text in [t for t in TEXTS if t] + [DEMO_CORPUS[:500]]:
        ids = tok.encode(text)
        assert slow(text)["input_ids"] == ids
        assert fast(text)["input_ids"] == ids[1:]
        assert fast.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (2, 2, 1)


# ---- incremental detokenization -------------------------------------------------------------


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + [DEMO_CORPUS])
def test_stream_of_encoded_text(tok: Tokenizer, text: str) -> None:
    pieces = stream(tok, tok.encode(text, add_bos=False))
    assert "".join(pieces) == text
    assert pieces[-1] == ""  # nothing was held back at the end of a whole text
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces).count(" ") == text.count(" ")


def test_stream_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode(" 🙂", add_bos=False)
    assert len(ids) >= 2  # the emoji's 4 bytes span several tokens in the demo vocab
    det = tok.detokenizer([2])
    pieces = [det.add(i) for i in ids]
    assert pieces == [""] * (len(ids) - 1) + [" 🙂"]  # nothing until the character is whole
    assert "".join(pieces) == " 🙂" and det.text == " 🙂"


def test_stream_keeps_leading_space_after_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("The weather")
    out = tok.encode(" was grey and cool", add_bos=False)
    pieces = stream(tok, out, prompt)
    assert pieces[0].startswith(" ")
    assert "".join(pieces) == " was grey and cool"


def test_stream_after_prompt_ending_mid_character(tok: Tokenizer) -> None:
    ids = tok.encode("東京", add_bos=False)
    prompt, out = [2, *ids[:1]], ids[1:]
    assert "".join(stream(tok, out, prompt)) == tok.decode(out)


def test_stream_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode(DEMO_CORPUS * 2, add_bos=False)
    det = tok.detokenizer([2])
    for i in ids:
        det.add(i)
        assert len(det._ids) <= 16  # decode window: a few tokens, not the whole output
    assert det.text == DEMO_CORPUS * 2


def _high_byte_ids() -> list[int]:
    raw = HFTokenizer.from_str(demo_tokenizer_json())
    return [i for i in range(4, raw.get_vocab_size()) if "\ufffd" in raw.decode([i])]


HIGH_BYTE_IDS = _high_byte_ids()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.one_of(st.integers(0, 511), st.sampled_from(HIGH_BYTE_IDS)), max_size=40),
    prompt=st.lists(st.one_of(st.integers(0, 511), st.sampled_from(HIGH_BYTE_IDS)), max_size=8),
)
def test_stream_random_ids_matches_decode(tok: Tokenizer, ids: list[int], prompt: list[int]) -> None:
    full = tok.decode(ids)
    pieces = stream(tok, ids, prompt)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)
    if not full.endswith("\ufffd"):
        assert pieces[-1] == ""  # add() alone already delivered everything


def test_detokenizer_type(tok: Tokenizer) -> None:
    assert isinstance(tok.detokenizer([]), IncrementalDetokenizer)
    assert tok.detokenizer([]).text == ""


# ---- errors ---------------------------------------------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"nope.*does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing.*vocab\.json \+ merges\.txt"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "content", [b'{"version": "1.0", "model": ', b"\xff\xfe not utf-8", b'{"model": {"type": "Nope"}}']
)
def test_corrupt_tokenizer_json(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)


def test_vocab_without_merges(tmp_path: Path, vm_dir: Path) -> None:
    (tmp_path / "vocab.json").write_text((vm_dir / "vocab.json").read_text())
    with pytest.raises(TokenizerError, match=r"merges\.txt: missing"):
        Tokenizer.from_dir(tmp_path)


def test_bad_merges_line(tmp_path: Path, vm_dir: Path) -> None:
    (tmp_path / "vocab.json").write_text((vm_dir / "vocab.json").read_text())
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthis line has three\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt: line 3"):
        Tokenizer.from_dir(tmp_path)


def test_config_names_unknown_token(tmp_path: Path) -> None:
    write_tokenizer_json_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos token '<\|endoftext\|>'"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config(tmp_path: Path) -> None:
    write_tokenizer_json_dir(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"special_tokens_map\.json: cannot read JSON"):
        Tokenizer.from_dir(tmp_path)
