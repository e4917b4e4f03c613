"""mHC and MoE reference ops against hand-written computations (DESIGN.md 2.5, 2.6)."""
import pytest
import torch
import torch.nn.functional as F

from dsv4_portable import OpInputError, ops
from dsv4_portable.reference import ExpertWeights, hadamard, rms_norm, rope, rope_cos_sin, rope_inv_freq
from dsv4_portable.reference.quant import pack_fp4, quant_fp8

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


# ----------------------------------------------------------------------------------------------- mHC
def test_hc_pre_comb_is_doubly_stochastic_and_y_is_pre_weighted_sum():
    g = G(0)
    h = torch.randn(2, 3, 4, 32, generator=g, dtype=torch.float64)
    fn = torch.randn(24, 128, generator=g, dtype=torch.float64) * 0.1
    scale, base = torch.rand(3, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    y, post, comb = ops.hc_pre(h, fn, scale, base)
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-3, rtol=0)
    # hand computation of pre/post for one token
    flat = h[1, 2].reshape(-1)
    m = (fn @ flat) / torch.sqrt((flat ** 2).mean() + 1e-6)
    pre = torch.sigmoid(m[:4] * scale[0] + base[:4]) + 1e-6
    torch.testing.assert_close(post[1, 2], 2 * torch.sigmoid(m[4:8] * scale[1] + base[4:8]))
    torch.testing.assert_close(y[1, 2], (pre.unsqueeze(-1) * h[1, 2]).sum(0))
    # comb of the same token by hand: logits row i = mixes 8+4i .. 11+4i; softmax along each row, then
    # Sinkhorn (columns first, then 19 x rows-then-columns), every sum written out element by element
    logits = [[(m[8 + 4 * i + j] * scale[2] + base[8 + 4 * i + j]).item() for j in range(4)] for i in range(4)]
    import math
    c = []
    for row in logits:
        z = sum(math.exp(v) for v in row)
        c.append([math.exp(v) / z + 1e-6 for v in row])

    def cols(c):
        sums = [sum(c[i][j] for i in range(4)) + 1e-6 for j in range(4)]
        return [[c[i][j] / sums[j] for j in range(4)] for i in range(4)]

    def rows(c):
        return [[v / (sum(r) + 1e-6) for v in r] for r in c]
    c = cols(c)
    for _ in range(19):
        c = cols(rows(c))
    want = torch.tensor(c, dtype=torch.float64)
    torch.testing.assert_close(comb[1, 2], want, rtol=1e-12, atol=1e-12)
    assert (want - want.t()).abs().max() > 1e-2         # asymmetric: a transposed comb would not pass


def test_sinkhorn_iteration_count_and_eps():
    logits = torch.tensor([[3.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5], [-2.0, 1.0, 4.0, 0.0], [1.0, 2.0, 3.0, 4.0]],
                          dtype=torch.float64)
    from dsv4_portable.reference.mhc import sinkhorn
    c = logits.softmax(-1) + 1e-6
    c = c / (c.sum(0, keepdim=True) + 1e-6)
    for _ in range(2):
        c = c / (c.sum(1, keepdim=True) + 1e-6)
        c = c / (c.sum(0, keepdim=True) + 1e-6)
    torch.testing.assert_close(sinkhorn(logits, 3, 1e-6), c, rtol=0, atol=0)


def test_hc_post_applies_comb_transposed():
    o = torch.zeros(1, 1, 2)
    h = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [0.0, 100.0]]]])   # 4 streams, D=2
    post = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    comb = torch.zeros(1, 1, 4, 4)
    comb[0, 0, 0, 3] = 1.0     # stream 0 feeds output stream 3 (sum over the FIRST index)
    comb[0, 0, 2, 1] = 0.5     # stream 2 feeds output stream 1 with weight 0.5
    out = ops.hc_post(o + torch.tensor([1.0, 1.0]), h, post, comb)
    want = torch.tensor([[1.0, 1.0], [2.0 + 5.0, 2.0], [3.0, 3.0], [4.0 + 1.0, 4.0]])
    torch.testing.assert_close(out[0, 0], want)


