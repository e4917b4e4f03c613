"""Which EP transport would run a call, and why the others cannot (the EP counterpart of the op registry).

`torch-dist` (the all_to_all_single transport of dispatch.py) runs everywhere torch.distributed does. DeepEP
(CUDA) and Ascend MC2 (`npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2`) are seams: detected
here, with the reasons they are not used. No adapter for them is written or verified yet, so `supports()` always
declines them with that reason: nothing ever runs under their names.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class EPProvider:
    name: str
    device_type: str
    available_fn: Callable[[], list[str]]
    supports_fn: Callable[..., list[str]]

    def availability(self) -> list[str]:
        return self.available_fn()

    def supports(self, **call) -> list[str]:
        return self.supports_fn(**call)


def _torch_dist_available() -> list[str]:
    return [] if torch.distributed.is_available() else ["torch.distributed is not built into this torch"]


def _deepep_available() -> list[str]:
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if importlib.util.find_spec("deep_ep") is None:
        reasons.append("deep_ep is not installed (PyPI: sgl-deep-ep)")
    return reasons


def _mc2_available() -> list[str]:
    # torch_npu is imported only by the ascend backend; never import it here (it breaks torch without CANN).
    npu = sys.modules.get("torch_npu")
    if npu is None:
        return ["torch_npu is not loaded (choose --device ascend on an Ascend host)"]
    missing = [n for n in ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2") if not hasattr(npu, n)]
    return [f"torch_npu lacks {', '.join(missing)}"] if missing else []


def _not_wired(what: str) -> Callable[..., list[str]]:
    def supports(**_) -> list[str]:
        return [f"{what} adapter not implemented in dsv4_portable yet (needs a multi-device host to verify); "
                "the torch-dist transport runs instead"]
    return supports


PROVIDERS = [
    EPProvider("deepep", "cuda", _deepep_available, _not_wired("DeepEP")),
    EPProvider("mc2", "npu", _mc2_available, _not_wired("MC2 dispatch_v2/combine_v2")),
    EPProvider("torch-dist", "any", _torch_dist_available, lambda **_: []),
]


def explain(device_type: str, **call) -> tuple[str, dict[str, list[str]]]:
    """(provider that runs, {skipped provider: reasons}) for an EP call on device_type."""
    skipped = {}
    for p in PROVIDERS:
        if p.device_type not in (device_type, "any"):
            continue
        reasons = p.availability() or p.supports(**call)
        if not reasons:
            return p.name, skipped
        skipped[p.name] = reasons
    raise RuntimeError(f"no EP transport can run here: {skipped}")
