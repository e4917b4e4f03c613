"""`dsv4 bench`: every op's providers timed side by side at V4-Flash / V4-Pro shapes, in one process.

Per op and phase there is one case: a shape taken from the model (which weight or tensor it stands for is in
its label), the FLOPs and bytes the op must do and move, and a builder that makes the inputs directly on the
device. Every provider of the chosen backend that is available and supports the case is timed on the same
inputs (the reference included); the others are listed with their reasons.

Counting rules (the per-op formulas are in the `_case_*` functions next to their shapes):
- FLOPs: 2 per multiply-add of the op's products (GEMMs, attention, indexer scores, mHC mixing). Elementwise
  work (quantisers, norms, RoPE, softmax, Sinkhorn) is not counted: those ops are memory-bound.
- Bytes: what a perfectly fused kernel must move: every input it needs read once, every output written once,
  intermediates excluded. Gathers count only the rows they touch (sparse attention: the kv rows the index lists
  name; MoE: the experts that receive tokens, with balanced routing).
- Percent of peak is a roofline figure: the shortest time the device's peak allows for these FLOPs and bytes,
  over the measured time; `bound` says which roof (compute or memory) sets it. The compute roof is the peak of
  the arithmetic the op's contract needs (`mma`: fp32 for the fp32 mixing/router/compressor products, bf16
  for bf16 products, fp8 for FP8 and FP4 weights: Hopper has no FP4 units, FP4 converts exactly to FP8).
Timing: the provider's function itself (argument checks and dispatch run once, before timing), two figures:
- `ms`: GPU: CUDA (or NPU) events around each call with L2 flushed before it, median of `--reps` after
  `--warmup` calls. The flush gives the host a head start on every call, so this is device time: a provider
  that issues many small launches (or spends host time between them) looks faster here than in a decode step.
- `host_ms`: the same number of calls back to back, no flush, one synchronisation at the end, wall time per
  call: what a step pays when the host is the bottleneck (launch overhead, Python, host-side planning). For
  device-bound calls it can be below `ms`, as inputs stay in L2 between calls.
CPU: time.perf_counter around each call; every call is synchronous there, so `host_ms` is the mean of the same
samples (no second pass). Absolute times are only meaningful on a GPU/NPU; CPU runs (reference only; `--small`
uses the tiny preset's dims) and simulated (TRITON_INTERPRET=1) runs show that the bench runs, not how fast
anything is.
The reference is skipped, with the reason, above a per-op size cap (REFERENCE_CAPS) instead of running for minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import registry
from .config import ModelConfig, load_config
from .reference.moe import ExpertWeights
from .reference.rotary import rope_cos_sin, rope_inv_freq
from .registry import REFERENCE, OpInputError

# ----------------------------------------------------------------------------------------------- device peaks
# Dense (no sparsity) peaks from NVIDIA's datasheets: bytes/s of HBM and FLOP/s per arithmetic kind (fp32 =
# the FP32 FMA units, tf32 = TF32 tensor cores).
_SXM = {"hbm": 3.35e12, "fp32": 67e12, "tf32": 494.7e12, "bf16": 989e12, "fp8": 1979e12}
PEAKS = [  # (name fragment, label, peaks); PCIe / NVL cards only match entries naming them
    ("H100 NVL", "H100 NVL", {"hbm": 3.9e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835e12, "fp8": 1671e12}),
    ("H100 PCIe", "H100 PCIe", {"hbm": 2.0e12, "fp32": 51e12, "tf32": 378e12, "bf16": 756e12, "fp8": 1513e12}),
    ("H200 NVL", "H200 NVL", {"hbm": 4.8e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835e12, "fp8": 1671e12}),
    # Grace Hopper before H200 (its name contains "H200"): the H100 SXM compute figures; 96 GB HBM3 at 4.0
    # TB/s, the 144 GB HBM3e part at 4.9 TB/s
    ("GH200 144", "GH200 144 GB HBM3e", {**_SXM, "hbm": 4.9e12}),
    ("GH200", "GH200 96 GB HBM3", {**_SXM, "hbm": 4.0e12}),
    ("H200", "H200 SXM", {**_SXM, "hbm": 4.8e12}),
    ("H100", "H100 SXM", _SXM),
    ("H800", "H800 SXM (H100 SXM figures)", _SXM),
]


def compute_roof(peaks: dict, kind: str) -> float:
    """FLOP/s roof for a case's arithmetic kind. "fp32" products (the contract needs fp32 accuracy) are held to
    the faster of the FP32 FMA units and TF32x3 on the tensor cores (three TF32 products per fp32 product:
    TF32 peak / 3), the arithmetic the Triton kernels use for them (mHC mixing, router, TF32x3 linears), so no
    implementation of the contract can pass 100%."""
    if kind == "fp32":
        return max(peaks["fp32"], peaks.get("tf32", 0.0) / 3)
    return peaks[kind]
VENDOR_EXCLUDED = {"triton", "triton_ascend", REFERENCE}   # our own providers; every other name is a vendor's


def peaks_for_name(name: str) -> tuple[dict | None, str]:
    """(peaks or None, a sentence naming the figures used) for a GPU name as torch.cuda.get_device_name gives it."""
    for frag, label, peaks in PEAKS:
        if frag in name and all((w in name) == (w in frag) for w in ("PCIe", "NVL")):
            return peaks, (f"{name}: peaks of {label}: HBM {peaks['hbm'] / 1e12:.2f} TB/s, fp32 products "
                           f"{compute_roof(peaks, 'fp32') / 1e12:.0f} (TF32x3), bf16 {peaks['bf16'] / 1e12:.0f}, "
                           f"fp8 {peaks['fp8'] / 1e12:.0f} TFLOP/s (dense)")
    return None, f"{name}: unknown GPU (not in bench.PEAKS); no percent of peak"


def device_peaks(device: torch.device, simulated: str | None) -> tuple[dict | None, str]:
    """(peaks or None, a sentence saying which device the figures are for, or why there are none)."""
    if simulated:
        return None, "simulated run: no percent of peak, times are not device figures"
    if device.type == "cpu":
        return None, "CPU: reference timings, not GPU figures; no percent of peak"
    if device.type != "cuda":
        return None, f"{device.type}: no peak table for this device; no percent of peak"
    return peaks_for_name(torch.cuda.get_device_name(device))


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Geometry:
    """Prefill: one sequence of `seq` new tokens from position 0. Decode: `batch` sequences of `context` tokens,
    the last of which is the new one (so its position is context - 1)."""
    phase: str
    batch: int
    seq: int
    context: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def csa_entries(self) -> int:
        """Compressed (ratio 4) entries the newest token can see."""
        return self.context // 4


def geometry(phase: str, tokens: int, batch: int, context: int) -> Geometry:
    return Geometry("prefill", 1, tokens, tokens) if phase == "prefill" else Geometry("decode", batch, 1, context)


@dataclass
class Case:
    op: str
    phase: str
    label: str                       # the model tensor or weight this shape stands for
    shape: dict
    flops: float
    bytes: float
    mma: str                         # arithmetic the FLOPs are held to: fp32, bf16 or fp8
    build: Callable[[torch.device], tuple[tuple, dict]] = field(repr=False)


ACT = torch.bfloat16   # activation dtype of every case (V4 runs bf16 activations)
A = 2                  # bytes per activation element


def _randn(shape, dev, dtype=ACT, std=1.0):
    return (torch.randn(shape, device=dev, dtype=torch.float32) * std).to(dtype)


def _fp8(shape, dev):
    """Random e4m3 values, made one leading slice at a time (expert stacks would not fit as fp32)."""
    if len(shape) < 3:
        return torch.randn(shape, device=dev, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev)
    for i in range(shape[0]):
        out[i] = torch.randn(shape[1:], device=dev, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    return out


def _fp4(shape, dev):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=dev)   # every byte is two valid e2m1 codes


def _scales(shape, dev):
    return torch.full(shape, 2.0 ** -6, device=dev)                        # float32 powers of two


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rope_tables(cfg: ModelConfig, positions: torch.Tensor):
    return rope_cos_sin(positions, rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta).to(positions.device))


# -- quantisers, norm, rope, hadamard: memory-bound; bytes = input read + outputs written ----------------------
def _case_quant_fp8(cfg, g):
    t, d = g.tokens, cfg.dim   # a linear's input [T, dim] -> e4m3 [T, dim] + fp32 scales [T, dim/128]
    return Case("quant_fp8", g.phase, f"linear input [T={t}, dim={d}], block 128", dict(T=t, D=d), 0,
                t * d * A + t * d + t * (d // 128) * 4, "bf16",
                lambda dev: ((_randn((t, d), dev), 128), {}))


def _case_quant_fp4(cfg, g):
    t, d = g.tokens, cfg.dim   # [T, dim] -> packed e2m1 [T, dim/2] + fp32 scales [T, dim/32]
    return Case("quant_fp4", g.phase, f"activation [T={t}, dim={d}], block 32", dict(T=t, D=d), 0,
                t * d * A + t * d // 2 + t * (d // 32) * 4, "bf16",
                lambda dev: ((_randn((t, d), dev), 32), {}))


def _case_fp8_roundtrip(cfg, g):
    t, n = g.tokens, cfg.nope_head_dim   # KV QAT of the non-rope dims: read and write [T, 448]
    return Case("fp8_roundtrip", g.phase, f"kv non-rope dims [T={t}, {n}], block 64", dict(T=t, D=n), 0,
                2 * t * n * A, "bf16", lambda dev: ((_randn((t, n), dev), 64), {}))


def _case_fp4_roundtrip(cfg, g):
    t, h, d = g.tokens, cfg.index_n_heads, cfg.index_head_dim   # indexer q QAT: read and write [T, Hi, Di]
    return Case("fp4_roundtrip", g.phase, f"indexer q [T={t}, Hi={h}, Di={d}], block 32", dict(T=t, H=h, D=d), 0,
                2 * t * h * d * A, "bf16", lambda dev: ((_randn((t, h, d), dev), 32), {}))


def _case_rms_norm(cfg, g):
    t, d = g.tokens, cfg.dim   # read x, write y (both [T, dim]), read the bf16 weight once
    return Case("rms_norm", g.phase, f"attn_norm [T={t}, dim={d}]", dict(T=t, D=d), 0, 2 * t * d * A + d * A,
                "bf16", lambda dev: ((_randn((t, d), dev), _randn(d, dev)), {"eps": cfg.norm_eps}))


def _case_rope(cfg, g):
    b, s, h, hd, half = g.batch, g.seq, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim // 2
    # q [B, S, H, 512] read and written whole (the op returns a new tensor), cos/sin fp32 [B or 1, S, R/2]
    tables = (1 if g.phase == "prefill" else b) * s * half

    def build(dev):
        pos = torch.arange(s, device=dev).view(1, s) if g.phase == "prefill" else \
            torch.full((b, 1), g.context - 1, device=dev)
        cos, sin = _rope_tables(cfg, pos)
        return (_randn((b, s, h, hd), dev), cos, sin), {}
    return Case("rope", g.phase, f"q [B={b}, S={s}, H={h}, D={hd}], {2 * half} rope dims",
                dict(B=b, S=s, H=h, D=hd, R=2 * half), 0, 2 * b * s * h * hd * A + 2 * tables * 4, "bf16", build)


def _case_hadamard(cfg, g):
    t, h, d = g.tokens, cfg.index_n_heads, cfg.index_head_dim
    # FLOPs: the fast Walsh-Hadamard transform's D*log2(D) additions per row (a dense x @ H_D does 2*D^2)
    return Case("hadamard", g.phase, f"indexer q [T={t}, Hi={h}, Di={d}]", dict(T=t, H=h, D=d),
                t * h * d * math.log2(d), 2 * t * h * d * A, "bf16", lambda dev: ((_randn((t, h, d), dev),), {}))


# -- GEMMs: FLOPs 2*M*N*K; bytes = x + weight (+ scales) + y --------------------------------------------------
def _case_fp8_linear(cfg, g):
    m, n, k = g.tokens, cfg.dim, cfg.o_groups * cfg.o_lora_rank   # wo_b: [dim, o_groups*o_lora]
    sb = _cdiv(n, 128) * _cdiv(k, 128) * 4
    return Case("fp8_linear", g.phase, f"wo_b  M={m} N={n} K={k} (fp8 weight, 128x128 fp32 scales)",
                dict(M=m, N=n, K=k), 2 * m * n * k, m * k * A + n * k + sb + m * n * A, "fp8",
                lambda dev: ((_randn((m, k), dev), _fp8((n, k), dev), _scales((_cdiv(n, 128), _cdiv(k, 128)), dev)),
                             {}))


def _case_fp4_linear(cfg, g):
    m, n, k = g.tokens, cfg.dim, cfg.o_groups * cfg.o_lora_rank   # the wo_b shape with FP4 weights, for comparison
    return Case("fp4_linear", g.phase, f"wo_b shape  M={m} N={n} K={k} (fp4 weight, per-32 fp32 scales)",
                dict(M=m, N=n, K=k), 2 * m * n * k, m * k * A + n * k // 2 + n * (k // 32) * 4 + m * n * A, "fp8",
                lambda dev: ((_randn((m, k), dev), _fp4((n, k // 2), dev), _scales((n, k // 32), dev)), {}))


def _case_int8_linear(cfg, g):
    m, n, k = g.tokens, cfg.dim, cfg.o_groups * cfg.o_lora_rank   # wo_b as W8A8 (Ascend A2/A3 weights="int8")
    # compute roof: int8 tensor-core rate, the same as FP8's on Hopper
    return Case("int8_linear", g.phase, f"wo_b  M={m} N={n} K={k} (int8 weight, per-channel fp32 scales)",
                dict(M=m, N=n, K=k), 2 * m * n * k, m * k * A + n * k + n * 4 + m * n * A, "fp8",
                lambda dev: ((_randn((m, k), dev), torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev),
                              torch.rand(n, device=dev) * 1e-2), {}))


def _case_linear(cfg, g):
    m, n, k = g.tokens, cfg.q_lora_rank, cfg.dim   # wq_a as a bf16 weight (weights="bf16" mode)
    return Case("linear", g.phase, f"wq_a  M={m} N={n} K={k} (bf16 weight)", dict(M=m, N=n, K=k), 2 * m * n * k,
                m * k * A + n * k * A + m * n * A, "bf16",
                lambda dev: ((_randn((m, k), dev), _randn((n, k), dev, std=k ** -0.5)), {}))


def _case_grouped_linear(cfg, g):
    t, grp, n = g.tokens, cfg.o_groups, cfg.o_lora_rank
    k = cfg.n_heads * cfg.head_dim // grp   # wo_a: per group [o_lora, H*D/G], bf16 (dequantised at load)
    return Case("grouped_linear", g.phase, f"wo_a  T={t} G={grp} N={n} K={k} (bf16 weight)",
                dict(T=t, G=grp, N=n, K=k), 2 * t * grp * n * k, t * grp * k * A + grp * n * k * A + t * grp * n * A,
                "bf16", lambda dev: ((_randn((t, grp, k), dev), _randn((grp, n, k), dev, std=k ** -0.5)), {}))


# -- attention and indexer -------------------------------------------------------------------------------------
def _case_sparse_attn(cfg, g):
    b, s, h, d = g.batch, g.seq, cfg.n_heads, cfg.head_dim
    k = cfg.window_size + cfg.index_topk                 # a CSA layer: window + indexer top-k per query
    n = (g.seq if g.phase == "prefill" else cfg.window_size) + g.csa_entries   # kv rows: window region + entries
    # FLOPs: q.k and p.v, 2*D each per (query, head, index). Bytes: q and o, the index lists, the sink, and
    # each kv row once per sequence it is named in (at most the whole kv; decode rows are distinct per query).
    kv_rows = min(b * s * k, b * n)
    return Case("sparse_attn", g.phase, f"CSA  B={b} S={s} H={h} D={d} K={k} (window {cfg.window_size} + top-k "
                f"{cfg.index_topk}) over N={n} kv rows", dict(B=b, S=s, H=h, D=d, K=k, N=n),
                4 * b * s * h * k * d, 2 * b * s * h * d * A + b * s * k * 4 + h * 4 + kv_rows * d * A, "bf16",
                lambda dev: ((_randn((b, s, h, d), dev), _randn((b, n, d), dev), _randn(h, dev, torch.float32),
                              torch.randint(0, n, (b, s, k), dtype=torch.int32, device=dev), d ** -0.5), {}))


def _case_window_sparse_attn(cfg, g):
    """A CSA layer's attention step as the model calls it: the window ring, this step's rows and the compressed
    entries with the indexer's top-k, as plain-layout bf16 stores. The Triton provider reads them in place (no
    [window | kv | comp] workspace); the reference gathers that workspace, and the model's fp8 cache layout is
    dequantised into new tensors by the cache read before this op (model/cache.py). The bytes counted are the
    in-place read."""
    b, s, h, d, w, ratio = g.batch, g.seq, cfg.n_heads, cfg.head_dim, cfg.window_size, 4
    p0 = 0 if g.phase == "prefill" else g.context - 1
    n = (p0 + s) // ratio                                # compressed entries after this step
    k = min(cfg.index_topk, n)
    positions = range(p0, p0 + s)
    # FLOPs: q.k and p.v, 2*D each per (query, head, valid row): the window rows that exist and the visible
    # top-k entries. Bytes: q and o, this step's rows, the ring rows older than this step (decode: W - 1 of
    # them), the entries the lists name (at most all of them once per sequence), the top-k ids, the sink.
    rows = sum(min(w, p + 1) + min(k, (p + 1) // ratio) for p in positions)
    ring_rows = min(w - 1, p0)                           # the first query reaches back w - 1 positions
    comp_rows = min(s * k, n)
    nbytes = 2 * b * s * h * d * A + b * (s + ring_rows + comp_rows) * d * A + b * s * k * 4 + h * 4

    def build(dev):
        if g.phase == "prefill":    # entries 0 .. min(K, visible) - 1, -1 beyond (the indexer's -1 padding)
            j, vis = torch.arange(k, device=dev), (torch.arange(p0, p0 + s, device=dev) + 1) // ratio
            topk = torch.where(j.view(1, k) < vis.view(s, 1), j.view(1, k), -1).expand(b, s, k)
        else:                       # distinct entries scattered over the visible range
            topk = torch.stack([torch.randperm(n, device=dev)[:k] for _ in range(b)]).view(b, 1, k)
        return (_randn((b, s, h, d), dev), _randn((b, w, d), dev), _randn((b, s, d), dev), _randn((b, n, d), dev),
                topk.to(torch.int32).contiguous(), _randn(h, dev, torch.float32), d ** -0.5, p0, ratio), {}
    return Case("window_sparse_attn", g.phase, f"CSA step  B={b} S={s} H={h} D={d} at position {p0}: window {w} + "
                f"top-{k} of N={n} entries (plain-layout stores)",
                dict(B=b, S=s, H=h, D=d, W=w, K=k, N=n, start_pos=p0),
                4 * b * h * d * rows, nbytes, "bf16", build)


def _case_indexer_topk(cfg, g):
    b, s, h, d, topk = g.batch, g.seq, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    n = g.csa_entries
    visible = [(p + 1) // 4 for p in range(s)] if g.phase == "prefill" else [n] * s   # causal per position
    pairs = b * sum(visible)
    # FLOPs per visible (query, key): H dot products of length Di (2*Di) plus relu*w and the head sum (2 per head)
    flops = 2 * pairs * h * (d + 1)
    nbytes = b * s * h * d * A + b * n * d * A + b * s * h * 4 + b * s * 4 + b * s * min(topk, n) * 4

    def build(dev):
        vis = torch.tensor(visible, dtype=torch.int32, device=dev).expand(b, s).contiguous()
        return (_randn((b, s, h, d), dev), _randn((b, n, d), dev), _randn((b, s, h), dev, torch.float32), vis,
                topk), {}
    return Case("indexer_topk", g.phase, f"B={b} S={s} Hi={h} Di={d} over N={n} keys, top-{topk}",
                dict(B=b, S=s, H=h, D=d, N=n, topk=topk), flops, nbytes, "bf16", build)


def _case_compressor(cfg, g):
    b, s, dim, d, ratio = g.batch, g.seq, cfg.dim, cfg.head_dim, 4   # CSA main-KV compressor (overlapping)
    c = 2 * d
    start = 0 if g.phase == "prefill" else g.context - 1
    n_new = (start + s) // ratio - start // ratio
    positions = max(s, g.context)
    # FLOPs: the two fp32 projections (wkv, wgate) 2 * 2*T*dim*C; pooling, norm and RoPE not counted.
    # Bytes: x, both weights (fp32, as the model keeps them: checkpoint.py widens the compressor's linears at
    # load), ape, the fp32 kv/score states read and written, the entries written.
    state = b * 2 * ratio * c * 4
    nbytes = b * s * dim * A + 2 * c * dim * 4 + ratio * c * 4 + 2 * 2 * state + b * n_new * d * A

    def build(dev):
        cos, sin = _rope_tables(cfg, torch.arange(positions, device=dev))
        kv_state = torch.zeros(b, 2 * ratio, c, device=dev)
        score_state = torch.full((b, 2 * ratio, c), float("-inf"), device=dev)
        return (_randn((b, s, dim), dev), _randn((c, dim), dev, torch.float32, dim ** -0.5),
                _randn((c, dim), dev, torch.float32, dim ** -0.5), _randn((ratio, c), dev, torch.float32),
                _randn(d, dev, torch.float32),
                cos, sin, kv_state, score_state, start, ratio), {"eps": cfg.norm_eps}
    return Case("compressor", g.phase, f"CSA kv  B={b} S={s} dim={dim} -> {n_new} entries of {d} (start {start})",
                dict(B=b, S=s, dim=dim, D=d, ratio=ratio, start_pos=start), 2 * 2 * b * s * dim * c, nbytes,
                "fp32", build)


# -- mHC ---------------------------------------------------------------------------------------------------------
def _case_hc_pre(cfg, g):
    b, s, nc, d = g.batch, g.seq, cfg.hc_mult, cfg.dim
    mix, t = (2 + nc) * nc, g.tokens
    # FLOPs: the fp32 mixing product [T, n*D] x [n*D, (2+n)*n]; Sinkhorn and the stream sum not counted.
    nbytes = t * nc * d * A + mix * nc * d * 4 + t * d * A + t * nc * 4 + t * nc * nc * 4
    return Case("hc_pre", g.phase, f"B={b} S={s} streams {nc} x dim {d}", dict(B=b, S=s, N=nc, D=d),
                2 * t * mix * nc * d, nbytes, "fp32",
                lambda dev: ((_randn((b, s, nc, d), dev), _randn((mix, nc * d), dev, torch.float32, (nc * d) ** -0.5),
                              _randn(3, dev, torch.float32), _randn(mix, dev, torch.float32)),
                             {"norm_eps": cfg.norm_eps, "hc_eps": cfg.hc_eps, "iters": cfg.hc_sinkhorn_iters}))


def _case_hc_post(cfg, g):
    b, s, nc, d = g.batch, g.seq, cfg.hc_mult, cfg.dim
    t = g.tokens
    # FLOPs: out_k = post_k*o + sum_j comb[j,k]*h_j is n+1 multiply-adds per output element (2*(n+1) FLOPs).
    nbytes = t * d * A + t * nc * d * A + t * nc * 4 + t * nc * nc * 4 + t * nc * d * A
    return Case("hc_post", g.phase, f"B={b} S={s} streams {nc} x dim {d}", dict(B=b, S=s, N=nc, D=d),
                2 * (nc + 1) * t * nc * d, nbytes, "fp32",
                lambda dev: ((_randn((b, s, d), dev), _randn((b, s, nc, d), dev), torch.rand(b, s, nc, device=dev),
                              torch.rand(b, s, nc, nc, device=dev)), {}))


def _case_hc_head(cfg, g):
    b, s, nc, d = g.batch, g.seq, cfg.hc_mult, cfg.dim
    t = g.tokens
    nbytes = t * nc * d * A + nc * nc * d * 4 + t * d * A   # h read, fp32 fn read, y written
    return Case("hc_head", g.phase, f"B={b} S={s} streams {nc} x dim {d}", dict(B=b, S=s, N=nc, D=d),
                2 * t * nc * nc * d, nbytes, "fp32",
                lambda dev: ((_randn((b, s, nc, d), dev), _randn((nc, nc * d), dev, torch.float32, (nc * d) ** -0.5),
                              _randn(1, dev, torch.float32), _randn(nc, dev, torch.float32)),
                             {"norm_eps": cfg.norm_eps, "hc_eps": cfg.hc_eps}))


# -- MoE -----------------------------------------------------------------------------------------------------------
def _case_moe_route(cfg, g):
    t, e, d, k = g.tokens, cfg.n_routed_experts, cfg.dim, cfg.n_activated_experts
    # FLOPs: the fp32 gate product 2*T*E*D. Bytes: x, bf16 gate weight, fp32 bias, fp32 weights + int64 ids out.
    return Case("moe_route", g.phase, f"gate  T={t} E={e} dim={d} top-{k} ({cfg.score_func})",
                dict(T=t, E=e, D=d, K=k), 2 * t * e * d, t * d * A + e * d * A + e * 4 + t * k * (4 + 8), "fp32",
                lambda dev: ((_randn((t, d), dev), _randn((e, d), dev, std=d ** -0.5), _randn(e, dev, torch.float32),
                              None, None, k), {"score_func": cfg.score_func, "route_scale": cfg.route_scale}))


def _experts(fmt: str, e: int, inter: int, dim: int, dev) -> ExpertWeights:
    if fmt == "fp4":
        w = lambda n, k: _fp4((e, n, k // 2), dev)  # noqa: E731
        s = lambda n, k: _scales((e, n, k // 32), dev)  # noqa: E731
    elif fmt == "fp8":
        w = lambda n, k: _fp8((e, n, k), dev)  # noqa: E731
        s = lambda n, k: _scales((e, _cdiv(n, 128), _cdiv(k, 128)), dev)  # noqa: E731
    else:
        w = lambda n, k: _randn((e, n, k), dev, std=k ** -0.5)  # noqa: E731
        s = lambda n, k: None  # noqa: E731
    return ExpertWeights(fmt, w(inter, dim), w(dim, inter), w(inter, dim), s(inter, dim), s(dim, inter),
                         s(inter, dim))


def _expert_bytes(fmt: str, inter: int, dim: int) -> int:
    """Bytes of one expert's three weights (w1, w3 [I, D], w2 [D, I]) with their fp32 scales."""
    n = 3 * inter * dim
    if fmt == "fp4":
        return n // 2 + (n // 32) * 4
    if fmt == "fp8":
        return n + 3 * _cdiv(inter, 128) * _cdiv(dim, 128) * 4
    return n * A


