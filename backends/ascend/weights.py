"""Chip-aware weight preparation at load (research/ascend.md section 4).

- 950: FP8 and FP4 arithmetic exist: keep the checkpoint's FP8 128x128 blocks (fp8_linear runs npu_quant_matmul
  with group sizes [1, 128, 128]) and its FP4 experts (e2m1 + e8m0 per 32, the MXFP4 format).
- A2 / A3: no FP8 / FP4 units: dequantise every FP8 / FP4 weight to bf16 at load (exact for e8m0 scales), so the
  model runs bf16 linears and bf16 grouped GEMMs. Activations are then not FP8-quantised, a known difference from
  DeepSeek's recipe (compare against the reference loaded with weights="bf16"). weights="int8" instead
  requantises the dense linears to W8A8 (per-channel weights, per-token dynamic activations: npu_dynamic_quant +
  npu_quant_matmul), the faster option vLLM-Ascend offers; experts stay bf16.

`prepare_weights` then makes, once, the layouts the vendor ops want, replacing the tensors in the parameter dict
(nothing is cached beside the originals, so no weight is held twice). Most layouts need no copy at all: the
matmul ops take a transposed view of the stored [N, K] weight as their [K, N] operand (npu_quant_matmul's x2,
npu_grouped_matmul's weight), so the providers pass w.t() / w.transpose(1, 2) views per call.
"""
from __future__ import annotations

import dataclasses

import torch

from dsv4_portable.reference.quant import float_to_e8m0

from .chip import chip


def weight_mode_for(requested: str) -> tuple[str, str]:
    """(weight mode to load with, a sentence saying what was chosen and why)."""
    c = chip()
    if requested == "int8":
        return "int8", (f"ascend {c or 'unknown chip'}: weights int8 as requested (dense linears W8A8 with "
                        "per-channel scales and per-token activations; experts bf16)")
    if c == "950" or requested == "bf16":
        return requested, f"ascend {c or 'unknown chip'}: weights {requested} as requested"
    return "bf16", (f"ascend {c or 'unknown chip'}: weights {requested} -> bf16 (A2/A3 have no FP8/FP4 arithmetic: "
                    "FP8/FP4 checkpoint weights are dequantised to bf16 at load)")


def _fp32_scale(weight):
    """A quantised Weight whose scales are not fp32 gets fp32 scales (npu_quant_matmul's block and channel scales
    are fp32; the scales are 1/16384 of the weight for FP8 blocks)."""
    if getattr(weight, "scale", None) is None or weight.scale.dtype == torch.float32 or weight.fmt == "fp4":
        return weight
    return type(weight)(weight.w, weight.scale.float(), weight.fmt, weight.scale_fmt)


def _bf16_if_exact(t: torch.Tensor) -> torch.Tensor:
    """t in bf16 when that loses nothing (checkpoints store the compressor projections in bf16; the loader
    widens them to fp32), else t unchanged: the fused compressor takes bf16/fp16 weights only."""
    if t.dtype != torch.float32:
        return t
    b = t.to(torch.bfloat16)
    return b if torch.equal(b.float(), t) else t


def _e8m0_scales(experts):
    """FP4 expert stacks with fp32 power-of-two scales -> e8m0 scales (exact, a quarter of the bytes): the 950's
    MX grouped GEMM reads e8m0. Kept as is when a scale is not a power of two (Base checkpoints' float scales)."""
    if getattr(experts, "fmt", None) != "fp4" or experts.s1.dtype == torch.float8_e8m0fnu:
        return experts
    try:
        scales = {k: float_to_e8m0(getattr(experts, k)) for k in ("s1", "s2", "s3")}
    except ValueError:
        return experts
    return dataclasses.replace(experts, **scales)


def prepare_weights(params: dict) -> dict:
    """The parameter dict with each weight in the layout the Ascend ops read, made once at load.

    - MoE router weights (`*.ffn.gate.weight`) -> fp32: the router logits are an fp32 product, so the
      provider's upcast becomes a no-op instead of a copy of the gate weight per call.
    - hash layers' routing tables (`*.ffn.gate.tid2eid`, [vocab, k]) -> int32, the gating kernel's index dtype,
      so the provider's cast is a no-op instead of a copy of the table per call.
    - quantised dense weights: fp32 scales.
    - FP4 expert stacks: e8m0 scales (from the loader's fp32 powers of two), what the 950's MX GEMM reads.
    - compressor projections (`*.compressor.wkv.weight`, `*.compressor.wgate.weight`) -> bf16 when exact, the
      dtype the fused compressor takes (half the memory; the reference path upcasts them per call either way).
    Everything else is kept as is (dense bf16 weights, expert stacks: the ops read transposed views).
    The returned dict holds the replacements; the caller drops the old dict, so originals are freed."""
    out = {}
    for name, value in params.items():
        if name.endswith(".ffn.gate.weight") and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.float()
        elif name.endswith(".ffn.gate.tid2eid") and isinstance(value, torch.Tensor):
            value = value.to(torch.int32)
        elif name.endswith((".compressor.wkv.weight", ".compressor.wgate.weight")) and isinstance(value, torch.Tensor):
            value = _bf16_if_exact(value)
        elif hasattr(value, "s1"):
            value = _e8m0_scales(value)
        elif hasattr(value, "fmt") and hasattr(value, "scale"):
            value = _fp32_scale(value)
        out[name] = value
    return out
