"""nabla.model.cpu_kernels (numba) against torch's own products on the same tensors."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from conftest import TINY_GQA, random_state  # noqa: E402

from nabla.checkpoint.meta import args_from_params  # noqa: E402
from nabla.model import Transformer, cpu_kernels  # noqa: E402
from nabla.model.quantize import Int4Linear, Int8Linear  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(96, 64), (300, 288), (64, 200)])
def test_rows_f32_equals_linear(rows, N, K):
    x, w = randn(rows, K), randn(N, K)
    torch.testing.assert_close(cpu_kernels.rows_f32(x, w), x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 16, 17])
@pytest.mark.parametrize("Ns,K", [((9, 6, 13), 200), ((64, 7), 768), ((5,), 70), ((33,), 16), ((6, 9), 1048)])
def test_rows_f32_tiles_equal_the_float64_product(rows, Ns, K):
    # Row counts around the kernel's tiles (cpu_kernels_simd.F32_TILE), weights whose row counts are not
    # a multiple of the tile (and meet inside a tile), K not a multiple of the vector width.
    x = randn(rows, K)
    ws = [randn(n, K) for n in Ns]
    for y, w in zip(cpu_kernels.rows_f32_multi(x, ws), ws):
        want = x.double() @ w.double().T
        assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_rows_f32_reads_strided_weights():
    jit = cpu_kernels._kernels()
    x, w = randn(5, 48), randn(40, 96)
    y = np.zeros((5, 40), dtype=np.float32)
    jit._rows_f32((w.numpy()[:, ::2],), x.numpy(), (y,))  # rows whose elements are not adjacent: the plain loop
    np.testing.assert_allclose(y, (x @ w[:, ::2].T).numpy(), atol=1e-4, rtol=1e-5)


def test_rows_f32_multi_equals_separate_products():
    x = randn(2, 1, 64)
    ws = [randn(64, 64), randn(32, 64), randn(32, 64)]
    for y, w in zip(cpu_kernels.rows_f32_multi(x, ws), ws):
        assert y.shape == (2, 1, w.shape[0])
        torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-5)


def test_rms_norm_equals_torch():
    x, w = randn(3, 1, 96), randn(96)
    ref = torch.nn.functional.rms_norm(x, (96,), eps=1e-5) * w
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_rows_equal_the_dequantized_weight(cls, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHTS", 0)  # these small layers would go to FBGEMM
    w = randn(80, 128)
    lin = cls(w, kernel="numba")
    x = randn(4, 128)
    with torch.inference_mode():
        ref = x @ lin.dequantize().T
        if cls is Int8Linear and not cpu_kernels.I8_VNNI:
            torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-5)
        else:  # x is quantized to int8 per block too, as llama.cpp does (exact: test_int8_vnni_is_q8_0_dot...)
            assert (lin(x) - ref).norm() / ref.norm() < 0.01
        big = randn(40, 128)  # more rows than a decode step: the bulk path
        ref = big @ lin.dequantize().T
        assert (lin(big) - ref).norm() / ref.norm() < 0.02


def test_kernels_stay_out_of_autograd_and_big_calls():
    w = randn(16, 32)
    assert cpu_kernels.usable(randn(2, 32)) is False  # grad mode is on outside inference
    with torch.inference_mode():
        assert cpu_kernels.usable(randn(2, 32))
        assert not cpu_kernels.usable(randn(cpu_kernels.MAX_ROWS + 1, 32))
        assert not cpu_kernels.usable(randn(2, 32).double())
    lin = torch.nn.Linear(32, 16, bias=False)
    lin.weight.data.copy_(w)
    lin.__class__ = cpu_kernels.RowKernelLinear
    x = randn(2, 32).requires_grad_()
    lin(x).sum().backward()  # F.linear under autograd
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1))


def test_model_with_row_kernels_decodes_as_without(monkeypatch):
    args = args_from_params(dict(TINY_GQA))
    plain = Transformer(args).eval()
    plain.load_state_dict(random_state(args, 1), strict=False)
    fast = copy.deepcopy(plain)
    assert cpu_kernels.use_row_kernels(fast) == 0  # too small to be read from memory: torch serves it
    monkeypatch.setattr(cpu_kernels, "MIN_MODEL_BYTES", 0)
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHTS", 0)
    assert cpu_kernels.use_row_kernels(fast) == 2 * 7 + 1
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=GEN)
    with torch.inference_mode():
        for m in (plain, fast):
            m.setup_cache(2, 32)
        torch.testing.assert_close(fast(tokens[:, :8], 0), plain(tokens[:, :8], 0))  # prefill: torch
        for p in range(8, 12):
            torch.testing.assert_close(fast(tokens[:, p:p + 1], p), plain(tokens[:, p:p + 1], p),
                                       atol=2e-5, rtol=1e-5)
    assert set(fast.state_dict()) == set(plain.state_dict())


def test_int8_layers_sharing_an_input_take_one_call(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHTS", 0)
    ws = [randn(64, 96), randn(32, 96)]
    lins = [Int8Linear(w, kernel="numba") for w in ws]
    x = randn(2, 1, 96)
    with torch.inference_mode():
        for y, lin in zip(cpu_kernels.project(x, *lins), lins):
            torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)


def test_bf16_weights_with_fp32_products():
    from nabla import device as devices

    args = args_from_params(dict(TINY_GQA))
    ref = Transformer(args).eval()
    ref.load_state_dict(random_state(args, 3), strict=False)
    with torch.no_grad():  # the reference: fp32 everywhere, weights rounded to bf16 values
        for lin in ref.modules():
            if type(lin) is torch.nn.Linear:
                lin.weight.copy_(lin.weight.bfloat16().float())
    half = copy.deepcopy(ref)
    assert cpu_kernels.use_bf16_weights(half) == 2 * 7 + 1
    assert half.layers[0].feed_forward.w2.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=GEN)
    with torch.inference_mode():
        for m in (ref, half):
            m.setup_cache(2, 16)
        torch.testing.assert_close(half(tokens[:, :8], 0), ref(tokens[:, :8], 0))  # prefill: upcast weights
        torch.testing.assert_close(half(tokens[:, 8:9], 8), ref(tokens[:, 8:9], 8), atol=2e-5, rtol=1e-5)
    assert devices.bf16_weights_only(torch.device("cpu"), torch.bfloat16) in (True, False)
    assert not devices.bf16_weights_only(torch.device("cpu"), torch.float32)


def q8_0_x(x: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per block of 32 and back, as llama.cpp's quantize_row_q8_0 (fp32 scale)."""
    X = x.numpy().reshape(x.shape[0], -1, 32)
    dx = np.abs(X).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), np.float32(0)).astype(np.float32)
    return torch.from_numpy((np.rint(X * inv) * dx).reshape(x.shape)).double()