def _moe_case(cfg, g, fmt: str, note: str = "") -> Case:
    t, e, k, d, i = g.tokens, cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    shared_fmt = "fp8" if cfg.dtype == "fp8" else "bf16"
    touched = min(e, t * k)   # balanced routing: token j's slots go to experts (j*K + 0..K-1) mod E
    # FLOPs: three GEMMs of 2*I*D per routed (token, slot) and per token for the shared expert.
    # Bytes: x and y, ids + weights, the weights of every expert that receives tokens, the shared expert.
    nbytes = 2 * t * d * A + t * k * (8 + 4) + touched * _expert_bytes(fmt, i, d) + _expert_bytes(shared_fmt, i, d)

    def build(dev):
        idx = (torch.arange(t * k, device=dev) % e).view(t, k)
        weights = torch.full((t, k), 1.0 / k, device=dev)
        return (_randn((t, d), dev), idx, weights, _experts(fmt, e, i, d, dev), _experts(shared_fmt, 1, i, d, dev),
                cfg.swiglu_limit), {}
    return Case("moe_experts", g.phase, f"T={t} top-{k} of E={e} ({fmt}{note}) + shared ({shared_fmt}), I={i} "
                f"dim={d}, balanced routing", dict(T=t, E=e, K=k, I=i, D=d, touched=touched, experts=fmt),
                6 * (t * k + t) * i * d, nbytes, "bf16" if fmt == "bf16" else "fp8", build)


