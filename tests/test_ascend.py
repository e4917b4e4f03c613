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
from dsv4_portable.backends.ascend import moe as ascend_moe
from dsv4_portable.backends.ascend import vendor_ops
from dsv4_portable.conformance.ascend_spec import SPEC_OPS, VendorContractError, use_soc
from dsv4_portable.conformance.ascend_spec.contract import is_placeholder
from dsv4_portable.conformance.ascend_spec.standin import installed
from dsv4_portable.conformance.ascend_spec.vendor_check import vendor_spec_records
from dsv4_portable.conformance.cases import all_cases
from dsv4_portable.conformance.runner import run_case, run_cases
from dsv4_portable.registry import BackendUnavailableError

BF16 = torch.bfloat16
spec = SPEC_OPS            # "namespace.name" -> spec op


@pytest.fixture
def standin(request):
    soc, extensions = getattr(request, "param", "A3"), None
    if isinstance(soc, tuple):
        soc, extensions = soc
    assert "torch_npu" not in sys.modules
    kwargs = {} if extensions is None else {"extensions": extensions}
    with installed(soc, **kwargs) as mod:
        registry.reset_availability()
        vendor_ops.reset()
        yield mod
    registry.reset_availability()
    vendor_ops.reset()
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")


def _sbnd_tables(cos, sin):
    """[B, S, R/2] tables -> the S11D layout the interleave mode takes for x [B*S, 1, H, R]."""
    b, s, half = cos.shape
    return tuple(t.repeat_interleave(2, -1).reshape(b * s, 1, 1, 2 * half) for t in (cos, sin))


