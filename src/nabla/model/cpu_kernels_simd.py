"""The 4-bit block dot product in the CPU's own integer instructions, written as LLVM IR for numba.

numba's loop vectoriser turns the nibble-unpacking dot product of a Q4_0 row
into 16-bit multiplies at ~15 G weights/s per core (measured); the memory
gives ~50 GB/s, 100 G 4-bit weights/s, to two cores. What llama.cpp does
instead, and this module does too: the activations are int8 (per block of 32,
as q8_0), and four adjacent bytes of a weight block times four of x are summed
into one int32 lane by one instruction: `vpdpbusd` (AVX-512 VNNI), or
`vpmaddubsw` + `vpmaddwd` (AVX2). The functions below are emitted straight into
the numba kernel (`q4_rows_for(kind, tile)`, an @intrinsic) so that nothing is compiled at
install time and a CPU without those instructions takes the portable loop.

The layout both sides agree on (nabla.model.quantize.pack_int4 for the
weights, cpu_kernels_jit._quantize_blocks for x): a row's blocks go in chunks
of 16; in a chunk, byte j of block kk (j < 16: low nibble weight j, high
nibble weight 16 + j, as in Q4_0) sits at 64 * (j // 4) + 4 * kk + j % 4. So
one 64-byte load holds four bytes of each of 16 blocks, and the four bytes
that one instruction sums belong to the same block. A row whose block count
is not a multiple of 16 ends in a short chunk of four 4m-byte groups.

    q4_rows(P, S, n0, n1, XL, XH, DX, XS, b0, Y, full, m)
        Y[b0 + t, n] for n0 <= n < n1, t < tile: sum over the row's blocks of
        (int dot of the block - 8 * XS) * fp16 S * DX

    q4m_rows(P, S, M, n0, n1, XL, XH, DX, XS, b0, Y, full, m)    (q4_rows_for(kind, tile, mins=True))
        the same for llama.cpp's Q4_1 arithmetic, w = d * q + m (fp16 M, S's shape): per block
        int dot * fp16 S * DX + fp16 M * DX * XS, as llama.cpp's Q4_1 x Q8_1

    q4k_rows(P, SC, MN, DD, n0, n1, XL, XH, DX, XS, b0, Y, full, m)    (q4k_rows_for(kind, tile))
        llama.cpp's Q4_K, w = d * sc * q - dmin * mn: u8 SC, MN per block (6-bit), DD per super-block
        of 8 blocks the fp16 bits of d and dmin, interleaved; per block int dot * (d * sc) * DX
        - (dmin * mn) * DX * XS, llama.cpp's Q4_K arithmetic (x as q8_0
        per block of 32 here, not Q8_K)

One call covers a block of weight rows (the parallel loop's per-task cost is
paid once per block, not per row), and each weight chunk is unpacked once for
`tile` rows of x (prefill).

    q8_blocks(X, row, XL, XH, DX, XS)
        x's row quantized and laid out as above, in whole vectors (any CPU:
        plain LLVM vector operations); cpu_kernels_jit._quantize_blocks's result

Leaves out: choosing kernels and the parallel loop (cpu_kernels_jit).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _features() -> dict:
    """The features of the CPU numba compiles for: NUMBA_CPU_FEATURES where set (numba then targets those,
    e.g. to build for an older CPU), else this machine's."""
    import numba

    spec = numba.config.CPU_FEATURES
    if spec:
        return {f[1:]: f[0] == "+" for f in spec.split(",") if f[:1] in "+-" and len(f) > 1}
    return llvm.get_host_cpu_features()


_FEATURES = _features()
KINDS = tuple(kind for kind, needs in (("vnni512", ("avx512vnni", "avx512bw", "f16c")), ("avx2", ("avx2", "f16c")))
              if all(_FEATURES.get(f) for f in needs))
"""The instruction sets this CPU runs block_dot in, best first (empty: cpu_kernels_jit's portable loop)."""

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_PTR = {t: t.as_pointer() for t in (_I8, _I16, _I32, _F32)}


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _define(module, name: str, ret, args):
    """(function `name` in `module`, whether its body is still to be written: True the first time)."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)
    if not fn.is_declaration:
        return fn, False
    fn.linkage = "internal"
    return fn, True


def _vpdpbusd(module):
    """acc (16 x i32) + per lane the sum of four u8 x s8 products: AVX-512 VNNI's vpdpbusd."""
    return cgutils.get_or_insert_function(module, ir.FunctionType(_vec(_I32, 16), [_vec(_I32, 16)] * 3),
                                          "llvm.x86.avx512.vpdpbusd.512")


def _masked_load(module, b, pointer, t, n: int, align: int, mask):
    """The lanes of an n x t vector at `pointer` where `mask` is set (zeros elsewhere, nothing else read)."""
    vt = _vec(t, n)
    kind = "f32" if t == _F32 else f"i{t.width}"
    fnty = ir.FunctionType(vt, [vt.as_pointer(), _I32, _vec(ir.IntType(1), n), vt])
    fn = cgutils.get_or_insert_function(module, fnty, f"llvm.masked.load.v{n}{kind}.p0")
    return b.call(fn, [b.bitcast(pointer, vt.as_pointer()), ir.Constant(_I32, align), mask, ir.Constant(vt, [0] * n)])


