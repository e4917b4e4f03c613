"""hc_pre -> npu_hc_pre_v2 (vllm-ascend) or npu_hc_pre (CANN recipes); hc_post -> npu_hc_post.

The fused mHC kernels are specialised: hc_mult 4, hidden size 4096 (V4-Flash) or 7168 (V4-Pro), bf16 streams.
Other shapes (the tiny model's 256) are declined with that reason and run on the next provider."""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

PRE_V2 = ("npu_hc_pre_v2", ("_C_ascend",))
PRE_CUSTOM = ("npu_hc_pre", ("custom",))
POST = ("npu_hc_post", ("_C_ascend",))
HIDDEN_SIZES = (4096, 7168)


def _pre_op():
    """(name, namespaces) of the hc_pre kernel this host has: the vllm-ascend build first, then CANN recipes."""
    for name, ns in (PRE_V2, PRE_CUSTOM):
        if not vendor_ops.reasons(name, ns):
            return name, ns
    return None


def _pre_available() -> list[str]:
    if _pre_op() is not None:
        return availability(*_pre_op())()
    return vendor_ops.reasons(*PRE_V2) + vendor_ops.reasons(*PRE_CUSTOM)


def _hc_shape_reasons(h, n_streams_dim=-2):
    reasons = []
    if h.shape[n_streams_dim] != 4:
        reasons.append(f"{h.shape[n_streams_dim]} streams; the fused mHC kernels take hc_mult 4")
    if h.shape[-1] not in HIDDEN_SIZES:
        reasons.append(f"hidden size {h.shape[-1]}; the fused mHC kernels take {HIDDEN_SIZES}")
    if h.dtype != torch.bfloat16:
        reasons.append(f"dtype {h.dtype}; the fused mHC kernels take bfloat16")
    return reasons


def _supports_pre(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    return device_reasons(h, fn, scale, base) + _hc_shape_reasons(h)


@register("hc_pre", "cann", "npu", available=_pre_available, supports=_supports_pre,
          note="npu_hc_pre_v2 (vllm-ascend) or custom npu_hc_pre (CANN recipes), whichever this host has")
def hc_pre_cann(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
    name, ns = _pre_op()
    args = (h, fn.float().contiguous(), scale.float(), base.float())
    if name == "npu_hc_pre_v2":
        return tuple(vendor_ops.call(name, ns, *args, 4, iters, float(norm_eps), float(hc_eps)))
    return tuple(vendor_ops.call(name, ns, *args, hc_mult=4, hc_sinkhorn_iters=iters, norm_eps=float(norm_eps),
                                 hc_eps=float(hc_eps)))


def _supports_post(o, h, post, comb):
    return device_reasons(o, h, post, comb) + _hc_shape_reasons(h)


@register("hc_post", "cann", "npu", available=availability(*POST), supports=_supports_post,
          note="_C_ascend.npu_hc_post")
def hc_post_cann(o, h, post, comb):
    out = vendor_ops.call(*POST, o, h, post.float(), comb.float())
    return out
