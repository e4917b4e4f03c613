"""Which Ascend generation this is, and what its cube units compute (research/ascend.md section 1 and 4).

A2 (910B, SoC 220-225) and A3 (910C, 250-255): bf16, fp16, int8, int4 arithmetic; no FP8 / FP4. 950 (SoC 260):
adds FP8 (e4m3, block and MX scaling) and MXFP4 (e2m1 with e8m0 per 32 = the checkpoint's FP4 format).
"""
from __future__ import annotations

import sys


def soc_version() -> int | None:
    mod = sys.modules.get("torch_npu")
    if mod is None:
        return None
    try:
        return int(mod.npu.get_soc_version())
    except Exception:   # older torch_npu builds without get_soc_version
        return None


def chip() -> str | None:
    """'A2', 'A3', '950', or None when unknown (no torch_npu imported, or an unlisted SoC id).
    The conformance spec keeps its own copy of this table on purpose: it checks the backend, so it must not share
    the backend's reading of the vendor's ids."""
    soc = soc_version()
    if soc is None:
        return None
    if 220 <= soc <= 225:
        return "A2"
    if 250 <= soc <= 255:
        return "A3"
    if soc == 260:
        return "950"
    return None