def _sum_lanes(module, b, vec):
    """The sum of a 16 x f32 vector's lanes, in any order."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(_F32, [_F32, _vec(_F32, 16)]),
                                        "llvm.vector.reduce.fadd.v16f32")
    out = b.call(fn, [ir.Constant(_F32, 0.0), vec])
    out.fastmath.add("reassoc")
    return out


def _dot4(module, b, kind, acc, u8, s8):
    """acc (16 x i32) + per lane the sum of four u8 x s8 products (64 bytes each)."""
    if kind == "vnni512":
        return b.call(_vpdpbusd(module), [acc, b.bitcast(u8, _vec(_I32, 16)), b.bitcast(s8, _vec(_I32, 16))])
    # AVX2: pairs of u8 x s8 to i16 (at most 2 * 15 * 127, no saturation), then pairs of i16 to i32.
    ubsw = cgutils.get_or_insert_function(module, ir.FunctionType(_vec(_I16, 16), [_vec(_I8, 32)] * 2),
                                          "llvm.x86.avx2.pmadd.ub.sw")
    wd = cgutils.get_or_insert_function(module, ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16)] * 2),
                                        "llvm.x86.avx2.pmadd.wd")
    ones = _splat(_I16, 16, 1)
    halves = []
    for h in range(2):
        idx = ir.Constant(_vec(_I32, 32), list(range(32 * h, 32 * h + 32)))
        u = b.shuffle_vector(u8, u8, idx)
        s = b.shuffle_vector(s8, s8, idx)
        halves.append(b.call(wd, [b.call(ubsw, [u, s]), ones]))
    both = b.shuffle_vector(halves[0], halves[1], ir.Constant(_vec(_I32, 16), list(range(16))))
    return b.add(acc, both)


def _first_lanes(b, count):
    """A 16-lane mask, true in the first `count` (i64) lanes."""
    zeros = ir.Constant(_vec(_I32, 16), [0] * 16)
    splat = b.shuffle_vector(b.insert_element(zeros, b.trunc(count, _I32), ir.Constant(_I32, 0)), zeros, zeros)
    return b.icmp_unsigned("<", ir.Constant(_vec(_I32, 16), list(range(16))), splat)


I8_TILE = 4
"""Rows of x that nabla_i8_dot_<rows> multiplies with each load of a weight row (prefill, batches)."""


def _i8_function(module, rows: int, compact: bool = False):
    """void nabla_i8_dot_<rows>(i8* w, i8* xu, i64 xstride, float* dxe, i64 dstride, i64 k, float* out):
    the dot products of a row of int8 weights with `rows` rows of x, x quantized to int8 per block of 32
    and stored as x + 128 (u8) so that vpdpbusd takes it: per 4 bytes, sum((x + 128) w) - 128 sum(w)
    = sum(x w), the second sum by vpdpbusd of ones, once per weight load for all rows. dxe holds each x
    block's scale once per 4 bytes (8 per block), or, `compact`, once per block (spread here over its 8
    lanes, a shuffle per load: one float per 4 bytes makes x's side 2x xu's bytes, and 8-16 rows of it
    outgrow the L1 cache). k: the row's
    length, a multiple of 32; a last 32 bytes are read with a masked load. Row r of x starts at
    xu + r * xstride (dxe + r * dstride)."""
    name = f"nabla_i8_dot_{rows}" + ("_compact" if compact else "")
    fn, fresh = _define(module, name, ir.VoidType(), [_PTR[_I8], _PTR[_I8], _I64, _PTR[_F32], _I64, _I64, _PTR[_F32]])
    if not fresh:
        return fn
    w, xu, xstride, dxe, dstride, k, out = fn.args
    entry, loop, tail = (fn.append_basic_block(n) for n in ("entry", "loop", "tail"))
    b = ir.IRBuilder(entry)
    zero = ir.Constant(_vec(_F32, 16), [0.0] * 16)
    groups = b.udiv(k, ir.Constant(_I64, 64))
    b.cbranch(b.icmp_signed(">", groups, ir.Constant(_I64, 0)), loop, tail)
    dp = _vpdpbusd(module)
    ones = ir.Constant(_vec(_I32, 16), [0x01010101] * 16)
    none = ir.Constant(_vec(_I32, 16), [0] * 16)

    def steps(accs, wv, xs, ds):
        wv = b.bitcast(wv, _vec(_I32, 16))
        w128 = b.shl(b.call(dp, [none, ones, wv]), _splat(_I32, 16, 7))  # 128 * sum(w), for every row
        out = []
        for acc, xv, dv in zip(accs, xs, ds):
            exact = b.sub(b.call(dp, [none, b.bitcast(xv, _vec(_I32, 16)), wv]), w128)
            out.append(b.fadd(acc, b.fmul(b.sitofp(exact, _vec(_F32, 16)), dv, flags=("contract",)),
                              flags=("contract",)))  # one fused multiply-add
        return out

    def at(pointer, offset, t, n):
        return b.bitcast(b.gep(pointer, [offset]), _vec(t, n).as_pointer())

    b.position_at_end(loop)
    g = b.phi(_I64)
    accs = [b.phi(_vec(_F32, 16)) for _ in range(rows)]
    g.add_incoming(ir.Constant(_I64, 0), entry)
    for acc in accs:
        acc.add_incoming(zero, entry)
    per_group = 2 if compact else 16  # dxe floats per 64 bytes of x
    off, doff = b.mul(g, ir.Constant(_I64, 64)), b.mul(g, ir.Constant(_I64, per_group))
    xs = [b.load(at(xu, b.add(off, b.mul(xstride, ir.Constant(_I64, r))), _I8, 64), align=1) for r in range(rows)]
    if compact:
        halves = ir.Constant(_vec(_I32, 16), [0] * 8 + [1] * 8)  # each block's scale over its 8 lanes
        ds = [b.shuffle_vector(pair, pair, halves) for pair in
              (b.load(at(dxe, b.add(doff, b.mul(dstride, ir.Constant(_I64, r))), _F32, 2), align=4)
               for r in range(rows))]
    else:
        ds = [b.load(at(dxe, b.add(doff, b.mul(dstride, ir.Constant(_I64, r))), _F32, 16), align=4)
              for r in range(rows)]
    nexts = steps(accs, b.load(at(w, off, _I8, 64), align=1), xs, ds)
    g_next = b.add(g, ir.Constant(_I64, 1))
    g.add_incoming(g_next, loop)
    for acc, nxt in zip(accs, nexts):
        acc.add_incoming(nxt, loop)
    b.cbranch(b.icmp_signed("<", g_next, groups), loop, tail)

    b.position_at_end(tail)  # 32 bytes left, or none
    accs_t = []
    for nxt in nexts:
        phi = b.phi(_vec(_F32, 16))
        phi.add_incoming(zero, entry)
        phi.add_incoming(nxt, loop)
        accs_t.append(phi)
    rest = b.sub(k, b.mul(groups, ir.Constant(_I64, 64)))
    last_block, finish = fn.append_basic_block("last"), fn.append_basic_block("finish")
    b.cbranch(b.icmp_unsigned(">", rest, ir.Constant(_I64, 0)), last_block, finish)
    b.position_at_end(last_block)
    mask = _first_lanes(b, b.udiv(rest, ir.Constant(_I64, 4)))

    def masked(pointer, t, n, align):
        return _masked_load(module, b, pointer, t, n, align, mask)

    base, dbase = b.mul(groups, ir.Constant(_I64, 64)), b.mul(groups, ir.Constant(_I64, per_group))
    xs = [b.bitcast(masked(at(xu, b.add(base, b.mul(xstride, ir.Constant(_I64, r))), _I32, 16), _I32, 16, 1),
                    _vec(_I8, 64)) for r in range(rows)]
    if compact:
        zeros16 = ir.Constant(_vec(_I32, 16), [0] * 16)
        ds = [b.shuffle_vector(one, one, zeros16) for one in  # the last block's scale, in every lane
              (b.load(at(dxe, b.add(dbase, b.mul(dstride, ir.Constant(_I64, r))), _F32, 1), align=4)
               for r in range(rows))]
    else:
        ds = [masked(at(dxe, b.add(dbase, b.mul(dstride, ir.Constant(_I64, r))), _F32, 16), _F32, 16, 4)
              for r in range(rows)]
    with_last = steps(accs_t, b.bitcast(masked(at(w, base, _I32, 16), _I32, 16, 1), _vec(_I8, 64)), xs, ds)
    b.branch(finish)
    b.position_at_end(finish)
    lasts = []
    for acc, more in zip(accs_t, with_last):
        phi = b.phi(_vec(_F32, 16))
        phi.add_incoming(acc, tail)
        phi.add_incoming(more, last_block)
        lasts.append(phi)
    for r, last in enumerate(lasts):
        b.store(_sum_lanes(module, b, last), b.gep(out, [ir.Constant(_I64, r)]))
    b.ret_void()
    return fn


def i8_dot_for(rows: int, compact: bool = False):
    """An @intrinsic (AVX-512 VNNI only): (1-D int8 W, 2-D uint8 XU, 2-D float32 DXE, int first row b,
    int k, 1-D float32 out) -> None; out[r] = the dot of W with x row b + r, r < rows (_i8_function)."""

    @intrinsic
    def i8_dot(typingctx, W, XU, DXE, first, k, out):
        sig = types.void(W, XU, DXE, first, k, out)

        def codegen(context, builder, signature, args):
            fn = _i8_function(builder.module, rows, compact)
            wa, xa, da, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 2, 5))
            first, k = (builder.sext(v, _I64) if v.type != _I64 else v for v in (args[3], args[4]))
            xstride = cgutils.unpack_tuple(builder, xa.strides)[0]  # bytes per row of XU
            dstride = builder.udiv(cgutils.unpack_tuple(builder, da.strides)[0], ir.Constant(_I64, 4))
            xrow = builder.gep(builder.bitcast(xa.data, _I8.as_pointer()), [builder.mul(first, xstride)])
            drow = builder.gep(builder.bitcast(da.data, _F32.as_pointer()), [builder.mul(first, dstride)])
            builder.call(fn, [builder.bitcast(wa.data, _I8.as_pointer()), xrow, xstride, drow, dstride, k,
                              builder.bitcast(oa.data, _F32.as_pointer())])
            return context.get_dummy_value()

        return sig, codegen

    return i8_dot


Q4_TILE = 4
"""Rows of x that nabla_q4_rows_<kind>_<tile> multiplies with each unpacked weight chunk (prefill, batches).
Measured (one Zen 5 core): 8 no faster. What is left is loading x, one 64-byte load per vpdpbusd: with a
load each, vpdpbusd ran at 2.2 G/s against 3.7 G/s from registers. Two or four weight rows per pass share
those loads (10-20% faster with the weights in L2) but lose more when the weights come from L3 or memory
(several streams), so one row it is; fewer other instructions per block (-8 * sum precomputed, one chain)
measured the same."""


def _q4_unpack(b, packed):
    """The four 64-byte groups of a chunk as eight u8 vectors: the low nibbles of each group, then the high."""
    return ([b.and_(g, _splat(_I8, 64, 15)) for g in packed], [b.lshr(g, _splat(_I8, 64, 4)) for g in packed])


def _q4_step(module, b, kind, lows, highs, scale, xl, xh, xs, dx, acc, mins=None):
    """acc + one chunk's 16 block products with one row of x (weights already unpacked; scale: the blocks'
    d as fp32). The low and the high nibbles sum in two chains, so that the instructions overlap.
    `mins` (the blocks' m as fp32; Q4_1's w = d * q + m): dot(q, qx) * d * dx + m * dx * xs instead of
    Q4_0's (dot(q, qx) - 8 * xs) * d * dx."""
    zero = ir.Constant(_vec(_I32, 16), [0] * 16)
    lo_sum, hi_sum = zero, zero
    for low, high, x_low, x_high in zip(lows, highs, xl, xh):
        lo_sum = _dot4(module, b, kind, lo_sum, low, x_low)
        hi_sum = _dot4(module, b, kind, hi_sum, high, x_high)
    if mins is not None:
        dots = b.sitofp(b.add(lo_sum, hi_sum), _vec(_F32, 16))
        acc = b.fadd(acc, b.fmul(dots, b.fmul(scale, dx), flags=("contract",)), flags=("contract",))
        return b.fadd(acc, b.fmul(b.sitofp(xs, _vec(_F32, 16)), b.fmul(mins, dx), flags=("contract",)),
                      flags=("contract",))
    exact = b.sub(b.add(lo_sum, hi_sum), b.shl(xs, _splat(_I32, 16, 3)))  # q - 8 per weight
    return b.fadd(acc, b.fmul(b.sitofp(exact, _vec(_F32, 16)), b.fmul(scale, dx), flags=("contract",)),
                  flags=("contract",))


