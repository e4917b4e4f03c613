"""dsv4_portable: DeepSeek-V4 on NVIDIA GPUs and Huawei Ascend NPUs from one code base.

    import dsv4_portable as dsv4
    dsv4.set_backend("cpu")                # or "cuda", "ascend"
    y = dsv4.ops.sparse_attn(q, kv, sink, idx, 512 ** -0.5)
"""
from . import devices, ops  # noqa: F401  (defines the ops and the three backends)
from .registry import (BACKENDS, OPS, BackendUnavailableError, NoProviderError, OpInputError, UnknownDeviceError,
                       active_backend, explain, get_backend, get_op, provider_counts, reset_counts, set_backend,
                       use_backend)

__version__ = "0.1.0"
__all__ = ["load_model", "ops", "devices", "BACKENDS", "OPS", "BackendUnavailableError", "NoProviderError", "OpInputError",
           "UnknownDeviceError", "active_backend", "explain", "get_backend", "get_op", "provider_counts", "reset_counts",
           "set_backend", "use_backend"]


def load_model(*args, **kwargs):
    """See dsv4_portable.api.load_model."""
    from .api import load_model as _load
    return _load(*args, **kwargs)