def _case_moe_experts(cfg, g) -> list[Case]:
    """The checkpoint's expert format, and for FP4 experts also FP8: GPUs without FP4 tensor cores (Hopper)
    convert FP4 experts to FP8 once at load (exact) and run the FP8 path."""
    cases = [_moe_case(cfg, g, cfg.expert_dtype)]
    if cfg.expert_dtype == "fp4":
        cases.append(_moe_case(cfg, g, "fp8", ", converted from FP4 at load: the Hopper route"))
    return cases


CASES: dict[str, Callable[[ModelConfig, Geometry], Case | list[Case]]] = {
    "quant_fp8": _case_quant_fp8, "quant_fp4": _case_quant_fp4, "fp8_roundtrip": _case_fp8_roundtrip,
    "fp4_roundtrip": _case_fp4_roundtrip, "fp8_linear": _case_fp8_linear, "fp4_linear": _case_fp4_linear,
    "int8_linear": _case_int8_linear, "linear": _case_linear, "grouped_linear": _case_grouped_linear, "rms_norm": _case_rms_norm, "rope": _case_rope,
    "hadamard": _case_hadamard, "sparse_attn": _case_sparse_attn,
    "window_sparse_attn": _case_window_sparse_attn, "indexer_topk": _case_indexer_topk,
    "compressor": _case_compressor, "hc_pre": _case_hc_pre, "hc_post": _case_hc_post, "hc_head": _case_hc_head,
    "moe_route": _case_moe_route, "moe_experts": _case_moe_experts,
}

