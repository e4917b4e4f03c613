"""Manifold-constrained hyper-connections (DESIGN.md 2.5): 4 residual streams mixed by Sinkhorn matrices.

All mixing maths runs in fp32 (fp64 for fp64 inputs). `comb` is applied TRANSPOSED in hc_post: the sum runs
over its first index (out_k = post_k * o + sum_j comb[j, k] * h_j), a known source of bugs.
"""
from __future__ import annotations

import torch

from .invariant import f64
from .quant import linear_f32


def _cd(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mixes(h: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    flat = h.flatten(-2).to(_cd(h))                                    # [B, S, n*D]
    rsqrt = f64(torch.rsqrt, flat.square().mean(-1, keepdim=True) + norm_eps)  # one RMS over all n*D values
    return linear_f32(flat, fn) * rsqrt                                  # batch-invariant product


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """softmax over the last dim + eps, divide by column sums (+eps), then iters-1 times: rows, then columns."""
    comb = f64(torch.softmax, comb, -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           norm_eps: float = 1e-6, hc_eps: float = 1e-6, iters: int = 20):
    """Collapse the n streams to one input and compute the Sinkhorn-normalised mixing.

    h: [B, S, n, D]; fn: float32 [(2+n)*n, n*D]; scale: float32 [3]; base: float32 [(2+n)*n].
    mixes = (flat(h) @ fn^T) * rsqrt(mean(flat(h)^2) + norm_eps);
    pre = sigmoid(m[:n]*scale0 + base[:n]) + hc_eps; post = 2*sigmoid(m[n:2n]*scale1 + base[n:2n]);
    comb = sinkhorn(m[2n:].view(n, n)*scale2 + base[2n:]); y = sum_j pre_j h_j.
    Returns y [B, S, D] in h's dtype, post float32 [B, S, n], comb float32 [B, S, n, n]."""
    n = h.shape[-2]
    cd = _cd(h)
    m = _mixes(h, fn, norm_eps)
    sc, bs = scale.to(cd), base.to(cd)
    pre = f64(torch.sigmoid, m[..., :n] * sc[0] + bs[:n]) + hc_eps
    post = 2 * f64(torch.sigmoid, m[..., n:2 * n] * sc[1] + bs[n:2 * n])
    comb = (m[..., 2 * n:] * sc[2] + bs[2 * n:]).unflatten(-1, (n, n))
    comb = sinkhorn(comb, iters, hc_eps)
    y = (pre.unsqueeze(-1) * h.to(cd)).sum(-2)
    return y.to(h.dtype), post, comb


def hc_post(o: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand the sub-layer output back to n streams: out_k = post_k * o + sum_j comb[j, k] * h_j.

    o: [B, S, D]; h: [B, S, n, D]; post: float32 [B, S, n]; comb: float32 [B, S, n, n].
    Returns [B, S, n, D] in o's dtype."""
    cd = torch.promote_types(_cd(o), post.dtype)
    mixed = (comb.to(cd).unsqueeze(-1) * h.to(cd).unsqueeze(-2)).sum(-3)   # [B, S, n(k), D], sum over j
    return (post.to(cd).unsqueeze(-1) * o.to(cd).unsqueeze(-2) + mixed).to(o.dtype)


def hc_head(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Final collapse of the streams: pre = sigmoid(mixes*scale + base) + hc_eps, y = sum_j pre_j h_j.

    h: [B, S, n, D]; fn: float32 [n, n*D]; scale: float32 [1]; base: float32 [n]. Returns [B, S, D], h's dtype."""
    cd = _cd(h)
    pre = f64(torch.sigmoid, _mixes(h, fn, norm_eps) * scale.to(cd) + base.to(cd)) + hc_eps
    return (pre.unsqueeze(-1) * h.to(cd)).sum(-2).to(h.dtype)
