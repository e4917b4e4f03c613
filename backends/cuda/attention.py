"""Triton providers of `sparse_attn` and `window_sparse_attn`: shared-KV MQA over index lists with sinks,
split-K for decode.

Kernel shape: one program per (query, head block of BLOCK_H heads, split of the index list); BLOCK_H is 32
for 16-bit q (16 when H <= 16) and 16 for fp32 q (launch_config). It loads its BLOCK_H query rows once, then
walks its part of the index list BLOCK_N rows at a time: the gathered kv rows are keys (logits =
q @ rows^T on the tensor cores) and values (acc += p @ rows) at once, with an online softmax in fp32. A 16-bit
head block keeps the fp32 accumulator at 32 x 512 (64 registers a thread at 8 warps); at H = 64 the
head-block programs of a query are neighbours in the grid, so the repeated reads of each kv row hit L2.
(BLOCK_H = 64 compiles to wgmma on sm90 at 255 registers with a small spill; which of the two is faster at V4
decode shapes is for the GPU benchmark to decide: MAX_HEAD_BLOCK.)

Split-K: decode has one query per sequence, so (batch x head blocks) programs cannot fill the GPU. When the
grid would cover less than half the SMs, the index list is cut into contiguous splits (whole BLOCK_N blocks, at
least MIN_SPLIT_ROWS rows each: a split's fp32 partial, BLOCK_H x D x 4 bytes, is about the kv bytes it reads
and stays in L2 until the combine); each split writes (acc, max, sum) and a small combine kernel merges them in
split order and applies the sink. Large batches and prefill run unsplit, so the split count depends on the batch size and the
last bits of a query's result may differ between split and unsplit launches (the op's tolerance covers it; the
reference's bitwise batch invariance is not claimed here).

Edge cases, as the reference defines them: invalid indices (-1 or outside [0, N)) are skipped; a row with no
valid index gives 0; sink -inf is a plain softmax; sink +inf gives 0. No host syncs: the split plan uses shapes
and the SM count only.

window_sparse_attn (the model's attention step) runs the same design without building the reference's
[window | kv | comp] workspace, which would copy every cached entry once per layer and step (~256 MB for a CSA
layer at 1M context). The kernel reads the three sources in place through their own strides: its index list
is virtual, [W window slots | padding to BLOCK_N | compressed list], where window slot j of the query at
position p is position p - W + 1 + j, read from the ring (slot pos % W) if it is older than this step and from
this step's rows otherwise; the compressed list is the implicit range 0..N-1 for HCA (only the visible prefix
c < (p+1)//ratio is visited) and the indexer's top-k for CSA (entries not yet visible are skipped). No index
tensor is materialised for the window or HCA; no host syncs. The order of the list is the reference's.
"""
from __future__ import annotations

import torch

from dsv4_portable.devices import interpret_mode
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import next_pow2, num_sms, unit_last_stride_reasons

BLOCK_N = 32          # kv rows per step
MAX_HEAD_BLOCK = 32   # heads per program
MAX_D = 512           # fp32 accumulator BLOCK_H x D must fit the register file
# Smallest split on a GPU (the interpreter allows one block, to test many splits). A split of 64 rows reads
# 64 KB of bf16 kv (D = 512) and writes a 64 KB fp32 partial per 32-head block; a decode batch's partials
# (B = 1, V4 CSA: 2 head blocks x 10 splits x 64 KB) stay in L2 for the combine, and B = 1 gets 20 programs
# instead of the 10 that 128-row splits allow (analysis; not measured on a GPU).
MIN_SPLIT_ROWS = 64


def _kernels():
    from . import attention_kernels
    return attention_kernels


