"""A model's own chat template (jinja, from its tokenizer folder), rendered as transformers renders it.

    tokenizer folder: chat_template.jinja | tokenizer_config.json "chat_template"  (jaxserve.tokenizer)
      --ChatTemplate(source, special tokens)--> compiled once in jinja2's immutable sandbox
      --render(messages, add_generation_prompt, continue_final_message)--> the prompt text
      (the same environment as transformers' ``apply_chat_template``: trim_blocks, lstrip_blocks,
      loop controls, ``tojson``, ``raise_exception``, ``strftime_now``; the special tokens
      ``bos_token``, ``eos_token``, ... as variables)

A template that raises (``raise_exception``, or any jinja error) becomes a ``ChatError`` naming
``messages``: the client gets a 400, never a 500. ``end_of_turn_ids``: the template's end-of-turn
tokens (``<|im_end|>``, ``<|eot_id|>``, ...), which chat requests stop at unless ``ignore_eos``. Models without a template use the fixed one in
``jaxserve.serving.chat``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from jaxserve.serving.chat import ChatError, content_text


def _raise(message: str) -> None:
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# what chat templates end an assistant turn with: ChatML (Qwen, many fine-tunes), Llama-3, Phi-3, Gemma
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class ChatTemplate:
    """One compiled template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from e
        self.special_tokens = dict(special_tokens or {})
        self.source = source

    def end_of_turn_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """Tokens that end an assistant turn in this template, which chat requests stop at by default: the
        well-known end-of-turn markers the template writes and the vocabulary holds (the model's EOS stops
        anyway)."""
        out = []
        for marker in END_OF_TURN_MARKERS:
            i = tokenizer.token_to_id(marker) if marker in self.source else None
            if i is not None and i != getattr(tokenizer, "eos_token_id", None) and i not in out:
                out.append(i)
        return tuple(out)

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, variables: dict[str, Any] | None = None) -> str:
        """The prompt text. Content given as text parts is joined into one string first (a text-only
        model's templates expect strings); ``variables``: extra template variables
        (``chat_template_kwargs``), which cannot replace ``messages`` or ``add_generation_prompt``."""
        if continue_final_message and add_generation_prompt:
            raise ChatError("continue_final_message: cannot be combined with add_generation_prompt",
                            "continue_final_message")
        msgs = [{**m, "content": content_text(m["content"], f"messages[{i}].content")} for i, m in enumerate(messages)]
        ctx = {**self.special_tokens, **(variables or {}), "messages": msgs,
               "add_generation_prompt": add_generation_prompt}
        try:
            text = self.template.render(ctx)
        except Exception as e:  # raise_exception, or a template that trips on these messages: the client's 400
            raise ChatError(f"messages: the model's chat template refused them: {type(e).__name__}: {e}",
                            "messages") from e
        if continue_final_message:  # end the prompt right after the last message's text (as transformers)
            final = msgs[-1]["content"] if msgs else None
            if not isinstance(final, str) or not final.strip() or final.strip() not in text:
                raise ChatError("continue_final_message: the last message's text must be non-empty and appear in "
                                "the rendered prompt", "continue_final_message")
            cut = final if final in text else final.strip()
            text = text[: text.rindex(cut) + len(cut)]
        return text
