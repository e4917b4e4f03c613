"""Triton kernels of sparse_attn and window_sparse_attn: split-K online softmax over index lists, and the combine
of the splits (see attention.py for the providers and the design notes)."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out


@triton.jit
def _attend_block(q, rows, valid, m_i, l_i, acc, scale, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update with one block of gathered kv rows [BLOCK_N, BLOCK_D], used as keys (logits
    q @ rows^T) and as values (p @ rows): shared-KV MQA. Rows where `valid` is False get logit -inf."""
    rows = rows.to(DOT_DT)
    logits = tl.dot(q, tl.trans(rows), input_precision=PREC) * scale             # [BLOCK_H, BLOCK_N]
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all-invalid so far: keep exp() finite
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(logits - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), rows, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _query_tile(q_ptr, S, H, D, n_hblocks, stride_qb, stride_qs, stride_qh, DOT_DT: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program decomposition of both attention kernels (grid axis 0 = query x head block, the head block
    fastest) and the query tile they load once: (pid_q, b, s, offs_h, offs_d, mask_h, mask_d, q [BLOCK_H, BLOCK_D]
    in DOT_DT). pid_q, b and s are 64-bit (long prefill chunks)."""
    pid_h = tl.program_id(0) % n_hblocks
    pid_q = (tl.program_id(0) // n_hblocks).to(tl.int64)
    b = pid_q // S
    s = pid_q % S
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < H
    mask_d = offs_d < D
    q_ptrs = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(DOT_DT)
    return pid_q, b, s, offs_h, offs_d, mask_h, mask_d, q


@triton.jit
def _finish(acc, m_i, l_i, pid_q, n_splits, b, s, offs_h, offs_d, mask_h, mask_d, H, D, sink_ptr, out_ptr,
            part_o_ptr, part_ml_ptr, stride_ob, stride_os, stride_oh, SPLIT: tl.constexpr, OUT_DT: tl.constexpr,
            INTERPRET: tl.constexpr):
    """Without SPLIT: finish the softmax with the sink and write the output. With SPLIT: write the unnormalised
    partial (acc, running max m, running sum l) of this split (grid axis 1) for sparse_attn_combine_kernel."""
    if SPLIT:
        part = (pid_q * n_splits + tl.program_id(1)) * H
        tl.store(part_o_ptr + (part + offs_h[:, None]) * D + offs_d[None, :], acc,
                 mask=mask_h[:, None] & mask_d[None, :])
        tl.store(part_ml_ptr + (part + offs_h) * 2, m_i, mask=mask_h)
        tl.store(part_ml_ptr + (part + offs_h) * 2 + 1, l_i, mask=mask_h)
    else:
        sink = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0)
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        denom = l_i + tl.exp(sink - m_use)
        o = acc / tl.where(denom > 0, denom, 1.0)[:, None]   # denom 0: no valid index and sink -inf, acc is 0
        o_ptrs = out_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, cast_out(o, OUT_DT, INTERPRET), mask=mask_h[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["N", "K"])   # kv rows and list length change between steps
def sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                       S, H, N, K, D, scale, blocks_per_split, n_splits, n_hblocks,
                       stride_qb, stride_qs, stride_qh, stride_kvb, stride_kvn, stride_ib, stride_is,
                       stride_ob, stride_os, stride_oh,
                       SPLIT: tl.constexpr, OUT_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
                       INTERPRET: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """One program: one query (b, s), BLOCK_H heads, one split of the index list.

    Invalid indices (-1, or outside [0, N)) load nothing and get logit -inf."""
    pid_q, b, s, offs_h, offs_d, mask_h, mask_d, q = _query_tile(q_ptr, S, H, D, n_hblocks, stride_qb, stride_qs,
                                                                 stride_qh, DOT_DT, BLOCK_H, BLOCK_D)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    k_begin = tl.program_id(1) * blocks_per_split * BLOCK_N
    k_end = tl.minimum(K, k_begin + blocks_per_split * BLOCK_N)
    idx_row = idx_ptr + b * stride_ib + s * stride_is
    kv_b = kv_ptr + b * stride_kvb
    for k0 in range(k_begin, k_end, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + offs_k, mask=offs_k < k_end, other=-1)
        valid = (ids >= 0) & (ids < N)
        rows = tl.load(kv_b + ids[:, None].to(tl.int64) * stride_kvn + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)
        m_i, l_i, acc = _attend_block(q, rows, valid, m_i, l_i, acc, scale, DOT_DT, PREC)
    _finish(acc, m_i, l_i, pid_q, n_splits, b, s, offs_h, offs_d, mask_h, mask_d, H, D, sink_ptr, out_ptr,
            part_o_ptr, part_ml_ptr, stride_ob, stride_os, stride_oh, SPLIT, OUT_DT, INTERPRET)


@triton.jit(do_not_specialize=["start_pos", "N", "KC"])   # change every step
def window_sparse_attn_kernel(q_ptr, win_ptr, kv_ptr, comp_ptr, topk_ptr, sink_ptr, out_ptr, part_o_ptr,
                              part_ml_ptr, S, H, W, W_PAD, N, KC, D, scale, start_pos, ratio, blocks_per_split,
                              n_splits, n_hblocks, stride_qb, stride_qs, stride_qh, stride_wb, stride_wn,
                              stride_kb, stride_ks, stride_cb, stride_cn, stride_tb, stride_ts,
                              stride_ob, stride_os, stride_oh,
                              MODE: tl.constexpr, SPLIT: tl.constexpr, OUT_DT: tl.constexpr, DOT_DT: tl.constexpr,
                              PREC: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: one query (b, s) at position p = start_pos + s, BLOCK_H heads, one split of its virtual
    index list, which is never materialised:

      j in [0, W)            window position pj = p - W + 1 + j (oldest first; invalid when pj < 0): the ring
                             row win[pj % W] when pj < start_pos, else this step's row kv[pj - start_pos];
      j in [W, W_PAD)        padding (W_PAD = W rounded up to BLOCK_N, so no block mixes the two segments);
      j in [W_PAD, W_PAD+KC) compressed entry c = j - W_PAD (MODE 1, HCA: every entry) or c = topk[j - W_PAD]
                             (MODE 2, CSA); valid iff 0 <= c < N and c < (p + 1) // ratio.
    MODE 0 (window-only layer) has no compressed segment. The order is the reference's [window | compressed]
    list (window_workspace), so the online softmax sees the same rows in the same order; rows that cannot be
    valid for this query (window positions before 0, HCA entries not yet visible) are not visited."""
    pid_q, b, s, offs_h, offs_d, mask_h, mask_d, q = _query_tile(q_ptr, S, H, D, n_hblocks, stride_qb, stride_qs,
                                                                 stride_qh, DOT_DT, BLOCK_H, BLOCK_D)
    s32 = s.to(tl.int32)
    p = start_pos + s32                # int32 positions: the block loops' induction variables stay 32-bit
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    k_begin = tl.program_id(1) * blocks_per_split * BLOCK_N
    k_end = tl.minimum(W_PAD + KC, k_begin + blocks_per_split * BLOCK_N)
    # Three loops, one per source, each over its part of this split's range, so every gather has a single base
    # pointer (a per-row choice between two tensors, tl.where on pointers, keeps Triton from pipelining it).
    # Window slot j holds position p - W + 1 + j: slots [first, ring_end) are older than this step (ring slot
    # position % W), slots [ring_end, W) are this step's rows j + s - W + 1 (up to row s, the query's own).
    first = tl.maximum(W - 1 - p, 0)                  # slots before are positions < 0
    ring_end = tl.maximum(W - 1 - s32, 0)             # >= first, as p >= s
    d_mask = mask_d[None, :]
    win_b = win_ptr + b * stride_wb
    ring_lo = tl.maximum(k_begin, first)
    ring_hi = tl.minimum(k_end, ring_end)
    for k0 in range(ring_lo, ring_hi, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        valid = j < ring_hi
        slot = (p - W + 1 + j) % W                    # >= 0 where valid
        rows = tl.load(win_b + slot[:, None].to(tl.int64) * stride_wn + offs_d[None, :],
                       mask=valid[:, None] & d_mask, other=0.0)
        m_i, l_i, acc = _attend_block(q, rows, valid, m_i, l_i, acc, scale, DOT_DT, PREC)
    kv_b = kv_ptr + b * stride_kb
    new_lo = tl.maximum(k_begin, ring_end)
    new_hi = tl.minimum(k_end, W)
    for k0 in range(new_lo, new_hi, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        valid = j < new_hi
        rows = tl.load(kv_b + (j + s32 - W + 1)[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                       mask=valid[:, None] & d_mask, other=0.0)
        m_i, l_i, acc = _attend_block(q, rows, valid, m_i, l_i, acc, scale, DOT_DT, PREC)
    if MODE > 0:
        vis = tl.minimum((p + 1) // ratio, N)          # entries c < vis are visible and exist
        c_hi = k_end
        if MODE == 1:
            c_hi = tl.minimum(c_hi, W_PAD + vis)       # HCA: only the visible prefix of the entries
        comp_b = comp_ptr + b * stride_cb
        topk_row = topk_ptr + b * stride_tb + s * stride_ts
        for k0 in range(tl.maximum(k_begin, W_PAD), c_hi, BLOCK_N):
            jc = k0 - W_PAD + tl.arange(0, BLOCK_N)
            if MODE == 2:
                c = tl.load(topk_row + jc, mask=jc < KC, other=-1)
            else:
                c = jc
            valid = (c >= 0) & (c < vis) & (jc < KC)
            rows = tl.load(comp_b + c[:, None].to(tl.int64) * stride_cn + offs_d[None, :],
                           mask=valid[:, None] & d_mask, other=0.0)
            m_i, l_i, acc = _attend_block(q, rows, valid, m_i, l_i, acc, scale, DOT_DT, PREC)
    _finish(acc, m_i, l_i, pid_q, n_splits, b, s, offs_h, offs_d, mask_h, mask_d, H, D, sink_ptr, out_ptr,
            part_o_ptr, part_ml_ptr, stride_ob, stride_os, stride_oh, SPLIT, OUT_DT, INTERPRET)


@triton.jit
def sparse_attn_combine_kernel(part_o_ptr, part_ml_ptr, sink_ptr, out_ptr, S, H, D, n_splits,
                               stride_ob, stride_os, stride_oh,
                               OUT_DT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the n_splits partials of one (query, head) in split order:
    M = max m_i; l = sum l_i e^(m_i - M); acc = sum acc_i e^(m_i - M); o = acc / (l + e^(sink - M)), 0 when the
    denominator is 0 (no valid index and sink -inf). A split without valid indices has m_i = -inf, weight 0."""
    pid = tl.program_id(0)
    q_row = (pid // H).to(tl.int64)
    h = pid % H
    b = q_row // S
    s = q_row % S
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    base = q_row * n_splits * H + h
    m_max = tl.load(part_ml_ptr + base * 2)
    for i in range(1, n_splits):
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (base + i * H) * 2))
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    wgt = tl.exp(tl.load(part_ml_ptr + base * 2) - m_use)
    l_sum = tl.load(part_ml_ptr + base * 2 + 1) * wgt
    acc = tl.load(part_o_ptr + base * D + offs_d, mask=mask_d, other=0.0) * wgt
    for i in range(1, n_splits):
        wgt = tl.exp(tl.load(part_ml_ptr + (base + i * H) * 2) - m_use)
        l_sum += tl.load(part_ml_ptr + (base + i * H) * 2 + 1) * wgt
        acc += tl.load(part_o_ptr + (base + i * H) * D + offs_d, mask=mask_d, other=0.0) * wgt
    denom = l_sum + tl.exp(tl.load(sink_ptr + h) - m_use)
    o = acc / tl.where(denom > 0, denom, 1.0)
    o_ptrs = out_ptr + b * stride_ob + s * stride_os + h * stride_oh + offs_d
    tl.store(o_ptrs, cast_out(o, OUT_DT, INTERPRET), mask=mask_d)
