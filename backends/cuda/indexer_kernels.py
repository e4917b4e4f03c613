"""Triton kernel of the lightning indexer's scores (see indexer.py for the provider)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])   # the key count grows every decode step
def indexer_scores_kernel(q_ptr, k_ptr, w_ptr, vis_ptr, out_ptr, S, N, H, DI,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_kn, stride_wb, stride_ws,
                          stride_vb, stride_ob, stride_os,
                          DOT_DT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """score[b, s, t] = sum_h relu(<q[b,s,h], k[b,t]>) * w[b,s,h] for t < visible[b, s], -inf otherwise.

    One program: BLOCK_T keys of sequence b (loaded once) against BLOCK_S consecutive queries; per query one
    tensor-core product [H, Di] x [Di, BLOCK_T], ReLU, head weights, sum over heads. Key blocks that a query
    cannot see are skipped (written as -inf), which halves causal prefill work."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < N
    mask_h = offs_h < H
    mask_d = offs_d < DI
    keys = tl.load(k_ptr + b * stride_kb + offs_t[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                   mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(DOT_DT)          # [BLOCK_T, BLOCK_D]
    t0 = pid_t * BLOCK_T
    for i in range(0, BLOCK_S):
        s = (pid_s * BLOCK_S + i).to(tl.int64)
        if s < S:
            vis = tl.load(vis_ptr + b * stride_vb + s).to(tl.int32)
            score = tl.full((BLOCK_T,), float("-inf"), tl.float32)
            if t0 < vis:
                q = tl.load(q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :],
                            mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(DOT_DT)
                w = tl.load(w_ptr + b * stride_wb + s * stride_ws + offs_h, mask=mask_h, other=0.0)
                logits = tl.dot(q, tl.trans(keys), input_precision=PREC)                # [BLOCK_H, BLOCK_T]
                val = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
                score = tl.where(offs_t < vis, val, float("-inf"))
            tl.store(out_ptr + b * stride_ob + s * stride_os + offs_t, score, mask=mask_t)
