"""Triton provider of moe_route (kernels in routing_kernels.py): gate GEMM with split-K partials, then scoring,
top-k selection (in-kernel argmax rounds, no torch.topk) or hash lookup, and weight normalisation in one
kernel. Outputs like the reference: weights fp32 [T, K], expert ids int64 [T, K].

Not checked on the device (it would need a host sync): that tid2eid entries are valid expert ids. The
reference raises on an out-of-range id (gather); this provider gives such a slot weight 0.
"""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import (cdiv, contiguous_reasons, dot_mode, dtype_reasons, fp32_reasons, next_pow2, num_sms,
                             unit_last_stride_reasons)

MAX_EXPERTS = 1024      # all of a token's scores live in one program's registers
BLOCK_E = 64
BLOCK_K = 64
MAX_SPLIT = 16          # K splits of the gate GEMM (decode); the select kernel reduces them in one tile
SCORE_IDS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}


def _kernels():
    from . import routing_kernels
    return routing_kernels


def _supports(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    reasons = device_reasons(x, gate_weight, bias, tid2eid, input_ids)
    reasons += dtype_reasons(x=x, gate_weight=gate_weight) + fp32_reasons(bias=bias)
    reasons += contiguous_reasons(gate_weight=gate_weight, bias=bias, input_ids=input_ids)
    reasons += unit_last_stride_reasons(x=x, tid2eid=tid2eid)
    if gate_weight.shape[0] > MAX_EXPERTS:
        reasons.append(f"{gate_weight.shape[0]} experts > {MAX_EXPERTS} (a token's scores must fit one program)")
    return reasons


@register("moe_route", "triton", "cuda", available=triton_availability, supports=_supports,
          note="Triton split-K gate GEMM + fused scoring, argmax top-k / hash lookup, normalisation")
def moe_route_triton(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    k_mod = _kernels()
    t, d = x.shape
    e = gate_weight.shape[0]
    weights = torch.empty(t, topk, dtype=torch.float32, device=x.device)
    idx = torch.empty(t, topk, dtype=torch.int64, device=x.device)
    if t == 0:
        return weights, idx
    upcast, precision = dot_mode(x.dtype, gate_weight.dtype)
    block_t = 16 if t <= 16 else 64
    t_blocks, e_blocks = cdiv(t, block_t), cdiv(e, BLOCK_E)
    k_blocks = max(1, cdiv(d, BLOCK_K))
    n_split = max(1, min(k_blocks, 2 * num_sms(x.device) // (t_blocks * e_blocks), MAX_SPLIT))
    k_per_split = cdiv(k_blocks, n_split) * BLOCK_K
    n_split = max(1, cdiv(d, k_per_split))
    # every (split, token, expert) partial is written by the GEMM; D = 0 leaves all logits 0
    part = (torch.empty if d else torch.zeros)(n_split, t, e, dtype=torch.float32, device=x.device)
    if d:
        launch(k_mod.route_logits_kernel, (t_blocks, e_blocks, n_split), x, gate_weight, part, t, e, d, x.stride(0),
               k_per_split, BLOCK_T=block_t, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K, UPCAST=upcast, PRECISION=precision,
               num_warps=4)
    hashed = tid2eid is not None
    block_e = next_pow2(e)
    split_p = next_pow2(n_split)
    sel_t = max(1, min(16, next_pow2(t), 4096 // (block_e * split_p)))
    launch(k_mod.route_select_kernel, (cdiv(t, sel_t),), part, part if bias is None else bias,
           tid2eid if hashed else idx, input_ids if hashed else idx, weights, idx, t, e, n_split, float(route_scale),
           tid2eid.stride(0) if hashed else 0, K=topk, SCORE=SCORE_IDS[score_func], HAS_BIAS=bias is not None,
           HASH=hashed, BLOCK_T=sel_t, BLOCK_E=block_e, BLOCK_K=next_pow2(topk), SPLIT_P=split_p,
           num_warps=4 if sel_t * split_p * block_e <= 4096 else 8)
    return weights, idx
