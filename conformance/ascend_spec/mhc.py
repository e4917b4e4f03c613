"""Spec of the mHC ops npu_hc_pre_v2 (vllm-ascend), npu_hc_pre (cann-recipes custom ops) and npu_hc_post
(research/ascend.md 3.4; golden: vllm-ascend tests/e2e/.../test_npu_hc_pre.py)."""
from __future__ import annotations

import torch

from .contract import check_int, check_shape, check_tensor, need, require_soc, spec_op

SRC_V2 = ("vllm-ascend csrc/torch_binding.cpp::check_hc_pre_shape_and_dtype, csrc/moe/hc_pre (def.cpp: "
          "ascend910b, ascend910_93, ascend950)")
SRC_CUSTOM = "cann-recipes custom_ops npu_hc_pre doc (D fixed, A3 and 950 only)"
SRC_POST = ("vllm-ascend csrc/torch_binding.cpp::check_hc_post_shape_and_dtype, csrc/moe/hc_post (def.cpp: "
            "ascend910b, ascend910_93, ascend950); cann-recipes op_impls/mhc.py::hc_post_native")
HIDDEN_SIZES = (4096, 7168)       # V4-Flash, V4-Pro


def _check_pre(op, src, x, hc_fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps):
    check_tensor(op, "x", x, src, dtypes=(torch.bfloat16,), ndim=(3, 4))
    check_int(op, "hc_mult", hc_mult, src, 4, 4, rule="hc_mult == 4")
    need(x.shape[-2] == hc_mult, op, "x", f"has {x.shape[-2]} streams (shape {list(x.shape)})",
         "[T, hc_mult, D] or [B, S, hc_mult, D]", src)
    d = x.shape[-1]
    need(d in HIDDEN_SIZES, op, "x", f"has hidden size D={d}", f"D in {HIDDEN_SIZES}", src)
    mix = (2 + hc_mult) * hc_mult
    check_tensor(op, "hc_fn", hc_fn, src, dtypes=(torch.float32,))
    check_shape(op, "hc_fn", hc_fn, (mix, hc_mult * d), src)
    check_tensor(op, "hc_scale", hc_scale, src, dtypes=(torch.float32,))
    check_shape(op, "hc_scale", hc_scale, (3,), src)
    check_tensor(op, "hc_base", hc_base, src, dtypes=(torch.float32,))
    check_shape(op, "hc_base", hc_base, (mix,), src)
    check_int(op, "hc_sinkhorn_iters", iters, src, 1, 100)
    for name, v in (("norm_eps", norm_eps), ("hc_eps", hc_eps)):
        need(isinstance(v, float) and v > 0, op, name, f"is {v!r}", "a positive float", src)


def _hc_pre(x, hc_fn, hc_scale, hc_base, n, iters, norm_eps, hc_eps):
    flat = x.flatten(-2).float()
    mixes = (flat @ hc_fn.t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes[..., :n] * hc_scale[0] + hc_base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = (mixes[..., 2 * n:] * hc_scale[2] + hc_base[2 * n:]).unflatten(-1, (n, n))
    comb = torch.softmax(comb, -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return y.to(x.dtype), post, comb


@spec_op("npu_hc_pre_v2", ("_C_ascend",), SRC_V2)
def npu_hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps):
    """(y, post, comb): mixes = (flat(x) @ hc_fn^T) * rsqrt(mean(flat(x)^2) + norm_eps), split 4/4/16;
    pre = sigmoid(.*s0 + b) + hc_eps; post = 2*sigmoid(.*s1 + b); comb = softmax(.*s2 + b) + hc_eps, column-normalised,
    then hc_sinkhorn_iters-1 rounds of row/column normalisation; y = sum_j pre_j x_j (bf16); post, comb fp32."""
    require_soc("npu_hc_pre_v2", ("A2", "A3", "950"), SRC_V2)
    _check_pre("npu_hc_pre_v2", SRC_V2, x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)
    return _hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)


@spec_op("npu_hc_pre", ("custom",), SRC_CUSTOM)
def npu_hc_pre(x, hc_fn, hc_scale, hc_base, *, hc_mult=4, hc_sinkhorn_iters=20, norm_eps=1e-6, hc_eps=1e-6):
    """Same semantics as npu_hc_pre_v2 with keyword-only options (cann-recipes build)."""
    require_soc("npu_hc_pre", ("A3", "950"), SRC_CUSTOM)
    _check_pre("npu_hc_pre", SRC_CUSTOM, x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)
    return _hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)


@spec_op("npu_hc_post", ("_C_ascend",), SRC_POST)
def npu_hc_post(x, residual, post, comb):
    """out[b, s, i] = post[b, s, i] * x[b, s] + sum_j comb[b, s, j, i] * residual[b, s, j] in fp32, returned in
    residual's dtype. x [B, S, D] fp32/fp16/bf16; residual [B, S, hc, D] of x's dtype; post [B, S, hc]
    fp32/fp16/bf16; comb [B, S, hc, hc] of post's dtype (check_hc_post_shape_and_dtype: no limit on hc or D)."""
    op = "npu_hc_post"
    require_soc(op, ("A2", "A3", "950"), SRC_POST)
    floats = (torch.float32, torch.float16, torch.bfloat16)
    check_tensor(op, "x", x, SRC_POST, dtypes=floats, ndim=3)
    check_tensor(op, "residual", residual, SRC_POST, dtypes=(x.dtype,), ndim=4)
    b, s, d = x.shape
    hc = residual.shape[2]
    check_shape(op, "residual", residual, (b, s, hc, d), SRC_POST, "[B, S, hc, D] matching x")
    check_tensor(op, "post", post, SRC_POST, dtypes=floats, ndim=3)
    check_shape(op, "post", post, (b, s, hc), SRC_POST)
    check_tensor(op, "comb", comb, SRC_POST, dtypes=(post.dtype,), ndim=4)
    check_shape(op, "comb", comb, (b, s, hc, hc), SRC_POST)
    mixed = (comb.float().unsqueeze(-1) * residual.float().unsqueeze(-2)).sum(-3)
    return (post.float().unsqueeze(-1) * x.float().unsqueeze(-2) + mixed).to(residual.dtype)
