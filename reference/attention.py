"""Sparse shared-KV attention with sinks, and the lightning indexer's top-k (DESIGN.md 2.3, 2.4)."""
from __future__ import annotations

import torch

from .invariant import f64
from .quant import linear_f32

BLOCK = 64              # index-list block of the online softmax, and key block of the indexer scores
_CHUNK_ELEMS = 1 << 24  # gathered rows per step, so the reference stays within a few hundred MB


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
    Computed in fp32 (fp64 for fp64 inputs) with an online softmax over blocks of 64 indices, every block a
    fixed-shape product: a query's result does not depend on the other queries of the call nor on trailing -1
    padding, so prefill, chunked prefill and decode agree bit for bit. Returns q's dtype.
    """
    b, s, h, d = q.shape
    n, k = kv.shape[1], idx.shape[-1]
    cd = _acc_dtype(q)
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device)
    sink_c = sink.to(cd)
    step = max(1, _CHUNK_ELEMS // (BLOCK * d))
    kpad = -(-max(k, 1) // BLOCK) * BLOCK
    for b0 in range(b):
        kvb = kv[b0].to(cd)
        for s0 in range(0, s, step):
            ids = idx[b0, s0:s0 + step].long()
            ids = torch.nn.functional.pad(ids, (0, kpad - k), value=-1)        # [c, Kpad]
            valid = (ids >= 0) & (ids < n)
            qc = q[b0, s0:s0 + step].to(cd)                                      # [c, H, D]
            c = qc.shape[0]
            m = torch.full((c, h), float("-inf"), dtype=cd, device=q.device)
            lsum = torch.zeros(c, h, dtype=cd, device=q.device)
            acc = torch.zeros(c, h, d, dtype=cd, device=q.device)
            for k0 in range(0, kpad, BLOCK):
                blk, ok = ids[:, k0:k0 + BLOCK], valid[:, k0:k0 + BLOCK]
                rows = kvb[blk.clamp(0, max(n - 1, 0))] if n else kvb.new_zeros(c, BLOCK, d)   # [c, 64, D]
                logits = torch.bmm(qc, rows.transpose(1, 2)) * scale                          # [c, H, 64]
                logits = logits.masked_fill(~ok.unsqueeze(1), float("-inf"))
                m_new = torch.maximum(m, logits.amax(-1))
                m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                alpha = f64(torch.exp, m - m_use)
                p = f64(torch.exp, logits - m_use.unsqueeze(-1))
                lsum = lsum * alpha + p.sum(-1)
                acc = acc * alpha.unsqueeze(-1) + torch.bmm(p, rows)
                m = m_new
            m_use = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            denom = lsum + f64(torch.exp, sink_c - m_use)
            o = torch.where(denom.unsqueeze(-1) > 0, acc / denom.unsqueeze(-1), torch.zeros_like(acc))
            out[b0, s0:s0 + step] = o.to(q.dtype)
    return out


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """score[b, s, t] = sum_h relu(<q[b,s,h], k[b,t]>) * w[b,s,h], in fp32 (fp64 for fp64). [B, S, N].

    Products in fixed [16 query rows x 64 keys] tiles and a sequential sum over heads, so a score never depends
    on how many queries or keys share the call."""
    b, s, h, d = q.shape
    n = k.shape[1]
    cd = _acc_dtype(q)
    npad = -(-n // BLOCK) * BLOCK
    out = torch.empty(b, s, n, dtype=cd, device=q.device)
    for b0 in range(b):
        qf = q[b0].reshape(s * h, d).to(cd)
        rows = -(-qf.shape[0] // 16) * 16
        qt = torch.nn.functional.pad(qf, (0, 0, 0, rows - qf.shape[0])).view(-1, 1, 16, d)
        kb = torch.nn.functional.pad(k[b0].to(cd), (0, 0, 0, npad - n)).view(1, -1, BLOCK, d)
        logits = torch.matmul(qt, kb.transpose(-1, -2))                          # [S*H/16, N/64, 16, 64]
        logits = logits.permute(0, 2, 1, 3).reshape(rows, npad)[: s * h, :n].view(s, h, n).relu_()
        out[b0] = (logits * w[b0].to(cd).unsqueeze(-1)).sum(1)
    return out


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, visible: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """The lightning indexer's selection of compressed entries.

    q: [B, S, H, Di] float (rotated, FP4-simulated queries); k: [B, N, Di] compressed indexer keys;
    w: [B, S, H] float32 head weights (already scaled by Di^-0.5 * H^-0.5); visible: [B, S] int number of
    compressed entries each query may see (entry t is visible iff t < visible); topk: int.
    Returns idx int32 [B, S, min(topk, N)]: the entries with the largest scores among the visible ones, and -1
    in slots beyond the visible count. Set semantics: the order within a row is not part of the contract.
    Ties (common: an entry whose ReLU terms are all 0 scores exactly 0) are broken toward the lower index here,
    so the reference's choice does not depend on N or on how a sequence was chunked; other providers may pick
    any member of a tie (conformance compares tie-aware).
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
        top = sc.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
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


