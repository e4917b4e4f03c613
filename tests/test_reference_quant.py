"""Reference quantisers against hand-derived values (DESIGN.md 2.1)."""
import pytest
import torch

from dsv4_portable import ops
from dsv4_portable.reference import quant as Q

E4M3 = torch.float8_e4m3fn


def block(values, n=128, fill=0.0):
    """One row with the given leading values, padded to a block of n."""
    row = torch.full((n,), fill)
    row[: len(values)] = torch.tensor(values)
    return row.unsqueeze(0)


@pytest.mark.parametrize("amax, scale", [
    (448.0, 1.0),            # exact power of two times 448 stays
    (448.0 * 2**-5, 2**-5),
    (449.0, 2.0),            # just above rounds up
    (447.0, 1.0),            # below: ceil(log2(447/448)) = 0
    (1.0, 2**-8),            # 1/448 = 2^-8.8 -> 2^-8
    (3e-5, 2**-22),          # below the 1e-4 floor: 1e-4/448 = 2^-22.09 -> 2^-22
])
def test_fp8_scale_is_ceil_pow2(amax, scale):
    q, s = ops.quant_fp8(block([amax, -amax / 2]), 128)
    assert s.item() == scale
    assert q.float()[0, 0].item() == pytest.approx(min(amax / scale, 448), rel=2**-3)


def test_fp8_clamp_and_rne():
    # amax 448 -> scale 1. e4m3 steps are 32 in [256, 512): 300 -> 288 (nearest); 304 is the midpoint of
    # 288 (mantissa 001, odd) and 320 (mantissa 010, even) -> 320 by round-to-nearest-even; steps are 2^-4 in
    # [0.5, 1): -0.7 -> -0.6875; 1e-6 is below half the smallest subnormal 2^-9 -> 0.
    q, s = ops.quant_fp8(block([448.0, 300.0, 304.0, -0.7, 1e-6]), 128)
    assert s.item() == 1.0
    assert q.float()[0, :5].tolist() == [448.0, 288.0, 320.0, -0.6875, 0.0]
    # with plain (non-pow2) scales x/s can land a hair above 448; the clamp keeps it finite at 448
    q, s = ops.quant_fp8(block([448.0 * 1.0001]), 128, None)
    assert q.float().abs().max().item() == 448.0


def test_fp8_all_zero_block_uses_floor():
    q, s = ops.quant_fp8(torch.zeros(2, 64), 64)
    assert torch.equal(q.float(), torch.zeros(2, 64))
    assert torch.all(s == 2.0 ** -22)


def test_fp8_roundtrip_is_exact_e4m3_times_pow2():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 448, generator=g) * torch.logspace(-3, 3, 7).repeat_interleave(64)).to(torch.bfloat16)
    y = ops.fp8_roundtrip(x, 64)
    assert y.dtype == torch.bfloat16
    blocks = y.float().view(3, 7, 64)
    amax = x.float().view(3, 7, 64).abs().amax(-1)
    s = 2.0 ** torch.ceil(torch.log2(amax.clamp_min(1e-4) / 448))
    scaled = blocks / s.unsqueeze(-1)
    assert torch.equal(scaled.to(E4M3).float(), scaled)  # every value is e4m3 * 2^k with the block's own k
    assert not torch.equal(y, x)  # it really rounds
    # and the error is within half an e4m3 ulp of the value (3 mantissa bits)
    err = (y.float() - x.float()).abs()
    assert torch.all(err <= x.float().abs() * 2**-4 + s.repeat_interleave(64, -1) * 2**-10)


@pytest.mark.parametrize("v, code", [
    (0.0, 0), (0.25, 0), (0.26, 1), (0.5, 1), (0.75, 2), (1.25, 2), (1.26, 3), (1.75, 4), (2.5, 4),
    (2.6, 5), (3.5, 6), (5.0, 6), (5.01, 7), (6.0, 7), (-0.5, 9), (-6.0, 15), (-0.1, 8),
])
def test_fp4_encode_round_to_nearest_even(v, code):
    assert Q.fp4_encode(torch.tensor([v])).item() == code


def test_fp4_nibble_order_and_values():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = Q.pack_fp4(codes)
    assert packed.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]  # element 2i in the low nibble
    assert torch.equal(Q.unpack_fp4(packed.view(torch.int8)), codes)
    assert Q.fp4_decode(codes).tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]


def test_fp4_quant_scale_and_clamp():
    x = block([6.0, 3.0, -1.0, 0.3], n=32)
    packed, s = ops.quant_fp4(x, 32)
    assert s.item() == 1.0                        # 6/6 = 1 exactly stays
    assert Q.fp4_decode(Q.unpack_fp4(packed))[0, :4].tolist() == [6.0, 3.0, -1.0, 0.5]
    x = block([7.0], n=32)                        # 7/6 -> scale 2, 7/2 = 3.5 -> RNE to 4
    packed, s = ops.quant_fp4(x, 32)
    assert s.item() == 2.0 and Q.dequant_fp4(packed, s)[0, 0].item() == 8.0
    packed, s = ops.quant_fp4(torch.zeros(1, 32), 32)  # floor 6*2^-126 -> scale 2^-126
    assert s.item() == 2.0 ** -126


def test_fp4_roundtrip_values_on_grid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 128, generator=g, dtype=torch.float32) * 3
    y = ops.fp4_roundtrip(x, 32)
    s = 2.0 ** torch.ceil(torch.log2(x.view(4, 4, 32).abs().amax(-1) / 6))
    grid = torch.tensor(Q.FP4_VALUES)
    v = (y.view(4, 4, 32) / s.unsqueeze(-1)).abs()
    assert torch.all((v.unsqueeze(-1) == grid).any(-1))


