"""Host-side helpers of the Triton providers (quantisers, norm/RoPE, mHC, compressor, routing, GEMMs, attention,
indexer, MoE): how a torch tensor becomes kernel arguments, and the common reasons a provider declines a call.

Triton-free on purpose: the provider modules import this at registration time, the kernel modules lazily.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode

from .common import capability

KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU; the interpreter pretends to be a small GPU (8) so that tiny test
    shapes take the split paths, meta tensors (the offline compile check) an H100 (132)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8 if interpret_mode() else 132


def row_view(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row_stride) when x can be read as a 2-D [rows, x.shape[-1]] array with a unit-stride last dim
    (a contiguous tensor, or a slice of its last dim such as kv[..., :448]); None otherwise."""
    if x.dim() == 0 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        return None
    rows = x.numel() // max(1, x.shape[-1])
    lead = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    if not lead:
        return rows, x.shape[-1]
    for (n_out, st_out), (n_in, st_in) in zip(lead, lead[1:]):
        if st_out != st_in * n_in:
            return None
    return rows, lead[-1][1]


def dtype_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """The kernels read fp16 / bf16 / fp32; float64 is left to the reference (which computes it in fp64)."""
    out = []
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_FLOATS:
            out.append(f"'{name}' has dtype {t.dtype}; this provider takes float16, bfloat16 or float32 "
                       "(float64 runs on the reference)")
    return out


def fp32_reasons(**tensors: torch.Tensor | None) -> list[str]:
    return [f"'{name}' has dtype {t.dtype}; this provider takes float32 (float64 runs on the reference)"
            for name, t in tensors.items() if t is not None and t.dtype != torch.float32]


def contiguous_reasons(**tensors: torch.Tensor | None) -> list[str]:
    return [f"'{name}' must be contiguous (strides {tuple(t.stride())} for shape {list(t.shape)})"
            for name, t in tensors.items() if t is not None and not t.is_contiguous()]


def unit_last_stride_reasons(**tensors: torch.Tensor | None) -> list[str]:
    return [f"'{name}' needs a unit-stride last dim (strides {tuple(t.stride())})"
            for name, t in tensors.items() if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1]


def on_gpu() -> bool:
    """True when the kernels compile for a real GPU (not the interpreter)."""
    return not interpret_mode() and torch.cuda.is_available()


def fp8_dtype_reasons() -> list[str]:
    """Kernels that store float8_e4m3fn values need the e4m3 conversion instructions of sm89+."""
    if on_gpu() and capability() < (8, 9):
        major, minor = capability()
        return [f"float8_e4m3fn conversion needs compute capability >= 8.9, this GPU is {major}.{minor}"]
    return []


def dot_mode(*dtypes: torch.dtype) -> tuple[bool, str]:
    """(upcast_to_fp32, input_precision) for a tl.dot whose operands are stored in `dtypes`.

    Same 16-bit dtype on both sides: the native tensor-core product (products of 16-bit values are exact in
    fp32, accumulation fp32). Mixed 16-bit: upcast, TF32 is then exact per product (11 significant bits hold
    fp16 and bf16 values). Any fp32 operand: "tf32x3" (split products, about fp32 accuracy) instead of plain TF32.
    The interpreter's bf16 dot is wrong, so it always upcasts ("ieee": exact fp32 there)."""
    if interpret_mode():
        return True, "ieee"
    if all(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return (len(set(dtypes)) != 1), "tf32"
    return True, "tf32x3"
