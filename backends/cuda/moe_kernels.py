"""Triton kernels of moe_experts: grouped gate/up GEMM with the SwiGLU epilogue, grouped down GEMM, and the
ordered combine (see moe.py for the provider, the tile plan and the batch-invariance argument).

Weight formats (FMT): 0 = float weights (bf16/fp16/fp32), 1 = fp8 e4m3 with 128x128 block scales,
2 = packed fp4 e2m1 with per-32 scales (dequantised exactly to bf16 in-kernel, as in gemm_kernels)."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out, fp4_tile, load_scale, quant_fp8_block, round_to


@triton.jit
def _tile_rows(order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, BLOCK_M: tl.constexpr):
    """The tile's expert and its rows: slot ids (rows of the [T*K] slot buffers), in (token, k) order."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    n_rows = tl.load(tile_rows_ptr + tile)
    offs_r = tl.arange(0, BLOCK_M)
    mask_r = offs_r < n_rows
    slot = tl.load(order_ptr + row0 + offs_r, mask=mask_r, other=0)
    return e, slot, mask_r


@triton.jit
def _a_tile(a_ptr, as_ptr, rows, mask_r, k0, K, stride_a, FMT: tl.constexpr, DOT_DT: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Activation tile [BLOCK_M, BLOCK_K] of the gathered rows, and the per-row fp8 scale that FMT 1 applies
    after the product (FMT 0 and 2 return a dummy; FMT 2 folds the scale into the bf16 operand)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + offs_k[None, :],
                mask=mask_r[:, None] & (offs_k < K)[None, :], other=0.0)
    if FMT == 0:
        a_s = mask_r.to(tl.float32)
    else:
        a_s = tl.load(as_ptr + rows.to(tl.int64) * (K // 128) + k0 // 128, mask=mask_r, other=0.0)
        if FMT == 2:
            a = a.to(tl.float32) * a_s[:, None]
    return a.to(DOT_DT), a_s


@triton.jit
def _w_product(a, a_s, w_ptr, s_ptr, e, offs_n, mask_n, k0, K, stride_we, stride_wn, stride_se, stride_sn,
               FMT: tl.constexpr, S_E8M0: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a @ W_e[offs_n, k0:k0+BLOCK_K]^T in fp32, with the format's scales applied."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w_e = w_ptr + e.to(tl.int64) * stride_we
    s_e = s_ptr + e.to(tl.int64) * stride_se
    if FMT == 2:
        offs_kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_e + offs_n[:, None].to(tl.int64) * stride_wn + offs_kh[None, :],
                         mask=mask_n[:, None], other=0).to(tl.int32)
        sc = load_scale(s_e + offs_n[:, None] * stride_sn + k0 // 32 + tl.arange(0, BLOCK_K // 32)[None, :],
                        mask_n[:, None], S_E8M0)                                    # [BLOCK_N, BLOCK_K / 32]
        part = tl.dot(a, tl.trans(fp4_tile(packed, sc, BLOCK_N, BLOCK_K).to(DOT_DT)))
    else:
        b = tl.load(w_e + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=mask_n[None, :] & (offs_k < K)[:, None], other=0.0).to(DOT_DT)  # [BLOCK_K, BLOCK_N]
        if FMT == 0:
            part = tl.dot(a, b, input_precision=PREC)
        else:
            b_s = load_scale(s_e + (offs_n // 128) * stride_sn + k0 // 128, mask_n, S_E8M0)
            part = tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    return part


@triton.jit
def moe_gate_up_kernel(x_ptr, xs_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr,
                       order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, route_ptr, h_ptr, hs_ptr,
                       TOPK, D, I, swiglu_limit, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                       FMT: tl.constexpr, S_E8M0: tl.constexpr, HAS_ROUTE: tl.constexpr, CLAMP: tl.constexpr,
                       QUANT_H: tl.constexpr, UE8M0: tl.constexpr, ACT_DT: tl.constexpr, DOT_DT: tl.constexpr,
                       PREC: tl.constexpr, INTERPRET: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[slot, n] = act(route[slot] * silu(g) * u) for one expert tile and BLOCK_N columns of I, where
    g = act(x[token] @ w1_e^T), u = act(x[token] @ w3_e^T) (act = rounding to the activation dtype, as the
    reference's linears return it), u clamped to +-L and g to <= L when CLAMP. With QUANT_H (BLOCK_N == 128)
    the row block is quantised to fp8 here, exactly as quant_fp8 would quantise the down projection's input."""
    e, slot, mask_r = _tile_rows(order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, BLOCK_M)
    if e >= 0:
        tok = slot // TOPK
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a, a_s = _a_tile(x_ptr, xs_ptr, tok, mask_r, k0, D, stride_x, FMT, DOT_DT, BLOCK_K)
            acc_g += _w_product(a, a_s, w1_ptr, s1_ptr, e, offs_n, mask_n, k0, D, stride_we, stride_wn,
                                stride_se, stride_sn, FMT, S_E8M0, DOT_DT, PREC, BLOCK_N, BLOCK_K)
            acc_u += _w_product(a, a_s, w3_ptr, s3_ptr, e, offs_n, mask_n, k0, D, stride_we, stride_wn,
                                stride_se, stride_sn, FMT, S_E8M0, DOT_DT, PREC, BLOCK_N, BLOCK_K)
        g = round_to(acc_g, ACT_DT, INTERPRET)
        u = round_to(acc_u, ACT_DT, INTERPRET)
        if CLAMP:
            u = tl.minimum(tl.maximum(u, -swiglu_limit), swiglu_limit)
            g = tl.minimum(g, swiglu_limit)
        h = g * tl.sigmoid(g) * u
        if HAS_ROUTE:
            h = tl.load(route_ptr + slot, mask=mask_r, other=0.0)[:, None] * h
        h = round_to(h, ACT_DT, INTERPRET)
        h_ptrs = h_ptr + slot[:, None].to(tl.int64) * stride_h + offs_n[None, :]
        mask = mask_r[:, None] & mask_n[None, :]
        if QUANT_H:
            hq, hs = quant_fp8_block(h, UE8M0, INTERPRET)
            tl.store(h_ptrs, hq, mask=mask)
            tl.store(hs_ptr + slot.to(tl.int64) * (I // 128) + tl.program_id(1), hs, mask=mask_r)
        else:
            tl.store(h_ptrs, h.to(ACT_DT), mask=mask)


@triton.jit
def moe_down_kernel(h_ptr, hs_ptr, w2_ptr, s2_ptr, order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr,
                    y_ptr, I, D, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                    FMT: tl.constexpr, S_E8M0: tl.constexpr, ACT_DT: tl.constexpr, DOT_DT: tl.constexpr,
                    PREC: tl.constexpr, INTERPRET: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[slot, n] = act(h[slot] @ w2_e^T) for one expert tile and BLOCK_N columns of D."""
    e, slot, mask_r = _tile_rows(order_ptr, tile_expert_ptr, tile_row0_ptr, tile_rows_ptr, BLOCK_M)
    if e >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, I, BLOCK_K):
            a, a_s = _a_tile(h_ptr, hs_ptr, slot, mask_r, k0, I, stride_h, FMT, DOT_DT, BLOCK_K)
            acc += _w_product(a, a_s, w2_ptr, s2_ptr, e, offs_n, mask_n, k0, I, stride_we, stride_wn,
                              stride_se, stride_sn, FMT, S_E8M0, DOT_DT, PREC, BLOCK_N, BLOCK_K)
        tl.store(y_ptr + slot[:, None].to(tl.int64) * stride_y + offs_n[None, :], cast_out(acc, ACT_DT, INTERPRET),
                 mask=mask_r[:, None] & mask_n[None, :])


@triton.jit
def moe_combine_kernel(y_ptr, shared_ptr, idx_ptr, out_ptr, D, TOPK, E,
                       HAS_SHARED: tl.constexpr, ACT_DT: tl.constexpr, INTERPRET: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """out[t] = act(0 + float(shared[t]) + sum_{k in order} (idx valid ? float(y[t*K + k]) : 0)) in fp32:
    the reference's ordered combine, operation for operation."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for j in range(0, TOPK):
        e = tl.load(idx_ptr + t * TOPK + j)
        valid = (e >= 0) & (e < E)
        slot_mask = mask_d & (tl.zeros((BLOCK_D,), tl.int32) + valid.to(tl.int32) != 0)
        y = tl.load(y_ptr + (t * TOPK + j) * D + offs_d, mask=slot_mask, other=0.0).to(tl.float32)
        acc += tl.where(valid, y, 0.0)
    tl.store(out_ptr + t * D + offs_d, cast_out(acc, ACT_DT, INTERPRET), mask=mask_d)
