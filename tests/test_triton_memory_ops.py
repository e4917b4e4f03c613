"""Triton providers of the memory-bound ops (quant_fp8, quant_fp4, fp8_roundtrip, fp4_roundtrip, rms_norm, rope,
hc_pre, hc_post, hc_head, compressor, moe_route) against the reference, through the registry
(`op.run("triton", ..., device_type="cuda")`).

Why a worker subprocess: on CPU the kernels run under the Triton interpreter, and TRITON_INTERPRET=1 must be set
before triton.jit decorates them (it is read at decoration time). Setting it in this pytest process would leak
into every later test module (and kernels already imported would stay compiled-mode), so all kernel checks run
in ONE worker process (this file run as a script) whose environment alone carries TRITON_INTERPRET=1; each
pytest test reports one named check of that worker. On a machine with a CUDA GPU the worker runs the same checks
on the GPU without the interpreter (references on CPU copies): that is the run a GPU session should do. A second
worker compiles every kernel launch at DeepSeek-V4 sizes for sm90 with Triton's offline compiler (no GPU needed).

What the interpreter exercises: indexing, masking, tiling, split-K partials, reductions, the online softmax, the
Sinkhorn loop, the in-place state update, and all the integer/bit arithmetic of the quantisers (exponent-bit
scales, RNE rounding to the e4m3 / e2m1 grids, nibble packing), in fp32 (the interpreter runs numpy).
The interpreter's own fp32 -> fp8 cast rounds ties away and flushes some subnormals, and its fp32 -> bf16 cast
truncates: the kernels round explicitly under INTERPRET (tl_helpers), so the GPU's hardware casts (cvt.rn) are
NOT exercised here, nor are TF32x3 tensor-core products, GPU FMA contraction or timing. The bit-exact checks
must be re-run on a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

HERE = os.path.abspath(__file__)
E4M3 = torch.float8_e4m3fn


# ====================================================================================== worker-side helpers
def _dev():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _on(v, dev):
    return v.to(dev) if isinstance(v, torch.Tensor) else v


def _run(op_name, *args):
    from dsv4_portable.registry import get_op
    out = get_op(op_name).run("triton", *[_on(a, _dev()) for a in args], device_type="cuda")
    return _on(out, "cpu") if isinstance(out, torch.Tensor) else tuple(_on(o, "cpu") for o in out)


def _ref(op_name, *args):
    from dsv4_portable.registry import get_op
    return get_op(op_name).run("reference", *[_on(a, "cpu") for a in args])


def _bits(t):
    """A tensor's raw bits (so -0.0 != 0.0 and NaN == NaN compare as stored)."""
    t = t.cpu().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_exact(out, ref, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, \
        f"{what}: {out.shape}/{out.dtype} vs {ref.shape}/{ref.dtype}"
    diff = (_bits(out) != _bits(ref))
    assert not diff.any(), (f"{what}: {int(diff.sum())} of {diff.numel()} elements differ in their bits, first at "
                            f"{diff.nonzero()[0].tolist()}: {out.flatten()[diff.flatten()][:4].tolist()} vs "
                            f"{ref.flatten()[diff.flatten()][:4].tolist()}")


def _assert_tol(op_name, out, ref, what):
    """The op's own tolerance for ref's dtype: |out - ref| <= atol + rtol*|ref| on all but max_mismatch of the
    elements, infinities where the reference has them, no NaN where it has none."""
    from dsv4_portable.registry import get_op
    tol = get_op(op_name).tolerance(ref.dtype)
    assert out.shape == ref.shape and out.dtype == ref.dtype, \
        f"{what}: {out.shape}/{out.dtype} vs {ref.shape}/{ref.dtype}"
    o, r = out.double(), ref.double()
    assert not (torch.isnan(o) & ~torch.isnan(r)).any(), f"{what}: NaN in the provider's output"
    fin = torch.isfinite(r)
    assert torch.equal(o[~fin].nan_to_num(), r[~fin].nan_to_num()), f"{what}: infinities differ"
    o, r = o[fin], r[fin]
    bad = ((o - r).abs() > tol.atol + tol.rtol * r.abs()).double().mean().item() if r.numel() else 0.0
    assert bad <= tol.max_mismatch, (f"{what}: {bad:.3%} of elements outside {tol.describe()}; "
                                     f"max |diff| {(o - r).abs().max().item():.3g}")


def _launch_log():
    """(log, recording): inside `with recording():` every launch is recorded (name, grid) and still run."""
    from dsv4_portable.backends.cuda import launch as L
    log = []

    def hook(kernel, grid, args, meta):
        log.append((kernel.__name__, tuple(grid)))
        return kernel[grid](*args, **meta)
    return log, lambda: L.intercept(hook)


def _e4m3_values():
    """The 127 non-negative finite e4m3 values, ascending."""
    return torch.arange(127, dtype=torch.uint8).view(E4M3).float()


def _tie_rows(grid_values, scale, n, g, dtype):
    """Rows of n values: grid points, exact midpoints (ties) and their float neighbours, times `scale`, with
    random signs, plus the anchor (max grid value * scale) first so that the block scale is `scale`."""
    mids = (grid_values[1:] + grid_values[:-1]) / 2
    pool = torch.cat([grid_values, mids, torch.nextafter(mids, torch.tensor(0.0)),
                      torch.nextafter(mids, torch.tensor(1e9))])
    pick = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    row = pick * sign * scale
    row[0] = grid_values[-1] * scale
    row[1] = -0.0
    return row.to(dtype)


# ====================================================================================== checks (worker)
def check_quant_fp8_bit_exact():
    """Ties at every e4m3 midpoint (subnormals included), -0, all-zero and tiny blocks (amax floor), exact
    powers of two, huge values; scale_fmt ue8m0 and None; block 128, 64 and a non-power-of-two 48; leading dims
    and a last-dim slice; ragged last tile."""
    g = _gen(1)
    vals = _e4m3_values()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        scales = (1.0, 2.0 ** -6, 2.0 ** 4) if dt != torch.float32 else (1.0, 2.0 ** -20, 2.0 ** 100)
        rows = [_tie_rows(vals, s, 128, g, dt) for s in scales]
        rows += [torch.zeros(128, dtype=dt), torch.full((128,), 3e-5).to(dt),               # floor
                 (torch.randn(128, generator=g) * 2.0 ** -4).to(dt)]
        x = torch.stack(rows)
        x[-1, 5] = 448.0 * 2.0 ** -4                                                         # exact pow2 amax
        for fmt in ("ue8m0", None):
            for block in (128, 64, 48 if dt != torch.float16 else 32):
                xb = x[:, : (128 // block) * block]
                q, s = _run("quant_fp8", xb, block, fmt)
                rq, rs = _ref("quant_fp8", xb, block, fmt)
                _assert_exact(q, rq, f"quant_fp8 q {dt} {fmt} block {block}")
                _assert_exact(s, rs, f"quant_fp8 scales {dt} {fmt} block {block}")
    # leading dims, a ragged number of blocks (not a multiple of a program's tile), a last-dim slice
    x = (torch.randn(3, 7, 40, 192, generator=g) * 50).to(torch.bfloat16)
    q, s = _run("quant_fp8", x, 64)
    _assert_exact(q, _ref("quant_fp8", x, 64)[0], "quant_fp8 4-d")
    kv = torch.randn(2, 5, 512, generator=g).to(torch.bfloat16)
    q, s = _run("quant_fp8", kv[..., :448], 64)
    rq, rs = _ref("quant_fp8", kv[..., :448], 64)
    _assert_exact(q, rq, "quant_fp8 on kv[..., :448]")
    _assert_exact(s, rs, "quant_fp8 scales on kv[..., :448]")
    # hand-derived (independent of the reference): amax 448 -> s = 1; 304 is the tie of 288 and 320 -> 320
    # (even mantissa); 17 is the tie of 16 and 18 -> 16; 3 * 2^-11 -> 2^-9 (nearest subnormal); -0 stays -0
    row = torch.zeros(1, 128)
    row[0, :6] = torch.tensor([448.0, 304.0, 17.0, 3 * 2.0 ** -11, 2.0 ** -10, -0.0])
    q, s = _run("quant_fp8", row, 128)
    assert s.item() == 1.0
    assert q.float()[0, :5].tolist() == [448.0, 320.0, 16.0, 2.0 ** -9, 0.0]
    assert _bits(q)[0, 5].item() == 0x80, "-0 must keep its sign bit"


def check_fp8_roundtrip_bit_exact_and_rounds():
    """DESIGN.md 5 case 2: the KV round trip really rounds, each 64-block is e4m3 x 2^k, rope dims untouched."""
    g = _gen(2)
    vals = _e4m3_values()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.stack([_tie_rows(vals, s, 192, g, dt) for s in (1.0, 2.0 ** -5)]
                        + [torch.zeros(192, dtype=dt), (torch.randn(192, generator=g) * 7).to(dt)])
        for fmt in ("ue8m0", None):
            for block in (64, 32):
                _assert_exact(_run("fp8_roundtrip", x, block, fmt), _ref("fp8_roundtrip", x, block, fmt),
                              f"fp8_roundtrip {dt} {fmt} block {block}")
    # the model's call: the 448 non-rope dims of a [B, S, 512] kv (a strided slice), block 64
    kv = (torch.randn(2, 3, 512, generator=g) * torch.logspace(-3, 3, 512)).to(torch.bfloat16)
    y = _run("fp8_roundtrip", kv[..., :448], 64)
    _assert_exact(y, _ref("fp8_roundtrip", kv[..., :448], 64), "fp8_roundtrip kv[..., :448]")
    assert not torch.equal(y, kv[..., :448]), "the round trip must actually round"
    blocks = y.float().view(2, 3, 7, 64)
    amax = kv[..., :448].float().view(2, 3, 7, 64).abs().amax(-1)
    s = 2.0 ** torch.ceil(torch.log2(amax.clamp_min(1e-4) / 448))
    scaled = blocks / s.unsqueeze(-1)
    assert torch.equal(scaled.to(E4M3).float(), scaled), "every value must be e4m3 x its block's 2^k"


def check_quant_fp4_bit_exact():
    """Ties at every e2m1 midpoint, -0 and small negatives (code 8), amax floor, blocks 32 / 16 / 6, slices."""
    g = _gen(3)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        rows = [_tie_rows(grid, s, 96, g, dt) for s in (1.0, 2.0 ** -3, 2.0 ** 5)]
        rows += [torch.zeros(96, dtype=dt), (torch.randn(96, generator=g) * 1e-3).to(dt)]
        x = torch.stack(rows)
        for block in (32, 16, 6):
            q, s = _run("quant_fp4", x, block)
            rq, rs = _ref("quant_fp4", x, block)
            _assert_exact(q, rq, f"quant_fp4 packed {dt} block {block}")
            _assert_exact(s, rs, f"quant_fp4 scales {dt} block {block}")
            _assert_exact(_run("fp4_roundtrip", x, block), _ref("fp4_roundtrip", x, block),
                          f"fp4_roundtrip {dt} block {block}")
    x = (torch.randn(4, 3, 256, generator=g) * 3).to(torch.bfloat16)[..., 64:192]      # a last-dim slice
    _assert_exact(_run("quant_fp4", x, 32)[0], _ref("quant_fp4", x, 32)[0], "quant_fp4 slice")
    _assert_exact(_run("fp4_roundtrip", x, 32), _ref("fp4_roundtrip", x, 32), "fp4_roundtrip slice")
    # hand-derived: amax 6 -> s = 1; ties 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2, 3.5 -> 4,
    # 5 -> 4 (ties to the even code); -0.1 -> code 8 (-0); codes packed low nibble first
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -6.0, 0.0, -3.0]
    row = torch.zeros(1, 32)
    row[0, : len(vals)] = torch.tensor(vals)
    q, s = _run("quant_fp4", row, 32)
    codes = torch.stack([q & 0xF, q >> 4], -1).flatten().tolist()
    assert s.item() == 1.0
    assert codes[: len(vals)] == [7, 0, 2, 2, 4, 4, 6, 6, 8, 15, 0, 13], codes[: len(vals)]


def check_rms_norm():
    g = _gen(4)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((3, 5, 64), (2, 3, 4, 100), (7, 1), (2, 3000)):
            x = (torch.randn(*shape, generator=g) * 3).to(dt)
            w = torch.rand(shape[-1], generator=g) + 0.5
            for weight in (w, w.to(dt), None):
                _assert_tol("rms_norm", _run("rms_norm", x, weight, 1e-6), _ref("rms_norm", x, weight, 1e-6),
                            f"rms_norm {dt} {shape} weight {None if weight is None else weight.dtype}")
    x = torch.randn(4, 6, 96, generator=g)[..., 16:80]                                  # strided rows
    _assert_tol("rms_norm", _run("rms_norm", x, None, 1e-5), _ref("rms_norm", x, None, 1e-5), "rms_norm slice")
    z = torch.zeros(2, 64)
    assert torch.equal(_run("rms_norm", z, None, 1e-6), z), "a zero row stays zero"


def check_rope():
    from dsv4_portable.reference import Yarn, rope_cos_sin, rope_inv_freq
    g = _gen(5)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for shape, rd, per_batch in (((2, 5, 64), 16, False), ((2, 3, 4, 96), 32, True), ((1, 2, 3, 8), 8, False),
                                     ((2, 4, 70, 100), 64, False)):
            x = (torch.randn(*shape, generator=g) * 3).to(dt)
            pos = torch.arange(shape[1]) + 1000 * torch.arange(shape[0]).unsqueeze(1) if per_batch else \
                torch.arange(shape[1]).unsqueeze(0) + 65530
            cos, sin = rope_cos_sin(pos, rope_inv_freq(rd, 160000.0, Yarn()))
            for inverse in (False, True):
                out = _run("rope", x, cos, sin, inverse)
                _assert_tol("rope", out, _ref("rope", x, cos, sin, inverse), f"rope {dt} {shape} inv={inverse}")
                assert torch.equal(out[..., : shape[-1] - rd], x[..., : shape[-1] - rd]), "non-rope dims changed"
    # a non-contiguous x (heads and tokens transposed) with a unit-stride last dim; inverse undoes the rotation
    x = torch.randn(2, 4, 3, 64, generator=g).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(3).unsqueeze(0), rope_inv_freq(64, 10000.0))
    out = _run("rope", x, cos, sin, False)
    _assert_tol("rope", out, _ref("rope", x, cos, sin, False), "rope strided x")
    back = _run("rope", out, cos, sin, True)
    assert (back - x).abs().max().item() < 1e-5, "inverse rope must undo rope"


def _hc_inputs(g, b, s, n, d, dt, rows):
    h = (torch.randn(b, s, n, d, generator=g) * 2).to(dt)
    fn = torch.randn(rows, n * d, generator=g) / (n * d) ** 0.5
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(rows, generator=g) * 0.5
    return h, fn, scale, base


def check_hc_pre_and_head():
    """Decode (T=1, split-K over many programs), several token blocks, 2 and 4 streams, iters 1 and 20."""
    g = _gen(6)
    log, recording = _launch_log()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for b, s, n, d in ((1, 1, 4, 64), (2, 3, 4, 40), (1, 20, 4, 32), (2, 2, 2, 48)):
            h, fn, scale, base = _hc_inputs(g, b, s, n, d, dt, (2 + n) * n)
            for iters in (20, 1):
                with recording():
                    out = _run("hc_pre", h, fn, scale, base, 1e-6, 1e-6, iters)
                ref = _ref("hc_pre", h, fn, scale, base, 1e-6, 1e-6, iters)
                for o, r, name in zip(out, ref, ("y", "post", "comb")):
                    _assert_tol("hc_pre", o, r, f"hc_pre {name} {dt} {(b, s, n, d)} iters {iters}")
            fnh = torch.randn(n, n * d, generator=g) / (n * d) ** 0.5
            _assert_tol("hc_head", _run("hc_head", h, fnh, scale[:1], base[:n]),
                        _ref("hc_head", h, fnh, scale[:1], base[:n]), f"hc_head {dt} {(b, s, n, d)}")
    splits = [grid[1] for name, grid in log if name == "hc_mix_kernel"]
    assert max(splits) > 1 and min(splits) >= 1, f"the split-K path did not run: {splits}"
    # the comb really is doubly stochastic after 20 rounds (independent of the reference)
    h, fn, scale, base = _hc_inputs(g, 1, 4, 4, 32, torch.float32, 24)
    _, _, comb = _run("hc_pre", h, fn, scale, base)
    assert (comb.sum(-1) - 1).abs().max() < 1e-3 and (comb.sum(-2) - 1).abs().max() < 1e-3


def check_hc_post_orientation():
    """DESIGN.md 5 case 5: asymmetric comb. A permutation comb gives hand-derived outputs: comb[j, k] = 1 for
    k = perm[j] makes out_k = post_k * o + h_j with perm[j] = k (the sum runs over comb's FIRST index)."""
    g = _gen(7)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for b, s, n, d in ((1, 1, 4, 64), (2, 3, 4, 1100), (1, 5, 2, 30)):
            o = torch.randn(b, s, d, generator=g).to(dt)
            h = torch.randn(b, s, n, d, generator=g).to(dt)
            post = torch.rand(b, s, n, generator=g) * 2
            comb = torch.rand(b, s, n, n, generator=g)
            _assert_tol("hc_post", _run("hc_post", o, h, post, comb), _ref("hc_post", o, h, post, comb),
                        f"hc_post {dt} {(b, s, n, d)}")
    o, h = torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, 4, 16, generator=g)
    perm = [2, 0, 3, 1]
    comb = torch.zeros(1, 2, 4, 4)
    for j, k in enumerate(perm):
        comb[..., j, k] = 1.0
    post = torch.tensor([0.5, 1.0, 2.0, 4.0]).expand(1, 2, 4).contiguous()
    out = _run("hc_post", o, h, post, comb)
    for j, k in enumerate(perm):
        assert torch.equal(out[:, :, k], post[:, :, k, None] * o + h[:, :, j]), f"stream {k} must take h_{j}"


