"""Sparse shared-KV attention with sinks, and the lightning indexer's top-k (DESIGN.md 2.3, 2.4)."""
from __future__ import annotations

import torch

# Rows of the gathered [chunk, K, D] workspace per step; keeps the reference within a few hundred MB.
_CHUNK_ELEMS = 1 << 24


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Shared-KV multi-query attention over an index list per query, with an attention sink per head.

    q: [B, S, H, D] float; kv: [B, N, D] (same dtype as q): one latent row is both key and value;
    sink: [H] float32 logit (not scaled); idx: [B, S, K] int32 rows of kv, -1 (or any index outside [0, N)) is
    padding; scale: softmax scale (head_dim^-0.5 in V4).

    l_j = scale * <q, kv[idx_j]>;  o = sum_j p_j kv[idx_j],  p_j = exp(l_j) / (sum_i exp(l_i) + exp(sink_h)).
    The sink only enlarges the denominator (its value row is zero). Defined edge cases: a row with no valid
    index returns exactly 0 (never NaN); sink = -inf is plain softmax; sink = +inf returns 0.
    Computed in fp32 (fp64 for fp64 inputs); returns q's dtype.
    """
    b, s, h, d = q.shape
    n = kv.shape[1]
    cd = _acc_dtype(q)
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device)
    k = idx.shape[-1]
    step = max(1, _CHUNK_ELEMS // max(1, k * d))
    sink_c = sink.to(cd).view(1, 1, h)
    for b0 in range(b):
        kvb = kv[b0].to(cd)
        for s0 in range(0, s, step):
            ids = idx[b0, s0:s0 + step].long()                          # [c, K]
            valid = (ids >= 0) & (ids < n)
            rows = kvb[ids.clamp(0, max(n - 1, 0))] if n else kvb.new_zeros(*ids.shape, d)  # [c, K, D]
            qc = q[b0, s0:s0 + step].to(cd)                              # [c, H, D]
            logits = torch.einsum("chd,ckd->chk", qc, rows) * scale
            logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
            m = torch.maximum(logits.amax(-1), sink_c.expand(logits.shape[0], 1, h)[:, 0])  # [c, H]
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(logits - m.unsqueeze(-1))
            denom = p.sum(-1) + torch.exp(sink_c[0] - m)
            o = torch.einsum("chk,ckd->chd", p, rows)
            o = torch.where(denom.unsqueeze(-1) > 0, o / denom.unsqueeze(-1), torch.zeros_like(o))
            o = torch.where(torch.isposinf(sink_c[0]).unsqueeze(-1).expand_as(o), torch.zeros_like(o), o)
            out[b0, s0:s0 + step] = o.to(q.dtype)
    return out


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """score[b, s, t] = sum_h relu(<q[b,s,h], k[b,t]>) * w[b,s,h], in fp32 (fp64 for fp64). [B, S, N]."""
    cd = _acc_dtype(q)
    logits = torch.einsum("bshd,btd->bsht", q.to(cd), k.to(cd)).relu_()
    return torch.einsum("bsht,bsh->bst", logits, w.to(cd))


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, visible: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """The lightning indexer's selection of compressed entries.

    q: [B, S, H, Di] float (rotated, FP4-simulated queries); k: [B, N, Di] compressed indexer keys;
    w: [B, S, H] float32 head weights (already scaled by Di^-0.5 * H^-0.5); visible: [B, S] int number of
    compressed entries each query may see (entry t is visible iff t < visible); topk: int.
    Returns idx int32 [B, S, min(topk, N)]: the entries with the largest scores among the visible ones, and -1
    in slots beyond the visible count. Set semantics: the order within a row is not part of the contract.
    """
    b, s, h, di = q.shape
    n = k.shape[1]
    kk = min(topk, n)
    out = torch.full((b, s, kk), -1, dtype=torch.int32, device=q.device)
    if kk == 0:
        return out
    step = max(1, _CHUNK_ELEMS // max(1, h * n))
    t = torch.arange(n, device=q.device)
    for s0 in range(0, s, step):
        sc = indexer_scores(q[:, s0:s0 + step], k, w[:, s0:s0 + step])
        vis = visible[:, s0:s0 + step].to(torch.int64)
        mask = t.view(1, 1, n) >= vis.unsqueeze(-1)
        sc = sc.masked_fill(mask, float("-inf"))
        top = sc.topk(kk, dim=-1).indices
        top = torch.where(top >= vis.unsqueeze(-1), torch.full_like(top, -1), top)
        out[:, s0:s0 + step] = top.to(torch.int32)
    return out


def window_indices(positions: torch.Tensor, window: int, slot_of_position=None) -> torch.Tensor:
    """Sliding-window index lists: for each absolute query position p the last `window` positions up to and
    including p (oldest first), -1 where the position would be negative. [*, window] int32.

    `slot_of_position` maps absolute positions to kv rows (identity for prefill over fresh rows; p % window for
    the decode ring)."""
    offs = torch.arange(-window + 1, 1, device=positions.device)
    pos = positions.to(torch.int64).unsqueeze(-1) + offs
    rows = pos if slot_of_position is None else slot_of_position(pos)
    return torch.where(pos >= 0, rows, torch.full_like(rows, -1)).to(torch.int32)


def compressed_indices(positions: torch.Tensor, n_entries: int, ratio: int, offset: int) -> torch.Tensor:
    """HCA index lists: every compressed entry c < (p+1)//ratio, shifted by `offset`; -1 otherwise.
    [*, n_entries] int32."""
    c = torch.arange(n_entries, device=positions.device)
    vis = (positions.to(torch.int64).unsqueeze(-1) + 1) // ratio
    return torch.where(c < vis, c + offset, torch.full_like(c, -1)).to(torch.int32)
