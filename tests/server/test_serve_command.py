"""`nabla serve` from the command line: exposure checks, and a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from nabla.cli import main
from nabla.cli.serve import check_exposure, is_loopback
from nabla.errors import ConfigError
from server.conftest import free_port


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_public_bind_needs_a_key_or_insecure(capsys, monkeypatch):
    monkeypatch.delenv("NABLA_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="--api-key"):
        check_exposure("0.0.0.0", None, insecure=False)
    check_exposure("0.0.0.0", "k", insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    # Refused before any model is loaded.
    assert main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent"]) == 1
    assert "--insecure" in capsys.readouterr().err


def test_serve_command_builds_the_app(make_checkpoint, monkeypatch):
    """`nabla serve` flags reach the app; uvicorn's run is replaced so nothing listens."""
    import nabla.cli.serve as commands

    seen = {}

    class FakeServer:
        def __init__(self, config, state):
            seen["config"], seen["state"] = config, state

        def run(self):
            seen["ran"] = True

    monkeypatch.setattr(commands, "draining_server", FakeServer)
    code = main(["serve", "--model", str(make_checkpoint()), "--port", "0", "--model-name", "tiny",
                 "--api-key", "k", "--cors-origin", "http://a.example", "--max-batch-size", "3",
                 "--max-seq-len", "64"])
    assert code == 0 and seen["ran"]
    state = seen["state"]
    assert state.api_key == "k" and state.serving.model_name == "tiny"
    assert state.serving.engine.n_slots == 3 and state.serving.max_seq_len == 64
    assert seen["config"].port == 0 and seen["config"].host == "127.0.0.1"


def test_sigterm_finishes_in_flight_then_refuses(reference):
    """SIGTERM (uvicorn's handle_exit, as the signal handler calls it): the open stream runs to its end,
    new requests are refused, the server exits. The server borrows the reference model's cache."""
    import threading

    import uvicorn

    from nabla.cli.serve import draining_server
    from nabla.server.app import create_app

    app = create_app(reference, "tiny")
    port = free_port()
    server = draining_server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                            timeout_graceful_shutdown=30), app.state.nabla)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line:
                continue
            if not chunks:
                server.handle_exit(signal.SIGTERM, None)  # mid-stream
                try:
                    refused = httpx.get(url + "/health").status_code == 503
                except httpx.TransportError:
                    refused = True
                assert refused
            chunks.append(line)
    assert chunks[-1] == "data: [DONE]"
    last = json.loads(chunks[-2][6:])
    assert last["usage"]["completion_tokens"] == 40  # the in-flight request ran to its end
    thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health")