def _compressor_weights(g, ratio, d, rd, dim, dt=torch.float32):
    from dsv4_portable.reference import Yarn, rope_cos_sin, rope_inv_freq
    coff = 2 if ratio == 4 else 1
    wkv = (torch.randn(coff * d, dim, generator=g) / dim ** 0.5).to(dt)
    wgate = (torch.randn(coff * d, dim, generator=g) / dim ** 0.5).to(dt)
    ape = torch.randn(ratio, coff * d, generator=g) * 0.5
    norm_w = torch.rand(d, generator=g) + 0.5
    cos, sin = rope_cos_sin(torch.arange(600), rope_inv_freq(rd, 160000.0, Yarn()))
    return wkv, wgate, ape, norm_w, cos, sin


def _compressor_run(g, b, ratio, d, rd, dim, chunks, rotate, quant, dt, what):
    """Steps of `chunks` tokens through both implementations, each with its own state; after every step the
    new entries and both states must agree. Returns the provider's entries of all steps, concatenated."""
    wkv, wgate, ape, norm_w, cos, sin = _compressor_weights(g, ratio, d, rd, dim)
    coff = 2 if ratio == 4 else 1
    shape = (b, coff * ratio, coff * d)
    st_t = [torch.zeros(shape, device=_dev()), torch.full(shape, float("-inf"), device=_dev())]
    st_r = [torch.zeros(shape), torch.full(shape, float("-inf"))]
    pos, outs, refs = 0, [], []
    for n in chunks:
        x = torch.randn(b, n, dim, generator=g).to(dt)
        args = (wkv, wgate, ape, norm_w, cos, sin)
        from dsv4_portable.registry import get_op
        op = get_op("compressor")
        out = op.run("triton", x.to(_dev()), *[a.to(_dev()) for a in args], st_t[0], st_t[1], pos, ratio, rotate,
                     quant, 1e-6, device_type="cuda").cpu()
        ref = op.run("reference", x, *args, st_r[0], st_r[1], pos, ratio, rotate, quant, 1e-6)
        step = f"{what} step at pos {pos} (+{n})"
        _assert_tol("compressor", out, ref, step)
        assert (st_t[1].cpu() == float("-inf")).equal(st_r[1] == float("-inf")), f"{step}: score_state -inf rows"
        fin = st_r[1] > float("-inf")
        assert (st_t[1].cpu()[fin] - st_r[1][fin]).abs().max().item() < 1e-4 if fin.any() else True, \
            f"{step}: score_state"
        assert (st_t[0].cpu() - st_r[0]).abs().max().item() < 1e-4, f"{step}: kv_state"
        outs.append(out)
        refs.append(ref)
        pos += n
    return torch.cat(outs, 1), torch.cat(refs, 1)


