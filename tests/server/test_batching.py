"""Continuous batching under concurrent load, cancellation, a full queue, and failures mid-stream."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server.conftest import MODEL, Collected, admission_paused, continuation, greedy

PROMPTS = ["Once upon a time", "The cat", "In a land far away, there lived", "Hello", "A", "Tom and Lily went to",
           "She said", "1 2 3"]


def test_engine_interleaved_greedy_equals_generate(reference):
    """Sequences joining at different steps, in different slots, each equal Llama.generate alone."""
    from nabla.server.batching import Engine, SamplingParams, Sequence

    # The engine borrows the reference's model (3 cache rows) and is stopped before generate runs.
    engine = Engine(reference.model, reference.tokenizer.stop_ids)
    got = Collected()
    ids = [reference.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    lengths = [5, 16, 8, 12, 4, 14, 3, 10]
    with admission_paused(engine):
        engine.submit([Sequence(ids[0], SamplingParams(lengths[0], temperature=0), got.sink(0))])
        engine.start()
    try:
        for i in range(1, len(ids)):  # the rest arrive while others decode
            engine.submit([Sequence(ids[i], SamplingParams(lengths[i], temperature=0), got.sink(i))])
        got.wait(len(ids))
    finally:
        engine.stop()
    for i, p in enumerate(ids):
        assert got.tokens(i) == greedy(reference, p, lengths[i]), PROMPTS[i]
    assert engine.slots_in_use == 0


def test_concurrent_streams_equal_serving_alone(server, reference):
    """More clients than cache rows: every stream equals the same greedy request served alone."""
    tok = reference.tokenizer

    def run(i):
        client = server.client()
        max_tokens = 4 + 2 * i
        if i % 2:
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=max_tokens,
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in stream)
        messages = [{"role": "user", "content": PROMPTS[i]}]
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(run, range(len(PROMPTS))))
    for i, text in enumerate(got):
        ids = (tok.encode(PROMPTS[i], bos=True, eos=False) if i % 2 else
               reference.encode_chat([{"role": "user", "content": PROMPTS[i]}]))
        assert text == continuation(tok, ids, greedy(reference, ids, 4 + 2 * i)), i
    server.wait_for("nabla_slots_in_use", 0)


def test_disconnect_cancels_generation(gated):
    """A client leaving mid-stream frees its slot; its generation stops."""
    cancelled, before = gated.metric("nabla_requests_cancelled_total"), gated.metric("nabla_generation_tokens_total")
    gated.gate.open(4)  # prefill + 3 decode steps, then the model waits
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(base_url=gated.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] is not None
        # leaving the `with` closes the connection mid-stream
    gated.wait_for("nabla_requests_cancelled_total", cancelled + 1)
    gated.gate.open()
    gated.wait_for("nabla_slots_in_use", 0)
    generated = gated.metric("nabla_generation_tokens_total") - before
    assert generated <= 6  # far from the 100 asked for
    # The freed slot serves the next request at once.
    r = gated.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_full_queue_is_429_with_retry_after(gated):
    client = gated.client()
    with ThreadPoolExecutor(1) as pool:
        with admission_paused(gated.engine):
            waiting = pool.submit(client.completions.create, model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
            gated.wait_for("nabla_queue_depth", 1)
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            assert info.value.status_code == 429 and int(info.value.response.headers["Retry-After"]) >= 1
            assert info.value.body["code"] == "rate_limit_exceeded"
        gated.gate.open()
        assert waiting.result().usage.completion_tokens == 2


def test_error_after_stream_started_is_an_event(gated):
    gated.gate.open(2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": True}
    with httpx.Client(base_url=gated.url, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = []
        for line in r.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 3:  # role chunk and two tokens out: now the model fails
                gated.gate.fail = True
                gated.gate.open()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])
    assert set(error) == {"error"} and "injected failure" in error["error"]["message"]
    gated.gate.fail = False
    gated.wait_for("nabla_slots_in_use", 0)
    r = gated.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert len(r.choices) == 1  # the engine survived


def test_nonstreaming_disconnect_cancels(gated):
    cancelled, before = gated.metric("nabla_requests_cancelled_total"), gated.metric("nabla_generation_tokens_total")
    gated.gate.open(2)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 100, "temperature": 0}
    with httpx.Client(base_url=gated.url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    gated.wait_for("nabla_requests_cancelled_total", cancelled + 1)
    gated.gate.open()
    gated.wait_for("nabla_slots_in_use", 0)
    assert gated.metric("nabla_generation_tokens_total") - before <= 4
