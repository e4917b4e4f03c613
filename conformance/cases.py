"""Seeded conformance cases for every registry op, including the adversarial ones of DESIGN.md section 5.

A case builds its arguments on CPU from a seed; `run(call, args)` calls the op through `call` (bound by the runner
to one provider, or to the reference) and returns the tensors to compare. Most cases call the op once; stateful
ones (the compressor's prefill-then-decode, chunked prefill) call it several times and also return the state.
Shapes are tiny on purpose: the same cases run the Triton kernels under the CPU interpreter. `all_cases(small=True)`
leaves out the few `large` ones (model-width mHC, a 200-entry attention list, most ratio-128 compressor cases) and
keeps at least one case of every op and of every adversarial kind.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from dsv4_portable import reference as ref
from dsv4_portable.reference.quant import quant_fp4_weight, quant_fp8_weight

BF16, F32 = torch.bfloat16, torch.float32


@dataclasses.dataclass
class Case:
    op: str
    case_id: str
    seed: int
    dtype: torch.dtype                      # the activation dtype the tolerance is looked up with
    make: Callable[[torch.Generator], tuple]   # seeded args, on CPU
    run: Callable[[Callable, tuple], tuple] | None = None   # default: (call(*args),)
    k: int | None = None                    # reduction length, scales the tolerance's atol
    slice0: Callable[[tuple], tuple] | None = None  # args of batch element 0 alone (batch-invariance check)
    fp64_reference: bool = True             # the reference may run on float64 copies of the float arguments
    check_reference: Callable[[tuple, tuple], str | None] | None = None  # a property the case exists to show
    large: bool = False                     # left out of the small set (slow under the Triton interpreter)

    def args(self) -> tuple:
        return self.make(torch.Generator().manual_seed(self.seed))

    def execute(self, call: Callable, args: tuple) -> tuple:
        out = self.run(call, args) if self.run else call(*args)
        return out if isinstance(out, tuple) else (out,)

    def first_call_args(self, args: tuple) -> tuple:
        """The arguments of the op's first call in this case (what supports() and explain() are asked about)."""
        if self.run is None:
            return args
        seen = []

        def record(*a):
            seen.append(a)
            raise _Probed
        try:
            self.run(record, args)
        except _Probed:
            pass
        return seen[0]


class _Probed(Exception):
    pass


