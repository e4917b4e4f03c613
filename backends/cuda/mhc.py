"""Triton providers of hc_pre, hc_post and hc_head (kernels and layout in mhc_kernels.py).

Inputs: h [B, S, N, D] (and o [B, S, D]) contiguous in fp16 / bf16 / fp32, with N a power of two <= 8 (V4: 4);
fn / scale / base / post / comb fp32 and contiguous. Outputs like the reference: y / out in h's dtype, post and
comb fp32. Launch plan (shapes and the SM count only, no host syncs): the mixing GEMM splits its K = N*D range
over programs until the grid covers the GPU twice, the finishing kernel splits D the same way.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import cdiv, contiguous_reasons, dot_mode, dtype_reasons, fp32_reasons, next_pow2, num_sms

MIX_BLOCK_K = 64        # K step of the mixing GEMM
MAX_SPLIT = 32          # K splits of the mixing GEMM (the finishing kernel reduces them in one tile)
MAX_STREAMS = 8


def _kernels():
    from . import mhc_kernels
    return mhc_kernels


def _hc_reasons(h, fn, scale, base) -> list[str]:
    reasons = device_reasons(h, fn, scale, base) + dtype_reasons(h=h) + fp32_reasons(fn=fn, scale=scale, base=base)
    reasons += contiguous_reasons(h=h, fn=fn, scale=scale, base=base)
    n = h.shape[-2]
    if n & (n - 1) or n > MAX_STREAMS:
        reasons.append(f"{n} streams: this provider takes a power of two <= {MAX_STREAMS} (V4 uses 4)")
    return reasons


def _supports_pre(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    return _hc_reasons(h, fn, scale, base)


def _supports_head(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6):
    return _hc_reasons(h, fn, scale, base)


def plan_mix(t: int, k: int, target: int) -> dict:
    """Mixing GEMM launch: 16-token blocks (the smallest tl.dot M) up to 1024 tokens, 64-token blocks (wgmma on
    sm90, fn re-read from L2 4x less often) beyond; the K range is split until (token blocks x splits) reaches
    `target` programs or MAX_SPLIT splits, so decode (T = 1) streams the 1.5 MB fn through 32 programs, not one."""
    block_t, warps = (16, 4) if t <= 1024 else (64, 8)
    t_blocks, k_blocks = cdiv(t, block_t), cdiv(k, MIX_BLOCK_K)
    n_split = max(1, min(k_blocks, target // t_blocks, MAX_SPLIT))
    k_per_split = cdiv(k_blocks, n_split) * MIX_BLOCK_K
    return dict(block_t=block_t, warps=warps, n_split=cdiv(k, k_per_split), k_per_split=k_per_split)


def _mix_and_finish(h, fn, scale, base, norm_eps, hc_eps, iters, head):
    from .tl_helpers import tl_dtype
    k_mod = _kernels()
    b, s, n, d = h.shape
    t, k, m = b * s, n * d, fn.shape[0]
    n_pad = max(16, next_pow2(m))
    y = torch.empty(b, s, d, dtype=h.dtype, device=h.device)
    post = torch.empty(0 if head else (b, s, n), dtype=torch.float32, device=h.device)
    comb = torch.empty(0 if head else (b, s, n, n), dtype=torch.float32, device=h.device)
    if t == 0 or d == 0:
        return y, post, comb
    target = 2 * num_sms(h.device)
    mix = plan_mix(t, k, target)
    part = torch.empty(mix["n_split"], t, n_pad, dtype=torch.float32, device=h.device)
    sq = torch.empty(mix["n_split"], t, dtype=torch.float32, device=h.device)
    _, precision = dot_mode(torch.float32)
    launch(k_mod.hc_mix_kernel, (cdiv(t, mix["block_t"]), mix["n_split"]), h, fn, part, sq, t, k,
           mix["k_per_split"], m, BLOCK_T=mix["block_t"], BLOCK_K=MIX_BLOCK_K, N_PAD=n_pad, PRECISION=precision,
           num_warps=mix["warps"])
    n_split = mix["n_split"]
    # finish: BLOCK_T tokens x a chunk of D per program
    block_t = min(4, next_pow2(t))
    block_d = min(next_pow2(d), max(16, 4096 // (block_t * n)))
    t_blocks = cdiv(t, block_t)
    d_chunks = max(1, min(cdiv(d, block_d), target // t_blocks))
    d_per_prog = cdiv(cdiv(d, block_d), d_chunks) * block_d
    launch(k_mod.hc_finish_kernel, (t_blocks, cdiv(d, d_per_prog)), h, part, sq, scale, base, y, post, comb,
           t, d, n_split, d_per_prog, float(k), float(norm_eps), float(hc_eps), int(iters) if not head else 1,
           N=n, N_PAD=n_pad, SPLIT_P=next_pow2(n_split), HEAD=head, BLOCK_T=block_t, BLOCK_D=block_d,
           OUT_DT=tl_dtype(h.dtype), INTERPRET=interpret_mode(), num_warps=4)
    return y, post, comb


@register("hc_pre", "triton", "cuda", available=triton_availability, supports=_supports_pre,
          note="Triton mHC pre: split-K mixing GEMM + RMS fold, sigmoids, Sinkhorn, weighted stream sum")
def hc_pre_triton(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    return _mix_and_finish(h, fn, scale, base, norm_eps, hc_eps, iters, head=False)


@register("hc_head", "triton", "cuda", available=triton_availability, supports=_supports_head,
          note="Triton mHC head: split-K mixing GEMM + RMS fold, sigmoid, weighted stream sum")
def hc_head_triton(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6):
    return _mix_and_finish(h, fn, scale, base, norm_eps, hc_eps, 1, head=True)[0]


def _supports_post(o, h, post, comb):
    reasons = device_reasons(o, h, post, comb) + dtype_reasons(o=o) + fp32_reasons(post=post, comb=comb)
    reasons += contiguous_reasons(o=o, h=h, post=post, comb=comb)
    n = h.shape[-2]
    if n & (n - 1) or n > MAX_STREAMS:
        reasons.append(f"{n} streams: this provider takes a power of two <= {MAX_STREAMS} (V4 uses 4)")
    return reasons


@register("hc_post", "triton", "cuda", available=triton_availability, supports=_supports_post,
          note="Triton mHC post: out_k = post_k o + sum_j comb[j,k] h_j, one pass")
def hc_post_triton(o, h, post, comb):
    from .tl_helpers import tl_dtype
    b, s, n, d = h.shape
    t = b * s
    out = torch.empty(b, s, n, d, dtype=o.dtype, device=o.device)
    if t == 0 or d == 0:
        return out
    block_d = min(next_pow2(d), 1024)
    block_t = max(1, min(next_pow2(t), 4096 // (n * block_d)))
    launch(_kernels().hc_post_kernel, (cdiv(t, block_t), cdiv(d, block_d)), o, h, post, comb, out, t, d,
           N=n, BLOCK_T=block_t, BLOCK_D=block_d, OUT_DT=tl_dtype(o.dtype), INTERPRET=interpret_mode(),
           num_warps=4)
    return out
