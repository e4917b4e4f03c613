"""The op registry: dispatch order, strictness, explain, counters, bad input, and backend safety."""
import os
import subprocess
import sys

import pytest
import torch

import dsv4_portable as dsv4
from dsv4_portable import ops
from dsv4_portable.registry import NoProviderError, Provider, Tolerance, get_op


@pytest.fixture
def temp_provider():
    """Register providers on the cpu device type for one test and remove them afterwards."""
    added = []

    def add(op_name, name, fn, available=None, supports=None):
        op = get_op(op_name)
        p = op.register(Provider(op_name, name, "cpu", fn, available, supports))
        added.append((op, p))
        return p

    dsv4.BACKENDS["cpu"].preference[:0] = ["fast", "broken", "picky"]
    with dsv4.use_backend("cpu"):        # whatever an earlier test left active
        yield add
    del dsv4.BACKENDS["cpu"].preference[:3]
    for op, p in added:
        op.providers.remove(p)
        op._plan_key = None
        op.counts.clear()


def test_dispatch_prefers_backend_order_and_counts(temp_provider):
    calls = []
    temp_provider("rms_norm", "fast", lambda x, weight, eps=1e-6: calls.append("fast") or x * 0)
    dsv4.reset_counts()
    x = torch.randn(2, 8)
    assert torch.equal(ops.rms_norm(x, None), torch.zeros_like(x))
    assert calls == ["fast"]
    assert dsv4.provider_counts()["rms_norm"] == {"fast": 1}


def test_supports_reasons_skip_and_explain(temp_provider):
    temp_provider("rms_norm", "picky", lambda *a, **k: None,
                  supports=lambda x, weight, eps=1e-6: [] if x.shape[-1] == 16 else [f"D={x.shape[-1]} != 16"])
    temp_provider("rms_norm", "broken", lambda *a, **k: None, available=lambda: ["library missing"])
    x = torch.randn(2, 8)
    out = ops.rms_norm(x, None)                       # picky declines, broken unavailable -> reference
    torch.testing.assert_close(out, dsv4.reference.rms_norm(x, None))
    report = ops.rms_norm.explain(x, None)
    assert report[0] == ("broken", "skipped", ["library missing"])
    assert report[1] == ("picky", "skipped", ["D=8 != 16"])
    assert report[-1] == ("reference", "chosen", [])
    assert ops.rms_norm.select(torch.randn(2, 16), None).name == "picky"


def test_strict_no_silent_fallback(temp_provider):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")
    temp_provider("rms_norm", "fast", boom)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        ops.rms_norm(torch.randn(2, 8), None)


def test_forced_provider_refuses_with_reasons(temp_provider):
    temp_provider("rms_norm", "broken", lambda *a, **k: None, available=lambda: ["library missing"])
    with pytest.raises(NoProviderError, match="library missing"):
        ops.rms_norm.run("broken", torch.randn(2, 8), None)
    with pytest.raises(KeyError, match="no provider 'nope'"):
        ops.rms_norm.run("nope", torch.randn(2, 8), None)


def test_bad_input_is_named_before_any_provider_runs(temp_provider):
    ran = []
    temp_provider("sparse_attn", "fast", lambda *a, **k: ran.append(1))
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(dsv4.OpInputError, match="argument 'idx' is missing"):
        ops.sparse_attn(q, torch.randn(1, 5, 8), torch.zeros(4), scale=0.1)
    with pytest.raises(dsv4.OpInputError, match="unknown argument 'softmax_scale'"):
        ops.sparse_attn(q, torch.randn(1, 5, 8), torch.zeros(4), torch.zeros(1, 2, 3, dtype=torch.int32),
                        softmax_scale=0.1)
    with pytest.raises(dsv4.OpInputError, match="must be a torch.Tensor"):
        ops.sparse_attn(q, [[1.0]], torch.zeros(4), torch.zeros(1, 2, 3, dtype=torch.int32), 0.1)
    with pytest.raises(dsv4.OpInputError, match="has dtype torch.int64"):
        ops.rms_norm(torch.arange(4), None)
    assert not ran


def test_mixed_devices_rejected():
    meta = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(dsv4.OpInputError, match="same device"):
        ops.sparse_attn(meta, torch.randn(1, 5, 8), torch.zeros(4), torch.zeros(1, 2, 3, dtype=torch.int32), 0.1)


def test_unknown_op_and_device():
    with pytest.raises(dsv4.OpInputError, match="unknown op 'flash'"):
        dsv4.get_op("flash")
    with pytest.raises(dsv4.UnknownDeviceError, match="unknown device 'tpu'.*cpu, cuda, ascend"):
        dsv4.set_backend("tpu")


