"""Triton helpers shared by the kernels (gemm, attention, indexer, moe, quantisers, compressor, Hadamard). Needs
triton: the provider modules import the kernel modules lazily, so the CUDA backend still loads (and reports why)
without triton.

Interpreter shims (TRITON_INTERPRET=1, triton 3.9 / numpy): the interpreter converts fp32 -> bf16 by
truncation and fp32 -> float8e4nv with ties rounded away, where the GPU's cvt.rn instructions round to nearest
even. Kernels therefore take an INTERPRET constexpr; when it is set, values are rounded to the target grid
explicitly (round-to-nearest-even in fp32 arithmetic) before the cast, which makes the cast exact. On a GPU the
plain cast is used. Dot operands are upcast to fp32 under the interpreter too (its bf16 tl.dot multiplies bit
patterns; fp32 tl.dot is exact fp32 there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def tl_dtype(dtype: torch.dtype):
    return TORCH_TO_TL[dtype]


def dot_precision(dot_dtype) -> str:
    """fp32 operands must not silently become TF32 on a GPU: use exact fp32 ("ieee") products."""
    return "ieee" if dot_dtype == tl.float32 else "tf32"


@triton.jit
def round_bf16_rne(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32 (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_fp8_rne(v):
    """fp32 values with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), still as fp32.

    Adding and subtracting 2^(q+23), q the exponent of the e4m3 quantum at |v| (3 mantissa bits; the
    subnormal quantum 2^-9 below 2^-6), rounds |v| to a multiple of 2^q with the fp32 adder's RNE."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    qe = tl.maximum(e, 127 - 6) - 3
    magic = ((qe + 23) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def cast_out(x, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> DT with round-to-nearest-even on every path (see module doc)."""
    if INTERPRET:
        if DT == tl.bfloat16:
            x = round_bf16_rne(x)
    return x.to(DT)


@triton.jit
def round_to(x, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> fp32 rounded to DT's grid (the reference's `.to(act_dtype)` followed by `.float()`)."""
    return cast_out(x, DT, INTERPRET).to(tl.float32)


@triton.jit
def hadamard_butterfly(v, R: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr):
    """Sylvester Hadamard transform (unscaled) of each row of v [R, D] (D = 2^LOG2_D): stage h = 1, 2, 4, ...
    pairs elements i and i + h (bit h of i clear) into (a + b, a - b), the order of reference.hadamard, so the
    fp32 sums are the reference's, bit for bit. The Hadamard kernel's fp32 rows and the compressor's indexer
    keys (one row, R = 1) both use it."""
    for i in tl.static_range(LOG2_D):          # h = 2^i
        v4 = tl.permute(tl.reshape(v, (R, D >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))   # [R, D/2h, h, 2]
        a, b = tl.split(v4)
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, D))
    return v


@triton.jit
def quant_fp8_block(x, UE8M0: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantise fp32 rows [R, 128] exactly as reference.quant_fp8 (one block per row).

    amax = max(|x|, 1e-4); r = amax * fp32(1/448); s = 2^ceil(log2 r) from the exponent bits (UE8M0) or r;
    q = e4m3(clamp(x / s, -448, 448)). Returns (q float8e4nv [R, 128], s fp32 [R])."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    r = amax * (1.0 / 448.0)
    if UE8M0:
        rb = r.to(tl.int32, bitcast=True)
        e = ((rb >> 23) & 0xFF) + ((rb & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)   # exact 1/s: dividing by a power of two
        y = x * inv[:, None]
    else:
        s = r
        y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if INTERPRET:
        y = round_fp8_rne(y)
    return y.to(tl.float8e4nv), s


@triton.jit
def fp4_to_f32(code):
    """e2m1 codes (int32 0..15; bit 3 = sign) -> fp32 values {0, .5, 1, 1.5, 2, 3, 4, 6} (built from bits)."""
    mag = code & 7
    e = mag >> 1
    m = mag & 1
    bits = tl.where(e > 0, ((e + 126) << 23) | (m << 22), m * (126 << 23))
    bits = bits | ((code >> 3) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp4_tile(packed, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantised FP4 weight tile [BLOCK_N, BLOCK_K] fp32 from its packed bytes (int32 [BLOCK_N, BLOCK_K/2],
    element 2i in the low nibble) and its per-32 scales (fp32 [BLOCK_N, BLOCK_K/32]); each scale is loaded once
    and broadcast over its 32 values."""
    codes = tl.interleave(packed & 0xF, (packed >> 4) & 0xF)                        # [BLOCK_N, BLOCK_K]
    v = tl.reshape(fp4_to_f32(codes), (BLOCK_N, BLOCK_K // 32, 32)) * scales[:, :, None]
    return tl.reshape(v, (BLOCK_N, BLOCK_K))


@triton.jit
def load_scale(ptrs, mask, E8M0: tl.constexpr):
    """Weight scales: fp32 as stored, or e8m0 exponent bytes (uint8) -> 2^(b-127) (byte 0 -> 2^-127)."""
    if E8M0:
        b = tl.load(ptrs, mask=mask, other=127).to(tl.int32)
        return tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))
    else:
        return tl.load(ptrs, mask=mask, other=0.0)
