"""OpenAI request bodies in, validated: ``Job`` (a ``Request`` and how to answer it) or ``ApiError``.

    JSON body (dict) --check_model / check_unsupported--> 404 unknown model / 400 unsupported field
      prompt (text: tokenizer.encode; or token ids as given; chat: chat.render_chat first)
      --parse_sampling--> SamplingParams (400 naming the field; 400 context_length_exceeded)
      --parse_jobs--> [Job(Request(cmpl-<hex>, ids, SamplingParams, arrival), chat, stream, usage, token ids)]
      (one Job per prompt: a completions body may carry a list of prompts, answered as choices in order)
    engine-side ValueError --param_of--> the field it is about

Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}`` (``ApiError``).

Choices (documented, as vLLM does them):
  * ``max_tokens`` defaults to 16 for completions (OpenAI's); for chat to the rest of the
    context. A value past the context is capped to ``max_model_len - prompt_tokens`` (the
    request then ends with ``length`` there), not refused; a prompt of ``max_model_len``
    tokens or more is refused (400), since it leaves no room for a token.
  * ``model`` may be omitted (the one served model); any other name is 404.
  * ``top_k`` above the vocabulary means "off" and is sent as 0.
  * Not supported, 400 naming the field if set to anything but its default (``UNSUPPORTED``):
    ``suffix``, ``tools``, vLLM's guided decoding, ... A field in no
    schema is a 400 too (as OpenAI answers "unrecognized request argument"); ``user`` is accepted.
  * ``logit_bias`` ({"token id": bias in [-100, 100]}, at most 64 entries), vLLM's ``min_p`` and
    ``repetition_penalty`` (HF's), OpenAI's ``presence_penalty`` / ``frequency_penalty`` work;
    ``echo`` puts the prompt's text (a token-id prompt decoded) before the completion.
  * ``n`` (and completions' ``best_of``): several samples per prompt, ``jaxserve.serving.samples``.
  * Chat requests stop at the model's template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
    ...: ``ChatTemplate.end_of_turn_ids``) as at EOS, unless ``ignore_eos``.
  * Logprobs (the model's raw log-softmax, up to 20 alternatives): completions ``logprobs: k``, chat
    ``logprobs: true`` + ``top_logprobs: k``; shapes in ``jaxserve.serving.logprobs``. With ``echo``
    the prompt's tokens and logprobs come first (the first token's null): the engine scores the prompt
    (``SamplingParams.prompt_logprobs``; no prefix cache for it, 64 tokens a step).
  * Extensions (vLLM's names): ``ignore_eos``, ``stop_token_ids``, ``min_tokens`` (EOS banned and no
    stop rule applies before it; not with ``stop_token_ids``),
    ``include_stop_str_in_output``, ``return_token_ids`` (adds ``token_ids`` to each choice).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any, Protocol

from jaxserve.request import MAX_LOGPROBS, Request, SamplingError, SamplingParams
from jaxserve.serving.chat import ChatError, check_messages, render_chat
from jaxserve.serving.fields import (
    ApiError,
    bad,
    check_token_ids,
    get_bool,
    get_int,
    get_logit_bias,
    get_num,
    get_stop,
    show,
)
from jaxserve.serving.samples import fan_out, get_samples

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# fields of OpenAI's and vLLM's schemas that this server does not act on: fine at their default (or
# null), refused otherwise (400 naming the field), so none is silently ignored
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "suffix": ("",), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False), "function_call": ("none",), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "modalities": (["text"],),
    "length_penalty": (1, 1.0), "use_beam_search": (False,),
    "prompt_logprobs": (), "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "logits_processors": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
    "chat_template": (), "chat_template_kwargs": ({},), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "documents": (), "priority": (0,), "reasoning_effort": (),
    "prediction": (), "audio": (), "web_search_options": (), "user": None}  # user: an end-user id, kept as is
# fields this server acts on, per route (anything neither here nor above: 400 unknown field)
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                           "ignore_eos", "include_stop_str_in_output", "stream", "stream_options",
                           "return_token_ids", "n", "min_tokens", "min_p", "logit_bias", "logprobs",
                           "presence_penalty", "frequency_penalty", "repetition_penalty"})
CHAT_FIELDS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs"})
ROUTE_FIELDS = {False: COMMON_FIELDS | {"prompt", "echo", "best_of"},
                True: COMMON_FIELDS | CHAT_FIELDS | {"max_completion_tokens", "top_logprobs"}}


# no token of a byte-level BPE vocabulary (OPT, GPT-2, Llama) is longer than this many bytes
MAX_BYTES_PER_TOKEN = 128


class ServedModel(Protocol):
    """What validation needs to know about the model being served."""

    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int


def check_model(body: dict[str, Any], st: ServedModel) -> None:
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise bad("model", f"must be a string, got {show(m)}")
    if m != st.model_name:
        raise ApiError(404, f"The model `{m}` does not exist (this server serves `{st.model_name}`)",
                       param="model", code="model_not_found")


def check_unsupported(body: dict[str, Any], chat: bool = False) -> None:
    """Every field is acted on, at its default, or a 400 naming it (nothing is silently ignored)."""
    for key, v in body.items():
        if key in ROUTE_FIELDS[chat]:
            continue
        if key not in UNSUPPORTED:
            route = "/v1/chat/completions" if chat else "/v1/completions"
            raise bad(str(key)[:60], f"is not a field of {route} on this server", code="unsupported_parameter")
        allowed = UNSUPPORTED[key]
        if allowed is not None and v is not None and not any(v == ok and type(v) is type(ok) for ok in allowed):
            raise bad(key, f"not supported by this server (got {show(v)})", code="unsupported_parameter")


def encode_text(text: str, st: ServedModel, param: str, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt; a text too long to fit the context in any tokenization is refused
    before the tokenizer runs (``MAX_BYTES_PER_TOKEN``)."""
    if st.tokenizer is None:
        raise bad(param, "this model has no tokenizer; send the prompt as a list of token ids")
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): the tokenizer would raise TypeError
        raise bad(param, f"is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}") from e
    limit = st.max_model_len * MAX_BYTES_PER_TOKEN
    if n > limit:
        raise bad(param, f"has {n} bytes; this model's context is {st.max_model_len} tokens, which no text over "
                  f"{limit} bytes fits", code="context_length_exceeded")
    return list(st.tokenizer.encode(text, add_bos=add_bos))


