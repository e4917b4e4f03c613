"""Triton providers of `fp8_linear` and `fp4_linear` (block-scaled GEMMs) and of the float-weight GEMMs
`linear` and `grouped_linear`.

fp8_linear: x is quantised per row in blocks of 128 by the registry's `quant_fp8` op (whatever provider the
active backend picks; its result is bit-exact by contract), then one Triton GEMM multiplies fp8 x fp8 on the
tensor cores, 128 deep at a time, and adds each partial product times a_s[m, kb] * w_s[n/128, kb] into an fp32
accumulator, as DeepSeek's fp8_gemm does. Output in x's dtype.

fp4_linear: same activation quantisation; the packed e2m1 weight and its per-32 scales are unpacked in-kernel
and both operands are dequantised exactly to bf16 (fp8 * 2^k and e2m1 * 2^k have at most 4 significant bits),
so a bf16 tensor-core product with fp32 accumulation reproduces the exact-product sum of the reference. It runs
at bf16 MMA rate. On Hopper (no FP4 MMA) the faster route for FP4 weights is FP8: load_model(weights="auto")
on a GPU below compute capability 10, or weights="fp8", has the loader convert every FP4 matrix once, exactly
(reference.fp4_to_fp8_weight), so fp8_linear / moe_experts run on FP8 MMAs for 2x the FP4 weight memory.

Launch plan (plan_tiles; no autotuning, no host syncs): the tile shape is fixed per M bucket (M <= 16, <= 64,
then one bucket per power of two), and within it the plan fills the GPU: BLOCK_N narrows (128 -> 32 for decode,
128 -> 64 above, then BLOCK_M 128 -> 64) until the tiles cover the SMs, and when they still do not, K is split
into at most MAX_SPLIT_K contiguous ranges of at least MIN_SPLIT_KBLOCKS 128-deep blocks. Each split writes an
fp32 partial and splitk_reduce_kernel adds them in split order, so results are deterministic. A decode GEMM
such as wkv (M <= 16, N = 512, K = 4096) then streams its weight through 128 programs instead of 16; the extra
traffic is the fp32 partials (M x N x 4 bytes per split), far below the weight bytes (analysis, not measured on
a GPU).
A row's result depends only on its M bucket, N, K and the SM count: bitwise the same for every M of a bucket,
possibly different in the last bits across buckets (different tiles, MMA instructions and splits add in different
orders). The providers therefore do not claim batch invariance (registered batch_invariant=False: conformance
records what it sees); moe_experts is the op whose contract needs invariance across all batch sizes (see moe.py).
The compressor's fp32 projections use `linear_f32_fixed`: the same float kernel with one plan for every M, so
batch-invariant.
"""
from __future__ import annotations

import torch

from dsv4_portable import ops
from dsv4_portable.devices import interpret_mode
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK
from dsv4_portable.registry import register

from .common import device_reasons, triton_availability
from .launch import launch
from .launch_helpers import cdiv, fp8_dtype_reasons, num_sms

_FLOAT_OUT = (torch.bfloat16, torch.float16, torch.float32)


def _kernels():
    from . import gemm_kernels
    return gemm_kernels


MAX_SPLIT_K = 16
MIN_SPLIT_KBLOCKS = 4     # 128-deep K blocks per split at least (512 of K)


def m_bucket(m: int) -> int:
    """The M that sizes the launch plan: 16, 64, then the next power of two (every M of a bucket gets the same
    tiles and splits, hence the same bits per row)."""
    return 16 if m <= 16 else 64 if m <= 64 else 1 << (m - 1).bit_length()


