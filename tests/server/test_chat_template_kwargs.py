"""The server's chat templates through the openai client: chat_template_kwargs (vLLM's extension) reach a
Qwen3 template as transformers' apply_chat_template(..., enable_thinking=False) takes them, and a Mistral
v0.3 template's refusal of roles that do not alternate is a 400 on 'messages' in the template's words."""

import openai
import pytest
from hf_families import save_family, set_chat_template, template_ids
from tokenizer.family_templates import MISTRAL_V3, QWEN3

from nabla import Llama
from server.conftest import MODEL, LiveServer

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def live(tmp_path_factory, family, template):
    pytest.importorskip("transformers")
    path, _ = save_family(tmp_path_factory.mktemp(family), family)
    ref = set_chat_template(path, template)
    server = LiveServer(build(path))
    server.reference = build(path)  # expected outputs: the server's model owns its own cache
    return server, ref


def build(path):
    return Llama.build(path, None, max_seq_len=256, max_batch_size=2, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    server, ref = live(tmp_path_factory, "qwen3", QWEN3)
    yield server, ref
    server.stop()


def test_enable_thinking_reaches_the_template(qwen3):
    server, ref = qwen3
    client = server.client()
    off = template_ids(ref, DIALOG, enable_thinking=False)
    assert off != template_ids(ref, DIALOG)
    r = client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=5, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == len(off)
    (want,), _ = server.reference.generate([off], 5, temperature=0.0)
    # the server's text reads in context (a leading space kept); the ids decode alone without it
    assert r.choices[0].message.content.lstrip() == server.reference.tokenizer.decode(want)
    plain = client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=1, temperature=0)
    assert plain.usage.prompt_tokens == len(template_ids(ref, DIALOG))
    with server.http() as http:  # vLLM's /tokenize takes them too
        got = http.post("/tokenize", json={"messages": DIALOG, "chat_template_kwargs": {"enable_thinking": False}})
        assert got.status_code == 200 and got.json()["tokens"] == off


def test_kwargs_reach_a_template_that_renders_tools(qwen3):
    server, ref = qwen3
    weather = {"name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    r = server.client().chat.completions.create(
        model=MODEL, messages=DIALOG, max_tokens=1, temperature=0, tools=[{"type": "function", "function": weather}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    tools = [{"type": "function", "function": weather}]
    want = template_ids(ref, DIALOG, tools=tools, enable_thinking=False)
    assert want != template_ids(ref, DIALOG, tools=tools)
    assert r.usage.prompt_tokens == len(want)


@pytest.mark.parametrize("bad", ["enable_thinking=false", [1, 2], 3, {"messages": []}])
def test_bad_kwargs_are_a_400_naming_them(qwen3, bad):
    server, _ = qwen3
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=2,
                                                extra_body={"chat_template_kwargs": bad})
    assert e.value.status_code == 400 and e.value.param == "chat_template_kwargs"
    with server.http() as http:
        got = http.post("/tokenize", json={"prompt": "hi", "chat_template_kwargs": {"enable_thinking": False}})
        assert got.status_code == 400 and got.json()["error"]["param"] == "chat_template_kwargs"


def test_mistral_roles_not_alternating_are_a_400(tmp_path_factory):
    server, ref = live(tmp_path_factory, "mistral", MISTRAL_V3)
    try:
        client = server.client()
        dialog = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=2)
        assert e.value.param == "messages"
        assert "conversation roles must alternate user/assistant/user/assistant" in e.value.message
        ok = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        r = client.chat.completions.create(model=MODEL, messages=ok, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == len(template_ids(ref, ok))
    finally:
        server.stop()
