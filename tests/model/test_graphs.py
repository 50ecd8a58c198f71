"""Recorded decode steps (nabla.model.graphs): the fixed-shape step equals the plain one.

CUDA graphs themselves run in tests/gpu; here a stand-in recorder replays the
step by calling it again, writing into the same output buffer, after the same
warm-up calls (which write keys past the cached positions). That checks the
parts that are nabla's: fixed buffers, masked attention over a bucket of the
cache, buckets, and forgetting the graphs when the cache moves.
"""

import pytest
import torch
from conftest import TINY_GQA, random_state

from nabla import device as devices
from nabla.checkpoint.meta import args_from_params
from nabla.model import Transformer, graphs


def tiny(seed=0):
    args = args_from_params(dict(TINY_GQA))
    model = Transformer(args).eval()
    model.load_state_dict(random_state(args, seed), strict=False)
    return model


@pytest.fixture
def recorded(monkeypatch):
    """Pretend the CPU records graphs; count the recordings."""
    made = []

    def record(fn, device, pool=None):
        fn(), fn()  # warm-up, as the real recorder does
        out = fn()
        made.append(out)
        return (lambda: out.copy_(fn())), out, pool

    monkeypatch.setattr(devices, "records_graphs", lambda device: True)
    monkeypatch.setattr(devices, "record_graph", record)
    monkeypatch.setattr(graphs, "BUCKET", 8)
    return made


def test_fixed_shape_step_equals_the_plain_step():
    a, b = tiny(), tiny()
    tokens = torch.randint(0, a.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for m in (a, b):
            m.setup_cache(2, 40)
            m(tokens[:, :10], 0)
        for p in range(10, 20):
            plain = a(tokens[:, p:p + 1], p, last_only=True)
            fixed = b(tokens[:, p:p + 1], torch.full((2,), p), last_only=True, cache_len=40)
            torch.testing.assert_close(fixed, plain, atol=1e-5, rtol=1e-5)


def test_replayed_steps_equal_plain_decoding_across_buckets(recorded):
    a, b = tiny(), tiny()
    tokens = torch.randint(0, a.args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for m in (a, b):
            m.setup_cache(2, 48)
            m(tokens[:, :5], 0)
        for p in range(5, 30):  # buckets of 8: cache lengths 8, 16, 24, 32
            plain = a(tokens[:, p:p + 1], p, last_only=True)
            replayed = b.decode(tokens[:, p:p + 1], p)
            torch.testing.assert_close(replayed, plain, atol=1e-5, rtol=1e-5)
    assert len(recorded) == 4
    assert sorted(k[1] for k in b.step_graphs.graphs) == [8, 16, 24, 32]


def test_generate_with_replayed_steps_equals_generate_without(make_checkpoint, recorded):
    from nabla import Llama

    path = make_checkpoint(TINY_GQA, seed=4)
    prompts = [[1, 15043, 3186], [1, 450, 4996, 17354, 1701, 975]]
    plain = Llama.build(path, None, max_seq_len=40, max_batch_size=2)
    graphs.plain_steps(plain.model)  # never records: the plain forward
    fast = Llama.build(path, None, max_seq_len=40, max_batch_size=2)
    a, alp = plain.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    b, blp = fast.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    assert a == b and recorded
    torch.testing.assert_close(torch.tensor(blp), torch.tensor(alp), atol=1e-5, rtol=1e-5)
    n = len(recorded)
    fast.model.setup_cache(2, 40)  # new cache memory: the old graphs must go
    assert fast.model.step_graphs is None
    c, _ = fast.generate(prompts, max_gen_len=20, temperature=0)
    assert c == a and len(recorded) > n


def test_no_recording_outside_inference_mode_or_with_hooks(recorded):
    model = tiny()
    model.setup_cache(1, 16)
    tok = torch.tensor([[5]])
    with torch.no_grad():
        model.decode(tok, 0)
    assert not recorded
    handle = model.register_forward_pre_hook(lambda mod, args: None)
    with torch.inference_mode():
        model.decode(tok, 1)
    assert not recorded
    handle.remove()
    with torch.inference_mode():
        model.decode(tok, 2)
    assert len(recorded) == 1
