"""int8_linear (A2/A3) -> npu_dynamic_quant + npu_quant_matmul (W8A8, per-channel weight scales).
fp8_linear on the 950 -> the registry's quant_fp8 (DeepSeek's ue8m0 1x128 activation blocks) +
npu_quant_matmul with group_sizes [1, 128, 128] (cann-recipes module/quantization/fp8.py).
linear / grouped_linear (float weights, the A2/A3 bf16 mode) -> the device's own matmul.

The quantised GEMMs read the weight as x2 [K, N]: we pass the transposed view w.t() of the stored [N, K] weight
(and w_scale.t() of its block scales, which must be transposed the same way: op-plugin
QuantMatmulKernelNpuOpApi.cpp), so no weight is copied or re-laid out per call.

A2 and A3 have no FP8 arithmetic: there the checkpoint's FP8/FP4 weights are dequantised at load (weights.py) and
the model runs the plain `linear` op, so the FP8 provider declines on them with that reason."""
from __future__ import annotations

import sys

import torch

from dsv4_portable import ops
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK
from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, chip_reasons, device_reasons

QMM = ("torch_npu.npu_quant_matmul", "npu.npu_quant_matmul")
DQ = ("torch_npu.npu_dynamic_quant", "npu.npu_dynamic_quant")
FLOAT_ACT = (torch.bfloat16, torch.float16)


def _supports(x, w, w_scale, scale_fmt="ue8m0"):
    reasons = device_reasons(x, w, w_scale)
    if x.dtype not in FLOAT_ACT:
        reasons.append(f"activations {x.dtype}; npu_quant_matmul outputs bf16/fp16")
    if w.shape[0] > 65535 or w.shape[1] > 65535:
        reasons.append(f"weight {list(w.shape)}; npu_quant_matmul takes K, N <= 65535")
    return reasons


def _fp8_available() -> list[str]:
    """npu_quant_matmul serves every chip (int8 on A2/A3); its FP8 block mode needs the 950's FP8 units."""
    return availability(QMM)() + chip_reasons("npu_quant_matmul's FP8 block mode", ("950",))


@register("fp8_linear", "cann", "npu", available=_fp8_available, supports=_supports,
          note="950: quant_fp8 + npu_quant_matmul(group_sizes=[1,128,128]) on w.t() / w_scale.t() views")
def fp8_linear_cann(x, w, w_scale, scale_fmt="ue8m0"):
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = ops.quant_fp8(x2d, FP8_LINEAR_BLOCK, scale_fmt)
    # w_scale: fp32, the op's scale dtype (prepare_weights converts quantised weights' scales at load), so .float()
    # is a no-op for a loaded model
    y = vendor_ops.call(QMM, xq, w.t(), w_scale.float().t(), pertoken_scale=xs.float(), output_dtype=x.dtype,
                        group_sizes=[1, 128, 128])
    return y.view(*x.shape[:-1], w.shape[0])


# ----------------------------------------------------------------------------------------------- int8 W8A8
def _supports_int8(x, w, w_scale):
    reasons = device_reasons(x, w, w_scale)
    if x.dtype not in FLOAT_ACT:
        reasons.append(f"activations {x.dtype}; npu_dynamic_quant takes bf16/fp16")
    if w.shape[0] > 65535 or w.shape[1] > 65535:
        reasons.append(f"weight {list(w.shape)}; npu_quant_matmul takes K, N <= 65535")
    if w_scale.dtype != torch.float32:
        reasons.append(f"weight scales {w_scale.dtype}; this provider passes fp32 per-channel scales")
    return reasons


@register("int8_linear", "cann", "npu", available=availability(DQ, QMM),      # npu_dynamic_quant: A2/A3 (CHIPS)
          supports=_supports_int8, note="A2/A3: npu_dynamic_quant (per token) + npu_quant_matmul (per-channel int8, "
                                        "w.t() view)")
def int8_linear_cann(x, w, w_scale):
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = vendor_ops.call(DQ, x2d)
    y = vendor_ops.call(QMM, xq, w.t(), w_scale, pertoken_scale=xs, output_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


# ----------------------------------------------------------------------------------------------- float weights
def _supports_float(x, w):
    reasons = device_reasons(x, w)
    if x.dtype not in FLOAT_ACT or w.dtype != x.dtype:
        reasons.append(f"activations {x.dtype}, weight {w.dtype}: this provider runs bf16/fp16 products of one "
                       "dtype (fp32 runs on the reference)")
    return reasons


def _on_npu() -> list[str]:
    """Plain torch matmul on npu tensors needs torch_npu only (no extension op)."""
    return [] if "torch_npu" in sys.modules else ["torch_npu is not imported"]


# Not batch-invariant by construction: the device's matmul picks its tiling (and so its fp32 accumulation order)
# from the shapes, so a row's result may depend on how many rows share the call. The reference keeps fixed 16-row
# tiles for expert-parallel bitwise equality; on Ascend, EP records compare by tolerance, and the conformance
# record's batch_invariant field reports what the device did.
@register("linear", "cann", "npu", available=_on_npu, supports=_supports_float, batch_invariant=False,
          note="x @ w.t() on the device (bf16 products, fp32 accumulation; not batch-invariant by construction)")
def linear_cann(x, w):
    return torch.matmul(x, w.t())


@register("grouped_linear", "cann", "npu", available=_on_npu, supports=_supports_float, batch_invariant=False,
          note="per-group x @ w[g].t() as one batched matmul on the device (not batch-invariant by construction)")
def grouped_linear_cann(x, w):
    lead = x.shape[:-2]
    xg = x.reshape(-1, w.shape[0], w.shape[2]).transpose(0, 1)                  # [G, M, K]
    y = torch.bmm(xg, w.transpose(1, 2))                                         # [G, M, N]
    return y.transpose(0, 1).reshape(*lead, w.shape[0], w.shape[1])
