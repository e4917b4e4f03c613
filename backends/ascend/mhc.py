"""hc_pre -> npu_hc_pre_v2 (vllm-ascend) or npu_hc_pre (CANN recipes); hc_post -> npu_hc_post (vllm-ascend).

The fused hc_pre kernel is specialised: hc_mult 4, hidden size 4096 (V4-Flash) or 7168 (V4-Pro), bf16 streams
(check_hc_pre_shape_and_dtype); other shapes (the tiny model's 256) are declined with that reason. npu_hc_post
takes any stream count and width in fp32 / fp16 / bf16 (check_hc_post_shape_and_dtype)."""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

PRE_V2 = ("_C_ascend.npu_hc_pre_v2",)
PRE_CUSTOM = ("custom.npu_hc_pre",)
POST = ("_C_ascend.npu_hc_post",)
HIDDEN_SIZES = (4096, 7168)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _pre_op() -> vendor_ops.Candidates | None:
    """The hc_pre kernel this host has on this chip: the vllm-ascend build first, then CANN recipes'."""
    for cands in (PRE_V2, PRE_CUSTOM):
        if not availability(cands)():
            return cands
    return None


def _pre_available() -> list[str]:
    return [] if _pre_op() is not None else availability(PRE_V2)() + availability(PRE_CUSTOM)()


def _supports_pre(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    reasons = device_reasons(h, fn, scale, base)
    if h.shape[-2] != 4:
        reasons.append(f"{h.shape[-2]} streams; the fused hc_pre kernels take hc_mult 4")
    if h.shape[-1] not in HIDDEN_SIZES:
        reasons.append(f"hidden size {h.shape[-1]}; the fused hc_pre kernels take {HIDDEN_SIZES}")
    if h.dtype != torch.bfloat16:
        reasons.append(f"dtype {h.dtype}; the fused hc_pre kernels take bfloat16 streams")
    return reasons


@register("hc_pre", "cann", "npu", available=_pre_available, supports=_supports_pre,
          note="npu_hc_pre_v2 (vllm-ascend) or custom npu_hc_pre (CANN recipes, A3/950), whichever this host has")
def hc_pre_cann(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    cands = _pre_op()
    args = (h, fn.float().contiguous(), scale.float(), base.float())
    if cands == PRE_V2:
        return tuple(vendor_ops.call(cands, *args, 4, iters, float(norm_eps), float(hc_eps)))
    return tuple(vendor_ops.call(cands, *args, hc_mult=4, hc_sinkhorn_iters=iters, norm_eps=float(norm_eps),
                                 hc_eps=float(hc_eps)))


def _supports_post(o, h, post, comb):
    reasons = device_reasons(o, h, post, comb)
    if o.dtype not in FLOATS or h.dtype != o.dtype:
        reasons.append(f"x {o.dtype} / residual {h.dtype}; npu_hc_post takes one of fp32, fp16, bf16 for both")
    if post.dtype not in FLOATS or comb.dtype != post.dtype:
        reasons.append(f"post {post.dtype} / comb {comb.dtype}; npu_hc_post takes one float dtype for both")
    return reasons


@register("hc_post", "cann", "npu", available=availability(POST), supports=_supports_post,
          note="_C_ascend.npu_hc_post")
def hc_post_cann(o, h, post, comb):
    return vendor_ops.call(POST, o, h, post, comb)

