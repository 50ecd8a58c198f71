"""vLLM's tokenizer endpoints: field names, round trips, chat messages, errors naming the parameter."""

from __future__ import annotations

import httpx

from server.conftest import MODEL

TEXT = "Once upon a time, there was a little cat."


def test_tokenize_prompt_has_vllms_fields(server, reference):
    with server.http() as h:
        r = h.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "add_special_tokens": True})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == reference.tokenizer.encode(TEXT, bos=True, eos=False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == reference.max_seq_len
    assert body["token_strs"] is None


def test_tokenize_without_special_tokens_and_round_trip(server, reference):
    with server.http() as h:
        ids = h.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
        assert ids == reference.tokenizer.encode(TEXT, bos=False, eos=False)
        assert h.post("/detokenize", json={"model": MODEL, "tokens": ids}).json() == {"prompt": TEXT}


def test_tokenize_token_strs(server, reference):
    with server.http() as h:
        body = h.post("/tokenize", json={"prompt": "Hello", "return_token_strs": True}).json()
    assert body["token_strs"] == [reference.tokenizer.id_to_piece(i) for i in body["tokens"]]


def test_tokenize_chat_messages_as_the_chat_endpoint_renders_them(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    with server.http() as h:
        body = h.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
        usage = h.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert body["tokens"] == reference.encode_chat(messages)
    assert body["count"] == usage["usage"]["prompt_tokens"]


def test_special_token_text_is_that_token(server, reference):
    """lm-evaluation-harness finds eos_token_id as tokenize(eos_token)[0]."""
    with server.http() as h:
        info = h.get("/tokenizer_info").json()
        ids = h.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert ids == [reference.tokenizer.eos_id]
    assert info["bos_token"] == "<s>" and info["model_max_length"] == reference.max_seq_len
    assert {"eos_token", "bos_token", "pad_token", "chat_template", "tokenizer_class"} <= set(info)


def test_bad_tokenize_requests_name_the_parameter(server):
    with server.http() as h:
        both = h.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
        neither = h.post("/tokenize", json={"model": MODEL})
        bad_id = h.post("/detokenize", json={"tokens": [1, 10**9]})
        wrong_type = h.post("/detokenize", json={"tokens": "abc"})
        model = h.post("/tokenize", json={"model": "nope", "prompt": "a"})
    assert both.status_code == neither.status_code == bad_id.status_code == wrong_type.status_code == 400
    assert bad_id.json()["error"]["param"] == "tokens" and wrong_type.json()["error"]["param"] == "tokens"
    assert model.status_code == 404 and model.json()["error"]["param"] == "model"


def test_tokenizer_endpoints_need_the_key(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "a"})
    assert r.status_code == 401
