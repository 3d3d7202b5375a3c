"""vLLM's token utility routes: text or a chat in, token ids out, and back; the server's version.

    POST /tokenize    {"prompt": str, "add_special_tokens": true} | {"messages": [...], ...}
                      --worker thread: the chat route's rendering (chat), encode--> {"count",
                      "max_model_len", "tokens"}
    POST /detokenize  {"tokens": [ids]} --decode--> {"prompt": str}
    GET  /version     {"version": jaxserve.__version__}

The bodies go through the same reading (size, Content-Type, body timeout) and JSON parsing as the
completion routes; fields outside these shapes get a 400 naming them. With an API key the two POST
routes need it too (they spend the server's CPU).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

import jaxserve
from jaxserve.serving.fields import bad, check_token_ids, get_bool, show
from jaxserve.serving.protocol import chat_prompt, check_model, encode_text

TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "continue_final_message", "chat_template_kwargs"})


def tokenize_body(body: dict[str, Any], st: Any) -> dict[str, Any]:
    """The answer to a /tokenize body (runs on the parse thread: a long text is milliseconds)."""
    check_model(body, st)
    for key in body:
        if key not in TOKENIZE_FIELDS:
            raise bad(str(key)[:60], "is not a field of /tokenize", code="unsupported_parameter")
    if ("prompt" in body) == ("messages" in body):
        raise bad("prompt", "give exactly one of prompt (a string) or messages (a chat)")
    if "messages" in body:  # as the chat route renders it (the model's template, or the fixed one)
        text, add_bos = chat_prompt(body, st)
        field = "messages"
    else:
        text, add_bos, field = body["prompt"], True, "prompt"
        if not isinstance(text, str):
            raise bad("prompt", f"must be a string, got {show(text)}")
    add_bos = get_bool(body, "add_special_tokens", add_bos)
    ids = encode_text(text, st, field, add_bos)
    return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}


def detokenize_body(body: dict[str, Any], st: Any) -> dict[str, Any]:
    check_model(body, st)
    for key in body:
        if key not in ("model", "tokens"):
            raise bad(str(key)[:60], "is not a field of /detokenize", code="unsupported_parameter")
    ids = body.get("tokens")
    if not isinstance(ids, list):
        raise bad("tokens", f"must be a list of token ids, got {show(ids)}")
    if st.tokenizer is None:
        raise bad("tokens", "this model has no tokenizer")
    return {"prompt": st.tokenizer.decode(check_token_ids(ids, "tokens", st.vocab_size))}


async def _run(http: web.Request, fn: Any) -> web.Response:
    from jaxserve.serving.api_server import STATE, decode_json, read_body

    st = http.app[STATE]
    raw = await read_body(http, st)
    out = await asyncio.get_running_loop().run_in_executor(st.parser, lambda: fn(decode_json(raw), st))
    return web.json_response(out)


async def tokenize(http: web.Request) -> web.Response:
    return await _run(http, tokenize_body)


async def detokenize(http: web.Request) -> web.Response:
    return await _run(http, detokenize_body)


async def version(http: web.Request) -> web.Response:
    return web.json_response({"version": jaxserve.__version__})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
