"""JSON output and tool calls through the official openai client, on the built-in story model.

The story model knows no JSON: what it writes is valid because the grammar
allows nothing else. Every schema keeps its strings short (maxLength, enum,
pattern) so that the output ends within max_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

import nabla
from server.conftest import LiveServer

STORIES = Path(nabla.__file__).parent / "assets" / "stories"
S = {"type": "string", "maxLength": 8}
INT = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = [
    obj({"name": S}),
    obj({"age": INT}),
    obj({"ok": {"type": "boolean"}}),
    obj({"n": {"type": "null"}}),
    obj({"name": S, "age": INT, "ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"v": {"const": "fixed"}}),
    obj({"k": {"const": 7}, "s": S}),
    obj({"x": {"anyOf": [INT, {"type": "null"}]}}),
    obj({"x": {"type": ["string", "null"], "maxLength": 5}}),
    obj({"x": {"anyOf": [S, {"type": "boolean"}]}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"nums": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2}}),
    obj({"grid": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2},
                  "maxItems": 2}}),
    obj({"inner": obj({"a": INT, "b": S})}),
    obj({"outer": obj({"inner": obj({"deep": {"enum": ["yes", "no"]}})})}),
    obj({"people": {"type": "array", "items": obj({"name": S, "age": INT}), "maxItems": 2}}),
    obj({"id": {"type": "string", "pattern": "^[a-z]{3}[0-9]{2}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-F0-9]{4}$"}}),
    obj({"word": {"type": "string", "minLength": 2, "maxLength": 4}}),
    obj({"p": {"type": "integer", "minimum": 0, "maximum": 9}}),
    obj({"p": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"t": {"type": "number", "minimum": -5, "maximum": 5}, "u": {"enum": ["c", "f"]}}),
    obj({"a": S, "b": S}, required=["a"]),
    obj({"mode": {"enum": ["fast", 1, None, True]}}),
    {"$defs": {"pt": obj({"x": INT, "y": INT})},
     **obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})},
    {"definitions": {"c": {"enum": ["cat", "dog"]}},
     **obj({"pets": {"type": "array", "items": {"$ref": "#/definitions/c"}, "minItems": 1, "maxItems": 3}})},
    {"type": "array", "items": INT, "minItems": 1, "maxItems": 4},
    {"type": "array", "prefixItems": [S, INT], "items": False},
    {"enum": ["alpha", "beta"]},
    {"type": "integer", "minimum": 1, "maximum": 6},
    obj({"m": {"anyOf": [obj({"kind": {"const": "a"}, "v": INT}), obj({"kind": {"const": "b"}, "w": S})]}}),
    obj({"title": {"type": "string", "maxLength": 6, "description": "a title"}, "n": INT}),
]
MESSAGES = [{"role": "user", "content": "Tell me about a cat."}]


@pytest.fixture(scope="module")
def stories():
    s = LiveServer(nabla.Llama.build(STORIES, max_seq_len=768, max_batch_size=4), api_key=None, max_queue=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(stories):
    return stories.client()


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_schema_chat_greedy(oai, k):
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=128,
                                    response_format=fmt(SCHEMAS[k]))
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    check(r.choices[0].message.content, SCHEMAS[k])


@pytest.mark.parametrize("k", range(0, len(SCHEMAS), 3))
def test_schema_chat_streamed_sampled(oai, k):
    for temperature, seed in ((0.7, 1), (1.0, 2)):
        stream = oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=temperature, seed=seed,
                                             max_tokens=128, response_format=fmt(SCHEMAS[k]), stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop", text
        check(text, SCHEMAS[k])


def test_completions_json_object_and_schema(oai):
    r = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=96, temperature=0,
                               extra_body={"response_format": fmt(SCHEMAS[4])})
    check(r.choices[0].text, SCHEMAS[4])
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64, temperature=0, seed=3,
                                    response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_length_mid_json(oai):
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=3,
                                    response_format=fmt(SCHEMAS[4]))
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("schema, param", [
    (obj({"d": {"type": "string", "format": "date"}}), "response_format.json_schema.schema.properties.d.format"),
    (obj({"x": {"not": {"type": "null"}}}), "response_format.json_schema.schema.properties.x.not"),
    ({"type": "array", "uniqueItems": True}, "response_format.json_schema.schema.uniqueItems"),
    ({"oneOf": [S, INT]}, "response_format.json_schema.schema.oneOf"),
    ({"type": "strin"}, "response_format.json_schema.schema.type"),
    ({"type": "object", "required": "name"}, "response_format.json_schema.schema.required"),
])
def test_bad_schemas(oai, schema, param):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, response_format=fmt(schema))
    assert e.value.body["param"] == param, e.value.body
    assert param.rsplit(".", 1)[-1] in e.value.body["message"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                             "parameters": obj({"city": S, "unit": {"enum": ["c", "f"]}})}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": INT})}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("temperature, seed", [(0, None), (1.0, 5)])
def test_forced_tool_calls_validate(oai, choice, temperature, seed):
    for stream in (False, True):
        r = oai.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=choice,
                                        temperature=temperature, seed=seed, max_tokens=200, stream=stream,
                                        parallel_tool_calls=False)
        if stream:
            chunks = list(r)
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            reason = chunks[-1].choices[0].finish_reason
        else:
            calls, reason = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert reason == "tool_calls" and calls
        by_name = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
        for c in calls:
            if isinstance(choice, dict):
                assert c.function.name == "get_time"
            jsonschema.validate(json.loads(c.function.arguments), by_name[c.function.name])
            assert c.id and c.type == "function"


@pytest.mark.parametrize("kw, param", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name"),
    (dict(messages=[*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]), "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[*MESSAGES, {"role": "tool", "tool_call_id": "c9", "content": "sunny"}]),
     "messages[1].tool_call_id"),
])
def test_tool_bad_input(oai, kw, param):
    kw.setdefault("messages", MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", max_tokens=8, **kw)
    assert e.value.body["param"] == param, e.value.body


TOOLS_TEMPLATE = (
    "{% if tools %}<sys>Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<assistant>{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}\n"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>\n"
    "{% else %}<{{ m.role }}>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_tool_round_trip_through_a_template_with_tools():
    from nabla.tokenizer.chat import JinjaChatFormat

    llama = nabla.Llama.build(STORIES, max_seq_len=768, max_batch_size=2)
    llama.chat_format = JinjaChatFormat(llama.tokenizer, TOOLS_TEMPLATE, "<s>", "</s>")
    rendered = []
    encode = llama.chat_format.encode_dialog

    def spy(dialog, tools=None):
        rendered.append(llama.tokenizer.decode(encode(dialog, tools)))
        return encode(dialog, tools)

    llama.chat_format.encode_dialog = spy
    s = LiveServer(llama, api_key=None)
    try:
        c = s.client()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="required",
                                      temperature=0, max_tokens=128, parallel_tool_calls=False)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert '"get_weather"' in rendered[-1] and "<sys>Tools:" in rendered[-1]
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        r = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=0,
                                      max_tokens=32)
        assert "<tool_response>sunny, 21 C</tool_response>" in rendered[-1]
        assert "<tool_call>" in rendered[-1] and json.loads(call.function.arguments)["city"] in rendered[-1]
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        s.stop()


@pytest.mark.parametrize("text, calls, content", [
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n</tool_call>', [("get_time", {"zone": 2})], None),
    ('{"name": "get_time", "parameters": {"zone": 1}}', [("get_time", {"zone": 1})], None),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": 3}}]', [("get_time", {"zone": 3})], None),
    ('{"name": "unknown", "parameters": {}}', [], '{"name": "unknown", "parameters": {}}'),
    ("Once upon a time", [], "Once upon a time"),
])
def test_auto_tool_call_syntax(text, calls, content):
    from nabla.server.tools import parse_calls

    got_content, got = parse_calls(text, [WEATHER["function"], TIME["function"]])
    assert [(c["name"], c["arguments"]) for c in got] == calls and got_content == content
