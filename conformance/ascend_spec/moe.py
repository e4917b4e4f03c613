"""Spec of the MoE ops: npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_grouped_matmul
(research/ascend.md 3.6-3.8; torch_npu 2.13 schemas; golden cann-recipes test_npu_moe_gating_top_k.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import (SpecNotModelledError, check_contiguous, check_in, check_int, check_tensor, need, placeholder,
                       require_soc, spec_op)

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
SRC_GATE = ("op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_gating_top_k.md (norm_type 0 softmax, "
            "1 sigmoid; A2/A3); golden code in that doc")
SRC_GATE_HASH = ("vllm-ascend csrc/torch_binding.cpp moe_gating_top_k_hash + csrc/moe/moe_gating_top_k_hash "
                 "(def.cpp: ascend910b, ascend910_93, ascend950; tiling: norm_type 2 = sqrt(softplus) needs "
                 "group_count 1); cann-recipes custom_ops npu_moe_gating_top_k (same kernel and arguments)")
SRC_INIT = "op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_init_routing_v2.md"
SRC_GMM = "op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_grouped_matmul.md"
SRC_GMM_MX = ("vllm-ascend device/device_op.py A5DeviceAdaptor (W4A8 MXFP: x_dtype float8_e4m3fn, weight_dtype "
              "float4_e2m1fn_x2, per_token_scale_dtype float8_e8m0fnu, split_item 2, group_type 0), "
              "quantization/methods/w4a8_mxfp4.py (weights transposed to [E, K/2, N], scales (E, N, K/64, 2) "
              "transposed to [E, K/64, N, 2]); torch_npu npu_dynamic_mx_quant scale layout [.., K/64, 2]")
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
SCORE = {0: lambda x: torch.softmax(x, -1), 1: torch.sigmoid, 2: lambda x: F.softplus(x).sqrt()}


def _gating(op, src, x, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode, renorm, norm_type,
            out_flag, routed_scaling_factor, eps, norm_types):
    """The gating contract shared by the three entry points; norm_types: the score functions that entry point
    documents. Returns (weights [T, k] in x's dtype, expert_idx int32 [T, k], norm_out fp32 [T, E])."""
    check_tensor(op, "x", x, src, dtypes=FLOATS, ndim=2)
    t, e = x.shape
    need(e <= 2048, op, "x", f"has {e} experts", "at most 2048 experts", src)
    check_in(op, "norm_type", norm_type, norm_types, src,
             " / ".join({0: "0 softmax", 1: "1 sigmoid", 2: "2 sqrt(softplus)"}[n] for n in norm_types))
    check_int(op, "renorm", renorm, src, 0, 0, rule="renorm only 0")
    check_in(op, "group_select_mode", group_select_mode, (0, 1), src)
    check_int(op, "group_count", group_count, src, 1, e)
    need(e % group_count == 0 and e // group_count > 2, op, "group_count", f"is {group_count} for {e} experts",
         "divides the expert count, more than 2 experts per group", src)
    check_int(op, "k_group", k_group, src, 1, group_count)
    check_int(op, "k", k, src, 1, min(64, e // group_count * k_group),
              rule=f"1 <= k <= min(64, experts / group_count * k_group = {e // group_count * k_group})")
    need(norm_type != 2 or group_count == 1, op, "group_count", f"is {group_count} with norm_type 2",
         "norm_type 2 (sqrt-softplus) requires group_count == 1", src)
    need(isinstance(eps, float) and eps > 0, op, "eps", f"is {eps!r}", "a float > 0", src)
    need(isinstance(routed_scaling_factor, float) and routed_scaling_factor > 0, op, "routed_scaling_factor",
         f"is {routed_scaling_factor!r}", "a float > 0", src)
    if group_count != 1:
        raise SpecNotModelledError(op, "group-limited selection (group_count > 1)")
    check_tensor(op, "bias", bias, src, dtypes=(x.dtype,), ndim=1, optional=True)
    need(bias is None or bias.shape[0] == e, op, "bias", f"has {0 if bias is None else bias.shape[0]} entries",
         f"one per expert ({e})", src)
    need((input_ids is None) == (tid2eid is None), op, "tid2eid" if input_ids is not None else "input_ids",
         "is missing", "hash mode needs both input_ids and tid2eid", src)
    if tid2eid is not None:
        check_tensor(op, "input_ids", input_ids, src, dtypes=INDEX_DTYPES, ndim=1)
        check_tensor(op, "tid2eid", tid2eid, src, dtypes=INDEX_DTYPES, ndim=2)
        need(input_ids.shape[0] == t, op, "input_ids", f"has {input_ids.shape[0]} ids", f"one per row of x ({t})", src)
        need(tid2eid.shape[1] == k, op, "tid2eid", f"has shape {list(tid2eid.shape)}", f"[vocab, k={k}]", src)
    scores = SCORE[norm_type](x.float())
    if tid2eid is not None:
        idx = tid2eid[input_ids.long()].long()
    else:
        idx = (scores if bias is None else scores + bias.float()).topk(k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_type != 0:
        w = w / (w.sum(-1, keepdim=True) + eps)
    w = w * routed_scaling_factor
    norm_out = scores if out_flag else placeholder((t, e), torch.float32, x.device)   # always allocated
    return w.to(x.dtype), idx.to(torch.int32), norm_out


@spec_op("npu_moe_gating_top_k", ("torch_npu",), SRC_GATE)
def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """torch_npu's gating (2.13 signature; 2.10 lacks input_ids / tid2eid): scores softmax (norm_type 0) or
    sigmoid (1); experts = top-k of scores + bias, or tid2eid[input_ids] in hash mode; weights = scores at those
    experts, divided by (sum + eps) for sigmoid, times routed_scaling_factor; norm_out [T, E] fp32 is always
    allocated and holds the scores only with out_flag. sqrt-softplus (DeepSeek V4) is not documented here."""
    op = "npu_moe_gating_top_k"
    # Doc table: A2/A3. The 950 is an assumption: vllm-ascend's A5 adaptor calls it (device_op.py).
    require_soc(op, ("A2", "A3", "950"), SRC_GATE)
    return _gating(op, SRC_GATE, x, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode, renorm,
                   norm_type, out_flag, routed_scaling_factor, eps, (0, 1))


@spec_op("npu_moe_gating_top_k", ("custom",), SRC_GATE_HASH)
def custom_npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                                group_select_mode=0, renorm=0, norm_type=0, out_flag=False,
                                routed_scaling_factor=1.0, eps=1e-20):
    """CANN recipes' build of the hash gating kernel: as torch_npu's, plus norm_type 2 = sqrt(softplus), whose
    weights are normalised by (sum + eps) like sigmoid's."""
    op = "npu_moe_gating_top_k"
    require_soc(op, ("A2", "A3", "950"), SRC_GATE_HASH)
    return _gating(op, SRC_GATE_HASH, x, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                   renorm, norm_type, out_flag, routed_scaling_factor, eps, (0, 1, 2))


@spec_op("moe_gating_top_k_hash", ("_C_ascend",), SRC_GATE_HASH)
def moe_gating_top_k_hash(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                          routed_scaling_factor=1.0, eps=1e-20, group_select_mode=0, renorm=0, norm_type=0,
                          out_flag=False):
    """vllm-ascend's build of the same kernel (schema order differs from torch_npu's: no keyword-only marker,
    routed_scaling_factor and eps before group_select_mode); semantics as custom npu_moe_gating_top_k."""
    op = "moe_gating_top_k_hash"
    require_soc(op, ("A2", "A3", "950"), SRC_GATE_HASH)
    return _gating(op, SRC_GATE_HASH, x, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                   renorm, norm_type, out_flag, routed_scaling_factor, eps, (0, 1, 2))


@spec_op("npu_moe_init_routing_v2", ("torch_npu", "npu"), SRC_INIT)
def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0):  # noqa: B006 (vendor default)
    """(expanded_x, expanded_row_idx, expert_tokens, expanded_scale): the T*k (token, slot) pairs sorted stably by
    expert id (slot order t*k + j within an expert); expanded_x[r] = x[source(r) // k]. Only experts in
    active_expert_range [start, end) are kept (all when empty). expanded_row_idx: row_idx_type 0 gives, per
    source slot, its row in expanded_x (-1 when dropped); 1 gives, per expanded row, its source slot.
    expert_tokens (when expert_tokens_num_flag): per expert of the range, counts (type 1) or their cumsum (type 0).
    expanded_scale: fp32 [T] always allocated; without `scale` its values are undefined ("无意义")."""
    op = "npu_moe_init_routing_v2"
    # Doc table: A2/A3 (+ Atlas inference). The 950 is an assumption: vllm-ascend's A5 adaptor calls it.
    require_soc(op, ("A2", "A3", "950"), SRC_INIT)
    check_tensor(op, "x", x, SRC_INIT, dtypes=FLOATS + (torch.int8,), ndim=2)
    check_tensor(op, "expert_idx", expert_idx, SRC_INIT, dtypes=(torch.int32,), ndim=2)
    t, k = expert_idx.shape
    need(x.shape[0] == t, op, "expert_idx", f"has {t} rows", f"one per row of x ({x.shape[0]})", SRC_INIT)
    check_in(op, "expert_tokens_num_type", expert_tokens_num_type, (0, 1, 2), SRC_INIT)
    hi_experts = 5120 if expert_tokens_num_type == 2 else 10240
    check_int(op, "expert_num", expert_num, SRC_INIT, 0, hi_experts,
              rule=f"[0, {hi_experts}] (key-value mode 5120)")
    check_int(op, "drop_pad_mode", drop_pad_mode, SRC_INIT, 0, 1)
    check_in(op, "quant_mode", quant_mode, (-1, 0, 1, 2, 3, 6, 7, 8, 9, 11, 12, 13, 16, 17), SRC_INIT)
    check_in(op, "row_idx_type", row_idx_type, (0, 1), SRC_INIT)
    check_int(op, "active_num", active_num, SRC_INIT, -1, None, rule=">= -1 (-1 and 0: every row) in dropless mode")
    if drop_pad_mode != 0 or expert_capacity not in (-1, 0):
        raise SpecNotModelledError(op, "drop/pad mode with an expert capacity")
    if quant_mode != -1 or scale is not None or offset is not None:
        raise SpecNotModelledError(op, "quantising routing (quant_mode >= 0, scale, offset)")
    if expert_tokens_num_type == 2:
        raise SpecNotModelledError(op, "key-value expert token counts (expert_tokens_num_type 2)")
    if active_num not in (-1, 0) and active_num < t * k:
        raise SpecNotModelledError(op, "the active mode (active_num below T*k rows)")
    lo, hi = (active_expert_range or [0, expert_num])
    need(0 <= lo < hi <= expert_num, op, "active_expert_range", f"is {active_expert_range}",
         f"[start, end) within [0, expert_num={expert_num}]", SRC_INIT)
    ids = expert_idx.reshape(-1).long()
    need(bool(((ids >= 0) & (ids < expert_num)).all()), op, "expert_idx", "has ids outside [0, expert_num)",
         "every id in [0, expert_num)", SRC_INIT)
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
    return expanded_x, row_idx, expert_tokens, placeholder((t,), torch.float32, x.device)


def _group_counts(op, group_list, group_list_type, e, m, src) -> list[int]:
    """Rows per group from group_list (int64 [E], one entry per group): the counts (group_list_type 1, which may
    not be a list of length 1) or their cumsum (0), non-negative and covering exactly the M rows of x."""
    check_tensor(op, "group_list", group_list, src, dtypes=(torch.int64,), ndim=1)
    vals = group_list.tolist()
    need(len(vals) == e, op, "group_list", f"has {len(vals)} entries", f"one per group ({e})", src)
    need(all(c >= 0 for c in vals), op, "group_list", f"is {vals}", "non-negative entries", src)
    if group_list_type == 1:
        need(len(vals) != 1, op, "group_list", "has length 1", "with group_list_type 1, not of length 1", src)
        need(sum(vals) == m, op, "group_list", f"is {vals}", f"counts summing to M={m}", src)
        return vals
    need(all(b >= a for a, b in zip(vals, vals[1:])) and vals[-1] == m, op, "group_list", f"is {vals}",
         f"a non-decreasing cumsum ending at M={m}", src)
    return [b - a for a, b in zip([0] + vals, vals)]


@spec_op("npu_grouped_matmul", ("torch_npu", "npu"), SRC_GMM)
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """[y]: the MoE mode ("单单单", group_type 0: one x [M, K] split along M by group_list, one weight [E, K, N],
    one y [M, N]): rows of group g times weight[g]. bf16/fp16 operands: fp32 accumulation, output in x's dtype.
    int8 operands (W8A8): int32 products dequantised by scale [E, N] (per channel) and per_token_scale [M], output
    output_dtype (bf16). weight may be a transposed view (stride [.., 1, K]); x may not."""
    op = "npu_grouped_matmul"
    # Doc table: A2/A3 (+ Atlas inference). The 950 is an assumption: vllm-ascend's A5 adaptor calls it (MX modes).
    require_soc(op, ("A2", "A3", "950"), SRC_GMM)
    need(isinstance(x, (list, tuple)) and len(x) == 1, op, "x", f"is {type(x).__name__} of "
         f"{len(x) if isinstance(x, (list, tuple)) else '?'}", "a list of one tensor in the MoE mode (split_item "
         "2 or 3, group_type 0)", SRC_GMM)
    need(isinstance(weight, (list, tuple)) and len(weight) == 1, op, "weight", "is not a list of one tensor",
         "a list of one [E, K, N] tensor in the MoE mode", SRC_GMM)
    check_in(op, "split_item", split_item, (2, 3), SRC_GMM, "2 or 3 (one output tensor) in the MoE mode")
    check_in(op, "group_type", group_type, (0,), SRC_GMM, "0 (split along M) in the MoE mode")
    check_in(op, "group_list_type", group_list_type, (0, 1), SRC_GMM, "0 cumsum, 1 per-group counts (2 int8 only)")
    check_in(op, "act_type", act_type, (0,), SRC_GMM, "0 (no fused activation; the spec models no other)")
    xs, w = x[0], weight[0]
    if isinstance(xs, torch.Tensor) and xs.dtype == torch.float8_e4m3fn:
        return [_mx_grouped_matmul(op, xs, w, group_list, group_list_type, antiquant_scale, per_token_scale,
                                   scale, bias, offset, antiquant_offset, output_dtype, x_dtype, weight_dtype,
                                   per_token_scale_dtype)]
    quant = xs.dtype == torch.int8
    check_tensor(op, "x[0]", xs, SRC_GMM, dtypes=(torch.bfloat16, torch.float16, torch.int8), ndim=2)
    check_contiguous(op, "x[0]", xs, SRC_GMM)                                  # "x不支持转置"
    check_tensor(op, "weight[0]", w, SRC_GMM, dtypes=(torch.int8,) if quant else (xs.dtype,), ndim=3)
    transposed = check_contiguous(op, "weight[0]", w, SRC_GMM, allow_transposed=True)   # "支持weight转置"
    e, kdim, n = w.shape
    need(xs.shape[1] == kdim, op, "weight[0]", f"has K={kdim}", f"x's K={xs.shape[1]} ([E, K, N] layout)", SRC_GMM)
    inner = kdim if transposed else n
    need(xs.shape[1] < 65536 and inner < 65536, op, "weight[0]" if inner >= 65536 else "x[0]",
         f"has an inner (last) dim of {max(xs.shape[1], inner)}", "every last dim below InnerLimit 65536", SRC_GMM)
    m = xs.shape[0]
    counts = _group_counts(op, group_list, group_list_type, e, m, SRC_GMM)
    need(e <= 1024, op, "group_list", f"has {e} groups", "at most 1024 groups", SRC_GMM)
    if quant:
        check_tensor(op, "scale", scale[0] if isinstance(scale, (list, tuple)) else scale, SRC_GMM,
                     dtypes=(torch.float32, torch.bfloat16), ndim=2)
        check_tensor(op, "per_token_scale", per_token_scale[0] if isinstance(per_token_scale, (list, tuple))
                     else per_token_scale, SRC_GMM, dtypes=(torch.float32,), ndim=1)
        check_in(op, "output_dtype", output_dtype, (torch.bfloat16, torch.float16), SRC_GMM)
    elif any(v is not None for v in (scale, per_token_scale, antiquant_scale, offset, antiquant_offset)):
        raise SpecNotModelledError(op, "scales with float operands (antiquant / weight-only / MX modes)")
    if bias is not None:
        raise SpecNotModelledError(op, "bias")
    y = torch.zeros(m, n, dtype=output_dtype if quant else xs.dtype, device=xs.device)
    start = 0
    for g, c in enumerate(counts):
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


def _e8m0(t: torch.Tensor) -> torch.Tensor:
    """e8m0 scale bytes (uint8 or float8_e8m0fnu) -> fp32 powers of two (255 = NaN in OCP MX)."""
    b = (t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t).to(torch.int32)
    return torch.where(b == 255, torch.tensor(float("nan")), torch.exp2((b - 127).float()))


def _mx_grouped_matmul(op, xs, w, group_list, group_list_type, antiquant_scale, per_token_scale, scale, bias,
                       offset, antiquant_offset, output_dtype, x_dtype, weight_dtype, per_token_scale_dtype):
    """W4A8 MX mode (950): x float8_e4m3fn [M, K] with per_token_scale e8m0 [M, K/64, 2] (one per 32 of K);
    weight MXFP4 uint8 [E, K/2, N], a transposed view of [E, N, K/2] storage packed along K (element 2j in the low
    nibble, the checkpoint's and OCP's order: an assumption), antiquant_scale e8m0 [E, K/64, N, 2]. y[m, n] =
    sum_k x[m, k] sx[m, k/32] * w[k, n] sw[k/32, n] in fp32, output output_dtype."""
    from .contract import check_dtype_arg
    require_soc(op, ("950",), SRC_GMM_MX)
    check_dtype_arg(op, "x_dtype", x_dtype, ("float8_e4m3fn",), SRC_GMM_MX)
    check_dtype_arg(op, "weight_dtype", weight_dtype, ("float4_e2m1fn_x2",), SRC_GMM_MX)
    check_dtype_arg(op, "per_token_scale_dtype", per_token_scale_dtype, ("float8_e8m0fnu",), SRC_GMM_MX)
    need(scale is None and bias is None and offset is None and antiquant_offset is None, op, "scale", "is given",
         "no scale / bias / offsets in the W4A8 MX mode", SRC_GMM_MX)
    check_in(op, "output_dtype", output_dtype, (torch.bfloat16, torch.float16), SRC_GMM_MX)
    check_tensor(op, "x[0]", xs, SRC_GMM_MX, ndim=2)
    check_contiguous(op, "x[0]", xs, SRC_GMM_MX)
    m, k = xs.shape
    need(k % 64 == 0, op, "x[0]", f"has K={k}", "K a multiple of 64 (scales in pairs of 32-blocks)", SRC_GMM_MX)
    check_tensor(op, "weight[0]", w, SRC_GMM_MX, dtypes=(torch.uint8, torch.int8), ndim=3)
    need(not w.is_contiguous() and w.transpose(1, 2).is_contiguous(), op, "weight[0]",
         f"has stride {list(w.stride())}", "[E, K/2, N] as the transpose of contiguous [E, N, K/2] (packed along K)",
         SRC_GMM_MX)
    e, kh, n = w.shape
    need(kh * 2 == k, op, "weight[0]", f"has K/2={kh}", f"x's K/2 = {k // 2}", SRC_GMM_MX)
    sx = per_token_scale[0] if isinstance(per_token_scale, (list, tuple)) else per_token_scale
    sw = antiquant_scale[0] if isinstance(antiquant_scale, (list, tuple)) else antiquant_scale
    check_tensor(op, "per_token_scale", sx, SRC_GMM_MX, dtypes=(torch.uint8, torch.float8_e8m0fnu), ndim=3)
    need(tuple(sx.shape) == (m, k // 64, 2), op, "per_token_scale", f"has shape {list(sx.shape)}",
         f"[M, K/64, 2] = [{m}, {k // 64}, 2]", SRC_GMM_MX)
    check_tensor(op, "antiquant_scale", sw, SRC_GMM_MX, dtypes=(torch.uint8, torch.float8_e8m0fnu), ndim=4)
    need(tuple(sw.shape) == (e, k // 64, n, 2), op, "antiquant_scale", f"has shape {list(sw.shape)}",
         f"[E, K/64, N, 2] = [{e}, {k // 64}, {n}, 2]", SRC_GMM_MX)
    counts = _group_counts(op, group_list, group_list_type, e, m, SRC_GMM_MX)
    xd = xs.float() * _e8m0(sx).reshape(m, k // 32).repeat_interleave(32, -1)
    packed = w.transpose(1, 2).reshape(e, n, kh).view(torch.uint8).long()            # [E, N, K/2]
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(e, n, k)
    wd = FP4_VALUES[codes] * _e8m0(sw).permute(0, 2, 1, 3).reshape(e, n, k // 32).repeat_interleave(32, -1)
    y = torch.zeros(m, n, dtype=output_dtype, device=xs.device)
    start = 0
    for g, c in enumerate(counts):
        y[start:start + c] = (xd[start:start + c] @ wd[g].t()).to(output_dtype)
        start += c
    return y
