"""Weight-only int8 / int4 quantization: error bounds, kernels, logits and greedy tokens vs fp32."""

import copy

import pytest
import torch
from conftest import random_state

from nabla.errors import ConfigError
from nabla.model import Transformer
from nabla.model.args import from_name
from nabla.model.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)


def tiny_model(seed=0):
    args = from_name("tiny")
    model = Transformer(args).eval()
    model.load_state_dict(random_state(args, seed), strict=False)
    return model


def test_int8_error_within_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[3] *= 50  # one loud channel must not hurt the others: scales are per channel
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()
    assert torch.equal(q.abs().amax(1), torch.full((48,), 127, dtype=torch.int8))


def test_int4_error_within_a_step_and_packing_round_trips():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    q, s = quantize_int4(w, 32)
    assert q.max() <= 15 and q.min() >= 0 and s.shape == (16, 4) and s.dtype == torch.float16
    err = (dequantize_int4(q, s) - w).abs().reshape(16, 4, 32)
    step = s.float().abs()[..., None]
    # Q4_0's grid is -8d..7d with d = -(largest magnitude) / 8: half a step inside it, a whole one
    # for a weight of the other sign and the same magnitude (clamped to 7d).
    assert (err <= step * (0.5 + 2e-3)).float().mean() > 0.95
    assert (err <= step * 1.001 + 1e-6).all()
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ConfigError, match="multiple of the group"):
        quantize_int4(torch.randn(4, 40), 32)


@pytest.mark.parametrize("cls,kernels", [(Int8Linear, ["int8pack", "fbgemm"]), (Int4Linear, ["int4pack"])])
def test_kernels_agree_with_dequantized_weights(cls, kernels):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    for rows in ((2, 2), (2, 5)):  # int4pack serves up to 4 rows; more rebuild the weight
        x = torch.randn(*rows, 64, generator=torch.Generator().manual_seed(3))
        check_kernels(cls, kernels, w, x)


def check_kernels(cls, kernels, w, x):
    ref = torch.nn.functional.linear(x, cls(w, "dequant").dequantize())
    for kernel in kernels:
        y = cls(w, kernel)(x)
        assert y.shape == (*x.shape[:-1], 96)
        # fbgemm also quantizes the input to 7 bits; the weight-only kernels are exact up to rounding.
        tol = 0.05 * ref.abs().max() if kernel == "fbgemm" else 1e-4 * ref.abs().max()
        assert (y - ref).abs().max() <= tol, kernel


@pytest.mark.parametrize("mode,rel", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_logits_close_to_fp32(mode, rel):
    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(copy.deepcopy(model), mode, kernel="dequant")
        ours = q(tokens)
        # The dequant kernel on quantized weights equals fp32 on the dequantized weights exactly.
        plain = copy.deepcopy(model)
        for name, mod in q.named_modules():
            if isinstance(mod, (Int8Linear, Int4Linear)):
                plain.get_submodule(name).weight.copy_(mod.dequantize())
        torch.testing.assert_close(ours, plain(tokens), atol=1e-5, rtol=1e-5)
    assert (ours - ref).norm() / ref.norm() < rel
    assert weight_bytes(q) < weight_bytes(model) / (3 if mode == "int8" else 3.5)


def test_quantized_cached_decode_equals_full_forward():
    model = quantize_model(tiny_model(), "int8", kernel="dequant")
    tokens = torch.randint(0, model.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 32)
        assert model.layers[0].attention.cache.k.dtype == torch.float32
        parts = [model(tokens[:, :12], 0)] + [model(tokens[:, t:t + 1], t) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_int8_greedy_agrees_with_fp32(make_checkpoint):
    from conftest import TINY_MHA

    from nabla import Llama

    path = make_checkpoint(TINY_MHA, seed=3)
    fp32 = Llama.build(path, None, max_seq_len=64, max_batch_size=1)
    int8 = Llama.build(path, None, max_seq_len=64, max_batch_size=1, quantize="int8")
    assert isinstance(int8.model.layers[0].attention.wq, Int8Linear)
    prompt = fp32.tokenizer.encode("Once upon a time", bos=True, eos=False)
    (a,), _ = fp32.generate([prompt], max_gen_len=32, temperature=0)
    (b,), _ = int8.generate([prompt], max_gen_len=32, temperature=0)
    same = sum(x == y for x, y in zip(a, b))
    print(f"int8 greedy agreement: {same}/{max(len(a), len(b))}")
    assert len(b) > 0 and a[:4] == b[:4]


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="int8, int4"):
        quantize_model(tiny_model(), "int3")


def test_int8_layers_stay_int8_under_int4():
    """A GGUF file's layers stored above 4 bits (Q4_K_M keeps some in Q6_K) stay int8 in an int4 model."""
    model = Transformer(from_name("tiny"))
    keep = {"layers.0.feed_forward.w2.weight", "layers.1.attention.wv.weight"}
    quantize_model(model, "int4", int8_layers=keep, head="int4")
    kinds = {f"{n}.weight": type(m) for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert {k for k, t in kinds.items() if t is Int8Linear} == keep
    assert kinds["output.weight"] is Int4Linear and kinds["layers.0.feed_forward.w1.weight"] is Int4Linear