def _q4_rows_function(module, kind, tile: int, mins: bool = False):
    """void nabla_q4_rows_<kind>_<tile>(i8* p, i64 pstride, i16* s, i64 sstride, i64 rows, i8* xl, i8* xh,
    i64 xstride, float* dx, i32* xs, i64 dstride, float* y, i64 ystride, i64 full, i64 m):
    y[t * ystride + r] = block_dot of weight row r (at p + r * pstride, its scales at s + r * sstride) with x
    row t (xl / xh + t * xstride, dx / xs + t * dstride), for r < rows and t < tile. Each weight chunk is
    loaded and unpacked once for all `tile` rows of x. A row: `full` chunks of 16 blocks, then m < 16 more
    blocks in a short chunk (four groups of 4m bytes, read with masked loads; x's side is zero-padded).

    `mins` (Q4_1's arithmetic, w = d * q + m): nabla_q4m_rows_<kind>_<tile>, with `i16* mn, i64 mstride`
    after sstride: the fp16 bits of each block's m, laid out as the scales."""
    return _q4_rows_body(module, kind, tile, "q4_1" if mins else "q4_0")


def _q4k_rows_function(module, kind, tile: int):
    """void nabla_q4k_rows_<kind>_<tile>(i8* p, i64 pstride, i8* sc, i64 scstride, i8* mn, i64 mnstride,
    i16* dd, i64 ddstride, i64 rows, <x and y as _q4_rows_function>, i64 full, i64 m): llama.cpp's Q4_K,
    w = d * sc * q - dmin * mn (q in 0..15; super-blocks of 8 blocks of 32). Per weight row: sc, mn one u8
    (6-bit) per block, dd per super-block the fp16 bits of d, then dmin. Per block, as llama.cpp:
    scale = d * sc, minimum = dmin * mn in fp32 (both exact), dot(q, qx) * scale * dx - minimum * dx * xs.
    A chunk of 16 blocks is two super-blocks (4 fp16 of dd, each broadcast over its 8 lanes); the rows'
    length is a multiple of 256, so the short last chunk, if any, is one super-block (m = 8)."""
    return _q4_rows_body(module, kind, tile, "q4_k")


