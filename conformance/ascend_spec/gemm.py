"""Spec of the dense quantised GEMM ops: npu_dynamic_quant, npu_quant_matmul, npu_format_cast
(research/ascend.md 3.9; torch_npu 2.13 docstrings; cann-recipes module/quantization/fp8.py)."""
from __future__ import annotations

import torch

from .contract import (SpecNotModelledError, check_contiguous, check_dtype_arg, check_in, check_tensor, need,
                       require_soc, spec_op)

FLOATS = (torch.float16, torch.bfloat16)
SRC_DQ = "op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_dynamic_quant.md (A2/A3: int8, quint4x2)"
SRC_QMM = ("op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_quant_matmul.md (A2/A3 int8, Table 2); op-plugin "
           "op_plugin/ops/opapi/QuantMatmulKernelNpuOpApi.cpp (transposed x2, same-transpose rule for block scales); "
           "cann-recipes module/quantization/fp8.py (950 FP8 blocks, group_sizes [1, 128, 128])")
SRC_CAST = "op-plugin docs/zh/custom_APIs/torch_npu/(beta)torch_npu-npu_format_cast.md (ACL formats: 2 ND, 29 FRACTAL_NZ)"


def _same_transpose(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """op-plugin is_x_scale_same_transpose on the last two dims: both transposed or both not, where "transposed"
    is stride[-1] == stride[-2] * size[-2]; a 1x1 x or scale passes."""
    if tuple(x.shape[-2:]) == (1, 1) or tuple(scale.shape[-2:]) == (1, 1):
        return True
    trans = lambda t: t.stride(-1) == t.stride(-2) * t.shape[-2]  # noqa: E731
    return trans(x) == trans(scale)


@spec_op("npu_dynamic_quant", ("torch_npu", "npu"), SRC_DQ)
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """(q, scale): symmetric per-token quantisation, scale = amax(|row|) / 127 (fp32), q = round(x / scale)
    (round half to even) clamped to [-128, 127]. int8 on every chip; fp8 destinations (950) are not modelled."""
    op = "npu_dynamic_quant"
    # Doc table: A2/A3. The 950 (fp8 destinations) is an assumption: vllm-ascend's A5 adaptor quantises to fp8.
    soc = require_soc(op, ("A2", "A3", "950"), SRC_DQ)
    check_tensor(op, "input", input, SRC_DQ, dtypes=FLOATS, ndim=(2, 3, 4, 5, 6, 7, 8))
    name = "int8" if dst_type is None else check_dtype_arg(
        op, "dst_type", dst_type, ("int8", "quint4x2") if soc != "950" else ("float8_e4m3fn",), SRC_DQ)
    check_in(op, "quant_mode", quant_mode, ("pertoken",), SRC_DQ)
    if name != "int8" or smooth_scales is not None or group_index is not None:
        raise SpecNotModelledError(op, "fp8 destination / smooth scales / grouped quantisation")
    xf = input.float()
    scale = xf.abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, scale


@spec_op("npu_quant_matmul", ("torch_npu", "npu"), SRC_QMM)
def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                     x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    """y = dequant(x1) @ dequant(x2), x1 [M, K] contiguous, x2 [K, N] contiguous or a transposed view of [N, K].
    Modes modelled:
    - int8 W8A8 (A2/A3): scale fp32 [N] per channel, pertoken_scale fp32 [M]; int32 accumulation.
    - FP8 blocks (950 only): x1, x2 float8_e4m3fn, group_sizes [1, 128, 128]: pertoken_scale fp32 [M, K/128] (one
      per 1x128 block of x1), scale fp32 [K/128, N/128] (one per 128x128 block of x2); fp32 accumulation.
    Output output_dtype (bf16 or fp16)."""
    op = "npu_quant_matmul"
    soc = require_soc(op, ("A2", "A3", "950"), SRC_QMM)
    check_tensor(op, "x1", x1, SRC_QMM, dtypes=(torch.int8, torch.float8_e4m3fn), ndim=2)
    check_contiguous(op, "x1", x1, SRC_QMM)
    check_tensor(op, "x2", x2, SRC_QMM, dtypes=(x1.dtype,), ndim=2)
    check_contiguous(op, "x2", x2, SRC_QMM, allow_transposed=True)     # contiguous [K, N] or a view of [N, K]
    m, k = x1.shape
    need(x2.shape[0] == k, op, "x2", f"has shape {list(x2.shape)}", f"[K={k}, N] (transposed weight)", SRC_QMM)
    n = x2.shape[1]
    need(k <= 65535 and n <= 65535, op, "x2", f"has K={k}, N={n}", "the last dims of x1 and x2 (K, N) <= 65535",
         SRC_QMM)
    check_in(op, "output_dtype", output_dtype, (torch.bfloat16, torch.float16), SRC_QMM)
    if offset is not None or bias is not None or y_scale is not None:
        raise SpecNotModelledError(op, "offset / bias / y_scale")
    check_tensor(op, "pertoken_scale", pertoken_scale, SRC_QMM, dtypes=(torch.float32,))
    check_tensor(op, "scale", scale, SRC_QMM, dtypes=(torch.float32,))
    if x1.dtype == torch.int8:
        need(soc in ("A2", "A3"), op, "x1", f"is int8 on {soc}", "int8 W8A8 is documented for A2/A3 (Table 2)",
             SRC_QMM)
        need(group_sizes is None, op, "group_sizes", f"is {group_sizes}", "None for per-channel int8", SRC_QMM)
        need(tuple(scale.shape) == (n,), op, "scale", f"has shape {list(scale.shape)}", f"[N={n}] per channel",
             SRC_QMM)
        need(tuple(pertoken_scale.shape) == (m,), op, "pertoken_scale", f"has shape {list(pertoken_scale.shape)}",
             f"[M={m}] per token", SRC_QMM)
        acc = (x1.to(torch.int64) @ x2.to(torch.int64)).double()
        return (acc * scale.double() * pertoken_scale.double().unsqueeze(-1)).to(output_dtype)
    need(soc == "950", op, "x1", f"is float8_e4m3fn on {soc}", "FP8 arithmetic exists only on the 950", SRC_QMM)
    need(list(group_sizes or []) == [1, 128, 128], op, "group_sizes", f"is {group_sizes}",
         "[1, 128, 128] for DeepSeek's FP8 blocks", SRC_QMM)
    kb, nb = -(-k // 128), -(-n // 128)
    check_tensor(op, "scale", scale, SRC_QMM, dtypes=(torch.float32,), ndim=2)
    check_tensor(op, "pertoken_scale", pertoken_scale, SRC_QMM, dtypes=(torch.float32,), ndim=2)
    # "Input x2 tensor and scale tensor's transpose are not same" (and x1 / pertoken_scale): op-plugin TORCH_CHECK
    need(_same_transpose(x1, pertoken_scale), op, "pertoken_scale", f"has stride {list(pertoken_scale.stride())} "
         f"for x1 stride {list(x1.stride())}", "transposed the same way as x1", SRC_QMM)
    need(_same_transpose(x2, scale), op, "scale", f"has stride {list(scale.stride())} for x2 stride "
         f"{list(x2.stride())}", "transposed the same way as x2", SRC_QMM)
    need(tuple(pertoken_scale.shape) == (m, kb), op, "pertoken_scale", f"has shape {list(pertoken_scale.shape)}",
         f"[M={m}, K/128={kb}]", SRC_QMM)
    need(tuple(scale.shape) == (kb, nb), op, "scale", f"has shape {list(scale.shape)}", f"[K/128={kb}, N/128={nb}]",
         SRC_QMM)
    a = x1.float() * pertoken_scale.repeat_interleave(128, 1)[:, :k]
    b = x2.float() * scale.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1)[:, :n]
    return (a @ b).to(output_dtype)


@spec_op("npu_format_cast", ("torch_npu", "npu"), SRC_CAST)
def npu_format_cast(input, acl_format, customize_dtype=None, input_dtype=None):
    """The same values in another internal layout (2 ND, 29 FRACTAL_NZ); the spec keeps the data as is (a CPU
    tensor has no internal format). customize_dtype / input_dtype (C0 control; vllm-ascend's MXFP4 weights pass
    customize_dtype float8_e4m3fn, input_dtype float4_e2m1fn_x2) are not modelled."""
    check_tensor("npu_format_cast", "input", input, SRC_CAST)
    check_in("npu_format_cast", "acl_format", acl_format, (2, 29), SRC_CAST, "2 (ND) or 29 (FRACTAL_NZ)")
    if customize_dtype is not None or input_dtype is not None:
        raise SpecNotModelledError("npu_format_cast", "customize_dtype / input_dtype")
    return input
