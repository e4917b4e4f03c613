"""Interleaved partial RoPE with optional YaRN frequency interpolation (DESIGN.md 2.2).

Pairs (2i, 2i+1) of the LAST `rope_dim` dims rotate as complex numbers (GPT-J style). Window-only layers use
theta 10000 without YaRN; compressed layers (and their compressor and indexer) use theta 160000 with YaRN
interpolation and no attention-scale factor. The attention output is rotated back with the conjugate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .invariant import f64

@dataclass(frozen=True)
class Yarn:
    """YaRN parameters (original context, factor, beta_fast, beta_slow)."""
    original_seq_len: int = 65536
    factor: float = 16.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def rope_inv_freq(rope_dim: int, theta: float, yarn: Yarn | None = None) -> torch.Tensor:
    """Per-pair angular frequencies, float32 [rope_dim/2], with DeepSeek's YaRN ramp when `yarn` is given."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is not None and yarn.original_seq_len > 0:
        def corr_dim(rot):
            return rope_dim * math.log(yarn.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
        high = min(math.ceil(corr_dim(yarn.beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / yarn.factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin float32 [*positions.shape, rope_dim/2] for integer positions."""
    angle = positions.to(torch.int64).unsqueeze(-1) * inv_freq.to(positions.device)
    return f64(torch.cos, angle), f64(torch.sin, angle)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] dims of x in interleaved pairs; the other dims pass through.

    x: [B, S, D] or [B, S, H, D]; cos, sin: float32 [B or 1, S, R/2]. With inverse=True the conjugate rotation
    is applied (the attention output's de-rotation). Computed in fp32 (fp64 for fp64 x):
    out[2i] = x[2i] cos - x[2i+1] sin;  out[2i+1] = x[2i] sin + x[2i+1] cos. Returns a new tensor of x's dtype."""
    rd = 2 * cos.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    c, s = cos.to(cd), sin.to(cd)
    if inverse:
        s = -s
    pair = x[..., x.shape[-1] - rd:].to(cd).unflatten(-1, (-1, 2))
    a, b = pair[..., 0], pair[..., 1]
    rot = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([x[..., : x.shape[-1] - rd], rot.to(x.dtype)], dim=-1)
