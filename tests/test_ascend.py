"""The Ascend backend on CPU: its providers run end to end through the executable spec of the vendor ops (installed
as a stand-in torch_npu) for the A2, A3 and 950 profiles; the spec agrees with the reference where the semantics
coincide, rejects contract violations by name, and the vendor-vs-spec check detects a deviating op.
What this cannot show: that the real CANN kernels match the spec (that is what the vendor_spec section of
`dsv4 conformance --device ascend` reports on an NPU host)."""
import sys

import pytest
import torch

from dsv4_portable import load_model, ops, registry
from dsv4_portable import reference as ref
from dsv4_portable.backends.ascend import vendor_ops
from dsv4_portable.conformance.ascend_spec import SPEC_OPS, VendorContractError, use_soc
from dsv4_portable.conformance.ascend_spec.standin import installed
from dsv4_portable.conformance.ascend_spec.vendor_check import vendor_spec_records
from dsv4_portable.conformance.cases import all_cases
from dsv4_portable.conformance.runner import run_cases
from dsv4_portable.registry import BackendUnavailableError

BF16 = torch.bfloat16
spec = {k.split(".", 1)[1]: v for k, v in SPEC_OPS.items()}


@pytest.fixture
def standin(request):
    soc = getattr(request, "param", "A3")
    assert "torch_npu" not in sys.modules
    with installed(soc) as mod:
        registry.reset_availability()
        vendor_ops.reset()
        yield mod
    registry.reset_availability()
    vendor_ops.reset()
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")


# ----------------------------------------------------------------------------------------------- spec vs reference
def test_spec_agrees_with_reference_where_semantics_coincide():
    g = torch.Generator().manual_seed(0)
    with use_soc("A3"):
        x, w = torch.randn(3, 5, 96, generator=g), torch.randn(96, generator=g)
        torch.testing.assert_close(spec["npu_rms_norm"](x, w, 1e-6)[0], ref.rms_norm(x, w, 1e-6))  # fp32 rsqrt vs f64
        # interleaved rotary in fp32 with pair-duplicated tables is the reference's rotation exactly
        q = torch.randn(2, 4, 3, 64, generator=g)
        cos, sin = ref.rope_cos_sin(torch.arange(4).expand(2, 4), ref.rope_inv_freq(64, 10000.0))
        r1, r2 = (t.repeat_interleave(2, -1).unsqueeze(2) for t in (cos, sin))
        torch.testing.assert_close(spec["npu_rotary_mul"](q, r1, r2, rotary_mode="interleave"), ref.rope(q, cos, sin),
                                   rtol=0, atol=0)
        # mHC at V4-Flash width, bf16 streams
        h = torch.randn(1, 2, 4, 4096, generator=g).to(BF16)
        fn, scale, base = torch.randn(24, 16384, generator=g) * 0.01, torch.tensor([0.5, 1.0, 2.0]), torch.randn(24)
        y, post, comb = spec["npu_hc_pre_v2"](h, fn, scale, base, 4, 20, 1e-6, 1e-6)
        ry, rpost, rcomb = ref.hc_pre(h, fn, scale, base)
        torch.testing.assert_close(post, rpost, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comb, rcomb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.float(), ry.float(), rtol=1.6e-2, atol=1e-2)
        o = torch.randn(1, 2, 4096, generator=g).to(BF16)
        torch.testing.assert_close(spec["npu_hc_post"](o, h, post, comb), ref.hc_post(o, h, post, comb), rtol=1.6e-2,
                                   atol=1e-2)
        # gating: sqrt-softplus with bias, and hash routing
        logits, bias = torch.randn(16, 64, generator=g), torch.randn(64, generator=g) * 0.1
        x16, gate = torch.eye(64)[:16] * 0 + logits, torch.eye(64)
        w, idx, _ = spec["npu_moe_gating_top_k"](logits, 6, bias=bias, norm_type=2, routed_scaling_factor=1.5)
        rw, ridx = ref.moe_route(x16, gate, bias, None, None, 6, "sqrtsoftplus", 1.5)
        assert torch.equal(idx.long(), ridx)
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
        ids, tid2eid = torch.randint(0, 50, (16,), generator=g), torch.randint(0, 64, (50, 6), generator=g)
        w, idx, _ = spec["npu_moe_gating_top_k"](logits, 6, input_ids=ids, tid2eid=tid2eid.int(), norm_type=2)
        rw, ridx = ref.moe_route(x16, gate, None, tid2eid, ids, 6, "sqrtsoftplus", 1.0)
        assert torch.equal(idx.long(), ridx)
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("standin", ["A2", "A3", "950"], indirect=True)
def test_providers_pass_the_op_conformance_cases(standin):
    backend = registry.get_backend("ascend")
    records = run_cases(all_cases(), backend, "cann", progress=lambda s: None)
    assert not [r for r in records if r.status in ("fail", "error")], [
        (r.case_id, r.message) for r in records if r.status in ("fail", "error")]
    passed = {r.op for r in records if r.status == "pass"}
    want = {"rms_norm", "rope", "hc_pre", "hc_post", "moe_route", "moe_experts", "indexer_topk"}
    assert want <= passed, want - passed
    assert ("fp8_linear" in passed) == (standin.npu.get_soc_version() == 260)      # FP8 arithmetic only on 950
    for r in records:                                      # every decline says why
        assert r.status != "skip" or r.message