# ----------------------------------------------------------------------------------------------- spec vs reference
def test_spec_agrees_with_reference_where_semantics_coincide():
    g = torch.Generator().manual_seed(0)
    with use_soc("A3"):
        x, w = torch.randn(3, 5, 96, generator=g), torch.randn(96, generator=g)
        torch.testing.assert_close(spec["torch_npu.npu_rms_norm"](x, w, 1e-6)[0], ref.rms_norm(x, w, 1e-6))
        # interleaved rotary in fp32 with pair-duplicated tables is the reference's rotation exactly
        q = torch.randn(2, 4, 3, 64, generator=g)
        cos, sin = ref.rope_cos_sin(torch.arange(4).expand(2, 4), ref.rope_inv_freq(64, 10000.0))
        r1, r2 = _sbnd_tables(cos, sin)
        got = spec["torch_npu.npu_rotary_mul"](q.reshape(8, 1, 3, 64), r1, r2, rotary_mode="interleave")
        torch.testing.assert_close(got.view(2, 4, 3, 64), ref.rope(q, cos, sin), rtol=0, atol=0)
        # mHC at V4-Flash width, bf16 streams
        h = torch.randn(1, 2, 4, 4096, generator=g).to(BF16)
        fn, scale, base = torch.randn(24, 16384, generator=g) * 0.01, torch.tensor([0.5, 1.0, 2.0]), torch.randn(24)
        y, post, comb = spec["_C_ascend.npu_hc_pre_v2"](h, fn, scale, base, 4, 20, 1e-6, 1e-6)
        ry, rpost, rcomb = ref.hc_pre(h, fn, scale, base)
        torch.testing.assert_close(post, rpost, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comb, rcomb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.float(), ry.float(), rtol=1.6e-2, atol=1e-2)
        o = torch.randn(1, 2, 4096, generator=g).to(BF16)
        torch.testing.assert_close(spec["_C_ascend.npu_hc_post"](o, h, post, comb), ref.hc_post(o, h, post, comb),
                                   rtol=1.6e-2, atol=1e-2)
        # gating: sqrt-softplus with bias, and hash routing, through both builds of the hash kernel
        logits, bias = torch.randn(16, 64, generator=g), torch.randn(64, generator=g) * 0.1
        x16, gate = logits, torch.eye(64)
        ids, tid2eid = torch.randint(0, 50, (16,), generator=g), torch.randint(0, 64, (50, 6), generator=g)
        rw, ridx = ref.moe_route(x16, gate, bias, None, None, 6, "sqrtsoftplus", 1.5)
        hw, hidx = ref.moe_route(x16, gate, None, tid2eid, ids, 6, "sqrtsoftplus", 1.0)
        for key in ("custom.npu_moe_gating_top_k", "_C_ascend.moe_gating_top_k_hash"):
            w, idx, norm_out = spec[key](logits, 6, bias=bias, norm_type=2, routed_scaling_factor=1.5)
            assert torch.equal(idx.long(), ridx) and is_placeholder(norm_out) and norm_out.shape == (16, 64)
            torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
            w, idx, _ = spec[key](logits, 6, input_ids=ids, tid2eid=tid2eid.int(), norm_type=2)
            assert torch.equal(idx.long(), hidx)
            torch.testing.assert_close(w, hw, rtol=1e-6, atol=1e-7)
        # torch_npu's own gating: sigmoid
        sw, sidx = ref.moe_route(x16, gate, bias, None, None, 6, "sigmoid", 1.5)
        w, idx, _ = spec["torch_npu.npu_moe_gating_top_k"](logits, 6, bias=bias, norm_type=1, routed_scaling_factor=1.5)
        assert torch.equal(idx.long(), sidx)
        torch.testing.assert_close(w, sw, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- providers
@pytest.mark.parametrize("standin", ["A2", "A3", "950"], indirect=True)
def test_providers_pass_the_op_conformance_cases(standin):
    backend = registry.get_backend("ascend")
    records = run_cases(all_cases(small=True), backend, "cann", progress=lambda s: None)
    assert not [r for r in records if r.status in ("fail", "error")], [
        (r.case_id, r.message) for r in records if r.status in ("fail", "error")]
    passed = {r.op for r in records if r.status == "pass"}
    soc = standin.npu.get_soc_version()
    want = {"rms_norm", "rope", "moe_route", "moe_experts", "indexer_topk", "linear", "grouped_linear"}
    assert want <= passed, want - passed
    assert ("hc_post" in passed) == (soc != 260)             # vllm-ascend's kernels are off on the 950
    assert ("window_sparse_attn" in passed) == (soc != 260)  # npu_sparse_attn_sharedkv: A2/A3
    assert ("compressor" in passed) == (soc != 223)          # the fused compressor: A3/950
    assert ("fp8_linear" in passed) == (soc == 260)                        # FP8 arithmetic only on 950
    assert ("int8_linear" in passed) == (soc != 260)                       # int8 W8A8 on A2/A3
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
    for op in ("rms_norm", "rope", "moe_route") + (("hc_post",) if soc != 260 else ()):
        assert set(counts[op]) == {"cann"}, (op, counts[op])
    # the tiny indexer has 4 heads: A2/A3 take N1 <= 64, the 950 only 8/16/24/32/64
    assert ("cann" in counts["indexer_topk"]) == (soc != 260)
    assert set(counts["moe_experts"]) == {"cann"}           # bf16 experts (A2/A3), FP4 via the MX GEMM (950)
    if soc == 260:      # the checkpoint's FP8 linears through npu_quant_matmul, every one of them
        assert set(counts["fp8_linear"]) == {"cann"}, counts.get("fp8_linear")
    else:               # A2/A3 dequantised them to bf16 at load: no FP8 linear runs
        assert "fp8_linear" not in counts, counts["fp8_linear"]
    if soc != 260:      # every bf16 linear on the device's matmul; the fp32 lm_head (one per forward) on the reference
        assert counts["linear"].get("reference", 0) == 4 and counts["linear"]["cann"] > 4, counts["linear"]
    with registry.use_backend("cpu"):
        r = load_model("tiny", device="cpu", weights="native" if soc == 260 else "bf16", quiet=True)
        rc = r.new_cache(batch=1, max_len=32)
        want = torch.cat([r.forward(ids[:, :18], rc, all_logits=True)]
                         + [r.forward(ids[:, t:t + 1], rc, all_logits=True) for t in range(18, 21)], 1)
    a, b = want.double(), got.double()
    assert 1 - 2 * (a * b).sum() / (a * a + b * b).sum() < 1e-3     # DeepSeek's calc_diff
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_a_one_token_prompt_runs_with_no_compressed_entries(standin):
    """(p0 + s) // 4 == 0: the indexer has an empty key, which the op does not take; the provider declines it."""
    m = load_model("tiny", device="ascend", quiet=True)
    out = m.forward([[5]])
    assert torch.isfinite(out).all()
    k = torch.zeros(1, 0, 128, dtype=BF16)
    why = ops.indexer_topk.explain(torch.zeros(1, 1, 4, 128, dtype=BF16), k, torch.ones(1, 1, 4),
                                   torch.zeros(1, 1, dtype=torch.int32), 8, backend=registry.get_backend("ascend"))
    assert why[0][0] == "cann" and "empty key" in " ".join(why[0][2])


# ----------------------------------------------------------------------------------------------- namespaces
@pytest.mark.parametrize("standin", [("A3", ())], indirect=True)
def test_extension_namespaces_exist_only_after_their_import(standin):
    """Without vllm-ascend or custom_ops installed, _C_ascend / custom ops are absent and the providers say so."""
    assert vendor_ops.reasons(("_C_ascend.npu_hc_post",))
    status = vendor_ops.resolved_ops()
    assert status["extension vllm_ascend.vllm_ascend_C"] == "not installed"
    assert "hc_post" in str(ops.hc_post.explain(backend=registry.get_backend("ascend")))
    assert ops.hc_post.candidates(registry.get_backend("ascend"))[0].availability()


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_the_probe_imports_the_extensions_once_and_reports_them(standin):
    assert "vllm_ascend.vllm_ascend_C" not in sys.modules and "custom_ops" not in sys.modules
    assert vendor_ops.where(("_C_ascend.npu_hc_post",)) == "_C_ascend.npu_hc_post"
    assert "vllm_ascend.vllm_ascend_C" in sys.modules and "custom_ops" in sys.modules
    status = vendor_ops.resolved_ops()
    assert status["extension vllm_ascend.vllm_ascend_C"] == "loaded"
    assert status["extension custom_ops"] == "loaded"
    assert {k for k in status if k.startswith("extension ")} == {"extension vllm_ascend.vllm_ascend_C",
                                                                   "extension custom_ops"}   # nothing else probed
    assert vendor_ops.where(ascend_moe.GATING_DSV4) == "custom.npu_moe_gating_top_k"
    vendor_ops.take_called()
    with registry.use_backend("ascend"):
        ops.moe_route(*_route_args())
    assert vendor_ops.take_called() == ["custom.npu_moe_gating_top_k"] and vendor_ops.take_called() == []


@pytest.mark.parametrize("standin", [("950", ("vllm_ascend.vllm_ascend_C",))], indirect=True)
def test_the_vllm_ascend_kernels_are_not_loaded_on_the_950(standin):
    """vllm-ascend turns all its custom ops off on the 950; so do we (hc_post then has no provider there)."""
    assert vendor_ops.reasons(("_C_ascend.npu_hc_post",))
    assert "not loaded on the 950" in vendor_ops.resolved_ops()["extension vllm_ascend.vllm_ascend_C"]


@pytest.mark.parametrize("standin", ["950", "A3"], indirect=True)
def test_the_quantised_linears_name_their_chips_once(standin):
    int8, fp8 = (op.provider("cann", "npu").availability() for op in (ops.int8_linear, ops.fp8_linear))
    on_950 = standin.npu.get_soc_version() == 260
    assert (int8, fp8) == ((["torch_npu.npu_dynamic_quant is used on A2, A3; this chip is 950 (SoC 260)"], [])
                           if on_950 else ([], ["npu_quant_matmul's FP8 block mode is used on 950; this chip is A3 "
                                                "(SoC 250)"]))


@pytest.mark.parametrize("standin", [("A2", ("custom_ops",))], indirect=True)
def test_custom_hc_pre_is_not_used_on_the_a2(standin):
    h = torch.zeros(1, 1, 4, 4096, dtype=BF16)
    args = (h, torch.zeros(24, 16384), torch.ones(3), torch.zeros(24))
    why = dict((p, r) for p, _, r in ops.hc_pre.explain(*args, backend=registry.get_backend("ascend")))
    assert "A3, 950" in " ".join(why["cann"])


# ----------------------------------------------------------------------------------------------- gating targets
def _route_args(score_func="sqrtsoftplus", hashed=False):
    g = torch.Generator().manual_seed(3)
    x, gate = torch.randn(6, 128, generator=g).to(BF16), (torch.randn(8, 128, generator=g) * 0.1).to(BF16)
    if hashed:
        return x, gate, None, torch.randint(0, 8, (50, 2), generator=g), torch.randint(0, 50, (6,), generator=g), 2, \
            score_func, 1.0
    return x, gate, torch.randn(8, generator=g) * 0.1, None, None, 2, score_func, 1.5


@pytest.mark.parametrize("standin", [("A3", ())], indirect=True)
def test_sqrtsoftplus_never_goes_to_torch_npus_gating(standin):
    """torch_npu documents norm_type 0/1 only: with no hash-kernel build installed, V4 routing is declined."""
    why = ops.moe_route.explain(*_route_args(), backend=registry.get_backend("ascend"))
    assert why[0][1] == "skipped" and "norm_type 0 and 1" in " ".join(why[0][2])
    assert ops.moe_route.explain(*_route_args("sigmoid"), backend=registry.get_backend("ascend"))[0][1] == "chosen"
    with pytest.raises(VendorContractError, match="norm_type"):            # and the spec refuses it outright
        standin.npu_moe_gating_top_k(torch.randn(4, 64), 2, norm_type=2)


@pytest.mark.parametrize("standin", [("A3", ())], indirect=True)
def test_torch_npu_2_10_gating_without_hash_arguments(standin, monkeypatch):
    """torch_npu 2.10's npu_moe_gating_top_k lacks input_ids / tid2eid: hash layers are declined (read from the
    signature), plain layers run and are never sent the hash keywords."""
    op = spec["torch_npu.npu_moe_gating_top_k"]

    def gating_2_10(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=0,
                    out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
        return op(x, k, bias=bias, k_group=k_group, group_count=group_count, group_select_mode=group_select_mode,
                  renorm=renorm, norm_type=norm_type, out_flag=out_flag, routed_scaling_factor=routed_scaling_factor,
                  eps=eps)
    monkeypatch.setattr(standin, "npu_moe_gating_top_k", gating_2_10)
    backend = registry.get_backend("ascend")
    why = ops.moe_route.explain(*_route_args("sigmoid", hashed=True), backend=backend)
    assert why[0][1] == "skipped" and "2.10" in " ".join(why[0][2])
    with registry.use_backend("ascend"):
        registry.reset_counts()
        ops.moe_route(*_route_args("sigmoid"))                                 # would raise TypeError if sent
        assert registry.provider_counts()["moe_route"] == {"cann": 1}


# ----------------------------------------------------------------------------------------------- contracts
BAD_CALLS = [   # (spec key, args, kwargs, offending argument, chip): one or more per op family
    ("torch_npu.npu_rms_norm", (torch.randn(2, 64), torch.randn(32)), {}, "gamma", "A3"),
    ("torch_npu.npu_rotary_mul", (torch.randn(2, 3, 4, 64), torch.rand(1, 3, 1, 64), torch.rand(1, 3, 1, 64)),
     {"rotary_mode": "quarter"}, "rotary_mode", "A3"),
    # interleave: a BS1D table (what a per-batch table gives for BSND input) is not one of the allowed layouts
    ("torch_npu.npu_rotary_mul", (torch.randn(2, 5, 4, 64), torch.rand(2, 5, 1, 64), torch.rand(2, 5, 1, 64)),
     {"rotary_mode": "interleave"}, "r1", "A3"),
    # interleave: B*N < 1000 (decode, 16 sequences x 64 heads as BSND)
    ("torch_npu.npu_rotary_mul", (torch.randn(16, 1, 64, 64), torch.rand(1, 1, 1, 64), torch.rand(1, 1, 1, 64)),
     {"rotary_mode": "interleave"}, "input", "A3"),
    ("_C_ascend.npu_hc_pre_v2", (torch.randn(2, 4, 256).to(BF16), torch.randn(24, 1024), torch.randn(3),
                                 torch.randn(24), 4, 20, 1e-6, 1e-6), {}, "x", "A3"),
    ("_C_ascend.npu_hc_post", (torch.randn(2, 64).to(BF16), torch.randn(2, 4, 64).to(BF16), torch.rand(2, 4),
                               torch.rand(2, 4, 4)), {}, "x", "A3"),       # 2-D x: the binding wants [B, S, D]
    ("_C_ascend.npu_hc_post", (torch.randn(1, 2, 64).to(BF16), torch.randn(1, 2, 4, 64).to(BF16),
                               torch.rand(1, 2, 4), torch.rand(1, 2, 4, 4).double()), {}, "comb", "A3"),
    ("custom.npu_hc_pre", (torch.randn(2, 4, 4096).to(BF16), torch.randn(24, 16384), torch.randn(3),
                           torch.randn(24), 4), {}, "hc_mult", "A3"),      # keyword-only argument passed positionally
    ("custom.npu_moe_gating_top_k", (torch.randn(4, 64), 6), {"norm_type": 2, "group_count": 8}, "group_count",
     "A3"),
    ("torch_npu.npu_moe_gating_top_k", (torch.randn(4, 64), 6), {"norm_type": 2}, "norm_type", "A3"),
    ("torch_npu.npu_moe_gating_top_k", (torch.randn(4, 64), 6), {"bias": torch.randn(64).to(BF16)}, "bias", "A3"),
    ("torch_npu.npu_moe_init_routing_v2", (torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.int64)),
     {"expert_num": 8}, "expert_idx", "A3"),
    ("torch_npu.npu_grouped_matmul", ([torch.randn(4, 64).to(BF16)], [torch.randn(2, 64, 32).to(BF16)]),
     {"group_list": torch.tensor([2, 2]), "split_item": 3, "group_type": 1}, "group_type", "A3"),
    # the shared expert as one group: group_list_type 1 forbids a group_list of length 1
    ("torch_npu.npu_grouped_matmul", ([torch.randn(4, 64).to(BF16)], [torch.randn(1, 64, 32).to(BF16)]),
     {"group_list": torch.tensor([4]), "split_item": 3, "group_type": 0, "group_list_type": 1}, "group_list", "A3"),
    ("torch_npu.npu_grouped_matmul", ([torch.randn(4, 64).to(BF16)], [torch.randn(2, 64, 32).to(BF16)]),
     {"group_list": torch.tensor([1, 2]), "split_item": 3, "group_type": 0, "group_list_type": 1}, "group_list", "A3"),
    ("torch_npu.npu_grouped_matmul", ([torch.randn(4, 64).to(BF16)], [torch.randn(2, 64, 64).to(BF16)[:, :, ::2]]),
     {"group_list": torch.tensor([2, 2]), "split_item": 3, "group_type": 0, "group_list_type": 1}, "weight[0]", "A3"),
    ("torch_npu.npu_quant_matmul", (torch.zeros(4, 128, dtype=torch.float8_e4m3fn),
                                    torch.zeros(128, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1)),
     {"pertoken_scale": torch.ones(4, 1), "output_dtype": BF16, "group_sizes": [1, 128, 128]}, "x1", "A3"),
    # 950 FP8 blocks: w.t() as x2 with non-transposed block scales
    ("torch_npu.npu_quant_matmul", (torch.zeros(4, 256, dtype=torch.float8_e4m3fn),
                                    torch.zeros(256, 256, dtype=torch.float8_e4m3fn).t(), torch.ones(2, 2)),
     {"pertoken_scale": torch.ones(4, 2), "output_dtype": BF16, "group_sizes": [1, 128, 128]}, "scale", "950"),
    ("torch_npu.npu_quant_matmul", (torch.zeros(4, 128, dtype=torch.int8), torch.zeros(64, 256, dtype=torch.int8)[:, ::2]
                                    .t(), torch.ones(64)), {"pertoken_scale": torch.ones(4), "output_dtype": BF16},
     "x2", "A3"),
    ("torch_npu.npu_dynamic_quant", (torch.randn(4, 64),), {}, "input", "A3"),            # fp32 input
    ("torch_npu.npu_dynamic_quant", (torch.randn(4, 64).to(BF16),), {"dst_type": torch.float8_e4m3fn}, "dst_type",
     "A3"),
    ("torch_npu.npu_format_cast", (torch.randn(4, 64), 3), {}, "acl_format", "A3"),
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 65, 128).to(BF16), torch.randn(1, 8, 1, 128).to(BF16),
                                         torch.rand(1, 1, 65)),
     {"actual_seq_lengths_query": torch.ones(1, dtype=torch.int32),
      "actual_seq_lengths_key": torch.tensor([8], dtype=torch.int32)}, "query", "A3"),
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 8, 64).to(BF16), torch.randn(1, 8, 1, 64).to(BF16),
                                         torch.rand(1, 1, 8)), {}, "query", "A3"),        # D must be 128
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 8, 128).to(BF16), torch.randn(1, 0, 1, 128).to(BF16),
                                         torch.rand(1, 1, 8)), {}, "key", "A3"),          # empty key
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 8, 128).to(BF16), torch.randn(1, 8, 1, 128).to(BF16),
                                         torch.rand(1, 1, 8)), {}, "weights", "950"),     # fp32 weights on the 950
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 4, 128).to(BF16), torch.randn(1, 8, 1, 128).to(BF16),
                                         torch.rand(1, 1, 4).to(BF16)), {}, "query", "950"),   # N1 4 on the 950
    ("torch_npu.npu_lightning_indexer", (torch.randn(2, 1, 8, 128).to(BF16), torch.randn(2, 16, 1, 128).to(BF16)[:, :8],
                                         torch.rand(2, 1, 8)), {}, "key", "A3"),          # non-contiguous key
    ("torch_npu.npu_lightning_indexer", (torch.randn(1, 1, 8, 128).to(BF16), torch.randn(1, 8, 1, 128).to(BF16),
                                         torch.rand(1, 1, 8)), {"actual_seq_lengths_key": torch.tensor([8])},
     "actual_seq_lengths_key", "A3"),                                                     # int64 lengths
]


