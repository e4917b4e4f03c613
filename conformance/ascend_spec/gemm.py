"""Spec of the dense quantised GEMM ops: npu_dynamic_quant, npu_quant_matmul, npu_format_cast
(research/ascend.md 3.9; torch_npu 2.13 docstrings; cann-recipes module/quantization/fp8.py)."""
from __future__ import annotations

import torch

from .contract import (SpecNotModelledError, check_dtype_arg, check_in, check_int, check_tensor, need, require_soc,
                       spec_op)

FLOATS = (torch.float16, torch.bfloat16)
SRC_DQ = "torch_npu 2.13 npu_dynamic_quant docstring"
SRC_QMM = "torch_npu 2.13 npu_quant_matmul docstring; cann-recipes module/quantization/fp8.py (950)"
SRC_CAST = "torch_npu npu_format_cast (ACL formats: 2 ND, 29 FRACTAL_NZ)"


@spec_op("npu_dynamic_quant", ("torch_npu", "npu"), SRC_DQ)
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """(q, scale): symmetric per-token quantisation, scale = amax(|row|) / 127 (fp32), q = round(x / scale)
    (round half to even) clamped to [-128, 127]. int8 on every chip; fp8 destinations (950) are not modelled."""
    op = "npu_dynamic_quant"
    require_soc(op, ("A2", "A3", "950"), SRC_DQ)
    check_tensor(op, "input", input, SRC_DQ, dtypes=FLOATS)
    name = "int8" if dst_type is None else check_dtype_arg(op, "dst_type", dst_type, ("int8", "float8_e4m3fn"), SRC_DQ)
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
    """y = dequant(x1) @ dequant(x2), x1 [M, K], x2 [K, N]. Modes modelled:
    - int8 W8A8 (A2/A3/950): scale fp32 [N] per channel, pertoken_scale fp32 [M]; int32 accumulation.
    - FP8 blocks (950 only): x1, x2 float8_e4m3fn, group_sizes [1, 128, 128]: pertoken_scale fp32 [M, K/128] (one
      per 1x128 block of x1), scale fp32 [K/128, N/128] (one per 128x128 block of x2); fp32 accumulation.
    Output output_dtype (bf16 or fp16)."""
    op = "npu_quant_matmul"
    soc = require_soc(op, ("A2", "A3", "950"), SRC_QMM)
    check_tensor(op, "x1", x1, SRC_QMM, dtypes=(torch.int8, torch.float8_e4m3fn), ndim=2)
    check_tensor(op, "x2", x2, SRC_QMM, dtypes=(x1.dtype,), ndim=2)
    m, k = x1.shape
    need(x2.shape[0] == k, op, "x2", f"has shape {list(x2.shape)}", f"[K={k}, N] (transposed weight)", SRC_QMM)
    n = x2.shape[1]
    need(k <= 65535 and n <= 65535, op, "x2", f"has K={k}, N={n}", "K, N <= 65535", SRC_QMM)
    check_in(op, "output_dtype", output_dtype, (torch.bfloat16, torch.float16), SRC_QMM)
    if offset is not None or bias is not None or y_scale is not None:
        raise SpecNotModelledError(op, "offset / bias / y_scale")
    check_tensor(op, "pertoken_scale", pertoken_scale, SRC_QMM, dtypes=(torch.float32,))
    check_tensor(op, "scale", scale, SRC_QMM, dtypes=(torch.float32,))
    if x1.dtype == torch.int8:
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
    need(tuple(pertoken_scale.shape) == (m, kb), op, "pertoken_scale", f"has shape {list(pertoken_scale.shape)}",
         f"[M={m}, K/128={kb}]", SRC_QMM)
    need(tuple(scale.shape) == (kb, nb), op, "scale", f"has shape {list(scale.shape)}", f"[K/128={kb}, N/128={nb}]",
         SRC_QMM)
    a = x1.float() * pertoken_scale.repeat_interleave(128, 1)[:, :k]
    b = x2.float() * scale.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1)[:, :n]
    return (a @ b).to(output_dtype)


@spec_op("npu_format_cast", ("torch_npu", "npu"), SRC_CAST)
def npu_format_cast(input, acl_format):
    """The same values in another internal layout (2 ND, 29 FRACTAL_NZ); the spec keeps the data as is."""
    check_tensor("npu_format_cast", "input", input, SRC_CAST)
    check_in("npu_format_cast", "acl_format", acl_format, (2, 29), SRC_CAST, "2 (ND) or 29 (FRACTAL_NZ)")
    return input