def check_compressor_boundaries():
    """DESIGN.md 5 case 3: prompt lengths ratio-1, ratio, ratio+1, 2*ratio-1 (ratio 4 and 128); prefill then
    decode across a boundary equals one prefill; chunked prefill split at a non-multiple of ratio."""
    g = _gen(8)
    for ratio, d, rd, dim in ((4, 80, 16, 24), (128, 80, 16, 8)):
        for dt in (torch.float32, torch.bfloat16):
            lengths = (ratio - 1, ratio, ratio + 1, 2 * ratio - 1) if ratio == 4 else (ratio - 1, ratio + 1)
            for length in lengths:
                _compressor_run(g, 2 if ratio == 4 else 1, ratio, d, rd, dim, [length], False, True, dt,
                                f"ratio {ratio} {dt} prefill {length}")


def check_compressor_stepwise_equals_prefill():
    """The same token sequence fed as one prefill and as prefill + decode steps gives the same entries (the
    provider against itself within the op tolerance, and both against the reference)."""
    from dsv4_portable.registry import get_op
    op = get_op("compressor")
    g = _gen(9)
    for ratio, d, rd, rotate in ((4, 80, 16, False), (4, 64, 16, True), (8, 80, 16, False)):
        wkv, wgate, ape, norm_w, cos, sin = _compressor_weights(g, ratio, d, rd, 24)
        coff = 2 if ratio == 4 else 1
        x = torch.randn(2, 13, 24, generator=g)
        results = {}
        for name, chunks in (("prefill", [13]), ("decode", [6, 1, 1, 1, 1, 3]), ("chunked", [5, 7, 1])):
            for impl in ("triton", "reference"):
                dev = _dev() if impl == "triton" else torch.device("cpu")
                kv_s = torch.zeros(2, coff * ratio, coff * d, device=dev)
                sc_s = torch.full((2, coff * ratio, coff * d), float("-inf"), device=dev)
                pos, outs = 0, []
                for n in chunks:
                    args = [t.to(dev) for t in (x[:, pos:pos + n], wkv, wgate, ape, norm_w, cos, sin)]
                    kw = dict(device_type="cuda") if impl == "triton" else {}
                    outs.append(op.run(impl, *args, kv_s, sc_s, pos, ratio, rotate, True, 1e-6, **kw).cpu())
                    pos += n
                results[(name, impl)] = torch.cat(outs, 1)
        for name in ("decode", "chunked"):
            assert torch.equal(results[(name, "reference")], results[("prefill", "reference")])
            _assert_tol("compressor", results[(name, "triton")], results[("prefill", "reference")],
                        f"ratio {ratio} rotate {rotate} {name} vs one prefill")


