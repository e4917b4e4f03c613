"""Spec of the MoE ops: npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_grouped_matmul
(research/ascend.md 3.6-3.8; torch_npu 2.13 schemas; golden cann-recipes test_npu_moe_gating_top_k.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import (SpecNotModelledError, check_in, check_int, check_tensor, need, require_soc, spec_op)

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SRC_GATE = "torch_npu 2.13 npu_moe_gating_top_k; moe_gating_top_k_hash_tiling.cpp limits"
SRC_INIT = "torch_npu 2.13 npu_moe_init_routing_v2 schema and docstring"
SRC_GMM = "torch_npu 2.13 npu_grouped_matmul schema and docstring"


@spec_op("npu_moe_gating_top_k", ("torch_npu", "custom"), SRC_GATE)
def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """(weights [T, k] in x's dtype, expert_idx int32 [T, k], norm_out): scores = f(x) with norm_type 0 softmax,
    1 sigmoid, 2 sqrt(softplus); experts = top-k of scores + bias (descending), or tid2eid[input_ids] in hash mode;
    weights = scores at those experts, divided by (sum + eps) unless norm_type 0, times routed_scaling_factor.
    norm_out = scores when out_flag, else an empty tensor."""
    op = "npu_moe_gating_top_k"
    require_soc(op, ("A2", "A3", "950"), SRC_GATE)
    check_tensor(op, "x", x, SRC_GATE, dtypes=FLOATS, ndim=2)
    t, e = x.shape
    need(e <= 2048, op, "x", f"has {e} experts", "at most 2048 experts", SRC_GATE)
    check_int(op, "k", k, SRC_GATE, 1, min(64, e), rule=f"1 <= k <= min(64, experts={e})")
    check_int(op, "renorm", renorm, SRC_GATE, 0, 0, rule="renorm only 0")
    check_in(op, "norm_type", norm_type, (0, 1, 2), SRC_GATE)
    check_int(op, "group_count", group_count, SRC_GATE, 1, e)
    need(e % group_count == 0, op, "group_count", f"is {group_count} for {e} experts", "divides the expert count",
         SRC_GATE)
    need(norm_type != 2 or group_count == 1, op, "group_count", f"is {group_count} with norm_type 2",
         "norm_type 2 (sqrt-softplus) requires group_count == 1", SRC_GATE)
    if group_count != 1:
        raise SpecNotModelledError(op, "group-limited selection (group_count > 1)")
    check_tensor(op, "bias", bias, SRC_GATE, dtypes=(torch.float32, x.dtype), ndim=1, optional=True)
    need(bias is None or bias.shape[0] == e, op, "bias", f"has {0 if bias is None else bias.shape[0]} entries",
         f"one per expert ({e})", SRC_GATE)
    need((input_ids is None) == (tid2eid is None), op, "tid2eid" if input_ids is not None else "input_ids",
         "is missing", "hash mode needs both input_ids and tid2eid", SRC_GATE)
    if tid2eid is not None:
        check_tensor(op, "input_ids", input_ids, SRC_GATE, dtypes=(torch.int64,), ndim=1)
        check_tensor(op, "tid2eid", tid2eid, SRC_GATE, dtypes=(torch.int32,), ndim=2)
        need(input_ids.shape[0] == t, op, "input_ids", f"has {input_ids.shape[0]} ids", f"one per row of x ({t})",
             SRC_GATE)
        need(tid2eid.shape[1] == k, op, "tid2eid", f"has shape {list(tid2eid.shape)}", f"[vocab, k={k}]", SRC_GATE)
    xf = x.float()
    scores = {0: lambda: torch.softmax(xf, -1), 1: lambda: torch.sigmoid(xf),
              2: lambda: F.softplus(xf).sqrt()}[norm_type]()
    if tid2eid is not None:
        idx = tid2eid[input_ids].long()
    else:
        idx = (scores if bias is None else scores + bias.float()).topk(k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_type != 0:
        w = w / (w.sum(-1, keepdim=True) + eps)
    w = w * routed_scaling_factor
    norm_out = scores if out_flag else torch.empty(0, dtype=torch.float32)
    return w.to(x.dtype), idx.to(torch.int32), norm_out


@spec_op("npu_moe_init_routing_v2", ("torch_npu", "npu"), SRC_INIT)
def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0):  # noqa: B006 (vendor default)
    """(expanded_x, expanded_row_idx, expert_tokens, expanded_scale): the T*k (token, slot) pairs sorted stably by
    expert id (slot order t*k + j within an expert); expanded_x[r] = x[source(r) // k]. Only experts in
    active_expert_range [start, end) are kept (all when empty). expanded_row_idx: row_idx_type 0 gives, per
    source slot, its row in expanded_x (-1 when dropped); 1 gives, per expanded row, its source slot.
    expert_tokens (when expert_tokens_num_flag): per expert of the range, counts (type 1) or their cumsum (type 0)."""
    op = "npu_moe_init_routing_v2"
    require_soc(op, ("A2", "A3", "950"), SRC_INIT)
    check_tensor(op, "x", x, SRC_INIT, dtypes=FLOATS + (torch.int8,), ndim=2)
    check_tensor(op, "expert_idx", expert_idx, SRC_INIT, dtypes=(torch.int32,), ndim=2)
    t, k = expert_idx.shape
    need(x.shape[0] == t, op, "expert_idx", f"has {t} rows", f"one per row of x ({x.shape[0]})", SRC_INIT)
    check_int(op, "expert_num", expert_num, SRC_INIT, 1, 2048, rule="the number of experts, 1..2048")
    check_int(op, "drop_pad_mode", drop_pad_mode, SRC_INIT, 0, 1)
    check_in(op, "expert_tokens_num_type", expert_tokens_num_type, (0, 1, 2), SRC_INIT)
    check_in(op, "quant_mode", quant_mode, (-1, 0, 1), SRC_INIT)
    check_in(op, "row_idx_type", row_idx_type, (0, 1), SRC_INIT)
    if drop_pad_mode != 0 or expert_capacity not in (-1, 0):
        raise SpecNotModelledError(op, "drop/pad mode with an expert capacity")
    if quant_mode != -1 or scale is not None or offset is not None:
        raise SpecNotModelledError(op, "quantising routing (quant_mode 0/1, scale, offset)")
    if expert_tokens_num_type == 2:
        raise SpecNotModelledError(op, "key-value expert token counts (expert_tokens_num_type 2)")
    lo, hi = (active_expert_range or [0, expert_num])
    need(0 <= lo < hi <= expert_num, op, "active_expert_range", f"is {active_expert_range}",
         f"[start, end) within [0, expert_num={expert_num}]", SRC_INIT)
    ids = expert_idx.reshape(-1).long()
    need(bool(((ids >= 0) & (ids < expert_num)).all()), op, "expert_idx", "has ids outside [0, expert_num)",
         "every id in [0, expert_num)", SRC_INIT)
    need(active_num in (-1, t * k) or 0 < active_num, op, "active_num", f"is {active_num}", "-1 or > 0", SRC_INIT)
    order = torch.sort(ids, stable=True).indices
    kept = order[(ids[order] >= lo) & (ids[order] < hi)]
    expanded_x = x[kept // k]
    if row_idx_type == 1:
        row_idx = kept.to(torch.int32)
    else:
        row_idx = torch.full((t * k,), -1, dtype=torch.int32, device=x.device)
        row_idx[kept] = torch.arange(kept.numel(), dtype=torch.int32, device=x.device)
    counts = torch.bincount(ids[kept] - lo, minlength=hi - lo).to(torch.int64)
    expert_tokens = (counts if expert_tokens_num_type == 1 else counts.cumsum(0)) if expert_tokens_num_flag \
        else torch.empty(0, dtype=torch.int64)
    return expanded_x, row_idx, expert_tokens, torch.empty(0, dtype=torch.float32)


@spec_op("npu_grouped_matmul", ("torch_npu", "npu"), SRC_GMM)
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """[y]: the MoE mode (one x [M, K] split along M by group_list, one weight [E, K, N]): rows of group g times
    weight[g]. bf16/fp16 operands: fp32 accumulation, output in x's dtype. int8 operands (W8A8): int32 products
    dequantised by scale [E, N] (per channel) and per_token_scale [M], output output_dtype (bf16)."""
    op = "npu_grouped_matmul"
    require_soc(op, ("A2", "A3", "950"), SRC_GMM)
    need(isinstance(x, (list, tuple)) and len(x) == 1, op, "x", f"is {type(x).__name__} of "
         f"{len(x) if isinstance(x, (list, tuple)) else '?'}", "a list of one tensor in the MoE mode (split_item "
         "2 or 3, group_type 0)", SRC_GMM)
    need(isinstance(weight, (list, tuple)) and len(weight) == 1, op, "weight", "is not a list of one tensor",
         "a list of one [E, K, N] tensor in the MoE mode", SRC_GMM)
    check_in(op, "split_item", split_item, (2, 3), SRC_GMM, "2 or 3 (one output tensor) in the MoE mode")
    check_in(op, "group_type", group_type, (0,), SRC_GMM, "0 (split along M) in the MoE mode")
    check_in(op, "group_list_type", group_list_type, (0, 1), SRC_GMM, "0 cumsum, 1 per-group counts")
    check_in(op, "act_type", act_type, (0,), SRC_GMM, "0 (no fused activation; the spec models no other)")
    xs, w = x[0], weight[0]
    quant = xs.dtype == torch.int8
    check_tensor(op, "x[0]", xs, SRC_GMM, dtypes=(torch.bfloat16, torch.float16, torch.int8), ndim=2)
    check_tensor(op, "weight[0]", w, SRC_GMM, dtypes=(torch.int8,) if quant else (xs.dtype,), ndim=3)
    e, kdim, n = w.shape
    need(xs.shape[1] == kdim, op, "weight[0]", f"has K={kdim}", f"x's K={xs.shape[1]} ([E, K, N] layout)", SRC_GMM)
    check_tensor(op, "group_list", group_list, SRC_GMM, dtypes=(torch.int64,), ndim=1)
    need(group_list.shape[0] == e, op, "group_list", f"has {group_list.shape[0]} entries", f"one per group ({e})",
         SRC_GMM)
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    need(bool((counts >= 0).all()) and int(counts.sum()) <= xs.shape[0], op, "group_list",
         f"is {group_list.tolist()}", "non-negative counts (type 1) or a non-decreasing cumsum (type 0) within M",
         SRC_GMM)
    if quant:
        check_tensor(op, "scale", scale[0] if isinstance(scale, (list, tuple)) else scale, SRC_GMM,
                     dtypes=(torch.float32, torch.bfloat16), ndim=2)
        check_tensor(op, "per_token_scale", per_token_scale[0] if isinstance(per_token_scale, (list, tuple))
                     else per_token_scale, SRC_GMM, dtypes=(torch.float32,), ndim=1)
        check_in(op, "output_dtype", output_dtype, (torch.bfloat16, torch.float16), SRC_GMM)
    elif any(v is not None for v in (scale, per_token_scale, antiquant_scale, offset, antiquant_offset)):
        raise SpecNotModelledError(op, "scales with float operands (antiquant / weight-only modes)")
    if bias is not None:
        raise SpecNotModelledError(op, "bias")
    y = torch.zeros(xs.shape[0], n, dtype=output_dtype if quant else xs.dtype, device=xs.device)
    start = 0
    for g, c in enumerate(counts.tolist()):
        rows = slice(start, start + c)
        if quant:
            s = scale[0] if isinstance(scale, (list, tuple)) else scale
            pts = per_token_scale[0] if isinstance(per_token_scale, (list, tuple)) else per_token_scale
            acc = (xs[rows].to(torch.int64) @ w[g].to(torch.int64)).double()
            y[rows] = (acc * s[g].double() * pts[rows].double().unsqueeze(-1)).to(y.dtype)
        else:
            y[rows] = (xs[rows].float() @ w[g].float()).to(y.dtype)
        start += c
    return [y]
