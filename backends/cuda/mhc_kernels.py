"""Triton kernels of the mHC ops (DESIGN.md 2.5): hc_pre, hc_head (two kernels) and hc_post (one).

hc_mix_kernel (hc_pre / hc_head, step 1): the mixing GEMM `flat(h) [T, N*D] @ fn^T [N*D, M]` (M = 24 rows for
hc_pre, 4 for hc_head, padded to N_PAD columns for tl.dot) together with the per-token sum of squares of
flat(h). h is streamed once in [BLOCK_T, BLOCK_K] tiles; fn (1.5 MB at V4 sizes) is shared by every program and
stays in L2. Decode has too few tokens to fill the GPU, so the K range is split over programs (grid axis 1,
at most MAX_SPLIT) and each split writes fp32 partials; the finishing kernel adds them (a fixed-order tree
reduction over one [tokens, splits, columns] tile: deterministic, and no chain of dependent loads).

hc_finish_kernel (step 2): per block of BLOCK_T tokens, the partials are summed, the RMS fold applied
(mixes * rsqrt(mean(flat^2) + eps)), then pre = sigmoid(.) + eps and, for hc_pre, post = 2 sigmoid(.) and
comb = the Sinkhorn-normalised 4x4 (softmax + eps, column normalise, then iters-1 row/column rounds), all in fp32
on [BLOCK_T, 4] and [BLOCK_T, 4, 4] register tiles. Then y = sum_j pre_j h_j over a chunk of D. Grid axis 1
cuts D into chunks so that decode still spreads its h read over several programs; every chunk program
recomputes the (tiny) Sinkhorn and only chunk 0 stores post and comb. h is read a second time here: it cannot
be held on chip between the GEMM and the weighted sum (32 KB per token at V4-Flash).

hc_post_kernel: out[t, k, :] = post[t, k] * o[t, :] + sum_j comb[t, j, k] * h[t, j, :] (comb TRANSPOSED: the
sum runs over its first index) for a [BLOCK_T tokens, N streams, BLOCK_D] tile: one read of o and h, one write.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out


@triton.jit
def hc_mix_kernel(h_ptr, fn_ptr, part_ptr, sq_ptr, T, K, k_per_split, M,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, N_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """part[split, t, :N_PAD] = h[t, k-range] @ fn[:, k-range]^T; sq[split, t] = sum h[t, k-range]^2.
    fn is fp32, so the product runs on fp32 operands: "tf32x3" on a GPU (about fp32 accurate on the tensor
    cores: the 6.4 GFLOP of an 8K-token prefill would be compute-bound on the fp32 units), "ieee" when
    interpreted."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, N_PAD)
    tmask = t < T
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    h_rows = h_ptr + t.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_T, N_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_hi
        x = tl.load(h_rows + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + n[None, :].to(tl.int64) * K + k[:, None], mask=(n < M)[None, :] & kmask[:, None],
                    other=0.0)
        sq += tl.sum(x * x, axis=1)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    out = (split * T + t).to(tl.int64)
    tl.store(part_ptr + out[:, None] * N_PAD + n[None, :], acc, mask=tmask[:, None])
    tl.store(sq_ptr + out, sq, mask=tmask)


@triton.jit
def _sum_splits(part_ptr, t64, tmask, first, T, n_split, WIDTH: tl.constexpr, N_PAD: tl.constexpr,
                SPLIT_P: tl.constexpr):
    """[BLOCK_T, WIDTH]: sum over splits s of part[s, t, first : first + WIDTH], loaded as one
    [BLOCK_T, SPLIT_P, WIDTH] tile (no loop of dependent loads: decode has up to MAX_SPLIT partials)."""
    sp = tl.arange(0, SPLIT_P)
    c = tl.arange(0, WIDTH)
    offs = (sp[None, :, None] * T + t64[:, None, None]) * N_PAD + first + c[None, None, :]
    mask = tmask[:, None, None] & (sp < n_split)[None, :, None]
    return tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=1)


