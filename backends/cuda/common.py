"""Shared availability/supports helpers for the CUDA backend's Triton providers.

Triton kernels run on CUDA tensors on a GPU, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before the kernels are imported). The interpreter mode exists so CI can check the
kernels' indexing, masking and reductions on CPU; it says nothing about speed.
"""
from __future__ import annotations

import importlib.util

import torch

from dsv4_portable.devices import interpret_mode


def triton_availability() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install 'dsv4-portable[cuda]')"]
    if interpret_mode():
        return []
    if not torch.cuda.is_available():
        return ["no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors for testing)"]
    return []


def device_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Reasons the tensors cannot be handled: they must be on CUDA (on CPU under the interpreter)."""
    want = "cpu" if interpret_mode() else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            return [f"tensor on {t.device}, this provider runs on {want}"
                    + (" (Triton interpreter)" if want == "cpu" else "")]
    return []


def capability() -> tuple[int, int]:
    """(major, minor) compute capability of the current GPU, (0, 0) when there is none."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
