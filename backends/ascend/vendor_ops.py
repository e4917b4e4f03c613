"""Find each vendor op once, in the namespaces where Ascend stacks ship it, and remember where it was found.

The same AscendC kernels reach Python as `torch_npu.<op>` / `torch.ops.npu.<op>` (torch_npu), `torch.ops.custom.<op>`
(CANN recipes' custom_ops wheel), `torch.ops._C_ascend.<op>` (vllm-ascend build) or
`torch.ops.cann_ops_transformer.<op>` (CANN ops-transformer), with drifting signatures (DESIGN.md section 3).
Each provider asks for the namespaces whose signature it implements; `resolved_ops()` reports what was found.
Nothing here imports torch_npu: it reads `sys.modules`, so it only finds ops after the ascend backend imported it.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

_CACHE: dict[tuple[str, tuple[str, ...]], tuple[Callable | None, str]] = {}


def _lookup(name: str, namespace: str) -> Callable | None:
    if namespace == "torch_npu":
        mod = sys.modules.get("torch_npu")
        return getattr(mod, name, None) if mod is not None else None
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def resolve(name: str, namespaces: tuple[str, ...]) -> tuple[Callable | None, str]:
    """(callable, "namespace.name") or (None, reason), probed once per (op, namespaces)."""
    key = (name, namespaces)
    if key not in _CACHE:
        if "torch_npu" not in sys.modules:
            return None, "torch_npu is not imported (choose --device ascend on an NPU host)"
        for ns in namespaces:
            fn = _lookup(name, ns)
            if fn is not None:
                _CACHE[key] = (fn, f"{ns}.{name}")
                break
        else:
            _CACHE[key] = (None, f"{name} not found in " + ", ".join(f"{ns}" for ns in namespaces)
                           + " (update torch_npu / CANN, or install vllm-ascend or CANN recipes' custom_ops)")
    return _CACHE[key]


def reasons(name: str, namespaces: tuple[str, ...]) -> list[str]:
    fn, where = resolve(name, namespaces)
    return [] if fn is not None else [where]


def call(name: str, namespaces: tuple[str, ...], *args, **kwargs):
    fn, where = resolve(name, namespaces)
    if fn is None:
        raise RuntimeError(where)
    return fn(*args, **kwargs)


def resolved_ops() -> dict[str, str]:
    """{op: where it was found, or why not} for every op probed so far."""
    return {name: where for (name, _), (_, where) in _CACHE.items()}


def reset() -> None:
    _CACHE.clear()
