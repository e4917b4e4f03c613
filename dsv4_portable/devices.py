"""The three `--device` backends and how each decides whether it can run here.

torch_npu is imported only by `ascend_availability()`, i.e. only when the ascend backend is chosen or probed;
nothing else in the library imports it.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .registry import Backend, add_backend


def cuda_availability() -> list[str]:
    if cuda_simulated():
        return []
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return [f"no CUDA device visible to torch (torch {torch.__version__} is {build})"]
    return []


def ascend_availability() -> list[str]:
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
        return ["torch_npu is not installed (pip install the torch_npu build matching your CANN toolkit and torch "
                f"{torch.__version__.split('+')[0]}; see README 'Ascend')"]
    try:
        import torch_npu  # noqa: F401  (only here: registers the 'npu' device)
    except Exception as e:  # the vendor import raises OSError/RuntimeError when CANN is missing
        return [f"import torch_npu failed: {type(e).__name__}: {e} (is CANN installed and set_env.sh sourced?)"]
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return ["torch_npu imported but no NPU is visible (torch.npu.is_available() is False)"]
    return []


def cuda_simulated() -> str | None:
    """With TRITON_INTERPRET=1 and no GPU, the cuda backend runs its Triton kernels on CPU tensors (slow; a check
    of the kernels' indexing, masking and reductions). Vendor providers stay unavailable (they need a GPU)."""
    if interpret_mode() and not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return "Triton interpreter on CPU tensors (TRITON_INTERPRET=1): not a GPU result"
    return None


def ascend_simulated() -> str | None:
    """Under the executable spec's stand-in torch_npu (conformance/ascend_spec/standin.py) the ascend providers run
    the spec of each vendor op on CPU tensors: a check of our calls and mappings, never an NPU result."""
    mod = sys.modules.get("torch_npu")
    if getattr(mod, "__spec_standin__", False):
        return f"Ascend vendor-op spec on CPU tensors ({mod.__version__}): not an NPU result"
    return None


def cuda_weight_mode(requested: str) -> tuple[str, str]:
    """weights="auto" on cuda: FP4 experts run natively only where the GPU has FP4 matrix units (compute
    capability 10 and up, Blackwell); below that they are converted losslessly to FP8 blocks at load."""
    if requested != "auto":
        return requested, f"cuda: {requested} (as requested)"
    if cuda_simulated():
        return "native", "cuda (simulated on CPU): native (auto: no GPU to ask for FP4 units)"
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        return "fp8", (f"cuda sm_{major}{minor}: fp8 (auto: no FP4 matrix units below compute capability 10; FP4 "
                       "experts are converted losslessly to FP8 at load)")
    return "native", f"cuda sm_{major}{minor}: native (auto: the GPU has FP4 matrix units)"


def ascend_weight_mode(requested: str) -> tuple[str, str]:
    """The chip decides (backends/ascend/weights.py): bf16 on A2/A3 (no FP8/FP4 units), native on the 950."""
    from .backends.ascend.weights import weight_mode_for
    mode, why = weight_mode_for("native" if requested == "auto" else requested)
    return mode, (f"auto: {why}" if requested == "auto" else why)


CPU = add_backend(Backend("cpu", "cpu", [], [], None, "The pure-PyTorch reference."))
CUDA = add_backend(Backend(
    "cuda", "cuda", ["flash_mla", "deep_gemm", "triton"], ["dsv4_portable.backends.cuda"], cuda_availability,
    "Needs an NVIDIA GPU and a CUDA build of torch; Triton kernels need `pip install triton`.", cuda_simulated,
    cuda_weight_mode))
# DESIGN.md 3 ranks triton-ascend kernels after the CANN ops; there are none yet, so the list holds cann alone.
ASCEND = add_backend(Backend(
    "ascend", "npu", ["cann"], ["dsv4_portable.backends.ascend"], ascend_availability,
    "Needs an Ascend NPU with CANN and the matching torch_npu; see README 'Ascend'.", ascend_simulated,
    ascend_weight_mode))


def interpret_mode() -> bool:
    """True when Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