@pytest.mark.parametrize("key, args, kwargs, arg, soc", BAD_CALLS,
                         ids=[f"{c[0]}:{c[3]}:{i}" for i, c in enumerate(BAD_CALLS)])
def test_contract_violations_are_named(key, args, kwargs, arg, soc):
    name = key.split(".", 1)[1]
    with use_soc(soc), pytest.raises(VendorContractError) as e:
        spec[key](*args, **kwargs)
    assert e.value.arg == arg and name in str(e.value), str(e.value)


def test_fp8_is_refused_off_the_950_and_soc_is_required():
    x = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with use_soc("950"):
        spec["torch_npu.npu_quant_matmul"](x, torch.zeros(128, 128, dtype=torch.float8_e4m3fn).t(), torch.ones(1, 1),
                                           pertoken_scale=torch.ones(4, 1), output_dtype=BF16,
                                           group_sizes=[1, 128, 128])
    with pytest.raises(VendorContractError, match="<soc>"):
        spec["torch_npu.npu_rms_norm"](torch.randn(2, 8), torch.randn(8))


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_a_provider_passing_a_wrong_layout_fails_its_conformance_case(standin, monkeypatch):
    """The suite catches a provider that calls the vendor op wrongly: here RoPE with per-batch BS1D tables."""
    from dsv4_portable.backends.ascend import norm_rope

    def rope_bs1d(x, cos, sin, inverse=False):
        rd = 2 * cos.shape[-1]
        r1, r2 = (t.repeat_interleave(2, -1).unsqueeze(2).expand(x.shape[0], -1, -1, -1).float() for t in (cos, sin))
        rot = vendor_ops.call(norm_rope.ROTARY_MUL, x[..., -rd:].float().contiguous(), r1, r2,
                              rotary_mode="interleave")
        return torch.cat([x[..., :-rd], rot.to(x.dtype)], -1)
    provider = ops.rope.provider("cann", "npu")
    monkeypatch.setattr(provider, "fn", rope_bs1d)
    case = next(c for c in all_cases(small=True) if c.case_id == "rope/heads/forward/bfloat16")
    rec = run_case(case, "cann", registry.get_backend("ascend"), "cpu", {})
    assert rec.status == "error" and "interleave mode takes" in rec.message, rec.message


