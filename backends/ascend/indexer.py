"""indexer_topk -> npu_lightning_indexer (bf16 / fp16 queries and keys), prefill and decode alike.

Our op says how many compressed entries each query row may see (`visible`, (position + 1) // 4 per row), which no
causal mode of the op expresses for prefill. So every query row goes in as its own sequence: query TND
[B*S, H, 128] with actual_seq_lengths_query = 1, 2, ..., B*S (one row per sequence), keys PA_BSND through a
block table whose row r lists the blocks of r's batch, actual_seq_lengths_key = visible (per row), sparse_mode 0.
The keys are read in place when they are the head of a cache store whose capacity divides into blocks; otherwise
(a fresh tensor, e.g. the dequantised FP8 layout) a padded copy is made.

Limits (op-plugin torch_npu-npu_lightning_indexer.md): D 128; N1 <= 64 (A2/A3) or in {8, 16, 24, 32, 64} (950);
no empty key; weights bf16/fp16, or fp32 on A2/A3 only (on the 950 the fp32 weights are cast to the query dtype: a
deliberate difference); sparse_count <= 2048 here.
"""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import chip as chip_mod
from . import vendor_ops
from .common import availability, block_table, device_reasons, padded_rows, paged_rows

INDEXER = ("torch_npu.npu_lightning_indexer", "_C_ascend.npu_lightning_indexer")
HEADS_950 = (8, 16, 24, 32, 64)


def _supports(q, k, w, visible, topk):
    b, s, h, d = q.shape
    reasons = device_reasons(q, k, w, visible)
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        reasons.append(f"query {q.dtype} / key {k.dtype}; npu_lightning_indexer takes bf16 or fp16, one dtype")
    if d != 128:
        reasons.append(f"head dim {d}; npu_lightning_indexer takes D = 128")
    if chip_mod.chip() == "950" and h not in HEADS_950:
        reasons.append(f"{h} heads; npu_lightning_indexer on the 950 takes N1 in {HEADS_950}")
    elif h > 64:
        reasons.append(f"{h} heads; npu_lightning_indexer takes at most 64")
    if k.shape[1] == 0:
        reasons.append("no compressed entries yet (an empty key); the op takes no empty tensors")
    if topk > 2048:
        reasons.append(f"top-{topk}; sparse_count is at most 2048")
    return reasons


@register("indexer_topk", "cann", "npu", available=availability(INDEXER), supports=_supports,
          note="npu_lightning_indexer, one query row per sequence (TND) over paged keys (PA_BSND)")
def indexer_topk_cann(q, k, w, visible, topk):
    b, s, h, d = q.shape
    n = k.shape[1]
    kk = min(topk, n)
    paged = paged_rows(k) or padded_rows(k, 128)
    blocks, bs, per_batch = paged
    rows = b * s
    batch_of_row = torch.arange(b, device=q.device).repeat_interleave(s)
    table = block_table(batch_of_row, per_batch, -(-n // bs))
    # fp32 head weights on A2/A3; the 950 takes only the query dtype (the reference's weights are fp32)
    weights = w.reshape(rows, h).to(torch.float32 if chip_mod.chip() != "950" else q.dtype).contiguous()
    idx, _ = vendor_ops.call(
        INDEXER, q.reshape(rows, h, d).contiguous(), blocks, weights,
        actual_seq_lengths_query=torch.arange(1, rows + 1, dtype=torch.int32, device=q.device),
        actual_seq_lengths_key=visible.reshape(rows).to(torch.int32).clamp(0, n), block_table=table,
        layout_query="TND", layout_key="PA_BSND", sparse_count=kk, sparse_mode=0)
    return idx.view(b, s, kk).to(torch.int32)