def _randn(g, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _first(*batched: int):
    """slice0 for ops whose listed argument positions carry the batch in dim 0 (None arguments stay None)."""
    return lambda args: tuple(a[:1] if i in batched and a is not None else a for i, a in enumerate(args))


# ----------------------------------------------------------------------------------------------- quantisers
def _quant_rows(g, dtype, n=128):
    x = _randn(g, 6, n, scale=3.0)
    x[1] *= 1e-8            # amax below the scale floor
    x[2] = 0.0              # all-zero block
    x[3, :4] = torch.tensor([448.0, -448.0, 6.0, 2.0 ** -9])   # exact powers of two / grid values stay exact
    x[4] *= 1e4             # large magnitudes
    return x.to(dtype)


def _kv_rounds(args, out):
    x, y = args[0].float(), out[0].float()
    return None if not torch.equal(x, y) else "the KV FP8 round trip changed nothing: the case does not round"


def quant_cases() -> list[Case]:
    cases = []
    for dt in (BF16, F32):
        n = dt.__repr__().split(".")[-1]
        for fmt in ("ue8m0", None):
            cases.append(Case("quant_fp8", f"quant_fp8/{n}/{fmt}", 11, dt, lambda g, dt=dt, fmt=fmt:
                              (_quant_rows(g, dt), 128, fmt), slice0=_first(0)))
        cases.append(Case("quant_fp4", f"quant_fp4/{n}", 12, dt, lambda g, dt=dt: (_quant_rows(g, dt), 32),
                          slice0=_first(0)))
        # DESIGN.md 5 case 2: the KV round trip of the 448 non-rope dims (a strided slice of a 512-wide entry)
        cases.append(Case("fp8_roundtrip", f"fp8_roundtrip/kv_nope_448/{n}", 13, dt,
                          lambda g, dt=dt: (_randn(g, 2, 5, 512, dtype=dt)[..., :448], 64, "ue8m0"),
                          slice0=_first(0), check_reference=_kv_rounds))
        cases.append(Case("fp4_roundtrip", f"fp4_roundtrip/indexer_q/{n}", 14, dt,
                          lambda g, dt=dt: (_randn(g, 2, 3, 4, 128, dtype=dt), 32), slice0=_first(0)))
    return cases


# ----------------------------------------------------------------------------------------------- linears
def linear_cases() -> list[Case]:
    def fp8w(g, n, k, e8m0):
        w, s = quant_fp8_weight(_randn(g, n, k, scale=0.05))
        return w, (s.to(torch.float8_e8m0fnu) if e8m0 else s)

    cases = []
    for dt in (BF16, F32):
        n = str(dt).split(".")[-1]
        for e8m0 in (True, False):
            cases.append(Case("fp8_linear", f"fp8_linear/{n}/{'e8m0' if e8m0 else 'f32'}_scales", 21, dt,
                              lambda g, dt=dt, e=e8m0: (_randn(g, 5, 256, dtype=dt), *fp8w(g, 192, 256, e)),
                              k=256, slice0=_first(0)))
        cases.append(Case("fp4_linear", f"fp4_linear/{n}", 22, dt,
                          lambda g, dt=dt: (_randn(g, 5, 256, dtype=dt), *quant_fp4_weight(_randn(g, 64, 256,
                                                                                                 scale=0.05))),
                          k=256, slice0=_first(0)))
        cases.append(Case("int8_linear", f"int8_linear/{n}", 25, dt, lambda g, dt=dt: (
            _randn(g, 5, 256, dtype=dt), *ref.quant_int8_weight(_randn(g, 96, 256, scale=0.05))), k=256,
            slice0=_first(0)))
        cases.append(Case("linear", f"linear/{n}", 23, dt,
                          lambda g, dt=dt: (_randn(g, 2, 5, 64, dtype=dt), _randn(g, 48, 64, dtype=dt, scale=0.1)),
                          k=64, slice0=_first(0)))
        cases.append(Case("grouped_linear", f"grouped_linear/{n}", 24, dt,
                          lambda g, dt=dt: (_randn(g, 3, 4, 64, dtype=dt), _randn(g, 4, 32, 64, dtype=dt, scale=0.1)),
                          k=64, slice0=_first(0)))
    # M = 20 rows: their batch-invariance check compares a row of a 17..64-row call with the same row alone (M = 1),
    # two different launch plans of a GPU provider that tiles by M bucket (the cases above stay in one bucket)
    cases.append(Case("fp8_linear", "fp8_linear/bfloat16/m20_vs_m1", 26, BF16,
                      lambda g: (_randn(g, 20, 256, dtype=BF16), *fp8w(g, 192, 256, True)), k=256, slice0=_first(0)))
    cases.append(Case("linear", "linear/bfloat16/m20_vs_m1", 27, BF16,
                      lambda g: (_randn(g, 20, 64, dtype=BF16), _randn(g, 48, 64, dtype=BF16, scale=0.1)), k=64,
                      slice0=_first(0)))
    return cases


# ----------------------------------------------------------------------------------------------- norm, rope, rotation
def _cos_sin(b, s, half, offset=0):
    pos = torch.arange(offset, offset + s).expand(b, s)
    return ref.rope_cos_sin(pos, ref.rope_inv_freq(2 * half, 10000.0))


def norm_rope_cases() -> list[Case]:
    cases = []
    for dt in (BF16, F32):
        n = str(dt).split(".")[-1]
        cases.append(Case("rms_norm", f"rms_norm/weighted/{n}", 31, dt,
                          lambda g, dt=dt: (_randn(g, 4, 7, 96, dtype=dt, scale=4.0), _randn(g, 96, dtype=dt), 1e-6),
                          k=96, slice0=_first(0)))
        cases.append(Case("rms_norm", f"rms_norm/no_weight/{n}", 32, dt,
                          lambda g, dt=dt: (_randn(g, 3, 2, 512, dtype=dt), None, 1e-6), k=512, slice0=_first(0)))
        for inverse in (False, True):
            cases.append(Case("rope", f"rope/heads/{'inverse' if inverse else 'forward'}/{n}", 33, dt,
                              lambda g, dt=dt, inv=inverse: (_randn(g, 2, 5, 3, 64, dtype=dt), *_cos_sin(2, 5, 16, 7),
                                                             inv), slice0=_first(0, 1, 2)))
        cases.append(Case("rope", f"rope/no_heads_shared_tables/{n}", 34, dt,
                          lambda g, dt=dt: (_randn(g, 2, 5, 64, dtype=dt), *_cos_sin(1, 5, 32, 1000), False),
                          slice0=_first(0)))
        cases.append(Case("hadamard", f"hadamard/indexer_width/{n}", 35, dt,
                          lambda g, dt=dt: (_randn(g, 3, 5, 128, dtype=dt),), k=128, slice0=_first(0)))
    return cases


# ----------------------------------------------------------------------------------------------- attention, indexer
def _attn_args(g, dt, sink_mode="random", b=2, s=3, h=4, d=64, n=20, k=8):
    q = _randn(g, b, s, h, d, dtype=dt)
    kv = _randn(g, b, n, d, dtype=dt)
    sink = {"random": _randn(g, h), "-inf": torch.full((h,), float("-inf")), "huge": torch.full((h,), 1e4)}[sink_mode]
    idx = torch.randint(0, n, (b, s, k), generator=g, dtype=torch.int32)
    idx[0, 0, 3:] = -1              # few valid indices
    idx[1, -1, :] = -1              # no valid index: the row must be exactly 0
    idx[-1, 0, ::2] = -1            # padding interleaved with valid entries
    return q, kv, sink, idx, d ** -0.5


def _v4_decode_args(g, dt, h=64, d=512, n=2048, k=640):
    """One decode query of V4's shape: 64 heads of 512 over 640 distinct kv rows, the last 7 slots -1."""
    idx = torch.randperm(n, generator=g)[:k].to(torch.int32).view(1, 1, k)
    idx[..., -7:] = -1
    return _randn(g, 1, 1, h, d, dtype=dt), _randn(g, 1, n, d, dtype=dt), _randn(g, h), idx, d ** -0.5


def attention_cases() -> list[Case]:
    cases = []
    for dt in (BF16, F32):
        n = str(dt).split(".")[-1]
        for mode in ("random", "-inf", "huge"):
            cases.append(Case("sparse_attn", f"sparse_attn/sink_{mode}/{n}", 41, dt,
                              lambda g, dt=dt, m=mode: _attn_args(g, dt, m), k=8, slice0=_first(0, 1, 3)))
        cases.append(Case("sparse_attn", f"sparse_attn/decode_long_list/{n}", 42, dt,
                          lambda g, dt=dt: _attn_args(g, dt, b=3, s=1, n=300, k=200), k=200, slice0=_first(0, 1, 3),
                          large=True))
        # V4 decode at batch 1 (64 heads of 512, window 128 + top-k 512): a GPU's split-K planner cuts this list
        # into several splits and runs the combine (the small cases above never split on a GPU).
        cases.append(Case("sparse_attn", f"sparse_attn/decode_split_k_v4/{n}", 47, dt,
                          lambda g, dt=dt: _v4_decode_args(g, dt), k=640, large=True))

    def window_args(g, dt, p0, s, ratio, csa=False, sink_mode="random", b=2, h=4, d=64, w=16, k=6):
        """A window_sparse_attn step at positions p0..p0+s-1: ring of w slots, new rows, compressed entries
        (two more rows than are visible, which must never be read) and, for CSA, a top-k list with -1 padding
        and one not-yet-visible entry that must be ignored."""
        q = _randn(g, b, s, h, d, dtype=dt)
        ring, kv = _randn(g, b, w, d, dtype=dt), _randn(g, b, s, d, dtype=dt)
        sink = {"random": _randn(g, h), "-inf": torch.full((h,), float("-inf")), "huge": torch.full((h,), 1e4)}[
            sink_mode]
        comp = topk = None
        if ratio:
            n = (p0 + s) // ratio + 2
            comp = _randn(g, b, n, d, dtype=dt)
        if csa:
            k = min(k, n)
            topk = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * s)]).view(b, s, k).int()
            topk[:, :, 0] = n - 1
            topk[0, :, 1:3] = -1
        return q, ring, kv, comp, topk, sink, d ** -0.5, p0, ratio

    for dt in (BF16, F32):
        n = str(dt).split(".")[-1]
        for label, p0, s, ratio, csa, sink in (("window_prefill", 0, 20, 0, False, "random"),
                                               ("window_decode_wrapped", 37, 1, 0, False, "-inf"),
                                               ("hca_chunked", 9, 6, 8, False, "random"),
                                               ("hca_decode_before_first_entry", 6, 1, 8, False, "huge"),
                                               ("csa_prefill", 0, 13, 4, True, "random"),
                                               ("csa_decode", 29, 1, 4, True, "random")):
            cases.append(Case("window_sparse_attn", f"window_sparse_attn/{label}/{n}", 46, dt,
                              lambda g, dt=dt, a=(p0, s, ratio, csa, sink): window_args(g, dt, *a[:4], sink_mode=a[4]),
                              k=16 + s + 8, slice0=_first(0, 1, 2, 3, 4)))
        # V4 CSA decode at batch 1 across the ring wrap: 64 heads of 512, ring 128, top-k 512 of 2050 entries
        # (split-K on a GPU, see sparse_attn/decode_split_k_v4)
        cases.append(Case("window_sparse_attn", f"window_sparse_attn/csa_decode_split_k_v4/{n}", 48, dt,
                          lambda g, dt=dt: window_args(g, dt, 8191, 1, 4, csa=True, b=1, h=64, d=512, w=128, k=512),
                          k=640, large=True))

    # At the widths the fused Ascend attention takes (64 heads, head dim 512, window 128; CSA top-k padded to 512):
    # a wrapped ring, chunks crossing a compressed-entry boundary, both sink extremes.
    for label, p0, s, ratio, csa, sink, large in (("v4_window_decode_wrapped", 300, 1, 0, False, "-inf", False),
                                                  ("v4_window_prefill", 0, 5, 0, False, "random", True),
                                                  ("v4_hca_chunk_across_entry", 250, 8, 128, False, "random", False),
                                                  ("v4_hca_decode_sink_huge", 385, 1, 128, False, "huge", True),
                                                  ("v4_csa_decode", 203, 1, 4, True, "random", False),
                                                  ("v4_csa_chunk", 121, 6, 4, True, "-inf", True)):
        cases.append(Case("window_sparse_attn", f"window_sparse_attn/{label}/bfloat16", 49, BF16,
                          lambda g, a=(p0, s, ratio, csa, sink): window_args(g, BF16, *a[:4], sink_mode=a[4], h=64,
                                                                             d=512, w=128),
                          k=128 + s + 8, slice0=_first(0, 1, 2, 3, 4), large=large))

    def indexer_args(g, dt, ties=False):
        b, s, h, di, n = 2, 4, 4, 32, 24
        q = _randn(g, b, s, h, di, dtype=dt)
        k = _randn(g, b, n, di, dtype=dt)
        if ties:                     # duplicated keys and keys whose ReLU terms all vanish (score exactly 0)
            k[:, 10:14] = k[:, 2:3]
            q = q.abs()
            k[:, 16:] = -k[:, 16:].abs()
        w = _randn(g, b, s, h).abs() * (di ** -0.5) * (h ** -0.5)
        visible = torch.tensor([[0, 3, 17, 24], [24, 6, 1, 12]], dtype=torch.int32)
        return q, k, w, visible, 8

    def indexer_decode_args(g):
        q, k = _randn(g, 3, 1, 8, 64, dtype=BF16), _randn(g, 3, 40, 64, dtype=BF16)
        w = _randn(g, 3, 1, 8).abs() * (64 ** -0.5) * (8 ** -0.5)
        return q, k, w, torch.tensor([[40], [5], [17]], dtype=torch.int32), 8

    cases.append(Case("indexer_topk", "indexer_topk/decode/bfloat16", 45, BF16, indexer_decode_args,
                      slice0=_first(0, 1, 2, 3)))

    def indexer_ascend_args(g, b, s, h, n, store=None):
        """The widths the Ascend lightning indexer takes (D 128; 8 heads is the smallest count the 950 takes):
        keys either the head of a larger cache store (read in place as pages) or a fresh tensor (padded copy)."""
        q = _randn(g, b, s, h, 128, dtype=BF16)
        keys = _randn(g, b, store or n, 128, dtype=BF16)
        w = _randn(g, b, s, h).abs() * (128 ** -0.5) * (h ** -0.5)
        visible = torch.randint(0, n + 1, (b, s), generator=g, dtype=torch.int32)
        visible[0, -1], visible[-1, 0] = n, 0                        # a row that sees every key, one that sees none
        return q, keys[:, :n], w, visible, 8

    cases.append(Case("indexer_topk", "indexer_topk/ascend_prefill_store_slice/bfloat16", 47, BF16,
                      lambda g: indexer_ascend_args(g, 2, 3, 8, 40, store=64), slice0=_first(0, 1, 2, 3)))
    cases.append(Case("indexer_topk", "indexer_topk/ascend_decode_64_heads/bfloat16", 48, BF16,
                      lambda g: indexer_ascend_args(g, 3, 1, 64, 37), slice0=_first(0, 1, 2, 3)))
    for dt in (BF16, F32):
        n = str(dt).split(".")[-1]
        cases.append(Case("indexer_topk", f"indexer_topk/visible_counts/{n}", 43, dt,
                          lambda g, dt=dt: indexer_args(g, dt), slice0=_first(0, 1, 2, 3)))
        cases.append(Case("indexer_topk", f"indexer_topk/ties/{n}", 44, dt,
                          lambda g, dt=dt: indexer_args(g, dt, ties=True), slice0=_first(0, 1, 2, 3)))
    return cases


