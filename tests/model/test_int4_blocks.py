"""nabla's int4 is llama.cpp's Q4_0, bit for bit, and its CPU kernels compute exactly Q4_0 x Q8_0.

References: the `gguf` package's Q4_0 quantizer and dequantizer (llama.cpp's own arithmetic,
restated in NumPy by llama.cpp's authors), and a float64 product of the dequantized weights
with the int8-quantized activations, restated here from llama.cpp's quantize_row_q8_0.
"""

import functools

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba")

from nabla.model import cpu_kernels_jit, cpu_kernels_simd  # noqa: E402
from nabla.model.quantize import (  # noqa: E402
    Int4Linear,
    dequantize_int4,
    int4_from_q4_0,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

Q4_0 = gguf.GGMLQuantizationType.Q4_0


def weights(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[0, :32] = 0  # an all-zero block: d = 0
    w[1, :32] = 0.5  # equal magnitudes: the first one sets d's sign
    w[1, 5] = -0.5
    return w


@pytest.mark.parametrize("N,K", [(8, 32), (6, 288), (5, 768), (4, 2048), (3, 5632)])
def test_quantize_int4_is_gguf_q4_0_byte_for_byte(N, K):
    w = weights(N, K)
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), Q4_0).copy())  # (N, K/32 * 18) bytes
    q, d = quantize_int4(w)
    packed, scales = int4_from_q4_0(raw, (N, K))
    assert torch.equal(scales.view(torch.int16), d.view(torch.int16))
    assert torch.equal(packed, pack_int4(q))
    want = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), Q4_0).reshape(N, K))
    assert torch.equal(dequantize_int4(q, d), want)


