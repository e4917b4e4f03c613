"""Orthonormal Hadamard rotation of the last dim (the indexer's QAT rotation, DESIGN.md 2.1)."""
from __future__ import annotations

import torch


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H_d * d^-0.5 with H_d the Sylvester Hadamard matrix (H_2n = [[H, H], [H, -H]]), d = x.shape[-1]
    a power of two. Computed with the fast butterfly in fp32 (fp64 for fp64 input); returns x's dtype.

    Same ordering and scale as fast_hadamard_transform.hadamard_transform(x, scale=d**-0.5)."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard: last dim {d} is not a power of two")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cd).reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return (y.reshape(x.shape) * d ** -0.5).to(x.dtype)
