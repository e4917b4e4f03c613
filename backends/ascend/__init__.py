"""Ascend backend: CANN / torch_npu vendor ops as providers. Never imports torch_npu at module import time."""
