"""Triton provider of `indexer_topk`: weighted-ReLU MQA scores in Triton, then torch.topk.

Scores: `indexer_kernels.indexer_scores_kernel`, fp32 [B, S_chunk, N] with invisible entries at -inf; queries
are processed in chunks so the score buffer stays under SCORE_BUDGET elements (long-context prefill).
Top-k: torch.topk on the scores for now (no Triton radix top-k yet; that and fusing the selection into the
scores pass are the next steps, since at long context the indexer dominates decode). Set semantics as the op
defines them: the entries with the largest scores among the visible ones, -1 in slots beyond the visible
count; ties may be broken differently from the reference (which prefers the lower index).
No host syncs.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import next_pow2

BLOCK_T = 64            # keys per program (16-bit inputs; see score_config)
SCORE_BUDGET = 1 << 25  # fp32 score elements materialised at once (128 MiB)
MAX_HEADS = 128
MAX_DIM = 256


def _kernels():
    from . import indexer_kernels
    return indexer_kernels


def score_config(dtype: torch.dtype, block_h: int, block_d: int) -> tuple[int, int]:
    """(keys per program, num_warps). 16-bit inputs run on the tensor cores: 64 keys, 8 warps once the query
    tile passes 64 x 128 (offline sm90 compile: 128 heads x 256 dims spill at 4 warps). fp32 inputs multiply in
    exact fp32 on FMA units, whose operands live in registers: 32 keys (16 beyond 64 x 128) at 8 warps keep
    every accepted shape free of spills (64 keys spilled 7 KB at V4's 64 x 128)."""
    tile = block_h * block_d
    if dtype == torch.float32:
        return (32 if tile <= 8192 else 16), 8
    return BLOCK_T, (4 if tile <= 8192 else 8)


def _supports(q, k, w, visible, topk):
    reasons = device_reasons(q, k, w, visible)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        reasons.append(f"q dtype {q.dtype} not supported (bf16, fp16, fp32; fp64 runs on the reference)")
    h, di = q.shape[-2], q.shape[-1]
    if h > MAX_HEADS:
        reasons.append(f"{h} indexer heads > {MAX_HEADS} (one program holds all heads of a query)")
    if di > MAX_DIM:
        reasons.append(f"indexer head_dim {di} > {MAX_DIM}")
    if w.dtype != torch.float32:
        reasons.append(f"w dtype {w.dtype} not supported (float32)")
    return reasons


def indexer_scores_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """fp32 scores [B, S, N] (reference.indexer_scores semantics, -inf where t >= visible[b, s])."""
    import triton.language as tl
    from .tl_helpers import dot_precision, tl_dtype
    b, s, h, di = q.shape
    n = k.shape[1]
    out = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    visible = visible.contiguous()
    dot_dt = tl.float32 if interpret_mode() else tl_dtype(q.dtype)
    block_s = 1 if s <= 4 else 16
    block_h, block_d = max(16, next_pow2(h)), max(16, next_pow2(di))
    block_t, warps = score_config(q.dtype, block_h, block_d)
    launch(_kernels().indexer_scores_kernel, (-(-n // block_t), -(-s // block_s), b),
        q, k, w, visible, out, s, n, h, di,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        visible.stride(0), out.stride(0), out.stride(1),
        DOT_DT=dot_dt, PREC=dot_precision(dot_dt), BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        BLOCK_S=block_s, num_warps=warps, num_stages=2)
    return out


@register("indexer_topk", "triton", "cuda", available=triton_availability, supports=_supports,
          note="Triton weighted-ReLU MQA scores + torch.topk (set semantics)")
def indexer_topk_triton(q, k, w, visible, topk):
    b, s = q.shape[:2]
    n = k.shape[1]
    kk = min(topk, n)
    out = torch.full((b, s, kk), -1, dtype=torch.int32, device=q.device)
    if kk == 0 or s == 0:
        return out
    step = max(1, SCORE_BUDGET // max(1, b * n))
    for s0 in range(0, s, step):
        vis = visible[:, s0:s0 + step]
        scores = indexer_scores_triton(q[:, s0:s0 + step], k, w[:, s0:s0 + step], vis)
        top = scores.topk(kk, dim=-1).indices
        top = torch.where(top >= vis.unsqueeze(-1).to(top.dtype), -1, top)
        out[:, s0:s0 + step] = top.to(torch.int32)
    return out
