"""Triton kernels of the fused compressor step (DESIGN.md 2.4, reference/compression.py).

Inputs are the fp32 projections kv, score [B*S, C] of the S new tokens (C = coff*d; torch matmul on the host),
the decode state kv_state / score_state [B, coff*ratio, C] and the positional bias ape [ratio, C].

compress_entry_kernel: one program per (new entry, batch row). Entry j covers window w = w0 + j: ratio rows of
features [0, d) (ratio 4: 2*ratio rows, the first ratio from window w-1 and features [0, d) of those rows, the
next ratio from window w and features [d, 2d)). A row at absolute position p comes from the state when
p < start_pos (slot p - state_base: the previous window sits in slots [0, ratio), the current in [cur0, ...)),
otherwise from the new projections (row p - start_pos, score + ape[p % ratio]). The rows are streamed in chunks of
BLOCK_R with an online softmax per feature (fp32; -inf scores, e.g. entry 0's missing half, weigh 0), so a
128-row HCA window never has to sit in registers at once. The whole d-wide entry then stays in registers for
RMSNorm, RoPE at position w*ratio (last RD dims), and the QAT round trip: FP8 blocks of 64 on dims [0, d-RD),
or Hadamard (butterfly, the reference's order) + FP4 blocks of 32 on the whole entry. Where the reference casts
an intermediate to x's dtype (pooled, normed, rotated, Hadamard output) the kernel rounds to that dtype too.

compress_state_kernel: one program per (batch row, slot r). It writes the state the reference leaves: with
overlap and at least one new entry, slot r of the previous-window region <- position (wt-1)*ratio + r (the last
full window); slot cur0 + r <- position wt*ratio + r if that token exists (kept in place when it is older than
this step), else kv 0 / score -inf; wt = (start_pos + S) // ratio. Each program reads every state row it
overwrites before writing it, and no other program touches that row, so the in-place update is race-free; it
runs after the entry kernel, which reads the old state.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .quant_kernels import fp4_block_roundtrip, fp8_block_roundtrip
from .tl_helpers import cast_out, hadamard_butterfly, round_to


@triton.jit
def _row_source(p, start_pos, state_base, ratio):
    """Per position p: (from the state?, state slot, new-row index, ape row). Only one of the two sources is
    read (masked loads), so the other's out-of-range index is never dereferenced."""
    return p < start_pos, p - state_base, p - start_pos, tl.where(p >= 0, p % ratio, 0)


