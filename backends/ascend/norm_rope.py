"""rms_norm -> npu_rms_norm; rope -> npu_rotary_mul(rotary_mode="interleave") on the rope dims."""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

NORM_NS = ("torch_npu", "npu")
ROPE_NS = ("torch_npu", "npu")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _supports_norm(x, weight=None, eps=1e-6):
    reasons = device_reasons(x, weight)
    if x.dtype not in FLOATS:
        reasons.append(f"x dtype {x.dtype} not supported by npu_rms_norm (fp16, bf16, fp32)")
    if weight is not None and weight.dtype not in (x.dtype, torch.float32):
        reasons.append(f"weight dtype {weight.dtype} must be x's dtype or float32 for npu_rms_norm")
    if not isinstance(eps, float) or eps <= 0:
        reasons.append(f"eps {eps!r} must be a positive float")
    return reasons


@register("rms_norm", "cann", "npu", available=availability("npu_rms_norm", NORM_NS), supports=_supports_norm,
          note="torch_npu.npu_rms_norm")
def rms_norm_cann(x, weight=None, eps=1e-6):
    gamma = weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, _rstd = vendor_ops.call("npu_rms_norm", NORM_NS, x, gamma, epsilon=float(eps))
    return y


def _supports_rope(x, cos, sin, inverse=False):
    reasons = device_reasons(x, cos, sin)
    if x.dtype not in FLOATS:
        reasons.append(f"x dtype {x.dtype} not supported by npu_rotary_mul (fp16, bf16, fp32)")
    return reasons


@register("rope", "cann", "npu", available=availability("npu_rotary_mul", ROPE_NS), supports=_supports_rope,
          note="torch_npu.npu_rotary_mul interleave on the rope dims; pass-through dims copied")
def rope_cann(x, cos, sin, inverse=False):
    rd = 2 * cos.shape[-1]
    x4 = x if x.dim() == 4 else x.unsqueeze(2)                    # [B, S, H, D] (BSND)
    # The op wants cos/sin at the full rotary width (pair i's value at 2i and 2i+1) in x's dtype. bf16 tables
    # would round cos/sin to 8 bits (a visible logit drift through the FP8 KV round trip), so the 64 rope dims
    # go in as fp32 and come back in x's dtype: the reference's fp32 rotation.
    r1 = cos.repeat_interleave(2, -1).unsqueeze(2).float()
    r2 = sin.repeat_interleave(2, -1).unsqueeze(2).float()
    if inverse:
        r2 = -r2
    rot = vendor_ops.call("npu_rotary_mul", ROPE_NS, x4[..., x.shape[-1] - rd:].float().contiguous(), r1, r2,
                          rotary_mode="interleave").to(x.dtype)
    out = torch.cat([x4[..., : x.shape[-1] - rd], rot], dim=-1)
    return out if x.dim() == 4 else out.squeeze(2)