def window_sparse_attn(q: torch.Tensor, window: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None,
                       topk: torch.Tensor | None, sink: torch.Tensor, scale: float, start_pos: int,
                       ratio: int) -> torch.Tensor:
    """One V4 attention step: S new queries over the sliding window and the compressed entries of their layer.

    q: [B, S, H, D] queries at absolute positions start_pos .. start_pos+S-1;
    window: [B, W, D] the ring of cached rows: the row of position p < start_pos sits in slot p % W (slots older
    than start_pos - W are stale and never read); kv: [B, S, D] this step's rows (same positions as q);
    comp: [B, N, D] the layer's compressed entries (entry c pools positions [c*ratio, (c+1)*ratio)), or None when
    ratio == 0; topk: [B, S, K] int32 the indexer's choice of distinct entries (CSA, ratio 4), -1 padded, or None
    to attend to every visible entry (HCA); sink: [H] float32; scale: softmax scale; start_pos, ratio: ints.

    The query at position p sees positions max(0, p-W+1) .. p, and compressed entry c iff c < (p+1) // ratio
    (entries of `topk` that are not visible are ignored). It is `sparse_attn` over the rows [window | kv | comp]
    with those index lists (window first, oldest first, -1 before position 0), so every property of sparse_attn
    holds. The op exists so a backend sees the structure (ring, new rows, compressed store, ratio) that fused
    kernels take (paged window + compressed caches, window masks) instead of a flat index list, and so a fused
    provider can read window, kv and comp where they lie instead of copying them into one workspace (this
    reference does build one). What the model passes is its cache as read: with the plain layout the stores are
    passed as views; the fp8 layout is dequantised on read (model.cache.EntryStore.read). Returns q's dtype.
    """
    rows, idx = window_workspace(window, kv, comp, topk, start_pos, ratio)
    return sparse_attn(q, rows, sink, idx, scale)


def window_workspace(window: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None, topk: torch.Tensor | None,
                     start_pos: int, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat form of a `window_sparse_attn` step: rows [B, W+S(+N), D] = [window | kv | comp] and the int32
    index lists [B, S, W(+N or K)] into them. Device-side tensor ops only (no host sync)."""
    b, s = kv.shape[:2]
    w = window.shape[1]
    pos = torch.arange(start_pos, start_pos + s, device=kv.device)
    slot = lambda p: torch.where(p < start_pos, p % w, w + p - start_pos)  # noqa: E731  ring slot or new row
    rows, idx = [window, kv], [window_indices(pos, w, slot).expand(b, s, w)]
    if ratio:
        rows.append(comp)
        if topk is None:
            idx.append(compressed_indices(pos, comp.shape[1], ratio, w + s).expand(b, s, comp.shape[1]))
        else:
            visible = ((pos + 1) // ratio).view(1, s, 1)
            idx.append(torch.where((topk >= 0) & (topk < visible), topk + (w + s), -1).to(torch.int32))
    return torch.cat(rows, dim=1), torch.cat(idx, dim=-1).contiguous()
