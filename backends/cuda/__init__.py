"""CUDA backend: Triton kernels and optional vendor libraries (FlashMLA, DeepGEMM, DeepEP) as providers."""