@pytest.mark.parametrize("standin", ["A2", "950"], indirect=True)
def test_tiny_model_through_the_ascend_providers_matches_reference(standin):
    soc = standin.npu.get_soc_version()
    ids = torch.arange(3, 24).unsqueeze(0)
    m = load_model("tiny", device="ascend", quiet=True)
    assert "simulated" not in m.weight_note and ("bf16" in m.weight_note) == (soc != 260)
    registry.reset_counts()
    cache = m.new_cache(batch=1, max_len=32)
    got = torch.cat([m.forward(ids[:, :18], cache, all_logits=True)]
                    + [m.forward(ids[:, t:t + 1], cache, all_logits=True) for t in range(18, 21)], 1)
    counts = registry.provider_counts()
    for op in ("rms_norm", "rope", "moe_route"):
        assert set(counts[op]) == {"cann"}, (op, counts[op])
    assert "cann" in counts["indexer_topk"]                           # the decode steps
    assert set(counts["moe_experts"]) == ({"reference"} if soc == 260 else {"cann"})
    assert set(counts.get("fp8_linear", {"cann": 1})) == {"cann"}
    with registry.use_backend("cpu"):
        r = load_model("tiny", device="cpu", weights="native" if soc == 260 else "bf16", quiet=True)
        rc = r.new_cache(batch=1, max_len=32)
        want = torch.cat([r.forward(ids[:, :18], rc, all_logits=True)]
                         + [r.forward(ids[:, t:t + 1], rc, all_logits=True) for t in range(18, 21)], 1)
    a, b = want.double(), got.double()
    assert 1 - 2 * (a * b).sum() / (a * a + b * b).sum() < 1e-3     # DeepSeek's calc_diff
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


# ----------------------------------------------------------------------------------------------- contracts
BAD_CALLS = [   # (op, args, kwargs, offending argument): one per op family
    ("npu_rms_norm", (torch.randn(2, 64), torch.randn(32)), {}, "gamma"),
    ("npu_rotary_mul", (torch.randn(2, 3, 4, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)),
     {"rotary_mode": "quarter"}, "rotary_mode"),
    ("npu_hc_pre_v2", (torch.randn(2, 4, 256).to(BF16), torch.randn(24, 1024), torch.randn(3), torch.randn(24), 4,
                       20, 1e-6, 1e-6), {}, "x"),
    ("npu_hc_post", (torch.randn(2, 4096).to(BF16), torch.randn(2, 4, 4096).to(BF16), torch.rand(2, 4),
                     torch.rand(2, 4)), {}, "comb"),
    ("npu_moe_gating_top_k", (torch.randn(4, 64), 6), {"norm_type": 2, "group_count": 8}, "group_count"),
    ("npu_moe_init_routing_v2", (torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.int64)), {"expert_num": 8},
     "expert_idx"),
    ("npu_grouped_matmul", ([torch.randn(4, 64).to(BF16)], [torch.randn(2, 64, 32).to(BF16)]),
     {"group_list": torch.tensor([2, 2]), "split_item": 3, "group_type": 1}, "group_type"),
    ("npu_quant_matmul", (torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.zeros(128, 128, dtype=torch.float8_e4m3fn),
                          torch.ones(1, 1)), {"pertoken_scale": torch.ones(4, 1), "output_dtype": BF16,
                                               "group_sizes": [1, 128, 128]}, "x1"),
    ("npu_lightning_indexer", (torch.randn(1, 1, 65, 64).to(BF16), torch.randn(1, 8, 1, 64).to(BF16),
                               torch.rand(1, 1, 65)), {"actual_seq_lengths_query": torch.ones(1, dtype=torch.int32),
                                                       "actual_seq_lengths_key": torch.tensor([8], dtype=torch.int32)},
     "query"),
    ("npu_hc_pre", (torch.randn(2, 4, 4096).to(BF16), torch.randn(24, 16384), torch.randn(3), torch.randn(24), 4),
     {}, "hc_mult"),   # keyword-only argument passed positionally
]


