"""Shared checks of the Ascend providers: where tensors must live, and the availability of a vendor op."""
from __future__ import annotations

import sys

import torch

from . import chip as chip_mod
from . import vendor_ops


def simulated() -> bool:
    """True under the spec stand-in (conformance/ascend_spec/standin.py): ops run on CPU tensors."""
    return bool(getattr(sys.modules.get("torch_npu"), "__spec_standin__", False))


def device_reasons(*tensors) -> list[str]:
    want = "cpu" if simulated() else "npu"
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != want:
            return [f"tensor on {t.device}, this provider runs on {want}" + (" (spec stand-in)" if simulated() else "")]
    return []


def availability(name: str, namespaces: tuple[str, ...], chips=("A2", "A3", "950")):
    """available_fn for a provider calling vendor op `name`."""
    def available() -> list[str]:
        found = vendor_ops.reasons(name, namespaces)
        if found:
            return found
        c = chip_mod.chip()
        if c not in chips:
            return [f"{name} is used on {', '.join(chips)}; this chip is {c or 'unknown'} "
                    f"(SoC {chip_mod.soc_version()})"]
        return []
    return available