def check_compressor_variants():
    """Indexer keys (rotate: Hadamard + FP4), quant off, fp16, and a state that starts mid-window."""
    g = _gen(10)
    for rotate, quant, dt in ((True, True, torch.float32), (True, True, torch.bfloat16), (False, False, torch.float32),
                              (True, False, torch.bfloat16), (False, True, torch.float16)):
        d = 64 if rotate else 80
        _compressor_run(g, 2, 4, d, 16, 24, [5, 1, 2, 9], rotate, quant, dt, f"rotate {rotate} quant {quant} {dt}")
    # QAT really rounds: the non-rope dims of every entry are e4m3 x 2^k per 64-block, the rope dims are not
    out, _ = _compressor_run(g, 1, 4, 144, 16, 24, [16], False, True, torch.float32, "qat grid")
    nope = out[..., :128].reshape(-1, 2, 64)
    s = 2.0 ** torch.ceil(torch.log2(nope.abs().amax(-1).clamp_min(1e-4) / 448))
    scaled = nope / s.unsqueeze(-1)
    assert torch.equal(scaled.to(E4M3).float(), scaled), "compressed KV non-rope dims must be on the FP8 grid"
    # no rope dims (rd = 0): all d dims are non-rope dims and get the FP8 round trip. Checked against the grid
    # only: reference/compression.py slices entries[..., :-rd], which is EMPTY for rd = 0, so the reference
    # skips the QAT there (reported; V4 always has 64 rope dims).
    from dsv4_portable.registry import get_op
    wkv, wgate, ape, norm_w, _, _ = _compressor_weights(g, 8, 128, 16, 24)
    empty = torch.zeros(600, 0)
    kv_s, sc_s = torch.zeros(1, 8, 128, device=_dev()), torch.full((1, 8, 128), float("-inf"), device=_dev())
    out = get_op("compressor").run("triton", *[t.to(_dev()) for t in (torch.randn(1, 16, 24, generator=g), wkv,
                                   wgate, ape, norm_w, empty, empty)], kv_s, sc_s, 0, 8, device_type="cuda").cpu()
    blocks = out.reshape(-1, 64)
    s = 2.0 ** torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-4) / 448))
    assert torch.equal((blocks / s[:, None]).to(E4M3).float(), blocks / s[:, None]), "rd = 0: all dims on FP8 grid"
    # FP4 QAT of indexer keys: every 32-block is e2m1 x 2^k
    out, _ = _compressor_run(g, 1, 4, 64, 16, 24, [16], True, True, torch.float32, "fp4 grid")
    blocks = out.reshape(-1, 32)
    s = 2.0 ** torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(6 * 2.0 ** -126) / 6))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.isin((blocks / s.unsqueeze(-1)).abs(), grid).all(), "indexer keys must be on the FP4 grid"