def test_unavailable_backends_say_why():
    before = dsv4.active_backend().name
    if not torch.cuda.is_available():
        with pytest.raises(dsv4.BackendUnavailableError, match="--device cuda is not available.*no CUDA device"):
            dsv4.set_backend("cuda")
    with pytest.raises(dsv4.BackendUnavailableError, match="torch_npu"):
        dsv4.set_backend("ascend")
    assert dsv4.active_backend().name == before          # a refused backend leaves the active one alone


def test_check_available_says_what_set_backend_says_and_changes_nothing():
    from dsv4_portable.registry import check_available
    with dsv4.use_backend("cpu"):
        with pytest.raises(dsv4.BackendUnavailableError) as checked:
            check_available("ascend")
        with pytest.raises(dsv4.BackendUnavailableError) as chosen:
            dsv4.set_backend("ascend")
        assert str(checked.value) == str(chosen.value)
        with pytest.raises(dsv4.UnknownDeviceError, match="unknown device 'tpu'"):
            check_available("tpu")
        with dsv4.use_backend("ascend", require_available=False):
            assert check_available("cpu").name == "cpu"
            assert dsv4.active_backend().name == "ascend"    # only checked, not made active


def test_every_op_has_reference_last_and_a_tolerance():
    for name, op in dsv4.OPS.items():
        assert op.providers[-1].name == "reference" and op.reference.__doc__, name
        for dt in ("bfloat16", "float32", None):
            assert isinstance(op.tolerance(dt), Tolerance)


def test_importing_everything_never_imports_torch_npu(tmp_path):
    # a torch_npu that explodes on import sits on the path, so an import anywhere fails loudly (without it on the
    # machine, `import torch_npu` would fail quietly inside a try and the test would pass whatever the code did)
    (tmp_path / "torch_npu.py").write_text("raise RuntimeError('torch_npu was imported')\n")
    code = ("import sys, dsv4_portable, dsv4_portable.backends.cuda, dsv4_portable.backends.ascend, "
            "dsv4_portable.conformance, dsv4_portable.reference, dsv4_portable.api, dsv4_portable.ep.model; "
            "import dsv4_portable.registry as r; [b.load_providers() for b in r.BACKENDS.values()]; "
            "r.explain('sparse_attn'); r.get_backend('ascend').weight_mode('auto'); "
            "assert 'torch_npu' not in sys.modules, 'torch_npu imported'; print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    probe = subprocess.run([sys.executable, "-c", "import torch_npu"], capture_output=True, text=True, env=env)
    assert "torch_npu was imported" in probe.stderr           # the stub is the torch_npu this subprocess sees


def test_module_level_explain_names_the_provider_and_the_skips(temp_provider):
    from dsv4_portable import registry
    temp_provider("rms_norm", "picky", lambda *a, **k: None,
                  supports=lambda x, weight, eps=1e-6: [] if x.dim() == 3 else ["needs 3 dims"])
    rows = registry.explain("rms_norm", torch.randn(2, 8), None, backend="cpu")
    assert rows[0] == ("picky", "skipped", ["needs 3 dims"]) and rows[-1] == ("reference", "chosen", [])
    assert registry.explain("rms_norm", torch.randn(1, 2, 8), None, backend="cpu") == \
        [("picky", "chosen", []), ("reference", "not reached", [])]
    x = torch.randn(1, 2, 8)
    assert registry.explain("rms_norm", x, None) == ops.rms_norm.explain(x, None)   # the active backend
    with pytest.raises(dsv4.OpInputError, match="unknown op 'nope'"):
        registry.explain("nope")
    with pytest.raises(dsv4.UnknownDeviceError, match="tpu"):
        registry.explain("rms_norm", backend="tpu")


@pytest.mark.parametrize("capability, want", [((8, 0), "fp8"), ((9, 0), "fp8"), ((10, 0), "native"),
                                               ((12, 0), "native")])
def test_auto_weights_on_cuda_follow_the_fp4_units(monkeypatch, capability, want):
    from dsv4_portable import devices
    monkeypatch.setattr(devices, "cuda_simulated", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    mode, why = dsv4.get_backend("cuda").weight_mode("auto")
    assert mode == want and f"sm_{capability[0]}{capability[1]}" in why
    assert ("no FP4 matrix units" in why) == (want == "fp8")
    assert dsv4.get_backend("cuda").weight_mode("bf16")[0] == "bf16"        # an explicit choice is kept


def test_auto_weights_on_cpu_and_ascend(monkeypatch):
    assert dsv4.get_backend("cpu").weight_mode("auto")[0] == "native"
    assert dsv4.get_backend("cpu").weight_mode("fp8")[0] == "fp8"
    from dsv4_portable.backends.ascend import weights
    for chip, want in (("A2", "bf16"), ("A3", "bf16"), ("950", "native")):
        monkeypatch.setattr(weights, "chip", lambda c=chip: c)
        mode, why = dsv4.get_backend("ascend").weight_mode("auto")
        assert mode == want and chip in why and why.startswith("auto: ")
