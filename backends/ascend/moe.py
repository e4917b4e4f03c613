"""moe_route -> the hash gating kernel (norm_type 2 = sqrt-softplus, tid2eid hash mode) or torch_npu's gating;
moe_experts -> npu_moe_init_routing_v2 + npu_grouped_matmul, SwiGLU with DeepSeek's clamp, ordered combine.

The router logits are an fp32 product done by torch on the device (the vendor op takes logits); the gating op
does scoring, selection and normalisation. For the experts the vendor ops permute tokens and run the grouped
GEMMs; the SwiGLU clamp (gate clamped above only, up both sides), the routing weight applied before w2 and the
ordered combine (shared expert first, then slots in k order, fp32) are elementwise torch on the device, because
the documented fused SwiGLU ops either quantise their output or use a different clamp (research/ascend.md 3.8).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from dsv4_portable import ops
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK, e8m0_bits, linear_f32
from dsv4_portable.registry import register

from . import chip as chip_mod
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
E8M0 = (torch.float8_e8m0fnu, torch.uint8)       # the MX GEMM's scale dtypes (prepare_weights stores e8m0)


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
    # tid2eid: int32 from prepare_weights, so .int() is a no-op there (a copy only for unprepared tables)
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


def _mx_reasons(name, ew) -> list[str]:
    """Why FP4 experts cannot run the 950's W4A8 MX grouped GEMM (empty when they can)."""
    if chip_mod.chip() != "950":
        return [f"{name} are fp4; MXFP4 arithmetic exists only on the 950 (A2/A3 dequantise at load)"]
    out = []
    if ew.scale_fmt != "ue8m0":
        out.append(f"{name} quantise activations with scale_fmt {ew.scale_fmt!r}; MX scales are e8m0 (ue8m0 only)")
    bad = sorted({str(s.dtype) for s in (ew.s1, ew.s2, ew.s3) if s.dtype not in E8M0})
    if bad:     # decided by dtype alone: reading the values would be a host sync on every dispatch
        out.append(f"{name} scales are {', '.join(bad)}; the MX GEMM reads e8m0 scales (prepare_weights converts "
                   "power-of-two scales at load)")
    if ew.hidden % 128 or ew.inter % 128:
        out.append(f"{name} dims {ew.hidden}/{ew.inter}; the MX path needs multiples of 128 (activation blocks)")
    return out


def _supports_experts(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    reasons = device_reasons(x, idx, weights, experts.w1, None if shared is None else shared.w1)
    for name, ew in (("experts", experts), ("shared", shared)):
        if ew is None:
            continue
        if ew.fmt == "fp4":
            reasons += _mx_reasons(name, ew)
        elif ew.fmt == "fp8" and name == "shared":
            continue                                  # three fp8_linear calls (the registry op), any chip
        elif ew.fmt != "bf16":
            reasons.append(f"{name} are {ew.fmt}; this provider runs bf16 experts, and fp4 ones on the 950 (a "
                           "grouped GEMM for FP8 128x128 blocks is not mapped)")
        elif ew.w1.dtype != x.dtype:
            reasons.append(f"{name} weights are {ew.w1.dtype}, activations {x.dtype}: npu_grouped_matmul needs one "
                           "dtype")
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"activations {x.dtype}; npu_grouped_matmul takes bf16/fp16 (fp32 runs on the reference)")
    if experts.num_experts > 1024:
        reasons.append(f"{experts.num_experts} experts; npu_grouped_matmul takes at most 1024 groups")
    # the shared expert runs the grouped GEMM too (one group) unless it is fp8 (fp8_linear)
    grouped = [experts] + ([shared] if shared is not None and shared.fmt != "fp8" else [])
    if max(max(ew.hidden, ew.inter) for ew in grouped) >= 65536:
        reasons.append("a weight dim >= 65536; npu_grouped_matmul's inner dims are below 65536")
    return reasons


