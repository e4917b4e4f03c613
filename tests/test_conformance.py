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
WRONG = {
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
    "rms_norm": lambda x, weight=None, eps=1e-6: ref.rms_norm(x, weight, eps) * (1 + 1e-2 * torch.rand(()).item()),
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
    for op in ("sparse_attn", "hc_post", "quant_fp8", "indexer_topk"):
        assert all(r.provider == "bad" for r in by_op[op])
        assert any(r.status == "fail" for r in by_op[op]), op
    assert not any(r.status == "pass" for r in by_op["hc_post"])
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


def test_named_provider_and_all_policy(wrong_backend):
    cases = [c for c in all_cases() if c.case_id == "hc_post/asymmetric_comb/float32"]
    assert [r.provider for r in run_cases(cases, wrong_backend, "all", lambda s: None)] == ["bad", "reference"]
    assert [r.status for r in run_cases(cases, wrong_backend, "reference", lambda s: None)] == ["pass"]


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu"], "tpu"),
    (["--device", "cpu", "--ops", "sparse_attn,flash"], "flash"),
    (["--device", "cuda"], "CUDA"),
    (["--device", "cpu", "--providers", "nosuch"], "nosuch"),
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
    records name the Triton provider (a subset of ops keeps CI fast; the full run is in the README)."""
    pytest.importorskip("triton")
    out = tmp_path / "cuda.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dsv4_portable.conformance.command", "--device", "cuda",
                           "--interpret", "--ops", "quant_fp8,sparse_attn,hc_post,moe_route,compressor",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out)
    assert records and all(r.status == "pass" and r.provider == "triton" for r in records)
    assert all("simulated" in r.device for r in records)
