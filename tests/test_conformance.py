"""The conformance harness: the CPU suite passes and writes well-formed records, and deliberately wrong providers
(each one a bug that has broken real implementations) are caught."""
import json
import subprocess
import sys

import pytest
import torch

from dsv4_portable import reference as ref
from dsv4_portable import registry
from dsv4_portable.conformance.cases import all_cases
from dsv4_portable.conformance.command import main as conformance
from dsv4_portable.conformance.records import CaseRecord
from dsv4_portable.conformance.report import read_jsonl
from dsv4_portable.conformance.runner import run_cases
from dsv4_portable.registry import Backend, Provider


def test_cpu_suite_passes_and_writes_records(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert conformance(["--device", "cpu", "--out", str(out)]) == 0
    records = read_jsonl(out)
    ops = {r.op for r in records}
    assert ops == set(registry.OPS), set(registry.OPS) - ops          # every op has cases
    for r in records:
        assert r.status == "pass" and r.provider == "reference" and r.deterministic, r
        assert r.device.startswith("cpu") and r.versions["torch"] == torch.__version__
        assert r.tolerance["source"] and r.shapes and r.duration_s >= 0
    # the adversarial cases of DESIGN.md section 5 are present
    ids = {r.case_id for r in records}
    for needle in ("clamp_beyond_10", "kv_nope_448", "prefill_then_decode", "chunked_non_multiple", "hash_layer",
                   "asymmetric_comb", "sink_-inf", "sink_huge", "ties", "zero_token_expert", "T1"):
        assert any(needle in i for i in ids), needle
    for ratio_len in ("prefill_3", "prefill_4", "prefill_5", "prefill_7", "prefill_127", "prefill_128",
                      "prefill_129", "prefill_255"):
        assert any(i.endswith(ratio_len) for i in ids), ratio_len
    md = out.with_suffix(".md").read_text()
    assert "passed, 0 failed" in md and "| op | sparse_attn | reference |" in md
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: ")


# ----------------------------------------------------------------------------------------------- wrong providers
def fp8_roundtrip_nearest_pow2(x, block_size=64, scale_fmt="ue8m0"):
    """KV FP8 round trip with the scale exponent rounded to nearest instead of up (DESIGN.md 2.1 says ceil)."""
    xb = x.float().reshape(*x.shape[:-1], -1, block_size)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = torch.exp2(torch.round(torch.log2(amax / 448.0)))
    q = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * s).reshape(x.shape).to(x.dtype)


def topk_ties_to_high_index(q, k, w, visible, topk):
    """A correct indexer that breaks ties toward the HIGHER index and returns each row in reverse order (the
    reference breaks ties toward the lower index): set semantics must accept it."""
    scores = ref.indexer_scores(q.float(), k.float(), w.float())
    n = scores.shape[-1]
    scores = scores.masked_fill(torch.arange(n) >= visible.unsqueeze(-1).long(), float("-inf"))
    picked = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :min(topk, n)]
    idx = n - 1 - picked
    idx = torch.where(idx >= visible.unsqueeze(-1).long(), -1, idx)
    return idx.flip(-1).to(torch.int32)


_calls = [0]


def rms_norm_alternating(x, weight=None, eps=1e-6):
    """Every other call scales the output by 1 + 2^-7: above one bf16 step (2^-8), so the bits change, but inside
    the bf16 tolerance (rtol 1.6e-2) -- like a kernel whose reduction order depends on scheduling."""
    _calls[0] += 1
    return (ref.rms_norm(x, weight, eps).float() * (1 + 2.0 ** -7 * (_calls[0] % 2))).to(x.dtype)