def chat_prompt(body: dict[str, Any], st: ServedModel) -> tuple[str, bool]:
    """A chat body's prompt text, and whether encoding it adds BOS: the model's own template (which
    writes its special tokens itself, so no) or the fixed one (yes; it supports only the defaults)."""
    add_gen = get_bool(body, "add_generation_prompt", True)
    cont = get_bool(body, "continue_final_message", False)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", f"must be an object of template variables, got {show(kwargs)}")
    if {"messages", "add_generation_prompt"} & set(kwargs):
        raise bad("chat_template_kwargs", "must not set messages or add_generation_prompt (they are fields)")
    template = getattr(st, "chat_template", None)
    try:
        messages = check_messages(body.get("messages"))
        if template is not None:
            return template.render(messages, add_generation_prompt=add_gen, continue_final_message=cont,
                                   variables=kwargs), False
    except ChatError as e:
        raise ApiError(400, str(e), param=e.param) from e
    for key, v, default in (("add_generation_prompt", add_gen, True), ("continue_final_message", cont, False),
                            ("chat_template_kwargs", kwargs, {})):
        if v != default:
            raise bad(key, "this model ships no chat template; the fixed one supports only the default",
                      code="unsupported_parameter")
    return render_chat(messages), True


MAX_PROMPTS = 64  # prompts in one completions request (each is a request of its own in the engine)


def parse_prompts(body: dict[str, Any], st: ServedModel) -> list[tuple[list[int], str | None]]:
    """The prompts of a completions body: a string, token ids, or a list of either (a batch)."""
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "is required")
    if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p):
        if len(p) > MAX_PROMPTS:
            raise bad("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(p)}")
        return [_one_prompt(x, st, f"prompt[{i}]" if len(p) > 1 else "prompt") for i, x in enumerate(p)]
    return [_one_prompt(p, st, "prompt")]


