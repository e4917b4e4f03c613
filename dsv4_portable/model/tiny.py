"""The built-in tiny model: seeded random weights written once as a real-format checkpoint (FP8 dense linears with
e8m0 block scales, FP4 experts), so `dsv4 run` exercises the same loader and quantised paths as a real model."""
from __future__ import annotations

import os
import pathlib
import sys

from ..config import load_preset
from .checkpoint import random_tensors, save_checkpoint

TINY_SEED = 20261124


def cache_dir() -> pathlib.Path:
    base = os.environ.get("DSV4_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dsv4_portable")
    return pathlib.Path(base).expanduser()


def tiny_checkpoint(quiet: bool = False) -> pathlib.Path:
    """Path of the tiny checkpoint, writing it on first use (atomically, so a crash never leaves half a model)."""
    cfg = load_preset("tiny")
    path = cache_dir() / f"tiny-v2-{TINY_SEED}"
    if (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if not quiet:
        print(f"writing the built-in tiny model to {path} (once)", file=sys.stderr)
    save_checkpoint(tmp, cfg, random_tensors(cfg, TINY_SEED))
    try:
        tmp.rename(path)
    except OSError:  # another process won the race; use its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return path
