"""int8_linear (A2/A3/950) -> npu_dynamic_quant + npu_quant_matmul (W8A8, per-channel weight scales).
fp8_linear on the 950 -> the registry's quant_fp8 (DeepSeek's ue8m0 1x128 activation blocks) +
npu_quant_matmul with group_sizes [1, 128, 128] (cann-recipes module/quantization/fp8.py).

A2 and A3 have no FP8 arithmetic: there the checkpoint's FP8/FP4 weights are dequantised at load (weights.py) and
the model runs the plain `linear` op, so this provider declines on them with that reason."""
from __future__ import annotations

import torch

from dsv4_portable import ops
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK
from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons, prepared

QMM = ("npu_quant_matmul", ("torch_npu", "npu"))


def _weight_layout(w: torch.Tensor, w_scale: torch.Tensor):
    """x2 [K, N] and its scales [K/128, N/128] fp32, made once per weight (the op reads the transposed weight)."""
    return prepared(w, "fp8 x2", lambda: (w.t().contiguous(), w_scale.float().t().contiguous()))


def _supports(x, w, w_scale, scale_fmt="ue8m0"):
    reasons = device_reasons(x, w, w_scale)
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"activations {x.dtype}; npu_quant_matmul outputs bf16/fp16")
    if w.shape[0] > 65535 or w.shape[1] > 65535:
        reasons.append(f"weight {list(w.shape)}; npu_quant_matmul takes K, N <= 65535")
    return reasons


@register("fp8_linear", "cann", "npu", available=availability(*QMM, chips=("950",)), supports=_supports,
          note="950: quant_fp8 + npu_quant_matmul(group_sizes=[1,128,128])")
def fp8_linear_cann(x, w, w_scale, scale_fmt="ue8m0"):
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = ops.quant_fp8(x2d, FP8_LINEAR_BLOCK, scale_fmt)
    wt, st = _weight_layout(w, w_scale)
    y = vendor_ops.call(*QMM, xq, wt, st, pertoken_scale=xs.float(), output_dtype=x.dtype,
                        group_sizes=[1, 128, 128])
    return y.view(*x.shape[:-1], w.shape[0])


# ----------------------------------------------------------------------------------------------- int8 W8A8
DQ = ("npu_dynamic_quant", ("torch_npu", "npu"))


def _int8_weight_layout(w: torch.Tensor) -> torch.Tensor:
    """x2 [K, N], made once per weight (ND format; FRACTAL_NZ, format 29, is the faster layout to try on hardware)."""
    return prepared(w, "int8 x2", lambda: vendor_ops.call("npu_format_cast", ("torch_npu", "npu"),
                                                           w.t().contiguous(), 2))


def _supports_int8(x, w, w_scale):
    reasons = device_reasons(x, w, w_scale)
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"activations {x.dtype}; npu_dynamic_quant takes bf16/fp16")
    if w.shape[0] > 65535 or w.shape[1] > 65535:
        reasons.append(f"weight {list(w.shape)}; npu_quant_matmul takes K, N <= 65535")
    return reasons


@register("int8_linear", "cann", "npu", available=lambda: availability(*DQ)() + availability(*QMM)(),
          supports=_supports_int8, note="npu_dynamic_quant (per token) + npu_quant_matmul (per-channel int8)")
def int8_linear_cann(x, w, w_scale):
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = vendor_ops.call(*DQ, x2d)
    y = vendor_ops.call(*QMM, xq, _int8_weight_layout(w), w_scale.float(), pertoken_scale=xs.float(),
                        output_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])
