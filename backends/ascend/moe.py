"""moe_route -> npu_moe_gating_top_k (norm_type 2 = sqrt-softplus, tid2eid hash mode);
moe_experts -> npu_moe_init_routing_v2 + npu_grouped_matmul, SwiGLU with DeepSeek's clamp, ordered combine.

The router logits are an fp32 product done by torch on the device (the vendor op takes logits); the gating op
does scoring, selection and normalisation. For the experts the vendor ops permute tokens and run the grouped
GEMMs; the SwiGLU clamp (gate clamped above only, up both sides), the routing weight applied before w2 and the
ordered combine (shared expert first, then slots in k order, fp32) are elementwise torch on the device, because
the documented fused SwiGLU ops either quantise their output or use a different clamp (research/ascend.md 3.8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4_portable.reference.moe import ExpertWeights
from dsv4_portable.reference.quant import linear_f32
from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons, prepared

GATING = ("npu_moe_gating_top_k", ("torch_npu", "custom"))
INIT_ROUTING = ("npu_moe_init_routing_v2", ("torch_npu", "npu"))
GMM = ("npu_grouped_matmul", ("torch_npu", "npu"))
NORM_TYPE = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


# ----------------------------------------------------------------------------------------------- routing
def _supports_route(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    reasons = device_reasons(x, gate_weight, bias, tid2eid, input_ids)
    e = gate_weight.shape[0]
    if e > 2048:
        reasons.append(f"{e} experts; npu_moe_gating_top_k takes at most 2048")
    if topk > 64:
        reasons.append(f"top-{topk}; npu_moe_gating_top_k takes k <= 64")
    if x.dtype == torch.float64:
        reasons.append("float64 runs on the reference")
    return reasons


@register("moe_route", "cann", "npu", available=availability(*GATING), supports=_supports_route,
          note="fp32 router logits + npu_moe_gating_top_k")
def moe_route_cann(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    logits = linear_f32(x.float(), gate_weight)
    hashed = tid2eid is not None
    w, idx, _ = vendor_ops.call(
        *GATING, logits, topk, bias=None if bias is None else bias.float(),
        input_ids=input_ids.long() if hashed else None, tid2eid=tid2eid.int() if hashed else None,
        norm_type=NORM_TYPE[score_func], routed_scaling_factor=float(route_scale))
    return w.float(), idx.long()


# ----------------------------------------------------------------------------------------------- experts
def prepared_experts(ew: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped GEMM's weight layout [E, K, N] (w1, w3: [E, D, I]; w2: [E, I, D]), made once per weight set."""
    return prepared(ew, "gmm [E, K, N]",
                    lambda: tuple(w.transpose(1, 2).contiguous() for w in (ew.w1, ew.w3, ew.w2)))


def _supports_experts(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    reasons = device_reasons(x, idx, weights, experts.w1, None if shared is None else shared.w1)
    for name, ew in (("experts", experts), ("shared", shared)):
        if ew is not None and ew.fmt != "bf16":
            reasons.append(f"{name} are {ew.fmt}; this provider runs bf16 experts (A2/A3 dequantise at load; the "
                           "950 MXFP8 x MXFP4 grouped GEMM mapping is not implemented)")
        elif ew is not None and ew.w1.dtype != x.dtype:
            reasons.append(f"{name} weights are {ew.w1.dtype}, activations {x.dtype}: npu_grouped_matmul needs one "
                           "dtype")
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"activations {x.dtype}; npu_grouped_matmul takes bf16/fp16 (fp32 runs on the reference)")
    return reasons


def _grouped(x_rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return vendor_ops.call(*GMM, [x_rows], [w], group_list=counts, split_item=3, group_type=0,
                           group_list_type=1)[0]


def _swiglu(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor | None, limit: float, dtype) -> torch.Tensor:
    g, u = g.float(), u.float()
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    h = F.silu(g) * u
    if weight is not None:
        h = weight.float().unsqueeze(-1) * h       # routing weight before w2 (DeepSeek V4)
    return h.to(dtype)


def _expert_rows(x_rows, ew, counts, weight, limit):
    w1, w3, w2 = prepared_experts(ew)
    h = _swiglu(_grouped(x_rows, w1, counts), _grouped(x_rows, w3, counts), weight, limit, x_rows.dtype)
    return _grouped(h, w2, counts)


@register("moe_experts", "cann", "npu", available=lambda: availability(*INIT_ROUTING)() + availability(*GMM)(),
          supports=_supports_experts, note="npu_moe_init_routing_v2 + npu_grouped_matmul, ordered combine")
def moe_experts_cann(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    t, k = idx.shape
    # Slots without an expert (-1, EP padding) go to expert 0 with routing weight 0: the weight is applied before
    # w2, so their rows come back exactly 0 and add nothing, as in the reference, without a host-side check.
    routed = idx >= 0
    weights = torch.where(routed, weights.float(), 0.0)
    expanded, row_of_slot, counts, _ = vendor_ops.call(
        *INIT_ROUTING, x, idx.clamp_min(0).to(torch.int32), active_num=t * k, expert_num=experts.num_experts,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, row_idx_type=0)
    row_of_slot = row_of_slot.long()
    slot_weight = torch.empty(t * k, dtype=torch.float32, device=x.device)
    slot_weight[row_of_slot] = weights.reshape(-1).float()          # expanded row r carries its slot's weight
    y = _expert_rows(expanded, experts, counts, slot_weight, swiglu_limit)
    per_slot = y[row_of_slot].view(t, k, -1)                          # back to (token, slot) order
    acc = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if shared is not None:
        all_rows = torch.tensor([t], dtype=torch.int64, device=x.device)
        acc += _expert_rows(x, shared, all_rows, None, swiglu_limit).float()
    for j in range(k):                                                # ordered combine: sequential in k, fp32
        acc += per_slot[:, j].float()
    return acc.to(x.dtype)
