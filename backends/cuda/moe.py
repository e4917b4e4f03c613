"""Triton provider of `moe_experts`: grouped expert GEMMs with the SwiGLU epilogue and the ordered combine.

Flow (no host syncs; every size below is known from shapes):
1. Tile plan (`route_plan`, torch ops on the device): the T*K (token, slot) pairs are sorted by expert with a
   stable sort, each expert's run is cut into tiles of MOE_BLOCK_M rows; tile i knows its expert, its first
   row in the sorted order and its row count. The grid has cdiv(T*K, BLOCK_M) + min(E, T*K) tiles, an upper
   bound of the tiles needed; unused tiles exit at once. Slot ids with idx -1 (or outside [0, E)) get no tile.
2. Quantised formats: x is quantised once per token (the registry's quant_fp8, blocks of 128).
3. Gate/up: one grouped launch computes g = x @ w1^T and u = x @ w3^T for a tile and 128 columns of the
   intermediate dim, rounds both to the activation dtype (as the reference's linears return them), clamps
   (u to +-L, g to <= L), h = silu(g) * u, multiplies the routing weight in BEFORE the down projection, rounds
   h to the activation dtype and, for fp8/fp4 experts, quantises h to fp8 in the epilogue (the 128 columns
   of a tile are exactly one activation-quant block). h is written per slot.
4. Down: one grouped launch y[slot] = h[slot] @ w2^T, in the activation dtype.
5. The shared expert runs through the same two kernels (one expert, every token, no routing weight), its down
   projection with narrower column tiles (SHARED_DOWN_CFG) so that decode spreads w2 over more programs.
6. Ordered combine (one kernel): out[t] = act(0 + shared[t] + y[t, 0] + ... + y[t, K-1]) in fp32, slots with
   idx -1 contributing +0, exactly the reference's ordered_combine.

Batch invariance (the contract): a row's result must not depend on which other rows share its expert. Every
block size (MOE_BLOCK_M and the per-format BLOCK_N / BLOCK_K) is a module constant chosen without looking at
T or at the routing, so each row goes through the same K loop with the same tile shapes and the same tensor-core
instructions wherever it lands in a tile; rows of a tile never interact, and the combine adds per token in a
fixed order. Changing a block size changes bits: every rank of an EP group must use the same constants.

Formats: bf16 (float weights, the activation dtype's tensor cores; fp32 operands use exact-fp32 products),
fp8 (e4m3 x e4m3 with per-128 scaled accumulation), fp4 (e2m1 unpacked in-kernel and dequantised exactly to
bf16, bf16 MMA). On GPUs without FP4 matrix units (Hopper) the loader converts FP4 experts to FP8 once, exactly
(weights="auto" below compute capability 10, or weights="fp8"; reference.fp4_to_fp8_weight): the dequantised
weights are bitwise equal, so the reference gives the same bits, and the kernels run FP8 MMAs.
"""
from __future__ import annotations

import functools

import torch

from dsv4_portable import ops
from dsv4_portable.devices import interpret_mode
from dsv4_portable.reference.moe import ExpertWeights
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import cdiv, fp8_dtype_reasons

MOE_BLOCK_M = 64
# (BLOCK_N, BLOCK_K, num_warps, num_stages) per format for gate/up (two accumulators) and down.
GATE_UP_CFG = {"bf16": (128, 64, 8, 3), "fp8": (128, 128, 8, 3), "fp4": (128, 32, 8, 3)}
DOWN_CFG = {"bf16": (128, 64, 4, 3), "fp8": (128, 128, 4, 3), "fp4": (128, 64, 8, 2)}
# The shared expert's down projection: every token, one expert, so at decode its grid is one row tile wide;
# 32 columns per program give D/32 programs (128 at V4-Flash) instead of D/128 to stream w2. A constant, like
# the others: a row's result does not depend on T. (Its gate/up pass keeps BLOCK_N = 128: the fused fp8
# quantisation of h needs one 128-column activation block per program.)
SHARED_DOWN_CFG = {"bf16": (32, 64, 4, 3), "fp8": (32, 128, 4, 3), "fp4": (32, 64, 4, 2)}
COMBINE_BLOCK_D = 512
_FMT_ID = {"bf16": 0, "fp8": 1, "fp4": 2}
_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def _kernels():
    from . import moe_kernels
    return moe_kernels


