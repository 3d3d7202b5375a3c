"""A model's own chat template renders exactly as transformers' ``apply_chat_template`` (issue 16), and the
chat route and /tokenize use it (no BOS added: the template writes its own special tokens)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from jaxserve.serving.chat import ChatError
from jaxserve.serving.chat_template import ChatTemplate
from jaxserve.tokenizer import Tokenizer
from tests.helpers_tokenizer import write_tokenizer_json_dir
from tests.serving.doubles import CountingEngine
from tests.serving.test_api_server import post, serve

# Llama-2's template (system folded into the first user turn; alternation enforced with raise_exception)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# ChatML with trim_blocks-sensitive layout, tojson and a loop control
CHATML = (
    "{% for message in messages %}\n{% if message['role'] == 'developer' %}{% continue %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ '' if not meta else meta | tojson }}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": " And now? "}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, source in (("llama2", LLAMA2), ("chatml", CHATML)):
        d = write_tokenizer_json_dir(tmp_path_factory.mktemp(name))
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = source
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["llama2", "chatml"])
def test_renders_exactly_as_transformers(folders, name):
    ours, theirs = Tokenizer.from_dir(folders[name]), AutoTokenizer.from_pretrained(folders[name])
    template = ChatTemplate(ours.chat_template, ours.special_tokens)
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert template.render(msgs, add_generation_prompt=gen) == want, (msgs, gen)
    last = [*CONVERSATIONS[1][:3]]
    want = theirs.apply_chat_template(last, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert template.render(last, add_generation_prompt=False, continue_final_message=True) == want


def test_template_errors_are_chat_errors(folders):
    ours = Tokenizer.from_dir(folders["llama2"])
    template = ChatTemplate(ours.chat_template, ours.special_tokens)
    with pytest.raises(ChatError, match="roles must alternate") as e:
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert e.value.param == "messages"
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatError, match="TypeError") as e:  # a template tripping on its input: a 400, not a 500
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "a"}])
    assert e.value.param == "messages"


def test_chat_route_and_tokenize_use_the_models_template(folders):
    tok = Tokenizer.from_dir(folders["chatml"])
    msgs = [{"role": "user", "content": "hello"}]
    rendered = ChatTemplate(tok.chat_template, tok.special_tokens).render(msgs)

    async def fn(client, eng, orch):
        st, r = await post(client, "/tokenize", {"messages": msgs})
        assert st == 200 and r["tokens"] == tok.encode(rendered, add_bos=False)
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
        assert st == 200 and eng.added[-1].prompt_token_ids == tok.encode(rendered, add_bos=False)
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2,
                                                             "chat_template_kwargs": {"meta": {"a": 1}}})
        assert st == 200 and eng.added[-1].prompt_token_ids == tok.encode(rendered + '{"a": 1}', add_bos=False)
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs, "chat_template_kwargs": [1]})
        assert st == 400 and r["error"]["param"] == "chat_template_kwargs"
        # content as OpenAI's text parts: joined into the string the template expects
        parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
        st, r = await post(client, "/v1/chat/completions", {"messages": parts, "max_tokens": 2})
        assert st == 200 and eng.added[-1].prompt_token_ids == tok.encode(rendered, add_bos=False)
        # template variables named like arguments are plain variables, never a 500
        st, r = await post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "chat_template_kwargs":
                                                             {"continue_final_message": True, "self": 1}})
        assert st == 200
        st, r = await post(client, "/v1/chat/completions", {"messages": [*msgs, {"role": "assistant", "content": ""}],
                                                             "add_generation_prompt": False,
                                                             "continue_final_message": True})
        assert st == 400 and r["error"]["param"] == "continue_final_message"

    serve(fn, engine=CountingEngine(), tokenizer=tok, vocab_size=tok.vocab_size)


def test_the_fixed_template_refuses_what_it_cannot_do():
    async def fn(client, eng, orch):
        msgs = [{"role": "user", "content": "x"}]
        for key, v in (("add_generation_prompt", False), ("continue_final_message", True),
                       ("chat_template_kwargs", {"a": 1})):
            st, r = await post(client, "/v1/chat/completions", {"messages": msgs, key: v})
            assert st == 400 and r["error"]["param"] == key, (key, r)

    serve(fn)


def test_chat_stops_at_the_templates_end_of_turn(folders, tmp_path):
    """A ChatML template's <|im_end|> (in the vocabulary) is a stop token of every chat request unless
    ignore_eos; completions requests are not affected."""
    from tokenizers import Tokenizer as HFTokenizer

    from jaxserve.serving.protocol import parse_jobs

    d = tmp_path / "chatml-eot"
    d.mkdir()
    for f in folders["chatml"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    hf.add_special_tokens(["<|im_end|>"])
    hf.save(str(d / "tokenizer.json"))
    tok = Tokenizer.from_dir(d)
    eot = tok.token_to_id("<|im_end|>")
    template = ChatTemplate(tok.chat_template, tok.special_tokens)
    assert template.end_of_turn_ids(tok) == (eot,)
    assert ChatTemplate(LLAMA2, tok.special_tokens).end_of_turn_ids(tok) == ()  # Llama-2 ends turns with EOS

    class St:
        tokenizer, model_name, max_model_len, vocab_size = tok, "m", 512, tok.vocab_size
        chat_template, chat_stop_ids = template, (eot,)

    msgs = [{"role": "user", "content": "hi"}]
    job = parse_jobs({"messages": msgs, "stop_token_ids": [5]}, St(), chat=True, arrival=0.0)[0]
    assert job.request.sampling.stop_token_ids == (5, eot)
    job = parse_jobs({"messages": msgs, "ignore_eos": True}, St(), chat=True, arrival=0.0)[0]
    assert job.request.sampling.stop_token_ids == ()
    job = parse_jobs({"prompt": "hi"}, St(), chat=False, arrival=0.0)[0]
    assert job.request.sampling.stop_token_ids == ()
