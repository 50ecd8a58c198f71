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


def _i8_function(module, rows: int):
    """void nabla_i8_dot_<rows>(i8* w, i8* xu, i64 xstride, float* dxe, i64 dstride, i64 k, float* out):
    the dot products of a row of int8 weights with `rows` rows of x, x quantized to int8 per block of 32
    and stored as x + 128 (u8) so that vpdpbusd takes it: per 4 bytes, sum((x + 128) w) - 128 sum(w)
    = sum(x w), the second sum by vpdpbusd of ones, once per weight load for all rows. dxe holds each x
    block's scale once per 4 bytes (8 per block). k: the row's length, a multiple of 32; a last 32
    bytes are read with a masked load. Row r of x starts at xu + r * xstride (dxe + r * dstride)."""
    name = f"nabla_i8_dot_{rows}"
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
    off, doff = b.mul(g, ir.Constant(_I64, 64)), b.mul(g, ir.Constant(_I64, 16))
    xs = [b.load(at(xu, b.add(off, b.mul(xstride, ir.Constant(_I64, r))), _I8, 64), align=1) for r in range(rows)]
    ds = [b.load(at(dxe, b.add(doff, b.mul(dstride, ir.Constant(_I64, r))), _F32, 16), align=4) for r in range(rows)]
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

    base, dbase = b.mul(groups, ir.Constant(_I64, 64)), b.mul(groups, ir.Constant(_I64, 16))
    xs = [b.bitcast(masked(at(xu, b.add(base, b.mul(xstride, ir.Constant(_I64, r))), _I32, 16), _I32, 16, 1),
                    _vec(_I8, 64)) for r in range(rows)]
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


def i8_dot_for(rows: int):
    """An @intrinsic (AVX-512 VNNI only): (1-D int8 W, 2-D uint8 XU, 2-D float32 DXE, int first row b,
    int k, 1-D float32 out) -> None; out[r] = the dot of W with x row b + r, r < rows (_i8_function)."""

    @intrinsic
    def i8_dot(typingctx, W, XU, DXE, first, k, out):
        sig = types.void(W, XU, DXE, first, k, out)

        def codegen(context, builder, signature, args):
            fn = _i8_function(builder.module, rows)
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


def _q4_step(module, b, kind, lows, highs, scale, xl, xh, xs, dx, acc):
    """acc + one chunk's 16 block products with one row of x (weights already unpacked; scale: the blocks'
    d as fp32). The low and the high nibbles sum in two chains, so that the instructions overlap."""
    zero = ir.Constant(_vec(_I32, 16), [0] * 16)
    lo_sum, hi_sum = zero, zero
    for low, high, x_low, x_high in zip(lows, highs, xl, xh):
        lo_sum = _dot4(module, b, kind, lo_sum, low, x_low)
        hi_sum = _dot4(module, b, kind, hi_sum, high, x_high)
    exact = b.sub(b.add(lo_sum, hi_sum), b.shl(xs, _splat(_I32, 16, 3)))  # q - 8 per weight
    return b.fadd(acc, b.fmul(b.sitofp(exact, _vec(_F32, 16)), b.fmul(scale, dx), flags=("contract",)),
                  flags=("contract",))


def _q4_rows_function(module, kind, tile: int):
    """void nabla_q4_rows_<kind>_<tile>(i8* p, i64 pstride, i16* s, i64 sstride, i64 rows, i8* xl, i8* xh,
    i64 xstride, float* dx, i32* xs, i64 dstride, float* y, i64 ystride, i64 full, i64 m):
    y[t * ystride + r] = block_dot of weight row r (at p + r * pstride, its scales at s + r * sstride) with x
    row t (xl / xh + t * xstride, dx / xs + t * dstride), for r < rows and t < tile. Each weight chunk is
    loaded and unpacked once for all `tile` rows of x. A row: `full` chunks of 16 blocks, then m < 16 more
    blocks in a short chunk (four groups of 4m bytes, read with masked loads; x's side is zero-padded)."""
    name = f"nabla_q4_rows_{kind}_{tile}"
    fn, fresh = _define(module, name, ir.VoidType(),
                        [_PTR[_I8], _I64, _PTR[_I16], _I64, _I64, _PTR[_I8], _PTR[_I8], _I64, _PTR[_F32], _PTR[_I32],
                         _I64, _PTR[_F32], _I64, _I64, _I64])
    if not fresh:
        return fn
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

    # one weight row per pass
    b.position_at_end(blocks["row"])
    r = b.phi(_I64)
    r.add_incoming(i64(0), blocks["entry"])
    prow, srow = b.gep(p, [b.mul(r, pstride)]), b.gep(s, [b.mul(r, sstride)])
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
    scale = half_to_float(b.load(at(srow, off16, _I16, 16), align=2))
    nexts = [_q4_step(module, b, kind, lows, highs, scale, *xside, acc)
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
    scale = half_to_float(_masked_load(module, b, b.gep(srow, [base16]), _I16, 16, 2, mask))
    tails = [_q4_step(module, b, kind, lows, highs, scale, *xside, acc)
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


def q4_rows_for(kind: str, tile: int):
    """An @intrinsic in one of KINDS' instruction sets: (2-D uint8 P, 2-D uint16 S, int n0, int n1, 2-D int8
    XL, XH, 2-D float32 DX, 2-D int32 XS, int b0, 2-D float32 Y, int full, int m) -> None; Y[b0 + t, n] =
    block_dot of P[n] with x row b0 + t, for n0 <= n < n1 and t < tile (_q4_rows_function). Rows of every
    array contiguous."""
    if kind not in KINDS:
        raise ValueError(f"this CPU has no {kind} (it has: {', '.join(KINDS) or 'neither'})")

    @intrinsic
    def q4_rows(typingctx, P, S, n0, n1, XL, XH, DX, XS, b0, Y, full, m):
        sig = types.void(P, S, n0, n1, XL, XH, DX, XS, b0, Y, full, m)

        def codegen(context, builder, signature, args):
            fn = _q4_rows_function(builder.module, kind, tile)
            n0, n1, b0, full, m = (builder.sext(v, _I64) if v.type != _I64 else v
                                   for v in (args[2], args[3], args[8], args[10], args[11]))

            def rows_of(i, t, first):
                """(pointer to row `first` of array argument i, as t*; its row stride in elements of t)."""
                arr = context.make_array(signature.args[i])(context, builder, args[i])
                size = ir.Constant(_I64, 4 if t == _F32 else t.width // 8)
                stride = builder.udiv(cgutils.unpack_tuple(builder, arr.strides)[0], size)
                return builder.gep(builder.bitcast(arr.data, t.as_pointer()), [builder.mul(first, stride)]), stride

            p, pstride = rows_of(0, _I8, n0)
            s, sstride = rows_of(1, _I16, n0)
            xl, xstride = rows_of(4, _I8, b0)
            xh, _ = rows_of(5, _I8, b0)
            dx, dstride = rows_of(6, _F32, b0)
            xs, _ = rows_of(7, _I32, b0)
            y, ystride = rows_of(9, _F32, b0)
            y = builder.gep(y, [n0])
            builder.call(fn, [p, pstride, s, sstride, builder.sub(n1, n0), xl, xh, xstride, dx, xs, dstride, y,
                              ystride, full, m])
            return context.get_dummy_value()

        return sig, codegen

    return q4_rows


def _q8_function(module):
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
        fn = _q8_function(builder.module)
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
