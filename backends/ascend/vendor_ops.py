"""Find each vendor op once, where Ascend stacks ship it, and remember where it was found.

The same AscendC kernels reach Python as `torch_npu.<op>` / `torch.ops.npu.<op>` (torch_npu),
`torch.ops.custom.<op>` (CANN recipes' custom_ops wheel) or `torch.ops._C_ascend.<op>` (vllm-ascend build), with
drifting names and signatures (DESIGN.md section 3). A provider names its candidates as "namespace.op" strings in probing order, e.g.
("custom.npu_moe_gating_top_k", "_C_ascend.moe_gating_top_k_hash"); `resolve` returns the first one present.

The torch.ops namespaces of the extensions exist only after their Python module is imported, so the first probe
imports each installed extension once (`load_extensions`) and records what loaded; `resolved_ops()` reports both.
Nothing here imports torch_npu: it reads `sys.modules`, so it finds nothing before `--device ascend` imported it.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable

import torch

from . import chip as chip_mod

Candidates = tuple[str, ...]

# (torch.ops namespace it registers, module to import, where that recipe comes from)
EXTENSIONS = (
    ("_C_ascend", "vllm_ascend.vllm_ascend_C", "vllm-ascend vllm_ascend/utils.py::enable_custom_op"),
    ("custom", "custom_ops", "cann-recipes custom_ops wheel (kernel READMEs: `import custom_ops`)"),
)   # (CANN ops-transformer's cann_ops_transformer namespace is not probed: no provider has a candidate there)

_CACHE: dict[Candidates, tuple[Callable | None, str]] = {}
_EXTENSIONS: dict[str, str] = {}      # module -> "loaded" | why it was not
_CALLED: dict[str, None] = {}         # "namespace.name" of every op called since the last take_called()


def _vllm_ascend_env() -> None:
    """What vllm-ascend's bootstrap_custom_op_env does before importing its kernels: point CANN at the op package
    the wheel ships (ASCEND_CUSTOM_OPP_PATH), without importing vllm."""
    spec = importlib.util.find_spec("vllm_ascend")
    for base in (spec.submodule_search_locations or []) if spec else []:
        vendor = os.path.join(base, "_cann_ops_custom", "vendors", "custom_transformer")
        if os.path.isdir(vendor):
            paths = [p for p in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if p]
            if vendor not in paths:
                os.environ["ASCEND_CUSTOM_OPP_PATH"] = ":".join([vendor] + paths)


def load_extensions() -> dict[str, str]:
    """Import each installed op extension once (after torch_npu); {module: "loaded" | reason}."""
    if _EXTENSIONS or "torch_npu" not in sys.modules:
        return dict(_EXTENSIONS)
    for _ns, module, source in EXTENSIONS:
        top = module.split(".")[0]
        if top == "vllm_ascend" and chip_mod.chip() == "950":
            _EXTENSIONS[module] = ("not loaded on the 950: vllm-ascend turns all its custom ops off there "
                                   f"({source})")
            continue
        try:
            if importlib.util.find_spec(top) is None:
                _EXTENSIONS[module] = "not installed"
                continue
            if top == "vllm_ascend":
                _vllm_ascend_env()
            importlib.import_module(module)
            _EXTENSIONS[module] = "loaded"
        except Exception as e:  # noqa: BLE001  (a broken extension only disables its ops; the reason is kept)
            _EXTENSIONS[module] = f"import failed: {type(e).__name__}: {e}"
    return dict(_EXTENSIONS)


def lookup(key: str, module=None) -> Callable | None:
    """The op "namespace.name" as this process has it now, or None: a `torch_npu` attribute (of `module`, default
    the imported torch_npu) or a torch.ops one. Not cached (resolve() caches)."""
    namespace, name = key.split(".", 1)
    if namespace == "torch_npu":
        mod = module if module is not None else sys.modules.get("torch_npu")
        return getattr(mod, name, None) if mod is not None else None
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def resolve(candidates: Candidates) -> tuple[Callable | None, str]:
    """(callable, "namespace.name") of the first candidate present, or (None, reason); probed once."""
    if candidates not in _CACHE:
        if "torch_npu" not in sys.modules:
            return None, "torch_npu is not imported (choose --device ascend on an NPU host)"
        load_extensions()
        for key in candidates:
            fn = lookup(key)
            if fn is not None:
                _CACHE[candidates] = (fn, key)
                break
        else:
            _CACHE[candidates] = (None, "not found: " + ", ".join(candidates)
                                  + " (update torch_npu / CANN, or install vllm-ascend or CANN recipes' custom_ops)")
    return _CACHE[candidates]


def reasons(candidates: Candidates) -> list[str]:
    fn, where = resolve(candidates)
    return [] if fn is not None else [where]


def where(candidates: Candidates) -> str | None:
    """"namespace.name" the candidates resolved to, or None."""
    fn, key = resolve(candidates)
    return key if fn is not None else None


def call(candidates: Candidates, *args, **kwargs):
    fn, key = resolve(candidates)
    if fn is None:
        raise RuntimeError(key)
    _CALLED[key] = None
    return fn(*args, **kwargs)


def take_called() -> list[str]:
    """The vendor ops ("namespace.name") called since the last take_called(), in first-call order; resets. Lets a
    conformance record name exactly which build of which op its case ran."""
    out = list(_CALLED)
    _CALLED.clear()
    return out


def arg_names(candidates: Candidates) -> set[str] | None:
    """The argument names of the resolved op (from its torch schema, else its Python signature); None when the op
    is missing or its signature cannot be read. torch_npu 2.10's npu_moe_gating_top_k, for one, lacks the hash
    arguments that 2.13 has."""
    fn, _ = resolve(candidates)
    if fn is None:
        return None
    schema = getattr(fn, "_schema", None)
    if schema is None and hasattr(fn, "overloads"):          # torch.ops OpOverloadPacket
        overloads = fn.overloads()
        schema = getattr(fn, overloads[0])._schema if overloads else None
    if schema is not None:
        return {a.name for a in schema.arguments}
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def resolved_ops() -> dict[str, str]:
    """{candidates: where they resolved, or why not} for every op probed so far, and {extension module: status}."""
    out = {" | ".join(c): where for c, (_, where) in _CACHE.items()}
    out.update({f"extension {m}": s for m, s in _EXTENSIONS.items()})
    return out


def reset() -> None:
    _CACHE.clear()
    _EXTENSIONS.clear()
    _CALLED.clear()
