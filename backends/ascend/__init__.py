"""Ascend backend: CANN / torch_npu vendor ops as providers. Never imports torch_npu at module import time:
the vendor ops are resolved (vendor_ops.py) on first use, after `--device ascend` has imported torch_npu."""
from . import attention, compressor, gemm, indexer, mhc, moe, norm_rope  # noqa: F401  (register the providers)
