"""A linear weight in one of the checkpoint's storage formats, and the one function that applies it.

bf16 (any float dtype): the `linear` registry op (fp32 accumulation, output in the activation dtype). fp8: float8_e4m3fn with 128x128 block scales, run by
the `fp8_linear` registry op. fp4: packed e2m1 with e8m0 scales per 32, run by `fp4_linear`. int8: W8A8 with
per-channel weight scales and per-token dynamic activation scales (`int8_linear`; Ascend A2/A3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class Weight:
    w: torch.Tensor
    scale: torch.Tensor | None = None
    fmt: str = "bf16"                 # bf16 | fp8 | fp4 | int8 (W8A8, per-channel scales [N])
    scale_fmt: str | None = "ue8m0"   # activation scale rule for the quantised formats

    @property
    def out_features(self) -> int:
        return self.w.shape[0]

    def to(self, device) -> "Weight":
        return Weight(self.w.to(device), None if self.scale is None else self.scale.to(device), self.fmt,
                      self.scale_fmt)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + (0 if self.scale is None else
                                                         self.scale.numel() * self.scale.element_size())


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """y = x @ W^T in x's dtype, dispatching quantised formats to their registry ops."""
    if weight.fmt == "fp8":
        return ops.fp8_linear(x, weight.w, weight.scale, weight.scale_fmt)
    if weight.fmt == "fp4":
        return ops.fp4_linear(x, weight.w, weight.scale, weight.scale_fmt)
    if weight.fmt == "int8":
        return ops.int8_linear(x, weight.w, weight.scale)
    return ops.linear(x, weight.w)