def check_moe_route():
    """All score functions with and without bias, T = 1 (split-K gate GEMM) and T = 40, hash layers with int32
    and int64 tables; indices exactly equal, weights within tolerance; weights sum to route_scale."""
    g = _gen(11)
    log, recording = _launch_log()
    for dt in (torch.float32, torch.bfloat16):
        for score in ("sqrtsoftplus", "sigmoid", "softmax"):
            for t, d, e, k in ((1, 256, 16, 3), (40, 96, 24, 6)):
                x = torch.randn(t, d, generator=g).to(dt)
                w = (torch.randn(e, d, generator=g) / d ** 0.5).to(dt)
                for bias in (torch.randn(e, generator=g) * 0.3, None):
                    with recording():
                        out_w, out_i = _run("moe_route", x, w, bias, None, None, k, score, 1.5)
                    ref_w, ref_i = _ref("moe_route", x, w, bias, None, None, k, score, 1.5)
                    what = f"moe_route {dt} {score} T={t} bias={bias is not None}"
                    assert out_i.dtype == ref_i.dtype and torch.equal(out_i, ref_i), f"{what}: expert ids differ"
                    _assert_tol("moe_route", out_w, ref_w, what)
                    if score != "softmax":
                        assert (out_w.sum(-1) - 1.5).abs().max() < 1e-5
                for idt in (torch.int32, torch.int64):
                    tid = torch.randint(0, e, (50, k), generator=g, dtype=idt)
                    ids = torch.randint(0, 50, (t,), generator=g, dtype=idt)
                    out_w, out_i = _run("moe_route", x, w, None, tid, ids, k, score, 2.5)
                    ref_w, ref_i = _ref("moe_route", x, w, None, tid, ids, k, score, 2.5)
                    assert torch.equal(out_i, ref_i) and torch.equal(out_i, tid[ids.long()].long()), \
                        f"hash {dt} {score} {idt}: ids must be tid2eid[input_ids]"
                    _assert_tol("moe_route", out_w, ref_w, f"hash {dt} {score} {idt}")
    splits = [grid[2] for name, grid in log if name == "route_logits_kernel"]
    assert max(splits) > 1, f"the split-K gate GEMM did not run: {splits}"
    # softplus far below 0 (log1p path) and above the threshold 20
    x = torch.tensor([[1.0], [-30.0], [25.0]])
    w = torch.tensor([[1.0], [0.5], [-1.0], [0.0]])
    out_w, out_i = _run("moe_route", x, w, None, None, None, 2, "sqrtsoftplus", 1.0)
    ref_w, ref_i = _ref("moe_route", x, w, None, None, None, 2, "sqrtsoftplus", 1.0)
    assert torch.equal(out_i, ref_i)
    _assert_tol("moe_route", out_w, ref_w, "softplus tails")