def plan_tiles(m: int, n: int, sms: int, k: int = 0, step: int = 128) -> tuple[dict, int, int]:
    """(cfg, per, splits) for an [M, N] output reduced over K = k (see the module doc): cfg the tile constexprs
    and launch options, per the K range of one split (a multiple of `step`, the kernel's K step) and splits the
    number of splits that cover K, which is what the launch's grid axis 1 holds (1 when k is 0)."""
    mb = m_bucket(m)
    if mb > 64:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)
        narrowest = 64
    else:
        cfg = dict(BLOCK_M=mb, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
        narrowest = 32

    def tiles():
        return -(-mb // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    while cfg["BLOCK_N"] > narrowest and tiles() < sms:
        cfg["BLOCK_N"] //= 2
    if mb > 64 and cfg["BLOCK_N"] < 128:      # 128 x 64, then 64 x 64 tiles: one warp group
        cfg.update(num_warps=4, num_stages=4)
        if tiles() < sms:
            cfg["BLOCK_M"] = 64
    want = max(1, min(cdiv(sms, tiles()), cdiv(k, 128) // MIN_SPLIT_KBLOCKS, MAX_SPLIT_K))
    per = max(1, cdiv(cdiv(k, step), want)) * step      # whole K steps per split; the last split may be shorter
    return cfg, per, cdiv(k, per) if k else 1


def _splitk_buffer(splits: int, groups: int, m: int, n: int, device) -> torch.Tensor:
    """fp32 partials [groups, splits, M, N], or a 1-element dummy (never read) when K is not split."""
    return torch.empty(groups * splits * m * n if splits > 1 else 1, dtype=torch.float32, device=device)


def _reduce_splits(part, out, splits, m, n, groups, stride_cm, stride_cg):
    from .tl_helpers import tl_dtype
    block = 1024
    launch(_kernels().splitk_reduce_kernel, (cdiv(m * n, block), groups), part, out, m, n, splits, stride_cm,
           stride_cg, OUT_DT=tl_dtype(out.dtype), INTERPRET=interpret_mode(), BLOCK=block, num_warps=4)


def _common_reasons(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> list[str]:
    reasons = device_reasons(x, w, w_scale)
    if x.dtype not in _FLOAT_OUT:
        reasons.append(f"x dtype {x.dtype} not supported (bf16, fp16, fp32; fp64 runs on the reference)")
    if w_scale.dtype not in (torch.float32, torch.float8_e8m0fnu):
        reasons.append(f"w_scale dtype {w_scale.dtype} not supported (float32 or float8_e8m0fnu)")
    if not w.is_contiguous() or not w_scale.is_contiguous():
        reasons.append("w and w_scale must be contiguous (weights are prepared once at load)")
    # both kernels load e4m3 activations (Triton's fp8e4nv, sm89+); fp8_linear also multiplies them in fp8
    return reasons + fp8_dtype_reasons()


def _supports_fp8(x, w, w_scale, scale_fmt="ue8m0"):
    return _common_reasons(x, w, w_scale)


def _supports_fp4(x, w, w_scale, scale_fmt="ue8m0"):
    return _common_reasons(x, w, w_scale)


def _scale_arg(w_scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """e8m0 scales go in as their exponent bytes (decoded in-kernel, no conversion pass)."""
    if w_scale.dtype == torch.float8_e8m0fnu:
        return w_scale.view(torch.uint8), True
    return w_scale, False


def _quantised_rows(x: torch.Tensor, scale_fmt):
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = ops.quant_fp8(x2, FP8_LINEAR_BLOCK, scale_fmt)
    return xq.contiguous(), xs.float().contiguous()


# batch_invariant=False for the four GEMM providers: bitwise within an M bucket, not across buckets (module doc)
@register("fp8_linear", "triton", "cuda", available=triton_availability, supports=_supports_fp8,
          batch_invariant=False, note="Triton block-scaled FP8 GEMM; activations via the registry's quant_fp8")
def fp8_linear_triton(x, w, w_scale, scale_fmt="ue8m0"):
    from .tl_helpers import tl_dtype
    k_mod = _kernels()
    n, k = w.shape
    xq, xs = _quantised_rows(x, scale_fmt)
    m = xq.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        cfg, per, splits = plan_tiles(m, n, num_sms(x.device), k, 128)
        part = _splitk_buffer(splits, 1, m, n, x.device)
        ws, e8m0 = _scale_arg(w_scale)
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), splits)
        launch(k_mod.fp8_gemm_kernel, grid, xq, xs, w, ws, out, part, m, n, k, xq.stride(0), out.stride(0),
               per // 128, BS_E8M0=e8m0, OUT_DT=tl_dtype(x.dtype), INTERPRET=interpret_mode(), SPLIT=splits > 1, **cfg)
        if splits > 1:
            _reduce_splits(part, out, splits, m, n, 1, out.stride(0), 0)
    return out.view(*x.shape[:-1], n)


@register("fp4_linear", "triton", "cuda", available=triton_availability, supports=_supports_fp4,
          batch_invariant=False, note="Triton FP8 x FP4 GEMM, FP4 unpacked in-kernel, exact bf16 dequantised operands")
def fp4_linear_triton(x, w, w_scale, scale_fmt="ue8m0"):
    import triton.language as tl
    from .tl_helpers import tl_dtype
    k_mod = _kernels()
    n, k = w.shape[0], 2 * w.shape[1]
    xq, xs = _quantised_rows(x, scale_fmt)
    m = xq.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        cfg, _, _ = plan_tiles(m, n, num_sms(x.device))    # k = 0: no split (the FP4 kernel does not split K)
        ws, e8m0 = _scale_arg(w_scale)
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
        interp = interpret_mode()
        launch(k_mod.fp4_gemm_kernel, grid, xq, xs, w.view(torch.uint8), ws, out, m, n, k, xq.stride(0),
               out.stride(0), BS_E8M0=e8m0, OUT_DT=tl_dtype(x.dtype), DOT_DT=tl.float32 if interp else tl.bfloat16,
               INTERPRET=interp, BLOCK_K=64, **cfg)
    return out.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------- float weights
def _supports_float(x, w):
    reasons = device_reasons(x, w)
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in _FLOAT_OUT:
            reasons.append(f"'{name}' dtype {t.dtype} not supported (bf16, fp16, fp32; fp64 runs on the reference)")
    if not w.is_contiguous():
        reasons.append("w must be contiguous (weights are prepared once at load)")
    if w.shape[1] % 16:
        reasons.append(f"K={w.shape[1]} is not a multiple of 16 (tensor-core tiles)")
    return reasons


FLOAT_BLOCK_K = {True: 32, False: 64}    # K step of the float kernel: fp32 dot operands / 16-bit operands


def _launch_float(x3, w, out, cfg: dict, per: int, splits: int, dot_dt, precision: str) -> None:
    """One float_gemm_kernel launch of a plan (cfg, per, splits from plan_tiles), then the split reduce."""
    import triton.language as tl
    from .tl_helpers import tl_dtype
    m, groups, k = x3.shape
    n = w.shape[1]
    part = _splitk_buffer(splits, groups, m, n, x3.device)
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), splits, groups)
    launch(_kernels().float_gemm_kernel, grid, x3, w, out, part, m, n, k, x3.stride(0), out.stride(0), per,
           x3.stride(1), w.stride(0), out.stride(1), OUT_DT=tl_dtype(out.dtype), DOT_DT=dot_dt,
           PRECISION=precision, INTERPRET=interpret_mode(), SPLIT=splits > 1,
           BLOCK_K=FLOAT_BLOCK_K[dot_dt == tl.float32], **cfg)
    if splits > 1:
        _reduce_splits(part, out, splits, m, n, groups, out.stride(0), out.stride(1))


def _float_gemm(x3: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[:, g] = x3[:, g] @ w[g]^T for every group g in one launch (grid axis 2), split over K when the tiles
    alone cannot fill the GPU. x3 [M, G, K] (unit last stride), w [G, N, K] contiguous, out [M, G, N]."""
    import triton.language as tl
    from .tl_helpers import dot_precision, tl_dtype
    m, groups, k = x3.shape
    n = w.shape[1]
    interp = interpret_mode()
    exact16 = x3.dtype == w.dtype and x3.dtype in (torch.bfloat16, torch.float16)
    # the interpreter's bf16 dot is wrong (DESIGN.md section 3): fp32 there, exact for bf16 inputs anyway
    dot_dt = tl_dtype(x3.dtype) if exact16 and not interp else tl.float32
    # fp32 operands: exact fp32 FMAs while the product is memory-bound (M <= 16: the fp32 head at decode);
    # above, TF32x3 on the tensor cores (split products, relative error ~2^-21 per product, well inside the
    # op's fp32 tolerance): sm90 compiles the 64-row head tile to wgmma without spills, where the FMA tile
    # spilled (compile_check). The interpreter computes exact fp32 either way.
    precision = dot_precision(dot_dt)
    if dot_dt == tl.float32 and not exact16 and m_bucket(m) > 16 and not interp:
        precision = "tf32x3"
    # split granularity: MIN_SPLIT_KBLOCKS x 128 of K, in whole K steps of the kernel
    cfg, per, splits = plan_tiles(m, n * groups, num_sms(x3.device), k, FLOAT_BLOCK_K[dot_dt == tl.float32])
    _launch_float(x3, w, out, cfg, per, splits, dot_dt, precision)


def linear_f32_fixed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (unit last stride) @ w [N, K]^T (contiguous; any float dtypes) -> fp32 [M, N], batch-invariant.

    One launch plan for every M: the plan of a 16-row call (BLOCK_M 16; BLOCK_N and the K split from N, K and
    the SM count only, so decode still spreads the weight over the GPU) and exact fp32 products ("ieee", never
    TF32). Each output element is reduced in the same order whatever M is, so a row's bits do not depend on
    the other rows of the call, as with the reference's fixed 16-row tiles (reference.quant.linear_f32). The
    price at prefill: 16-row tiles, and the decode-sized K split writes M x N x 4 bytes of partials per split
    (offline sm90 compile: 52 registers, no spills; speed not measured on a GPU). The compressor's projections
    use it."""
    import triton.language as tl
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m and n:
        cfg, per, splits = plan_tiles(16, n, num_sms(x.device), k, FLOAT_BLOCK_K[True])
        _launch_float(x.unsqueeze(1), w.unsqueeze(0), out.unsqueeze(1), cfg, per, splits, tl.float32, "ieee")
    return out


@register("linear", "triton", "cuda", available=triton_availability, supports=_supports_float,
          batch_invariant=False,
          note="Triton GEMM for float weights (bf16 weight mode, the fp32 head): fp32 accumulation, deterministic "
               "split-K when the tiles cannot fill the GPU")
def linear_triton(x, w):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, (n, k) = x2.shape[0], w.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        _float_gemm(x2.unsqueeze(1), w.unsqueeze(0), out.unsqueeze(1))
    return out.view(*x.shape[:-1], n)


def _supports_grouped(x, w):
    return _supports_float(x, w[0]) if w.shape[0] else ["no groups"]


@register("grouped_linear", "triton", "cuda", available=triton_availability, supports=_supports_grouped,
          batch_invariant=False,
          note="the float GEMM with the group as a grid axis (wo_a: 8 groups on V4-Flash, 16 on Pro), one launch")
def grouped_linear_triton(x, w):
    g_count, n, k = w.shape
    x3 = x.reshape(-1, g_count, k)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    m = x3.shape[0]
    out = torch.empty(m, g_count, n, dtype=x.dtype, device=x.device)
    if m and n:
        _float_gemm(x3, w, out)
    return out.view(*x.shape[:-2], g_count, n)
