"""Spec of npu_lightning_indexer (research/ascend.md 3.2; torch_npu 2.13 schema, meta registration
npu_lightning_indexer_forward)."""
from __future__ import annotations

import torch

from .contract import SpecNotModelledError, check_in, check_int, check_tensor, need, require_soc, spec_op

SRC = "torch_npu 2.13 npu_lightning_indexer schema; op-plugin meta npu_lightning_indexer_forward"


@spec_op("npu_lightning_indexer", ("torch_npu", "_C_ascend"), SRC)
def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=2**63 - 1, next_tokens=2**63 - 1, return_value=False):
    """(indices int32 [B, S, N_kv=1, sparse_count], values): score[b, s, t] = sum_h weights[b, s, h] *
    relu(query[b, s, h] . key[b, t]) over the first actual_seq_lengths_key[b] keys; with sparse_mode 3
    (right-down causal) query row s of a sequence of q_len rows sees keys t < kv_len - q_len + s + 1. Indices of
    the sparse_count best keys (descending; ties unspecified), -1 where fewer keys are visible.
    Modelled: layout BSND for query ([B, S, N, D]) and key ([B, T, 1, D]), no block table."""
    op = "npu_lightning_indexer"
    require_soc(op, ("A2", "A3", "950"), SRC)
    check_in(op, "layout_query", layout_query, ("BSND", "TND"), SRC)
    check_in(op, "layout_key", layout_key, ("BSND", "PA_BSND", "TND"), SRC)
    if layout_query != "BSND" or layout_key != "BSND" or block_table is not None:
        raise SpecNotModelledError(op, "TND / paged (PA_BSND) layouts")
    check_tensor(op, "query", query, SRC, dtypes=(torch.bfloat16, torch.float16), ndim=4)
    check_tensor(op, "key", key, SRC, dtypes=(query.dtype,), ndim=4)
    check_tensor(op, "weights", weights, SRC, dtypes=(query.dtype, torch.float32), ndim=3)
    b, s, h, d = query.shape
    need(key.shape[0] == b and key.shape[2] == 1 and key.shape[3] == d, op, "key", f"has shape {list(key.shape)}",
         f"[B={b}, T, N_kv=1, D={d}] (BSND)", SRC)
    need(h <= 64, op, "query", f"has {h} heads", "at most 64 query heads", SRC)
    need(tuple(weights.shape) == (b, s, h), op, "weights", f"has shape {list(weights.shape)}", f"[B, S, N]=[{b}, {s}, {h}]",
         SRC)
    check_int(op, "sparse_count", sparse_count, SRC, 1, 2048)
    check_in(op, "sparse_mode", sparse_mode, (0, 3), SRC, "0 (no mask) or 3 (right-down causal)")
    t = key.shape[1]
    for name, lens, top in (("actual_seq_lengths_query", actual_seq_lengths_query, s),
                            ("actual_seq_lengths_key", actual_seq_lengths_key, t)):
        check_tensor(op, name, lens, SRC, dtypes=(torch.int32, torch.int64), ndim=1)
        need(lens.shape[0] == b and bool(((lens >= 0) & (lens <= top)).all()), op, name, f"is {lens.tolist()}",
             f"one length per batch in [0, {top}]", SRC)
    if return_value:
        raise SpecNotModelledError(op, "return_value=True")
    score = torch.einsum("bshd,btd->bsht", query.float(), key[:, :, 0].float()).relu()
    score = (score * weights.float().unsqueeze(-1)).sum(2)                       # [B, S, T]
    kv_len = actual_seq_lengths_key.long().view(b, 1)
    q_len = actual_seq_lengths_query.long().view(b, 1)
    limit = kv_len.expand(b, s)
    if sparse_mode == 3:
        limit = torch.minimum(limit, kv_len - q_len + torch.arange(s).view(1, s) + 1)
    visible = torch.arange(t).view(1, 1, t) < limit.unsqueeze(-1)
    score = score.masked_fill(~visible, float("-inf"))
    kk = min(sparse_count, t)
    top = score.topk(kk, dim=-1)
    idx = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1)).to(torch.int32)
    if kk < sparse_count:
        idx = torch.cat([idx, idx.new_full((b, s, sparse_count - kk), -1)], dim=-1)
    return idx.unsqueeze(2), torch.empty(0, dtype=torch.float32)
