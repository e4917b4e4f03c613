"""sparse_attn and indexer_topk against independent dense computations (DESIGN.md 2.3, 2.4)."""
import math

import pytest
import torch

from dsv4_portable import OpInputError, ops
from dsv4_portable.reference import attention as A


def dense_with_sink_column(q, kv, sink, idx, scale):
    """Dense softmax over all N rows (masked to the index set) plus an explicit sink column with a zero value
    row, in float64. Index lists must not repeat an index."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    mask = torch.zeros(b, s, n, dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            for j in idx[bi, si].tolist():
                if 0 <= j < n:
                    mask[bi, si, j] = True
    logits = torch.einsum("bshd,bnd->bshn", q.double(), kv.double()) * scale
    logits = logits.masked_fill(~mask.unsqueeze(2), -math.inf)
    sink_col = sink.double().view(1, 1, h, 1).expand(b, s, h, 1)
    p = torch.cat([logits, sink_col], -1).softmax(-1)[..., :n]
    return torch.einsum("bshn,bnd->bshd", p, kv.double())


def make(seed, b=2, s=4, h=8, d=64, n=40, k=12):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    sink = torch.randn(h, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * s)]).view(b, s, k).int()
    drop = torch.rand(b, s, k, generator=g) < 0.3
    return q, kv, sink, torch.where(drop, -1, idx).int()


def test_matches_dense_softmax_with_sink_column():
    q, kv, sink, idx = make(0)
    out = ops.sparse_attn(q.double(), kv.double(), sink.double(), idx, 64 ** -0.5)
    torch.testing.assert_close(out, dense_with_sink_column(q, kv, sink, idx, 64 ** -0.5), rtol=1e-12, atol=1e-12)


def test_bf16_close_to_dense():
    q, kv, sink, idx = make(1)
    out = ops.sparse_attn(q.bfloat16(), kv.bfloat16(), sink, idx, 0.125)
    ref = dense_with_sink_column(q.bfloat16().float(), kv.bfloat16().float(), sink, idx, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)


def test_row_without_valid_index_is_exactly_zero():
    q, kv, sink, idx = make(2)
    idx[0, 1] = -1
    for s_val in (0.5, -math.inf, 50.0):
        out = ops.sparse_attn(q, kv, torch.full((8,), s_val), idx, 0.125)
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
        assert torch.isfinite(out).all()


def test_sink_minus_inf_is_plain_softmax():
    q, kv, _, idx = make(3)
    out = ops.sparse_attn(q.double(), kv.double(), torch.full((8,), -math.inf, dtype=torch.float64), idx, 0.2)
    b, s, h, d = q.shape
    want = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            ids = [j for j in idx[bi, si].tolist() if j >= 0]
            if ids:
                rows = kv[bi, ids].double()
                p = (q[bi, si].double() @ rows.t() * 0.2).softmax(-1)
                want[bi, si] = p @ rows
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_sink_plus_inf_gives_zero_and_huge_sink_dominates():
    q, kv, _, idx = make(4)
    assert torch.equal(ops.sparse_attn(q, kv, torch.full((8,), math.inf), idx, 0.1), torch.zeros_like(q))
    out = ops.sparse_attn(q, kv, torch.full((8,), 80.0), idx, 0.1)
    assert out.abs().max() < 1e-20


def test_single_valid_index_returns_that_row_scaled():
    q, kv, sink, idx = make(5)
    idx[1, 2] = -1
    idx[1, 2, 7] = 11
    out = ops.sparse_attn(q.double(), kv.double(), sink.double(), idx, 0.1)
    l = (q[1, 2].double() @ kv[1, 11].double()) * 0.1          # [H]
    p = torch.exp(l) / (torch.exp(l) + torch.exp(sink.double()))
    torch.testing.assert_close(out[1, 2], p.unsqueeze(-1) * kv[1, 11].double(), rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    q, kv, sink, idx = make(6)
    with pytest.raises(OpInputError, match="'kv' has shape"):
        ops.sparse_attn(q, kv[:, :, :32], sink, idx, 0.1)
    with pytest.raises(OpInputError, match="'idx' has dtype torch.int64"):
        ops.sparse_attn(q, kv, sink, idx.long(), 0.1)
    with pytest.raises(OpInputError, match="'sink' has shape"):
        ops.sparse_attn(q, kv, sink[:4], idx, 0.1)
    with pytest.raises(OpInputError, match="'kv' has dtype"):
        ops.sparse_attn(q, kv.bfloat16(), sink, idx, 0.1)
    with pytest.raises(OpInputError, match="scale"):
        ops.sparse_attn(q, kv, sink, idx, 1)
    with pytest.raises(OpInputError, match="'idx' has shape"):
        ops.sparse_attn(q, kv, sink, idx[0], 0.1)


# ----------------------------------------------------------------------------------------------- indexer
def brute_force_topk_sets(q, k, w, visible, topk):
    b, s, h, _ = q.shape
    out = []
    for bi in range(b):
        for si in range(s):
            v = int(visible[bi, si])
            scores = [(sum(max(0.0, float(q[bi, si, hh].double() @ k[bi, t].double())) * float(w[bi, si, hh])
                           for hh in range(h)), t) for t in range(v)]
            scores.sort(key=lambda x: -x[0])
            out.append(({t for _, t in scores[:topk]}, [sc for sc, _ in scores]))
    return out


def test_indexer_topk_matches_brute_force_sets():
    g = torch.Generator().manual_seed(7)
    b, s, h, d, n, topk = 2, 3, 4, 16, 10, 4
    q, k = torch.randn(b, s, h, d, generator=g), torch.randn(b, n, d, generator=g)
    w = torch.randn(b, s, h, generator=g)
    visible = torch.tensor([[0, 3, 10], [7, 2, 5]])
    idx = ops.indexer_topk(q, k, w, visible, topk)
    assert idx.shape == (b, s, topk) and idx.dtype == torch.int32
    want = brute_force_topk_sets(q, k, w, visible, topk)
    for r, (row, (wset, _)) in enumerate(zip(idx.view(b * s, topk).tolist(), want)):
        chosen = {t for t in row if t >= 0}
        assert chosen == wset, r
        assert row.count(-1) == topk - min(topk, int(visible.view(-1)[r]))


def test_indexer_ties_any_member_of_the_tie_is_valid():
    b, s, h, d, n = 1, 1, 2, 8, 6
    k = torch.zeros(b, n, d)
    k[0, :, 0] = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0, 0.0])   # three tied best keys
    q = torch.zeros(b, s, h, d)
    q[..., 0] = 1.0
    w = torch.ones(b, s, h)
    idx = ops.indexer_topk(q, k, w, torch.tensor([[6]]), 2)
    assert set(idx.view(-1).tolist()) <= {1, 2, 3} and len(set(idx.view(-1).tolist())) == 2


def test_index_builders():
    pos = torch.tensor([0, 5, 200])
    win = A.window_indices(pos, 4)
    assert win.tolist() == [[-1, -1, -1, 0], [2, 3, 4, 5], [197, 198, 199, 200]]
    ring = A.window_indices(pos, 4, lambda p: p % 4)
    assert ring.tolist() == [[-1, -1, -1, 0], [2, 3, 0, 1], [1, 2, 3, 0]]
    comp = A.compressed_indices(torch.tensor([2, 3, 8]), 3, 4, offset=10)
    assert comp.tolist() == [[-1, -1, -1], [10, -1, -1], [10, 11, -1]]


def dense_by_position(q, hist, comp, sink, scale, p0, window, ratio, chosen=None):
    """Independent form of window_sparse_attn: every key addressed by its absolute position. hist[b, p] is the
    kv row of position p; the query at p sees positions p-window+1..p (>= 0) and compressed entries
    c < (p+1)//ratio (restricted to `chosen[b][i]` for CSA). float64 dense softmax with a sink column."""
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(s):
            p = p0 + i
            keys = [hist[bi, j] for j in range(max(0, p - window + 1), p + 1)]
            if ratio:
                vis = [c for c in range(comp.shape[1]) if c < (p + 1) // ratio]
                if chosen is not None:
                    vis = [c for c in vis if c in chosen[bi][i]]
                keys += [comp[bi, c] for c in vis]
            k = torch.stack(keys).double()                                          # [n, d]
            logits = torch.einsum("hd,nd->hn", q[bi, i].double(), k) * scale
            p_all = torch.cat([logits, sink.double().view(h, 1)], -1).softmax(-1)[:, :-1]
            out[bi, i] = p_all @ k
    return out


@pytest.mark.parametrize("p0,s,ratio,csa", [(0, 9, 0, False), (5, 3, 0, False), (13, 1, 4, False),
                                            (6, 7, 4, True), (21, 1, 4, True), (30, 4, 8, False)])
def test_window_sparse_attn_matches_attention_by_position(p0, s, ratio, csa):
    g = torch.Generator().manual_seed(p0 * 31 + s)
    b, h, d, w = 2, 4, 32, 8
    hist = torch.randn(b, p0 + s, d, generator=g, dtype=torch.float64)
    ring = torch.randn(b, w, d, generator=g, dtype=torch.float64)       # stale slots hold noise
    for p in range(max(0, p0 - w), p0):
        ring[:, p % w] = hist[:, p]
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    sink = torch.randn(h, generator=g, dtype=torch.float64)
    comp = topk = chosen = None
    if ratio:
        comp = torch.randn(b, (p0 + s) // ratio + 2, d, generator=g, dtype=torch.float64)   # + unwritten rows
    if csa:   # a top-k list per query: some visible entries, one invisible (must be ignored), -1 padding
        n = comp.shape[1]
        topk = torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(b * s)]).view(b, s, 5).int()
        topk[:, :, -1] = -1
        topk[:, :, 0] = n - 1                                           # never visible: n-1 >= (p0+s)//ratio + 1
        chosen = [[set(topk[bi, i].tolist()) for i in range(s)] for bi in range(b)]
    out = ops.window_sparse_attn(q, ring, hist[:, p0:], comp, topk, sink, d ** -0.5, p0, ratio)
    ref = dense_by_position(q, hist, comp, sink, d ** -0.5, p0, w, ratio, chosen)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_window_sparse_attn_rejects_inconsistent_structure():
    q, ring, kv, sink = torch.randn(1, 2, 4, 32), torch.randn(1, 8, 32), torch.randn(1, 2, 32), torch.randn(4)
    with pytest.raises(OpInputError, match="needs the compressed entries 'comp'"):
        ops.window_sparse_attn(q, ring, kv, None, None, sink, 0.1, 0, 4)
    with pytest.raises(OpInputError, match="ratio 0"):
        ops.window_sparse_attn(q, ring, kv, torch.randn(1, 3, 32), None, sink, 0.1, 0, 0)
    with pytest.raises(OpInputError, match="'kv' has shape"):
        ops.window_sparse_attn(q, ring, torch.randn(1, 3, 32), None, None, sink, 0.1, 0, 0)
    with pytest.raises(OpInputError, match=r"'comp' holds 2 entries but 3 are visible to the queries at positions "
                                           r"10\.\.11 \(ratio 4\)"):
        ops.window_sparse_attn(q, ring, kv, torch.randn(1, 2, 32), None, sink, 0.1, 10, 4)
    ops.window_sparse_attn(q, ring, kv, torch.randn(1, 3, 32), None, sink, 0.1, 10, 4)   # exactly the visible ones
