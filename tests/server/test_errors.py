"""Every user mistake gets OpenAI's error object, the right status and the parameter's name."""

from __future__ import annotations

import openai
import pytest

from server.conftest import MODEL

PROMPT = "Once upon a time"


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    e = info.value
    assert set(e.body) == {"message", "type", "param", "code"}, e.body
    return e


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(n=129), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(logprobs=6), "logprobs"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(logit_bias={"50": 10}), "logit_bias"),
    (dict(suffix="!"), "suffix"),
    (dict(best_of=3), "best_of"),
    (dict(extra_body={"not_a_param": 1}), "not_a_param"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"max_tokens": 1.5}), "max_tokens"),
    (dict(extra_body={"stream": "yes"}), "stream"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
])
def test_completion_invalid_values(client, kw, param):
    e = error_of(lambda: client.completions.create(model=MODEL, prompt=PROMPT, **kw))
    assert e.status_code == 400 and e.body["param"] == param, e.body
    assert e.body["type"] == "invalid_request_error" and param in e.body["message"]


@pytest.mark.parametrize("kw, param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]),
     "tools[0].function.parameters.not"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    (dict(extra_body={"functions": [{"name": "f"}]}), "functions"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages[0].tool_call_id"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
])
def test_chat_invalid_values(client, kw, param):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    e = error_of(lambda: client.chat.completions.create(model=MODEL, max_tokens=4, **kw))
    assert e.status_code == 400 and e.body["param"] == param, e.body


def test_context_length(client, reference):
    prompt = " ".join(["word"] * 200)
    n = len(reference.tokenizer.encode(prompt, bos=True, eos=False))
    e = error_of(lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=4))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "prompt"
    assert "128" in e.body["message"] and str(n) in e.body["message"]
    # The prompt fits, but not with the tokens asked for.
    e = error_of(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=125))
    assert e.body["code"] == "context_length_exceeded" and "125" in e.body["message"]
    e = error_of(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    e = error_of(lambda: client.embeddings.create(model=MODEL, input=prompt))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"


def test_token_ids_outside_vocabulary(client):
    e = error_of(lambda: client.completions.create(model=MODEL, prompt=[1, 32000], max_tokens=2))
    assert e.status_code == 400 and e.body["param"] == "prompt" and "32000" in e.body["message"]


def test_auth(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    e = error_of(lambda: bad.completions.create(model=MODEL, prompt=PROMPT))
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
    import httpx

    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key


def test_unknown_and_missing_model(client, server):
    e = error_of(lambda: client.completions.create(model="gpt-4", prompt=PROMPT))
    assert e.status_code == 404 and e.body["code"] == "model_not_found" and e.body["param"] == "model"
    e = error_of(lambda: client.models.retrieve("gpt-4"))
    assert e.status_code == 404
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = http.post("/v1/chat/completions", json={"model": MODEL})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_unknown_route_malformed_json_and_big_body(server):
    with server.http() as http:
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
        r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json=["a list"])
        assert r.status_code == 400
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (1 << 20)})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_no_422_for_any_type_error(server):
    bodies = [{"model": MODEL, "prompt": None}, {"model": 3, "prompt": "x"}, {"model": MODEL, "prompt": [[]]},
              {"model": MODEL, "prompt": [1, "a"]}, {"model": MODEL, "prompt": "x", "stop": 5},
              {"model": MODEL, "prompt": "x", "stop": ""}, {"model": MODEL, "prompt": "x", "seed": "1"},
              {"model": MODEL, "prompt": "x", "n": True}, {"model": MODEL, "input": {}}]
    with server.http() as http:
        for body in bodies:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] is not None, body
        r = http.post("/v1/embeddings", json={"model": MODEL, "input": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "int8"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


def test_draining_refuses_with_503(server, client):
    server.state.draining = True
    try:
        e = error_of(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2))
        assert e.status_code == 503
    finally:
        server.state.draining = False
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