WRONG = {
    # KV FP8 round trip whose power-of-two scales round to nearest (DESIGN.md 5 case 2)
    "fp8_roundtrip": fp8_roundtrip_nearest_pow2,
    # sparse attention that forgets the sink column
    "sparse_attn": lambda q, kv, sink, idx, scale: ref.sparse_attn(q, kv, torch.full_like(sink, float("-inf")),
                                                                   idx, scale),
    # mHC post applying the comb untransposed
    "hc_post": lambda o, h, post, comb: ref.hc_post(o, h, post, comb.transpose(-1, -2)),
    # FP8 quantiser with plain amax/448 scales where ue8m0 (ceil power of two) was asked for
    "quant_fp8": lambda x, block_size, scale_fmt="ue8m0": ref.quant_fp8(x, block_size, None),
    # an indexer that returns the lowest-scoring entries
    "indexer_topk": lambda q, k, w, visible, topk: ref.indexer_topk(q, k, -w, visible, topk),
    # experts without the SwiGLU clamp
    "moe_experts": lambda x, idx, weights, experts, shared=None, swiglu_limit=0.0: ref.moe_experts(
        x, idx, weights, experts, shared, 0.0),
    # a nondeterministic RMSNorm (bf16: noise below the tolerance, so only the determinism check can catch it)
    "rms_norm": lambda x, weight=None, eps=1e-6: rms_norm_alternating(x, weight, eps),
}


@pytest.fixture
def wrong_backend():
    backend = registry.add_backend(Backend("wrongdev", "wrongdev", ["bad"], [], None, "test only",
                                           simulated_fn=lambda: "test backend on CPU tensors"))
    added = []
    for op, fn in WRONG.items():
        p = Provider(op, "bad", "wrongdev", fn)
        registry.get_op(op).register(p)
        added.append(p)
    decline = Provider("linear", "bad", "wrongdev", lambda x, w: x,
                       supports_fn=lambda x, w: ["this provider only takes K >= 4096"])
    registry.get_op("linear").register(decline)
    added.append(decline)
    boom = Provider("rope", "bad", "wrongdev", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel fault")))
    registry.get_op("rope").register(boom)
    added.append(boom)
    yield backend
    for p in added:
        op = registry.get_op(p.op)
        op.providers = [q for q in op.providers if q is not p]
        op._plan_key = None
    del registry.BACKENDS["wrongdev"]


def test_wrong_providers_are_caught(wrong_backend, tmp_path, capsys):
    cases = [c for c in all_cases() if c.op in set(WRONG) | {"linear", "rope"}]
    records = run_cases(cases, wrong_backend, "chosen", progress=lambda line: None)
    by_op = {}
    for r in records:
        by_op.setdefault(r.op, []).append(r)
    for op in ("sparse_attn", "hc_post", "quant_fp8", "indexer_topk", "fp8_roundtrip"):
        assert all(r.provider == "bad" for r in by_op[op])
        assert any(r.status == "fail" for r in by_op[op]), op
    assert not any(r.status == "pass" for r in by_op["hc_post"])
    assert all(r.status == "fail" and "differ bitwise" in r.message for r in by_op["fp8_roundtrip"])
    sparse = {r.case_id.split("/")[1]: r.status for r in by_op["sparse_attn"] if "float32" in r.case_id}
    assert sparse["sink_random"] == "fail" and sparse["sink_huge"] == "fail" and sparse["sink_-inf"] == "pass"
    quant = {r.case_id: r.status for r in by_op["quant_fp8"]}
    assert quant["quant_fp8/float32/ue8m0"] == "fail" and quant["quant_fp8/float32/None"] == "pass"
    experts = {r.case_id: r.status for r in by_op["moe_experts"]}
    assert experts["moe_experts/bf16/clamp_beyond_10"] == "fail"      # only the adversarial case exposes it
    assert experts["moe_experts/bf16/bfloat16"] == "pass"
    norm = {r.case_id: r for r in by_op["rms_norm"]}
    assert all(r.status == "fail" for r in norm.values())
    bf16 = norm["rms_norm/weighted/bfloat16"]
    assert bf16.message.startswith("two runs of the same input differ bitwise") and bf16.mismatch_frac == 0.0
    # a declining provider: dispatch passes it over (the record says why); forced, it yields skip records
    assert all(r.provider == "reference" and "K >= 4096" in r.skipped_providers["bad"][0] for r in by_op["linear"])
    forced = run_cases([c for c in cases if c.op == "linear"], wrong_backend, "bad", lambda s: None)
    assert forced and all(r.status == "skip" and "K >= 4096" in r.message for r in forced)
    assert all(r.status == "error" and "kernel fault" in r.message for r in by_op["rope"])
    # the command's exit code is non-zero and the summary lists the failures
    out = tmp_path / "bad.jsonl"
    assert conformance(["--device", "wrongdev", "--ops", "hc_post", "--out", str(out)]) == 1
    assert "## Failures" in out.with_suffix(".md").read_text()


def test_topk_tie_choice_and_order_are_free(wrong_backend):
    """A provider that picks other members of exact ties (and another order) passes; the check is not vacuous: it
    does select different sets than the reference on the ties case."""
    tie_cases = [c for c in all_cases() if c.op == "indexer_topk" and "ties" in c.case_id]
    registry.get_op("indexer_topk").register(Provider("indexer_topk", "ties", "wrongdev", topk_ties_to_high_index))
    try:
        records = run_cases(tie_cases, wrong_backend, "ties", progress=lambda line: None)
    finally:
        op = registry.get_op("indexer_topk")
        op.providers = [p for p in op.providers if p.name != "ties"]
        op._plan_key = None
    assert len(records) == len(tie_cases) == 2
    assert all(r.provider == "ties" and r.status == "pass" for r in records), [r.message for r in records]
    differs = 0
    for case in tie_cases:
        args = case.args()
        mine, theirs = topk_ties_to_high_index(*args), ref.indexer_topk(*args)
        differs += sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(mine.flatten(0, 1), theirs.flatten(0, 1)))
    assert differs > 0