def check_supports_declines_with_reasons():
    from dsv4_portable.registry import NoProviderError, get_op
    dev = _dev()
    other = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")

    def reasons(op, *args, **kw):
        return get_op(op).provider("triton", "cuda").supports(*args, **kw)

    def has(rs, word):
        return any(word in r for r in rs), rs
    x = torch.randn(4, 128, device=dev)
    assert has(reasons("quant_fp8", x.to(other), 128), "runs on")[0]
    assert has(reasons("quant_fp8", x.double(), 128), "float64")[0]
    assert has(reasons("quant_fp8", x.t().contiguous().t(), 4), "row stride")[0]       # last-dim stride != 1
    assert has(reasons("quant_fp4", x[:, :126], 3), "even block_size")[0]
    assert has(reasons("fp8_roundtrip", torch.randn(2, 8192, device=dev), 8192), "block_size")[0]
    assert has(reasons("rms_norm", torch.randn(2, 20000, device=dev), None), "row length")[0]
    assert has(reasons("rope", torch.randn(1, 2, 8, device=dev), torch.ones(1, 2, 2, dtype=torch.float64, device=dev),
                       torch.ones(1, 2, 2, dtype=torch.float64, device=dev)), "float64")[0]
    h = torch.randn(1, 2, 3, 16, device=dev)
    assert has(reasons("hc_pre", h, torch.zeros(15, 48, device=dev), torch.ones(3, device=dev),
                       torch.zeros(15, device=dev)), "streams")[0]
    h4 = torch.randn(1, 2, 16, 4, device=dev).transpose(2, 3)
    assert has(reasons("hc_pre", h4, torch.zeros(24, 64, device=dev), torch.ones(3, device=dev),
                       torch.zeros(24, device=dev)), "contiguous")[0]
    assert has(reasons("hc_post", h4[:, :, 0].contiguous(), h4, torch.ones(1, 2, 4, device=dev),
                       torch.ones(1, 2, 4, 4, device=dev)), "contiguous")[0]
    assert has(reasons("moe_route", x, torch.randn(2000, 128, device=dev), None, None, None, 2), "experts")[0]
    wkv, wgate, ape, norm_w, cos, sin = (t.to(dev) for t in _compressor_weights(_gen(0), 4, 80, 16, 8))
    st = torch.zeros(1, 8, 160, device=dev)
    xc = torch.randn(1, 3, 8, device=dev)
    st_t = torch.zeros(1, 160, 8, device=dev).transpose(1, 2)                          # not contiguous
    assert has(reasons("compressor", xc, wkv, wgate, ape, norm_w, cos, sin, st_t, st, 0, 4), "contiguous")[0]
    assert has(reasons("compressor", xc.double(), wkv, wgate, ape, norm_w, cos, sin, st, st, 0, 4), "float64")[0]
    # supported calls give no reasons
    assert reasons("quant_fp8", x, 128) == [] and reasons("hc_post", h4[:, :, 0].contiguous(), h4.contiguous(),
                                                          torch.ones(1, 2, 4, device=dev),
                                                          torch.ones(1, 2, 4, 4, device=dev)) == []
    # a forced run of a declining provider raises with the reasons instead of computing anything
    try:
        get_op("quant_fp4").run("triton", x[:, :126], 3, device_type="cuda")
    except NoProviderError as e:
        assert "even block_size" in str(e)
    else:
        raise AssertionError("run() of a declining provider must raise")