# Every grouped GEMM takes its group_list as a cumsum (group_list_type 0): counts (type 1) may not be a list of
# length 1 (op-plugin torch_npu-npu_grouped_matmul.md), and a one-expert stack (the shared expert, or MC2 with one
# expert per rank) is one group. npu_moe_init_routing_v2 hands out that cumsum itself (expert_tokens_num_type 0).
def _grouped(x_rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows x_rows [M, K] grouped by expert (group g ends at row ends[g]) times bf16/fp16 weights w [E, N, K]."""
    return vendor_ops.call(GMM, [x_rows], [_kn(w)], group_list=ends, split_item=3, group_type=0,
                           group_list_type=0)[0]


def _mx_act(x_rows: torch.Tensor):
    """DeepSeek's activation quantisation (FP8, 1x128 blocks, ue8m0) in the MX GEMM's format: the e8m0 scale of
    each 128-block repeated for its four 32-blocks, [M, K/64, 2] bytes. The same FP8 values and scales as the
    reference, so the products equal fp4_linear's (npu_dynamic_mx_quant would use OCP's 1x32 rule instead)."""
    xq, xs = ops.quant_fp8(x_rows, FP8_LINEAR_BLOCK, "ue8m0")
    m, k = x_rows.shape
    s32 = e8m0_bits(xs).repeat_interleave(FP8_LINEAR_BLOCK // 32, -1)     # ue8m0: powers of two by construction
    return xq, s32.reshape(m, k // 64, 2)


def _mx_grouped(x_rows: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ends: torch.Tensor):
    """W4A8 MX grouped GEMM of rows x_rows [M, K] with FP4 weights w [E, N, K/2] (e8m0 scales s [E, N, K/32]),
    as vllm-ascend's A5 adaptor calls it: weight as the [E, K/2, N] transposed view, scales as the
    [E, K/64, N, 2] view (no copies); group g ends at row ends[g] (a cumsum, as in _grouped)."""
    e, n, kh = w.shape
    xq, xs = _mx_act(x_rows)
    npu = sys.modules["torch_npu"]
    scales = s.view(torch.uint8).reshape(e, n, kh // 32, 2).transpose(1, 2)
    return vendor_ops.call(
        GMM, [xq], [w.view(torch.uint8).transpose(1, 2)], antiquant_scale=[scales], per_token_scale=[xs],
        per_token_scale_dtype=torch.float8_e8m0fnu, group_list=ends, split_item=2, group_type=0, group_list_type=0,
        x_dtype=torch.float8_e4m3fn, weight_dtype=getattr(npu, "float4_e2m1fn_x2", 296), output_dtype=x_rows.dtype)[0]


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
    """The shared expert is one dense MLP over every row: FP8 blocks through the registry's fp8_linear; bf16 and
    FP4 as a one-group grouped GEMM (the routed experts' path, every row in group 0)."""
    if ew.fmt == "fp8":      # V4 checkpoints keep the shared expert in FP8 blocks: the registry's fp8_linear
        lin = lambda t, w, sc: ops.fp8_linear(t, w[0], sc[0], ew.scale_fmt)   # noqa: E731
        h = _swiglu(lin(x, ew.w1, ew.s1), lin(x, ew.w3, ew.s3), None, limit, x.dtype)
        return lin(h, ew.w2, ew.s2)
    return _expert_rows(x, ew, torch.full((1,), x.shape[0], dtype=torch.int64, device=x.device), None, limit)


def _expert_rows(rows, ew, ends, slot_weight, limit):
    """Rows grouped by expert (group g ends at row ends[g]) through w1/w3, SwiGLU with DeepSeek's clamp and the
    routing weight (None: the shared expert), w2."""
    if ew.fmt == "fp4":
        g, u = _mx_grouped(rows, ew.w1, ew.s1, ends), _mx_grouped(rows, ew.w3, ew.s3, ends)
        return _mx_grouped(_swiglu(g, u, slot_weight, limit, rows.dtype), ew.w2, ew.s2, ends)
    h = _swiglu(_grouped(rows, ew.w1, ends), _grouped(rows, ew.w3, ends), slot_weight, limit, rows.dtype)
    return _grouped(h, ew.w2, ends)


@register("moe_experts", "cann", "npu", available=availability(INIT_ROUTING, GMM), supports=_supports_experts,
          note="npu_moe_init_routing_v2 + npu_grouped_matmul on transposed weight views (bf16; on the 950 FP4 "
               "experts through the W4A8 MX mode); ordered combine")
def moe_experts_cann(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    t, k = idx.shape
    # Slots without an expert (-1, EP padding) go to expert 0 with routing weight 0: the weight is applied before
    # w2, so their rows come back exactly 0 and add nothing, as in the reference, without a host-side check.
    routed = idx >= 0
    weights = torch.where(routed, weights.float(), 0.0)
    expanded, row_of_slot, ends, _ = vendor_ops.call(
        INIT_ROUTING, x, idx.clamp_min(0).to(torch.int32), active_num=t * k, expert_num=experts.num_experts,
        expert_tokens_num_type=0, expert_tokens_num_flag=True, row_idx_type=0)
    row_of_slot = row_of_slot.long()
    slot_weight = torch.empty(t * k, dtype=torch.float32, device=x.device)
    slot_weight[row_of_slot] = weights.reshape(-1).float()          # expanded row r carries its slot's weight
    per_slot = _expert_rows(expanded, experts, ends, slot_weight, swiglu_limit)[row_of_slot].view(t, k, -1)
    acc = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if shared is not None:
        acc += _shared_rows(x, shared, swiglu_limit).float()
    for j in range(k):                                                # ordered combine: sequential in k, fp32
        acc += per_slot[:, j].float()
    return acc.to(x.dtype)
