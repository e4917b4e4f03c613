"""Helpers that keep the reference batch-invariant: a value never depends on how many other rows share a call.

torch's fp32 exp / sigmoid / softmax / cos take a vectorised path for most elements and a scalar path for the
tail; the two differ in the last bit, and which path an element takes depends on the tensor's size. Evaluated in
float64 and rounded back, both paths land on the same fp32 value (their difference is ~2^29 times smaller than
fp32's rounding step). Products use fixed 16-row tiles (quant.linear_f32). With both, prefill, chunked prefill and
decode give the same bits, which the model tests assert.
"""
from __future__ import annotations

import torch


def f64(fn, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """fn(x) evaluated in float64, returned in x's dtype."""
    if x.dtype == torch.float64:
        return fn(x, *args, **kwargs)
    return fn(x.double(), *args, **kwargs).to(x.dtype)