def check_cuda_backend_dispatches_to_triton():
    """With the cuda backend active (availability not required under the interpreter), plain op calls pick the
    Triton providers and the counters say so."""
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.registry import provider_counts, reset_counts, use_backend
    dev = _dev()
    reset_counts()
    with use_backend("cuda", require_available=False):
        x = torch.randn(2, 3, 128, device=dev)
        ops.rms_norm(x, torch.ones(128, device=dev))
        ops.quant_fp8(x, 128)
        ops.fp8_roundtrip(x[..., :64], 64)
        plan = ops.rms_norm.explain(x.double(), None, backend=dsv4.BACKENDS["cuda"])
    counts = provider_counts()
    assert counts["rms_norm"] == {"triton": 1} and counts["quant_fp8"] == {"triton": 1}, counts
    assert counts["fp8_roundtrip"] == {"triton": 1}, counts
    assert plan[0][0] == "triton" and plan[0][1] == "skipped" and any("float64" in r for r in plan[0][2]), plan
    assert [p for p, status, _ in plan if status == "chosen"] == ["reference"]


def check_hadamard():
    """Rows of 16..256 (V4's indexer: 128) in fp32, bf16 and fp16, ragged row counts, a strided head view; the
    result is orthonormal (norm kept) and within the op tolerance of the reference butterfly."""
    g = _gen(11)
    for d in (16, 128, 256):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(3, 37, d, generator=g).to(dt)
            out = _run("hadamard", x)
            _assert_tol("hadamard", out, _ref("hadamard", x), f"hadamard d={d} {dt}")
            if dt == torch.float32:    # the butterfly path adds in the reference's order: the same bits
                _assert_exact(out, _ref("hadamard", x), f"hadamard fp32 d={d}")
                torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    q = torch.randn(5, 4, 256, generator=g)[..., :128]       # a slice of the last dim: strided rows
    _assert_tol("hadamard", _run("hadamard", q), _ref("hadamard", q), "hadamard strided rows")


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def _worker(names):
    import dsv4_portable as dsv4
    dsv4.BACKENDS["cuda"].load_providers()
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = {"ok": True, "msg": ""}
        except Exception:
            results[name] = {"ok": False, "msg": traceback.format_exc()}
        print(f"check {name}: {'ok' if results[name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    return results


# ====================================================================================== offline sm90 compile
STREAMING = ("quant_fp8_kernel", "quant_fp4_kernel", "rms_norm_kernel", "rope_kernel", "hc_finish_kernel",
             "hc_post_kernel", "compress_state_kernel")


def _compile_worker():
    """Compile every launch of the memory-bound cases (compile_check.memory_cases) for sm90."""
    from dsv4_portable.backends.cuda import compile_check
    return {"records": compile_check.run(90, compile_check.memory_cases(), progress=lambda line: None)}


# ====================================================================================== pytest side
def _spawn(mode, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if mode == "checks" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"                # only in the worker's environment
    proc = subprocess.run([sys.executable, HERE, "--worker", mode], env=env, capture_output=True, text=True,
                          timeout=timeout)
    marker = "@@RESULT@@"
    if proc.returncode != 0 or marker not in proc.stdout:
        pytest.fail(f"{mode} worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.split(marker, 1)[1])


@pytest.fixture(scope="module")
def worker_results():
    pytest.importorskip("triton")
    return _spawn("checks", timeout=600)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_triton_memory_provider(worker_results, name):
    res = worker_results[name]
    assert res["ok"], res["msg"]


def test_kernels_compile_for_sm90_at_v4_sizes():
    """Every launch at V4-Flash sizes compiles for sm90 (offline), fits shared memory, does not spill, and the
    streaming kernels read global memory with 128-bit vector loads."""
    pytest.importorskip("triton")
    recs = _spawn("compile", timeout=600)["records"]
    kernels = {r["kernel"] for r in recs}
    assert kernels >= set(STREAMING) | {"hadamard_kernel", "hc_mix_kernel", "compress_entry_kernel", "route_logits_kernel",
                                        "route_select_kernel"}, kernels
    from dsv4_portable.backends.cuda.compile_check import problems
    assert not problems(recs, 90), problems(recs, 90)
    for r in recs:
        if r["kernel"] in STREAMING:
            assert r["max_ld_vec"] == 4, f"{r['case']}: {r['kernel']} has no 128-bit global loads"


def test_unavailable_without_gpu_says_why_and_dispatch_falls_back():
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.devices import interpret_mode
    if torch.cuda.is_available() or interpret_mode():
        pytest.skip("this machine can run the providers")
    dsv4.BACKENDS["cuda"].load_providers()
    for name in ("quant_fp8", "quant_fp4", "fp8_roundtrip", "fp4_roundtrip", "rms_norm", "rope", "hc_pre",
                 "hc_post", "hc_head", "compressor", "moe_route"):
        reasons = getattr(ops, name).provider("triton", "cuda").availability()
        assert reasons and any("CUDA" in r for r in reasons), (name, reasons)
    x = torch.randn(2, 64)
    plan = ops.rms_norm.explain(x, None, backend=dsv4.BACKENDS["cuda"])
    assert [p for p, status, _ in plan if status == "chosen"] == ["reference"]


def test_cpu_tensors_are_declined_outside_the_interpreter():
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.devices import interpret_mode
    if interpret_mode():
        pytest.skip("the interpreter runs on CPU tensors")
    dsv4.BACKENDS["cuda"].load_providers()
    reasons = ops.quant_fp8.provider("triton", "cuda").supports(torch.randn(2, 128), 128)
    assert any("runs on cuda" in r for r in reasons), reasons


def test_launch_rejects_grids_beyond_cuda_limits():
    from dsv4_portable.backends.cuda.launch import check_grid
    check_grid(lambda: None, (2 ** 31 - 1, 65535, 65535))
    for bad in ((1, 65536), (1, 1, 70000), (2 ** 31,), (1, 2, 3, 4)):
        with pytest.raises(ValueError, match="grid"):
            check_grid(lambda: None, bad)


def test_compressor_grid_fits_a_1m_token_prompt():
    """A 1M-token prefill of a ratio-4 layer emits 262144 entries in one call: they must sit on grid axis x
    (axis y allows 65535). Meta tensors: the provider plans its launches, nothing runs."""
    pytest.importorskip("triton")
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda.launch import intercept
    dsv4.BACKENDS["cuda"].load_providers()
    e = lambda *shape: torch.empty(*shape, dtype=torch.float32, device="meta")  # noqa: E731
    s, d = 2 ** 20, 128
    grids = []
    with intercept(lambda kernel, grid, args, meta: grids.append((kernel.__name__, tuple(grid)))):
        ops.compressor.provider("triton", "cuda").fn(
            e(1, s, 256).to(torch.bfloat16), e(2 * d, 256), e(2 * d, 256), e(4, 2 * d), e(d), e(s, 32), e(s, 32),
            e(1, 8, 2 * d), e(1, 8, 2 * d), 0, 4, True, True)
    assert ("compress_entry_kernel", (s // 4, 1)) in grids, grids


def test_compressor_projection_plan_does_not_depend_on_the_batch():
    """The compressor's fp32 projections (gemm.linear_f32_fixed) launch with the same tiles, K split and exact
    fp32 products whatever the row count, so every row is reduced in the same order: the batch invariance the
    provider claims, which the interpreter's numpy products cannot show. Meta tensors (V4-Flash CSA widths):
    the provider plans its launches, nothing runs."""
    pytest.importorskip("triton")
    import dsv4_portable as dsv4
    from dsv4_portable import ops
    from dsv4_portable.backends.cuda.launch import intercept
    from dsv4_portable.devices import interpret_mode
    if interpret_mode():
        pytest.skip("interpreted kernels have no argument names to read")
    dsv4.BACKENDS["cuda"].load_providers()
    e = lambda *shape: torch.empty(*shape, dtype=torch.float32, device="meta")  # noqa: E731

    def projections(b, s):
        log = []
        with intercept(lambda kernel, grid, args, meta: log.append((kernel.__name__, tuple(grid),
                                                                     dict(zip(kernel.arg_names, args)), meta))):
            ops.compressor.provider("triton", "cuda").fn(
                e(b, s, 4096).to(torch.bfloat16), e(1024, 4096), e(1024, 4096), e(4, 1024), e(512), e(65536, 32),
                e(65536, 32), e(b, 8, 1024), e(b, 8, 1024), 0 if s > 1 else 4095, 4, False, True)
        gemms = [(grid[1:], args["k_per_split"], meta) for name, grid, args, meta in log
                 if name == "float_gemm_kernel"]
        assert len(gemms) == 2, [name for name, *_ in log]     # kv and score
        return gemms
    decode = projections(1, 1)
    assert all(meta["BLOCK_M"] == 16 and meta["PRECISION"] == "ieee" for _, _, meta in decode), decode
    for b, s in ((64, 1), (3, 100), (1, 4096)):
        assert projections(b, s) == decode, (b, s)


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the launch happens inside torch.cuda.device(cuda:1). (No second
    GPU here: the device lookup and torch.cuda's device switch are stand-ins that record what happens.)"""
    from dsv4_portable.backends.cuda import launch as L
    assert L.tensor_device((3, torch.zeros(1), torch.empty(1, device="meta"))) is None
    events = []

    class Device:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            events.append(("enter", self.dev))

        def __exit__(self, *exc):
            events.append(("exit", self.dev))

    class Kernel:
        __name__ = "k"

        def __getitem__(self, grid):
            return lambda *a, **k: events.append(("launch", grid))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(L, "tensor_device", lambda args: torch.device("cuda", 1))
    L.launch(Kernel(), (4,), 1)
    assert events == [("enter", torch.device("cuda", 1)), ("launch", (4,)), ("exit", torch.device("cuda", 1))]
    events.clear()
    monkeypatch.setattr(L, "tensor_device", lambda args: torch.device("cuda", 0))
    L.launch(Kernel(), (4,), 1)
    assert events == [("launch", (4,))], "no device switch when the tensors are on the current device"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    result = _worker(list(CHECKS)) if sys.argv[2] == "checks" else _compile_worker()
    print("@@RESULT@@" + json.dumps(result, default=str))
