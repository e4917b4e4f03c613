"""One JSON Lines record per conformance case (DESIGN.md section 5).

Every section of the suite (single ops, Ascend "vendor op vs spec", expert parallelism) writes `CaseRecord`s so
that one report and one summary cover all of them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class CaseRecord:
    section: str                 # "op" | "vendor_spec" | "ep"
    op: str                      # registry op name (or vendor op name in the vendor_spec section)
    case_id: str                 # stable, human-readable: "sparse_attn/no_valid_rows"
    seed: int
    provider: str                # provider that actually ran ("reference", "triton", "cann", "gloo-ep", ...)
    skipped_providers: dict[str, list[str]]   # provider -> reasons it was not chosen
    device: str                  # "cpu", "NVIDIA H100 80GB HBM3 (sm_90)", "Ascend910B3 (A2)", ...
    versions: dict[str, str]     # torch, triton, torch_npu, cann, dsv4_portable ...
    shapes: dict[str, Any]       # argument name -> shape list
    dtypes: dict[str, str]       # argument name -> dtype name
    max_abs: float | None = None
    max_rel: float | None = None
    mismatch_frac: float | None = None
    similarity: float | None = None          # 1 - DeepSeek's calc_diff (cosine-type), 1.0 = identical
    deterministic: bool | None = None        # two runs bitwise equal
    batch_invariant: bool | None = None      # row b of a batch bitwise equals the single-row run (None = n/a)
    tolerance: dict[str, Any] = dataclasses.field(default_factory=dict)  # atol/rtol/exact/min_similarity + "source"
    transport: str | None = None             # EP only: "cpu-gloo multi-process", "device single-rank", ...
    world_size: int | None = None            # EP only: ranks in the process group
    vendor_ops: list[str] | None = None      # Ascend: the vendor ops ("namespace.name") the case ran
    status: str = "fail"                     # "pass" | "fail" | "skip" | "error"
    message: str = ""                        # why it failed / was skipped, or the error text
    duration_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> "CaseRecord":
        return cls(**json.loads(line))
