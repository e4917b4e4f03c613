"""FP8 / FP4 quantisation, exactly as DeepSeek-V4 does it (DESIGN.md 2.1).

Formats: FP8 = float8_e4m3fn (max 448); FP4 = e2m1 (0, .5, 1, 1.5, 2, 3, 4, 6 and negatives), two codes per
byte with element 2i in the low nibble. Scales are powers of two (stored as float8_e8m0fnu "ue8m0" in
checkpoints and caches; carried as float32 here, which holds every power of two exactly).

Activation scale rule, per row and per block of the last dim:
    amax = max(|x_blk|, floor);  s = 2^ceil(log2(amax * fp32(1/qmax)))
The product with the fp32 reciprocal and the ceiling taken from the exponent bits reproduce DeepSeek's
`fast_round_scale` bit for bit (an exact power of two stays; anything above it rounds up).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6 * 2.0 ** -126
FP8_LINEAR_BLOCK = 128  # activation blocks of fp8_linear / fp4_linear inputs and the 128x128 weight blocks
FP8_KV_BLOCK = 64       # QAT of the 448 non-rope KV dims
FP4_BLOCK = 32          # FP4 activations and FP4 expert weights

# e2m1 magnitudes by code 0..7; codes 8..15 are the negatives.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; at a tie, round-to-nearest-even picks the even code, so ties
# at midpoints 0, 2, 4, 6 (between codes i and i+1, i even) go down and the others go up.
_FP4_MID_DOWN = (0.25, 1.25, 2.5, 5.0)   # strictly greater is needed to round up
_FP4_MID_UP = (0.75, 1.75, 3.5)          # greater or equal rounds up


def pow2_scale(amax: torch.Tensor, qmax: float, floor: float, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Per-block scale from a float32 amax: ceil-pow2 (ue8m0) or plain amax/qmax (scale_fmt None)."""
    amax = amax.float().clamp_min(floor)
    r = amax * torch.tensor(1.0 / qmax, dtype=torch.float32, device=amax.device)
    if scale_fmt is None:
        return r
    if scale_fmt != "ue8m0":
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    bits = r.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    e = exp - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((e + 127) << 23).view(torch.float32)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x.shape[-1]
    if n % block_size:
        raise ValueError(f"last dim {n} is not a multiple of the quantisation block {block_size}")
    return x.unflatten(-1, (n // block_size, block_size))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- FP8
def quant_fp8(x: torch.Tensor, block_size: int = FP8_LINEAR_BLOCK, scale_fmt: str | None = "ue8m0"):
    """Quantise the last dim of x to FP8 e4m3 in blocks.

    x: [..., N] float, N % block_size == 0.
    Returns (q float8_e4m3fn [..., N], s float32 [..., N // block_size]) with x ~= q * s per block.
    q = cast_rne(clamp(x / s, -448, 448)); s = 2^ceil(log2(max(amax, 1e-4) / 448)) (see module doc).
    """
    xb = _blocks(x.float(), block_size)
    s = pow2_scale(xb.abs().amax(-1), FP8_MAX, FP8_AMAX_FLOOR, scale_fmt)
    q = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s


def dequant_fp8(q: torch.Tensor, s: torch.Tensor, block_size: int = FP8_LINEAR_BLOCK) -> torch.Tensor:
    """Inverse of quant_fp8 (exact, in float32): q [..., N] fp8, s [..., N/block] -> [..., N]."""
    return (_blocks(q.float(), block_size) * s.float().unsqueeze(-1)).flatten(-2)


def fp8_roundtrip(x: torch.Tensor, block_size: int = FP8_KV_BLOCK, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """QAT simulation: x -> FP8 (blocks of the last dim) -> back to x.dtype. Exact in bf16/fp32 output.

    Used on the 448 non-rope dims of every KV entry with block 64 (DESIGN.md 2.1)."""
    q, s = quant_fp8(x, block_size, scale_fmt)
    return dequant_fp8(q, s, block_size).to(x.dtype)


# ----------------------------------------------------------------------------------------------- FP4
def fp4_encode(y: torch.Tensor) -> torch.Tensor:
    """Round float values already in [-6, 6] to e2m1 codes (uint8 0..15), round-to-nearest-even; the sign bit
    follows the float sign (so -0.0 and small negatives that round to zero give code 8)."""
    a = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for m in _FP4_MID_DOWN:
        code += (a > m).to(torch.uint8)
    for m in _FP4_MID_UP:
        code += (a >= m).to(torch.uint8)
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def fp4_decode(code: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (any integer dtype, 0..15) -> float32 values."""
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long() & 0xF]


def pack_fp4(code: torch.Tensor) -> torch.Tensor:
    """[..., N] codes -> [..., N/2] uint8 bytes; element 2i in the low nibble, 2i+1 in the high nibble."""
    if code.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({code.shape[-1]}) of FP4 codes")
    c = code.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., N/2] bytes (int8 or uint8 storage) -> [..., N] uint8 codes."""
    b = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed.to(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def quant_fp4(x: torch.Tensor, block_size: int = FP4_BLOCK):
    """Quantise the last dim of x to FP4 e2m1 in blocks.

    x: [..., N] float, N % block_size == 0 and N even.
    Returns (packed uint8 [..., N/2], s float32 [..., N // block_size]).
    s = 2^ceil(log2(max(amax, 6*2^-126) / 6)); code = rne_e2m1(clamp(x / s, -6, 6)).
    """
    xb = _blocks(x.float(), block_size)
    s = pow2_scale(xb.abs().amax(-1), FP4_MAX, FP4_AMAX_FLOOR, "ue8m0")
    code = fp4_encode((xb / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return pack_fp4(code.flatten(-2)), s


def dequant_fp4(packed: torch.Tensor, s: torch.Tensor, block_size: int = FP4_BLOCK) -> torch.Tensor:
    """Inverse of quant_fp4 (exact, float32): packed [..., N/2], s [..., N/block] -> [..., N]."""
    v = fp4_decode(unpack_fp4(packed))
    return (_blocks(v, block_size) * s.float().unsqueeze(-1)).flatten(-2)


def fp4_roundtrip(x: torch.Tensor, block_size: int = FP4_BLOCK) -> torch.Tensor:
    """QAT simulation: x -> FP4 e2m1 (blocks of 32) -> back to x.dtype (exact in bf16/fp32 output).

    Used on the indexer's queries and keys after the Hadamard rotation (DESIGN.md 2.1)."""
    packed, s = quant_fp4(x, block_size)
    return dequant_fp4(packed, s, block_size).to(x.dtype)


# ----------------------------------------------------------------------------------------------- weights
def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_LINEAR_BLOCK) -> torch.Tensor:
    """FP8 weight [N, K] with block scales [ceil(N/128), ceil(K/128)] (e8m0 or float32) -> float32 [N, K]."""
    n, k = w.shape
    want = (-(-n // block), -(-k // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 weight of shape {list(w.shape)} needs block scales of shape {list(want)}, "
                         f"got {list(scale.shape)}")
    s = scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def dequant_fp4_weight(w: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """FP4 weight packed as int8 [N, K/2] with e8m0 (or float32) scales [N, K/32] -> float32 [N, K]."""
    n, half = w.shape
    if tuple(scale.shape) != (n, 2 * half // block):
        raise ValueError(f"FP4 weight of shape {list(w.shape)} (packed) needs scales of shape "
                         f"{[n, 2 * half // block]}, got {list(scale.shape)}")
    return dequant_fp4(w, scale, block)


def fp4_to_fp8_weight(w: torch.Tensor, scale: torch.Tensor):
    """Exact conversion of an FP4 expert weight (packed [N, K/2], scales [N, K/32]) to an FP8 block weight
    (float8_e4m3fn [N, K], float32 scales [N/128, K/128]).

    Per 128x128 block: new scale = max(sub-scales) / 2^6 and every value is re-expressed as
    fp4 * (sub_scale / new_scale), a power of two <= 2^6 (6 * 2^6 = 384 < 448). That is exact unless a
    sub-scale is more than 2^14 below the block's largest (the smallest FP4 step would fall under e4m3's
    2^-9); such a weight raises instead of silently losing bits.
    """
    n, half = w.shape
    k = 2 * half
    if n % 128 or k % 128:
        raise ValueError(f"FP4->FP8 conversion needs both weight dims to be multiples of 128, got [{n}, {k}]")
    sub = scale.float().view(n // 128, 128, k // 128, 4)
    new = sub.amax(dim=(1, 3)) / 64.0                                       # [N/128, K/128]
    ratio = (sub / new[:, None, :, None]).repeat_interleave(32, -1).reshape(n, k)
    v = fp4_decode(unpack_fp4(w)) * ratio
    q = v.to(torch.float8_e4m3fn)
    if not torch.equal(q.float(), v):
        bad = (q.float() != v).view(n // 128, 128, k // 128, 128).any(dim=(1, 3)).sum().item()
        raise ValueError(f"FP4->FP8 conversion would lose precision in {bad} of {new.numel()} 128x128 blocks "
                         "(sub-block scales span more than 2^14); keep these experts in FP4 or dequantise to bf16")
    return q, new


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or uint8 exponent bytes) -> float32 powers of two."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.float()
    if scale.dtype == torch.uint8:
        return ((scale.to(torch.int32)) << 23).view(torch.float32)
    return scale.float()


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """float32 powers of two -> float8_e8m0fnu (raises if a scale is not an exact power of two).
    The check reads the values back to the host: for conversions at load / checkpoint-writing time. Hot paths
    whose scales come from pow2_scale (powers of two by construction) use e8m0_bits."""
    f = scale.float()
    bits = f.view(torch.int32)
    if bool(((bits & 0x7FFFFF) != 0).any()) or bool((f <= 0).any()):
        raise ValueError("e8m0 can only hold positive powers of two")
    return e8m0_bits(f).view(torch.float8_e8m0fnu)


def e8m0_bits(scale: torch.Tensor) -> torch.Tensor:
    """The exponent byte (uint8) of float32 scales that are positive powers of two, unchecked and without a host
    sync (a non-power-of-two silently loses its mantissa: only for scales from pow2_scale's ue8m0 rule)."""
    return ((scale.float().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- linears
def _batch_invariant_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T computed as a batch of fixed 16-row GEMMs (one bmm over [M/16, 16, K]), so that each
    row's result does not depend on how many other rows share the call: a plain matmul picks its kernel and
    blocking from M (EP needs this, DESIGN.md 4). A 3-D @ 2-D torch.matmul would fold back into one [M, K] GEMM,
    hence bmm over the broadcast weight."""
    m = x.shape[0]
    pad = (-m) % 16
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    tiles = x.view(-1, 16, x.shape[1])
    return torch.bmm(tiles, w.t().expand(tiles.shape[0], *w.t().shape)).reshape(-1, w.shape[0])[:m]


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Batch-invariant x @ w^T in float32 (float64 if x is float64) for any leading shape of x."""
    cd = _compute_dtype(x)
    lead = x.shape[:-1]
    y = _batch_invariant_matmul(x.reshape(-1, x.shape[-1]).to(cd), w.to(cd))
    return y.view(*lead, w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w^T for float weights: fp32 accumulation (fp64 for fp64 x), output in x's dtype, batch-invariant.

    x: [..., K] float; w: [N, K] float (any float dtype)."""
    return linear_f32(x, w).to(x.dtype)


def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-group products: y[..., g, :] = x[..., g, :] @ w[g]^T (V4's grouped output projection wo_a).

    x: [..., G, K] float; w: [G, N, K] float. fp32 accumulation, output in x's dtype, batch-invariant."""
    return torch.stack([linear_f32(x[..., g, :], w[g]) for g in range(w.shape[0])], dim=-2).to(x.dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, scale_fmt: str | None = "ue8m0"):
    """y = act_quant(x) @ dequant(w)^T with FP8 block scaling; output in x's dtype.

    x: [..., K] float (K % 128 == 0); w: float8_e4m3fn [N, K]; w_scale: [ceil(N/128), ceil(K/128)] float32 or
    float8_e8m0fnu. x is quantised per row in blocks of 128 (ue8m0 scales), both operands are dequantised
    exactly to fp32 and multiplied with fp32 accumulation."""
    xq, xs = quant_fp8(x, FP8_LINEAR_BLOCK, scale_fmt)
    xd = dequant_fp8(xq, xs, FP8_LINEAR_BLOCK)
    return linear_f32(xd, dequant_fp8_weight(w, w_scale)).to(x.dtype)


def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, scale_fmt: str | None = "ue8m0"):
    """y = act_quant(x) @ dequant_fp4(w)^T; output in x's dtype.

    x: [..., K] float (K % 128 == 0); w: packed FP4 int8/uint8 [N, K/2]; w_scale: [N, K/32] e8m0 or float32.
    Same FP8 activation quantisation as fp8_linear; the FP8 x FP4 products are exact in fp32."""
    xq, xs = quant_fp8(x, FP8_LINEAR_BLOCK, scale_fmt)
    xd = dequant_fp8(xq, xs, FP8_LINEAR_BLOCK)
    return linear_f32(xd, dequant_fp4_weight(w, w_scale)).to(x.dtype)


# ----------------------------------------------------------------------------------------------- weight quantisers
def quant_fp8_weight(w: torch.Tensor, block: int = FP8_LINEAR_BLOCK, scale_fmt: str | None = "ue8m0"):
    """Float weight [N, K] -> (float8_e4m3fn [N, K], float32 scales [ceil(N/128), ceil(K/128)]), one scale per
    128x128 block chosen like the activation rule (used to write FP8 checkpoints)."""
    n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    wp = torch.nn.functional.pad(w.float(), (0, pk, 0, pn))
    blocks = wp.view((n + pn) // block, block, (k + pk) // block, block)
    s = pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX, FP8_AMAX_FLOOR, scale_fmt)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(n + pn, k + pk)[:n, :k].contiguous(), s


def quant_fp4_weight(w: torch.Tensor, block: int = FP4_BLOCK):
    """Float weight [N, K] -> (packed int8 [N, K/2], float32 scales [N, K/32]) as in FP4 expert checkpoints."""
    packed, s = quant_fp4(w, block)
    return packed.view(torch.int8), s


# ----------------------------------------------------------------------------------------------- int8 W8A8
INT8_MAX = 127.0


def quant_int8_rows(x: torch.Tensor):
    """Symmetric per-row int8: scale = amax(|row|) / 127 (fp32, floored at 1e-12 / 127 for all-zero rows),
    q = round-half-even(x / scale) clamped to [-128, 127]. Returns (int8 q [..., K], fp32 scale [...]).
    The per-token dynamic activation rule of W8A8 (torch_npu npu_dynamic_quant)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, scale


def quant_int8_weight(w: torch.Tensor):
    """Float weight [N, K] -> (int8 [N, K], fp32 per-output-channel scales [N]) by the same per-row rule."""
    return quant_int8_rows(w)


def int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8: y = (q_x @ q_w^T) * s_x * s_w with x quantised per row (quant_int8_rows). The integer product is exact
    (float64 here, exact below 2^53; int32 on devices: |sum| <= K * 128 * 128 < 2^31 for K < 131072); the scaling
    is done in float64 and rounded once to x's dtype.

    x: [..., K] float; w: int8 [N, K]; w_scale: float32 [N]. Not DeepSeek's recipe (FP8 blocks): it is the A2/A3
    fallback for FP8/FP4 checkpoints, compared with the FP8 model by similarity only."""
    q, s = quant_int8_rows(x.reshape(-1, x.shape[-1]))
    acc = torch.matmul(q.double(), w.double().t())          # integer-valued and exact; float64 runs on any device
    y = acc * s.double().unsqueeze(-1) * w_scale.double()
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])