# ----------------------------------------------------------------------------------------------- vendor check, import
@pytest.mark.parametrize("standin", ["A3", "950"], indirect=True)
def test_vendor_check_passes_the_spec_and_catches_a_deviating_op(standin):
    records = vendor_spec_records(progress=lambda s: None, module=standin)
    ran = [r for r in records if r.status != "skip"]
    assert ran and all(r.status == "pass" for r in ran), [(r.case_id, r.message) for r in ran if r.status != "pass"]
    names = {r.op for r in ran}
    assert {"custom.npu_moe_gating_top_k", "torch_npu.npu_moe_gating_top_k", "torch_npu.npu_rms_norm",
            "npu.npu_rms_norm"} <= names
    assert ("torch_npu.npu_quant_matmul" in names) and (("_C_ascend.npu_hc_post" in names) ==
                                                        (standin.npu.get_soc_version() != 260))

    def rms_norm_without_epsilon(x, gamma, epsilon=1e-6):       # a kernel that ignores eps
        xf = x.float()
        return (gamma.float() * xf * torch.rsqrt(xf.square().mean(-1, keepdim=True))).to(x.dtype) * 1.02, None

    def gating_without_norm_out(*args, **kwargs):             # returns 2 of the 3 outputs
        return spec["custom.npu_moe_gating_top_k"](*args, **kwargs)[:2]

    bad = vendor_spec_records(progress=lambda s: None, module=standin, only={"npu_rms_norm", "npu_moe_gating_top_k"},
                              overrides={"torch_npu.npu_rms_norm": rms_norm_without_epsilon,
                                         "custom.npu_moe_gating_top_k": gating_without_norm_out})
    status = {r.case_id: (r.status, r.message) for r in bad}
    assert status["vendor_spec/rms_norm/bf16/torch_npu"][0] == "fail"
    assert status["vendor_spec/rms_norm/bf16/npu"][0] == "pass"
    assert status["vendor_spec/gating/sqrtsoftplus/custom"] == ("fail", "2 outputs, spec has 3")


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_vendor_check_compares_undefined_outputs_by_shape_only(standin):
    def gating_with_other_garbage(*args, **kwargs):           # norm_out holds different (undefined) values: fine
        w, idx, out = spec["custom.npu_moe_gating_top_k"](*args, **kwargs)
        return w, idx, torch.full_like(out, 7.0)

    def gating_with_short_norm_out(*args, **kwargs):          # but its shape is part of the contract
        w, idx, out = spec["custom.npu_moe_gating_top_k"](*args, **kwargs)
        return w, idx, out[:, :1]
    for fn, want in ((gating_with_other_garbage, "pass"), (gating_with_short_norm_out, "fail")):
        recs = vendor_spec_records(progress=lambda s: None, module=standin, only={"npu_moe_gating_top_k"},
                                   overrides={"custom.npu_moe_gating_top_k": fn})
        rec = next(r for r in recs if r.case_id == "vendor_spec/gating/sqrtsoftplus/custom")
        assert rec.status == want, rec.message


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


