"""Token logprobs in OpenAI's two shapes, from the sampler's entries.

    Request.output_logprobs / Delta.logprobs: per token (logprob, ((id, logprob) most likely first))
      --completion_logprobs--> {"tokens", "token_logprobs", "top_logprobs": [{text: lp}], "text_offset"}
      --chat_logprobs-->       {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}

A token's text is its bytes (``Tokenizer.token_bytes``) decoded as UTF-8 with U+FFFD for a partial
character, as vLLM shows it (special tokens, which the answer's text skips, as ""); ``bytes`` carries the exact bytes (chat). A completions
``top_logprobs`` object holds the ``logprobs`` most likely tokens and the sampled one (vLLM's
choice: the sampled token is always there, so a client can read its rank); tokens with the same
text share a key. Prompt logprobs (``echo`` with ``logprobs``) come first, the first token's null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxserve.request import TokenLogprobs


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """A token's bytes in the answer: special tokens (BOS, EOS, padding), which its text skips, have none."""
    if token_id in {getattr(tokenizer, f, None) for f in ("bos_token_id", "eos_token_id", "pad_token_id")}:
        return b""
    return tokenizer.token_bytes(token_id)


def token_text(tokenizer: Any, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer: Any, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None],
                        offset: int) -> dict[str, Any]:
    """Completions' object for ``token_ids`` (an entry None: the prompt's first token), whose text starts
    at character ``offset`` of the choice's text."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, tok)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top = entry
        out["token_logprobs"].append(lp)
        alts = {token_text(tokenizer, i): v for i, v in reversed(top)}  # the likelier wins a shared key
        alts.setdefault(text, lp)
        out["top_logprobs"].append(alts)
    return out


def chat_logprobs(tokenizer: Any, token_ids: Sequence[int], entries: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """Chat's object: ``{"content": [...]}``, one item per generated token."""

    def item(i: int, lp: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, i), "logprob": lp, "bytes": list(token_bytes(tokenizer, i))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                        for t, (lp, top) in zip(token_ids, entries, strict=True)]}


def text_length(tokenizer: Any, token_ids: Sequence[int]) -> int:
    """Characters the tokens' texts take (a completions stream's running ``text_offset``)."""
    return sum(len(token_text(tokenizer, t)) for t in token_ids)