def _q4_rows_body(module, kind, tile: int, variant: str):
    """The IR of nabla_q4_rows / nabla_q4m_rows / nabla_q4k_rows (variant "q4_0", "q4_1", "q4_k")."""
    mins = variant == "q4_1"
    kq = variant == "q4_k"
    name = f"nabla_q4{'m' if mins else 'k' if kq else ''}_rows_{kind}_{tile}"
    if kq:
        weight_args = [_PTR[_I8], _I64, _PTR[_I8], _I64, _PTR[_I8], _I64, _PTR[_I16], _I64]
    else:
        weight_args = [_PTR[_I8], _I64, _PTR[_I16], _I64] + ([_PTR[_I16], _I64] if mins else [])
    args = weight_args + [
        _I64, _PTR[_I8], _PTR[_I8], _I64, _PTR[_F32], _PTR[_I32], _I64, _PTR[_F32], _I64, _I64, _I64]
    fn, fresh = _define(module, name, ir.VoidType(), args)
    if not fresh:
        return fn
    if kq:
        (p, pstride, s, sstride, mn, mstride, dd, ddstride, rows, xl, xh, xstride, dx, xs, dstride, y, ystride,
         full, m) = fn.args
    elif mins:
        p, pstride, s, sstride, mn, mstride, rows, xl, xh, xstride, dx, xs, dstride, y, ystride, full, m = fn.args
    else:
        p, pstride, s, sstride, rows, xl, xh, xstride, dx, xs, dstride, y, ystride, full, m = fn.args
    blocks = {n: fn.append_basic_block(n) for n in ("entry", "row", "chunk", "chunks_done", "tail", "store", "exit")}
    b = ir.IRBuilder(blocks["entry"])
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    zero = ir.Constant(_vec(_F32, 16), [0.0] * 16)
    b.cbranch(b.icmp_signed(">", rows, i64(0)), blocks["row"], blocks["exit"])

    def at(pointer, offset, t, n):
        return b.bitcast(b.gep(pointer, [offset]), _vec(t, n).as_pointer())

    def x_side(offset, offset16):
        """Per x row: (xl groups, xh groups, xs, dx) at byte offset / block offset16 of the row."""
        out = []
        for t in range(tile):
            xo, do = b.add(offset, b.mul(xstride, i64(t))), b.add(offset16, b.mul(dstride, i64(t)))
            out.append(([b.load(at(xl, b.add(xo, i64(64 * g)), _I8, 64), align=1) for g in range(4)],
                        [b.load(at(xh, b.add(xo, i64(64 * g)), _I8, 64), align=1) for g in range(4)],
                        b.load(at(xs, do, _I32, 16), align=4), b.load(at(dx, do, _F32, 16), align=4)))
        return out

    def half_to_float(bits):
        return b.fpext(b.bitcast(bits, _vec(ir.HalfType(), 16)), _vec(_F32, 16))

    def k_scales(sc_bytes, mn_bytes, dd_bits):
        """Q4_K: (d * sc, -(dmin * mn)) over 16 blocks from their u8 sc, mn and 4 fp16 (d, dmin of the
        first super-block, then of the second); lanes 0-7 the first super-block, 8-15 the second."""
        halves = b.fpext(b.bitcast(dd_bits, _vec(ir.HalfType(), 4)), _vec(_F32, 4))
        d16 = b.shuffle_vector(halves, halves, ir.Constant(_vec(_I32, 16), [0] * 8 + [2] * 8))
        dmin16 = b.shuffle_vector(halves, halves, ir.Constant(_vec(_I32, 16), [1] * 8 + [3] * 8))
        scf = b.sitofp(b.zext(sc_bytes, _vec(_I32, 16)), _vec(_F32, 16))
        mnf = b.sitofp(b.zext(mn_bytes, _vec(_I32, 16)), _vec(_F32, 16))
        return b.fmul(d16, scf), b.fneg(b.fmul(dmin16, mnf))  # (negated: _q4_step adds mins * dx * xs)

    # one weight row per pass
    b.position_at_end(blocks["row"])
    r = b.phi(_I64)
    r.add_incoming(i64(0), blocks["entry"])
    prow, srow = b.gep(p, [b.mul(r, pstride)]), b.gep(s, [b.mul(r, sstride)])
    mrow = b.gep(mn, [b.mul(r, mstride)]) if mins or kq else None
    ddrow = b.gep(dd, [b.mul(r, ddstride)]) if kq else None
    b.cbranch(b.icmp_signed(">", full, i64(0)), blocks["chunk"], blocks["chunks_done"])

    # its whole chunks
    b.position_at_end(blocks["chunk"])
    c = b.phi(_I64)
    accs = [b.phi(_vec(_F32, 16)) for _ in range(tile)]
    c.add_incoming(i64(0), blocks["row"])
    for acc in accs:
        acc.add_incoming(zero, blocks["row"])
    off, off16 = b.mul(c, i64(256)), b.mul(c, i64(16))
    lows, highs = _q4_unpack(b, [b.load(at(prow, b.add(off, i64(64 * g)), _I8, 64), align=1) for g in range(4)])
    if kq:
        scale, mnv = k_scales(b.load(at(srow, off16, _I8, 16), align=1), b.load(at(mrow, off16, _I8, 16), align=1),
                              b.load(at(ddrow, b.mul(c, i64(4)), _I16, 4), align=2))
    else:
        scale = half_to_float(b.load(at(srow, off16, _I16, 16), align=2))
        mnv = half_to_float(b.load(at(mrow, off16, _I16, 16), align=2)) if mins else None
    nexts = [_q4_step(module, b, kind, lows, highs, scale, *xside, acc, mnv)
             for xside, acc in zip(x_side(off, off16), accs)]
    c_next = b.add(c, i64(1))
    c.add_incoming(c_next, blocks["chunk"])
    for acc, nxt in zip(accs, nexts):
        acc.add_incoming(nxt, blocks["chunk"])
    b.cbranch(b.icmp_signed("<", c_next, full), blocks["chunk"], blocks["chunks_done"])

    b.position_at_end(blocks["chunks_done"])
    done = []
    for nxt in nexts:
        phi = b.phi(_vec(_F32, 16))
        phi.add_incoming(zero, blocks["row"])
        phi.add_incoming(nxt, blocks["chunk"])
        done.append(phi)
    b.cbranch(b.icmp_signed(">", m, i64(0)), blocks["tail"], blocks["store"])

    # the short last chunk
    b.position_at_end(blocks["tail"])
    mask = _first_lanes(b, m)
    base, base16 = b.mul(full, i64(256)), b.mul(full, i64(16))
    group = b.mul(m, i64(4))
    tail_row = b.gep(prow, [base])
    packed = [b.bitcast(_masked_load(module, b, b.gep(tail_row, [b.mul(group, i64(g))]), _I32, 16, 1, mask),
                        _vec(_I8, 64)) for g in range(4)]
    lows, highs = _q4_unpack(b, packed)
    if kq:  # one super-block (m = 8): its d and dmin in both halves, lanes 8-15 zeroed by the masked sc, mn
        pair = b.load(at(ddrow, b.mul(full, i64(4)), _I16, 2), align=2)
        scale, mnv = k_scales(_masked_load(module, b, b.gep(srow, [base16]), _I8, 16, 1, mask),
                              _masked_load(module, b, b.gep(mrow, [base16]), _I8, 16, 1, mask),
                              b.shuffle_vector(pair, pair, ir.Constant(_vec(_I32, 4), [0, 1, 0, 1])))
    else:
        scale = half_to_float(_masked_load(module, b, b.gep(srow, [base16]), _I16, 16, 2, mask))
        mnv = half_to_float(_masked_load(module, b, b.gep(mrow, [base16]), _I16, 16, 2, mask)) if mins else None
    tails = [_q4_step(module, b, kind, lows, highs, scale, *xside, acc, mnv)
             for xside, acc in zip(x_side(base, base16), done)]
    b.branch(blocks["store"])

    b.position_at_end(blocks["store"])
    finals = []
    for acc, with_tail in zip(done, tails):
        phi = b.phi(_vec(_F32, 16))
        phi.add_incoming(acc, blocks["chunks_done"])
        phi.add_incoming(with_tail, blocks["tail"])
        finals.append(phi)
    for t, final in enumerate(finals):
        b.store(_sum_lanes(module, b, final), b.gep(y, [b.add(r, b.mul(ystride, i64(t)))]))
    r_next = b.add(r, i64(1))
    r.add_incoming(r_next, blocks["store"])
    b.cbranch(b.icmp_signed("<", r_next, rows), blocks["row"], blocks["exit"])

    b.position_at_end(blocks["exit"])
    b.ret_void()
    return fn