def test_hc_head_pre_weights():
    g = G(1)
    h = torch.randn(1, 2, 4, 16, generator=g, dtype=torch.float64)
    fn = torch.randn(4, 64, generator=g, dtype=torch.float64)
    scale, base = torch.tensor([0.3], dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    y = ops.hc_head(h, fn, scale, base)
    flat = h[0, 1].reshape(-1)
    pre = torch.sigmoid((fn @ flat) / torch.sqrt((flat ** 2).mean() + 1e-6) * 0.3 + base) + 1e-6
    torch.testing.assert_close(y[0, 1], (pre.unsqueeze(-1) * h[0, 1]).sum(0))


def test_hc_fn_shape_error_is_named():
    with pytest.raises(OpInputError, match="'fn' has shape"):
        ops.hc_pre(torch.randn(1, 1, 4, 8), torch.randn(24, 31), torch.rand(3), torch.randn(24))


# ----------------------------------------------------------------------------------------------- norm, rope, hadamard
def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16)
    y = rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    r = (12.5) ** -0.5
    assert y.dtype == torch.bfloat16 and y.float().tolist() == [[pytest.approx(3 * r, rel=4e-3),
                                                               pytest.approx(8 * r, rel=4e-3)]]


def test_rope_interleaved_pairs_and_inverse():
    inv = rope_inv_freq(4, 10000.0)
    assert inv.tolist() == [1.0, pytest.approx(0.01, rel=1e-6)]
    cos, sin = rope_cos_sin(torch.tensor([[3]]), inv)
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 6)          # dims 0,1 pass; pairs (2,3) and (4,5) rotate
    y = rope(x, cos, sin)
    c0, s0, c1, s1 = torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0)), torch.cos(torch.tensor(.03)), \
        torch.sin(torch.tensor(.03))
    want = [0, 1, 2 * c0 - 3 * s0, 2 * s0 + 3 * c0, 4 * c1 - 5 * s1, 4 * s1 + 5 * c1]
    torch.testing.assert_close(y[0, 0], torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope(y, cos, sin, inverse=True), x, rtol=1e-6, atol=1e-6)