@pytest.mark.parametrize("K", [32, 288, 512, 768, 5632])
def test_pack_int4_round_trips_with_and_without_a_short_last_chunk(K):
    q = torch.randint(0, 16, (7, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(K))
    packed = pack_int4(q)
    assert packed.shape == (7, K // 2)
    assert torch.equal(unpack_int4(packed), q)


def reference(w: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """float64 (dequantized Q4_0 W) x (x quantized to int8 per block of 32, as llama.cpp's q8_0)."""
    q, d = quantize_int4(w)
    W = dequantize_int4(q, d).double().numpy()
    X = x.numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(X).max(axis=-1, keepdims=True)
    dx = amax / np.float32(127)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), np.float32(0)).astype(np.float32)
    xq = np.rint(X * inv)
    return (xq * dx).reshape(x.shape).astype(np.float64) @ W.T


def run_kernel(kernel, w, x):
    lin = Int4Linear(w)
    from nabla.model.cpu_kernels import rows_q4

    saved = cpu_kernels_jit._rows_q4
    cpu_kernels_jit._rows_q4 = kernel
    try:
        return rows_q4(x, lin.weight, lin.scales).double().numpy()
    finally:
        cpu_kernels_jit._rows_q4 = saved


KINDS = list(cpu_kernels_simd.KINDS) + [None]  # None: the portable loop


@functools.cache
def kernel_for(kind):
    return cpu_kernels_jit.rows_q4_kernel(kind)


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("N,K,B", [(40, 288, 1), (33, 768, 3), (64, 2048, 1), (20, 5632, 16), (17, 96, 2)])
def test_every_kernel_computes_q4_0_times_q8_0(kind, N, K, B):
    kernel = kernel_for(kind)
    w = weights(N, K, seed=N)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(K)) * 3
    x[0, :32] = 0  # an all-zero block of x
    want = reference(w, x)
    got = run_kernel(kernel, w, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("B", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K", [800, 2048])
def test_tiles_of_x_rows_and_blocks_of_weight_rows_match_the_reference(kind, B, K):
    # Tiles of x rows (cpu_kernels_simd.Q4_TILE) and the rows left over; weights of several row counts
    # in one call, blocks of weight rows (cpu_kernels_jit.Q4_ROWS) with a short last block; K = 800:
    # 25 blocks, a chunk of 16 then a short one of 9.
    from nabla.model.cpu_kernels import rows_q4_multi

    kernel = kernel_for(kind)
    ws = [weights(N, K, seed=N) for N in (70, 33, 2)]
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(B)) * 3
    lins = [Int4Linear(w) for w in ws]
    saved = cpu_kernels_jit._rows_q4
    cpu_kernels_jit._rows_q4 = kernel
    try:
        got = rows_q4_multi(x, [lin.q4_arrays() for lin in lins])
    finally:
        cpu_kernels_jit._rows_q4 = saved
    for w, y in zip(ws, got):
        want = reference(w, x)
        assert y.shape == (B, w.shape[0])
        assert np.abs(y.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.skipif(not cpu_kernels_simd.KINDS, reason="no AVX2 / AVX-512 VNNI")
@pytest.mark.parametrize("K", [32, 800, 2048])
def test_vector_quantization_of_x_matches_the_loop(K):
    # The two quantizers of x agree on every int8 value and block sum; d is max|x| / 127 as q8_0 has it.
    from numba import njit

    @njit
    def vector(X, XL, XH, DX, XS):
        for b in range(X.shape[0]):
            cpu_kernels_simd.q8_blocks(X, b, XL, XH, DX, XS)

    g = np.random.default_rng(K)
    X = (g.standard_normal((3, K)) * g.choice([1e-3, 1.0, 1e3], (3, K))).astype(np.float32)
    X[0, :32] = 0
    X[2, -32:] = 0.5  # ties at +-127
    X[2, -5] = -0.5
    G = K // 32
    padded = -(-G // 16) * 16
    outs = []
    for fn in (vector, cpu_kernels_jit._quantize_blocks):
        bufs = (np.zeros((3, 16 * padded), np.int8), np.zeros((3, 16 * padded), np.int8),
                np.zeros((3, padded), np.float32), np.zeros((3, padded), np.int32))
        fn(X, *bufs)
        outs.append(bufs)
    (xl, xh, dx, xs), (xl0, xh0, _, xs0) = outs
    assert np.array_equal(xl, xl0) and np.array_equal(xh, xh0) and np.array_equal(xs, xs0)
    assert np.array_equal(dx[:, :G], np.abs(X.reshape(3, G, 32)).max(axis=-1) / np.float32(127))


def test_int4_linear_runs_the_kernel_within_x_quantization_of_the_float_product():
    w = weights(48, 768)
    fast, plain = Int4Linear(w, "numba"), Int4Linear(w, "dequant")
    x = torch.randn(2, 5, 768)
    with torch.no_grad():
        got, want = fast(x), plain(x)
    assert got.shape == want.shape == (2, 5, 48)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # int8 activations: ~0.5% here
    assert torch.equal(plain.dequantize(), dequantize_int4(*quantize_int4(w)))


# The asymmetric variant: llama.cpp's Q4_1 arithmetic, w = d * q + m (q in 0..15, fp16 d and m per block
# of 32), in the same packed nibbles and scales, the m in a second fp16 array of the scales' shape.


def random_blocks(N, K, seed):
    """(q (N, K) in 0..15, d, m (N, K/32) fp16): random, d of both signs, an all-zero block of d and m."""
    g = np.random.default_rng(seed)
    q = torch.from_numpy(g.integers(0, 16, (N, K), dtype=np.uint8))
    d = torch.from_numpy((g.standard_normal((N, K // 32)) * 0.02).astype(np.float16))
    m = torch.from_numpy((g.standard_normal((N, K // 32)) * 0.1).astype(np.float16))
    d[0, 0] = m[0, 0] = 0
    return q, d, m


def q8_0(x: torch.Tensor) -> np.ndarray:
    """x as the kernels see it, float64: per block of 32 dx * round(x / dx), dx = max|x| / 127 (q8_0)."""
    X = x.numpy().reshape(x.shape[0], -1, 32)
    dx = np.abs(X).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), np.float32(0)).astype(np.float32)
    return (np.rint(X * inv) * dx).reshape(x.shape).astype(np.float64)


def dequantized(q, d, m=None) -> np.ndarray:
    """float64 W: d * q + m (Q4_1), or (q - 8) * d (Q4_0) where m is None."""
    per = lambda a: np.repeat(a.double().numpy(), 32, axis=1)  # noqa: E731
    if m is None:
        return (q.double().numpy() - 8) * per(d)
    return q.double().numpy() * per(d) + per(m)


def run_multi(kernel, x, blocks):
    """rows_q4_multi with `kernel` for weights given as (q, d, m or None)."""
    from nabla.model.cpu_kernels import q4_arrays, rows_q4_multi

    saved = cpu_kernels_jit._rows_q4
    cpu_kernels_jit._rows_q4 = kernel
    try:
        return rows_q4_multi(x, [q4_arrays(pack_int4(q), d, m) for q, d, m in blocks])
    finally:
        cpu_kernels_jit._rows_q4 = saved


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("K", [512, 2048, 32 * 20, 32 * 7])  # whole chunks of 16 blocks; a short last chunk
def test_every_kernel_computes_q4_1_times_q8_0(kind, B, K):
    # Tiles of x rows (4) and rows left over (1-3, 5, 6); 37 weight rows: a short last block of rows.
    kernel = kernel_for(kind)
    q, d, m = random_blocks(37, K, seed=K + B)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(B)) * 3
    x[0, :32] = 0  # an all-zero block of x
    want = q8_0(x) @ dequantized(q, d, m).T
    (got,) = run_multi(kernel, x, [(q, d, m)])
    assert got.shape == (B, 37)
    assert np.abs(got.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("K", [1024, 32 * 20])
def test_one_call_mixes_q4_0_and_q4_1_weights(kind, B, K):
    kernel = kernel_for(kind)
    q0, d0, _ = random_blocks(45, K, seed=1)
    q1, d1, m1 = random_blocks(33, K, seed=2)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(K)) * 3
    got = run_multi(kernel, x, [(q0, d0, None), (q1, d1, m1), (q0, d0, None)])
    xq = q8_0(x)
    for y, W in zip(got, (dequantized(q0, d0), dequantized(q1, d1, m1), dequantized(q0, d0))):
        want = xq @ W.T
        assert y.shape == (B, W.shape[0])
        assert np.abs(y.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_q4_arrays_without_mins_is_q4_0_and_checks_the_mins_shape():
    from nabla.model.cpu_kernels import q4_arrays

    q, d, m = random_blocks(4, 64, seed=0)
    P, S, M = q4_arrays(pack_int4(q), d)
    assert M.shape == (0, 0) and M.dtype == np.uint16
    assert np.array_equal(q4_arrays(pack_int4(q), d, m)[2], m.view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(ValueError):
        q4_arrays(pack_int4(q), d, m[:, :1])


@pytest.mark.parametrize("kernel", ["numba", "int4pack", "dequant"])
def test_int4_linear_with_mins_computes_q4_1_in_every_kernel(kernel):
    """A layer holding Q4_1 blocks (a GGUF file's Q4_1 / Q4_K): each kernel it may run computes d * q + m."""
    if kernel == "int4pack" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4pack CPU kernel")
    q, d, m = random_blocks(48, 512, seed=7)  # int4pack takes rows in 16s
    lin = Int4Linear(None, kernel, blocks=(pack_int4(q), d, m))
    assert torch.equal(lin.dequantize().double(), torch.from_numpy(dequantized(q, d, m)))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = lin(x).double().numpy()
    exact = x.double().numpy() @ dequantized(q, d, m).T
    # int4pack and dequant compute from the weights themselves; numba quantizes x per block (q8_0)
    want = q8_0(x) @ dequantized(q, d, m).T if kernel == "numba" else exact
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert "Q4_1" in repr(lin)


# llama.cpp's Q4_K: super-blocks of 256 weights (8 blocks of 32), fp16 d and dmin per super-block, a 6-bit
# scale sc and min mn per block: w = d * sc * q - dmin * mn. The kernels read the nibbles in pack_int4's
# layout, sc and mn one byte per block, and d, dmin interleaved per super-block (cpu_kernels.q4k_arrays).

Q4_K = gguf.GGMLQuantizationType.Q4_K


def q4_k_raw(N, K, seed):
    """N rows of K weights as llama.cpp's Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of packed
    6-bit scales and mins, 128 bytes of nibbles): d, dmin random in [0.001, 0.01], the other bytes random."""
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, (N * K // 256, 144), dtype=np.uint8)
    raw[:, 0:2] = g.uniform(0.001, 0.01, (N * K // 256, 1)).astype(np.float16).view(np.uint8)
    raw[:, 2:4] = g.uniform(0.001, 0.01, (N * K // 256, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(N, K // 256 * 144)


def q4_k_parts(raw, N, K):
    """(q (N, K) uint8, sc, mn (N, K/32) uint8, dd (N, K/128) fp16: d, dmin per super-block) from raw Q4_K."""
    blocks = raw.reshape(-1, 144)
    d, dmin = blocks[:, 0:2].copy().view(np.float16), blocks[:, 2:4].copy().view(np.float16)
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # four groups of 32 bytes: low nibbles block 2g, high 2g + 1
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(N, K)
    dd = np.concatenate([d, dmin], axis=1).reshape(N, K // 128)
    return (torch.from_numpy(q), torch.from_numpy(sc.reshape(N, K // 32).astype(np.uint8)),
            torch.from_numpy(mn.reshape(N, K // 32).astype(np.uint8)), torch.from_numpy(dd))


def q4_k_weights(P, SC, MN, DD, dtype=np.float64) -> np.ndarray:
    """W from the kernels' arrays: per block scale = d * sc, minimum = dmin * mn (fp32, exact, as llama.cpp),
    then scale * q - minimum in `dtype`."""
    N, K = P.shape[0], 2 * P.shape[1]
    q = unpack_int4(torch.from_numpy(P)).numpy().astype(dtype)
    dd = DD.view(np.float16).astype(np.float32).reshape(N, K // 256, 2)
    per = lambda a: np.repeat(a, 32, axis=1).astype(dtype)  # noqa: E731
    scale = np.repeat(dd[:, :, 0], 8, axis=1) * SC.astype(np.float32)
    minimum = np.repeat(dd[:, :, 1], 8, axis=1) * MN.astype(np.float32)
    return per(scale) * q - per(minimum)


@functools.cache
def q4k_kernel_for(kind):
    return cpu_kernels_jit.rows_q4k_kernel(kind)


def run_q4k(kernel, x, weights):
    from nabla.model.cpu_kernels import rows_q4k_multi

    saved = cpu_kernels_jit._rows_q4k
    cpu_kernels_jit._rows_q4k = kernel
    try:
        return rows_q4k_multi(x, weights)
    finally:
        cpu_kernels_jit._rows_q4k = saved


def q4k_weight(N, K, seed):
    """(the kernels' arrays, float64 W) of a random Q4_K weight."""
    from nabla.model.cpu_kernels import q4k_arrays

    q, sc, mn, dd = q4_k_parts(q4_k_raw(N, K, seed), N, K)
    arrays = q4k_arrays(pack_int4(q), sc, mn, dd)
    return arrays, q4_k_weights(*arrays)


@pytest.mark.parametrize("K", [256, 768, 2048])
def test_q4_k_arrays_are_gguf_q4_k(K):
    from nabla.model.cpu_kernels import q4k_arrays

    raw = q4_k_raw(9, K, seed=K)
    q, sc, mn, dd = q4_k_parts(raw, 9, K)
    P, SC, MN, DD = q4k_arrays(pack_int4(q), sc, mn, dd)
    assert P.shape == (9, K // 2) and SC.shape == MN.shape == (9, K // 32) and DD.shape == (9, K // 128)
    assert DD.dtype == np.uint16 and SC.dtype == MN.dtype == np.uint8
    want = gguf.quants.dequantize(raw, Q4_K).reshape(9, K)
    # fp32 as llama.cpp (d * sc * q - dmin * mn rounds once); float64 is the exact value the kernels sum
    assert np.array_equal(q4_k_weights(P, SC, MN, DD, np.float32), want)
    exact = q4_k_weights(P, SC, MN, DD)
    assert np.abs(exact - want).max() <= 2 ** -24 * np.abs(want).max()
    assert np.array_equal(q4k_arrays(pack_int4(q), sc, mn, dd.view(torch.int16))[3], DD)
    with pytest.raises(ValueError):
        q4k_arrays(pack_int4(q), sc[:, :1], mn, dd)
    with pytest.raises(ValueError):
        q4k_arrays(pack_int4(q), sc, mn, dd.float())
    with pytest.raises(ValueError):
        q4k_arrays(pack_int4(q)[:, :64], sc[:, :4], mn[:, :4], dd[:, :1])  # K = 128: not whole super-blocks


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("K", [256, 512, 2048, 768, 5632])  # 256, 768, 5632: a short last chunk of 8 blocks
def test_every_kernel_computes_q4_k_times_q8_0(kind, B, K):
    arrays, W = q4k_weight(37, K, seed=K + B)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(B)) * 3
    x[0, :32] = 0  # an all-zero block of x
    want = q8_0(x) @ W.T
    (got,) = run_q4k(q4k_kernel_for(kind), x, [arrays])
    assert got.shape == (B, 37)
    assert np.abs(got.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kind", KINDS, ids=[k or "portable" for k in KINDS])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("K", [1024, 768])
def test_one_q4_k_call_takes_several_weights_and_skips_padding(kind, B, K):
    from nabla.model.cpu_kernels import q4k_arrays

    ws = [q4k_weight(N, K, seed=N) for N in (70, 33, 2)]
    empty = torch.empty(0, 0, dtype=torch.uint8)
    padding = q4k_arrays(empty, empty, empty, torch.empty(0, 0, dtype=torch.float16))  # no rows, as cpu_step pads
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(K)) * 3
    xq = q8_0(x)
    for arrays in ([a for a, _ in ws], [padding] + [a for a, _ in ws] + [padding]):
        got = run_q4k(q4k_kernel_for(kind), x, arrays)
        got = [y for y, a in zip(got, arrays) if a is not padding]
        for y, (_, W) in zip(got, ws):
            want = xq @ W.T
            assert y.shape == (B, W.shape[0])
            assert np.abs(y.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kernel", ["numba", "int4pack", "dequant"])
def test_int4_linear_holding_q4_k_computes_it_in_every_kernel(kernel):
    """A layer holding a GGUF file's Q4_K super-blocks: it dequantizes to the gguf package's numbers
    exactly, and each kernel it may run computes d * sc * q - dmin * mn."""
    if kernel == "int4pack" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4pack CPU kernel")
    N, K = 48, 768
    raw = q4_k_raw(N, K, seed=9)
    q, sc, mn, dd = q4_k_parts(raw, N, K)
    lin = Int4Linear(None, kernel, blocks=(pack_int4(q), sc, mn, dd))
    assert lin.format == "Q4_K" and "Q4_K" in repr(lin)
    W = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(N, K)
    assert np.array_equal(lin.dequantize().numpy(), W)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = lin(x).double().numpy()
    want = (q8_0(x) if kernel == "numba" else x.double().numpy()) @ W.astype(np.float64).T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
