"""RMSNorm (DESIGN.md 2.2): computed in fp32 with an fp32 weight, output cast back to the input dtype."""
from __future__ import annotations

import torch

from .invariant import f64


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """y = weight * x * rsqrt(mean(x^2) + eps) over the last dim, in fp32 (fp64 for fp64 input).

    x: [..., D] float; weight: [D] (any float dtype, used as fp32) or None (the per-head query norm has no
    weight). Returns x's dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    y = xf * f64(torch.rsqrt, xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.to(cd) * y
    return y.to(x.dtype)