def launch_config(dtype: torch.dtype, h: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_H, num_warps, num_stages). 16-bit q: up to MAX_HEAD_BLOCK heads, two stages. fp32 q multiplies
    in exact fp32 on FMA units, which keeps its operands in registers and shared memory at 4 bytes: 16 heads and
    one stage (offline sm90 compile at D = 512: ~100 KB shared memory, no spills; 32 heads spill and need
    ~135 KB, TF32x3 needs more still)."""
    cap, stages = (16, 1) if dtype == torch.float32 else (MAX_HEAD_BLOCK, 2)
    block_h = min(cap, max(16, next_pow2(h)))
    return block_h, 8 if block_h * d >= 8192 else 4, stages


def plan_splits(programs: int, k: int, sms: int, min_rows: int) -> tuple[int, int]:
    """(n_splits, blocks_per_split) for `programs` (query, head block) pairs over index lists of length k."""
    n_blocks = max(1, -(-k // BLOCK_N))
    if programs >= max(1, sms // 2) or n_blocks < 2:
        return 1, n_blocks
    want = min(-(-sms // programs), max(1, k // min_rows), n_blocks)
    per = -(-n_blocks // max(1, want))
    return -(-n_blocks // per), per


def _supports(q, kv, sink, idx, scale):
    return device_reasons(q, kv, sink, idx) + _kernel_reasons(q)


def _kernel_reasons(q):
    """What the kernels take beyond the op's argument spec (which already holds sink to float32, idx / topk to
    int32 and the float arguments to q's dtype)."""
    reasons = []
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        reasons.append(f"q dtype {q.dtype} not supported (bf16, fp16, fp32; fp64 runs on the reference)")
    d = q.shape[-1]
    if not 16 <= d <= MAX_D:
        reasons.append(f"head_dim {d} outside [16, {MAX_D}] (fp32 accumulator of {MAX_HEAD_BLOCK} heads x D "
                       "must fit the register file)")
    return reasons


# batch_invariant=False: the split-K plan follows the grid size, so a query's last bits can change with the batch
@register("sparse_attn", "triton", "cuda", available=triton_availability, supports=_supports, batch_invariant=False,
          note="Triton split-K online softmax over index lists (shared-KV MQA, sinks)")
