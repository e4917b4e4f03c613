"""Spec of npu_lightning_indexer (research/ascend.md 3.2; op-plugin torch_npu-npu_lightning_indexer.md)."""
from __future__ import annotations

import torch

from .contract import (SpecNotModelledError, check_contiguous, check_in, check_prefix_sums, check_tensor,
                       gather_paged, need, placeholder, require_soc, spec_op)

SRC = "op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_lightning_indexer.md"
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
N1_950 = (8, 16, 24, 32, 64)


def _lengths(op, arg, t, n_batch, limit, prefix):
    """int32 per-batch lengths in [0, limit], or (prefix=True, TND) the batches' ends as prefix sums from 0 (no
    leading 0): returns per-batch lengths."""
    if prefix:
        ends = check_prefix_sums(op, arg, t, SRC, first_zero=False)
        vals = [b - a for a, b in zip([0] + ends, ends)]
    else:
        check_tensor(op, arg, t, SRC, dtypes=(torch.int32,), ndim=1)
        vals = [int(v) for v in t.tolist()]
    need(len(vals) == n_batch and all(0 <= v <= limit for v in vals), op, arg, f"gives lengths {vals}",
         f"one length per batch ({n_batch}) in [0, {limit}]", SRC)
    return vals


@spec_op("npu_lightning_indexer", ("torch_npu", "_C_ascend"), SRC)
def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=2**63 - 1, next_tokens=2**63 - 1, return_value=False):
    """(sparse_indices int32, sparse_values): for query row s of batch b, score[t] = sum_h weights[h] *
    relu(query[h] . key[t]) over the batch's first actual_seq_lengths_key[b] keys; sparse_mode 3 (right-down
    causal) lets row s of q_len rows see keys t < kv_len - q_len + s + 1, sparse_mode 0 every key within the length.
    Indices of the sparse_count best keys (descending; ties unspecified), -1 where fewer keys are visible.
    Layouts: query BSND [B, S1, N1, D] or TND [T1, N1, D] (actual_seq_lengths_query then prefix sums, one per
    batch); key BSND [B, S2, 1, D], TND [T2, 1, D] (prefix sums) or PA_BSND [blocks, block_size, 1, D] read through
    block_table [B, >= max blocks] int32. Output [B, S1, 1, sparse_count] (BSND) or [T1, 1, sparse_count] (TND);
    sparse_values is allocated but undefined without return_value."""
    op = "npu_lightning_indexer"
    soc = require_soc(op, ("A2", "A3", "950"), SRC)
    check_in(op, "layout_query", layout_query, ("BSND", "TND"), SRC)
    check_in(op, "layout_key", layout_key, ("BSND", "PA_BSND", "TND"), SRC)
    need(layout_key == "PA_BSND" or layout_key == layout_query, op, "layout_key", f"is {layout_key!r}",
         f"layout_query ({layout_query!r}) unless PA_BSND", SRC)
    tnd = layout_query == "TND"
    check_tensor(op, "query", query, SRC, dtypes=(torch.bfloat16, torch.float16), ndim=3 if tnd else 4)
    check_contiguous(op, "query", query, SRC)                                        # "不支持非连续"
    check_tensor(op, "key", key, SRC, dtypes=(query.dtype,), ndim=3 if layout_key == "TND" else 4)
    if layout_key == "PA_BSND" and soc == "950" and not key.is_contiguous():
        need(key[0].is_contiguous(), op, "key", f"is non-contiguous beyond dim 0 (stride {list(key.stride())})",
             "on the 950 only dim 0 of a PA_BSND key may be non-contiguous", SRC)
    else:
        check_contiguous(op, "key", key, SRC)            # A2/A3: "key不支持非连续"
    n1, d = query.shape[-2], query.shape[-1]
    need(d == 128 and key.shape[-1] == 128, op, "query" if d != 128 else "key", f"has D={d}, key D={key.shape[-1]}",
         "D of query and key equal to 128", SRC)
    need(key.shape[-2] == 1, op, "key", f"has N2={key.shape[-2]}", "N2 = 1", SRC)
    if soc == "950":
        need(n1 in N1_950, op, "query", f"has N1={n1} heads", f"N1 in {N1_950} on the 950", SRC)
    else:
        need(n1 <= 64, op, "query", f"has N1={n1} heads", "N1 <= 64 on A2/A3", SRC)
    w_dtypes = (query.dtype,) if soc == "950" else (query.dtype, torch.float32)
    check_tensor(op, "weights", weights, SRC, dtypes=w_dtypes, ndim=2 if tnd else 3)   # 950: no float32
    check_contiguous(op, "weights", weights, SRC)
    need(tuple(weights.shape) == tuple(query.shape[:-1]), op, "weights", f"has shape {list(weights.shape)}",
         f"[T, N1] / [B, S1, N1] = {list(query.shape[:-1])}", SRC)
    need(sparse_count in SPARSE_COUNTS, op, "sparse_count", f"is {sparse_count!r}",
         "[1, 2048] or 3072, 4096, 5120, 6144, 7168, 8192", SRC)
    check_in(op, "sparse_mode", sparse_mode, (0, 3), SRC, "0 (no mask) or 3 (right-down causal)")
    need(pre_tokens == 2**63 - 1 and next_tokens == 2**63 - 1, op, "pre_tokens" if pre_tokens != 2**63 - 1 else
         "next_tokens", "is not the default", "only the default 2^63-1", SRC)
    if return_value:
        raise SpecNotModelledError(op, "return_value=True (training only)")

    # query rows per batch
    if tnd:
        need(actual_seq_lengths_query is not None, op, "actual_seq_lengths_query", "is missing", "required for TND",
             SRC)
        q_lens = _lengths(op, "actual_seq_lengths_query", actual_seq_lengths_query,
                          actual_seq_lengths_query.numel(), query.shape[0], True)
        need(sum(q_lens) == query.shape[0], op, "actual_seq_lengths_query", f"sums to {sum(q_lens)}",
             f"T1 = {query.shape[0]}", SRC)
        n_batch, q_rows = len(q_lens), query
    else:
        n_batch, s1 = query.shape[:2]
        q_lens = ([s1] * n_batch if actual_seq_lengths_query is None else
                  _lengths(op, "actual_seq_lengths_query", actual_seq_lengths_query, n_batch, s1, False))
        q_rows = query.reshape(-1, n1, d)
    # keys per batch, as a list of [len, D] tensors
    if layout_key == "PA_BSND":
        need(actual_seq_lengths_key is not None, op, "actual_seq_lengths_key", "is missing", "required for PA_BSND",
             SRC)
        k_lens = _lengths(op, "actual_seq_lengths_key", actual_seq_lengths_key, n_batch, 2**31 - 1, False)
        keys = gather_paged(op, "key", key, "block_table", block_table, k_lens, SRC)      # N2 = 1: rows [n, D]
    else:
        need(block_table is None, op, "block_table", "is given", "only with layout_key PA_BSND", SRC)
        if layout_key == "TND":
            need(actual_seq_lengths_key is not None, op, "actual_seq_lengths_key", "is missing", "required for TND",
                 SRC)
            k_lens = _lengths(op, "actual_seq_lengths_key", actual_seq_lengths_key, n_batch, key.shape[0], True)
            starts = [sum(k_lens[:b]) for b in range(n_batch)]
            keys = [key[s:s + n, 0] for s, n in zip(starts, k_lens)]
        else:
            need(key.shape[0] == n_batch, op, "key", f"has batch {key.shape[0]}", f"query's batch {n_batch}", SRC)
            s2 = key.shape[1]
            k_lens = ([s2] * n_batch if actual_seq_lengths_key is None else
                      _lengths(op, "actual_seq_lengths_key", actual_seq_lengths_key, n_batch, s2, False))
            keys = [key[b, :n, 0] for b, n in enumerate(k_lens)]

    out = torch.full((q_rows.shape[0], sparse_count), -1, dtype=torch.int32, device=query.device)
    row0 = 0
    for b in range(n_batch):
        rows = q_lens[b]
        base = row0 if tnd else b * query.shape[1]         # BSND: batch b's rows start at b * S1
        q_b = q_rows[base:base + rows].float()
        w_b = weights.reshape(-1, n1)[base:base + rows].float()
        kv_len = k_lens[b]
        if rows and kv_len:
            score = (torch.einsum("shd,td->sht", q_b, keys[b].float()).relu() * w_b.unsqueeze(-1)).sum(1)
            limit = torch.full((rows,), kv_len)
            if sparse_mode == 3:
                limit = torch.clamp(kv_len - rows + torch.arange(rows) + 1, max=kv_len)
            score = score.masked_fill(torch.arange(kv_len).view(1, -1) >= limit.view(-1, 1), float("-inf"))
            kk = min(sparse_count, kv_len)
            top = score.topk(kk, dim=-1)
            out[base:base + rows, :kk] = torch.where(torch.isfinite(top.values), top.indices, -1).to(torch.int32)
        row0 += rows
    shape = (query.shape[0], 1, sparse_count) if tnd else (query.shape[0], query.shape[1], 1, sparse_count)
    out = out.view(shape)
    return out, placeholder(shape, query.dtype, query.device)
