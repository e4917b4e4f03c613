"""Triton providers of the compute-heavy ops (fp8_linear, fp4_linear, sparse_attn, indexer_topk, moe_experts)
against the reference, through the registry (`op.run("triton", ..., device_type="cuda")`).

Why a worker subprocess: on CPU the kernels run under the Triton interpreter, and TRITON_INTERPRET=1 must be set
before triton.jit decorates them (it is read at decoration time). Setting it in this pytest process would leak
into every other test module (and kernels imported earlier would stay compiled-mode). So every kernel check
runs in ONE worker process (this file run as a script) whose environment alone carries TRITON_INTERPRET=1; each
pytest test below reports one named check of that worker (one start-up of torch + triton for all of them). On
a machine with a CUDA GPU the worker runs the same checks on the GPU without the interpreter (references are
computed on CPU copies): that is the run a GPU session should do. A second worker compiles what the providers
launch at DeepSeek-V4 sizes for sm90 with triton's offline compiler (compile_check.py), also without a GPU.

What the interpreter exercises, exactly: indexing, masking, tiling, split-K and combine logic, online softmax,
the SwiGLU epilogue, fused FP8 quantisation of h, FP4 unpacking and the ordered combine, in fp32 arithmetic
(dot operands are upcast to fp32: the interpreter's bf16 tl.dot is wrong). fp8 tensors are loaded and
converted by the interpreter (exact); its fp32->bf16 cast truncates and its fp32->fp8 cast rounds ties away, so
kernels round explicitly (ties to even) under the interpreter; on GPUs the hardware cvt.rn does it. Not
exercised on CPU: bf16/fp8 tensor-core products and their accumulation order, TF32 avoidance, GPU timing.
Batch invariance is checked bitwise here, but numpy's matmul gives position-independent rows whatever the
tile height, so on CPU that check covers the routing/tiling/combine bookkeeping; the tile-shape rule itself is
checked structurally (launch constexprs independent of T) and on a GPU by the same bitwise check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

HERE = os.path.abspath(__file__)


# ====================================================================================== worker-side helpers
def _dev():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu(v):
    from dsv4_portable.reference.moe import ExpertWeights
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, ExpertWeights):
        f = lambda t: None if t is None else t.cpu()  # noqa: E731
        return ExpertWeights(v.fmt, f(v.w1), f(v.w2), f(v.w3), f(v.s1), f(v.s2), f(v.s3), v.scale_fmt)
    return v


def _on(v, dev):
    from dsv4_portable.reference.moe import ExpertWeights
    if isinstance(v, torch.Tensor):
        return v.to(dev)
    if isinstance(v, ExpertWeights):
        f = lambda t: None if t is None else t.to(dev)  # noqa: E731
        return ExpertWeights(v.fmt, f(v.w1), f(v.w2), f(v.w3), f(v.s1), f(v.s2), f(v.s3), v.scale_fmt)
    return v


def _run_both(op_name, *args):
    """(triton output on CPU, reference output) for the same inputs; the reference always runs on CPU."""
    from dsv4_portable.registry import get_op
    op = get_op(op_name)
    dev = _dev()
    out = op.run("triton", *[_on(a, dev) for a in args], device_type="cuda")
    ref = op.run("reference", *[_cpu(a) for a in args])
    return out.cpu(), ref


def _assert_tol(op_name, out, ref, k, what=""):
    """The op's own tolerance for ref's dtype: |out - ref| <= atol + atol_per_sqrt_k*sqrt(k) + rtol*|ref| on all
    but max_mismatch of the elements; no NaN where the reference has none."""
    from dsv4_portable.registry import get_op
    tol = get_op(op_name).tolerance(ref.dtype)
    assert out.shape == ref.shape and out.dtype == ref.dtype, \
        f"{what}: {out.shape}/{out.dtype} vs {ref.shape}/{ref.dtype}"
    o, r = out.double(), ref.double()
    assert not (torch.isnan(o) & ~torch.isnan(r)).any(), f"{what}: NaN in the provider's output"
    bound = tol.atol + tol.atol_per_sqrt_k * k ** 0.5 + tol.rtol * r.abs()
    bad = ((o - r).abs() > bound).float().mean().item() if r.numel() else 0.0
    assert bad <= tol.max_mismatch, (f"{what}: {bad:.3%} of elements outside {tol.describe()} (k={k}); "
                                     f"max |diff| {(o - r).abs().max().item():.3g}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _launch_log():
    """Record every kernel launch (name, grid, constexprs) while still launching it: (log, recording) where
    `with recording():` turns the recording on."""
    from dsv4_portable.backends.cuda import launch as L
    log = []

    def hook(kernel, grid, args, meta):
        log.append((kernel.__name__, tuple(grid), {k: v for k, v in meta.items() if k.isupper()}))
        return kernel[grid](*args, **meta)
    return log, lambda: L.intercept(hook)


# ====================================================================================== checks (worker)
def check_fp8_linear():
    from dsv4_portable.reference.quant import float_to_e8m0, quant_fp8_weight
    g = _gen(1)
    for m in (1, 20, 70):                       # the three tile buckets (decode, small batch, prefill)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(m, 384, generator=g) * 3).to(dt)
            w, ws = quant_fp8_weight(torch.randn(200, 384, generator=g) * 0.05)   # N=200: ragged last tile
            for scale, fmt in ((ws, "ue8m0"), (float_to_e8m0(ws), "ue8m0"), (ws, None)):
                out, ref = _run_both("fp8_linear", x, w, scale, fmt)
                _assert_tol("fp8_linear", out, ref, 384, f"fp8_linear M={m} {dt} {scale.dtype} {fmt}")
    x = torch.randn(2, 3, 256, generator=g)     # leading dims are kept
    w, ws = quant_fp8_weight(torch.randn(64, 256, generator=g))
    out, ref = _run_both("fp8_linear", x, w, ws)
    _assert_tol("fp8_linear", out, ref, 256, "fp8_linear 3-d x")


def check_fp4_linear():
    from dsv4_portable.reference.quant import float_to_e8m0, quant_fp4_weight
    g = _gen(2)
    for m in (1, 20, 70):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(m, 256, generator=g) * 2).to(dt)
            w, ws = quant_fp4_weight(torch.randn(136, 256, generator=g) * 0.1)
            for scale in (ws, float_to_e8m0(ws)):
                out, ref = _run_both("fp4_linear", x, w, scale)
                _assert_tol("fp4_linear", out, ref, 256, f"fp4_linear M={m} {dt} {scale.dtype}")
            out, ref = _run_both("fp4_linear", x, w.view(torch.uint8), ws, None)
            _assert_tol("fp4_linear", out, ref, 256, f"fp4_linear uint8 packing, scale_fmt None {dt}")


def check_float_linear():
    """Float weights (bf16 weight mode, the fp32 head): bf16 x bf16, fp32 x fp32 and mixed, ragged M / N / K tiles,
    a strided x, and batch invariance within an M bucket."""
    g = _gen(4)
    for m in (1, 20, 70):
        for xdt, wdt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                         (torch.float16, torch.float16), (torch.float32, torch.bfloat16)):
            x = (torch.randn(m, 208, generator=g) * 2).to(xdt)
            w = (torch.randn(136, 208, generator=g) * 0.1).to(wdt)
            out, ref = _run_both("linear", x, w)
            _assert_tol("linear", out, ref, 208, f"linear M={m} x {xdt} w {wdt}")
    x = torch.randn(3, 9, 256, generator=g)[:, :, :224]
    out, ref = _run_both("linear", x, torch.randn(72, 224, generator=g).to(torch.bfloat16))
    _assert_tol("linear", out, ref, 224, "linear with a strided 3-D x")
    x, w = torch.randn(12, 128, generator=g).to(torch.bfloat16), torch.randn(64, 128, generator=g).to(torch.bfloat16)
    full, _ = _run_both("linear", x, w)
    one, _ = _run_both("linear", x[3:4], w)
    assert torch.equal(full[3:4], one), "linear: row 3 alone differs from its row in the batch"
    # grouped (wo_a): per-group products over [.., G, K] activations
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 5, 4, 96, generator=g).to(dt)
        w = (torch.randn(4, 40, 96, generator=g) * 0.1).to(dt)
        out, ref = _run_both("grouped_linear", x, w)
        _assert_tol("grouped_linear", out, ref, 96, f"grouped_linear {dt}")


def check_gemm_split_k():
    """Small M with a long K: the plan splits K (the interpreter's virtual GPU has 8 SMs) and the fixed-order
    reduce runs; fp8_linear, linear and grouped_linear stay within tolerance, every M of a bucket gives a row
    the same bits, and each call is one GEMM launch with K splits (the grouped one with its 4 groups as grid
    axis 2) and one reduce."""
    from dsv4_portable.reference.quant import quant_fp8_weight
    g = _gen(15)
    log, recording = _launch_log()

    def split_call(op, gemm, groups, *args):
        log.clear()
        with recording():
            out, ref = _run_both(op, *args)
        grids = [grid for n, grid, _ in log if n == gemm]
        assert len(grids) == 1, f"{op}: {len(grids)} {gemm} launches, want one: {log}"
        assert grids[0][1] > 1, f"{op}: K was not split (grid {grids[0]})"
        assert (grids[0][2] if len(grids[0]) > 2 else 1) == groups, f"{op}: grid {grids[0]}, want {groups} groups"
        assert [n for n, _, _ in log].count("splitk_reduce_kernel") == 1, f"{op}: {log}"
        return out, ref
    x = (torch.randn(5, 1024, generator=g) * 2).to(torch.bfloat16)
    w, ws = quant_fp8_weight(torch.randn(64, 1024, generator=g) * 0.05)
    out, ref = split_call("fp8_linear", "fp8_gemm_kernel", 1, x, w, ws)
    _assert_tol("fp8_linear", out, ref, 1024, "fp8_linear split-K")
    one, _ = _run_both("fp8_linear", x[2:3], w, ws)
    assert torch.equal(one, out[2:3]), "fp8_linear: a row differs between M=5 and M=1 (same bucket)"
    for xdt, wdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        xf = torch.randn(3, 1024, generator=g).to(xdt)
        wf = (torch.randn(40, 1024, generator=g) * 0.05).to(wdt)
        out, ref = split_call("linear", "float_gemm_kernel", 1, xf, wf)
        _assert_tol("linear", out, ref, 1024, f"linear split-K {xdt}")
        xg = torch.randn(2, 3, 4, 1024, generator=g).to(xdt)
        wg = (torch.randn(4, 24, 1024, generator=g) * 0.05).to(wdt)
        out, ref = split_call("grouped_linear", "float_gemm_kernel", 4, xg, wg)
        _assert_tol("grouped_linear", out, ref, 1024, f"grouped_linear split-K {xdt}")


def check_fp4_to_fp8_conversion():
    """The loader's FP4 -> FP8 conversion (weights="fp8", or "auto" below sm100) is exact: the reference gives
    the same bits for the FP4 weight and for its FP8 conversion, and the Triton FP8 GEMM on the converted weight
    matches within tolerance."""
    from dsv4_portable.reference import fp4_linear, fp8_linear
    from dsv4_portable.reference.quant import fp4_to_fp8_weight, quant_fp4_weight
    g = _gen(3)
    w4, s4 = quant_fp4_weight(torch.randn(256, 256, generator=g) * torch.logspace(-3, 1, 256).unsqueeze(1))
    w8, s8 = fp4_to_fp8_weight(w4, s4)
    x = torch.randn(5, 256, generator=g)
    assert torch.equal(fp4_linear(x, w4, s4), fp8_linear(x, w8, s8)), "FP4->FP8 conversion changed the product"
    out, ref = _run_both("fp8_linear", x, w8, s8)
    _assert_tol("fp8_linear", out, ref, 256, "fp8_linear on the converted weight")


def _attn_case(g, b, s, h, d, n, k, dt=torch.float32):
    q = torch.randn(b, s, h, d, generator=g).to(dt)
    kv = torch.randn(b, n, d, generator=g).to(dt)
    sink = torch.randn(h, generator=g)
    idx = torch.randint(-1, n + 2, (b, s, k), generator=g, dtype=torch.int32)   # -1 and >= N are invalid
    return q, kv, sink, idx


def check_sparse_attn_edge_cases():
    from dsv4_portable.backends.cuda.attention import BLOCK_N, MIN_SPLIT_ROWS
    g = _gen(4)
    log, recording = _launch_log()
    # decode shape (one query, few heads): the planner splits the index list (asserted below); on a GPU
    # splits are at least MIN_SPLIT_ROWS long, so the list is longer there (~V4's 128 + 512)
    k = 7 * BLOCK_N - 5 if _dev().type == "cpu" else 5 * MIN_SPLIT_ROWS - 5
    q, kv, sink, idx = _attn_case(g, 1, 1, 4, 64, 50, k)
    sink[0], sink[1], sink[2] = float("-inf"), float("inf"), 80.0       # plain softmax / zero / huge sink
    for variant in ("random", "no valid index", "one valid in the last split", "valid only in the first block"):
        idx2 = idx.clone()
        if variant != "random":
            idx2.fill_(-1)
        if variant == "one valid in the last split":
            idx2[..., -1] = 7
        if variant == "valid only in the first block":
            idx2[..., :BLOCK_N] = torch.arange(BLOCK_N, dtype=torch.int32) % 50
        with recording():
            out, ref = _run_both("sparse_attn", q, kv, sink, idx2, 64 ** -0.5)
        _assert_tol("sparse_attn", out, ref, 64, f"sparse_attn decode/{variant}")
        if variant == "no valid index":
            assert torch.equal(out, torch.zeros_like(out)), "a row with no valid index must be exactly 0"
    assert any(n == "sparse_attn_combine_kernel" for n, _, _ in log), "the split-K path did not run"
    assert torch.equal(out[0, 0, 1], torch.zeros(64)), "sink +inf must give 0"
    # many queries (no split), H = 40 (two head blocks, the second partly masked), D = 48 (masked dims)
    log.clear()
    q, kv, sink, idx = _attn_case(g, 2, 3, 40, 48, 40, 70)
    idx[1, 2] = -1                                  # a row with no valid index
    idx[0, 1, 3:] = -1                              # a row with few valid indices, -1 padding at the end
    sink[5] = float("-inf")
    with recording():
        out, ref = _run_both("sparse_attn", q, kv, sink, idx, 48 ** -0.5)
    _assert_tol("sparse_attn", out, ref, 48, "sparse_attn prefill-shaped")
    assert not any(n == "sparse_attn_combine_kernel" for n, _, _ in log), "prefill shapes should not split"
    assert torch.equal(out[1, 2], torch.zeros(40, 48))
    # empty index list
    q, kv, sink, idx = _attn_case(g, 1, 2, 4, 32, 10, 0)
    out, ref = _run_both("sparse_attn", q, kv, sink, idx, 0.2)
    assert torch.equal(out, ref) and not out.any()


def check_sparse_attn_dtypes():
    g = _gen(5)
    for dt in (torch.float16, torch.bfloat16):
        for shape in ((1, 1, 16, 128, 300, 200), (2, 4, 16, 128, 64, 48)):
            q, kv, sink, idx = _attn_case(g, *shape, dt=dt)
            out, ref = _run_both("sparse_attn", q, kv, sink, idx, 128 ** -0.5)
            _assert_tol("sparse_attn", out, ref, 128, f"sparse_attn {dt} {shape}")


def _window_case(g, b, s, h, d, w, p0, ratio, n_extra=2, k=None, dt=torch.float32):
    """A window_sparse_attn step at positions p0..p0+s-1 with a w-slot ring, and for ratio > 0 the compressed
    entries (n_extra more than are visible: they must never be read) stored as a slice of a longer store, so
    comp is not contiguous; k: CSA top-k length (None: HCA)."""
    q = torch.randn(b, s, h, d, generator=g).to(dt)
    ring = torch.randn(b, w, d, generator=g).to(dt)
    kv = torch.randn(b, s, d, generator=g).to(dt)
    sink = torch.randn(h, generator=g)
    comp = topk = None
    if ratio:
        n = (p0 + s) // ratio + n_extra
        comp = torch.randn(b, n + 5, d, generator=g).to(dt)[:, :n]
        if k is not None:
            topk = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * s)]).view(b, s, k).int()
            topk[:, :, -1] = -1                          # padding
            topk[:, 0, 0] = n - 1                        # an entry no query can see yet
    return q, ring, kv, comp, topk, sink, d ** -0.5, p0, ratio


def check_window_sparse_attn():
    """The in-place kernel against the reference (which gathers [window | kv | comp] and runs sparse_attn):
    prefill longer than the window (rows from kv and the ring in one block), chunked prefill, decode across the
    ring wrap, HCA before/after the first entry, CSA with padding and invisible entries, a window that is not a
    multiple of the kv block, sinks -inf / +inf / huge, split and unsplit launches, fp16/bf16, strided q / kv /
    topk; and no workspace: the only launches are the attention kernel and the split combine."""
    g = _gen(14)
    log, recording = _launch_log()
    cases = [  # (b, s, h, d, w, p0, ratio, k, dtype, label)
        (1, 40, 4, 64, 16, 0, 0, None, torch.float32, "window-only prefill longer than the window"),
        (2, 5, 4, 64, 16, 13, 0, None, torch.float32, "chunked prefill: ring and new rows in one block"),
        (1, 1, 4, 64, 40, 97, 0, None, torch.float32, "decode across the ring wrap, window not a multiple of 32"),
        (1, 1, 4, 64, 16, 5, 8, None, torch.float32, "HCA decode before the first entry"),
        (2, 1, 4, 64, 16, 300, 4, None, torch.float32, "HCA decode over many entries (split-K)"),
        (1, 12, 4, 64, 16, 3, 4, None, torch.float32, "HCA chunked prefill"),
        (2, 1, 4, 64, 16, 400, 4, 70, torch.float32, "CSA decode (split-K)"),
        (1, 9, 20, 64, 16, 0, 4, 3, torch.float32, "CSA prefill, 20 heads (a masked head block)"),
        (1, 1, 16, 128, 32, 120, 4, 24, torch.float16, "CSA decode fp16"),
        (1, 3, 16, 128, 32, 60, 128, None, torch.bfloat16, "HCA bf16"),
        (2, 3, 4, 64, 16, 40, 4, 5, torch.float32, "CSA chunk with strided q, kv and topk (copied, not declined)"),
    ]
    for b, s, h, d, w, p0, ratio, k, dt, label in cases:
        args = _window_case(g, b, s, h, d, w, p0, ratio, k=k, dt=dt)
        if label.startswith("HCA decode over"):
            args[5][:2] = torch.tensor([float("-inf"), float("inf")])
            args[5][2] = 80.0
        if "strided" in label:              # q, kv and topk as every-other-element views (last-dim stride 2)
            q, ring, kv, comp, topk = args[:5]
            args = (torch.stack([q, -q], -1).flatten(-2)[..., ::2], ring,
                    torch.stack([kv, -kv], -1).flatten(-2)[..., ::2], comp,
                    torch.stack([topk, topk], -1).flatten(-2)[..., ::2], *args[5:])
            assert all(t.stride(-1) == 2 for t in (args[0], args[2], args[4]))
        log.clear()
        with recording():
            out = ops_run("window_sparse_attn", *args)
        ref = ops_ref("window_sparse_attn", *args)
        _assert_tol("window_sparse_attn", out, ref, w + s + (k or 0), label)
        names = {n for n, _, _ in log}
        assert "window_sparse_attn_kernel" in names and names <= {"window_sparse_attn_kernel",
                                                                  "sparse_attn_combine_kernel"}, (label, names)
        if "split-K" in label:
            assert "sparse_attn_combine_kernel" in names, f"{label}: the split path did not run"
        if label.startswith("HCA decode over"):
            assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])), "sink +inf must give 0"
    # B*S = 0
    args = _window_case(g, 1, 0, 4, 64, 16, 3, 4)
    assert ops_run("window_sparse_attn", *args).shape == (1, 0, 4, 64)
    # the caches are read in place: a ring or an entry store without a unit-stride last dim is declined
    from dsv4_portable.registry import get_op
    q, ring, kv, comp, topk, sink, scale, p0, ratio = (_on(a, _dev()) for a in _window_case(g, 1, 1, 4, 64, 16, 9,
                                                                                             4, k=2))
    sup = get_op("window_sparse_attn").provider("triton", "cuda").supports
    assert not sup(q, ring, kv, comp, topk, sink, scale, p0, ratio)
    for name, bad in (("window", (ring.mT.contiguous().mT, comp)), ("comp", (ring, comp.mT.contiguous().mT))):
        reasons = sup(q, bad[0], kv, bad[1], topk, sink, scale, p0, ratio)
        assert any(f"'{name}'" in r and "unit-stride" in r for r in reasons), (name, reasons)


def ops_run(op_name, *args):
    from dsv4_portable.registry import get_op
    dev = _dev()
    return get_op(op_name).run("triton", *[_on(a, dev) for a in args], device_type="cuda").cpu()


def ops_ref(op_name, *args):
    from dsv4_portable.registry import get_op
    return get_op(op_name).run("reference", *[_cpu(a) for a in args])


def check_split_plan():
    from dsv4_portable.backends.cuda.attention import BLOCK_N, plan_splits
    for programs, k, sms, rows in ((1, 640, 132, 128), (2, 640, 132, 128), (128, 640, 132, 128),
                                   (1, 20, 8, 32), (1, 7 * BLOCK_N - 5, 8, BLOCK_N), (3, 1000, 132, 128)):
        n, per = plan_splits(programs, k, sms, rows)
        blocks = max(1, -(-k // BLOCK_N))
        assert n >= 1 and per >= 1 and (n - 1) * per < blocks <= n * per, (programs, k, n, per)
        if programs >= sms // 2:
            assert n == 1
    assert plan_splits(2, 640, 132, 128)[0] > 1, "decode at batch 1 must split"


def check_indexer_scores():
    from dsv4_portable.backends.cuda.indexer import indexer_scores_triton
    from dsv4_portable.reference import indexer_scores
    g = _gen(6)
    dev = _dev()
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.randn(2, 5, 8, 32, generator=g).to(dt)
        k = torch.randn(2, 150, 32, generator=g).to(dt)
        w = torch.randn(2, 5, 8, generator=g)
        vis = torch.tensor([[0, 3, 64, 65, 150], [150, 1, 200, 129, 7]])
        sc = indexer_scores_triton(q.to(dev), k.to(dev), w.to(dev), vis.to(dev)).cpu()
        ref = indexer_scores(q, k, w)
        seen = torch.arange(150).view(1, 1, -1) < vis.unsqueeze(-1)
        assert torch.isinf(sc[~seen]).all() and (sc[~seen] < 0).all(), "invisible entries must be -inf"
        tol = 1e-4 if dt == torch.float32 else 2e-2
        torch.testing.assert_close(sc[seen], ref[seen], atol=tol, rtol=tol)


def check_indexer_topk_sets_with_ties():
    """Integer-valued inputs make every score exact in fp32, so ties are real ties for both implementations;
    sets are compared tie-aware: same number of -1, no duplicates, only visible entries, the same multiset of
    (independently computed) scores, and every entry strictly above the k-th best score present."""
    from dsv4_portable.reference import indexer_scores
    g = _gen(7)
    b, s, h, di, n = 2, 6, 4, 32, 90
    q = torch.randint(-2, 3, (b, s, h, di), generator=g).float()
    k = torch.randint(-2, 3, (b, n, di), generator=g).float()
    k[:, 10:30] = 0                                       # 20 keys scoring exactly 0: a large tie
    w = torch.randint(-2, 3, (b, s, h), generator=g).float() * 0.25
    vis = torch.tensor([[0, 1, 5, 30, 64, 90], [90, 89, 40, 17, 3, 200]])
    for topk in (8, 32, 200):
        out, ref = _run_both("indexer_topk", q, k, w, vis, topk)
        assert out.shape == ref.shape and out.dtype == torch.int32
        scores = indexer_scores(q, k, w)
        for bi in range(b):
            for si in range(s):
                o, r = out[bi, si], ref[bi, si]
                assert (o == -1).sum() == (r == -1).sum(), f"-1 count differs at {bi},{si}"
                ov, rv = o[o >= 0].long(), r[r >= 0].long()
                assert len(set(ov.tolist())) == len(ov), "duplicate index"
                assert (ov < min(vis[bi, si].item(), n)).all(), "invisible entry selected"
                assert torch.equal(scores[bi, si, ov].sort().values, scores[bi, si, rv].sort().values), \
                    f"selected score multisets differ at {bi},{si} topk {topk}"
                if len(rv):
                    above = (scores[bi, si, :min(vis[bi, si].item(), n)] > scores[bi, si, rv].min()).nonzero()
                    assert set(above.flatten().tolist()) <= set(ov.tolist()), "an entry above the tie was dropped"


def _experts(fmt, e, inter, d, dt, g, scale=0.08):
    from dsv4_portable.reference.moe import ExpertWeights
    from dsv4_portable.reference.quant import quant_fp4_weight, quant_fp8_weight
    ws = {n: torch.randn(e, *sh, generator=g) * scale for n, sh in (("1", (inter, d)), ("2", (d, inter)),
                                                                     ("3", (inter, d)))}
    if fmt == "bf16":
        return ExpertWeights("bf16", ws["1"].to(dt), ws["2"].to(dt), ws["3"].to(dt))
    qf = quant_fp8_weight if fmt == "fp8" else quant_fp4_weight
    parts = {}
    for n, w in ws.items():
        pairs = [qf(w[i]) for i in range(e)]
        parts["w" + n] = torch.stack([p for p, _ in pairs])
        parts["s" + n] = torch.stack([s for _, s in pairs])
    return ExpertWeights(fmt, parts["w1"], parts["w2"], parts["w3"], parts["s1"], parts["s2"], parts["s3"])


def check_moe_experts_formats_and_edges():
    g = _gen(8)
    d, inter, e = 256, 256, 6
    for fmt in ("bf16", "fp8", "fp4"):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            ex, sh = _experts(fmt, e, inter, d, dt, g), _experts(fmt, 1, inter, d, dt, g)
            x = (torch.randn(9, d, generator=g) * 2).to(dt)
            idx = torch.randint(0, e - 2, (9, 3), generator=g)          # experts 4 and 5 get no tokens
            idx[2, 1] = -1                                              # -1 slots
            idx[4, :] = -1                                              # a token with no routed expert
            w = torch.rand(9, 3, generator=g)
            out, ref = _run_both("moe_experts", x, idx, w, ex, sh, 10.0)
            _assert_tol("moe_experts", out, ref, max(d, inter), f"moe {fmt} {dt}")
    dt = torch.float16
    for fmt in ("bf16", "fp8", "fp4"):
        ex, sh = _experts(fmt, e, inter, d, dt, g), _experts(fmt, 1, inter, d, dt, g)
        # T = 1, no shared expert, no clamp
        x = torch.randn(1, d, generator=g).to(dt)
        out, ref = _run_both("moe_experts", x, torch.tensor([[3, 0]]), torch.rand(1, 2, generator=g), ex, None, 0.0)
        _assert_tol("moe_experts", out, ref, d, f"moe {fmt} T=1")
        # all tokens to one expert: 80 rows, more than one 64-row tile
        x = torch.randn(40, d, generator=g).to(dt)
        out, ref = _run_both("moe_experts", x, torch.full((40, 2), 1), torch.rand(40, 2, generator=g), ex, sh, 10.0)
        _assert_tol("moe_experts", out, ref, d, f"moe {fmt} all tokens to one expert")
        # every slot -1: only the shared expert contributes
        out, ref = _run_both("moe_experts", x[:3], torch.full((3, 2), -1), torch.rand(3, 2, generator=g), ex, sh,
                             10.0)
        _assert_tol("moe_experts", out, ref, d, f"moe {fmt} all slots -1")


def check_moe_swiglu_clamp():
    """Gate/up far beyond +-10 (large inputs): the asymmetric clamp must act like the reference's, on the
    routed and the shared expert."""
    from dsv4_portable.reference.moe import expert_linear
    g = _gen(9)
    d, inter = 128, 128
    for fmt in ("bf16", "fp8", "fp4"):
        ex, sh = _experts(fmt, 3, inter, d, torch.float32, g, 0.5), _experts(fmt, 1, inter, d, torch.float32, g, 0.5)
        x = torch.randn(6, d, generator=g) * 4
        gate = expert_linear(x, sh, "w1", 0)
        up = expert_linear(x, sh, "w3", 0)
        assert gate.max() > 20 and up.min() < -20 and up.max() > 20, "the case must push gate/up beyond +-10"
        idx, w = torch.randint(0, 3, (6, 2), generator=g), torch.rand(6, 2, generator=g)
        outs = {}
        for limit in (10.0, 0.0):
            outs[limit], ref = _run_both("moe_experts", x, idx, w, ex, sh, limit)
            _assert_tol("moe_experts", outs[limit], ref, d, f"moe {fmt} clamp {limit}")
        assert (outs[10.0] - outs[0.0]).abs().max() > 1, "the clamp had no effect"


def check_moe_batch_invariance():
    """A token's output is bitwise the same whatever other tokens share the call (and its experts)."""
    g = _gen(10)
    d, inter, e, t = 128, 256, 4, 70
    log, recording = _launch_log()
    for fmt in ("bf16", "fp8", "fp4"):
        dt = torch.bfloat16 if fmt == "bf16" else torch.float16
        ex, sh = _experts(fmt, e, inter, d, dt, g), _experts(fmt, 1, inter, d, dt, g)
        dev = _dev()
        x = (torch.randn(t, d, generator=g) * 2).to(dt).to(dev)
        idx = torch.randint(0, e, (t, 3), generator=g).to(dev)
        w = torch.rand(t, 3, generator=g).to(dev)
        exd, shd = _on(ex, dev), _on(sh, dev)
        from dsv4_portable import ops
        def launches():
            """The call's launches in order: kernel, format and tile constexprs (not the grid)."""
            got = [(name, meta.get("FMT"), tuple((k, str(v)) for k, v in sorted(meta.items()) if k.startswith("BLOCK")))
                   for name, _, meta in log]
            log.clear()
            return got
        log.clear()
        with recording():
            full = ops.moe_experts.run("triton", x, idx, w, exd, shd, 10.0, device_type="cuda")
        plan = launches()
        for sel in ([5], [69, 3, 17], list(range(0, t, 2)), list(range(t - 1, -1, -1))):
            sel = torch.tensor(sel, device=dev)
            with recording():
                part = ops.moe_experts.run("triton", x[sel], idx[sel], w[sel], exd, shd, 10.0, device_type="cuda")
            assert torch.equal(part, full[sel]), f"{fmt}: rows changed with the batch ({len(sel)} of {t} tokens)"
            # structural rule: the same launches with the same tile constexprs whatever T is
            assert launches() == plan, f"{fmt}: tile shapes depend on T"


def _experts_as_fp8(ew):
    """FP4 experts converted to FP8 matrix by matrix, as the loader does with weights="fp8"."""
    from dsv4_portable.reference.moe import ExpertWeights
    from dsv4_portable.reference.quant import fp4_to_fp8_weight
    conv = {}
    for w, s in (("w1", "s1"), ("w2", "s2"), ("w3", "s3")):
        pairs = [fp4_to_fp8_weight(getattr(ew, w)[e], getattr(ew, s)[e]) for e in range(ew.num_experts)]
        conv[w], conv[s] = torch.stack([q for q, _ in pairs]), torch.stack([sc for _, sc in pairs])
    return ExpertWeights("fp8", conv["w1"], conv["w2"], conv["w3"], conv["s1"], conv["s2"], conv["s3"], ew.scale_fmt)


def check_moe_fp4_as_fp8():
    """FP4 experts converted to FP8 (the loader's route on GPUs without FP4 units) give the reference's bits
    exactly, and the FP8 path of the kernel agrees."""
    from dsv4_portable.reference import moe_experts
    g = _gen(11)
    ex4, sh4 = _experts("fp4", 3, 128, 128, None, g), _experts("fp4", 1, 128, 128, None, g)
    ex8, sh8 = _experts_as_fp8(ex4), _experts_as_fp8(sh4)
    x = torch.randn(5, 128, generator=g).to(torch.float16)
    idx, w = torch.randint(0, 3, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    assert torch.equal(moe_experts(x, idx, w, ex4, sh4, 10.0), moe_experts(x, idx, w, ex8, sh8, 10.0))
    out, ref = _run_both("moe_experts", x, idx, w, ex8, sh8, 10.0)
    _assert_tol("moe_experts", out, ref, 128, "moe fp4 converted to fp8")


def check_supports_declines_with_reasons():
    from dsv4_portable.reference.moe import ExpertWeights
    from dsv4_portable.registry import NoProviderError, get_op

    def reasons(op, *args):
        return get_op(op).provider("triton", "cuda").supports(*args)
    dev = _dev()
    x64 = torch.randn(2, 128, dtype=torch.float64, device=dev)
    w = torch.zeros(64, 128, dtype=torch.float8_e4m3fn, device=dev)
    assert any("float64" in r for r in reasons("fp8_linear", x64, w, torch.ones(1, 1, device=dev)))
    assert any("contiguous" in r for r in reasons("fp8_linear", x64.float(), torch.zeros(128, 64, dtype=w.dtype,
                                                                                          device=dev).t(),
                                                  torch.ones(1, 1, device=dev)))
    q = torch.randn(1, 1, 4, 1024, device=dev)
    assert any("head_dim" in r for r in reasons("sparse_attn", q, q[0], torch.zeros(4, device=dev),
                                                torch.zeros(1, 1, 3, dtype=torch.int32, device=dev), 0.1))
    qi = torch.randn(1, 1, 256, 64, device=dev)
    assert any("heads" in r for r in reasons("indexer_topk", qi, qi[0], torch.zeros(1, 1, 256, device=dev),
                                             torch.ones(1, 1, dtype=torch.int32, device=dev), 4))
    bad = ExpertWeights("fp8", *(torch.zeros(2, a, b, dtype=torch.float8_e4m3fn, device=dev)
                                 for a, b in ((96, 64), (64, 96), (96, 64))),
                        *(torch.ones(2, 1, 1, device=dev) for _ in range(3)))
    xm = torch.randn(3, 64, device=dev)
    assert any("multiples of 128" in r for r in reasons("moe_experts", xm, torch.zeros(3, 1, dtype=torch.long,
                                                                                     device=dev),
                                                        torch.ones(3, 1, device=dev), bad, None, 0.0))
    # a forced run of a declining provider raises with the reasons instead of computing anything
    try:
        get_op("fp8_linear").run("triton", x64, w, torch.ones(1, 1, device=dev), device_type="cuda")
    except NoProviderError as e:
        assert "float64" in str(e)
    else:
        raise AssertionError("run() of a declining provider must raise")


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def _worker(names):
    import dsv4_portable as dsv4
    dsv4.BACKENDS["cuda"].load_providers()          # registers the providers (kernels load lazily)
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = {"ok": True, "msg": ""}
        except Exception:
            results[name] = {"ok": False, "msg": traceback.format_exc()}
        print(f"check {name}: {'ok' if results[name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    return results


def _compile_worker():
    from dsv4_portable.backends.cuda import compile_check
    lines = []
    recs = compile_check.run(90, compile_check.compute_cases(), progress=lines.append)
    return {"records": recs, "log": lines}


# ====================================================================================== pytest side
def _spawn(mode, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if mode == "checks" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"                # only in the worker's environment
    proc = subprocess.run([sys.executable, HERE, "--worker", mode], env=env, capture_output=True, text=True,
                          timeout=timeout)
    marker = "@@RESULT@@"
    if proc.returncode != 0 or marker not in proc.stdout:
        pytest.fail(f"{mode} worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.split(marker, 1)[1])


@pytest.fixture(scope="module")
def worker_results():
    pytest.importorskip("triton")
    return _spawn("checks", timeout=600)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_triton_provider(worker_results, name):
    res = worker_results[name]
    assert res["ok"], res["msg"]


def test_kernels_compile_for_sm90_at_v4_sizes():
    """Every launch the providers make at V4-Flash sizes compiles for sm90 (offline, no GPU), fits the shared
    memory of a block and does not spill registers; the main GEMM loops are software-pipelined."""
    pytest.importorskip("triton")
    from dsv4_portable.backends.cuda import compile_check
    res = _spawn("compile", timeout=600)
    recs = res["records"]
    assert recs, "nothing was compiled"
    report = "\n".join(res["log"])
    assert not compile_check.problems(recs, 90), "\n".join(compile_check.problems(recs, 90)) + "\n" + report
    assert {r["kernel"] for r in recs} >= {"fp8_gemm_kernel", "fp4_gemm_kernel", "float_gemm_kernel",
                                          "sparse_attn_kernel", "window_sparse_attn_kernel",
                                          "sparse_attn_combine_kernel", "indexer_scores_kernel",
                                          "moe_gate_up_kernel", "moe_down_kernel", "moe_combine_kernel"}
    for r in recs:
        if r["kernel"] in ("fp8_gemm_kernel", "moe_gate_up_kernel", "moe_down_kernel"):
            assert r["async_copies"] > 0, f"{r['case']}: {r['kernel']} main loop not pipelined\n{report}"
        if r["kernel"] == "fp8_gemm_kernel" and r["case"].startswith("fp8_linear M=4096"):
            assert r["mma"] == "wgmma", f"prefill FP8 GEMM should use wgmma on sm90\n{report}"
        if r["kernel"] in ("sparse_attn_kernel", "window_sparse_attn_kernel") and "float32" not in r["case"]:
            assert r["mma"] in ("wgmma", "mma.sync"), f"{r['case']}: bf16 attention off the tensor cores\n{report}"


def test_providers_unavailable_without_gpu_say_why():
    """On a machine without CUDA (outside the interpreter) every provider of this module reports why it cannot
    run, the vendor ones name their missing library, and dispatch on the cuda backend falls to the reference."""
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.devices import interpret_mode
    if torch.cuda.is_available() or interpret_mode():
        pytest.skip("this machine can run the providers")
    dsv4.BACKENDS["cuda"].load_providers()
    for op, name, needle in (("fp8_linear", "triton", "CUDA"), ("fp4_linear", "triton", "CUDA"),
                             ("sparse_attn", "triton", "CUDA"), ("indexer_topk", "triton", "CUDA"),
                             ("moe_experts", "triton", "CUDA"), ("sparse_attn", "flash_mla", "flash_mla"),
                             ("fp8_linear", "deep_gemm", "deep_gemm")):
        p = getattr(ops, op).provider(name, "cuda")
        reasons = p.availability()
        assert reasons and any(needle in r for r in reasons), (op, name, reasons)
    q = torch.randn(1, 1, 64, 512)
    plan = ops.sparse_attn.explain(q, q[0], torch.zeros(64), torch.zeros(1, 1, 8, dtype=torch.int32), 0.04,
                                   backend=dsv4.BACKENDS["cuda"])
    assert [p for p, status, _ in plan if status == "chosen"] == ["reference"]
    assert all(reasons for p, status, reasons in plan if status == "skipped")


def test_cpu_tensors_are_declined_outside_the_interpreter():
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.devices import interpret_mode
    if interpret_mode():
        pytest.skip("the interpreter runs on CPU tensors")
    dsv4.BACKENDS["cuda"].load_providers()
    x = torch.randn(2, 128)
    w = torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    reasons = ops.fp8_linear.provider("triton", "cuda").supports(x, w, torch.ones(1, 1))
    assert any("runs on cuda" in r for r in reasons), reasons


def test_gemm_plan_fills_the_gpu():
    """What the GEMM providers launch on a 132-SM GPU at V4-Flash shapes (meta tensors, launches intercepted):
    decode and serving-batch GEMMs get >= 128 programs through narrower tiles and K splits whose ranges cover K
    exactly, with one split reduce; prefill GEMMs keep 128 x 128 tiles unsplit; the launch depends on M only
    through its bucket."""
    pytest.importorskip("triton")
    from dsv4_portable.devices import interpret_mode
    if interpret_mode():
        pytest.skip("the interpreter's virtual GPU has 8 SMs")
    _load_cuda_providers()
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda import launch as L
    from dsv4_portable.backends.cuda.gemm import m_bucket
    meta = dict(device="meta")

    def launched(op, x, w, *rest):
        log = []
        with L.intercept(lambda kern, grid, args, mt: log.append((kern.__name__, tuple(grid),
                                                                   dict(zip(kern.arg_names, args)), mt))):
            getattr(ops, op).provider("triton", "cuda").fn(x, w, *rest)
        gemm = [(grid, args, mt) for name, grid, args, mt in log if name in ("fp8_gemm_kernel", "float_gemm_kernel")]
        assert len(gemm) == 1, (op, [name for name, *_ in log])
        grid, args, mt = gemm[0]
        per = args["kb_per_split"] * 128 if op == "fp8_linear" else args["k_per_split"]     # K per split
        k = x.shape[-1]
        assert (grid[1] - 1) * per < k <= grid[1] * per, (op, grid, per, k)    # every split has some of K
        assert mt["SPLIT"] == (grid[1] > 1)
        assert sum(name == "splitk_reduce_kernel" for name, *_ in log) == (grid[1] > 1), (op, grid)
        return grid, {key: v for key, v in mt.items() if key.startswith(("BLOCK", "GROUP", "num_"))}, per

    def fp8(m, n, k):
        return launched("fp8_linear", torch.empty(m, k, dtype=torch.bfloat16, **meta),
                        torch.empty(n, k, dtype=torch.float8_e4m3fn, **meta),
                        torch.empty(-(-n // 128), k // 128, **meta))
    for m, n, k in ((1, 512, 4096), (16, 1024, 4096), (48, 512, 4096), (128, 1024, 4096), (128, 512, 4096),
                    (256, 4096, 8192), (96, 1024, 4096)):
        grid, cfg, _ = fp8(m, n, k)
        assert grid[0] * grid[1] >= 128, (m, n, k, grid, cfg)
    grid, cfg, _ = fp8(4096, 4096, 4096)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], grid[1]) == (128, 128, 1), (grid, cfg)
    # wo_a at decode: 8 groups of N = 1024 (grid axis 2), bf16 weights
    grid, cfg, _ = launched("grouped_linear", torch.empty(1, 8, 4096, dtype=torch.bfloat16, **meta),
                            torch.empty(8, 1024, 4096, dtype=torch.bfloat16, **meta))
    assert grid[2] == 8 and grid[0] * grid[1] * grid[2] >= 128, (grid, cfg)
    assert [m_bucket(m) for m in (1, 16, 17, 64, 65, 128, 129, 4096)] == [16, 16, 64, 64, 128, 128, 256, 4096]
    for a, b in ((1, 16), (17, 64), (65, 128), (700, 1024)):
        (ga, ca, pa), (gb, cb, pb) = fp8(a, 512, 4096), fp8(b, 512, 4096)
        assert (ga[1], ca, pa) == (gb[1], cb, pb), (a, b, ga, ca, gb, cb)


def test_step_varying_ints_are_not_specialised():
    """Ints that change every decode step (positions, entry and key counts) must not be specialised on their
    divisibility by 16: each new residue class would JIT-compile the kernel again during the first steps."""
    pytest.importorskip("triton")
    from dsv4_portable.devices import interpret_mode
    if interpret_mode():
        pytest.skip("interpreted kernels are not JITFunctions")
    from dsv4_portable.backends.cuda import attention_kernels, compressor_kernels, indexer_kernels
    for kernel, names in ((attention_kernels.window_sparse_attn_kernel, {"start_pos", "N", "KC"}),
                          (attention_kernels.sparse_attn_kernel, {"N", "K"}),
                          (indexer_kernels.indexer_scores_kernel, {"N"}),
                          (compressor_kernels.compress_entry_kernel, {"start_pos", "w0", "n_new", "state_base"}),
                          (compressor_kernels.compress_state_kernel, {"start_pos", "wt", "n_new", "state_base"})):
        fixed = {p.name for p in kernel.params if p.do_not_specialize}
        assert names <= fixed, (kernel.__name__, names - fixed)


# ---- supports() on GPUs this machine does not have: the capability lookups are stand-ins (monkeypatch)
def _load_cuda_providers():
    import dsv4_portable as dsv4
    dsv4.BACKENDS["cuda"].load_providers()


def test_deep_gemm_declines_what_its_kernels_reject(monkeypatch):
    """SM90: DeepGEMM's FP8 GEMM writes bf16 only, so fp32 activations (fp32 output) are declined. SM100: fp32
    weight scales are packed to UE8M0 (exponent kept), so scales that are not powers of two are declined; the
    check runs once per weight tensor and again after an in-place change."""
    _load_cuda_providers()
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda import vendor
    sup = ops.fp8_linear.provider("deep_gemm", "cuda").supports
    w = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    pow2, odd = torch.full((1, 2), 2.0 ** -7), torch.tensor([[2.0 ** -7, 0.75 * 2.0 ** -7]])
    monkeypatch.setattr(vendor, "capability", lambda: (9, 0))
    assert any("SM90" in r and "bf16" in r for r in sup(torch.zeros(4, 256), w, pow2))
    assert not any("SM90" in r for r in sup(torch.zeros(4, 256, dtype=torch.bfloat16), w, odd))
    monkeypatch.setattr(vendor, "capability", lambda: (10, 0))
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    assert not any("SM90" in r for r in sup(x.float(), w, pow2))
    assert any("not powers of two" in r for r in sup(x, w, odd))
    assert not any("powers of two" in r for r in sup(x, w, pow2))
    assert not any("powers of two" in r for r in sup(x, w, odd.to(torch.float8_e8m0fnu)))
    pow2[0, 1] = 3.0 * 2.0 ** -8                      # in place: the cached answer must not be reused
    assert any("not powers of two" in r for r in sup(x, w, pow2))
    assert any("scale_fmt None" in r for r in sup(x, w, torch.ones(1, 2), None))


def test_flash_mla_declines_decode_and_copies(monkeypatch):
    """flash_mla_sparse_fwd (FlashMLA's prefill kernel) runs one thread block per query and 64 heads: decode at
    small batch is declined (the Triton split-K kernel fills the GPU), prefill is not; a kv that would be copied
    by the [B*N, 1, D] flattening is declined."""
    _load_cuda_providers()
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda import vendor
    sup = ops.sparse_attn.provider("flash_mla", "cuda").supports
    sms = vendor.num_sms(torch.device("cpu"))
    kv = torch.zeros(2, 300, 512, dtype=torch.bfloat16)
    sink = torch.zeros(64)

    def reasons(b, s, kv=kv[:1]):
        return sup(torch.zeros(b, s, 64, 512, dtype=torch.bfloat16), kv, sink,
                   torch.zeros(b, s, 128, dtype=torch.int32), 0.04)
    assert any("decode-sized" in r and f"{sms} SMs" in r for r in reasons(1, 1))
    assert not any("decode-sized" in r for r in reasons(1, 512))
    assert any("would copy" in r for r in reasons(2, 1, kv[:, :200]))
    assert not any("would copy" in r for r in reasons(1, 1, kv[:1, :200]))
    assert vendor.flash_mla_sparse_ctas(1, 1, 64) == 1 and vendor.flash_mla_sparse_ctas(3, 2, 128) == 12


def test_fp4_kernels_need_e4m3_capability(monkeypatch):
    """fp4_linear and FP4 experts load e4m3 activations (Triton's fp8e4nv: sm89+): an sm80 GPU is declined
    with the reason instead of failing to compile at the first call."""
    _load_cuda_providers()
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda import launch_helpers
    from dsv4_portable.reference.moe import ExpertWeights
    from dsv4_portable.reference.quant import quant_fp4_weight
    if torch.cuda.is_available():
        pytest.skip("a real GPU: its own capability decides")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    w, ws = quant_fp4_weight(torch.randn(64, 256))
    x = torch.randn(2, 256)
    ew = ExpertWeights("fp4", *(torch.stack([w.view(torch.uint8)] * 2) for _ in range(3)),
                       *(torch.stack([ws] * 2) for _ in range(3)))
    for cap, declined in (((8, 0), True), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(launch_helpers, "capability", lambda: cap)
        r = ops.fp4_linear.provider("triton", "cuda").supports(x, w, ws)
        assert any("8.9" in m for m in r) == declined, (cap, r)
        r = ops.moe_experts.provider("triton", "cuda").supports(x, torch.zeros(2, 1, dtype=torch.long),
                                                                torch.ones(2, 1), ew, None, 0.0)
        assert any("8.9" in m for m in r) == declined, (cap, r)


def test_route_plan_tiles_every_slot_once():
    """The MoE tile plan (pure torch, runs here without triton): every valid (token, slot) pair lands in
    exactly one tile of its expert, in (token, k) order, within the precomputed tile bound."""
    from dsv4_portable.backends.cuda.moe import route_plan
    g = _gen(12)
    for t, k, e, bm in ((1, 6, 256, 64), (70, 3, 4, 64), (40, 2, 1, 16), (9, 3, 6, 4), (5, 2, 8, 64)):
        idx = torch.randint(-1, e, (t, k), generator=g)
        idx[0, 0] = e + 3                                     # out of range: treated as no expert
        order, tile_e, row0, rows = route_plan(idx, e, bm)
        assert tile_e.numel() == -(-t * k // bm) + min(e, t * k)
        seen = []
        for i in range(tile_e.numel()):
            if tile_e[i] < 0:
                assert rows[i] == 0
                continue
            slots = order[row0[i]: row0[i] + rows[i]].long()
            assert 0 < rows[i] <= bm and (idx.reshape(-1)[slots] == tile_e[i]).all()
            assert (slots.diff() > 0).all(), "slots of an expert must stay in (token, k) order"
            seen += slots.tolist()
        valid = ((idx >= 0) & (idx < e)).reshape(-1).nonzero().flatten().tolist()
        assert sorted(seen) == valid


def test_identity_plan_equals_route_plan():
    """The shared expert's closed-form tile plan is exactly route_plan's for idx all 0 (one expert, K = 1), and
    is built once per (T, device, block_m): a second call returns the cached tensors."""
    from dsv4_portable.backends.cuda.moe import identity_plan, route_plan
    for t, bm in ((1, 64), (63, 64), (64, 64), (65, 64), (300, 64), (9, 4)):
        want = route_plan(torch.zeros(t, 1, dtype=torch.long), 1, bm)
        got = identity_plan(t, torch.device("cpu"), bm)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype == torch.int32 and torch.equal(w, g), (t, bm, w, g)
        assert identity_plan(t, torch.device("cpu"), bm) is got


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    result = _worker(list(CHECKS)) if sys.argv[2] == "checks" else _compile_worker()
    print("@@RESULT@@" + json.dumps(result, default=str))
