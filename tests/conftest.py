"""Session-wide guard: the CPU test suite never imports a real torch_npu (only the spec stand-in may appear)."""
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def no_real_torch_npu():
    yield
    mod = sys.modules.get("torch_npu")
    assert mod is None or getattr(mod, "__spec_standin__", False), "the test session imported a real torch_npu"