def test_named_provider_and_all_policy(wrong_backend):
    cases = [c for c in all_cases() if c.case_id == "hc_post/asymmetric_comb/float32"]
    assert [r.provider for r in run_cases(cases, wrong_backend, "all", lambda s: None)] == ["bad", "reference"]
    assert [r.status for r in run_cases(cases, wrong_backend, "reference", lambda s: None)] == ["pass"]


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu"], "tpu"),
    (["--device", "cpu", "--ops", "sparse_attn,flash"], "flash"),
    (["--device", "cuda"], "CUDA"),
    (["--device", "cpu", "--providers", "nosuch"], "nosuch"),
    (["--device", "cpu", "--interpret"], "--device cuda"),
])
def test_bad_arguments_fail_before_running(argv, needle, tmp_path):
    with pytest.raises((ValueError, KeyError, RuntimeError), match=needle):
        conformance(argv + ["--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_records_round_trip():
    r = CaseRecord("op", "rope", "rope/x", 1, "triton", {"a": ["why"]}, "cpu", {"torch": "x"}, {"x": [1]},
                   {"x": "float32"}, max_abs=0.5, status="pass")
    assert CaseRecord.from_json(r.to_json()) == r
    assert json.loads(r.to_json())["skipped_providers"] == {"a": ["why"]}


def test_triton_providers_pass_under_the_interpreter(tmp_path):
    """`dsv4 conformance --device cuda --interpret` on CPU: every case the Triton providers accept passes, and the
    records name the Triton provider. A subset of ops and the small cases keep CI fast (10-15 s here; the full
    `--device cuda --interpret` run takes about a minute on this 2-core machine)."""
    pytest.importorskip("triton")
    out = tmp_path / "cuda.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dsv4_portable.conformance.command", "--device", "cuda",
                           "--interpret", "--small", "--ops",
                           "quant_fp8,sparse_attn,window_sparse_attn,hc_post,moe_route,compressor",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out)
    assert records and all(r.status == "pass" and r.provider == "triton" for r in records)
    assert all("simulated" in r.device for r in records)
    assert {r.op for r in records} == {"quant_fp8", "sparse_attn", "window_sparse_attn", "hc_post", "moe_route",
                                       "compressor"}
    assert any(r.case_id == "compressor/hca/prefill_129" for r in records)


def test_ep_section_is_called_and_its_failures_reported(monkeypatch, tmp_path):
    """--ep N calls the EP suite with world sizes up to N; a missing or crashing EP module gives an error record
    and a non-zero exit (the EP cases themselves are tested in test_ep.py)."""
    import dsv4_portable.ep.conformance as ep_conf
    calls = []

    def fake(device, world_sizes, progress, seed=0):
        calls.append((device, world_sizes, seed))
        return [CaseRecord("ep", "ep_moe", "ep/w1/fake", seed, "torch-dist", {}, "cpu", {}, {}, {}, status="pass")]
    monkeypatch.setattr(ep_conf, "ep_records", fake)
    out = tmp_path / "ep.jsonl"
    assert conformance(["--device", "cpu", "--ops", "hadamard", "--ep", "2", "--seed", "5", "--out", str(out)]) == 0
    assert calls == [("cpu", [1, 2], 5)]
    assert [r.section for r in read_jsonl(out)].count("ep") == 1

    monkeypatch.setattr(ep_conf, "ep_records", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("rank 1 hung")))
    assert conformance(["--device", "cpu", "--ops", "hadamard", "--ep", "1", "--out", str(out)]) == 1
    assert any(r.section == "ep" and r.status == "error" and "rank 1 hung" in r.message for r in read_jsonl(out))

    monkeypatch.setitem(sys.modules, "dsv4_portable.ep.conformance", None)     # import now raises ImportError
    assert conformance(["--device", "cpu", "--ops", "hadamard", "--ep", "1", "--out", str(out)]) == 1
    assert any(r.case_id == "ep/unavailable" and r.status == "error" for r in read_jsonl(out))