def _i8_rows_function(module):
    """void nabla_i8_rows(i8* w, i64 wstride, i64 rows, i8* xu, float* dxe, i64 k, float* scale, float* y):
    y[n] = scale[n] * (the dot of w row n, at w + n * wstride, with one row of x), n < rows
    (nabla_i8_dot_1 per row, x's scales once per 4 bytes). One call for a run of rows: with one row of x
    a row of int8 weights is only ~12-90 vector steps, and numba's bookkeeping per row (finding the
    weight, a view, a call, the output through memory) was a large part of the time."""
    fn, fresh = _define(module, "nabla_i8_rows", ir.VoidType(),
                        [_PTR[_I8], _I64, _I64, _PTR[_I8], _PTR[_F32], _I64, _PTR[_F32], _PTR[_F32]])
    if not fresh:
        return fn
    dot = _i8_function(module, 1)
    w, wstride, rows, xu, dxe, k, scale, y = fn.args
    entry, loop, done = fn.append_basic_block("entry"), fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", rows, ir.Constant(_I64, 0)), loop, done)
    b.position_at_end(loop)
    n = b.phi(_I64)
    n.add_incoming(ir.Constant(_I64, 0), entry)
    out = b.gep(y, [n])
    b.call(dot, [b.gep(w, [b.mul(n, wstride)]), xu, ir.Constant(_I64, 0), dxe, ir.Constant(_I64, 0), k, out])
    b.store(b.fmul(b.load(out), b.load(b.gep(scale, [n]))), out)
    n_next = b.add(n, ir.Constant(_I64, 1))
    n.add_incoming(n_next, loop)
    b.cbranch(b.icmp_signed("<", n_next, rows), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


@intrinsic
def i8_rows(typingctx, W, S, first, count, XU, DXE, Y):
    """(2-D int8 W, 1-D float32 S, int first, int count, 2-D uint8 XU, 2-D float32 DXE, 2-D float32 Y) -> None:
    Y[0, n] = S[n] * the dot of W[n] with x row 0 (XU, DXE; scales once per 4 bytes), first <= n < first +
    count (nabla_i8_rows). W's and Y's rows contiguous, S contiguous."""
    sig = types.void(W, S, first, count, XU, DXE, Y)

    def codegen(context, builder, signature, args):
        fn = _i8_rows_function(builder.module)
        wa, sa, xa, da, ya = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 4, 5, 6))
        first, count = (builder.sext(v, _I64) if v.type != _I64 else v for v in (args[2], args[3]))
        wstride = cgutils.unpack_tuple(builder, wa.strides)[0]
        k = cgutils.unpack_tuple(builder, wa.shape)[1]
        wp = builder.gep(builder.bitcast(wa.data, _PTR[_I8]), [builder.mul(first, wstride)])
        sp = builder.gep(builder.bitcast(sa.data, _PTR[_F32]), [first])
        yp = builder.gep(builder.bitcast(ya.data, _PTR[_F32]), [first])
        builder.call(fn, [wp, wstride, count, builder.bitcast(xa.data, _PTR[_I8]), builder.bitcast(da.data, _PTR[_F32]),
                          k, sp, yp])
        return context.get_dummy_value()

    return sig, codegen