@pytest.mark.skipif(not cpu_kernels.I8_VNNI, reason="this CPU has no AVX-512 VNNI: int8 rows stay weight-only")
@pytest.mark.parametrize("N,K,B", [(64, 288, 1), (48, 768, 5), (300, 2048, 3), (40, 96, 16), (77, 160, 8),
                                   (33, 64, 17), (21, 1056, 8), (19, 1120, 17)])  # the last two: compact scales
def test_int8_vnni_rows_are_the_q8_0_product(N, K, B):
    w = randn(N, K) * 0.02
    lin = Int8Linear(w, kernel="numba")
    x = randn(B, K) * 2
    x[0, :32] = 0
    want = q8_0_x(x) @ lin.dequantize().double().T
    got = cpu_kernels.rows_i8(x, lin.weight, lin.scales).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_project_keeps_each_layers_bias(cls, monkeypatch):
    """q, k, v in one call (Qwen2 has biases on them) equal each layer alone, bias included."""
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHTS", 0)
    lins = [cls(randn(64, 128), kernel="numba", bias=randn(64)) for _ in range(3)]
    x = randn(1, 2, 128)
    with torch.inference_mode():
        together = cpu_kernels.project(x, *lins)
        alone = [lin(x) for lin in lins]
    for a, b, lin in zip(together, alone, lins):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert (a - (b - lin.bias)).abs().max() > 0.1  # the bias is there


@pytest.mark.parametrize("compact", [False, True])
def test_quantize_u8_vector_form_equals_the_loop(compact):
    # cpu_kernels_simd.q8_u8_row (contiguous rows) against the plain loop (strided rows), and against q8_0.
    jit = cpu_kernels._kernels()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 96, generator=gen) * torch.rand(3, 2, 96, generator=gen) ** 3
    x[0, 0, :32] = 0
    xs = x.numpy()[:, 0]  # rows 2 floats apart: the loop
    got = [(np.zeros((3, 96), np.uint8), np.zeros((3, 24), np.float32)) for _ in range(2)]
    jit._quantize_u8(np.ascontiguousarray(xs), *got[0], compact)
    jit._quantize_u8(xs, *got[1], compact)
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    scales = got[0][1][:, :3] if compact else got[0][1][:, ::8]
    back = (got[0][0].astype(np.float32) - 128).reshape(3, 3, 32) * scales[:, :, None]
    # the same q (one step apart would be ~1/127 of the block's largest value)
    np.testing.assert_allclose(back.reshape(3, 96), q8_0_x(torch.from_numpy(xs)).numpy(), rtol=1e-6, atol=1e-9)
