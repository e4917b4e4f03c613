"""Triton kernels of the block quantisers: FP8 e4m3 and FP4 e2m1 with power-of-two (ue8m0) scales.

Layout: the input is read as a 2-D array [rows, N] with a unit-stride last dim (row_stride may exceed N: a slice
such as kv[..., :448]); the flat list of blocks (block b = row b // (N/BLOCK), columns (b % (N/BLOCK))*BLOCK...)
is cut into tiles of ROWS consecutive blocks, one tile per program. A tile is ROWS x BLOCK contiguous-ish
elements, so loads are long unit-stride runs (vectorised), the per-block amax is a row reduction in registers,
and the outputs (q / packed codes / round-tripped values, and one fp32 scale per block) are written contiguously.
One read, one write: these are bandwidth-bound streams.

Numerics are those of reference/quant.py, bit for bit:
  amax = max(|x_blk|, floor); r = amax * fp32(1/qmax); s = 2^ceil(log2 r) read off r's exponent bits (add 1
  when the mantissa is non-zero), or s = r when scale_fmt is None; y = clamp(x / s, -qmax, qmax) where x / s is
  x * 2^-k (exact; the division by a power of two) or a correctly rounded division (div_rn) for plain scales.
  FP8: y rounded to e4m3 with round-to-nearest-even. FP4: y rounded to e2m1 with round-to-nearest-even, code
  sign = y's sign bit (so -0 and small negatives give code 8), element 2i in the low nibble.
Rounding is done in fp32 arithmetic (tl_helpers.round_fp8_rne, fp4_round below): exact, and the same on the GPU
and in the interpreter, whose own fp32 -> fp8 cast rounds ties away from zero and flushes some subnormals. The
quant_fp8 output on a GPU uses the hardware cast (cvt.rn.satfinite, RNE) directly; under the interpreter the
value is pre-rounded so its cast is exact.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out, round_fp8_rne

FP8_INV_MAX = tl.constexpr(1.0 / 448.0)       # rounded to fp32 where it multiplies, as torch does
FP8_AMAX_FLOOR = tl.constexpr(1e-4)
FP4_INV_MAX = tl.constexpr(1.0 / 6.0)
FP4_AMAX_FLOOR = tl.constexpr(6.0 * 2.0 ** -126)


@triton.jit
def pow2_scale(amax, INV_QMAX: tl.constexpr, FLOOR: tl.constexpr, UE8M0: tl.constexpr):
    """Per-block scale and its exact reciprocal (ue8m0: 2^k and 2^-k from the exponent bits; plain: r and 0)."""
    r = tl.maximum(amax, FLOOR) * INV_QMAX
    if UE8M0:
        rb = r.to(tl.int32, bitcast=True)
        e = ((rb >> 23) & 0xFF) + ((rb & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)
    else:
        s = r
        inv = r * 0.0
    return s, inv


@triton.jit
def apply_scale(x, s, inv, UE8M0: tl.constexpr):
    """x / s per row of a [R, BLOCK] tile: a multiply by the exact 2^-k, or a correctly rounded division."""
    if UE8M0:
        return x * inv[:, None]
    else:
        return tl.math.div_rn(x, s[:, None])


@triton.jit
def fp8_block_roundtrip(x, UE8M0: tl.constexpr):
    """[R, BLOCK] fp32 -> (values on the e4m3 grid times their block scale, fp32; the scales [R])."""
    s, inv = pow2_scale(tl.max(tl.abs(x), axis=1), FP8_INV_MAX, FP8_AMAX_FLOOR, UE8M0)
    y = tl.minimum(tl.maximum(apply_scale(x, s, inv, UE8M0), -448.0), 448.0)
    return round_fp8_rne(y) * s[:, None], s


@triton.jit
def fp4_round(y):
    """fp32 y in [-6, 6] -> (|y| rounded to e2m1 with round-to-nearest-even as fp32, the 4-bit code as int32).

    The e2m1 step is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]: adding and subtracting 2^(q+23), q the step's
    exponent, rounds |y| to a multiple of the step with the fp32 adder's RNE (ties to the even multiple, which
    is the even e2m1 code). The code is rebuilt from the rounded value's exponent and first mantissa bit."""
    yb = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    magic = ((tl.maximum(e, 127) - 1 + 23) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    rb = r.to(tl.int32, bitcast=True)
    mag = tl.where(r < 1.0, (r * 2.0).to(tl.int32), (((rb >> 23) & 0xFF) - 126) * 2 + ((rb >> 22) & 1))
    code = mag | (((yb >> 31) & 1) << 3)
    return r, code


@triton.jit
def fp4_block_roundtrip(x):
    """[R, BLOCK] fp32 -> (signed e2m1 values times their block scale, fp32; the scales [R]; codes int32)."""
    s, inv = pow2_scale(tl.max(tl.abs(x), axis=1), FP4_INV_MAX, FP4_AMAX_FLOOR, True)
    y = tl.minimum(tl.maximum(x * inv[:, None], -6.0), 6.0)
    r, code = fp4_round(y)
    signed = (r.to(tl.int32, bitcast=True) | ((code >> 3) << 31)).to(tl.float32, bitcast=True)
    return signed * s[:, None], s, code


@triton.jit
def _tile(pid, n_blocks, blocks_per_row, row_stride, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
          ROWS: tl.constexpr):
    """Block ids, column ids, mask and source offsets of this program's tile of ROWS blocks."""
    blk = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_P)
    mask = (blk < n_blocks)[:, None] & (col < BLOCK)[None, :]
    src = (blk // blocks_per_row) * row_stride + (blk % blocks_per_row) * BLOCK
    return blk, col, mask, src[:, None] + col[None, :]


@triton.jit
def quant_fp8_kernel(x_ptr, out_ptr, s_ptr, n_blocks, blocks_per_row, row_stride,
                     BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr, UE8M0: tl.constexpr,
                     ROUNDTRIP: tl.constexpr, OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """quant_fp8 (out = e4m3 codes, s_ptr = fp32 scales) or fp8_roundtrip (out = dequantised values in OUT_DT,
    no scales written) of ROWS blocks."""
    blk, col, mask, src = _tile(tl.program_id(0), n_blocks, blocks_per_row, row_stride, BLOCK, BLOCK_P, ROWS)
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    dst = blk[:, None] * BLOCK + col[None, :]
    if ROUNDTRIP:
        v, s = fp8_block_roundtrip(x, UE8M0)
        tl.store(out_ptr + dst, cast_out(v, OUT_DT, INTERPRET), mask=mask)
    else:
        s, inv = pow2_scale(tl.max(tl.abs(x), axis=1), FP8_INV_MAX, FP8_AMAX_FLOOR, UE8M0)
        y = tl.minimum(tl.maximum(apply_scale(x, s, inv, UE8M0), -448.0), 448.0)
        if INTERPRET:
            y = round_fp8_rne(y)  # the interpreter's cast is not RNE; on-grid values cast exactly
        tl.store(out_ptr + dst, y.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + blk, s, mask=blk < n_blocks)


@triton.jit
def quant_fp4_kernel(x_ptr, out_ptr, s_ptr, n_blocks, blocks_per_row, row_stride,
                     BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
                     ROUNDTRIP: tl.constexpr, OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """quant_fp4 (out = packed codes, two per byte, s_ptr = fp32 scales) or fp4_roundtrip (out = dequantised
    values in OUT_DT) of ROWS blocks. BLOCK is even, so a byte never straddles two blocks."""
    blk, col, mask, src = _tile(tl.program_id(0), n_blocks, blocks_per_row, row_stride, BLOCK, BLOCK_P, ROWS)
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    v, s, code = fp4_block_roundtrip(x)
    if ROUNDTRIP:
        tl.store(out_ptr + blk[:, None] * BLOCK + col[None, :], cast_out(v, OUT_DT, INTERPRET), mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(code, (ROWS, BLOCK_P // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        pcol = tl.arange(0, BLOCK_P // 2)
        pmask = (blk < n_blocks)[:, None] & (pcol < BLOCK // 2)[None, :]
        tl.store(out_ptr + blk[:, None] * (BLOCK // 2) + pcol[None, :], byte, mask=pmask)
        tl.store(s_ptr + blk, s, mask=blk < n_blocks)
