"""Install the spec as a stand-in `torch_npu` on a machine without one (CPU tests; never touches a real torch_npu).

    with installed("A3") as npu:      # 'A2', 'A3' or '950'
        ...                           # `import torch_npu` now yields the stand-in; spec ops run on CPU tensors

Inside the block: sys.modules["torch_npu"] is a module whose `npu_*` attributes are the spec ops of the
`torch_npu` namespace, `torch_npu.npu` reports the chosen SoC, `torch.npu` is set, and the spec ops of the
torch.ops namespaces (`npu`, `custom`, `_C_ascend`) are attached to those namespace objects. Everything is
removed on exit. The stand-in carries `__spec_standin__ = True` so the library labels its results as simulated.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch

from . import SPEC_OPS
from . import ep as ep_spec
from .contract import SOC_DEVICE_NAME, SOC_VERSION, soc_family, use_soc

OPS_NAMESPACES = ("npu", "custom", "_C_ascend")


def _bound(op, namespace):
    def call(*args, **kwargs):
        return op.invoke(namespace, args, kwargs)
    call.__name__ = op.name
    call.__doc__ = op.__doc__
    return call


def build_module(soc: str) -> types.ModuleType:
    family = soc_family(soc)
    mod = types.ModuleType("torch_npu", f"Stand-in torch_npu built from dsv4_portable's executable spec ({family})")
    mod.__version__ = f"spec-standin ({family})"
    mod.__spec_standin__ = True
    npu = types.SimpleNamespace(
        get_soc_version=lambda: SOC_VERSION[family],
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_name=lambda *a: f"{SOC_DEVICE_NAME[family]} (spec stand-in on CPU)",
    )
    mod.npu = npu
    for op in SPEC_OPS.values():
        if "torch_npu" in op.namespaces:
            setattr(mod, op.name, _bound(op, "torch_npu"))
    # MC2 ops take an HCCL communicator name; under the spec a gloo group's name comes from here (ep.py).
    mod.spec_comm_name = ep_spec.comm_name
    return mod


@contextlib.contextmanager
def installed(soc: str = "A2"):
    if "torch_npu" in sys.modules and not getattr(sys.modules["torch_npu"], "__spec_standin__", False):
        raise RuntimeError("a real torch_npu is imported in this process; the stand-in will not replace it")
    family = soc_family(soc)
    mod = build_module(family)
    previous_module = sys.modules.get("torch_npu")
    previous_npu = getattr(torch, "npu", None)
    had_npu = hasattr(torch, "npu")
    attached = []
    sys.modules["torch_npu"] = mod
    torch.npu = mod.npu
    try:
        for op in SPEC_OPS.values():
            for ns in op.namespaces:
                if ns in OPS_NAMESPACES:
                    target = getattr(torch.ops, ns)
                    setattr(target, op.name, _bound(op, ns))
                    attached.append((target, op.name))
        with use_soc(family):
            yield mod
    finally:
        for target, name in attached:
            if name in vars(target):
                delattr(target, name)
        if previous_module is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous_module
        if had_npu:
            torch.npu = previous_npu
        elif hasattr(torch, "npu"):
            del torch.npu