def test_yarn_frequencies_by_formula():
    import math
    inv = rope_inv_freq(64, 160000.0, __import__("dsv4_portable").reference.Yarn(65536, 16, 32, 1))
    base = 1.0 / 160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    dim = lambda rot: 64 * math.log(65536 / (rot * 2 * math.pi)) / (2 * math.log(160000.0))  # noqa: E731
    low, high = max(math.floor(dim(32)), 0), min(math.ceil(dim(1)), 63)
    ramp = ((torch.arange(32, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    want = base / 16 * ramp + base * (1 - ramp)
    torch.testing.assert_close(inv.double(), want, rtol=1e-6, atol=0)
    assert inv[0] == pytest.approx(1.0) and inv[-1] == pytest.approx(base[-1].item() / 16, rel=1e-5)


def test_hadamard_is_orthonormal_sylvester():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h8 = torch.kron(torch.kron(h2, h2), h2) / 8 ** 0.5
    x = torch.randn(3, 8, dtype=torch.float64, generator=G(2))
    torch.testing.assert_close(hadamard(x), x @ h8)
    torch.testing.assert_close(hadamard(hadamard(x)), x)


# ----------------------------------------------------------------------------------------------- MoE
def test_route_hash_vs_score():
    g = G(3)
    x, wgt = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    bias = torch.zeros(8)
    bias[7] = 100.0                                      # selection bias forces expert 7 into every top-k
    w, idx = ops.moe_route(x, wgt, bias, None, None, 2, "sqrtsoftplus", 1.5)
    s = F.softplus(x.double() @ wgt.double().t()).sqrt()
    assert torch.all(idx[:, 0] == 7)
    second = s.clone()
    second[:, 7] = -1
    assert torch.equal(idx[:, 1], second.argmax(-1))
    raw = s.gather(1, idx)                               # weights use the UNBIASED scores
    torch.testing.assert_close(w.double(), raw / raw.sum(-1, keepdim=True) * 1.5, rtol=1e-6, atol=1e-7)
    tid2eid = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
    ids = torch.tensor([3, 0, 2, 2, 1])
    w2, idx2 = ops.moe_route(x, wgt, None, tid2eid, ids, 2, "sqrtsoftplus", 1.5)
    assert idx2.tolist() == [[6, 7], [0, 1], [4, 5], [4, 5], [2, 3]]
    raw2 = s.gather(1, idx2)
    torch.testing.assert_close(w2.double(), raw2 / raw2.sum(-1, keepdim=True) * 1.5, rtol=1e-6, atol=1e-7)
    with pytest.raises(OpInputError, match="hash-routed layer"):
        ops.moe_route(x, wgt, None, tid2eid, None, 2)
    with pytest.raises(OpInputError, match=r"'input_ids' must be in \[0, 4\).*got values in \[0, 4\]"):
        ops.moe_route(x, wgt, None, tid2eid, torch.tensor([3, 0, 4, 2, 1]), 2)
    with pytest.raises(OpInputError, match=r"'input_ids' must be in \[0, 4\).*\[-1, 3\]"):
        ops.moe_route(x, wgt, None, tid2eid, torch.tensor([3, 0, -1, 2, 1]), 2)
    bad = tid2eid.clone()
    bad[1, 1] = 8
    with pytest.raises(OpInputError, match=r"'tid2eid' maps these tokens to experts in \[0, 8\]; expert ids must "
                                           r"be in \[0, 8\)"):
        ops.moe_route(x, wgt, None, bad, ids, 2)


def test_route_softmax_is_not_renormalised():
    x, wgt = torch.randn(3, 8, generator=G(4)), torch.randn(6, 8, generator=G(5))
    w, idx = ops.moe_route(x, wgt, None, None, None, 2, "softmax", 2.0)
    p = (x.double() @ wgt.double().t()).softmax(-1)
    torch.testing.assert_close(w.double(), p.gather(1, idx) * 2.0, rtol=1e-6, atol=1e-7)


def bf16_experts(e, d, i, seed, scale=1.0):
    g = G(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    return ExpertWeights("bf16", mk(e, i, d), mk(e, d, i), mk(e, i, d))


def expert_by_hand(x, ew, e, weight, limit):
    f = lambda a, w: (a.float() @ w.float().t()).to(torch.bfloat16).float()  # noqa: E731
    g, u = f(x, ew.w1[e]), f(x, ew.w3[e])
    if limit:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    h = g * torch.sigmoid(g) * u
    if weight is not None:
        h = weight.unsqueeze(-1) * h
    return f(h.to(torch.bfloat16), ew.w2[e])


def test_experts_clamp_asymmetry_weight_before_w2_and_ordered_combine():
    t, d, i, e, k = 6, 128, 128, 4, 2
    x = (torch.randn(t, d, generator=G(6)) * 3).to(torch.bfloat16)
    ew = bf16_experts(e, d, i, 7, scale=0.5)          # gate/up pre-activations well beyond +-10
    sh = bf16_experts(1, d, i, 8, scale=0.5)
    idx = torch.tensor([[0, 1], [1, -1], [3, 0], [0, 3], [1, 1], [-1, -1]])
    w = torch.rand(t, k, generator=G(9))
    out = ops.moe_experts(x, idx, w, ew, sh, 10.0)
    pre = (x.float() @ ew.w1[0].float().t())
    assert pre.max() > 10 and pre.min() < -10             # the clamp really acts on both sides
    for r in range(t):
        acc = expert_by_hand(x[r:r + 1], sh, 0, None, 10.0).double()
        for j in range(k):
            if idx[r, j] >= 0:
                acc += expert_by_hand(x[r:r + 1], ew, int(idx[r, j]), w[r, j:j + 1], 10.0).double()
        torch.testing.assert_close(out[r].float(), acc[0].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    # no clamp gives a different answer, so the clamp is not a no-op here
    assert not torch.equal(ops.moe_experts(x, idx, w, ew, sh, 0.0), out)
    # the shared expert is clamped too: with an all -1 routing the output is the clamped shared expert
    only_shared = ops.moe_experts(x, torch.full((t, k), -1), w, ew, sh, 10.0)
    torch.testing.assert_close(only_shared.float(), expert_by_hand(x, sh, 0, None, 10.0), rtol=1e-2, atol=1e-2)


def test_experts_quantised_formats_agree_with_dequantised_bf16():
    t, d, i, e = 5, 128, 128, 3
    x = torch.randn(t, d, generator=G(10)).to(torch.bfloat16)
    idx = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 2], [0, 1]])
    w = torch.rand(t, 2, generator=G(11))
    g = G(12)
    codes = {n: torch.randint(0, 16, s, generator=g, dtype=torch.uint8)
             for n, s in (("w1", (e, i, d)), ("w3", (e, i, d)), ("w2", (e, d, i)))}
    sc = {n: 2.0 ** torch.randint(-6, -3, (e, c.shape[1], c.shape[2] // 32), generator=g).float()
          for n, c in codes.items()}
    fp4 = ExpertWeights("fp4", pack_fp4(codes["w1"]), pack_fp4(codes["w2"]), pack_fp4(codes["w3"]),
                        sc["w1"], sc["w2"], sc["w3"])
    from dsv4_portable.reference.quant import fp4_decode
    deq = {n: (fp4_decode(c) * sc[n].repeat_interleave(32, -1)) for n, c in codes.items()}
    out_fp4 = ops.moe_experts(x, idx, w, fp4)

    def act_q(a):  # FP8 activation quantisation in blocks of 128, dequantised (exact)
        q, s = quant_fp8(a, 128)
        return q.float() * s.repeat_interleave(128, -1)

    def expert(row, e, wt):  # by hand: quantised activations, dequantised FP4 weights, float64 products
        g = (act_q(row).double() @ deq["w1"][e].double().t()).to(torch.bfloat16).double()
        u = (act_q(row).double() @ deq["w3"][e].double().t()).to(torch.bfloat16).double()
        h = (wt * torch.nn.functional.silu(g) * u).to(torch.bfloat16)
        return (act_q(h).double() @ deq["w2"][e].double().t()).to(torch.bfloat16).double()

    for r in range(t):
        want = sum(expert(x[r], int(idx[r, j]), w[r, j].double()) for j in range(2)).to(torch.bfloat16)
        torch.testing.assert_close(out_fp4[r].float(), want.float(), rtol=2e-2, atol=2e-2)
    fp8w = {n: v.to(torch.float8_e4m3fn) for n, v in (("w1", deq["w1"] * 64), ("w2", deq["w2"] * 64),
                                                      ("w3", deq["w3"] * 64))}
    s8 = {n: torch.full((e, -(-v.shape[1] // 128), -(-v.shape[2] // 128)), 1 / 64) for n, v in fp8w.items()}
    fp8 = ExpertWeights("fp8", fp8w["w1"], fp8w["w2"], fp8w["w3"], s8["w1"], s8["w2"], s8["w3"])
    assert torch.equal(ops.moe_experts(x, idx, w, fp8), out_fp4)   # same values, same activation quantisation


def test_experts_batch_invariant_and_bad_input():
    t, d, i, e = 40, 128, 128, 4
    x = torch.randn(t, d, generator=G(13)).to(torch.bfloat16)
    ew = bf16_experts(e, d, i, 14)
    idx = torch.randint(0, e, (t, 2), generator=G(15))
    w = torch.rand(t, 2, generator=G(16))
    full = ops.moe_experts(x, idx, w, ew)
    for rows in ([0], [3, 17, 39], list(range(11, 29))):
        assert torch.equal(ops.moe_experts(x[rows], idx[rows], w[rows], ew), full[rows])
    bad = ExpertWeights("bf16", ew.w1, ew.w2[:, :64], ew.w3)
    with pytest.raises(OpInputError, match="'w2' has shape"):
        ops.moe_experts(x, idx, w, bad)
    with pytest.raises(OpInputError, match="ExpertWeights"):
        ops.moe_experts(x, idx, w, {"w1": ew.w1})
    # a partial stack (keep_expert) holds experts 2, 3 at positions 0, 1: idx's global ids would pick the wrong ones
    part = ExpertWeights("bf16", ew.w1[2:], ew.w2[2:], ew.w3[2:], ids=(2, 3))
    with pytest.raises(OpInputError, match=r"'experts' is a partial stack \(experts \[2, 3\]\) indexed by global "
                                           r"ids; route it through expert parallelism"):
        ops.moe_experts(x, idx, w, part)
    local = part.select(torch.tensor([2, 3]))              # positions 0..1 again (ids None): what EP passes
    rows = (idx >= 2).all(-1)
    assert torch.equal(ops.moe_experts(x[rows], idx[rows] - 2, w[rows], local), full[rows])
