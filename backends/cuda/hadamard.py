"""Triton provider of `hadamard` (kernel in hadamard_kernels.py): rows of a power-of-two length 16..256 rotated
by one tensor-core product with an in-register Hadamard matrix (bf16/fp16 rows), or by the fast butterfly in
the reference's order (fp32 rows: bit-exact). Row-wise, so batch-invariant."""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import cdiv, dtype_reasons, row_view

MIN_D, MAX_D = 16, 256    # tl.dot needs >= 16; H_D must fit one program's registers
BUTTERFLY_ELEMS = 4096    # fp32 rows x D per program of the butterfly path (all in registers)


def _kernels():
    from . import hadamard_kernels
    return hadamard_kernels


def _supports_hadamard(x):
    reasons = device_reasons(x) + dtype_reasons(x=x)
    d = x.shape[-1]
    if not MIN_D <= d <= MAX_D:
        reasons.append(f"row length {d} outside {MIN_D}..{MAX_D} (H_D is built in registers; V4's indexer uses 128)")
    if row_view(x) is None:
        reasons.append(f"'x' must have a unit-stride last dim and leading dims that flatten to one row stride "
                       f"(got strides {tuple(x.stride())} for shape {list(x.shape)})")
    return reasons


@register("hadamard", "triton", "cuda", available=triton_availability, supports=_supports_hadamard,
          note="Triton x @ H_D on the tensor cores, H_D generated in registers")
def hadamard_triton(x):
    import triton.language as tl
    from .tl_helpers import dot_precision, tl_dtype
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, row_stride = row_view(x)
    d = x.shape[-1]
    if rows:
        interp = interpret_mode()
        # bf16/fp16 rows times +-1 are exact products on the tensor cores; the interpreter's bf16 dot is wrong
        # (DESIGN.md section 3), so it computes in fp32 there.
        # fp32 rows: the butterfly (exact reference order; no fp32 H_D in shared memory, see hadamard_kernels)
        butterfly = x.dtype == torch.float32
        dot_dt = tl.float32 if (interp or butterfly) else tl_dtype(x.dtype)
        block_r = max(1, BUTTERFLY_ELEMS // d) if butterfly else (64 if d <= 128 else 32)
        launch(_kernels().hadamard_kernel, (cdiv(rows, block_r),), x, y, rows, row_stride, float(d) ** -0.5,
               D=d, BLOCK_R=block_r, BUTTERFLY=butterfly, LOG2_D=d.bit_length() - 1, DOT_DT=dot_dt,
               PRECISION=dot_precision(dot_dt), OUT_DT=tl_dtype(x.dtype), INTERPRET=interp, num_warps=4)
    return y
