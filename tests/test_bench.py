"""`dsv4 bench` on CPU with --small: JSON structure, FLOP/byte counts against hand-derived values, the reference
size cap, roofline percentages, GPU-name peak lookup and clear errors. (No timing is asserted: CPU times say
nothing about speed.)"""
from __future__ import annotations

import argparse
import json

import pytest

from dsv4_portable import bench, cli
from dsv4_portable.registry import OpInputError, UnknownDeviceError


def _run(tmp_path, *extra):
    p = argparse.ArgumentParser()
    bench.add_bench_args(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--device", "cpu", "--small", "--json", str(out), *extra])
    rc = bench.bench_main(args)
    return rc, json.loads(out.read_text())


def _case(report, op, phase):
    (c,) = [c for c in report["cases"] if c["op"] == op and c["phase"] == phase]
    return c


def test_cpu_small_json_structure_and_counts(tmp_path, capsys):
    rc, rep = _run(tmp_path, "--ops", "fp8_linear,rms_norm,sparse_attn")
    assert rc == 0
    h = rep["header"]
    assert h["peaks"] is None and "NOT GPU figures" in h["note"] and "no percent of peak" in h["peaks_note"]
    assert h["phases"] == ["prefill", "decode"] and h["config"] == "tiny (--small)"
    assert [(c["op"], c["phase"]) for c in rep["cases"]] == [
        (op, ph) for ph in ("prefill", "decode") for op in ("fp8_linear", "rms_norm", "sparse_attn")]
    for c in rep["cases"]:
        (r,) = c["results"]                       # cpu backend: the reference only
        assert r["provider"] == "reference" and r["status"] == "timed" and r["ms"] > 0
        assert r["pct_of_peak"] is None and r["speed_vs_fastest_vendor"] is None
        assert r["speedup_vs_reference"] == 1.0
        assert r["gbps"] == pytest.approx(c["bytes"] / (r["ms"] / 1e3) / 1e9)
        assert r["host_ms"] > 0                  # the back-to-back, host-inclusive figure
        assert r["tflops"] == pytest.approx(c["flops"] / (r["ms"] / 1e3) / 1e12)
    assert rep["summary"] == {"cases": 6, "timed": 6, "declined": 0, "skipped": 0, "error": 0}

    # tiny preset: dim 256, o_groups 2 x o_lora 128, 4 heads of 128, window 16, top-k 8; --small: 64 prefill
    # tokens, decode batch 2 at context 256.
    gemm = _case(rep, "fp8_linear", "prefill")   # wo_b: M=64 tokens, N=dim=256, K=2*128=256
    assert gemm["shape"] == {"M": 64, "N": 256, "K": 256}
    assert gemm["flops"] == 2 * 64 * 256 * 256 == 8_388_608
    # x bf16 64*256*2 + w fp8 256*256 + fp32 block scales 2*2*4 + y bf16 64*256*2
    assert gemm["bytes"] == 32_768 + 65_536 + 16 + 32_768
    norm = _case(rep, "rms_norm", "decode")      # x [2, 256] bf16 read + y written + bf16 weight [256]
    assert norm["flops"] == 0 and norm["bytes"] == 2 * 2 * 256 * 2 + 256 * 2 == 2_560
    attn = _case(rep, "sparse_attn", "decode")   # B=2, H=4, D=128, K=16+8=24 over N=16+256/4=80 rows
    assert attn["shape"] == {"B": 2, "S": 1, "H": 4, "D": 128, "K": 24, "N": 80}
    assert attn["flops"] == 4 * 2 * 4 * 24 * 128 == 98_304
    # q + o bf16 2*(2*4*128*2), idx int32 2*24*4, sink fp32 4*4, 48 gathered kv rows of 128 bf16
    assert attn["bytes"] == 4_096 + 192 + 16 + 48 * 128 * 2

    out = capsys.readouterr()
    assert "NOT GPU figures" in out.out and "fp8_linear prefill" in out.out
    assert "[6/6] sparse_attn decode: reference" in out.err and "summary: 6 cases, 6 provider timings" in out.err


def test_window_attention_and_moe_cases_hand_derived(tmp_path):
    """window_sparse_attn counts the rows a CSA step reads in place; moe_experts has an FP8 case beside the
    tiny preset's FP4 experts (the Hopper route); the compressor case's weights are fp32 as the model keeps
    them."""
    rc, rep = _run(tmp_path, "--ops", "window_sparse_attn,moe_experts,compressor")
    assert rc == 0
    # decode: B=2 at position 255, window 16 + top-8 of N=64 entries: 24 rows per query, 4 heads of 128
    dec = _case(rep, "window_sparse_attn", "decode")
    assert dec["shape"] == {"B": 2, "S": 1, "H": 4, "D": 128, "W": 16, "K": 8, "N": 64, "start_pos": 255}
    assert dec["flops"] == 4 * 2 * 4 * 128 * 24 == 98_304
    # q + o, then per sequence the new row + 15 ring rows + 8 entries of 128 bf16, top-k ids, sink
    assert dec["bytes"] == 2 * 2 * 4 * 128 * 2 + 2 * (1 + 15 + 8) * 128 * 2 + 2 * 8 * 4 + 4 * 4 == 16_464
    # prefill: 64 tokens from 0: window rows sum_p min(16, p+1) = 904, entries sum_p min(8, (p+1)//4) = 376
    pre = _case(rep, "window_sparse_attn", "prefill")
    assert pre["flops"] == 4 * 4 * 128 * (904 + 376)
    assert pre["bytes"] == 2 * 64 * 4 * 128 * 2 + (64 + 16) * 128 * 2 + 64 * 8 * 4 + 4 * 4
    moe = [c for c in rep["cases"] if c["op"] == "moe_experts" and c["phase"] == "decode"]
    assert [c["shape"]["experts"] for c in moe] == ["fp4", "fp8"] and "Hopper" in moe[1]["label"]
    comp = _case(rep, "compressor", "prefill")   # x bf16 [64, 256]; wkv + wgate fp32 [256, 256] each
    assert comp["bytes"] == 64 * 256 * 2 + 2 * 256 * 256 * 4 + 4 * 256 * 4 + 2 * 2 * (8 * 256 * 4) + 16 * 128 * 2
    assert all(r["status"] == "timed" for c in rep["cases"] for r in c["results"])


def test_reference_cap_skips_with_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.REFERENCE_CAPS, "cpu", {"default": (1e6, 1e9)})
    rc, rep = _run(tmp_path, "--ops", "fp8_linear,rms_norm", "--phase", "prefill")
    assert rc == 0
    gemm, norm = rep["cases"]
    (r,) = gemm["results"]
    assert r["status"] == "skipped" and "ms" not in r
    assert "8.39e+06 FLOP" in r["reasons"][0] and "reference cap of 1e+06 FLOP" in r["reasons"][0]
    assert norm["results"][0]["status"] == "timed"   # 0 FLOP, under the cap
    assert rep["summary"]["skipped"] == 1 and rep["summary"]["timed"] == 1


