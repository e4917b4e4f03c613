"""Install the spec as a stand-in `torch_npu` on a machine without one (CPU tests; never touches a real torch_npu).

    with installed("A3") as npu:      # 'A2', 'A3' or '950'
        ...                           # `import torch_npu` now yields the stand-in; spec ops run on CPU tensors

Inside the block: sys.modules["torch_npu"] is a module whose `npu_*` attributes are the spec ops of the
`torch_npu` namespace, `torch_npu.npu` reports the chosen SoC, `torch.npu` is set, and the spec ops of torch_npu's
own torch.ops namespace (`npu`) are attached to it. The extension namespaces behave as on a real host: their
ops appear only once the extension's module is imported (`vllm_ascend.vllm_ascend_C` registers `_C_ascend`,
`custom_ops` registers `custom`), so a backend that forgets to import them finds nothing. `extensions` chooses
which extensions the stand-in host has installed. Everything is removed on exit. The stand-in carries
`__spec_standin__ = True` so the library labels its results as simulated.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch

from . import SPEC_OPS
from . import ep as ep_spec
from .contract import SOC_DEVICE_NAME, SOC_VERSION, TORCH_NPU_DTYPE_IDS, soc_family, use_soc

TORCH_NPU_NAMESPACES = ("npu",)                 # registered by `import torch_npu` itself
EXTENSION_MODULES = {                            # module whose import registers a torch.ops namespace
    "vllm_ascend.vllm_ascend_C": "_C_ascend",
    "custom_ops": "custom",
}
ALL_EXTENSIONS = tuple(EXTENSION_MODULES)


def _bound(op, namespace):
    def call(*args, **kwargs):
        return op.invoke(namespace, args, kwargs)
    call.__name__ = op.name
    call.__doc__ = op.__doc__
    call.__signature__ = op.signature            # what inspect.signature reads, like a real op's schema
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
    for name, dtype_id in TORCH_NPU_DTYPE_IDS.items():     # torch_npu's own dtype ids (hifloat8 290, ..., fp4 296)
        setattr(mod, name, dtype_id)
    for op in SPEC_OPS.values():
        if "torch_npu" in op.namespaces:
            setattr(mod, op.name, _bound(op, "torch_npu"))
    # MC2 ops take an HCCL communicator name; under the spec a gloo group's name comes from here (ep.py).
    mod.spec_comm_name = ep_spec.comm_name
    return mod


class _Attached:
    """Spec ops attached to torch.ops namespaces, removed again on exit."""

    def __init__(self):
        self.items: list[tuple[object, str]] = []

    def namespace(self, ns: str) -> None:
        target = getattr(torch.ops, ns)
        for op in SPEC_OPS.values():
            if ns in op.namespaces:
                setattr(target, op.name, _bound(op, ns))
                self.items.append((target, op.name))

    def remove(self) -> None:
        for target, name in self.items:
            if name in vars(target):
                delattr(target, name)
        self.items.clear()


class _ExtensionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes the installed stand-in extensions importable; importing one attaches its namespace's spec ops."""

    def __init__(self, modules: dict[str, str], attached: _Attached):
        self.modules, self.attached = modules, attached
        self.packages = {m.rsplit(".", 1)[0] for m in modules if "." in m}
        self.created: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.modules or fullname in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in self.packages)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__spec_standin__ = True
        self.created.append(module.__name__)
        ns = self.modules.get(module.__name__)
        if ns is not None:
            self.attached.namespace(ns)


@contextlib.contextmanager
def installed(soc: str = "A2", extensions: tuple[str, ...] = ALL_EXTENSIONS):
    """extensions: which op extensions the simulated host has installed (modules of EXTENSION_MODULES)."""
    if "torch_npu" in sys.modules and not getattr(sys.modules["torch_npu"], "__spec_standin__", False):
        raise RuntimeError("a real torch_npu is imported in this process; the stand-in will not replace it")
    unknown = set(extensions) - set(EXTENSION_MODULES)
    if unknown:
        raise ValueError(f"unknown stand-in extensions {sorted(unknown)} (known: {ALL_EXTENSIONS})")
    family = soc_family(soc)
    mod = build_module(family)
    previous_module = sys.modules.get("torch_npu")
    previous_npu = getattr(torch, "npu", None)
    had_npu = hasattr(torch, "npu")
    attached = _Attached()
    finder = _ExtensionFinder({m: EXTENSION_MODULES[m] for m in extensions}, attached)
    sys.modules["torch_npu"] = mod
    torch.npu = mod.npu
    sys.meta_path.insert(0, finder)
    try:
        for ns in TORCH_NPU_NAMESPACES:
            attached.namespace(ns)
        with use_soc(family):
            yield mod
    finally:
        sys.meta_path.remove(finder)
        for name in finder.created:
            sys.modules.pop(name, None)
        attached.remove()
        if previous_module is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous_module
        if had_npu:
            torch.npu = previous_npu
        elif hasattr(torch, "npu"):
            del torch.npu