def _q8_function(module, compact: bool = False):
    """void nabla_q8_u8(float* x, i64 k, i8* xu, float* dxe): a row of k floats (k a multiple of 32) in
    blocks of 32 as llama.cpp's quantize_row_q8_0: d = max|x| / 127, q = rint(x / d) by x * (1 / d)
    (0 for a zero block), stored as q + 128 (u8, for vpdpbusd); dxe[8j..8j + 7] = block j's d (once
    per 4 bytes, as nabla_i8_dot reads it), or dxe[j] (`compact`). The divisions are IEEE ones, as in C."""
    fn, fresh = _define(module, "nabla_q8_u8" + ("_compact" if compact else ""), ir.VoidType(),
                        [_PTR[_F32], _I64, _PTR[_I8], _PTR[_F32]])
    if not fresh:
        return fn
    x, k, xu, dxe = fn.args
    entry, loop, done = fn.append_basic_block("entry"), fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    blocks = b.udiv(k, ir.Constant(_I64, 32))
    b.cbranch(b.icmp_signed(">", blocks, ir.Constant(_I64, 0)), loop, done)
    b.position_at_end(loop)
    j = b.phi(_I64)
    j.add_incoming(ir.Constant(_I64, 0), entry)
    v16 = _vec(_F32, 16)

    def intrinsic_fn(name, ret, args):
        return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)

    fabs = intrinsic_fn("llvm.fabs.v16f32", v16, [v16])
    fmax = intrinsic_fn("llvm.maxnum.v16f32", v16, [v16, v16])
    rmax = intrinsic_fn("llvm.vector.reduce.fmax.v16f32", _F32, [v16])
    rint = intrinsic_fn("llvm.rint.v16f32", v16, [v16])
    base = b.mul(j, ir.Constant(_I64, 32))
    halves = [b.load(b.bitcast(b.gep(x, [b.add(base, ir.Constant(_I64, 16 * h))]), v16.as_pointer()), align=4)
              for h in range(2)]
    amax = b.call(rmax, [b.call(fmax, [b.call(fabs, [halves[0]]), b.call(fabs, [halves[1]])])])
    d = b.fdiv(amax, ir.Constant(_F32, 127.0))
    inv = b.select(b.fcmp_ordered(">", d, ir.Constant(_F32, 0.0)), b.fdiv(ir.Constant(_F32, 1.0), d),
                   ir.Constant(_F32, 0.0))
    inv16 = b.shuffle_vector(b.insert_element(ir.Constant(v16, [0.0] * 16), inv, ir.Constant(_I32, 0)),
                             ir.Constant(v16, [0.0] * 16), ir.Constant(_vec(_I32, 16), [0] * 16))
    for h, v in enumerate(halves):
        q = b.add(b.fptosi(b.call(rint, [b.fmul(v, inv16)]), _vec(_I32, 16)), _splat(_I32, 16, 128))
        b.store(b.trunc(q, _vec(_I8, 16)), b.bitcast(b.gep(xu, [b.add(base, ir.Constant(_I64, 16 * h))]),
                                                    _vec(_I8, 16).as_pointer()), align=1)
    if compact:
        b.store(d, b.gep(dxe, [j]))
    else:
        d8 = b.shuffle_vector(b.insert_element(ir.Constant(_vec(_F32, 8), [0.0] * 8), d, ir.Constant(_I32, 0)),
                              ir.Constant(_vec(_F32, 8), [0.0] * 8), ir.Constant(_vec(_I32, 8), [0] * 8))
        b.store(d8, b.bitcast(b.gep(dxe, [b.mul(j, ir.Constant(_I64, 8))]), _vec(_F32, 8).as_pointer()), align=4)
    j_next = b.add(j, ir.Constant(_I64, 1))
    j.add_incoming(j_next, loop)
    b.cbranch(b.icmp_signed("<", j_next, blocks), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def q8_u8_row_for(compact: bool = False):
    """An @intrinsic: (2-D float32 X, 2-D uint8 XU, 2-D float32 DXE, int row) -> None: row `row` of X
    quantized into XU, DXE (nabla_q8_u8, `compact` or not); rows contiguous, X's length a multiple of 32."""

    @intrinsic
    def q8_u8_row(typingctx, X, XU, DXE, row):
        sig = types.void(X, XU, DXE, row)

        def codegen(context, builder, signature, args):
            fn = _q8_function(builder.module, compact)
            arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in range(3)]
            row = builder.sext(args[3], _I64) if args[3].type != _I64 else args[3]
            ptrs = []
            for a, t in zip(arrays, (_F32, _I8, _F32)):
                stride = cgutils.unpack_tuple(builder, a.strides)[0]  # bytes
                ptrs.append(builder.bitcast(builder.gep(builder.bitcast(a.data, _PTR[_I8]), [builder.mul(row, stride)]),
                                            t.as_pointer()))
            k = cgutils.unpack_tuple(builder, arrays[0].shape)[1]
            builder.call(fn, [ptrs[0], k, ptrs[1], ptrs[2]])
            return context.get_dummy_value()

        return sig, codegen

    return q8_u8_row


F32_LANES = 16 if _FEATURES.get("avx512f") else 8
"""fp32 lanes per vector in nabla_f32_dot: a zmm register's, else a ymm's (AVX2, or scalarised by LLVM)."""
F32_TILE = (6, 4) if F32_LANES == 16 else (2, 4)
"""(rows of w, rows of x) per nabla_f32_dot call for several rows of x: 24 accumulators of AVX-512's 32
registers (8 of AVX2's 16). Measured, 8 and 16 rows of x at K = 768-5632, one core: (6, 4) 43-78
GFLOP/s, 6-13% over (4, 4); (2, 8), (3, 8), (4, 8) and (1, 16) below (4, 4); one product per (row, x)
~25."""


def _sum_f32(module, b, vec, lanes: int):
    """The sum of a lanes x f32 vector's lanes, in any order."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(_F32, [_F32, _vec(_F32, lanes)]),
                                        f"llvm.vector.reduce.fadd.v{lanes}f32")
    out = b.call(fn, [ir.Constant(_F32, 0.0), vec])
    out.fastmath.add("reassoc")
    return out


def _prefetch(module, b, pointer):
    """Ask for the cache line at `pointer` (i8*) ahead of its use (a hint: never faults)."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), [_PTR[_I8], _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    b.call(fn, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _f32_function(module, wrows: int, xrows: int, ahead: int = 0):
    """void nabla_f32_dot_<wrows>x<xrows>(float* w, i64 wstride, float* x, i64 xstride, i64 k, float* y,
    i64 ystride): y[j * ystride + i] = the dot of w row i (w + i * wstride) with x row j (x + j * xstride),
    i < wrows, j < xrows, rows of k floats; strides in floats. One accumulator vector per (i, j), so a
    load of w serves xrows x rows and a load of x wrows rows of w (register blocking); the last k % lanes
    floats are read with masked loads."""
    lanes = F32_LANES
    name = f"nabla_f32_dot_{wrows}x{xrows}_{lanes}_{ahead}"
    fn, fresh = _define(module, name, ir.VoidType(), [_PTR[_F32], _I64, _PTR[_F32], _I64, _I64, _PTR[_F32], _I64])
    if not fresh:
        return fn
    w, wstride, x, xstride, k, y, ystride = fn.args
    entry, loop, tail = (fn.append_basic_block(n) for n in ("entry", "loop", "tail"))
    b = ir.IRBuilder(entry)
    vt = _vec(_F32, lanes)
    zero = ir.Constant(vt, [0.0] * lanes)
    steps = b.udiv(k, ir.Constant(_I64, lanes))
    wrow = [b.gep(w, [b.mul(wstride, ir.Constant(_I64, i))]) for i in range(wrows)]
    xrow = [b.gep(x, [b.mul(xstride, ir.Constant(_I64, j))]) for j in range(xrows)]
    b.cbranch(b.icmp_signed(">", steps, ir.Constant(_I64, 0)), loop, tail)

    def fma(acc, a, c):
        return b.fadd(acc, b.fmul(a, c, flags=("contract",)), flags=("contract",))

    def update(accs, ws, xs):
        return [[fma(accs[i][j], ws[i], xs[j]) for j in range(xrows)] for i in range(wrows)]

    b.position_at_end(loop)
    g = b.phi(_I64)
    g.add_incoming(ir.Constant(_I64, 0), entry)
    accs = [[b.phi(vt) for _ in range(xrows)] for _ in range(wrows)]
    off = b.mul(g, ir.Constant(_I64, lanes))

    def load(row):
        return b.load(b.bitcast(b.gep(row, [off]), vt.as_pointer()), align=4)

    if ahead:
        for r in wrow:
            _prefetch(module, b, b.gep(b.bitcast(b.gep(r, [off]), _PTR[_I8]), [ir.Constant(_I64, ahead)]))
    nexts = update(accs, [load(r) for r in wrow], [load(r) for r in xrow])
    g_next = b.add(g, ir.Constant(_I64, 1))
    g.add_incoming(g_next, loop)
    for i in range(wrows):
        for j in range(xrows):
            accs[i][j].add_incoming(zero, entry)
            accs[i][j].add_incoming(nexts[i][j], loop)
    b.cbranch(b.icmp_signed("<", g_next, steps), loop, tail)

    b.position_at_end(tail)  # k % lanes floats left, or none
    accs_t = [[b.phi(vt) for _ in range(xrows)] for _ in range(wrows)]
    for i in range(wrows):
        for j in range(xrows):
            accs_t[i][j].add_incoming(zero, entry)
            accs_t[i][j].add_incoming(nexts[i][j], loop)
    base = b.mul(steps, ir.Constant(_I64, lanes))
    rest = b.sub(k, base)
    last_block, finish = fn.append_basic_block("last"), fn.append_basic_block("finish")
    b.cbranch(b.icmp_unsigned(">", rest, ir.Constant(_I64, 0)), last_block, finish)
    b.position_at_end(last_block)
    idx = ir.Constant(_vec(_I64, lanes), list(range(lanes)))
    splat = b.shuffle_vector(b.insert_element(ir.Constant(_vec(_I64, lanes), [0] * lanes), rest,
                                              ir.Constant(_I32, 0)), ir.Constant(_vec(_I64, lanes), [0] * lanes),
                             ir.Constant(_vec(_I32, lanes), [0] * lanes))
    mask = b.icmp_unsigned("<", idx, splat)
    with_last = update(accs_t, *([_masked_load(module, b, b.gep(r, [base]), _F32, lanes, 4, mask) for r in rows]
                                 for rows in (wrow, xrow)))
    b.branch(finish)
    b.position_at_end(finish)
    totals = {}
    for i in range(wrows):
        for j in range(xrows):
            totals[i, j] = phi = b.phi(vt)
            phi.add_incoming(accs_t[i][j], tail)
            phi.add_incoming(with_last[i][j], last_block)
    for (i, j), total in totals.items():
        b.store(_sum_f32(module, b, total, lanes), b.gep(y, [b.add(b.mul(ystride, ir.Constant(_I64, j)),
                                                                   ir.Constant(_I64, i))]))
    b.ret_void()
    return fn


