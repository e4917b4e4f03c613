"""moe_route -> the hash gating kernel (norm_type 2 = sqrt-softplus, tid2eid hash mode) or torch_npu's gating;
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

from dsv4_portable.reference.quant import linear_f32
from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

# Gating with DeepSeek V4's sqrt-softplus (norm_type 2) and hash routing: the hash gating kernel, as CANN recipes
# and vllm-ascend build it. torch_npu's own op documents norm_type 0 / 1 only (op-plugin
# torch_npu-npu_moe_gating_top_k.md), so it serves the softmax and sigmoid variants.
GATING_DSV4 = ("custom.npu_moe_gating_top_k", "_C_ascend.moe_gating_top_k_hash")
GATING_TORCH_NPU = ("torch_npu.npu_moe_gating_top_k",)
INIT_ROUTING = ("torch_npu.npu_moe_init_routing_v2", "npu.npu_moe_init_routing_v2")
GMM = ("torch_npu.npu_grouped_matmul", "npu.npu_grouped_matmul")
NORM_TYPE = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


# ----------------------------------------------------------------------------------------------- routing
def _gating_op(score_func: str) -> vendor_ops.Candidates | None:
    """The gating op for this score function on this host and chip, or None."""
    for cands in ((GATING_DSV4,) if score_func == "sqrtsoftplus" else (GATING_DSV4, GATING_TORCH_NPU)):
        if not availability(cands)():
            return cands
    return None


def _route_available() -> list[str]:
    if _gating_op("softmax") is not None:
        return []
    return availability(GATING_DSV4)() + availability(GATING_TORCH_NPU)()


def _supports_route(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    reasons = device_reasons(x, gate_weight, bias, tid2eid, input_ids)
    cands = _gating_op(score_func)
    if cands is None:
        reasons.append(f"{score_func} gating (norm_type {NORM_TYPE[score_func]}) needs "
                       + " or ".join(GATING_DSV4) + "; torch_npu.npu_moe_gating_top_k documents norm_type 0 and 1 "
                       "only: " + "; ".join(availability(GATING_DSV4)()))
    elif tid2eid is not None and not {"input_ids", "tid2eid"} <= (vendor_ops.arg_names(cands) or set()):
        reasons.append(f"{vendor_ops.where(cands)} takes no input_ids / tid2eid (torch_npu 2.10 lacks the hash "
                       "mode): hash-routed layers run elsewhere")
    e = gate_weight.shape[0]
    if e > 2048 or e <= 2:
        reasons.append(f"{e} experts; the gating op takes 3 to 2048")
    if topk > 64:
        reasons.append(f"top-{topk}; the gating op takes k <= 64")
    if x.dtype == torch.float64:
        reasons.append("float64 runs on the reference")
    return reasons


@register("moe_route", "cann", "npu", available=_route_available, supports=_supports_route,
          note="fp32 router logits + custom npu_moe_gating_top_k / _C_ascend.moe_gating_top_k_hash (sqrt-softplus, "
               "hash) or torch_npu.npu_moe_gating_top_k (softmax, sigmoid)")
def moe_route_cann(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    logits = linear_f32(x.float(), gate_weight)          # fp32 product (prepare_weights stores the gate in fp32)
    hash_args = {} if tid2eid is None else {"input_ids": input_ids.long(), "tid2eid": tid2eid.int()}
    # keywords only: the two builds order their arguments differently (torch_binding.cpp vs torch_npu schema)
    w, idx, _ = vendor_ops.call(_gating_op(score_func), logits, topk, bias=None if bias is None else bias.float(),
                                norm_type=NORM_TYPE[score_func], routed_scaling_factor=float(route_scale),
                                **hash_args)
    return w.float(), idx.long()


# ----------------------------------------------------------------------------------------------- experts
def _kn(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] weights as the grouped GEMM's [E, K, N]: a transposed view, no copy (the op takes transposed
    weights; op-plugin torch_npu-npu_grouped_matmul.md "支持weight转置")."""
    return w.transpose(-1, -2)


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
    if experts.num_experts > 1024:
        reasons.append(f"{experts.num_experts} experts; npu_grouped_matmul takes at most 1024 groups")
    if max(experts.hidden, experts.inter) >= 65536:
        reasons.append("a weight dim >= 65536; npu_grouped_matmul's inner dims are below 65536")
    return reasons


def _grouped(x_rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return vendor_ops.call(GMM, [x_rows], [_kn(w)], group_list=counts, split_item=3, group_type=0,
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


def _shared_rows(x: torch.Tensor, ew, limit: float) -> torch.Tensor:
    """The shared expert is one dense MLP over every row: plain matmuls on the device (a one-group
    npu_grouped_matmul would need a group_list of length 1, which group_list_type 1 forbids)."""
    g, u = torch.matmul(x, ew.w1[0].t()), torch.matmul(x, ew.w3[0].t())
    return torch.matmul(_swiglu(g, u, None, limit, x.dtype), ew.w2[0].t())


@register("moe_experts", "cann", "npu", available=availability(INIT_ROUTING, GMM), supports=_supports_experts,
          note="npu_moe_init_routing_v2 + npu_grouped_matmul on transposed weight views; shared expert as dense "
               "matmuls; ordered combine")
def moe_experts_cann(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    t, k = idx.shape
    # Slots without an expert (-1, EP padding) go to expert 0 with routing weight 0: the weight is applied before
    # w2, so their rows come back exactly 0 and add nothing, as in the reference, without a host-side check.
    routed = idx >= 0
    weights = torch.where(routed, weights.float(), 0.0)
    expanded, row_of_slot, counts, _ = vendor_ops.call(
        INIT_ROUTING, x, idx.clamp_min(0).to(torch.int32), active_num=t * k, expert_num=experts.num_experts,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, row_idx_type=0)
    row_of_slot = row_of_slot.long()
    slot_weight = torch.empty(t * k, dtype=torch.float32, device=x.device)
    slot_weight[row_of_slot] = weights.reshape(-1).float()          # expanded row r carries its slot's weight
    h = _swiglu(_grouped(expanded, experts.w1, counts), _grouped(expanded, experts.w3, counts), slot_weight,
                swiglu_limit, x.dtype)
    per_slot = _grouped(h, experts.w2, counts)[row_of_slot].view(t, k, -1)    # back to (token, slot) order
    acc = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if shared is not None:
        acc += _shared_rows(x, shared, swiglu_limit).float()
    for j in range(k):                                                # ordered combine: sequential in k, fp32
        acc += per_slot[:, j].float()
    return acc.to(x.dtype)