# The pure-PyTorch reference computes in fp32 with Python loops over blocks and experts; above these sizes one
# call takes seconds on a GPU (minutes on a CPU), so it is skipped with the reason. (FLOPs, bytes) per call.
REFERENCE_CAPS = {"gpu": {"default": (1e13, 2e10), "sparse_attn": (2e12, 2e10), "window_sparse_attn": (2e12, 2e10),
                          "indexer_topk": (2e12, 2e10), "moe_experts": (5e12, 2e10)},
                  "cpu": {"default": (2e10, 2e9), "sparse_attn": (1e9, 2e9), "window_sparse_attn": (1e9, 2e9)}}


def reference_cap_reasons(case: Case, device: torch.device) -> list[str]:
    caps = REFERENCE_CAPS["cpu" if device.type == "cpu" else "gpu"]
    max_flops, max_bytes = caps.get(case.op, caps["default"])
    if case.flops <= max_flops and case.bytes <= max_bytes:
        return []
    return [f"reference skipped: the case needs {case.flops:.3g} FLOP / {case.bytes:.3g} B, above the reference cap "
            f"of {max_flops:.3g} FLOP / {max_bytes:.3g} B on {device.type} (bench.REFERENCE_CAPS; --small shrinks "
            "the shapes)"]


# ----------------------------------------------------------------------------------------------- timing
L2_FLUSH_BYTES = 256 * 2 ** 20   # larger than any L2 of the GPUs in PEAKS (H100/H200: 50 MB)


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
            budget_s: float) -> tuple[float, int, float]:
    """(median device ms per call, calls timed, host-inclusive ms per call; see the module doc). A first timed
    call sizes the rep count so slow providers (the reference) stay near `budget_s`; a call slower than the
    budget is its own single sample (both figures). On CPU host_ms is the samples' mean (calls are synchronous);
    on a device the same number of calls runs again back to back for it."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first >= budget_s:
        return first * 1e3, 1, first * 1e3
    reps = max(2, min(reps, int(budget_s / first)))
    if device.type == "cpu":       # synchronous calls: one pass gives both figures
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples), reps, statistics.fmean(samples)
    mod = getattr(torch, device.type)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(mod.Event(enable_timing=True), mod.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()   # evict the inputs from L2 so reps read HBM like the first call (not timed)
        start.record()
        fn()
        end.record()
    _sync(device)
    samples = [start.elapsed_time(end) for start, end in events]
    del flush
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    host_ms = (time.perf_counter() - t0) * 1e3 / reps
    return statistics.median(samples), reps, host_ms


def _rates(case: Case, ms: float, peaks: dict | None) -> dict:
    s = ms / 1e3
    out = {"tflops": case.flops / s / 1e12, "gbps": case.bytes / s / 1e9, "pct_of_peak": None, "bound": None}
    if peaks:
        t_compute, t_memory = case.flops / compute_roof(peaks, case.mma), case.bytes / peaks["hbm"]
        out["bound"] = "compute" if t_compute >= t_memory else "memory"
        out["pct_of_peak"] = 100 * max(t_compute, t_memory) / s
    return out


def run_case(case: Case, backend, device: torch.device, peaks, warmup: int, reps: int,
             budget_s: float) -> list[dict]:
    """One row per provider of the backend for this op: timed, declined or skipped (with reasons), or error."""
    op = registry.get_op(case.op)
    rows, todo = [], []
    for p in op.candidates(backend):
        reasons = p.availability()
        capped = [] if reasons or p.name != REFERENCE else reference_cap_reasons(case, device)
        if reasons or capped:
            rows.append({"provider": p.name, "status": "skipped" if capped else "declined",
                         "reasons": reasons or capped})
        else:
            rows.append({"provider": p.name})
            todo.append((p, rows[-1]))
    if todo:
        try:
            args, kwargs = case.build(device)
        except Exception as e:   # e.g. out of device memory: reported for every provider, the next case runs
            for _, row in todo:
                row.update(status="error", reasons=[f"building the inputs failed: {type(e).__name__}: {e}"])
            return rows
        op.validate(*args, **kwargs)   # a bench shape that breaks the op's contract is a bug here: raise
        for p, row in todo:
            reasons = p.supports(*args, **kwargs)
            if reasons:
                row.update(status="declined", reasons=reasons)
                continue
            try:
                ms, n, host_ms = time_ms(lambda: p.fn(*args, **kwargs), device, warmup, reps, budget_s)
            except Exception as e:   # recorded and reported (non-zero exit), the other providers still run
                first_line = str(e).splitlines()[0] if str(e) else ""
                row.update(status="error", reasons=[f"{type(e).__name__}: {first_line}"])
                continue
            row.update(status="timed", ms=ms, host_ms=host_ms, reps=n, **_rates(case, ms, peaks))
        del args, kwargs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = {r["provider"]: r["ms"] for r in rows if r["status"] == "timed"}
    vendor = [ms for name, ms in timed.items() if name not in VENDOR_EXCLUDED]
    for r in rows:
        if r["status"] == "timed":
            # speed relative to the fastest vendor provider (1.0 = as fast, 0.5 = half as fast); reference speedup
            r["speed_vs_fastest_vendor"] = min(vendor) / r["ms"] if vendor else None
            r["speedup_vs_reference"] = timed[REFERENCE] / r["ms"] if REFERENCE in timed else None
    return rows


# ----------------------------------------------------------------------------------------------- output
def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def format_table(report: dict) -> str:
    h = report["header"]
    lines = [f"dsv4 bench: device {h['device']}, config {h['config']}, phases {'+'.join(h['phases'])}",
             f"peaks: {h['peaks_note']}", f"note: {h['note']}", f"timing: {h['timing']}",
             f"{'provider':16s} {'ms':>10s} {'host ms':>10s} {'TFLOP/s':>9s} {'GB/s':>9s} {'%peak':>7s} "
             f"{'bound':>7s} {'vs vendor':>9s} {'vs ref':>8s}"]
    for c in report["cases"]:
        lines.append(f"{c['op']} {c['phase']}: {c['label']}  [{c['flops']:.3g} FLOP, {c['bytes']:.3g} B]")
        for r in c["results"]:
            if r["status"] != "timed":
                lines.append(f"  {r['provider']:14s} {r['status']}: {'; '.join(r['reasons'])}")
                continue
            lines.append(f"  {r['provider']:14s} {r['ms']:10.4f} {r['host_ms']:10.4f} {r['tflops']:9.3g} "
                         f"{r['gbps']:9.3g} "
                         f"{_fmt(r['pct_of_peak'], '6.1f'):>7s} {_fmt(r['bound'], 's'):>7s} "
                         f"{_fmt(r['speed_vs_fastest_vendor'], '8.3g'):>9s} "
                         f"{_fmt(r['speedup_vs_reference'], '7.3g'):>8s}")
    lines.append("ms: on a GPU device time per call (L2 flushed before each); host ms: wall time per call back to "
                 "back (includes launch and host overhead). Rates and ratios use ms.")
    lines.append("vs vendor: fastest vendor time / this time (1.0 = as fast). vs ref: reference time / this time.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command
SMALL = dict(tokens=64, batch=2, context=256)
FULL = dict(tokens=4096, batch=32, context=65536)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda, cpu or ascend")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: every op)")
    p.add_argument("--config", default="flash", help="flash or pro (or a preset name / checkpoint directory)")
    p.add_argument("--phase", default="both", choices=["prefill", "decode", "both"])
    p.add_argument("--small", action="store_true",
                   help=f"tiny model dims and {SMALL['tokens']} prefill tokens, decode batch {SMALL['batch']} at "
                        f"context {SMALL['context']}: finishes in seconds on a CPU (checks the bench, not speed)")
    p.add_argument("--tokens", type=int, default=None, help=f"prefill tokens (default {FULL['tokens']})")
    p.add_argument("--batch", type=int, default=None, help=f"decode sequences (default {FULL['batch']})")
    p.add_argument("--context", type=int, default=None, help=f"decode context length (default {FULL['context']})")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per provider (default 3 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider, at most (default 20 GPU, 3 CPU)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")


def _select_ops(spec: str | None) -> list[str]:
    names = list(registry.OPS) if not spec else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise OpInputError("--ops is empty (give comma-separated op names)")
    for n in names:
        registry.get_op(n)   # raises: unknown op 'x' (known ops: ...)
    return names


def bench_main(args) -> int:
    backend = registry.get_backend(args.device)   # unknown device: UnknownDeviceError naming the choices
    op_names = _select_ops(args.ops)
    sizes = dict(SMALL if args.small else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
            sizes[key] = getattr(args, key)
    cfg = load_config("tiny" if args.small else args.config)
    phases = ["prefill", "decode"] if args.phase == "both" else [args.phase]
    with registry.use_backend(args.device) as b:
        device = b.torch_device()
        simulated = b.simulated()
        peaks, peaks_note = device_peaks(device, simulated)
        gpu = device.type != "cpu"
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        reps = args.reps if args.reps is not None else (20 if gpu else 3)
        budget_s = 2.0 if gpu else 0.5
        made = [CASES[n](cfg, geometry(ph, **sizes)) for ph in phases for n in op_names if n in CASES]
        cases = [c for m in made for c in (m if isinstance(m, list) else [m])]
        missing = [n for n in op_names if n not in CASES]
        for n in missing:
            print(f"warning: op {n} has no bench shape yet (bench.CASES); not benchmarked", file=sys.stderr)
        dev_label = f"{b.name} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else b.name
        if simulated:
            dev_label += f" [simulated: {simulated}]"
        header = {
            "device": dev_label, "torch_device": str(device), "config": cfg.name + (" (--small)" if args.small else ""),
            "phases": phases, "sizes": sizes, "activation_dtype": str(ACT).replace("torch.", ""),
            "peaks": peaks, "peaks_note": peaks_note,
            "note": "absolute times are only meaningful on a GPU/NPU" + (
                "; this run is simulated on CPU tensors: its times are NOT GPU figures" if simulated else
                "; these are CPU timings of the pure-PyTorch reference, NOT GPU figures" if not gpu else ""),
            "timing": (f"{'CPU time.perf_counter' if not gpu else device.type.upper() + ' events'}, median of up to "
                       f"{reps} calls after {warmup} warmups, the provider function only"
                       + ("" if not gpu else ", L2 flushed before each call")
                       + "; host_ms: the same calls back to back, one sync, wall time per call"),
            "torch": torch.__version__, "ops_without_cases": missing,
        }
        print(f"dsv4 bench: {len(cases)} cases on {dev_label}; {peaks_note}", file=sys.stderr)
        results = []
        for i, case in enumerate(cases, 1):
            rows = run_case(case, b, device, peaks, warmup, reps, budget_s)
            results.append({"op": case.op, "phase": case.phase, "label": case.label, "shape": case.shape,
                            "flops": case.flops, "bytes": case.bytes, "mma": case.mma, "results": rows})
            done = ", ".join(f"{r['provider']} {r['ms']:.4g} ms" if r["status"] == "timed" else
                             f"{r['provider']} {r['status']}" for r in rows)
            print(f"[{i}/{len(cases)}] {case.op} {case.phase}: {done}", file=sys.stderr, flush=True)
    rows = [r for c in results for r in c["results"]]
    count = {s: sum(r["status"] == s for r in rows) for s in ("timed", "declined", "skipped", "error")}
    summary = {"cases": len(results), **count}
    report = {"header": header, "cases": results, "summary": summary}
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    saved = f"; JSON in {args.json}" if args.json else ""
    print(f"summary: {len(results)} cases, {count['timed']} provider timings, {count['declined']} declined, "
          f"{count['skipped']} reference runs skipped (size cap), {count['error']} errors on {dev_label}{saved}",
          file=sys.stderr)
    return 1 if count["error"] else 0