def test_cpu_timing_is_one_pass(monkeypatch):
    """On CPU the calls are synchronous: time_ms times warmup + 1 sizing call + reps calls, and host_ms is the
    mean of the same samples (the device-only back-to-back pass does not run). A fake clock makes it exact."""
    import torch
    now = [0.0]
    calls = []

    def fn():
        calls.append(1)
        now[0] += 0.001 * len(calls) ** 2   # the n-th call takes n^2 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    ms, reps, host_ms = bench.time_ms(fn, torch.device("cpu"), warmup=2, reps=4, budget_s=10.0)
    assert reps == 4 and len(calls) == 2 + 1 + 4
    assert ms == pytest.approx(30.5) and host_ms == pytest.approx(31.5)   # samples 16, 25, 36, 49 ms


def test_roofline_percent_hand_derived():
    case = bench.Case("x", "prefill", "", {}, flops=1e12, bytes=1e9, mma="bf16", build=None)
    peaks = {"hbm": 3.35e12, "fp32": 67e12, "bf16": 989e12, "fp8": 1979e12}
    r = bench._rates(case, 2.0, peaks)                 # 1e12 FLOP / 989e12 FLOP/s = 1.0111 ms > 1e9 / 3.35e12 s
    assert r["bound"] == "compute" and r["pct_of_peak"] == pytest.approx(100 * 1.0111223 / 2.0, rel=1e-6)
    assert r["tflops"] == pytest.approx(500.0) and r["gbps"] == pytest.approx(500.0)
    mem = bench.Case("y", "decode", "", {}, flops=0, bytes=3.35e9, mma="bf16", build=None)
    r = bench._rates(mem, 4.0, peaks)                  # 3.35e9 B at 3.35e12 B/s = 1 ms of 4 ms
    assert r["bound"] == "memory" and r["pct_of_peak"] == pytest.approx(25.0)
    # fp32 products are held to TF32x3 on the tensor cores (TF32 peak / 3) when that beats the FP32 FMA units
    f32 = bench.Case("z", "prefill", "", {}, flops=494.7e9 / 3, bytes=0, mma="fp32", build=None)
    assert bench.compute_roof({**peaks, "tf32": 494.7e12}, "fp32") == pytest.approx(164.9e12)
    assert bench._rates(f32, 2.0, {**peaks, "tf32": 494.7e12})["pct_of_peak"] == pytest.approx(50.0)
    assert bench.compute_roof(peaks, "fp32") == 67e12   # no TF32 figure: the FMA roof


