"""HF tokenizer files in; token ids and streamed text out.

    folder (tokenizer.json | vocab.json + merges.txt, [tokenizer_config.json],
            [special_tokens_map.json])
      -> Tokenizer.from_dir -> encode(text) -> [bos] + ids        (OPT: bos = </s> = 2)
                            -> decode(ids) -> text
                            -> detokenizer(prompt_ids) -> IncrementalDetokenizer
                                 .add(token_id) -> new text piece (streamed over SSE)

The api server encodes prompts; the orchestrator keeps one IncrementalDetokenizer per
request and streams the pieces it returns. Everything here is host Python on top of the
`tokenizers` library; nothing imports jax. Any unreadable input raises TokenizerError,
whose message names the file and the problem.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Tokens OPT's GPT-2 BPE carries at ids 0..3.
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# How many prompt tokens the detokenizer decodes as left context (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer folder or file cannot be used; the message names the file and why."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON: {exc}") from exc


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    _read_json(path)  # a clear message for truncated or non-UTF-8 files
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {exc}") from exc


def _load_vocab_merges(vocab_path: Path, merges_path: Path) -> HFTokenizer:
    """Build OPT's tokenizer from GPT-2 files: byte-level BPE, no prefix space, no post-processor."""
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise TokenizerError(f"{vocab_path}: expected a JSON object mapping token strings to integer ids")
    if not vocab:
        raise TokenizerError(f"{vocab_path}: the vocabulary is empty")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{merges_path}: cannot read: {exc}") from exc
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise TokenizerError(f"{merges_path}: line {lineno} is not a merge of two vocab tokens: {line!r}")
        merges.append((parts[0], parts[1]))
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as exc:
        raise TokenizerError(
            f"{vocab_path}: cannot build a BPE model with {merges_path.name}: {exc}"
        ) from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in OPT_SPECIAL_TOKENS if t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(root: Path) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers >= 4.50 writes it), else
    tokenizer_config.json's "chat_template" (a string, or a list of named ones: "default")."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    cfg_path = root / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise TokenizerError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    return t


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> the byte it encodes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class Tokenizer:
    """Encode/decode with OPT conventions on top of a `tokenizers.Tokenizer`."""

    def __init__(self, tok: HFTokenizer, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> None:
        self._tok = tok
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = None  # the model's jinja chat template, if it ships one
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ...: the template's variables

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (preferred) or vocab.json + merges.txt from a HF model folder."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: tokenizer directory does not exist or is not a directory")
        tok_json, vocab, merges = root / "tokenizer.json", root / "vocab.json", root / "merges.txt"
        if tok_json.exists():
            source, tok = tok_json, _load_tokenizer_json(tok_json)
        elif vocab.exists() or merges.exists():
            for needed in (vocab, merges):
                if not needed.exists():
                    raise TokenizerError(f"{needed}: missing (vocab.json and merges.txt must come together)")
            source, tok = vocab, _load_vocab_merges(vocab, merges)
        else:
            raise TokenizerError(f"{tok_json}: missing, and no vocab.json + merges.txt in {root} either")

        # Special tokens: OPT defaults, overridden by special_tokens_map.json, then tokenizer_config.json.
        names = {"bos": "</s>", "eos": "</s>", "pad": "<pad>"}
        named_in = {key: source for key in names}
        for cfg_path in (root / "special_tokens_map.json", root / "tokenizer_config.json"):
            if not cfg_path.exists():
                continue
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object")
            for key in names:
                content = _token_content(cfg.get(f"{key}_token"))
                if content is not None:
                    names[key], named_in[key] = content, cfg_path
        ids: dict[str, int] = {}
        for key, content in names.items():
            token_id = tok.token_to_id(content)
            if token_id is None and key == "pad" and named_in[key] == source:
                token_id = ids["eos"]  # no <pad> anywhere: pad with eos
            if token_id is None:
                raise TokenizerError(f"{named_in[key]}: {key} token {content!r} is not in the vocabulary")
            ids[key] = token_id
        out = cls(tok, ids["bos"], ids["eos"], ids["pad"])
        out.special_tokens = {f"{k}_token": v for k, v in names.items()}
        out.chat_template = _chat_template(root)
        return out

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, OPT style: [bos] + ids. The file's post-processor is never applied."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. half a character) comes out as U+FFFD.

        Ids past the tokenizer's vocabulary (OPT pads its embedding to 50272 > 50265) are dropped.
        """
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: byte-level BPE symbols mapped back to bytes (GPT-2's table);
        a special or non-byte-level token as its UTF-8 text; an id outside the vocabulary as b""."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary token (e.g. a stop token), or None if absent."""
        return self._tok.token_to_id(token)

    def detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        """Streaming decode state for one request whose prompt was `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns one request's output tokens into text pieces as they arrive.

    vLLM's prefix_offset/read_offset scheme: ids[prefix_offset:read_offset] is text already
    emitted, kept as left context; each add decodes ids[prefix_offset:], emits what extends
    past the context, and holds back while the window's text ends in U+FFFD (a character
    split across tokens). Cost per token is O(window), not O(output length).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would glue onto the output; decode the output alone then.
        if tokenizer.decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []  # emitted text, joined lazily by .text

    def add(self, token_id: int) -> str:
        """Append one output token; return the new text it completes ("" if none yet)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """End of stream: return any held-back text (a trailing broken character as U+FFFD)."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        piece = new_text[len(prefix_text) :]
        # Drop the consumed left context so the window stays a handful of tokens.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece
