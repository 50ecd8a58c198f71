"""The model against Hugging Face transformers on the same random weights."""

import pytest
import torch
from conftest import random_state
from hf_reference import hf_model_from_meta

from nabla.checkpoint.meta import args_from_params
from nabla.errors import ConfigError
from nabla.model import ModelArgs, Transformer

CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32),
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32,
                ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=500000.0),
    "llama3.1-rope": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, multiple_of=16,
                          rope_theta=500000.0, use_scaled_rope=True),
}


def build(params, seed=0):
    args = args_from_params(params)
    model = Transformer(args).eval()
    model.load_state_dict(random_state(args, seed), strict=False)
    return model, args


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    model, args = build(CONFIGS[name])
    hf = hf_model_from_meta(model.state_dict(), args)
    tokens = torch.randint(0, args.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_greedy_generation_equals_transformers(name, make_checkpoint):
    from nabla import Llama

    params = CONFIGS[name] | {"vocab_size": 32000}
    llama = Llama.build(make_checkpoint(params, seed=3), None, max_seq_len=64, max_batch_size=2)
    hf = hf_model_from_meta(llama.model.state_dict(), llama.model.args)
    prompt = llama.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    (ours,), _ = llama.generate([prompt], max_gen_len=20, temperature=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=20)
    theirs = out[0, len(prompt):].tolist()
    if 2 in theirs:  # nabla stops at EOS; compare up to it
        theirs = theirs[: theirs.index(2)]
    assert ours == theirs


def test_cached_decode_equals_full_forward():
    model, args = build(CONFIGS["gqa"])
    tokens = torch.randint(0, args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 64)
        parts = [model(tokens[:, :17], 0)]
        for t in range(17, 40):
            parts.append(model(tokens[:, t:t + 1], t))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_per_sequence_positions_and_rows():
    """Each sequence at its own position in its own cache row (batched decode)."""
    model, args = build(CONFIGS["mha"])
    a = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_a, ref_b = model(a), model(b)
        model.setup_cache(4, 32)
        model(a[:, :11], 0, rows=torch.tensor([3]))
        model(b[:, :6], 0, rows=torch.tensor([1]))
        step = model(torch.cat([a[:, 11:], b[:, 6:]]), torch.tensor([11, 6]), rows=torch.tensor([3, 1]))
    torch.testing.assert_close(step[0, 0], ref_a[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, -1], atol=1e-5, rtol=1e-5)


def test_ffn_width_follows_meta():
    # Llama 2 7B: dim 4096, multiple_of 256 -> 11008; Llama 3 8B: multiplier 1.3, multiple_of 1024 -> 14336.
    assert ModelArgs(dim=4096, n_layers=1, n_heads=32, vocab_size=8).hidden_dim == 11008
    assert ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=8, multiple_of=1024,
                     ffn_dim_multiplier=1.3).hidden_dim == 14336


@pytest.mark.parametrize("bad", [
    {"dim": 0}, {"n_heads": 5}, {"n_kv_heads": 3}, {"norm_eps": -1.0}, {"rope_theta": 0},
    {"vocab_size": 0}, {"ffn_dim_multiplier": -2.0}, {"dim": "64"},
])
def test_invalid_params_are_config_errors(bad):
    with pytest.raises(ConfigError):
        args_from_params(CONFIGS["mha"] | bad)


def test_unknown_params_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="moe_experts"):
        args = args_from_params(CONFIGS["mha"] | {"moe_experts": 8})
    assert args.dim == 64


def test_real_rotary_path_equals_complex(monkeypatch):
    """Devices without complex kernels (older MPS) rotate with cos/sin arithmetic: same logits."""
    import nabla.model.llama as llama_module

    model, args = build(CONFIGS["gqa"])
    tokens = torch.randint(0, args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(tokens)
        model.setup_cache(2, 64)
        ref_cached = torch.cat([model(tokens[:, :20], 0), model(tokens[:, 20:], 20)], 1)
        monkeypatch.setattr(llama_module, "complex_ok", lambda device: False)
        real = model(tokens)
        real_cached = torch.cat([model(tokens[:, :20], 0), model(tokens[:, 20:], 20)], 1)
    torch.testing.assert_close(real, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(real_cached, ref_cached, atol=1e-5, rtol=1e-5)
