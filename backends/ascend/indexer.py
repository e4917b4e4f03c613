"""indexer_topk -> npu_lightning_indexer, for decode (one query per sequence).

Our op says how many compressed entries each query row may see (`visible`). For one query row per sequence that
is exactly the op's per-batch actual_seq_lengths_key. In prefill, rows see (position + 1) // ratio entries, which
the generic op's causal mode (sparse_mode 3) cannot express; the DSV4 variant with cmp_ratio takes int8 / fp8
keys only. Prefill is declined with that reason.
"""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, device_reasons

INDEXER = ("npu_lightning_indexer", ("torch_npu", "_C_ascend"))


def _supports(q, k, w, visible, topk):
    b, s, h, d = q.shape
    reasons = device_reasons(q, k, w, visible)
    if s != 1:
        reasons.append(f"{s} query rows per sequence: prefill visibility (position+1)//ratio is not expressible "
                       "with npu_lightning_indexer (decode only)")
    if q.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"dtype {q.dtype}; npu_lightning_indexer takes bf16/fp16")
    if h > 64:
        reasons.append(f"{h} heads; npu_lightning_indexer takes at most 64")
    if topk > 2048:
        reasons.append(f"top-{topk}; sparse_count is at most 2048")
    return reasons


@register("indexer_topk", "cann", "npu", available=availability(*INDEXER), supports=_supports,
          note="npu_lightning_indexer, decode only")
def indexer_topk_cann(q, k, w, visible, topk):
    b, s, h, d = q.shape
    n = k.shape[1]
    kk = min(topk, n)
    ones = torch.ones(b, dtype=torch.int32, device=q.device)
    idx, _ = vendor_ops.call(*INDEXER, q, k.unsqueeze(2), w.float(), actual_seq_lengths_query=ones,
                             actual_seq_lengths_key=visible[:, 0].to(torch.int32), layout_query="BSND",
                             layout_key="BSND", sparse_count=kk, sparse_mode=0)
    return idx[:, :, 0, :kk].to(torch.int32)
