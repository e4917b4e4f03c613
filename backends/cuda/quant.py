"""Triton providers of the block quantisers: quant_fp8, quant_fp4, fp8_roundtrip, fp4_roundtrip.

Bit-exact against reference/quant.py by contract (the registry compares them bitwise); the kernels and the
numerics are described in quant_kernels.py. Inputs: fp16 / bf16 / fp32 with a unit-stride last dim whose leading
dims flatten to one row stride (any contiguous tensor, or a last-dim slice such as the model's kv[..., :448]);
outputs are new contiguous tensors shaped like the reference's.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import cdiv, dtype_reasons, fp8_dtype_reasons, next_pow2, row_view

MAX_BLOCK = 4096        # one block is one row of a program's register tile
TILE_ELEMS = 4096       # elements per program: ROWS blocks of BLOCK_P


def _kernels():
    from . import quant_kernels
    return quant_kernels


def _layout_reasons(x: torch.Tensor, block_size: int, fp4: bool) -> list[str]:
    reasons = device_reasons(x) + dtype_reasons(x=x)
    if row_view(x) is None:
        reasons.append(f"'x' must have a unit-stride last dim and leading dims that flatten to one row stride "
                       f"(got strides {tuple(x.stride())} for shape {list(x.shape)})")
    if isinstance(block_size, int) and block_size > MAX_BLOCK:
        reasons.append(f"block_size {block_size} > {MAX_BLOCK} (one block must fit a program's registers)")
    if fp4 and isinstance(block_size, int) and block_size % 2:
        reasons.append(f"FP4 packing needs an even block_size, got {block_size}")
    return reasons


def _supports_fp8(x, block_size=128, scale_fmt="ue8m0"):
    return _layout_reasons(x, block_size, False) + fp8_dtype_reasons()


def _supports_fp8_roundtrip(x, block_size=64, scale_fmt="ue8m0"):
    return _layout_reasons(x, block_size, False)


def _supports_fp4(x, block_size=32):
    return _layout_reasons(x, block_size, True)


def _plan(x: torch.Tensor, block_size: int) -> dict:
    rows, row_stride = row_view(x)
    bpr = x.shape[-1] // block_size
    block_p = next_pow2(block_size)
    per_prog = max(1, TILE_ELEMS // block_p)
    n_blocks = rows * bpr
    return dict(n_blocks=n_blocks, bpr=bpr, row_stride=row_stride, grid=(cdiv(n_blocks, per_prog),),
                meta=dict(BLOCK=block_size, BLOCK_P=block_p, ROWS=per_prog, INTERPRET=interpret_mode(),
                          num_warps=4))


def _run(kernel, x, out, s, block_size, **meta):
    from .tl_helpers import tl_dtype
    p = _plan(x, block_size)
    if p["n_blocks"]:
        launch(kernel, p["grid"], x, out, s, p["n_blocks"], p["bpr"], p["row_stride"], OUT_DT=tl_dtype(x.dtype),
               **p["meta"], **meta)


@register("quant_fp8", "triton", "cuda", available=triton_availability, supports=_supports_fp8,
          note="Triton block FP8 quantiser, ue8m0 scales from exponent bits")
def quant_fp8_triton(x, block_size=128, scale_fmt="ue8m0"):
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], x.shape[-1] // block_size, dtype=torch.float32, device=x.device)
    _run(_kernels().quant_fp8_kernel, x, q, s, block_size, UE8M0=scale_fmt == "ue8m0", ROUNDTRIP=False)
    return q, s


@register("fp8_roundtrip", "triton", "cuda", available=triton_availability, supports=_supports_fp8_roundtrip,
          note="Triton FP8 QAT round trip (no fp8 storage, any sm)")
def fp8_roundtrip_triton(x, block_size=64, scale_fmt="ue8m0"):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _run(_kernels().quant_fp8_kernel, x, y, y, block_size, UE8M0=scale_fmt == "ue8m0", ROUNDTRIP=True)
    return y


@register("quant_fp4", "triton", "cuda", available=triton_availability, supports=_supports_fp4,
          note="Triton block FP4 (e2m1) quantiser, packed two per byte, ue8m0 scales")
def quant_fp4_triton(x, block_size=32):
    q = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8, device=x.device)
    s = torch.empty(*x.shape[:-1], x.shape[-1] // block_size, dtype=torch.float32, device=x.device)
    _run(_kernels().quant_fp4_kernel, x, q, s, block_size, ROUNDTRIP=False)
    return q, s


@register("fp4_roundtrip", "triton", "cuda", available=triton_availability, supports=_supports_fp4,
          note="Triton FP4 QAT round trip")
def fp4_roundtrip_triton(x, block_size=32):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _run(_kernels().quant_fp4_kernel, x, y, y, block_size, ROUNDTRIP=True)
    return y