# ----------------------------------------------------------------------------------------------- compressor
def _compressor_args(g, dt, ratio, rotate, b=2, dim=64):
    d = 64 if rotate else 80            # CSA/HCA entries: 64 non-rope dims + 16 rope dims; indexer keys: 64
    coff = 2 if ratio == 4 else 1
    wkv = _randn(g, coff * d, dim, scale=dim ** -0.5)
    wgate = _randn(g, coff * d, dim, scale=dim ** -0.5)
    ape = _randn(g, ratio, coff * d, scale=0.1)
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).to(dt)
    cos, sin = _cos_sin(1, 512, 8)
    kv_state = torch.zeros(b, coff * ratio, coff * d)
    score_state = torch.full((b, coff * ratio, coff * d), float("-inf"))
    return wkv, wgate, ape, norm_w, cos[0], sin[0], kv_state, score_state


def _compressor_steps(splits, ratio, rotate, quant=True):
    """run(): feed x in chunks (prefill, then decode steps / chunked prefill); return all entries and the state."""
    def run(call, args):
        x, wkv, wgate, ape, norm_w, cos, sin, kv_state, score_state = args
        kv_state, score_state = kv_state.clone(), score_state.clone()
        entries, pos = [], 0
        for n in splits:
            entries.append(call(x[:, pos:pos + n], wkv, wgate, ape, norm_w, cos, sin, kv_state, score_state, pos,
                                ratio, rotate, quant))
            pos += n
        return torch.cat(entries, dim=1), kv_state, score_state
    return run