@triton.jit
def hc_finish_kernel(h_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                     T, D, n_split, d_per_prog, K_F, norm_eps, hc_eps, iters,
                     N: tl.constexpr, N_PAD: tl.constexpr, SPLIT_P: tl.constexpr, HEAD: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """Mixes -> pre (and post, Sinkhorn comb unless HEAD) for BLOCK_T tokens, then y = sum_j pre_j h_j over this
    program's D chunk. K_F = float(N * D): the mean's divisor."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    j = tl.arange(0, N)
    t64 = t.to(tl.int64)
    sp = tl.arange(0, SPLIT_P)
    sq = tl.sum(tl.load(sq_ptr + sp[None, :] * T + t64[:, None], mask=tmask[:, None] & (sp < n_split)[None, :],
                        other=0.0), axis=1)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sq, K_F) + norm_eps))            # [BLOCK_T]
    m2 = tmask[:, None]
    pre_m = _sum_splits(part_ptr, t64, tmask, 0, T, n_split, N, N_PAD, SPLIT_P) * rstd[:, None]
    pre = tl.sigmoid(pre_m * tl.load(scale_ptr) + tl.load(base_ptr + j)[None, :]) + hc_eps    # [BLOCK_T, N]

    if not HEAD:
        if tl.program_id(1) == 0:
            post_m = _sum_splits(part_ptr, t64, tmask, N, T, n_split, N, N_PAD, SPLIT_P) * rstd[:, None]
            post = 2.0 * tl.sigmoid(post_m * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + j)[None, :])
            tl.store(post_ptr + t64[:, None] * N + j[None, :], post, mask=m2)
            jk = j[:, None] * N + j[None, :]                                                 # [N, N]
            m3 = tmask[:, None, None]
            z = tl.reshape(_sum_splits(part_ptr, t64, tmask, 2 * N, T, n_split, N * N, N_PAD, SPLIT_P),
                           (BLOCK_T, N, N))
            z = z * rstd[:, None, None] * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N + jk)[None, :, :]
            e = tl.exp(z - tl.max(z, axis=2)[:, :, None])
            comb = tl.math.div_rn(e, tl.sum(e, axis=2)[:, :, None]) + hc_eps               # softmax + eps
            comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)         # column sums
            for _ in range(iters - 1):
                comb = tl.math.div_rn(comb, tl.sum(comb, axis=2)[:, :, None] + hc_eps)     # row sums
                comb = tl.math.div_rn(comb, tl.sum(comb, axis=1)[:, None, :] + hc_eps)     # column sums
            tl.store(comb_ptr + t64[:, None, None] * (N * N) + jk[None, :, :], comb, mask=m3)

    d_lo = tl.program_id(1) * d_per_prog
    d_hi = tl.minimum(D, d_lo + d_per_prog)
    h_rows = h_ptr + t64[:, None, None] * (N * D) + j[None, :, None] * D                   # [BLOCK_T, N, 1]
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < d_hi
        hv = tl.load(h_rows + d[None, None, :], mask=tmask[:, None, None] & dmask[None, None, :],
                     other=0.0).to(tl.float32)
        y = tl.sum(pre[:, :, None] * hv, axis=1)                                            # [BLOCK_T, BLOCK_D]
        tl.store(y_ptr + t64[:, None] * D + d[None, :], cast_out(y, OUT_DT, INTERPRET),
                 mask=tmask[:, None] & dmask[None, :])


@triton.jit
def hc_post_kernel(o_ptr, h_ptr, post_ptr, comb_ptr, out_ptr, T, D,
                   N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """out[t, k, d] = post[t, k] o[t, d] + sum_j comb[t, j, k] h[t, j, d] on a [BLOCK_T, N, BLOCK_D] tile."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, N)
    tmask = t < T
    m2 = tmask[:, None] & (d < D)[None, :]
    m3 = tmask[:, None, None] & (d < D)[None, None, :]
    o = tl.load(o_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t[:, None] * N + k[None, :], mask=tmask[:, None], other=0.0)      # [BLOCK_T, N]
    mixed = tl.zeros((BLOCK_T, N, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(N):          # sequential in j, like the reference's sum over the first index
        hj = tl.load(h_ptr + (t[:, None] * N + j) * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        cj = tl.load(comb_ptr + t[:, None] * (N * N) + j * N + k[None, :], mask=tmask[:, None], other=0.0)
        mixed += cj[:, :, None] * hj[:, None, :]
    out = post[:, :, None] * o[:, None, :] + mixed
    tl.store(out_ptr + (t[:, None, None] * N + k[None, :, None]) * D + d[None, None, :],
             cast_out(out, OUT_DT, INTERPRET), mask=m3)
