"""Triton kernels of the MoE router (DESIGN.md 2.6, reference.moe_route).

route_logits_kernel: the gate GEMM x [T, D] @ W [E, D]^T with fp32 accumulation, on [BLOCK_T, BLOCK_E] output
tiles; the D range is split over programs when (token blocks x expert blocks) would leave the GPU idle (decode:
T = 1 reads the whole 2 MB gate weight, which one program would stream far too slowly). Each split writes fp32
partials [split, T, E]; the select kernel reduces them as one register tile (fixed order, deterministic).

route_select_kernel: one program per BLOCK_T tokens holding all E scores of each token in registers:
score_func (sqrt(softplus), sigmoid or softmax, fp32), selection on score + bias by K rounds of argmax (ties go
to the lower expert id; the reference's torch.topk order is the same descending order) or the hash table
tid2eid[input_ids], then the UNBIASED scores of the chosen experts, normalised to sum 1 (not for softmax) and
scaled. Writes weights fp32 [T, K] and ids int64 [T, K].
"""
from __future__ import annotations

import triton
import triton.language as tl

SQRTSOFTPLUS: tl.constexpr = tl.constexpr(0)
SIGMOID: tl.constexpr = tl.constexpr(1)
SOFTMAX: tl.constexpr = tl.constexpr(2)


@triton.jit
def route_logits_kernel(x_ptr, w_ptr, part_ptr, T, E, D, x_stride, k_per_split,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """part[split, t, e] = sum over this split's k of x[t, k] * w[e, k] (fp32 accumulation)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    tmask = t < T
    emask = e < E
    k_lo = split * k_per_split
    k_hi = tl.minimum(D, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_hi
        x = tl.load(x_ptr + t.to(tl.int64)[:, None] * x_stride + k[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + e.to(tl.int64)[None, :] * D + k[:, None], mask=emask[None, :] & kmask[:, None],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    out = (split * T + t).to(tl.int64)
    tl.store(part_ptr + out[:, None] * E + e[None, :], acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def log1p_pos(y):
    """log(1 + y) for y >= 0 to a few ulp without libdevice: log(u) * y / (u - 1), u = 1 + y (Goldberg); the
    quotient corrects the rounding of u. y itself when u rounds to 1."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * tl.math.div_rn(y, tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def route_select_kernel(part_ptr, bias_ptr, tid_ptr, ids_ptr, w_out_ptr, idx_out_ptr, T, E, n_split, route_scale,
                        tid_stride, K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HASH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_P: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    sp = tl.arange(0, SPLIT_P)
    tmask = t < T
    emask = e < E
    # the split-K partials of these tokens as one [BLOCK_T, SPLIT_P, BLOCK_E] tile, reduced in registers
    offs = (sp[None, :, None] * T + t.to(tl.int64)[:, None, None]) * E + e[None, None, :]
    m3 = tmask[:, None, None] & (sp < n_split)[None, :, None] & emask[None, None, :]
    logits = tl.sum(tl.load(part_ptr + offs, mask=m3, other=0.0), axis=1)

    if SCORE == SOFTMAX:
        z = tl.where(emask[None, :], logits, float("-inf"))
        ez = tl.exp(z - tl.max(z, axis=1)[:, None])
        scores = tl.math.div_rn(ez, tl.sum(ez, axis=1)[:, None])
    elif SCORE == SIGMOID:
        scores = tl.math.div_rn(1.0, 1.0 + tl.exp(-logits))
    else:  # sqrt(softplus(x)), softplus(x) = x above torch's threshold 20, else log1p(exp(x))
        sp = tl.where(logits > 20.0, logits, log1p_pos(tl.exp(tl.minimum(logits, 20.0))))
        scores = tl.sqrt_rn(sp)

    if HASH:
        tok = tl.load(ids_ptr + t, mask=tmask, other=0).to(tl.int64)
        idx = tl.load(tid_ptr + tok[:, None] * tid_stride + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :],
                      other=0).to(tl.int32)
    else:
        biased = scores
        if HAS_BIAS:
            biased = biased + tl.load(bias_ptr + e, mask=emask, other=0.0)[None, :]
        biased = tl.where(emask[None, :], biased, float("-inf"))
        idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.argmax(biased, axis=1).to(tl.int32)                        # lowest id among equal maxima
            idx = tl.where(kk[None, :] == k, best[:, None], idx)
            biased = tl.where(e[None, :] == best[:, None], float("-inf"), biased)

    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(K):
        pick = tl.sum(tl.where(kk[None, :] == k, idx, 0), axis=1)                  # [BLOCK_T]
        wk = tl.sum(tl.where(e[None, :] == pick[:, None], scores, 0.0), axis=1)
        w = tl.where(kk[None, :] == k, wk[:, None], w)
    if SCORE != SOFTMAX:
        w = tl.math.div_rn(w, tl.sum(w, axis=1)[:, None])
    w = w * route_scale
    om = tmask[:, None] & (kk < K)[None, :]
    tl.store(w_out_ptr + t.to(tl.int64)[:, None] * K + kk[None, :], w, mask=om)
    tl.store(idx_out_ptr + t.to(tl.int64)[:, None] * K + kk[None, :], idx.to(tl.int64), mask=om)