@triton.jit
def _pool_rows(m_run, l_run, acc, kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr, first, col, fmask, start_pos,
               state_base, C, ratio, BLOCK_R: tl.constexpr):
    """Online-softmax update (running max, denominator, weighted kv sum per feature) with the ratio rows of
    positions first .. first + ratio - 1, feature columns col."""
    for r0 in range(0, ratio, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        from_state, slot, new_row, ape_row = _row_source(first + r, start_pos, state_base, ratio)
        m2 = (r < ratio)[:, None] & fmask[None, :]
        ms = m2 & from_state[:, None]
        mn = m2 & (~from_state)[:, None]
        s_off = slot.to(tl.int64)[:, None] * C + col[None, :]
        n_off = new_row.to(tl.int64)[:, None] * C + col[None, :]
        kv = tl.where(from_state[:, None], tl.load(kvs_rows + s_off, mask=ms, other=0.0),
                      tl.load(kv_rows + n_off, mask=mn, other=0.0))
        sc = tl.where(from_state[:, None], tl.load(scs_rows + s_off, mask=ms, other=0.0),
                      tl.load(sc_rows + n_off, mask=mn, other=0.0) +
                      tl.load(ape_ptr + ape_row[:, None] * C + col[None, :], mask=mn, other=0.0))
        sc = tl.where(m2, sc, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(sc, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)     # all -inf so far: exp(-inf - 0) = 0, no NaN
        alpha = tl.exp(m_run - m_ref)
        e = tl.exp(sc - m_ref[None, :])
        l_run = l_run * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(e * kv, axis=0)
        m_run = m_new
    return m_run, l_run, acc


@triton.jit(do_not_specialize=["start_pos", "w0", "n_new", "state_base"])   # change every step
def compress_entry_kernel(kv_ptr, sc_ptr, kvs_ptr, scs_ptr, ape_ptr, nw_ptr, cos_ptr, sin_ptr, out_ptr,
                          S, start_pos, w0, n_new, state_base, state_rows, C, d, d_f, ratio, nope, cos_stride,
                          sin_stride, eps, hadamard_scale,
                          OVERLAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                          QUANT: tl.constexpr, ROTATE: tl.constexpr, LOG2_D: tl.constexpr,
                          OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    j = tl.program_id(0)        # entries on axis x: a 1M-token prompt has 262144 of them (y allows 65535)
    b = tl.program_id(1)
    w = w0 + j
    f = tl.arange(0, BLOCK_D)
    fmask = f < d
    kv_rows = kv_ptr + b.to(tl.int64) * S * C
    sc_rows = sc_ptr + b.to(tl.int64) * S * C
    kvs_rows = kvs_ptr + b.to(tl.int64) * state_rows * C
    scs_rows = scs_ptr + b.to(tl.int64) * state_rows * C

    # per-feature online softmax over the window's rows
    m_run = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if OVERLAP:   # window w-1 contributes its features [0, d), window w its features [d, 2d)
        m_run, l_run, acc = _pool_rows(m_run, l_run, acc, kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr,
                                       (w - 1) * ratio, f, fmask, start_pos, state_base, C, ratio, BLOCK_R)
        m_run, l_run, acc = _pool_rows(m_run, l_run, acc, kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr,
                                       w * ratio, d + f, fmask, start_pos, state_base, C, ratio, BLOCK_R)
    else:
        m_run, l_run, acc = _pool_rows(m_run, l_run, acc, kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr,
                                       w * ratio, f, fmask, start_pos, state_base, C, ratio, BLOCK_R)
    v = round_to(tl.math.div_rn(acc, tl.where(fmask, l_run, 1.0)), OUT_DT, INTERPRET)   # pooled, x's dtype

    # RMSNorm with weight
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(v * v, axis=0), d_f) + eps))
    nw = tl.load(nw_ptr + f, mask=fmask, other=0.0).to(tl.float32)
    v = round_to(nw * (v * rstd), OUT_DT, INTERPRET)

    # RoPE at the window's first position, on pairs of the last 2 * (d - nope) / 2 dims
    pair = tl.arange(0, BLOCK_D // 2)
    ci = pair - nope // 2
    is_rope = (ci >= 0) & (2 * pair < d)
    pos = w * ratio
    c = tl.load(cos_ptr + pos.to(tl.int64) * cos_stride + ci, mask=is_rope, other=1.0)
    s = tl.load(sin_ptr + pos.to(tl.int64) * sin_stride + ci, mask=is_rope, other=0.0)
    a, bb = tl.split(tl.reshape(v, (BLOCK_D // 2, 2)))
    ra = tl.where(is_rope, a * c - bb * s, a)
    rb = tl.where(is_rope, a * s + bb * c, bb)
    v = round_to(tl.reshape(tl.join(ra, rb), (BLOCK_D,)), OUT_DT, INTERPRET)

    if QUANT:
        if ROTATE:      # indexer keys: Hadamard (d = BLOCK_D, a power of two), then FP4 blocks of 32
            v = tl.reshape(hadamard_butterfly(tl.reshape(v, (1, BLOCK_D)), 1, BLOCK_D, LOG2_D), (BLOCK_D,))
            v = round_to(v * hadamard_scale, OUT_DT, INTERPRET)
            q, _, _ = fp4_block_roundtrip(tl.reshape(v, (BLOCK_D // 32, 32)))
            v = tl.reshape(q, (BLOCK_D,))
        elif BLOCK_D >= 64:      # attention KV: FP8 blocks of 64 on the non-rope dims
            q, _ = fp8_block_roundtrip(tl.reshape(tl.where(f < nope, v, 0.0), (BLOCK_D // 64, 64)), True)
            v = tl.where(f < nope, tl.reshape(q, (BLOCK_D,)), v)
    out = out_ptr + (b.to(tl.int64) * n_new + j) * d
    tl.store(out + f, cast_out(v, OUT_DT, INTERPRET), mask=fmask)


@triton.jit
def _mask_if(mask, cond):
    """mask & cond for a scalar cond (the interpreter turns block & scalar-bool into an int mask)."""
    return tl.where(cond, mask, False)


@triton.jit
def _state_row(kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr, p, c, cm, start_pos, state_base, C, ratio):
    """(kv, score) of the token at position p, features c: from the state if older than this step (score
    already biased), else from the new projections plus ape[p % ratio]."""
    from_state, slot, new_row, ape_row = _row_source(p, start_pos, state_base, ratio)
    ms = _mask_if(cm, from_state)
    mn = _mask_if(cm, p >= start_pos)
    kv = tl.where(from_state, tl.load(kvs_rows + slot * C + c, mask=ms, other=0.0),
                  tl.load(kv_rows + new_row.to(tl.int64) * C + c, mask=mn, other=0.0))
    sc = tl.where(from_state, tl.load(scs_rows + slot * C + c, mask=ms, other=0.0),
                  tl.load(sc_rows + new_row.to(tl.int64) * C + c, mask=mn, other=0.0) +
                  tl.load(ape_ptr + ape_row * C + c, mask=mn, other=0.0))
    return kv, sc


@triton.jit(do_not_specialize=["start_pos", "wt", "n_new", "state_base"])
def compress_state_kernel(kv_ptr, sc_ptr, kvs_ptr, scs_ptr, ape_ptr, S, start_pos, wt, n_new, state_base,
                          state_rows, C, ratio, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1)
    kv_rows = kv_ptr + b.to(tl.int64) * S * C
    sc_rows = sc_ptr + b.to(tl.int64) * S * C
    kvs_rows = kvs_ptr + b.to(tl.int64) * state_rows * C
    scs_rows = scs_ptr + b.to(tl.int64) * state_rows * C
    if OVERLAP:
        cur0 = ratio
    else:
        cur0 = 0
    p_cur = wt * ratio + r                     # the token that belongs in slot cur0 + r now
    p_prev = (wt - 1) * ratio + r              # overlap: the last full window's token for slot r
    cur_exists = p_cur < start_pos + S
    cur_write = p_cur >= start_pos             # older tokens stay where they are
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        if OVERLAP:
            if n_new > 0:
                kvp, scp = _state_row(kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr, p_prev, c, cm, start_pos,
                                      state_base, C, ratio)
                tl.store(kvs_rows + r * C + c, kvp, mask=cm)
                tl.store(scs_rows + r * C + c, scp, mask=cm)
        kvc, scc = _state_row(kv_rows, sc_rows, kvs_rows, scs_rows, ape_ptr, p_cur, c, _mask_if(cm, cur_exists),
                              start_pos, state_base, C, ratio)
        scc = tl.where(cur_exists, scc, float("-inf"))
        tl.store(kvs_rows + (cur0 + r) * C + c, kvc, mask=_mask_if(cm, cur_write))
        tl.store(scs_rows + (cur0 + r) * C + c, scc, mask=_mask_if(cm, cur_write))
