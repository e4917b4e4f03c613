"""Which EP exchange runs a MoE layer, chosen per device the way the op registry chooses op providers.

A provider runs one whole expert-parallel MoE layer (dispatch, local experts, combine) for a call described by
`EPCall`. It has `availability()` (can it run on this machine at all) and `supports(call)` (can it run this
call), each a list of reasons, empty meaning yes. The active backend's device type (`--device cpu|cuda|ascend`,
`registry.active_backend()`) picks the preference order; the first available provider that supports the call
runs, `torch-dist` being the last resort everywhere. Nothing falls back silently: a provider that raises fails
the call, and every run records which provider and transport ran (`Comm.ran`).

    torch-dist  the all_to_all_single exchange of dispatch.py / waves.py over any torch.distributed backend
                (gloo, nccl, hccl): the ordered combine is bitwise equal to the single-device MoE.
    mc2         Ascend `npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2` (mc2.py), A2/A3; the
                vendor reduces in its own order, so it serves the partial (tolerance) combine only.
    deepep      CUDA DeepEP: detected, always declined: no adapter is written because it cannot be verified
                here (no GPU, and multi-rank DeepEP needs two or more GPUs).

`EPCall` holds only facts every rank agrees on (world size, widths, the largest token count over the ranks), so
every rank makes the same choice and issues the same collectives.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class EPCall:
    device_type: str            # the active backend's device type: cpu, cuda or npu
    world_size: int
    hidden: int
    topk: int
    num_physical: int           # physical experts (logical experts plus redundant copies)
    experts_per_rank: int
    max_tokens: int | None      # the largest token count over the ranks (None when no candidate needs it)
    dtype: torch.dtype
    fp8: bool
    mode: str                   # "ordered" | "partial"
    wave_size: int | None


@dataclass(frozen=True)
class EPProvider:
    name: str
    device_type: str            # "cpu", "cuda", "npu" or "any"
    fn: Callable                # fn(x, topk_idx, topk_weights, experts, shared, swiglu_limit, placement, comm,
    #                               call, **options) -> out [T, H]
    available_fn: Callable[[], list[str]]
    supports_fn: Callable[[EPCall], list[str]]
    needs_max_tokens: bool = False   # supports() reads call.max_tokens (costs one small exchange per call)

    def availability(self) -> list[str]:
        # Not cached: a vendor module can appear (the Ascend spec stand-in) within one process.
        return list(self.available_fn())

    def supports(self, call: EPCall) -> list[str]:
        return list(self.supports_fn(call))


def _torch_dist_forward(*args, **kwargs):
    from .moe import torch_dist_forward
    return torch_dist_forward(*args, **kwargs)


def _mc2_forward(*args, **kwargs):
    from .mc2 import mc2_moe_forward
    return mc2_moe_forward(*args, **kwargs)


def _mc2_available() -> list[str]:
    from .mc2 import availability
    return availability()


def _mc2_supports(call: EPCall) -> list[str]:
    from .mc2 import supports
    return supports(call)


def _torch_dist_available() -> list[str]:
    return [] if torch.distributed.is_available() else ["torch.distributed is not built into this torch"]


def _deepep_available() -> list[str]:
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if importlib.util.find_spec("deep_ep") is None:
        reasons.append("deep_ep is not installed (PyPI: sgl-deep-ep)")
    return reasons


def _deepep_supports(call: EPCall) -> list[str]:
    return ["no DeepEP adapter is written: it could not be verified without GPUs (multi-rank DeepEP needs two or "
            "more); torch-dist over nccl runs instead"]


def _deepep_forward(*args, **kwargs):
    raise NotImplementedError("DeepEP adapter not written (providers.py: it always declines)")


PROVIDERS = {
    "torch-dist": EPProvider("torch-dist", "any", _torch_dist_forward, _torch_dist_available, lambda call: []),
    "mc2": EPProvider("mc2", "npu", _mc2_forward, _mc2_available, _mc2_supports, needs_max_tokens=True),
    "deepep": EPProvider("deepep", "cuda", _deepep_forward, _deepep_available, _deepep_supports),
}
PREFERENCE = {"cpu": ("torch-dist",), "cuda": ("deepep", "torch-dist"), "npu": ("mc2", "torch-dist")}


def candidates(device_type: str) -> list[EPProvider]:
    if device_type not in PREFERENCE:
        raise ValueError(f"EP: unknown device type {device_type!r} (cpu, cuda or npu)")
    return [PROVIDERS[n] for n in PREFERENCE[device_type]]


def select(call: EPCall, requested: str | None = None) -> tuple[EPProvider, dict[str, list[str]]]:
    """(provider that runs, {provider skipped: reasons}). requested: one provider name, which must be able to run
    the call (its reasons are raised otherwise)."""
    if requested is not None:
        if requested not in PROVIDERS:
            raise ValueError(f"EP: unknown provider {requested!r} (known: {', '.join(PROVIDERS)})")
        p = PROVIDERS[requested]
        if p.device_type not in (call.device_type, "any"):
            raise ValueError(f"EP: provider {requested} runs on {p.device_type}, the active device is "
                             f"{call.device_type}")
        reasons = p.availability() or p.supports(call)
        if reasons:
            raise ValueError(f"EP: provider {requested} cannot run this call: {'; '.join(reasons)}")
        return p, {}
    skipped = {}
    for p in candidates(call.device_type):
        reasons = p.availability() or p.supports(call)
        if not reasons:
            return p, skipped
        skipped[p.name] = reasons
    raise RuntimeError(f"EP: no provider can run this call: {skipped}")   # unreachable: torch-dist supports all


def explain(call: EPCall) -> list[tuple[str, str, list[str]]]:
    """[(provider, "chosen" | "skipped" | "not reached", reasons)] for this call, in preference order."""
    out, chosen = [], False
    for p in candidates(call.device_type):
        if chosen:
            out.append((p.name, "not reached", []))
            continue
        reasons = p.availability() or p.supports(call)
        out.append((p.name, "skipped" if reasons else "chosen", reasons))
        chosen = not reasons
    return out
