"""CUDA backend: Triton kernels and optional vendor libraries (FlashMLA, DeepGEMM, DeepEP) as providers."""

# Compute-heavy providers (Triton kernels load lazily on first call; vendor adapters probe their library).
from . import attention, gemm, indexer, moe, vendor  # noqa: F401
# Memory-bound providers (quantisers, norm/RoPE, mHC, compressor, routing).
from . import compressor, hadamard, mhc, norm_rope, quant, routing  # noqa: F401