# ----------------------------------------------------------------------------------------------- prepare_weights
@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_prepare_weights_replaces_tensors_once_and_keeps_the_logits(standin):
    """What load_model runs on Ascend after load_params: re-layouts replace the tensors (the originals are freed,
    nothing is held twice) and the model computes the same logits."""
    import gc
    import weakref

    from dsv4_portable.backends.ascend.weights import prepare_weights
    from dsv4_portable.config import load_config
    from dsv4_portable.model.checkpoint import load_params
    from dsv4_portable.model.tiny import tiny_checkpoint
    from dsv4_portable.model.transformer import Transformer

    path = tiny_checkpoint(quiet=True)
    cfg = load_config(path)
    ids = torch.arange(3, 20).unsqueeze(0)
    with registry.use_backend("ascend"):
        params = load_params(path, cfg, BF16, "cpu", "bf16", quiet=True)
        gate = "layers.1.ffn.gate.weight"
        before = Transformer(cfg, params, BF16, "cpu").forward(ids, all_logits=True)
        original = weakref.ref(params[gate])
        prepared = prepare_weights(params)
        assert prepared[gate].dtype == torch.float32 and torch.equal(prepared[gate], params[gate].float())
        tables = [k for k in params if k.endswith(".ffn.gate.tid2eid")]      # the hash layers' routing tables
        assert tables and all(prepared[k].dtype == torch.int32 and torch.equal(prepared[k].long(), params[k].long())
                              for k in tables)
        assert set(prepared) == set(params)
        del params
        gc.collect()
        assert original() is None                                   # the bf16 gate is gone, not cached beside
        after = Transformer(cfg, prepared, BF16, "cpu").forward(ids, all_logits=True)
    torch.testing.assert_close(after, before, rtol=0, atol=0)        # an exact re-layout