def _one_prompt(p: Any, st: ServedModel, where: str) -> tuple[list[int], str | None]:
    if isinstance(p, str):
        if not p:
            raise bad(where, "must not be empty")
        return encode_text(p, st, where), p
    if isinstance(p, list):
        if not p:
            raise bad(where, "must not be empty")
        if any(isinstance(t, str | list) for t in p):
            raise bad(where, "must be a string or a list of token ids; a batch is a list of those")
        return check_token_ids(p, where, st.vocab_size), None
    raise bad(where, f"must be a string or a list of token ids, got {type(p).__name__}")


def get_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token (None: no logprobs). Completions: ``logprobs`` (an integer);
    chat: ``logprobs`` (true/false) and ``top_logprobs`` (an integer, with logprobs true)."""
    if not chat:
        k = get_int(body, "logprobs", None, lo=0)
    else:
        k = get_int(body, "top_logprobs", None, lo=0)
        if not get_bool(body, "logprobs", False):
            if k is not None:
                raise bad("top_logprobs", "needs logprobs: true")
            return None
        k = k or 0
    if k is not None and k > MAX_LOGPROBS:
        raise bad("top_logprobs" if chat else "logprobs", f"at most {MAX_LOGPROBS}, got {k}")
    return k


def parse_sampling(body: dict[str, Any], st: ServedModel, num_prompt: int, max_tokens_keys: tuple[str, ...],
                   default_max_tokens: int | None, prompt_field: str = "prompt",
                   logprobs: int | None = None) -> SamplingParams:
    room = st.max_model_len - num_prompt
    if room < 1:
        raise bad(prompt_field, f"has {num_prompt} tokens; this model's context is {st.max_model_len} tokens, so "
                  f"a prompt may have at most {st.max_model_len - 1}", code="context_length_exceeded")
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = get_int(body, key, None, lo=1)
        if max_tokens is not None:
            break
    max_tokens = min(max_tokens or default_max_tokens or room, room)  # capped to the context (see above)
    top_k = get_int(body, "top_k", 0, lo=-1)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        raise bad("stop_token_ids", f"must be a list of token ids, got {show(stop_ids)}")
    min_tokens = get_int(body, "min_tokens", 0, lo=0)
    logit_bias = get_logit_bias(body, st.vocab_size)
    if min_tokens and stop_ids:  # vLLM also bans stop ids before min_tokens; this sampler bans EOS only
        raise bad("min_tokens", "cannot be combined with stop_token_ids on this server", code="unsupported_parameter")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=get_num(body, "temperature", 1.0),
            top_p=get_num(body, "top_p", 1.0),
            top_k=0 if top_k >= st.vocab_size else top_k,
            seed=get_int(body, "seed", None),
            stop=get_stop(body),
            stop_token_ids=tuple(check_token_ids(stop_ids or [], "stop_token_ids", st.vocab_size)),
            ignore_eos=get_bool(body, "ignore_eos", False),
            include_stop_str_in_output=get_bool(body, "include_stop_str_in_output", False),
            min_tokens=min_tokens,
            min_p=get_num(body, "min_p", 0.0),
            logit_bias=logit_bias,
            presence_penalty=get_num(body, "presence_penalty", 0.0),
            frequency_penalty=get_num(body, "frequency_penalty", 0.0),
            repetition_penalty=get_num(body, "repetition_penalty", 1.0),
            logprobs=logprobs,
        )
    except SamplingError as e:  # ranges: "field: why, got value"
        raise bad(str(e).split(":", 1)[0], str(e).split(":", 1)[1].strip()) from e


def param_of(e: Exception) -> str | None:
    """The field an engine-side ValueError is about, from its message."""
    msg = str(e)
    m = re.match(r"(\w+):", msg)
    if m and m.group(1) in ("prompt", "stop", "max_tokens", "temperature", "top_p", "top_k", "seed",
                            "stop_token_ids", "min_tokens", "min_p", "logit_bias", "presence_penalty",
                            "frequency_penalty", "repetition_penalty", "logprobs"):
        return m.group(1)
    if msg.startswith("prompt"):
        return "prompt"
    if "max_tokens" in msg:
        return "max_tokens"
    return None


@dataclasses.dataclass
class Job:
    """One admitted-to-be request and how to answer it."""

    request: Request
    chat: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    index: int = 0  # its choice in the answer (a batch of prompts: the prompt's position)
    echo: str = ""  # completions with echo: the prompt's text, put before the generated text
    response_id: str = ""  # the answer's id (a batch shares one); "" -> the request's id
    group: int = 0  # its prompt's position (n / best_of: samples of one prompt share it)
    n: int = 1  # choices its prompt answers with
    hide_logprobs: bool = False  # logprobs kept only to rank best_of samples: not shown
    echo_logprobs: bool = False  # echo with logprobs: the prompt's tokens and logprobs come first
    tokenizer: Any = None  # with logprobs: turns their token ids into text
    text_offset: int = 0  # completions with logprobs: where the next token's text starts in the choice

    @property
    def answer_id(self) -> str:
        return self.response_id or self.request.request_id


def parse_jobs(body: dict[str, Any], st: ServedModel, *, chat: bool, arrival: float) -> list[Job]:
    """One job per prompt (completions may carry a batch of them; chat has one conversation)."""
    check_model(body, st)
    check_unsupported(body, chat)
    n, best_of = get_samples(body, chat)
    if chat:
        text, add_bos = chat_prompt(body, st)
        prompts = [(encode_text(text, st, "messages", add_bos), text)]
    else:
        prompts = parse_prompts(body, st)
    jobs = [_job(body, st, ids, text, chat, arrival, "messages" if chat else where)
            for ids, text, where in ((i, t, f"prompt[{k}]" if len(prompts) > 1 else "prompt")
                                     for k, (i, t) in enumerate(prompts))]
    answer_id = jobs[0].request.request_id
    jobs = [s for k, j in enumerate(jobs) for s in fan_out(j, n, best_of, k)]
    if len(jobs) > 1:  # one answer: the first prompt's id
        for j in jobs:
            j.response_id = answer_id
    return jobs


def _job(body: dict[str, Any], st: ServedModel, ids: list[int], text: str | None, chat: bool, arrival: float,
         prompt_field: str) -> Job:
    k = get_logprobs(body, chat)
    if chat:
        sampling = parse_sampling(body, st, len(ids), ("max_completion_tokens", "max_tokens"), None, prompt_field, k)
    else:
        sampling = parse_sampling(body, st, len(ids), ("max_tokens",), DEFAULT_MAX_TOKENS, prompt_field, k)
    eot = tuple(i for i in getattr(st, "chat_stop_ids", ()) if i not in sampling.stop_token_ids) if chat else ()
    if eot and not sampling.ignore_eos:  # the template's end of turn ends the answer, as EOS does
        sampling = dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids + eot)
    if k is not None and st.tokenizer is None:
        raise bad("top_logprobs" if chat else "logprobs", "needs a tokenizer to show tokens as text")
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "only allowed when stream is true")
        if not isinstance(opts, dict):
            raise bad("stream_options", f"must be an object, got {show(opts)}")
        include_usage = get_bool(opts, "include_usage", False)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    job = Job(Request(rid, ids, sampling, prompt=text, arrival_time=arrival), chat, stream, include_usage,
              get_bool(body, "return_token_ids", False), st.model_name)
    if not chat and get_bool(body, "echo", False):  # the prompt's text (token ids: decoded) before the output
        if text is None and st.tokenizer is None:
            raise bad("echo", "needs a tokenizer to turn the token-id prompt into text")
        job.echo = text if text is not None else st.tokenizer.decode(ids)
        if k is not None:  # the prompt's logprobs too (how evaluation harnesses score a text)
            job.request.sampling = dataclasses.replace(job.request.sampling, prompt_logprobs=k)
            job.echo_logprobs = True
    if k is not None:
        job.tokenizer, job.text_offset = st.tokenizer, 0 if job.echo_logprobs else len(job.echo)
    return job