def test_gpu_name_lookup():
    assert bench.peaks_for_name("NVIDIA H100 80GB HBM3")[0]["hbm"] == 3.35e12
    assert bench.peaks_for_name("NVIDIA H200")[0]["hbm"] == 4.8e12
    assert bench.peaks_for_name("NVIDIA GH200 480GB")[0]["hbm"] == 4.0e12   # not the H200 entry
    assert bench.peaks_for_name("NVIDIA GH200 144G HBM3e")[0]["hbm"] == 4.9e12
    assert bench.peaks_for_name("NVIDIA GH200 480GB")[0]["bf16"] == 989e12
    assert bench.peaks_for_name("NVIDIA H800")[0]["bf16"] == 989e12
    assert bench.peaks_for_name("NVIDIA H100 PCIe")[0]["hbm"] == 2.0e12   # not the SXM figures
    assert bench.peaks_for_name("NVIDIA H800 PCIe")[0] is None            # no entry: no guess
    peaks, note = bench.peaks_for_name("NVIDIA A100-SXM4-80GB")
    assert peaks is None and "unknown GPU" in note


def test_unknown_op_and_device_error_clearly(tmp_path, capsys):
    with pytest.raises(OpInputError, match="unknown op 'no_such_op'.*known ops:.*sparse_attn"):
        _run(tmp_path, "--ops", "rms_norm,no_such_op")
    p = argparse.ArgumentParser()
    bench.add_bench_args(p)
    with pytest.raises(UnknownDeviceError, match="unknown device 'tpu'.*cpu"):
        bench.bench_main(p.parse_args(["--device", "tpu", "--small"]))
    assert cli.main(["bench", "--device", "tpu", "--small"]) == 2
    assert "error: unknown device 'tpu'" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--small", "--ops", "nope"]) == 2
    assert "error: unknown op 'nope'" in capsys.readouterr().err


def test_simulated_cuda_lists_vendors_and_ratios(tmp_path):
    """--device cuda under the Triton interpreter (a subprocess: TRITON_INTERPRET must be set before Triton is
    imported): vendor providers are listed with their reasons, Triton and the reference are timed side by side,
    and the run is labelled as simulated with no percent of peak."""
    import os
    import subprocess
    import sys
    out = tmp_path / "sim.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "dsv4_portable.cli", "bench", "--device", "cuda", "--small",
                           "--ops", "rms_norm,sparse_attn", "--phase", "decode", "--warmup", "0", "--reps", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert "simulated" in rep["header"]["device"] and rep["header"]["peaks"] is None
    assert "NOT GPU figures" in rep["header"]["note"]
    rows = {r["provider"]: r for r in _case(rep, "sparse_attn", "decode")["results"]}
    assert list(rows) == ["flash_mla", "triton", "reference"]
    assert rows["flash_mla"]["status"] == "declined" and "FlashMLA" in rows["flash_mla"]["reasons"][0]
    tri, ref = rows["triton"], rows["reference"]
    assert tri["status"] == ref["status"] == "timed" and tri["pct_of_peak"] is None
    assert tri["speedup_vs_reference"] == pytest.approx(ref["ms"] / tri["ms"])
    assert tri["speed_vs_fastest_vendor"] is None              # no vendor provider was timed
    assert "flash_mla      declined:" in proc.stdout and proc.stderr.rstrip().splitlines()[-1].startswith("summary:")
