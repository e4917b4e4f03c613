"""Shared checks of the Ascend providers: where tensors must live, and the availability of a vendor op."""
from __future__ import annotations

import sys
import weakref
from typing import Callable

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


_PREPARED: dict[tuple[int, str], object] = {}


def prepared(owner, tag: str, make: Callable[[], object]):
    """Weight re-layouts the vendor ops need, made once per weight (`make()` on first use) and dropped when the
    weight is: the prepare step runs at the first call instead of every call."""
    key = (id(owner), tag)
    if key not in _PREPARED:
        _PREPARED[key] = make()
        weakref.finalize(owner, _PREPARED.pop, key, None)
    return _PREPARED[key]