def f32_dot_for(wrows: int, xrows: int, ahead: int = 0):
    """An @intrinsic (any CPU: plain LLVM vectors): (2-D float32 W, int first row n, 2-D float32 X, int
    first row b, 2-D float32 Y) -> None; Y[b + j, n + i] = the dot of W[n + i] with X[b + j], i < wrows,
    j < xrows (_f32_function). Rows must be contiguous (C order); X's rows as long as W's."""

    @intrinsic
    def f32_dot(typingctx, W, n, X, first, Y):
        sig = types.void(W, n, X, first, Y)

        def codegen(context, builder, signature, args):
            fn = _f32_function(builder.module, wrows, xrows, ahead)
            wa, xa, ya = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 4))
            n, first = (builder.sext(v, _I64) if v.type != _I64 else v for v in (args[1], args[3]))
            four = ir.Constant(_I64, 4)
            (ws, _), (xs, _), (ys, _) = (cgutils.unpack_tuple(builder, a.strides) for a in (wa, xa, ya))
            ws, xs, ys = (builder.udiv(v, four) for v in (ws, xs, ys))
            k = cgutils.unpack_tuple(builder, wa.shape)[1]
            wp = builder.gep(builder.bitcast(wa.data, _PTR[_F32]), [builder.mul(n, ws)])
            xp = builder.gep(builder.bitcast(xa.data, _PTR[_F32]), [builder.mul(first, xs)])
            yp = builder.gep(builder.bitcast(ya.data, _PTR[_F32]), [builder.add(builder.mul(first, ys), n)])
            builder.call(fn, [wp, ws, xp, xs, k, yp, ys])
            return context.get_dummy_value()

        return sig, codegen

    return f32_dot


