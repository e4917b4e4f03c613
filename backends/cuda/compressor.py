"""Triton provider of the fused compressor step (kernels and layout in compressor_kernels.py).

Host side: the fp32 projections kv = x @ wkv^T and score = x @ wgate^T run through the Triton float GEMM with
one launch plan for every row count (gemm.linear_f32_fixed: 16-row tiles, the K split chosen from N and K only,
exact fp32 products), so a row's projection, and with it a sequence's entries and decode state, does not depend
on the batch: the provider claims batch invariance on its own kernels, not on cuBLAS. Then one kernel builds
the completed entries (softmax pooling with the ratio-4 overlap, RMSNorm, RoPE at the window start, FP8 or
Hadamard + FP4 QAT) and one kernel updates kv_state / score_state in place, exactly as reference/compression.py
leaves them. The number of new entries follows from start_pos and S (Python ints): no host syncs. Differences
from the reference are those of fp32 arithmetic order (projections, online softmax), which the op's tolerance
covers.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .gemm import linear_f32_fixed
from .launch import launch
from .launch_helpers import contiguous_reasons, dtype_reasons, fp32_reasons, next_pow2, unit_last_stride_reasons

MAX_D = 1024            # one entry lives in a program's registers
TILE_ELEMS = 4096       # rows x features per softmax chunk


def _kernels():
    from . import compressor_kernels
    return compressor_kernels


def _supports(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state, start_pos, ratio, rotate=False,
              quant=True, eps=1e-6):
    reasons = device_reasons(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state)
    reasons += dtype_reasons(x=x, wkv=wkv, wgate=wgate, norm_weight=norm_weight)
    reasons += fp32_reasons(ape=ape, cos=cos, sin=sin, kv_state=kv_state, score_state=score_state)
    reasons += contiguous_reasons(wkv=wkv, wgate=wgate, ape=ape, norm_weight=norm_weight, kv_state=kv_state,
                                  score_state=score_state)
    reasons += unit_last_stride_reasons(cos=cos, sin=sin)
    coff = 2 if ratio == 4 else 1
    d = wkv.shape[0] // coff
    nope = d - 2 * cos.shape[-1]
    if d > MAX_D:
        reasons.append(f"entry width {d} > {MAX_D} (an entry must fit one program's registers)")
    if nope % 2:
        reasons.append(f"the rope dims must start at an even dim (entry width {d}, rope dims {2 * cos.shape[-1]})")
    if quant and rotate and d & (d - 1):
        reasons.append(f"the Hadamard rotation needs a power-of-two entry width, got {d}")
    return reasons


@register("compressor", "triton", "cuda", available=triton_availability, supports=_supports,
          note="Triton fp32 projections (one plan for every batch) + fused pool/norm/rope/QAT and in-place state "
               "update")
def compressor_triton(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state, start_pos, ratio,
                      rotate=False, quant=True, eps=1e-6):
    from .tl_helpers import tl_dtype
    k_mod = _kernels()
    b, s, dim = x.shape
    overlap = ratio == 4
    coff = 2 if overlap else 1
    c = wkv.shape[0]
    d = c // coff
    x2 = x.reshape(b * s, dim)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    # fp32 projections with a row count-independent plan (the kernel converts x and the weights to fp32 as it
    # loads them): a row's result must not depend on how many rows share the call, or the decode state of a
    # sequence would change with the batch
    kv = linear_f32_fixed(x2, wkv)                     # [B*S, C] fp32, contiguous
    score = linear_f32_fixed(x2, wgate)
    w0 = start_pos // ratio
    n_new = (start_pos + s) // ratio - w0
    cur0 = ratio if overlap else 0
    state_base = w0 * ratio - cur0                      # state slot of absolute position p: p - state_base
    state_rows = coff * ratio
    out = torch.empty(b, n_new, d, dtype=x.dtype, device=x.device)
    interp = interpret_mode()
    if b and n_new:
        block_d = next_pow2(d)
        block_r = max(1, min(next_pow2(ratio), TILE_ELEMS // block_d))
        launch(k_mod.compress_entry_kernel, (n_new, b), kv, score, kv_state, score_state, ape, norm_weight, cos,
               sin, out, s, start_pos, w0, n_new, state_base, state_rows, c, d, float(d), ratio,
               d - 2 * cos.shape[-1], cos.stride(0), sin.stride(0), float(eps), float(d) ** -0.5,
               OVERLAP=overlap, BLOCK_R=block_r, BLOCK_D=block_d, QUANT=bool(quant),
               ROTATE=bool(rotate), LOG2_D=block_d.bit_length() - 1, OUT_DT=tl_dtype(x.dtype), INTERPRET=interp,
               num_warps=4 if block_r * block_d <= 2048 else 8)
    if b:
        block_c = min(next_pow2(c), 1024)      # 4 fp32 (one 128-bit access) per thread
        launch(k_mod.compress_state_kernel, (b, ratio), kv, score, kv_state, score_state, ape, s, start_pos,
               (start_pos + s) // ratio, n_new, state_base, state_rows, c, ratio, OVERLAP=overlap,
               BLOCK_C=block_c, num_warps=max(1, min(4, block_c // 128)))
    return out
