"""The fixed chat template: OpenAI ``messages`` in, one prompt string out (OPT ships no template; a
model that ships one is rendered with it instead: ``jaxserve.serving.chat_template``).

    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
      --render_chat-->  "System: Be brief.\\nUser: Hi\\nAssistant:"
      --tokenizer.encode--> [bos] + ids --> the same path as /v1/completions

The template, one line per message, then the cue for the reply:

    System: <content>
    User: <content>
    Assistant: <content>
    ...
    Assistant:

Roles are ``system`` (or ``developer``, OpenAI's newer name for it), ``user`` and ``assistant``; ``content`` is a string or a list of
``{"type": "text", "text": ...}`` parts (joined with no separator). The model continues
after ``Assistant:``; nothing stops it at the next turn unless the client passes
``stop: ["\\nUser:"]`` (``CHAT_TURN_STOP``). Invalid messages raise ``ChatError``, whose
``param`` names the offending field (``messages[1].role``) for the server's 400 answer;
``check_messages`` is that validation alone (both templates use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLE_PREFIX = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
REPLY_CUE = "Assistant:"
CHAT_TURN_STOP = "\nUser:"  # what a client may pass as a stop string to end the reply at the next turn
MAX_MESSAGES = 4096


class ChatError(ValueError):
    """A message is invalid; ``param`` names the field (``messages[i].content``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            p = f"{where}[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatError(f"{p}: only {{\"type\": \"text\", \"text\": ...}} parts are supported", p)
            if not isinstance(part.get("text"), str):
                raise ChatError(f"{p}.text: must be a string", f"{p}.text")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatError(f"{where}: must be a string or a list of text parts, got {type(content).__name__}", where)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages, checked (roles, text content); raises ChatError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where}: must be an object with role and content", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLE_PREFIX:  # a list or object role is unhashable
            raise ChatError(f"{where}.role: must be one of {', '.join(ROLE_PREFIX)}, got {role!r}", f"{where}.role")
        if "content" not in m or m["content"] is None:
            raise ChatError(f"{where}.content: is required", f"{where}.content")
        content_text(m["content"], f"{where}.content")
    return messages


def render_chat(messages: Sequence[Any]) -> str:
    """The prompt for ``messages`` under the fixed template above; raises ChatError naming the bad field."""
    lines = [f"{ROLE_PREFIX[m['role']]}: {content_text(m['content'], '')}" for m in check_messages(messages)]
    lines.append(REPLY_CUE)
    return "\n".join(lines)
