"""One place where the providers launch their Triton kernels, so a tool can intercept the launches.

`launch(kernel, grid, *args, **meta)` is `kernel[grid](*args, **meta)` with two guards every provider needs:
- the grid is checked against CUDA's limits (x < 2^31, y and z <= 65535) and a grid over them raises a
  ValueError naming the kernel, instead of an invalid-launch error at some later synchronisation;
- the launch runs with the tensors' GPU as the current device: Triton launches on the current device and its
  stream, so tensors on cuda:1 while cuda:0 is current would be read through the wrong context (an illegal
  memory access) without the guard.
If a hook is installed with `intercept(hook)`, hook(kernel, grid, args, meta) runs instead and nothing is
launched (after the grid check). The offline compile check (compile_check.py) uses that to compile exactly what
the providers would launch, for a GPU target, on a machine without a GPU; the tests use it to record launch
configurations. Triton-free on purpose.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

MAX_GRID = (2 ** 31 - 1, 65535, 65535)   # CUDA's gridDim limits (x, y, z)

_hook: Callable | None = None


def check_grid(kernel, grid) -> None:
    """Raise a ValueError when a grid dimension is outside CUDA's limits (or the grid has more than 3 dims)."""
    grid = tuple(grid)
    name = getattr(kernel, "__name__", repr(kernel))
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{name}: a launch grid has 1 to 3 dims, got {grid}")
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 0 <= n <= limit:
            raise ValueError(f"{name}: grid {grid} has {n} programs on axis {'xyz'[axis]}; CUDA allows "
                             f"0..{limit} there")


def tensor_device(args) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among the kernel arguments, None when there is none."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def launch(kernel, grid, *args, **meta):
    check_grid(kernel, grid)
    if _hook is not None:
        return _hook(kernel, grid, args, meta)
    dev = tensor_device(args)
    if dev is not None and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return kernel[grid](*args, **meta)
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