def route_plan(idx: torch.Tensor, num_experts: int, block_m: int = MOE_BLOCK_M):
    """Sort the (token, slot) pairs of idx [T, K] by expert and cut each expert's run into tiles.

    Returns (order int32 [T*K]: slot ids grouped by expert, (token, k) order within an expert;
    tile_expert int32 [n_tiles] (-1 = unused tile); tile_row0 int32: first position in `order`;
    tile_rows int32: rows in the tile). n_tiles = cdiv(T*K, block_m) + min(E, T*K) >= the tiles needed,
    because sum_e ceil(c_e / block_m) <= floor(T*K / block_m) + (number of non-empty experts)."""
    dev = idx.device
    tk = idx.numel()
    flat = idx.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, key, torch.ones_like(key))[:num_experts]                 # scatter_add: no host sync (bincount syncs)
    tiles = (counts + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    seg_start = counts.cumsum(0) - counts
    n_tiles = cdiv(tk, block_m) + min(num_experts, tk)
    tid = torch.arange(n_tiles, device=dev)
    e = torch.searchsorted(tile_end, tid, right=True)
    ec = e.clamp(max=num_experts - 1)
    local = tid - (tile_end[ec] - tiles[ec])
    used = e < num_experts
    row0 = torch.where(used, seg_start[ec] + local * block_m, 0)
    rows = torch.where(used, (counts[ec] - local * block_m).clamp(0, block_m), 0)
    return order, torch.where(used, e, -1).to(torch.int32), row0.to(torch.int32), rows.to(torch.int32)


@functools.lru_cache(maxsize=64)
def identity_plan(t: int, device: torch.device, block_m: int = MOE_BLOCK_M):
    """route_plan's result for one expert that every token uses once (the shared expert: idx all 0, K = 1),
    in closed form: slots in order, full tiles of block_m rows, one unused tile. It depends on (t, device,
    block_m) only, so it is built once per token count and cached; the tensors are read-only (the kernels only
    read a plan)."""
    used_tiles = cdiv(t, block_m)
    tid = torch.arange(used_tiles + min(1, t), dtype=torch.int32, device=device)
    used = tid < used_tiles
    zero = torch.zeros((), dtype=torch.int32, device=device)
    return (torch.arange(t, dtype=torch.int32, device=device), torch.where(used, zero, zero - 1),
            torch.where(used, tid * block_m, zero), torch.where(used, (t - tid * block_m).clamp(max=block_m), zero))


def _weight_reasons(ew: ExpertWeights, name: str) -> list[str]:
    reasons = [] if ew.num_experts > 0 else [f"{name}: no experts"]
    if ew.fmt == "bf16":
        if ew.w1.dtype not in _FLOAT or ew.w2.dtype != ew.w1.dtype or ew.w3.dtype != ew.w1.dtype:
            reasons.append(f"{name}: float expert weights must share one of bf16/fp16/fp32, got "
                           f"{ew.w1.dtype}/{ew.w2.dtype}/{ew.w3.dtype}")
    else:
        if ew.hidden % 128 or ew.inter % 128:
            reasons.append(f"{name}: {ew.fmt} experts need hidden ({ew.hidden}) and intermediate ({ew.inter}) "
                           "sizes that are multiples of 128 (activation quant blocks, fused h quantisation)")
        for s in ("s1", "s2", "s3"):
            t = getattr(ew, s)
            if t is None or t.dtype not in (torch.float32, torch.float8_e8m0fnu):
                reasons.append(f"{name}: scale '{s}' {'missing' if t is None else t.dtype} (float32 or e8m0 needed)")
        if ew.s1 is not None and ew.s3 is not None and ew.s1.dtype != ew.s3.dtype:
            reasons.append(f"{name}: s1 and s3 must share a dtype (one gate/up launch)")
        if ew.scale_fmt not in ("ue8m0", None):
            reasons.append(f"{name}: scale_fmt {ew.scale_fmt!r} not supported")
        # fp8: fp8 tl.dot; fp4: the kernels load e4m3 activations (Triton's fp8e4nv type needs sm89+)
        reasons += [f"{name}: {ew.fmt} experts (e4m3 activations): {r}" for r in fp8_dtype_reasons()]
    for f in ("w1", "w2", "w3", "s1", "s2", "s3"):
        t = getattr(ew, f)
        if t is not None and not t.is_contiguous():
            reasons.append(f"{name}: '{f}' must be contiguous (prepare expert weights once at load)")
    return reasons


def _supports(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    tensors = [x, idx, weights, experts.w1, experts.w2, experts.w3, experts.s1, experts.s2, experts.s3]
    if shared is not None:
        tensors += [shared.w1, shared.w2, shared.w3, shared.s1, shared.s2, shared.s3]
    reasons = device_reasons(*tensors)
    if x.dtype not in _FLOAT:
        reasons.append(f"x dtype {x.dtype} not supported (bf16, fp16, fp32; fp64 runs on the reference)")
    reasons += _weight_reasons(experts, "experts")
    if shared is not None:
        reasons += _weight_reasons(shared, "shared")
    return reasons


def _dot_dtype(x_dtype: torch.dtype, ew: ExpertWeights):
    """Tensor-core operand dtype: fp32 under the interpreter; else the weights' float dtype when it equals the
    activation dtype, exact fp32 products otherwise; fp8 for fp8 weights; bf16 (exact) for fp4 weights."""
    import triton.language as tl
    from .tl_helpers import tl_dtype
    if interpret_mode():
        return tl.float32
    if ew.fmt == "fp8":
        return tl.float8e4nv
    if ew.fmt == "fp4":
        return tl.bfloat16
    return tl_dtype(x_dtype) if ew.w1.dtype == x_dtype and x_dtype != torch.float32 else tl.float32


def _scales(t: torch.Tensor | None, like: torch.Tensor):
    """Scale tensor for a kernel argument (e8m0 as exponent bytes) and its e8m0 flag; a dummy for bf16."""
    if t is None:
        return like, False
    if t.dtype == torch.float8_e8m0fnu:
        return t.view(torch.uint8), True
    return t, False


def _expert_pass(x, xq, xs, plan, k: int, route_w, ew: ExpertWeights, swiglu_limit: float,
                 down_cfg: dict = DOWN_CFG) -> torch.Tensor:
    """Run one ExpertWeights over the T*K (token, slot) pairs of a tile plan (route_plan's or identity_plan's;
    slot = token * k + j); returns y [T*K, D] per slot (act dtype). route_w [T, K] fp32, or None (weight 1)."""
    from .tl_helpers import dot_precision, tl_dtype
    kern = _kernels()
    order, tile_expert, tile_row0, tile_rows = plan
    tk, d, inter = order.numel(), ew.hidden, ew.inter
    fmt, fmt_id = ew.fmt, _FMT_ID[ew.fmt]
    quant = fmt != "bf16"
    interp = interpret_mode()
    act = tl_dtype(x.dtype)
    dot_dt = _dot_dtype(x.dtype, ew)
    prec = dot_precision(dot_dt)
    if tk == 0:
        return torch.empty(0, d, dtype=x.dtype, device=x.device)
    n_tiles = tile_expert.numel()
    a, a_s = (xq, xs) if quant else (x, x)
    if quant:
        h = torch.empty(tk, inter, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(tk, inter // FP8_LINEAR_BLOCK, dtype=torch.float32, device=x.device)
    else:
        h = torch.empty(tk, inter, dtype=x.dtype, device=x.device)
        hs = h
    w1 = ew.w1.view(torch.uint8) if fmt == "fp4" else ew.w1
    w3 = ew.w3.view(torch.uint8) if fmt == "fp4" else ew.w3
    w2 = ew.w2.view(torch.uint8) if fmt == "fp4" else ew.w2
    s1, e8m0_13 = _scales(ew.s1, w1)
    s3, _ = _scales(ew.s3, w1)
    s2, e8m0_2 = _scales(ew.s2, w2)
    block_n, block_k, warps, stages = GATE_UP_CFG[fmt]
    launch(kern.moe_gate_up_kernel, (n_tiles, cdiv(inter, block_n)),
        a, a_s, w1, w3, s1, s3, order, tile_expert, tile_row0, tile_rows,
        route_w if route_w is not None else a_s, h, hs, k, d, inter, float(swiglu_limit),
        a.stride(0), w1.stride(0), w1.stride(1), s1.stride(0) if quant else 0, s1.stride(1) if quant else 0,
        h.stride(0),
        FMT=fmt_id, S_E8M0=e8m0_13, HAS_ROUTE=route_w is not None, CLAMP=swiglu_limit > 0, QUANT_H=quant,
        UE8M0=ew.scale_fmt == "ue8m0", ACT_DT=act, DOT_DT=dot_dt, PREC=prec, INTERPRET=interp,
        BLOCK_M=MOE_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    y = torch.empty(tk, d, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = down_cfg[fmt]
    launch(kern.moe_down_kernel, (n_tiles, cdiv(d, block_n)),
        h, hs, w2, s2, order, tile_expert, tile_row0, tile_rows, y, inter, d,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0) if quant else 0, s2.stride(1) if quant else 0,
        y.stride(0),
        FMT=fmt_id, S_E8M0=e8m0_2, ACT_DT=act, DOT_DT=dot_dt, PREC=prec, INTERPRET=interp,
        BLOCK_M=MOE_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


@register("moe_experts", "triton", "cuda", available=triton_availability, supports=_supports,
          note="Triton grouped expert GEMMs (fixed tiles, batch-invariant), fused SwiGLU epilogue, ordered combine")
def moe_experts_triton(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    from .tl_helpers import tl_dtype
    t, k = idx.shape
    d = x.shape[1]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0 or d == 0:
        return out
    x = x.contiguous()
    x_quantised = {}  # scale_fmt -> (fp8 x, scales): x is quantised once per token and scale rule

    def inputs(ew):
        if ew.fmt == "bf16":
            return None, None
        if ew.scale_fmt not in x_quantised:
            xq, xs = ops.quant_fp8(x, FP8_LINEAR_BLOCK, ew.scale_fmt)
            x_quantised[ew.scale_fmt] = (xq.contiguous(), xs.float().contiguous())
        return x_quantised[ew.scale_fmt]

    idx = idx.contiguous()
    y = _expert_pass(x, *inputs(experts), route_plan(idx, experts.num_experts, MOE_BLOCK_M), k,
                     weights.contiguous().float(), experts, swiglu_limit)
    y_shared = None
    if shared is not None:      # the shared expert: every token once, no routing weight
        y_shared = _expert_pass(x, *inputs(shared), identity_plan(t, x.device, MOE_BLOCK_M), 1, None, shared,
                                swiglu_limit, SHARED_DOWN_CFG)
    launch(_kernels().moe_combine_kernel, (t, cdiv(d, COMBINE_BLOCK_D)),
        y, y_shared if y_shared is not None else y, idx, out, d, k, experts.num_experts,
        HAS_SHARED=y_shared is not None, ACT_DT=tl_dtype(x.dtype), INTERPRET=interpret_mode(),
        BLOCK_D=COMBINE_BLOCK_D, num_warps=4)
    return out