def test_e8m0_round_trip():
    s = torch.tensor([2.0 ** -126, 2.0 ** -3, 1.0, 2.0 ** 10, 2.0 ** 127])
    e = Q.float_to_e8m0(s)
    assert e.dtype == torch.float8_e8m0fnu
    assert torch.equal(Q.e8m0_to_float(e), s)
    assert torch.equal(Q.e8m0_to_float(e.view(torch.uint8)), s)
    with pytest.raises(ValueError):
        Q.float_to_e8m0(torch.tensor([3.0]))


def test_dequant_fp8_weight_blocks():
    w = torch.full((130, 260), 2.0).to(E4M3)
    s = torch.tensor([[1.0, 0.5, 4.0], [2.0 ** -3, 8.0, 1.0]])   # ceil(130/128)=2, ceil(260/128)=3
    d = Q.dequant_fp8_weight(w, s)
    assert d[0, 0] == 2.0 and d[0, 128] == 1.0 and d[0, 259] == 8.0 and d[129, 0] == 0.25 and d[129, 200] == 16.0
    with pytest.raises(ValueError, match="block scales of shape"):
        Q.dequant_fp8_weight(w, s[:, :2])


def test_dequant_fp4_weight_by_hand():
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 1], codes[1, 33] = 7, 9, 3      # 6, -0.5 ; 1.5 in the second 32-block of row 1
    w = Q.pack_fp4(codes).view(torch.int8)
    s = torch.tensor([[2.0, 1.0], [1.0, 0.25]])
    d = Q.dequant_fp4_weight(w, s)
    assert d[0, 0] == 12.0 and d[0, 1] == -1.0 and d[1, 33] == 0.375 and d.abs().sum() == 13.375


def test_fp4_to_fp8_conversion_is_lossless():
    g = torch.Generator().manual_seed(2)
    n, k = 256, 384
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    exps = torch.randint(-12, 3, (n, k // 32), generator=g)
    scale = Q.float_to_e8m0(2.0 ** exps.float())
    w = Q.pack_fp4(codes).view(torch.int8)
    q, s = Q.fp4_to_fp8_weight(w, scale)
    assert q.dtype == E4M3 and s.shape == (2, 3)
    assert torch.equal(Q.dequant_fp8_weight(q, s), Q.dequant_fp4_weight(w, scale))


def test_fp4_to_fp8_refuses_lossy_blocks():
    codes = torch.ones(128, 128, dtype=torch.uint8)        # all 0.5
    exps = torch.zeros(128, 4)
    exps[0, 0] = -20                                       # one sub-block 2^20 below the rest
    w = Q.pack_fp4(codes).view(torch.int8)
    with pytest.raises(ValueError, match="lose precision"):
        Q.fp4_to_fp8_weight(w, 2.0 ** exps)


def test_fp8_linear_equals_hand_dequantised_product():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    wf = torch.randn(200, 256, generator=g)
    wq = (wf * 64).clamp(-448, 448).to(E4M3)                         # fp8 codes; 128x128 block scales below
    s2 = torch.tensor([[2.0 ** -6, 2.0 ** -5], [2.0 ** -4, 2.0 ** -7]])
    y = ops.fp8_linear(x, wq, s2)
    xq, xs = Q.quant_fp8(x, 128)
    xd = xq.float() * xs.repeat_interleave(128, -1)
    wd = wq.float() * s2.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)
    want = (xd.double() @ wd.double().t()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=8e-3, atol=1e-3)


def test_fp4_linear_equals_hand_dequantised_product():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 128, generator=g)
    codes = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.uint8)
    scale = 2.0 ** torch.randint(-4, 2, (64, 4), generator=g).float()
    w = Q.pack_fp4(codes).view(torch.int8)
    y = ops.fp4_linear(x, w, scale)
    xq, xs = Q.quant_fp8(x, 128)
    wd = Q.fp4_decode(codes) * scale.repeat_interleave(32, 1)
    want = (xq.double() * xs.double().repeat_interleave(128, -1)) @ wd.double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


def test_linear_is_batch_invariant():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(97, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    full = Q.linear_f32(x, w)
    for rows in ([0], [5, 6, 7], list(range(40, 97)), [96, 3, 50]):
        assert torch.equal(Q.linear_f32(x[rows], w), full[rows])


def test_int8_rows_by_hand_and_w8a8_product():
    from dsv4_portable.reference.quant import int8_linear, quant_int8_rows
    q, s = quant_int8_rows(torch.tensor([[127.0, -63.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]]))
    assert s[0].item() == 1.0 and q[0].tolist() == [127, -64, 0, 2]        # round half to even
    assert q[1].tolist() == [0, 0, 0, 0] and s[1].item() > 0               # all-zero row: floored scale, no NaN
    x = torch.tensor([[254.0, -127.0, 2.0, 0.0]])                            # s_x = 2, q_x = [127, -64, 1, 0]
    w = torch.tensor([[1, 2, 3, 4], [-1, 0, 0, 127]], dtype=torch.int8)
    ws = torch.tensor([0.5, 0.25])
    want = torch.tensor([[(127 - 128 + 3) * 2 * 0.5, (-127) * 2 * 0.25]])
    assert torch.equal(int8_linear(x, w, ws), want)