# ----------------------------------------------------------------------------------------------- sparse attention
def _v4_attention_step(g, p0, s, ratio, b=1):
    """A window_sparse_attn step at the fused op's widths, and its metadata-free vendor arguments."""
    q = torch.randn(b, s, 64, 512, generator=g).to(BF16)
    ring, kv = (torch.randn(b, 128, 512, generator=g).to(BF16), torch.randn(b, s, 512, generator=g).to(BF16))
    comp = torch.randn(b, (p0 + s) // ratio, 512, generator=g).to(BF16) if ratio else None
    topk = torch.randperm(comp.shape[1], generator=g)[:10].int().expand(b, s, 10).contiguous() if ratio == 4 else None
    return q, ring, kv, comp, topk, torch.randn(64, generator=g), 512 ** -0.5, p0, ratio


@pytest.mark.parametrize("standin", ["A3"], indirect=True)
def test_sparse_attention_leaves_the_ring_alone_and_needs_its_own_metadata(standin):
    from dsv4_portable.backends.ascend import attention
    args = _v4_attention_step(torch.Generator().manual_seed(1), 201, 2, 4)
    ring = args[1].clone()
    attention._METADATA_CACHE.clear()
    with registry.use_backend("ascend"):
        registry.reset_counts()
        got = ops.window_sparse_attn(*args)
        assert registry.provider_counts()["window_sparse_attn"] == {"cann": 1}
    assert torch.equal(args[1], ring)                                     # the caller's ring is not written
    torch.testing.assert_close(got.float(), ref.window_sparse_attn(*args).float(), rtol=1.6e-2, atol=2e-3)
    # metadata made for another step is refused by name: plant this step's (kv length 203) under the key of the
    # step before (kv length 202), as a cache bug would
    (b, s, kv_len, *rest), meta = next(iter(attention._METADATA_CACHE.items()))
    attention._METADATA_CACHE.clear()
    attention._METADATA_CACHE[(b, s, kv_len - 1, *rest)] = meta
    earlier = _v4_attention_step(torch.Generator().manual_seed(1), 200, 2, 4)
    try:
        with registry.use_backend("ascend"), pytest.raises(VendorContractError) as e:
            ops.window_sparse_attn(*earlier)
        assert e.value.arg == "metadata"
    finally:
        attention._METADATA_CACHE.clear()


ATTN_KW = dict(softmax_scale=512 ** -0.5, cmp_ratio=1, layout_q="TND", layout_kv="PA_ND", ori_win_left=127)


def _attn_call(**over):
    """A valid window-only npu_sparse_attn_sharedkv call (spec), with `over` replacing arguments."""
    meta_kw = dict(num_heads_q=64, num_heads_kv=1, head_dim=512, cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                   seqused_kv=torch.tensor([40], dtype=torch.int32), batch_size=1, max_seqlen_q=2, max_seqlen_kv=40,
                   cmp_ratio=1, ori_win_left=127, layout_q="TND", layout_kv="PA_ND", has_cmp_kv=False)
    kw = dict(ori_kv=torch.randn(1, 64, 1, 512).to(BF16), ori_block_table=torch.zeros(1, 1, dtype=torch.int32),
              cu_seqlens_q=meta_kw["cu_seqlens_q"], seqused_kv=meta_kw["seqused_kv"], sinks=torch.zeros(64), **ATTN_KW)
    q = over.pop("q", torch.randn(2, 64, 512).to(BF16))
    meta_kw.update(over.pop("meta", {}))
    kw.update(over)
    with use_soc(over.pop("soc", "A3") if "soc" in over else "A3"):
        kw["metadata"] = spec["_C_ascend.npu_sparse_attn_sharedkv_metadata"](**meta_kw)
        return spec["_C_ascend.npu_sparse_attn_sharedkv"](q, **kw)


@pytest.mark.parametrize("over, arg", [
    ({}, None),
    ({"q": torch.randn(2, 32, 512).to(BF16)}, "q"),                          # N1 64 only
    ({"q": torch.randn(2, 64, 128).to(BF16)}, "q"),                          # head dim 512 only
    ({"ori_win_left": 128}, "ori_win_left"),                                 # the window is 127 + 1
    ({"layout_kv": "BSND"}, "layout_kv"),
    ({"ori_block_table": torch.zeros(1, 1, dtype=torch.int64)}, "ori_block_table"),
    ({"meta": {"seqused_kv": torch.tensor([41], dtype=torch.int32)}}, "metadata"),   # stale metadata
    ({"cmp_ratio": 4}, "cmp_ratio"),                                          # a ratio without cmp_kv
    ({"sinks": torch.zeros(64).to(BF16)}, "sinks"),
], ids=["valid", "heads", "head_dim", "win_left", "layout_kv", "table_dtype", "stale_metadata", "ratio", "sinks"])
def test_sparse_attention_contract(over, arg):
    if arg is None:
        out, lse = _attn_call(**over)
        assert out.shape == (2, 64, 512) and lse.numel() == 0
        return
    with pytest.raises(VendorContractError) as e:
        _attn_call(**over)
    assert e.value.arg == arg, str(e.value)


def test_sparse_attention_is_not_an_op_of_the_950():
    with use_soc("950"), pytest.raises(VendorContractError, match="<soc>"):
        spec["_C_ascend.npu_sparse_attn_sharedkv"](torch.randn(2, 64, 512).to(BF16))


# ----------------------------------------------------------------------------------------------- compressor
def test_our_compressor_state_survives_the_vendor_layout_round_trip():
    """to_vendor_state / from_vendor_state are inverse on every row the reference's state can hold (the open
    windows), for both ratios and positions inside, at and after a window boundary."""
    from dsv4_portable.backends.ascend.compressor import from_vendor_state, to_vendor_state
    g = torch.Generator().manual_seed(5)
    for ratio, d, pos in ((4, 8, 3), (4, 8, 8), (4, 8, 10), (128, 4, 127), (128, 4, 300)):
        coff = 2 if ratio == 4 else 1
        x = torch.randn(1, pos, 32, generator=g)
        w = (torch.randn(coff * d, 32, generator=g), torch.randn(coff * d, 32, generator=g))
        kv = torch.zeros(1, coff * ratio, coff * d)
        sc = torch.full_like(kv, float("-inf"))
        cos, sin = torch.ones(512, 2), torch.zeros(512, 2)
        ref.compressor(x, *w, torch.zeros(ratio, coff * d), torch.ones(d), cos, sin, kv, sc, 0, ratio, False, False)
        state, table = to_vendor_state(kv, sc, pos, 0, ratio)
        kv2, sc2 = torch.full_like(kv, 9.0), torch.full_like(sc, 9.0)
        from_vendor_state(state, table, kv2, sc2, pos, ratio)
        assert torch.equal(kv2, kv) and torch.equal(sc2, sc), (ratio, pos)


COMP = dict(h=1024, d=512, coff=2, ratio=4)


def _comp_call(soc="A3", **over):
    """A valid C4A `compressor` call (spec), with `over` replacing arguments."""
    h, d, coff, r = COMP["h"], COMP["d"], COMP["coff"], COMP["ratio"]
    a = dict(x=torch.randn(1, 5, h).to(BF16), wkv=torch.randn(coff * d, h).to(BF16),
             wgate=torch.randn(coff * d, h).to(BF16), state_cache=torch.zeros(2, 16, 2 * coff * d),
             ape=torch.zeros(r, coff * d), norm_weight=torch.ones(d, dtype=torch.float32 if soc == "950" else BF16),
             rope_sin=torch.zeros(1, 2, 64).to(BF16), rope_cos=torch.ones(1, 2, 64).to(BF16),
             state_block_table=torch.ones(1, 1, dtype=torch.int32), cu_seqlens=None, seqused=None,
             start_pos=torch.zeros(1, dtype=torch.int32), rope_head_dim=64, cmp_ratio=r, coff=coff, norm_eps=1e-6,
             rotary_mode=2, cache_mode=1)
    a.update(over)
    with use_soc(soc):
        return spec["_C_ascend.compressor"](**a)


@pytest.mark.parametrize("soc, over, arg", [
    ("A3", {}, None),
    ("950", {}, None),
    ("A2", {}, "<soc>"),                                                     # README: A2 not supported
    ("A3", {"x": torch.randn(1, 5, 256).to(BF16)}, "x"),                     # H in [1024, 10240], 512-aligned
    ("A3", {"cache_mode": 2}, "cache_mode"),
    ("A3", {"state_cache": torch.zeros(2, 16, 2048, dtype=BF16)}, "state_cache"),
    ("A3", {"state_block_table": torch.zeros(1, 1, dtype=torch.int32), "start_pos": torch.full((1,), 2,
            dtype=torch.int32)}, "state_block_table"),                       # earlier rows of the window unmapped
    ("950", {"norm_weight": torch.ones(512).to(BF16)}, "norm_weight"),       # the 950 build takes an fp32 norm
    ("A3", {"rope_sin": torch.zeros(1, 5, 64).to(BF16)}, "rope_sin"),        # one table row per output entry
], ids=["valid_a3", "valid_950", "a2", "hidden", "cache_mode", "state_dtype", "table_zero", "norm_950", "tables"])
def test_compressor_contract(soc, over, arg):
    if arg is None:
        assert _comp_call(soc, **over).shape == (1, 2, 512)
        return
    with pytest.raises(VendorContractError) as e:
        _comp_call(soc, **over)
    assert e.value.arg == arg, str(e.value)


def test_prepare_weights_casts_compressor_projections_only_when_exact():
    from dsv4_portable.backends.ascend.weights import prepare_weights
    exact = torch.randn(8, 16).to(BF16).float()
    params = {"layers.1.attn.compressor.wkv.weight": exact,
              "layers.1.attn.indexer.compressor.wgate.weight": torch.randn(8, 16) / 3}
    out = prepare_weights(params)
    assert out["layers.1.attn.compressor.wkv.weight"].dtype == BF16
    assert out["layers.1.attn.indexer.compressor.wgate.weight"] is params["layers.1.attn.indexer.compressor.wgate.weight"]


# ----------------------------------------------------------------------------------------------- 950 MX experts
@pytest.mark.parametrize("standin", ["950"], indirect=True)
def test_fp4_experts_on_the_950_equal_the_reference_through_the_mx_gemm(standin):
    """DeepSeek's FP8 activation blocks expressed as MX scales: the W4A8 MX grouped GEMM reproduces fp4 experts
    bit for bit, on the experts prepare_weights makes at load (e8m0 scales); fp32 scales are declined by dtype."""
    from dsv4_portable.backends.ascend.weights import prepare_weights
    backend = registry.get_backend("ascend")
    for case_id in ("moe_experts/fp4/bfloat16", "moe_experts/fp4/clamp_beyond_10"):
        case = next(c for c in all_cases(small=True) if c.case_id == case_id)
        x, idx, w, experts, shared, limit = case.args()           # e8m0 scales, as in a checkpoint

        def widened(ew):                                           # what the loader holds before prepare_weights
            return ref.ExpertWeights(ew.fmt, ew.w1, ew.w2, ew.w3, ew.s1.float(), ew.s2.float(), ew.s3.float(),
                                     ew.scale_fmt)
        experts32, shared32 = widened(experts), widened(shared)
        why = ops.moe_experts.explain(x, idx, w, experts32, shared32, limit, backend=backend)
        assert why[0][:2] == ("cann", "skipped") and "scales are torch.float32" in " ".join(why[0][2]), why
        prepared = prepare_weights({"layers.0.ffn.experts": experts32, "layers.0.ffn.shared_experts": shared32})
        ex, sh = prepared["layers.0.ffn.experts"], prepared["layers.0.ffn.shared_experts"]
        assert ex.s1.dtype == sh.s1.dtype == torch.float8_e8m0fnu and torch.equal(ex.s1.float(), experts32.s1)
        with registry.use_backend("ascend"):
            registry.reset_counts()
            got = ops.moe_experts(x, idx, w, ex, sh, limit)
            assert registry.provider_counts()["moe_experts"] == {"cann": 1}
        torch.testing.assert_close(got, ref.moe_experts(x, idx, w, experts, shared, limit), rtol=0, atol=0)


def _one_expert_case(case_id: str):
    """The moe_experts conformance case `case_id` cut down to a one-expert stack (a slot of row 1 unrouted, as EP
    padding): one group for the grouped GEMM, as MC2 with one expert per rank gives the ascend provider."""
    import dataclasses
    base = next(c for c in all_cases(small=True) if c.case_id == case_id)

    def make(g):
        x, idx, w, experts, shared, limit = base.make(g)
        one_idx = torch.zeros(idx.shape[0], 1, dtype=idx.dtype)
        one_idx[1, 0] = -1
        return x, one_idx, w[:, :1], experts.select(torch.tensor([2])), shared, limit
    return dataclasses.replace(base, case_id=case_id + "/one_expert", make=make, slice0=None)


@pytest.mark.parametrize("standin", ["A2", "A3"], indirect=True)
def test_a_one_expert_stack_runs_on_the_grouped_gemm(standin):
    """npu_grouped_matmul refuses counts of length 1 (group_list_type 1): one expert must still run, as a cumsum."""
    rec = run_case(_one_expert_case("moe_experts/bf16/bfloat16"), "cann", registry.get_backend("ascend"), "cpu", {})
    assert rec.status == "pass", (rec.status, rec.message)


def test_mx_grouped_matmul_contract():
    from dsv4_portable.conformance.ascend_spec.vendor_check import _cases
    make = next(c for c in _cases() if c.case_id == "grouped_matmul/w4a8_mx").make
    gmm = spec["torch_npu.npu_grouped_matmul"]
    args, kw = make(torch.Generator().manual_seed(0))
    with use_soc("950"):
        assert gmm(*args, **kw)[0].shape == (12, 128)
        for bad, arg in (({"weight_dtype": 293}, "weight_dtype"),
                         ({"per_token_scale": [kw["per_token_scale"][0][:, :1]]}, "per_token_scale")):
            with pytest.raises(VendorContractError) as e:
                gmm(*args, **{**kw, **bad})
            assert e.value.arg == arg
        with pytest.raises(VendorContractError) as e:                 # packed along N instead of K
            gmm(args[0], [args[1][0].contiguous()], **kw)
        assert e.value.arg == "weight[0]"
    with use_soc("A3"), pytest.raises(VendorContractError, match="<soc>"):
        gmm(*args, **kw)
