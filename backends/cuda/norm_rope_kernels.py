"""Triton kernels of RMSNorm and interleaved partial RoPE (DESIGN.md 2.2). fp32 math, output in x's dtype.

rms_norm_kernel: one program normalises BLOCK_R rows held whole in registers ([BLOCK_R, BLOCK_D] tile, the row
padded to a power of two): one read and one write of each row, the row sum a register reduction. Several short
rows share a program (the per-head query norm has 512-wide rows) so every program moves ~4K elements.

rope_kernel: one program per (token, block of heads). The token's cos/sin row is loaded once and reused by all
its heads; the pass-through dims are copied unchanged (the op returns a new tensor) and the rope dims are read
as [heads, pairs, 2] so each pair arrives in one vector load and splits into its real and imaginary part.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, row_stride, D, D_F, eps,
                    HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """y = w * (x * rsqrt(mean(x^2) + eps)) for BLOCK_R rows; y is contiguous [n_rows, D]. D_F = float(D): the
    mean is a correctly rounded division like torch's, and rsqrt = 1 / sqrt_rn (the GPU's rsqrt.approx is not)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(x * x, axis=1), D_F)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = w[None, :] * y
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], cast_out(y, OUT_DT, INTERPRET), mask=mask)


@triton.jit
def rope_rotate(a, b, c, s, INVERSE: tl.constexpr):
    """(a + ib) * (c + is), or times the conjugate (c - is) for the inverse rotation."""
    if INVERSE:
        s = -s
    return a * c - b * s, a * s + b * c


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, S, H, D, NOPE, HALF,
                sx_b, sx_s, sx_h, sc_b, sc_s, ss_b, ss_s,
                INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """Rotate pairs (NOPE + 2p, NOPE + 2p + 1), p < HALF, of BLOCK_H heads of token (b, s) by angle p's cos/sin;
    copy dims [0, NOPE). y is contiguous [B, S, H, D]."""
    tok = tl.program_id(0)
    b = tok // S
    s = tok % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    x_row = x_ptr + b.to(tl.int64) * sx_b + s.to(tl.int64) * sx_s + heads.to(tl.int64) * sx_h   # [BLOCK_H]
    y_row = y_ptr + (tok.to(tl.int64) * H + heads) * D
    if BLOCK_C > 0:
        for c0 in range(0, NOPE, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = hmask[:, None] & (c < NOPE)[None, :]
            tl.store(y_row[:, None] + c[None, :], tl.load(x_row[:, None] + c[None, :], mask=m), mask=m)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    c = tl.load(cos_ptr + b.to(tl.int64) * sc_b + s.to(tl.int64) * sc_s + p, mask=pmask, other=1.0)
    sn = tl.load(sin_ptr + b.to(tl.int64) * ss_b + s.to(tl.int64) * ss_s + p, mask=pmask, other=0.0)
    off = NOPE + 2 * p[None, :, None] + tl.arange(0, 2)[None, None, :]                              # [1, P, 2]
    m = hmask[:, None, None] & pmask[None, :, None]
    xa, xb = tl.split(tl.load(x_row[:, None, None] + off, mask=m, other=0.0).to(tl.float32))
    ya, yb = rope_rotate(xa, xb, c[None, :], sn[None, :], INVERSE)
    tl.store(y_row[:, None, None] + off, cast_out(tl.join(ya, yb), OUT_DT, INTERPRET), mask=m)
