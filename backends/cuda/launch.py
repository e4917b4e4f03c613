"""One place where the compute providers launch their Triton kernels, so a tool can intercept the launches.

`launch(kernel, grid, *args, **meta)` is `kernel[grid](*args, **meta)`, unless a hook is installed with
`intercept(hook)`: then hook(kernel, grid, args, meta) runs instead and nothing is launched. The offline
compile check (compile_check.py) uses that to compile exactly what the providers would launch, for a GPU
target, on a machine without a GPU; the tests use it to record launch configurations. Triton-free on purpose.
"""
from __future__ import annotations

import contextlib
from typing import Callable

_hook: Callable | None = None


def launch(kernel, grid, *args, **meta):
    if _hook is not None:
        return _hook(kernel, grid, args, meta)
    return kernel[grid](*args, **meta)


@contextlib.contextmanager
def intercept(hook: Callable):
    """Route every launch to hook(kernel, grid, args, meta) inside the block (not thread-safe: a tool hook)."""
    global _hook
    prev, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = prev