def _equals_one_prefill(ratio, rotate):
    """check_reference of the stepped cases: the reference's chunked / decode run equals one prefill of the same
    tokens (entries and state) bitwise, so a provider compared with it is held to DESIGN.md 2.4's rule."""
    def check(args, stepped):
        one = _compressor_steps([args[0].shape[1]], ratio, rotate)(lambda *a: ref.compressor(*a), args)
        same = all(torch.equal(a, b) for a, b in zip(one, stepped))
        return None if same else "the reference's stepped run differs from one prefill of the same tokens"
    return check


def compressor_cases() -> list[Case]:
    cases = []
    for ratio in (4, 128):
        for rotate in ((False, True) if ratio == 4 else (False,)):
            kind = "indexer" if rotate else ("csa" if ratio == 4 else "hca")
            for length in (ratio - 1, ratio, ratio + 1, 2 * ratio - 1):    # DESIGN.md 5 case 3
                def make(g, ratio=ratio, rotate=rotate, length=length):
                    rest = _compressor_args(g, BF16, ratio, rotate)
                    return (_randn(g, 2, length, 64, dtype=BF16), *rest)
                cases.append(Case("compressor", f"compressor/{kind}/prefill_{length}", 51, BF16, make,
                                  run=_compressor_steps([length], ratio, rotate), k=64, fp64_reference=False,
                                  slice0=_first(0, 7, 8),     # x, kv_state, score_state carry the batch
                                  large=ratio == 128 and length != ratio + 1))
            # prefill to just before a boundary, then decode across it; chunked prefill at a non-multiple
            n = 2 * ratio + 3
            for label, splits in (("prefill_then_decode", [ratio - 1, 1, 1, 1, n - ratio - 2]),
                                  ("chunked_non_multiple", [ratio + 1, ratio - 3, n - 2 * ratio + 2])):
                def make(g, ratio=ratio, rotate=rotate, n=n):
                    return (_randn(g, 2, n, 64, dtype=BF16), *_compressor_args(g, BF16, ratio, rotate))
                cases.append(Case("compressor", f"compressor/{kind}/{label}", 52, BF16, make,
                                  run=_compressor_steps(splits, ratio, rotate), k=64, fp64_reference=False,
                                  slice0=_first(0, 7, 8),
                                  check_reference=_equals_one_prefill(ratio, rotate), large=ratio == 128))
    # The widths the fused Ascend compressor takes (hidden 1024, 64 rope dims; C4A d 512, C4Li d 128, C128A d 512)
    # with bf16 projection weights: prefill-then-decode across a boundary and a chunked prefill. QAT off: these
    # compare the fused kernel's pooling, norm and RoPE; a one-ulp bf16 difference before the FP8/FP4 round trip
    # moves about 1% of elements by a whole step, and the round trips are the registry's own ops (cases above).
    for ratio, d, rotate, splits, large in ((4, 512, False, [7, 1, 1, 3], False), (4, 128, True, [5, 3, 4], False),
                                            (128, 512, False, [126, 1, 1, 2], True)):
        kind = {(4, False): "c4a", (4, True): "c4li", (128, False): "c128a"}[(ratio, rotate)]

        def make(g, ratio=ratio, d=d, rotate=rotate, n=sum(splits)):
            coff, dim = (2 if ratio == 4 else 1), 1024
            wkv, wgate = (_randn(g, coff * d, dim, scale=dim ** -0.5, dtype=BF16) for _ in range(2))
            ape = _randn(g, ratio, coff * d, scale=0.1)
            norm_w = (1 + 0.1 * torch.randn(d, generator=g)).to(BF16)
            cos, sin = _cos_sin(1, 512, 32)
            state = (torch.zeros(2, coff * ratio, coff * d), torch.full((2, coff * ratio, coff * d), float("-inf")))
            return (_randn(g, 2, n, dim, dtype=BF16), wkv, wgate, ape, norm_w, cos[0], sin[0], *state)
        cases.append(Case("compressor", f"compressor/ascend_{kind}/no_qat_steps_{'_'.join(map(str, splits))}", 53, BF16,
                          make,
                          run=_compressor_steps(splits, ratio, rotate, quant=False), k=1024, fp64_reference=False,
                          large=large))
    return cases