@pytest.mark.parametrize("name, args, kwargs, arg", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_contract_violations_are_named(name, args, kwargs, arg):
    with use_soc("A3"), pytest.raises(VendorContractError) as e:
        spec[name](*args, **kwargs)
    assert e.value.arg == arg and name in str(e.value), str(e.value)


def test_fp8_is_refused_off_the_950_and_soc_is_required():
    x = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with use_soc("950"):
        spec["npu_quant_matmul"](x, torch.zeros(128, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1),
                                 pertoken_scale=torch.ones(4, 1), output_dtype=BF16, group_sizes=[1, 128, 128])
    with pytest.raises(VendorContractError, match="<soc>"):
        spec["npu_rms_norm"](torch.randn(2, 8), torch.randn(8))


# ----------------------------------------------------------------------------------------------- vendor check, import
def test_vendor_check_passes_the_spec_and_catches_a_deviating_op(standin):
    records = vendor_spec_records(progress=lambda s: None, module=standin)
    assert records and all(r.status == "pass" for r in records), [(r.case_id, r.message) for r in records]

    def rms_norm_without_epsilon(x, gamma, epsilon=1e-6):       # a kernel that ignores eps and gamma's dtype
        xf = x.float()
        return (gamma.float() * xf * torch.rsqrt(xf.square().mean(-1, keepdim=True))).to(x.dtype) * 1.02, None

    bad = vendor_spec_records(progress=lambda s: None, module=standin,
                              overrides={"torch_npu.npu_rms_norm": rms_norm_without_epsilon})
    status = {r.op: r.status for r in bad}
    assert status["torch_npu.npu_rms_norm"] == "fail" and status["torch_npu.npu_rotary_mul"] == "pass"


def test_without_torch_npu_ascend_is_refused_at_once_and_never_imported():
    assert "torch_npu" not in sys.modules
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        load_model("tiny", device="ascend", quiet=True)
    assert "torch_npu" not in sys.modules
    assert ops.rms_norm.explain(torch.randn(2, 8), None, backend=registry.get_backend("ascend"))[-1][1] == "chosen"


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_int8_w8a8_on_a3_matches_the_int8_reference(standin):
    ids = torch.arange(3, 24).unsqueeze(0)
    m = load_model("tiny", device="ascend", weights="int8", quiet=True)
    assert "int8" in m.weight_note
    registry.reset_counts()
    got = m.forward(ids, all_logits=True)
    assert set(registry.provider_counts()["int8_linear"]) == {"cann"}
    with registry.use_backend("cpu"):
        want = load_model("tiny", device="cpu", weights="int8", quiet=True).forward(ids, all_logits=True)
        fp8 = load_model("tiny", device="cpu", quiet=True).forward(ids, all_logits=True)
    a, b, c = want.double(), got.double(), fp8.double()
    assert 1 - 2 * (a * b).sum() / (a * a + b * b).sum() < 1e-3          # same recipe: kernel-order differences
    assert 1 - 2 * (a * c).sum() / (a * a + c * c).sum() < 5e-2          # W8A8 vs DeepSeek's FP8 recipe: close
