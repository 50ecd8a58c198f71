"""Property: whatever JSON a client sends to whichever endpoint, the answer is never a 5xx, and every
4xx is OpenAI's error object naming the parameter at fault (null only when no one parameter is:
a body that is not JSON, or not an object).

Bodies are random JSON, raw bytes, and valid requests with a few fields replaced by random values
(so that every parameter's checks are reached, not only the top-level type check).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.conftest import MODEL, LiveServer, build

ROUTES = {
    "/v1/completions": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/v1/embeddings": {"model": MODEL, "input": "Once upon a time"},
}


def _fields(route: str) -> list[str]:
    from nabla.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    schema = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
              "/v1/embeddings": EmbeddingRequest}[route]
    return sorted(schema.model_fields)


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, -1, 0.5, 1e-300, 2**64, ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
# Values that are valid for many fields (None for every optional one), so that one bad field is often
# the only one, and checks that run only on an otherwise valid request are reached too.
plausible = st.sampled_from([None, True, False, 0, 1, 2, 4, 0.5, 1e-300, 1e-40, 10**9, -1, "", "x", "tiny", [],
                             {}, ["a"], [1, 2], {"include_usage": True}, {"type": "text"}])
message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", 1]) | json_values,
    "content": st.text(max_size=8) | json_values | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=5) | json_values})),
    "name": json_values})
messages = st.lists(message | message | json_values, max_size=3)


@st.composite
def requests(draw):
    route = draw(st.sampled_from(sorted(ROUTES)))
    kind = draw(st.sampled_from(["near-valid", "near-valid", "near-valid", "json", "bytes"]))
    if kind == "bytes":
        return route, draw(st.binary(max_size=40))
    if kind == "json":
        body = draw(json_values)
    else:
        body = dict(ROUTES[route])
        fields = _fields(route) + ["stream_options.include_usage", "unknown"]
        names = st.sampled_from(fields) | st.sampled_from(fields) | st.text(max_size=6)  # mostly known fields
        for name in draw(st.lists(names, max_size=3, unique=True)):
            value = draw(messages if name == "messages" else plausible | json_values)
            if name == "stream_options.include_usage":
                body["stream"], body["stream_options"] = True, {"include_usage": value}
            else:
                body[name] = value
        if draw(st.booleans()):  # leave a field out (a required one, sometimes)
            body.pop(draw(st.sampled_from(sorted(body))))
    return route, json.dumps(body).encode()  # (NaN and Infinity as Python writes them: not JSON)


@pytest.fixture(scope="module")
def fuzzed(make_checkpoint):
    s = LiveServer(build(make_checkpoint, max_batch_size=4), api_key=None, max_queue=8)
    yield s
    s.stop()


NO_PARAM = ("not valid JSON", "must be a JSON object")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_random_bodies_never_5xx_and_every_4xx_names_a_parameter(fuzzed, req):
    route, content = req
    with httpx.Client(base_url=fuzzed.url, timeout=120) as http:
        r = http.post(route, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (route, content, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert isinstance(err["message"], str) and err["message"], r.text
        if err["param"] is None:
            assert r.status_code in (413, 429) or any(s in err["message"] for s in NO_PARAM), (content, r.text)
        else:
            assert isinstance(err["param"], str), r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in r.text, r.text
