"""Spec of npu_rms_norm and npu_rotary_mul (research/ascend.md 3.5; torch_npu 2.13 schemas)."""
from __future__ import annotations

import torch

from .contract import check_in, check_tensor, need, require_soc, spec_op

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SRC_NORM = "torch_npu npu_rms_norm schema (vllm-ascend ops/layernorm.py)"
SRC_ROPE = "torch_npu npu_rotary_mul docstring (vllm-ascend ops/rope_dsv4.py)"


@spec_op("npu_rms_norm", ("torch_npu", "npu"), SRC_NORM)
def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(y, rstd): y = x * rsqrt(mean(x^2) + epsilon) * gamma over gamma's dims, computed in fp32, y in x's dtype;
    rstd fp32 with gamma's dims reduced to 1."""
    op = "npu_rms_norm"
    require_soc(op, ("A2", "A3", "950"), SRC_NORM)
    check_tensor(op, "x", x, SRC_NORM, dtypes=FLOATS)
    check_tensor(op, "gamma", gamma, SRC_NORM, dtypes=(x.dtype, torch.float32))
    need(tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape), op, "gamma",
         f"has shape {list(gamma.shape)} for x {list(x.shape)}", "gamma's shape equals the trailing dims of x",
         SRC_NORM)
    need(isinstance(epsilon, float) and epsilon > 0, op, "epsilon", f"is {epsilon!r}", "a positive float", SRC_NORM)
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + epsilon)
    return (gamma.float() * (xf * rstd)).to(x.dtype), rstd


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "interleave":      # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        pair = x.unflatten(-1, (-1, 2))
        return torch.stack([-pair[..., 1], pair[..., 0]], dim=-1).flatten(-2)
    half = x.shape[-1] // 2       # "half": (x1, x2) -> (-x2, x1)
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@spec_op("npu_rotary_mul", ("torch_npu", "npu"), SRC_ROPE)
def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
    """out = x * r1 + rotate(x) * r2 with rotate per rotary_mode ('half': rotate_half, 'interleave': adjacent
    pairs). x: 4-D (BSND / BNSD / SBND) fp16/bf16/fp32; r1, r2: 4-D of x's dtype, broadcastable to x, with x's
    last dim (cos/sin already expanded to the rotary width). Computed in fp32, returned in x's dtype."""
    op = "npu_rotary_mul"
    require_soc(op, ("A2", "A3", "950"), SRC_ROPE)
    check_tensor(op, "x", x, SRC_ROPE, dtypes=FLOATS, ndim=4)
    for name, r in (("r1", r1), ("r2", r2)):
        check_tensor(op, name, r, SRC_ROPE, dtypes=(x.dtype,), ndim=4)
        need(r.shape[-1] == x.shape[-1], op, name, f"has last dim {r.shape[-1]}",
             f"the rotary width of x ({x.shape[-1]})", SRC_ROPE)
        need(all(a in (1, b) for a, b in zip(r.shape, x.shape)), op, name, f"has shape {list(r.shape)}",
             f"broadcastable to x {list(x.shape)}", SRC_ROPE)
    check_in(op, "rotary_mode", rotary_mode, ("half", "interleave"), SRC_ROPE)
    need(x.shape[-1] % 2 == 0, op, "x", f"has odd last dim {x.shape[-1]}", "an even rotary width", SRC_ROPE)
    xf = x.float()
    return (xf * r1.float() + _rotate(xf, rotary_mode) * r2.float()).to(x.dtype)