# ----------------------------------------------------------------------------------------------- mHC
def mhc_cases() -> list[Case]:
    cases = []
    n_streams, d = 4, 64
    for dt in (BF16, F32):
        name = str(dt).split(".")[-1]
        mix = (2 + n_streams) * n_streams
        cases.append(Case("hc_pre", f"hc_pre/{name}", 61, dt, lambda g, dt=dt: (
            _randn(g, 2, 3, n_streams, d, dtype=dt), _randn(g, mix, n_streams * d, scale=0.05),
            torch.tensor([0.5, 1.5, 2.0]), _randn(g, mix, scale=0.3)), k=n_streams * d, slice0=_first(0)))

        def post_args(g, dt=dt):     # DESIGN.md 5 case 5: an asymmetric comb catches transposed application
            comb = torch.rand(2, 3, n_streams, n_streams, generator=g)
            comb[..., 0, 3] += 2.0
            return (_randn(g, 2, 3, d, dtype=dt), _randn(g, 2, 3, n_streams, d, dtype=dt),
                    torch.rand(2, 3, n_streams, generator=g) * 2, comb)
        cases.append(Case("hc_post", f"hc_post/asymmetric_comb/{name}", 62, dt, post_args,
                          slice0=_first(0, 1, 2, 3)))
        cases.append(Case("hc_head", f"hc_head/{name}", 63, dt, lambda g, dt=dt: (
            _randn(g, 2, 3, n_streams, d, dtype=dt), _randn(g, n_streams, n_streams * d, scale=0.05),
            torch.tensor([0.7]), _randn(g, n_streams, scale=0.3)), k=n_streams * d, slice0=_first(0)))
    # V4-Flash's hidden size (the fused mHC kernels on Ascend take only 4096 / 7168)
    d_flash, mix = 4096, (2 + n_streams) * n_streams
    cases.append(Case("hc_pre", "hc_pre/flash_width/bfloat16", 64, BF16, lambda g: (
        _randn(g, 1, 2, n_streams, d_flash, dtype=BF16), _randn(g, mix, n_streams * d_flash, scale=0.01),
        torch.tensor([0.5, 1.5, 2.0]), _randn(g, mix, scale=0.3)), k=n_streams * d_flash, large=True))

    def post_flash(g):
        comb = torch.rand(1, 2, n_streams, n_streams, generator=g)
        comb[..., 0, 3] += 2.0
        return (_randn(g, 1, 2, d_flash, dtype=BF16), _randn(g, 1, 2, n_streams, d_flash, dtype=BF16),
                torch.rand(1, 2, n_streams, generator=g) * 2, comb)
    cases.append(Case("hc_post", "hc_post/flash_width/bfloat16", 65, BF16, post_flash, large=True))
    return cases


