"""The server through the official `openai` client: results equal nabla's reference generation."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
import torch

from server.conftest import MODEL, continuation, greedy

PROMPT = "Once upon a time"


def ids_of(reference, text):
    return reference.tokenizer.encode(text, bos=True, eos=False)


def test_completion_greedy_equals_reference(client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ids = ids_of(reference, PROMPT)
    want = greedy(reference, ids, 12)
    (choice,) = r.choices
    assert choice.text == continuation(reference.tokenizer, ids, want)
    assert choice.finish_reason == ("length" if len(want) == 12 else "stop")
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == len(ids) + len(want)


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_token_id_prompts_and_lists(client, reference):
    a, b = ids_of(reference, "Hello"), ids_of(reference, "The cat sat")
    r = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] == texts[1] == continuation(reference.tokenizer, a, greedy(reference, a, 5))
    assert texts[2] == texts[3] == continuation(reference.tokenizer, b, greedy(reference, b, 5))
    r2 = client.completions.create(model=MODEL, prompt=["Hello", "The cat sat"], max_tokens=5, temperature=0)
    assert [c.text for c in r2.choices] == [texts[0], texts[2]]
    assert r2.usage.prompt_tokens == len(a) + len(b)


def test_logprobs_match_reference(client, reference):
    ids = ids_of(reference, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    tokens, lps = reference.generate([ids], 6, temperature=0, logprobs=True)
    assert len(lp.tokens) == len(tokens[0]) == len(lp.token_logprobs) == len(lp.top_logprobs)
    np.testing.assert_allclose(lp.token_logprobs, lps[0], atol=1e-4)
    for top, chosen, value in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
        assert top[chosen] == pytest.approx(value, abs=1e-5)  # greedy: the chosen token is the top one
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == len(PROMPT)
    assert [o - lp.text_offset[0] for o in lp.text_offset] == [
        sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_with_logprobs(client, reference):
    ids = ids_of(reference, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert len(lp.tokens) == len(ids) + 3
    # Prompt scores equal the reference's echo logprobs (which has 0.0 for the first token).
    _, ref = reference.generate([ids], 3, temperature=0, logprobs=True, echo=True)
    np.testing.assert_allclose(lp.token_logprobs[1:], ref[0][1:], atol=1e-4)


def test_echo_without_logprobs(client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    ids = ids_of(reference, PROMPT)
    assert r.choices[0].text == PROMPT + continuation(reference.tokenizer, ids, greedy(reference, ids, 3))


def test_sampling_with_seed_equals_reference(client, reference):
    ids = ids_of(reference, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    torch.manual_seed(7)
    tokens, _ = reference.generate([ids], 10, temperature=0.8, top_p=0.9)
    assert r.choices[0].text == continuation(reference.tokenizer, ids, tokens[0])
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert again.choices[0].text == r.choices[0].text
    other = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=8)
    assert other.choices[0].text != r.choices[0].text


def test_n_choices_are_independent_samples(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == 24


def test_stop_string_split_across_tokens(client, reference):
    ids = ids_of(reference, PROMPT)
    want = greedy(reference, ids, 20)
    full = continuation(reference.tokenizer, ids, want)
    # A stop string made of the end of one token and the start of the next.
    cut = len(continuation(reference.tokenizer, ids, want[:5]))
    stop = full[cut - 2: cut + 2]
    assert len(stop) == 4 and full.index(stop) == cut - 2
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: cut - 2] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == full[: cut - 2]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in t for t in texts)


def test_stream_equals_non_stream(client, reference):
    ids = ids_of(reference, PROMPT)
    full = continuation(reference.tokenizer, ids, greedy(reference, ids, 10))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_format(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        chunk = json.loads(e[len("data: "):])
        assert chunk["object"] == "text_completion" and set(chunk["choices"][0]) == {
            "index", "text", "logprobs", "finish_reason"}


def test_chat_greedy_equals_reference(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ids = reference.encode_chat(messages)
    want = greedy(reference, ids, 10)
    assert r.choices[0].message.content == continuation(reference.tokenizer, ids, want)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_default_max_tokens_fills_the_context(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    used = r.usage.prompt_tokens + r.usage.completion_tokens
    assert (used == 128 and r.choices[0].finish_reason == "length") or r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 16


def test_chat_stream_and_logprobs(client, reference):
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = reference.encode_chat(messages)
    want = greedy(reference, ids, 8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=2,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == continuation(reference.tokenizer, ids, want)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == len(want)
    _, lps = reference.generate([ids], 8, temperature=0, logprobs=True)
    np.testing.assert_allclose([e.logprob for e in entries], lps[0], atol=1e-4)
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert bytes(e.bytes).decode() == e.token
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(want)


def test_chat_content_parts_and_n(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=4, n=2, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content


def test_penalties_equal_a_hand_made_reference(client, reference):
    """Greedy with OpenAI's penalties: logit - count * frequency_penalty - (count > 0) * presence_penalty,
    over the tokens generated so far, checked against a plain loop over uncached forward passes."""
    ids = ids_of(reference, PROMPT)
    freq, pres = 1.5, 0.5
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(8):
            logits = reference.model(torch.tensor([ids + out]))[0, -1].clone()
            for t in set(out):
                logits[t] -= out.count(t) * freq + pres
            out.append(int(logits.argmax()))
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  frequency_penalty=freq, presence_penalty=pres)
    assert r.choices[0].text == continuation(reference.tokenizer, ids, out)


def test_cors(reference):
    from fastapi.testclient import TestClient

    from nabla.server.app import create_app

    app = create_app(reference, MODEL, api_key="k", cors_origins=["http://ui.example"])
    http = TestClient(app)  # no lifespan: the engine is not started, and these requests need none
    r = http.options("/v1/chat/completions", headers={"Origin": "http://ui.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
    r = http.get("/health", headers={"Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    r = http.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_embeddings(client, reference):
    r = client.embeddings.create(model=MODEL, input=["a story", "the cat"])
    assert [d.index for d in r.data] == [0, 1]
    ids = ids_of(reference, "a story")
    with torch.inference_mode():
        h = reference.model(torch.tensor([ids]), return_hidden=True)[0].mean(0)
    want = (h / h.norm()).tolist()
    np.testing.assert_allclose(r.data[0].embedding, want, atol=1e-5)
    assert math.isclose(float(np.linalg.norm(r.data[1].embedding)), 1.0, rel_tol=1e-5)
    assert r.usage.prompt_tokens == len(ids) + len(ids_of(reference, "the cat"))
    b64 = client.embeddings.create(model=MODEL, input="a story", encoding_format="base64").data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), want, atol=1e-5)


def test_embeddings_base64_raw(server, reference):
    with server.http() as http:
        r = http.post("/v1/embeddings", json={"model": MODEL, "input": [1, 450, 6635], "encoding_format": "base64"})
    v = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_models_health_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with server.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        text = http.get("/metrics").text
    for name in ("nabla_requests_total", "nabla_generation_tokens_total", "nabla_queue_depth",
                 "nabla_request_latency_seconds_bucket", "nabla_time_to_first_token_seconds_count"):
        assert name in text