def sparse_attn_triton(q, kv, sink, idx, scale):
    import triton.language as tl
    from .tl_helpers import dot_precision, tl_dtype
    kern = _kernels()
    b, s, h, d = q.shape
    n, k = kv.shape[1], idx.shape[-1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    sink = sink.contiguous()
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interp = interpret_mode()
    dot_dt = tl.float32 if interp else tl_dtype(q.dtype)
    block_h, warps, stages = launch_config(q.dtype, h, d)
    n_hblocks = -(-h // block_h)
    n_splits, per = plan_splits(b * s * n_hblocks, k, num_sms(q.device), BLOCK_N if interp else MIN_SPLIT_ROWS)
    split = n_splits > 1
    part_o, part_ml = _partials(b, s, h, d, n_splits, q.device)
    meta = dict(OUT_DT=tl_dtype(q.dtype), INTERPRET=interp)
    # grid axis 0 = (query, head block) with the head block fastest, so the programs that read the same kv
    # rows run side by side (L2 reuse); axis 1 = splits
    launch(kern.sparse_attn_kernel, (b * s * n_hblocks, n_splits),
           q, kv, sink, idx, out, part_o, part_ml, s, h, n, k, d, float(scale), per, n_splits, n_hblocks,
           q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
           out.stride(0), out.stride(1), out.stride(2),
           SPLIT=split, DOT_DT=dot_dt, PREC=dot_precision(dot_dt), BLOCK_H=block_h, BLOCK_N=BLOCK_N,
           BLOCK_D=next_pow2(d), num_warps=warps, num_stages=stages, **meta)
    if split:
        _combine(part_o, part_ml, sink, out, n_splits, **meta)
    return out


def _partials(b: int, s: int, h: int, d: int, n_splits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 buffers of the split partials: acc [B*S, splits, H, D] and (max, sum) [B*S, splits, H, 2]; one
    element each (never read) when the launch does not split."""
    if n_splits == 1:
        one = torch.empty(1, dtype=torch.float32, device=device)
        return one, one
    return (torch.empty(b * s * n_splits * h * d, dtype=torch.float32, device=device),
            torch.empty(b * s * n_splits * h * 2, dtype=torch.float32, device=device))


def _combine(part_o, part_ml, sink, out, n_splits, **meta):
    b, s, h, d = out.shape
    launch(_kernels().sparse_attn_combine_kernel, (b * s * h,),
           part_o, part_ml, sink, out, s, h, d, n_splits, out.stride(0), out.stride(1), out.stride(2),
           BLOCK_D=next_pow2(d), num_warps=4, **meta)


def _window_supports(q, window, kv, comp, topk, sink, scale, start_pos, ratio):
    # the caches (ring, compressed entries) are read in place, never copied: they need a unit-stride last dim;
    # this step's q, kv and topk are small and are made unit-stride by the provider when they are not
    return (device_reasons(q, window, kv, comp, topk, sink) + _kernel_reasons(q)
            + unit_last_stride_reasons(window=window, comp=comp))


@register("window_sparse_attn", "triton", "cuda", available=triton_availability, supports=_window_supports,
          batch_invariant=False,
          note="Triton split-K online softmax reading the window ring, this step's rows and the compressed entries "
               "in place (window and HCA indices computed in-kernel, CSA top-k read as given)")
def window_sparse_attn_triton(q, window, kv, comp, topk, sink, scale, start_pos, ratio):
    import triton.language as tl
    from .tl_helpers import dot_precision, tl_dtype
    kern = _kernels()
    b, s, h, d = q.shape
    w = window.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()           # this step's tensors: small, copied when strided
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    if topk is not None and topk.stride(-1) != 1:
        topk = topk.contiguous()
    sink = sink.contiguous()
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mode = 0 if not ratio else (2 if topk is not None else 1)
    n = comp.shape[1] if mode else 0
    kc = topk.shape[-1] if mode == 2 else n              # length of the compressed part of the list
    w_pad = -(-w // BLOCK_N) * BLOCK_N
    comp_t = comp if mode else kv                        # unused pointers get a valid tensor
    topk_t = topk if mode == 2 else sink
    interp = interpret_mode()
    dot_dt = tl.float32 if interp else tl_dtype(q.dtype)
    block_h, warps, stages = launch_config(q.dtype, h, d)
    n_hblocks = -(-h // block_h)
    n_splits, per = plan_splits(b * s * n_hblocks, w_pad + kc, num_sms(q.device),
                                BLOCK_N if interp else MIN_SPLIT_ROWS)
    part_o, part_ml = _partials(b, s, h, d, n_splits, q.device)
    meta = dict(OUT_DT=tl_dtype(q.dtype), INTERPRET=interp)
    launch(kern.window_sparse_attn_kernel, (b * s * n_hblocks, n_splits),
           q, window, kv, comp_t, topk_t, sink, out, part_o, part_ml, s, h, w, w_pad, n, kc, d,
           float(scale), int(start_pos), int(ratio), per, n_splits, n_hblocks,
           q.stride(0), q.stride(1), q.stride(2), window.stride(0), window.stride(1), kv.stride(0), kv.stride(1),
           comp_t.stride(0), comp_t.stride(1), topk_t.stride(0) if mode == 2 else 0,
           topk_t.stride(1) if mode == 2 else 0, out.stride(0), out.stride(1), out.stride(2),
           MODE=mode, SPLIT=n_splits > 1, DOT_DT=dot_dt, PREC=dot_precision(dot_dt), BLOCK_H=block_h,
           BLOCK_N=BLOCK_N, BLOCK_D=next_pow2(d), num_warps=warps, num_stages=stages, **meta)
    if n_splits > 1:
        _combine(part_o, part_ml, sink, out, n_splits, **meta)
    return out