def _rows_of(context, builder, ty, value, t, first):
    """(pointer to row `first` of the array `value` (numba type `ty`), as t*; its row stride in elements
    of t): what the 4-bit kernels' IR functions take for each array."""
    arr = context.make_array(ty)(context, builder, value)
    size = ir.Constant(_I64, 4 if t == _F32 else t.width // 8)
    stride = builder.udiv(cgutils.unpack_tuple(builder, arr.strides)[0], size)
    return builder.gep(builder.bitcast(arr.data, t.as_pointer()), [builder.mul(first, stride)]), stride


def _x_and_y(context, builder, argtys, args, i, b0, n0):
    """The IR functions' x and y arguments (xl, xh, xstride, dx, xs, dstride, y at column n0, ystride)
    from the intrinsic's arguments XL, XH, DX, XS at i..i + 3 and Y at i + 5, from x row b0."""
    (xl, xstride), (xh, _), (dx, dstride), (xs, _), (y, ystride) = (
        _rows_of(context, builder, argtys[j], args[j], t, b0)
        for j, t in ((i, _I8), (i + 1, _I8), (i + 2, _F32), (i + 3, _I32), (i + 5, _F32)))
    return [xl, xh, xstride, dx, xs, dstride, builder.gep(y, [n0]), ystride]


def q4_rows_for(kind: str, tile: int, mins: bool = False):
    """An @intrinsic in one of KINDS' instruction sets: (2-D uint8 P, 2-D uint16 S, int n0, int n1, 2-D int8
    XL, XH, 2-D float32 DX, 2-D int32 XS, int b0, 2-D float32 Y, int full, int m) -> None; Y[b0 + t, n] =
    block_dot of P[n] with x row b0 + t, for n0 <= n < n1 and t < tile (_q4_rows_function). Rows of every
    array contiguous. `mins`: Q4_1's w = d * q + m, one more argument after S, 2-D uint16 M (m's fp16 bits,
    S's shape): (P, S, M, n0, n1, XL, XH, DX, XS, b0, Y, full, m)."""
    if kind not in KINDS:
        raise ValueError(f"this CPU has no {kind} (it has: {', '.join(KINDS) or 'neither'})")

    def codegen(context, builder, signature, args):
        fn = _q4_rows_function(builder.module, kind, tile, mins)
        argtys, args = list(signature.args), list(args)
        if mins:  # M's (type, value) out of the way: the rest as without
            mins_arg = (argtys.pop(2), args.pop(2))
        n0, n1, b0, full, m = (builder.sext(v, _I64) if v.type != _I64 else v
                               for v in (args[2], args[3], args[8], args[10], args[11]))

        def rows_of(ty, value, t):
            return _rows_of(context, builder, ty, value, t, n0)

        weight = [*rows_of(argtys[0], args[0], _I8), *rows_of(argtys[1], args[1], _I16),
                  *(rows_of(*mins_arg, _I16) if mins else ())]
        x_and_y = _x_and_y(context, builder, argtys, args, 4, b0, n0)
        builder.call(fn, [*weight, builder.sub(n1, n0), *x_and_y, full, m])
        return context.get_dummy_value()

    if mins:
        @intrinsic
        def q4m_rows(typingctx, P, S, M, n0, n1, XL, XH, DX, XS, b0, Y, full, m):
            return types.void(P, S, M, n0, n1, XL, XH, DX, XS, b0, Y, full, m), codegen

        return q4m_rows

    @intrinsic
    def q4_rows(typingctx, P, S, n0, n1, XL, XH, DX, XS, b0, Y, full, m):
        return types.void(P, S, n0, n1, XL, XH, DX, XS, b0, Y, full, m), codegen

    return q4_rows


def q4k_rows_for(kind: str, tile: int):
    """An @intrinsic in one of KINDS' instruction sets for llama.cpp's Q4_K (_q4k_rows_function): (2-D uint8 P,
    2-D uint8 SC, MN (N, K/32: each block's 6-bit scale and min), 2-D uint16 DD (N, K/128: per super-block
    of 256 the fp16 bits of d, then dmin), int n0, int n1, 2-D int8 XL, XH, 2-D float32 DX, 2-D int32 XS,
    int b0, 2-D float32 Y, int full, int m) -> None; Y[b0 + t, n] = the product of weight row n with x row
    b0 + t, for n0 <= n < n1 and t < tile. Rows of every array contiguous; K a multiple of 256."""
    if kind not in KINDS:
        raise ValueError(f"this CPU has no {kind} (it has: {', '.join(KINDS) or 'neither'})")

    def codegen(context, builder, signature, args):
        fn = _q4k_rows_function(builder.module, kind, tile)
        argtys = signature.args
        n0, n1, b0, full, m = (builder.sext(v, _I64) if v.type != _I64 else v
                               for v in (args[4], args[5], args[10], args[12], args[13]))

        weight = [v for i, t in ((0, _I8), (1, _I8), (2, _I8), (3, _I16))
                  for v in _rows_of(context, builder, argtys[i], args[i], t, n0)]
        x_and_y = _x_and_y(context, builder, argtys, args, 6, b0, n0)
        builder.call(fn, [*weight, builder.sub(n1, n0), *x_and_y, full, m])
        return context.get_dummy_value()

    @intrinsic
    def q4k_rows(typingctx, P, SC, MN, DD, n0, n1, XL, XH, DX, XS, b0, Y, full, m):
        return types.void(P, SC, MN, DD, n0, n1, XL, XH, DX, XS, b0, Y, full, m), codegen

    return q4k_rows


def _q8_blocks_function(module):
    """void nabla_q8_blocks(float* x, i64 blocks, i8* xl, i8* xh, float* dx, i32* xs): one row of x in blocks
    of 32 as llama.cpp's q8_0 (cpu_kernels_jit._quantize_blocks, whose result this is, in whole vectors)."""
    fn, fresh = _define(module, "nabla_q8_blocks", ir.VoidType(),
                        [_PTR[_F32], _I64, _PTR[_I8], _PTR[_I8], _PTR[_F32], _PTR[_I32]])
    if not fresh:
        return fn
    x, count, xl, xh, dx, xs = fn.args
    entry, loop, done = fn.append_basic_block("entry"), fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    b.cbranch(b.icmp_signed(">", count, i64(0)), loop, done)
    b.position_at_end(loop)
    k = b.phi(_I64)
    k.add_incoming(i64(0), entry)
    f16 = _vec(_F32, 16)

    def call(name, ret, args, fastmath=()):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return b.call(cgutils.get_or_insert_function(module, fnty, name), args, fastmath=fastmath)

    halves = [b.load(b.bitcast(b.gep(x, [b.add(b.mul(k, i64(32)), i64(16 * h))]), f16.as_pointer()), align=4)
              for h in range(2)]
    mags = [call("llvm.fabs.v16f32", f16, [v]) for v in halves]
    amax = call("llvm.vector.reduce.fmax.v16f32", _F32, [call("llvm.maxnum.v16f32", f16, mags, ("nnan",))],
                ("nnan",))  # x holds no NaN (a NaN would make the block's d NaN either way)
    d = b.fdiv(amax, ir.Constant(_F32, 127.0))
    inv = b.select(b.fcmp_ordered(">", d, ir.Constant(_F32, 0.0)), b.fdiv(ir.Constant(_F32, 1.0), d),
                   ir.Constant(_F32, 0.0))
    splat = b.shuffle_vector(b.insert_element(ir.Constant(f16, [0.0] * 16), inv, ir.Constant(_I32, 0)),
                             ir.Constant(f16, [0.0] * 16), ir.Constant(_vec(_I32, 16), [0] * 16))
    qs = [b.fptosi(call("llvm.rint.v16f32", f16, [b.fmul(v, splat)]), _vec(_I32, 16)) for v in halves]
    total = call("llvm.vector.reduce.add.v16i32", _I32, [b.add(qs[0], qs[1])])
    base = b.add(b.mul(b.udiv(k, i64(16)), i64(256)), b.mul(b.urem(k, i64(16)), i64(4)))
    for q, out in zip(qs, (xl, xh)):  # bytes 4t..4t+3 of the block to 64t + 4kk of its chunk
        words = b.bitcast(b.trunc(q, _vec(_I8, 16)), _vec(_I32, 4))
        for t in range(4):
            at = b.bitcast(b.gep(out, [b.add(base, i64(64 * t))]), _PTR[_I32])
            b.store(b.extract_element(words, ir.Constant(_I32, t)), at, align=1)
    b.store(d, b.gep(dx, [k]))
    b.store(total, b.gep(xs, [k]))
    k_next = b.add(k, i64(1))
    k.add_incoming(k_next, loop)
    b.cbranch(b.icmp_signed("<", k_next, count), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


@intrinsic
def q8_blocks(typingctx, X, row, XL, XH, DX, XS):
    """(2-D float32 X, int row, 2-D int8 XL, XH, 2-D float32 DX, 2-D int32 XS) -> None: x row `row` quantized
    as cpu_kernels_jit._quantize_blocks does (X's rows contiguous, K a multiple of 32); any CPU (plain LLVM
    vector operations)."""
    sig = types.void(X, row, XL, XH, DX, XS)

    def codegen(context, builder, signature, args):
        fn = _q8_blocks_function(builder.module)
        row = builder.sext(args[1], _I64) if args[1].type != _I64 else args[1]
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4, 5)]

        def row_of(arr, t):
            stride = cgutils.unpack_tuple(builder, arr.strides)[0]  # bytes
            return builder.bitcast(builder.gep(builder.bitcast(arr.data, _PTR[_I8]), [builder.mul(row, stride)]),
                                   t.as_pointer())

        K = cgutils.unpack_tuple(builder, arrays[0].shape)[1]
        x, xl, xh, dx, xs = (row_of(a, t) for a, t in zip(arrays, (_F32, _I8, _I8, _F32, _I32)))
        builder.call(fn, [x, builder.udiv(K, ir.Constant(_I64, 32)), xl, xh, dx, xs])
        return context.get_dummy_value()

    return sig, codegen
