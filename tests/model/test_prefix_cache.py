"""The prefix cache: logits bit-identical with and without it, LRU eviction within the budget, counters."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA

from nabla import Llama
from nabla.model.prefix_cache import MIN_PASS, PrefixCache


@pytest.fixture(scope="module", params=[TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def pair(request, make_checkpoint):
    """The same weights twice: with a prefix cache and without."""
    path = make_checkpoint(request.param)
    return (Llama.build(path, None, max_seq_len=1024, max_batch_size=2, prefix_cache_mb=64),
            Llama.build(path, None, max_seq_len=1024, max_batch_size=2))


def prompts(n: int, shared: int = 560, own: int = 30, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 32000, (shared,), generator=g).tolist()
    return [[1] + system + torch.randint(3, 32000, (own + i,), generator=g).tolist() for i in range(n)]


def test_model_logits_bit_identical_from_cached_blocks(pair):
    cached, plain = pair
    model, cache = cached.model, PrefixCache(1 << 26)
    first, second = prompts(2)
    with torch.inference_mode():
        model(torch.tensor([first]), 0)
        cache.store(model, 0, first, len(first))
        want = plain.model(torch.tensor([second]), 0)[0, -1]
        found = cache.match(second)
        n = cache.load(model, 1, found)
        got = model(torch.tensor([second[n:]]), torch.tensor([n]), rows=torch.tensor([1]))[0, -1]
    assert n == 560 and len(second) - n >= MIN_PASS
    assert torch.equal(got, want)


def test_generate_and_stream_bit_identical_and_counted(pair):
    cached, plain = pair
    cached.prefix_cache.clear()
    hits = cached.prefix_cache.hits
    for p in prompts(4, seed=1):
        assert cached.generate([p], 8, temperature=0) == plain.generate([p], 8, temperature=0)
        sa = [x.token for x in cached.stream(p, 8, temperature=0)]
        assert sa == [x.token for x in plain.stream(p, 8, temperature=0)]
    # Meta's logprobs are a log-softmax across the prefill's positions: with them, no reuse, same numbers
    p = prompts(1, seed=1)[0]
    assert cached.generate([p], 4, temperature=0, logprobs=True) == plain.generate([p], 4, temperature=0,
                                                                                    logprobs=True)
    pc = cached.prefix_cache
    assert pc.hits - hits == 7 and pc.tokens_saved >= 7 * 512 and len(pc) > 0


def test_batched_generate_sampled_is_unchanged(pair):
    cached, plain = pair
    batch = prompts(2, seed=2)
    for _ in range(2):  # a miss, then a hit
        torch.manual_seed(5)
        a = cached.generate(batch, 6, temperature=0.8, top_p=0.9)
        torch.manual_seed(5)
        b = plain.generate(batch, 6, temperature=0.8, top_p=0.9)
        assert a == b
    echo = cached.generate(batch, 4, temperature=0, logprobs=True, echo=True)  # prompt logprobs: no reuse
    assert echo == plain.generate(batch, 4, temperature=0, logprobs=True, echo=True)


def test_short_prompts_are_neither_stored_nor_counted(pair):
    cached, _ = pair
    pc = cached.prefix_cache
    before = (pc.hits, pc.misses, len(pc))
    cached.generate([[1, 2, 3, 4]], 3, temperature=0)
    assert (pc.hits, pc.misses, len(pc)) == before


def test_lru_eviction_within_budget(pair):
    cached, _ = pair
    model = cached.model
    seqs = [prompts(1, shared=527, own=0, seed=10 + i)[0] for i in range(4)]  # 528 tokens: 33 blocks each
    one = PrefixCache(1 << 30)
    with torch.inference_mode():
        model(torch.tensor([seqs[3]]), 0)
        one.store(model, 0, seqs[3], 528)
        block = one.bytes // 33
        cache = PrefixCache(block * 70)  # room for two prompts, not three
        for s in seqs[:3]:
            model(torch.tensor([s]), 0)
            cache.store(model, 0, s, 528)
            assert cache.bytes <= cache.budget
    assert cache.evicted == 29 and len(cache) == 70
    assert len(cache.match(seqs[2])) == len(cache.match(seqs[1])) == 31  # all a prompt may take
    assert len(cache.match(seqs[0])) == 4  # the least recently used went first, from its end


def test_nothing_stored_over_budget_and_zero_is_off():
    assert PrefixCache.of_megabytes(0) is None
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache.of_megabytes(-1)


def test_build_refuses_negative_size(make_checkpoint):
    from nabla.errors import ConfigError

    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=64, max_batch_size=1, prefix_cache_mb=-1)