# ----------------------------------------------------------------------------------------------- MoE
def _experts(g, fmt, e=4, d=128, i=128, scale=0.08):
    w1, w2, w3 = _randn(g, e, i, d, scale=scale), _randn(g, e, d, i, scale=scale), _randn(g, e, i, d, scale=scale)
    if fmt == "bf16":
        return ref.ExpertWeights("bf16", w1.to(BF16), w2.to(BF16), w3.to(BF16))
    quant = quant_fp8_weight if fmt == "fp8" else quant_fp4_weight

    def stacked(w):
        pairs = [quant(w[j]) for j in range(e)]
        scales = torch.stack([sc for _, sc in pairs])
        # FP4 experts carry e8m0 scales, as in the checkpoint (their scales are powers of two by construction)
        return torch.stack([q for q, _ in pairs]), (scales.to(torch.float8_e8m0fnu) if fmt == "fp4" else scales)
    (a, sa), (b, sb), (c, sc) = stacked(w1), stacked(w2), stacked(w3)
    return ref.ExpertWeights(fmt, a, b, c, sa, sb, sc)


def moe_cases() -> list[Case]:
    cases = []
    t, d, e, k = 6, 128, 8, 2
    for score_func in ("sqrtsoftplus", "sigmoid", "softmax"):
        cases.append(Case("moe_route", f"moe_route/{score_func}", 71, F32, lambda g, sf=score_func: (
            _randn(g, t, d, dtype=BF16), _randn(g, e, d, dtype=BF16, scale=0.1), _randn(g, e, scale=0.1), None, None,
            k, sf, 1.5), slice0=_first(0), fp64_reference=False))
    # DESIGN.md 5 case 4: a hash-routed layer (experts from the token id, weights from the scores)
    cases.append(Case("moe_route", "moe_route/hash_layer", 72, F32, lambda g: (
        _randn(g, t, d, dtype=BF16), _randn(g, e, d, dtype=BF16, scale=0.1), None,
        torch.randint(0, e, (50, k), generator=g), torch.randint(0, 50, (t,), generator=g), k), slice0=_first(0, 4),
        fp64_reference=False))

    def experts_args(g, fmt, dt, t=t, limit=10.0, big=False, idle_expert=False, shared=True, unrouted_slot=True):
        x = _randn(g, t, d, dtype=dt, scale=30.0 if big else 1.0)   # big: gate/up beyond +-10 (case 1)
        idx = torch.randint(0, 4, (t, k), generator=g)
        if idle_expert:
            idx[idx == 3] = 2                                       # expert 3 gets no token (case 8)
        if unrouted_slot and t > 1:
            idx[0, 1] = -1                                          # a slot without an expert (EP padding)
        w = torch.rand(t, k, generator=g)
        return x, idx, w, _experts(g, fmt), (_experts(g, fmt, e=1) if shared else None), limit

    for fmt in ("bf16", "fp8", "fp4"):
        for dt in ((BF16, F32) if fmt == "bf16" else (BF16,)):
            name = str(dt).split(".")[-1]
            cases.append(Case("moe_experts", f"moe_experts/{fmt}/{name}", 73, dt,
                              lambda g, f=fmt, dt=dt: experts_args(g, f, dt), k=128, slice0=_first(0, 1, 2)))
        cases.append(Case("moe_experts", f"moe_experts/{fmt}/clamp_beyond_10", 74, BF16,
                          lambda g, f=fmt: experts_args(g, f, BF16, big=True, unrouted_slot=False), k=128,
                          slice0=_first(0, 1, 2)))
    cases.append(Case("moe_experts", "moe_experts/bf16/every_slot_routed", 77, BF16,
                      lambda g: experts_args(g, "bf16", BF16, unrouted_slot=False), k=128, slice0=_first(0, 1, 2)))
    cases.append(Case("moe_experts", "moe_experts/bf16/zero_token_expert", 75, BF16,
                      lambda g: experts_args(g, "bf16", BF16, idle_expert=True, unrouted_slot=False), k=128))
    cases.append(Case("moe_experts", "moe_experts/fp8/T1_no_shared", 76, BF16,
                      lambda g: experts_args(g, "fp8", BF16, t=1, shared=False), k=128))
    return cases


def all_cases(small: bool = False) -> list[Case]:
    cases = (quant_cases() + linear_cases() + norm_rope_cases() + attention_cases() + compressor_cases()
             + mhc_cases() + moe_cases())
    return [c for c in cases if not (small and c.large)]