def test_topk_set_metric_by_hand():
    """Hand-made rows: scores [3, 2, 2 + 1e-9, 1, -inf (invisible)], top-2. The reference picks {0, 2}."""
    from dsv4_portable.conformance.metrics import compare_topk_sets
    from dsv4_portable.registry import Tolerance
    scores = torch.tensor([[3.0, 2.0, 2.0 + 1e-9, 1.0, float("-inf")]], dtype=torch.float64)
    want = torch.tensor([[0, 2]])
    near = torch.tensor([[1, 0]])                     # a near-tie: wrong at eps 0, right within a stated margin
    assert not compare_topk_sets(near, want, scores, "idx").ok
    assert compare_topk_sets(near, want, scores, "idx", Tolerance("set", atol=1e-6)).ok
    for bad in ([[0, 3]], [[0, 0]], [[0, 4]], [[0, -1]]):   # beaten, repeated, invisible, too few
        assert not compare_topk_sets(torch.tensor(bad), want, scores, "idx", Tolerance("set", atol=1e-6)).ok, bad


def test_hash_layer_without_input_ids_is_refused_by_name():
    """DESIGN.md 5 case 4, the 'without input_ids' half: the conformance hash-layer case minus its token ids is
    rejected before any provider runs, with a message naming the missing argument."""
    case = next(c for c in all_cases() if c.case_id == "moe_route/hash_layer")
    args = list(case.args())
    args[4] = None
    with pytest.raises(registry.OpInputError, match="input_ids"):
        registry.get_op("moe_route").run("reference", *args)


def _hc_head_batch_dependent(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6):
    """hc_head whose bf16 result moves by one step when the call holds more than one batch element, like a kernel
    whose launch plan follows the batch size."""
    y = ref.hc_head(h, fn, scale, base, norm_eps, hc_eps)
    return (y.float() * (1 + 2.0 ** -7)).to(y.dtype) if h.shape[0] > 1 else y


@pytest.mark.parametrize("claims", [True, False])
def test_batch_invariance_fails_only_a_provider_that_claims_it(claims):
    backend = registry.add_backend(Backend("batchdev", "batchdev", ["bad"], [], None, "test only",
                                           simulated_fn=lambda: "test backend on CPU tensors"))
    p = Provider("hc_head", "bad", "batchdev", _hc_head_batch_dependent, batch_invariant=claims)
    registry.get_op("hc_head").register(p)
    try:
        cases = [c for c in all_cases() if c.case_id == "hc_head/bfloat16"]
        (rec,) = run_cases(cases, backend, "chosen", progress=lambda line: None)
    finally:
        op = registry.get_op("hc_head")
        op.providers = [q for q in op.providers if q is not p]
        op._plan_key = None
        del registry.BACKENDS["batchdev"]
    assert rec.provider == "bad" and rec.batch_invariant is False
    assert rec.status == ("fail" if claims else "pass")
    assert "differs bitwise from its row in the batch" in rec.message
