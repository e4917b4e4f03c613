"""Chip-aware weight preparation at load (research/ascend.md section 4).

- 950: FP8 and FP4 arithmetic exist: keep the checkpoint's FP8 128x128 blocks (fp8_linear runs npu_quant_matmul
  with group sizes [1, 128, 128]) and its FP4 experts (e2m1 + e8m0 per 32, the MXFP4 format).
- A2 / A3: no FP8 / FP4 units: dequantise every FP8 / FP4 weight to bf16 at load (exact for e8m0 scales), so the
  model runs bf16 linears and bf16 grouped GEMMs. Activations are then not FP8-quantised, a known difference from
  DeepSeek's recipe (compare against the reference loaded with weights="bf16"). weights="int8" instead
  requantises the dense linears to W8A8 (per-channel weights, per-token dynamic activations: npu_dynamic_quant +
  npu_quant_matmul), the faster option vLLM-Ascend offers; experts stay bf16.
"""
from __future__ import annotations

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
