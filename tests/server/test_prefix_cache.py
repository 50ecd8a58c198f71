"""The server's prefix cache: the same logprobs, bit for bit, as a server without it; counted in /metrics."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MHA

from server.conftest import MODEL, LiveServer


@pytest.fixture(scope="module")
def servers(make_checkpoint):
    from nabla import Llama

    path = make_checkpoint(TINY_MHA)
    on = LiveServer(Llama.build(path, None, max_seq_len=1024, max_batch_size=2, prefix_cache_mb=32))
    off = LiveServer(Llama.build(path, None, max_seq_len=1024, max_batch_size=2))
    yield on, off
    on.stop()
    off.stop()


def test_logprobs_bit_identical_with_and_without_the_cache(servers):
    on, off = servers
    g = torch.Generator().manual_seed(7)
    system = [1] + torch.randint(3, 32000, (600,), generator=g).tolist()
    for i in range(3):
        prompt = system + torch.randint(3, 32000, (20 + 7 * i,), generator=g).tolist()
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 5}
        with on.http() as a, off.http() as b:
            ra, rb = a.post("/v1/completions", json=body).json(), b.post("/v1/completions", json=body).json()
        assert ra["choices"][0]["logprobs"] == rb["choices"][0]["logprobs"]
        assert ra["choices"][0]["text"] == rb["choices"][0]["text"]
    assert on.metric("nabla_prefix_cache_hits_total") == 2
    assert on.metric("nabla_prefix_cache_misses_total") == 1
    assert on.metric("nabla_prefix_cache_tokens_saved_total") >= 2 * 592
    assert 0 < on.metric("nabla_prefix_cache_bytes") <= on.metric("nabla_prefix_cache_budget_bytes")
    assert off.metric("nabla_prefix_cache_hits_total") == 0 and off.metric("nabla_prefix_cache_budget_bytes") == 0
