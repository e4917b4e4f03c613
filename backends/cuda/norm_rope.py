"""Triton providers of rms_norm and rope (kernels in norm_rope_kernels.py).

rms_norm: x [..., D] read as rows (unit-stride last dim, leading dims flattening to one row stride), weight [D]
or None; output contiguous in x's dtype. rope: x [B, S, D] or [B, S, H, D] with any strides but a unit-stride
last dim; cos/sin [B or 1, S, R/2] fp32 with a unit-stride last dim; output a new contiguous tensor.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import (cdiv, dtype_reasons, fp32_reasons, next_pow2, row_view,
                             unit_last_stride_reasons)

MAX_ROW = 16384          # a whole row lives in one program's registers
TILE_ELEMS = 4096        # elements per program (several short rows share one)


def _kernels():
    from . import norm_rope_kernels
    return norm_rope_kernels


def _warps(elems: int) -> int:
    return 4 if elems <= 2048 else 8 if elems <= 8192 else 16


# ----------------------------------------------------------------------------------------------- rms_norm
def _supports_rms_norm(x, weight=None, eps=1e-6):
    reasons = device_reasons(x, weight) + dtype_reasons(x=x, weight=weight)
    if row_view(x) is None:
        reasons.append(f"'x' must have a unit-stride last dim and leading dims that flatten to one row stride "
                       f"(got strides {tuple(x.stride())} for shape {list(x.shape)})")
    if x.shape[-1] > MAX_ROW:
        reasons.append(f"row length {x.shape[-1]} > {MAX_ROW} (a row must fit one program's registers)")
    if weight is not None and not weight.is_contiguous():
        reasons.append("'weight' must be contiguous")
    return reasons


@register("rms_norm", "triton", "cuda", available=triton_availability, supports=_supports_rms_norm,
          note="Triton RMSNorm, whole rows in registers")
def rms_norm_triton(x, weight=None, eps=1e-6):
    from .tl_helpers import tl_dtype
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, row_stride = row_view(x)
    d = x.shape[-1]
    if rows and d:
        block_d = next_pow2(d)
        block_r = max(1, TILE_ELEMS // block_d)
        launch(_kernels().rms_norm_kernel, (cdiv(rows, block_r),), x, x if weight is None else weight, y, rows,
               row_stride, d, float(d), float(eps), HAS_WEIGHT=weight is not None, BLOCK_R=block_r,
               BLOCK_D=block_d, OUT_DT=tl_dtype(x.dtype), INTERPRET=interpret_mode(),
               num_warps=_warps(block_r * block_d))
    return y


# ----------------------------------------------------------------------------------------------- rope
def _supports_rope(x, cos, sin, inverse=False):
    reasons = device_reasons(x, cos, sin) + dtype_reasons(x=x) + fp32_reasons(cos=cos, sin=sin)
    reasons += unit_last_stride_reasons(x=x, cos=cos, sin=sin)
    if x.shape[-1] > MAX_ROW:
        reasons.append(f"head dim {x.shape[-1]} > {MAX_ROW}")
    return reasons


@register("rope", "triton", "cuda", available=triton_availability, supports=_supports_rope,
          note="Triton interleaved partial RoPE (and its inverse), cos/sin loaded once per token")
def rope_triton(x, cos, sin, inverse=False):
    from .tl_helpers import tl_dtype
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    b, s, d = x.shape[0], x.shape[1], x.shape[-1]
    h = x.shape[2] if x.dim() == 4 else 1
    half = cos.shape[-1]
    nope = d - 2 * half
    if b * s * h == 0 or d == 0:
        return y
    block_c = min(next_pow2(nope), 1024) if nope else 0
    block_p = next_pow2(half) if half else 1
    block_h = min(next_pow2(h), max(1, TILE_ELEMS // max(block_c, 2 * block_p)))
    sx_h = x.stride(2) if x.dim() == 4 else 0
    bcast = cos.shape[0] == 1                   # one table row per position for all batch rows
    launch(_kernels().rope_kernel, (b * s, cdiv(h, block_h)), x, cos, sin, y, s, h, d, nope, half,
           x.stride(0), x.stride(1), sx_h, 0 if bcast else cos.stride(0), cos.stride(1),
           0 if bcast else sin.stride(0), sin.stride(1), INVERSE=bool(inverse), BLOCK_H=block_h,
           BLOCK_C=block_c, BLOCK_P=block_p, OUT_DT=tl_dtype(x.dtype), INTERPRET=interpret_mode(),
           num_warps=_warps(block_h * max(block_c, 2 * block_p)))
    return y
