"""rms_norm -> npu_rms_norm; rope -> npu_rotary_mul(rotary_mode="interleave") on the rope dims."""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

RMS_NORM = ("torch_npu.npu_rms_norm", "npu.npu_rms_norm")
ROTARY_MUL = ("torch_npu.npu_rotary_mul", "npu.npu_rotary_mul")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _supports_norm(x, weight=None, eps=1e-6):
    reasons = device_reasons(x, weight)
    if x.dtype not in FLOATS:
        reasons.append(f"x dtype {x.dtype} not supported by npu_rms_norm (fp16, bf16, fp32)")
    if not 2 <= x.dim() <= 8:
        reasons.append(f"x has {x.dim()} dims; npu_rms_norm takes 2 to 8")
    if weight is not None and weight.dtype not in (x.dtype, torch.float32):
        reasons.append(f"weight dtype {weight.dtype} must be x's dtype or float32 for npu_rms_norm")
    if not isinstance(eps, float) or eps <= 0:
        reasons.append(f"eps {eps!r} must be a positive float")
    return reasons


@register("rms_norm", "cann", "npu", available=availability(RMS_NORM), supports=_supports_norm,
          note="torch_npu.npu_rms_norm")
def rms_norm_cann(x, weight=None, eps=1e-6):
    gamma = weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, _rstd = vendor_ops.call(RMS_NORM, x, gamma, epsilon=float(eps))
    return y


def _rope_rows(x: torch.Tensor) -> tuple[int, int]:
    """(rows, heads) of x [B, S, H, D] or [B, S, D]: the op sees rows = B*S tokens of `heads` heads."""
    return x.shape[0] * x.shape[1], (x.shape[2] if x.dim() == 4 else 1)


def _supports_rope(x, cos, sin, inverse=False):
    reasons = device_reasons(x, cos, sin)
    if x.dtype not in FLOATS:
        reasons.append(f"x dtype {x.dtype} not supported by npu_rotary_mul (fp16, bf16, fp32)")
    _, heads = _rope_rows(x)
    if heads >= 1000:
        reasons.append(f"{heads} heads; npu_rotary_mul's interleave mode takes B*N < 1000 (SBND with B = 1)")
    return reasons


@register("rope", "cann", "npu", available=availability(ROTARY_MUL), supports=_supports_rope,
          note="torch_npu.npu_rotary_mul interleave, SBND tokens x heads with S11D tables; pass-through dims copied")
def rope_cann(x, cos, sin, inverse=False):
    rd = 2 * cos.shape[-1]
    rows, heads = _rope_rows(x)
    # Interleave mode takes only per-token tables (1S1D / S11D / 11SD / T1D) and B*N < 1000: present the tokens
    # as S = B*S rows of one batch, x [B*S, 1, H, rd] with S11D tables, as vllm-ascend's DSV4 RoPE does. The op
    # wants cos/sin at the full rotary width (pair i's value at 2i and 2i+1) in x's dtype; bf16 tables would round
    # cos/sin to 8 bits (a visible drift through the FP8 KV round trip), so the rope dims go in as fp32 and come
    # back in x's dtype: the reference's fp32 rotation.
    r1 = cos.expand(x.shape[0], -1, -1).repeat_interleave(2, -1).reshape(rows, 1, 1, rd).float()
    r2 = sin.expand(x.shape[0], -1, -1).repeat_interleave(2, -1).reshape(rows, 1, 1, rd).float()
    if inverse:
        r2 = -r2
    rope_part = x[..., x.shape[-1] - rd:].float().reshape(rows, 1, heads, rd)
    rot = vendor_ops.call(ROTARY_MUL, rope_part, r1, r2, rotary_mode="interleave").to(x.dtype)
    return torch.cat([x[..., : x.shape[-1] - rd], rot.view(*x.shape[:-1], rd)], dim=-1)
