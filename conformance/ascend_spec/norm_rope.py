"""Spec of npu_rms_norm and npu_rotary_mul (research/ascend.md 3.5; torch_npu 2.13 schemas)."""
from __future__ import annotations

import torch

from .contract import SpecNotModelledError, check_in, check_tensor, need, require_soc, rope_rotate, spec_op

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SRC_NORM = "op-plugin docs/zh/custom_APIs/torch_npu/(beta)torch_npu-npu_rms_norm.md; vllm-ascend ops/layernorm.py"
SRC_ROPE = ("op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_rotary_mul.md (constraints, jit_compile=False); "
            "vllm-ascend ops/rope_dsv4.py (DSV4: interleave, x [T, 1, H, D])")
# Interleave mode: the table layouts the doc allows per input layout (r1/r2 shape from x's), and the layout's
# B and N (for the B*N < 1000 rule).
_INTERLEAVE_TABLES = {
    "BSND": (lambda s: (1, s[1], 1, s[3]), lambda s: (s[0], s[2])),
    "SBND": (lambda s: (s[0], 1, 1, s[3]), lambda s: (s[1], s[2])),
    "BNSD": (lambda s: (1, 1, s[2], s[3]), lambda s: (s[0], s[1])),
}


@spec_op("npu_rms_norm", ("torch_npu", "npu"), SRC_NORM)
def npu_rms_norm(self, gamma, epsilon=1e-6):
    """(y, rstd): y = x * rsqrt(mean(x^2) + epsilon) * gamma over gamma's dims, computed in fp32, y in x's dtype;
    rstd fp32 with gamma's dims reduced to 1. The input is named `self` in the vendor signature."""
    op, x = "npu_rms_norm", self
    # Doc table: A2/A3 (+ older). The 950 is an assumption: vllm-ascend's RMSNorm calls it on every chip.
    require_soc(op, ("A2", "A3", "950"), SRC_NORM)
    check_tensor(op, "self", x, SRC_NORM, dtypes=FLOATS, ndim=(2, 3, 4, 5, 6, 7, 8))
    check_tensor(op, "gamma", gamma, SRC_NORM, dtypes=(x.dtype, torch.float32))
    need(tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape), op, "gamma",
         f"has shape {list(gamma.shape)} for x {list(x.shape)}", "gamma's shape equals the trailing dims of x",
         SRC_NORM)
    need(isinstance(epsilon, float) and epsilon > 0, op, "epsilon", f"is {epsilon!r}", "a positive float", SRC_NORM)
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + epsilon)
    return (gamma.float() * (xf * rstd)).to(x.dtype), rstd


@spec_op("npu_rotary_mul", ("torch_npu", "npu"), SRC_ROPE)
def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    """out = x * r1 + rotate(x) * r2 with rotate per rotary_mode ('half': rotate_half, 'interleave': adjacent
    pairs). input: 3-D (TND) or 4-D (BSND / SBND / BNSD) fp16/bf16/fp32, D even and < 896; r1, r2 (cos, sin
    expanded to the rotary width) of input's rank, values in [-1, 1]. In interleave mode the tables must be
    1S1D (BSND), S11D (SBND), 11SD (BNSD) or T1D (TND), and B*N < 1000. Computed in fp32, returned in x's dtype."""
    op, x = "npu_rotary_mul", input
    # Doc table: A2/A3 training (+ older). The 950 is an assumption: vllm-ascend's DSV4 RoPE calls it on every chip.
    require_soc(op, ("A2", "A3", "950"), SRC_ROPE)
    check_tensor(op, "input", x, SRC_ROPE, dtypes=FLOATS, ndim=(3, 4))
    check_in(op, "rotary_mode", rotary_mode, ("half", "interleave"), SRC_ROPE)
    if rotate is not None:
        raise SpecNotModelledError(op, "the rotate matrix")
    d = x.shape[-1]
    need(d % 2 == 0 and d < 896, op, "input", f"has D={d}", "D even and < 896", SRC_ROPE)
    for name, r in (("r1", r1), ("r2", r2)):
        # r1/r2 in input's dtype: the spec's reading (the doc lists the same three dtypes for all three).
        check_tensor(op, name, r, SRC_ROPE, dtypes=(x.dtype,), ndim=x.dim())
        need(r.shape[-1] == d, op, name, f"has last dim {r.shape[-1]}", f"input's D ({d})", SRC_ROPE)
        need(bool((r.float().abs() <= 1.0 + 1e-6).all()), op, name, "has values outside [-1, 1]",
             "data range [-1, 1]", SRC_ROPE)
    need(r1.shape == r2.shape, op, "r2", f"has shape {list(r2.shape)}", f"r1's shape {list(r1.shape)}", SRC_ROPE)
    s = tuple(x.shape)
    if rotary_mode == "interleave":
        if x.dim() == 3:
            layouts = {"TND": ((s[0], 1, s[2]), (1, s[1]))}
        else:
            layouts = {k: (tab(s), bn(s)) for k, (tab, bn) in _INTERLEAVE_TABLES.items()}
        match = [k for k, (tab, _) in layouts.items() if tuple(r1.shape) == tab]
        need(bool(match), op, "r1", f"has shape {list(r1.shape)} for input {list(s)}",
             "interleave mode takes 1S1D (BSND), S11D (SBND), 11SD (BNSD) or T1D (TND) tables", SRC_ROPE)
        b, n = layouts[match[0]][1]
        need(b * n < 1000, op, "input", f"has B*N = {b}*{n} = {b * n} as {match[0]}", "B*N < 1000 in interleave mode",
             SRC_ROPE)
    else:
        need(all(a in (1, c) for a, c in zip(r1.shape, s)), op, "r1", f"has shape {list(r1.shape)}",
             f"broadcastable to input {list(s)}", SRC_ROPE)
    xf = x.float()
    return (xf * r1.float() + rope_rotate(xf, rotary_mode == "interleave") * r2.float()).to(x.dtype)
