"""A live nabla server on a free loopback port, serving a tiny random checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from conftest import TINY_MHA

API_KEY = "sk-test-key"
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn running the app in a background thread."""

    def __init__(self, llama, api_key=API_KEY, **kw):
        import uvicorn

        from nabla.server.app import create_app

        self.llama = llama
        self.app = create_app(llama, MODEL, api_key=api_key, **kw)
        self.state = self.app.state.nabla
        self.engine = self.state.serving.engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_for(self, name: str, value: float, tries: int = 2000) -> None:
        """Poll /metrics until `name` reads `value` (state, not time: no deadline but a try count)."""
        for _ in range(tries):
            if self.metric(name) == value:
                return
            time.sleep(0.01)
        raise AssertionError(f"{name} never reached {value} (last {self.metric(name)})")

    def stop(self):
        self.server.should_exit = self.server.force_exit = True
        self.thread.join(10)


def build(make_checkpoint, max_batch_size=4):
    from nabla import Llama

    return Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=128, max_batch_size=max_batch_size)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine thread and the test's own torch work share the cores; one intra-op thread each
    keeps OpenMP from spinning against itself on a small, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def server(make_checkpoint):
    s = LiveServer(build(make_checkpoint), max_queue=64)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference(make_checkpoint):
    """A separate Llama on the same weights, for expected outputs (the server owns its own cache)."""
    return build(make_checkpoint, max_batch_size=3)


@pytest.fixture(scope="session")
def client(server):
    return server.client()


class Gate:
    """Wraps a model's forward so a test decides how many passes may run, and can make them fail."""

    def __init__(self, model):
        self.model = model
        self.permits = threading.Semaphore(0)
        self.fail = False
        self.forward = model.forward
        model.forward = self

    def __call__(self, *args, **kw):
        self.permits.acquire()
        if self.fail:
            raise RuntimeError("injected failure")
        return self.forward(*args, **kw)

    def open(self, n: int = 10**5):
        self.permits.release(n)

    def close(self):
        """Take back the permits left (once the engine is idle)."""
        while self.permits.acquire(blocking=False):
            pass


@pytest.fixture(scope="module")
def gated_server(make_checkpoint):
    llama = build(make_checkpoint, max_batch_size=1)
    gate = Gate(llama.model)
    s = LiveServer(llama, api_key=None, max_queue=1)
    s.gate = gate
    yield s
    gate.open()
    s.stop()


@pytest.fixture
def gated(gated_server):
    """A server with one cache slot, a queue of one, and a model that runs only as many passes as allowed."""
    s = gated_server
    s.gate.fail = False
    s.gate.close()
    yield s
    s.gate.fail = False
    s.gate.open()
    s.wait_for("nabla_slots_in_use", 0)
    s.wait_for("nabla_queue_depth", 0)
    s.gate.close()


@contextmanager
def admission_paused(engine):
    """Let no waiting sequence start (active ones go on) until the block ends.

    The engine's admission step is swapped for an idle wait: it is called under
    the engine's lock, and waiting on the engine's condition releases it, so
    requests can still queue (and a full queue still refuses them).
    """
    def admit_none():
        engine._cv.wait(engine.idle_wait)
        return []

    engine._admit = admit_none
    try:
        yield
    finally:
        del engine._admit  # the engine's own method again
        with engine._cv:
            engine._cv.notify_all()


class Collected:
    """The token ids each Engine sequence produced, gathered from its events on the engine's thread."""

    def __init__(self):
        self.outputs: dict[int, list[int]] = {}
        self.done = threading.Semaphore(0)

    def sink(self, i: int):
        """The event sink of sequence i."""
        from nabla.server.batching import FinishEvent, TokenEvent

        def take(events):
            for ev in events:
                if isinstance(ev, TokenEvent):
                    self.outputs.setdefault(i, []).append(ev.token)
                elif isinstance(ev, FinishEvent):
                    self.done.release()

        return take

    def wait(self, n: int) -> None:
        """Until n sequences have finished."""
        for _ in range(n):
            self.done.acquire()

    def tokens(self, i: int) -> list[int]:
        return self.outputs.get(i, [])


def greedy(reference, ids: list[int], max_tokens: int) -> list[int]:
    tokens, _ = reference.generate([ids], max_tokens, temperature=0)
    return tokens[0]


def continuation(tokenizer, prompt: list[int], generated: list[int]) -> str:
    """The text `generated` adds after `prompt` (OpenAI's completion text keeps its leading space)."""
    return tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]


