"""The compressor against a direct loop over windows (DESIGN.md 2.4)."""
import pytest
import torch

from dsv4_portable import OpInputError, ops
from dsv4_portable.reference import compression as C
from dsv4_portable.reference import quant as Q
from dsv4_portable.reference.rotary import Yarn, rope_cos_sin, rope_inv_freq


def loop_pool(kv, score, ratio, overlap, n):
    """Entry i, feature j, written out one scalar softmax at a time (float64)."""
    b, _, c = kv.shape
    d = c // 2 if overlap else c
    out = torch.zeros(b, n, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            for j in range(d):
                vals, scs = [], []
                if overlap:
                    for t in range((i - 1) * ratio, i * ratio):   # previous window, first-half features
                        if t >= 0:
                            vals.append(kv[bi, t, j].item())
                            scs.append(score[bi, t, j].item())
                    cols = range(i * ratio, (i + 1) * ratio), d + j
                else:
                    cols = range(i * ratio, (i + 1) * ratio), j
                for t in cols[0]:
                    vals.append(kv[bi, t, cols[1]].item())
                    scs.append(score[bi, t, cols[1]].item())
                w = torch.tensor(scs, dtype=torch.float64).softmax(0)
                out[bi, i, j] = (w * torch.tensor(vals, dtype=torch.float64)).sum()
    return out


@pytest.mark.parametrize("ratio, overlap", [(4, True), (8, False), (3, False)])
def test_pool_matches_loop(ratio, overlap):
    g = torch.Generator().manual_seed(ratio)
    b, n, d = 2, 3, 5
    c = 2 * d if overlap else d
    kv = torch.randn(b, n * ratio, c, generator=g, dtype=torch.float64)
    score = torch.randn(b, n * ratio, c, generator=g, dtype=torch.float64) * 3
    if overlap:  # the op takes the previous window explicitly: kv 0 / score -inf before entry 0
        pk = torch.cat([torch.zeros(b, ratio, c, dtype=torch.float64), kv], 1)
        ps = torch.cat([torch.full((b, ratio, c), float("-inf"), dtype=torch.float64), score], 1)
        got = C.compress_pool(pk, ps, ratio, True)
    else:
        got = C.compress_pool(kv, score, ratio, False)
    torch.testing.assert_close(got, loop_pool(kv, score, ratio, overlap, n), rtol=1e-12, atol=1e-12)


def make_layer(ratio, seed, dim=32, d=128, rd=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    coff = 2 if ratio == 4 else 1
    w = dict(wkv=torch.randn(coff * d, dim, generator=g) / dim ** 0.5,
             wgate=torch.randn(coff * d, dim, generator=g) / dim ** 0.5,
             ape=torch.randn(ratio, coff * d, generator=g), norm_weight=torch.rand(d, generator=g) + 0.5)
    w = {k: v.to(dtype) for k, v in w.items()}
    cos, sin = rope_cos_sin(torch.arange(1024), rope_inv_freq(rd, 160000.0, Yarn()))
    state = (torch.zeros(1, coff * ratio, coff * d, dtype=dtype if dtype == torch.float64 else torch.float32),
             torch.full((1, coff * ratio, coff * d), float("-inf"),
                        dtype=dtype if dtype == torch.float64 else torch.float32))
    return w, cos, sin, state


def sylvester(d):
    """The Hadamard matrix by Sylvester's construction, H_2n = [[H, H], [H, -H]], scaled to be orthonormal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # e2m1 magnitudes, code = index (its low bit = mantissa)


def fp4_roundtrip_by_hand(x, block=32):
    """DESIGN.md 2.1 written out per value in Python floats: per block of 32, s = 2^ceil(log2(max(amax, 6*2^-126)
    / 6)); each x/s (clamped to +-6) goes to the nearest e2m1 magnitude, a tie to the even code; sign kept.
    The input is first rounded to float32, as the activation quantisers see it."""
    import math
    flat = x.float().double().reshape(-1, block).tolist()
    out = []
    for row in flat:
        amax = max(max(abs(v) for v in row), 6 * 2.0 ** -126)
        m, e = math.frexp(amax / 6)                    # amax/6 = m * 2^e, m in [0.5, 1)
        s = 2.0 ** (e - 1 if m == 0.5 else e)          # an exact power of two stays
        q = []
        for v in row:
            y = min(abs(v) / s, 6.0)
            dist = [abs(y - g) for g in FP4_GRID]
            best = min(dist)
            code = min((i for i, dd in enumerate(dist) if dd == best), key=lambda i: (i % 2, i))
            q.append(math.copysign(FP4_GRID[code] * s, v))
        out.append(q)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def direct_entries(x, w, cos, sin, ratio, quant, rotate):
    """Independent prefill-from-0 computation in float64: project, add ape, loop-pool, norm, rope, then the QAT
    round trip: FP8 of the non-rope dims, or for indexer keys the Sylvester Hadamard and FP4 by hand."""
    xf = x.double()
    kv = xf @ w["wkv"].double().t()
    sc = xf @ w["wgate"].double().t() + w["ape"].double()[torch.arange(x.shape[1]) % ratio]
    n = x.shape[1] // ratio
    pooled = loop_pool(kv, sc, ratio, ratio == 4, n)
    var = pooled.square().mean(-1, keepdim=True)
    out = pooled * torch.rsqrt(var + 1e-6) * w["norm_weight"].double()
    half = cos.shape[-1]
    for i in range(n):
        c, s_ = cos[i * ratio].double(), sin[i * ratio].double()
        a, b = out[0, i, -2 * half::2].clone(), out[0, i, -2 * half + 1::2].clone()
        out[0, i, -2 * half::2], out[0, i, -2 * half + 1::2] = a * c - b * s_, a * s_ + b * c
    if quant and rotate:
        out = fp4_roundtrip_by_hand(out @ sylvester(out.shape[-1]))
    elif quant:
        out = torch.cat([Q.fp8_roundtrip(out[..., :-64], 64), out[..., -64:]], -1)
    return out


def test_by_hand_helpers_are_right():
    h = sylvester(4) * 2
    assert h.tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    torch.testing.assert_close(sylvester(128) @ sylvester(128).t(), torch.eye(128, dtype=torch.float64))
    # block scale 1 (amax 6): 0.25 ties -> 0 (even), 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0] + [0.0] * 24)
    assert fp4_roundtrip_by_hand(row).tolist()[:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]
    assert fp4_roundtrip_by_hand(row * 2 ** -20).tolist()[:8] == [v * 2 ** -20 for v in [0, 1, 1, 2, 2, 4, 4, -6]]


@pytest.mark.parametrize("ratio, rotate", [(4, False), (4, True), (8, False), (128, False), (128, True)])
@pytest.mark.parametrize("quant", [False, True])
def test_prefill_matches_direct_computation(ratio, rotate, quant):
    """The op against direct_entries, both in float64: they agree to ~1e-15, so no FP8/FP4 rounding can flip
    (a value would have to lie within ~1e-15 of a rounding midpoint) and the quantised entries must be equal."""
    w, cos, sin, (ks, ss) = make_layer(ratio, 1, dtype=torch.float64)
    x = torch.randn(1, 3 * ratio + 1, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = ops.compressor(x, w["wkv"], w["wgate"], w["ape"], w["norm_weight"], cos, sin, ks, ss, 0, ratio,
                         rotate, quant)
    want = direct_entries(x, w, cos, sin, ratio, quant, rotate)
    assert got.shape == (1, 3, 128)
    q = slice(None) if rotate else slice(0, 64)          # the quantised dims (all of an indexer key)
    if quant:
        assert torch.equal(got[..., q], want[..., q]), (got - want)[..., q].abs().max()
        assert (got[..., q] != direct_entries(x, w, cos, sin, ratio, False, rotate)[..., q]).any()  # it rounded
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("rotate", [False, True])
def test_chunked_and_decode_equal_one_prefill(ratio, rotate):
    """Boundaries of DESIGN.md 5 case 3: lengths ratio-1, ratio, ratio+1, 2*ratio-1; chunk splits at
    non-multiples of ratio; token-by-token decode across a boundary."""
    w, cos, sin, state = make_layer(ratio, 2, d=128)
    total = 2 * ratio + 3
    x = torch.randn(1, total, 32, generator=torch.Generator().manual_seed(3))
    args = (w["wkv"], w["wgate"], w["ape"], w["norm_weight"], cos, sin)

    def run(splits):
        ks, ss = state[0].clone(), state[1].clone()
        outs, p = [], 0
        for n in splits:
            outs.append(ops.compressor(x[:, p:p + n], *args, ks, ss, p, ratio, rotate))
            p += n
        return torch.cat(outs, 1), ks, ss

    one, ks1, ss1 = run([total])
    assert one.shape[1] == total // ratio
    for splits in ([ratio - 1, 1, ratio + 1, ratio + 2], [ratio + 1, ratio - 2, 4], [2 * ratio - 1] + [1] * 4,
                   [1] * (ratio + 2) + [ratio + 1]):
        got, ks, ss = run(splits)
        assert torch.equal(got, one), splits
        assert torch.equal(ks, ks1) and torch.equal(ss, ss1)
    for length in (ratio - 1, ratio, ratio + 1, 2 * ratio - 1):
        got, _, _ = run([length])
        assert got.shape[1] == length // ratio and torch.equal(got, one[:, : length // ratio])


def test_entry_zero_of_overlap_ignores_missing_window():
    """With overlap, entry 0 pools only its own 4 rows (the 'previous window' is kv 0 / score -inf)."""
    w, cos, sin, (ks, ss) = make_layer(4, 3, d=128)
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(4))
    got = ops.compressor(x, w["wkv"], w["wgate"], w["ape"], w["norm_weight"], cos, sin, ks, ss, 0, 4, False,
                         False)
    kv = x[0] @ w["wkv"].t()
    sc = x[0] @ w["wgate"].t() + w["ape"]
    pooled = (kv[:, 128:] * sc[:, 128:].softmax(0)).sum(0)
    normed = pooled * torch.rsqrt(pooled.square().mean() + 1e-6) * w["norm_weight"]
    torch.testing.assert_close(got[0, 0, :64], normed[:64], rtol=1e-5, atol=1e-5)  # non-rope dims; pos 0 rope=id
    torch.testing.assert_close(got[0, 0, 64:], normed[64:], rtol=1e-5, atol=1e-5)


def test_bad_state_shape_is_named():
    w, cos, sin, (ks, ss) = make_layer(4, 5)
    x = torch.randn(1, 4, 32)
    with pytest.raises(OpInputError, match="state' has shape"):
        ops.compressor(x, w["wkv"], w["wgate"], w["ape"], w["norm_weight"], cos, sin, ks[:, :4], ss, 0, 4)
