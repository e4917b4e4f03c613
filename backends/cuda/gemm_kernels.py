"""Triton kernels of the block-scaled linears (see gemm.py for the providers and the design notes)."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out, fp4_tile, load_scale


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each weight column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _store_tile(acc, c_ptr, part_ptr, offs_m, offs_n, M, N, stride_cm, split, SPLIT: tl.constexpr,
                OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """The tile's result: cast into C, or (SPLIT) its fp32 partial into part[split] ([M, N] per split) for
    splitk_reduce_kernel."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        p_ptrs = part_ptr + (split * M + offs_m[:, None].to(tl.int64)) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)
    else:
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, cast_out(acc, OUT_DT, INTERPRET), mask=mask)


@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, part_ptr, M, N, K, stride_am, stride_cm, kb_per_split,
                    BS_E8M0: tl.constexpr, OUT_DT: tl.constexpr, INTERPRET: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = sum over 128-blocks kb of (A_q[:, kb] @ B_q[:, kb]^T) * a_s[m, kb] * b_s[n // 128, kb].

    A_q: fp8 [M, K] with per-(row, 128-block) fp32 scales as [M, K/128]; B_q: fp8 [N, K] (K contiguous) with
    128x128 block scales [ceil(N/128), K/128] (fp32 or e8m0 bytes). Each 128-deep fp8 product is accumulated by
    the tensor cores, then scaled and added into an fp32 accumulator (DeepSeek's "promotion" every K-block).
    Grid axis 1 = split of the K-blocks (kb_per_split each); with SPLIT the partials are summed in split order
    by splitk_reduce_kernel."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kb_count = K // 128
    kb0 = split * kb_per_split
    kb1 = tl.minimum(kb_count, kb0 + kb_per_split)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] + kb0 * 128
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None] + kb0 * 128    # [128, BLOCK_N], K-major
    as_ptrs = as_ptr + offs_m.to(tl.int64) * kb_count
    bs_ptrs = bs_ptr + (offs_n // 128) * kb_count
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
        b_s = load_scale(bs_ptrs + kb, mask_n, BS_E8M0)
        if INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += 128
        b_ptrs += 128
    _store_tile(acc, c_ptr, part_ptr, offs_m, offs_n, M, N, stride_cm, split, SPLIT, OUT_DT, INTERPRET)


@triton.jit
def fp4_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, stride_am, stride_cm,
                    BS_E8M0: tl.constexpr, OUT_DT: tl.constexpr, DOT_DT: tl.constexpr, INTERPRET: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = (A_q * a_s) @ (fp4(B) * b_s)^T with both operands dequantised exactly in-kernel.

    A_q: fp8 [M, K], scales [M, K/128] fp32. B: packed e2m1 bytes [N, K/2] (element 2i in the low nibble),
    scales [N, K/32] (fp32 or e8m0 bytes). An e4m3 value times a power of two and an e2m1 value times a power of
    two are both exact in bf16, so one bf16 tensor-core product with fp32 accumulation over all of K gives the
    reference's exact-product fp32 sum (up to summation order); no per-block rescaling is needed."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + offs_kh[None, :]     # [BLOCK_N, BLOCK_K/2]
    bs_ptrs = bs_ptr + offs_n[:, None].to(tl.int64) * (K // 32) + tl.arange(0, BLOCK_K // 32)[None, :]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * (K // 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_s = tl.load(as_ptrs + k0 // 128, mask=mask_m, other=0.0)
        a = tl.load(a_ptrs + k0, mask=mask_m[:, None], other=0.0).to(tl.float32) * a_s[:, None]
        packed = tl.load(b_ptrs + k0 // 2, mask=mask_n[:, None], other=0).to(tl.int32)
        w = fp4_tile(packed, load_scale(bs_ptrs + k0 // 32, mask_n[:, None], BS_E8M0), BLOCK_N, BLOCK_K)
        acc += tl.dot(a.to(DOT_DT), tl.trans(w.to(DOT_DT)))
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_out(acc, OUT_DT, INTERPRET), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def float_gemm_kernel(a_ptr, b_ptr, c_ptr, part_ptr, M, N, K, stride_am, stride_cm, k_per_split,
                      stride_ag, stride_bg, stride_cg,
                      OUT_DT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[N, K]^T with fp32 accumulation over K in BLOCK_K steps (a fixed order per element).
    bf16/fp16 operands multiply on the tensor cores (exact products); fp32 operands use exact fp32 ("ieee") or
    TF32x3 (PRECISION, chosen by the provider).
    Grid axis 1 = split of K (k_per_split each, a multiple of BLOCK_K; partials summed in split order by
    splitk_reduce_kernel), axis 2 = group g of a grouped product (A, B, C offset by g * stride_*g)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + g * stride_ag + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + g * stride_bg + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]   # [BLOCK_K, BLOCK_N]
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = (k0 + offs_k) < k_hi
        a = tl.load(a_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DT), b.to(DOT_DT), input_precision=PRECISION)
    _store_tile(acc, c_ptr + g * stride_cg, part_ptr + g * tl.num_programs(1) * M * N, offs_m, offs_n, M, N,
                stride_cm, split, SPLIT, OUT_DT, INTERPRET)    # g is int64: 64-bit offsets


@triton.jit
def splitk_reduce_kernel(part_ptr, c_ptr, M, N, n_splits, stride_cm, stride_cg,
                         OUT_DT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """C[m, n] = cast(part[0, m, n] + part[1, m, n] + ...), the splits added in order (deterministic); grid axis
    1 = group (part is [groups, n_splits, M, N] fp32)."""
    g = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    base = part_ptr + g * n_splits * M * N
    acc = tl.load(base + offs, mask=mask, other=0.0)
    for i in range(1, n_splits):
        acc += tl.load(base + i * M * N + offs, mask=mask, other=0.0)
    rows = offs // N
    tl.store(c_ptr + g * stride_cg + rows * stride_cm + offs % N, cast_out(acc, OUT_DT, INTERPRET), mask=mask)
