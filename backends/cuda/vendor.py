"""Optional vendor providers: FlashMLA for sparse_attn, DeepGEMM for fp8_linear.

NOT RUN IN THIS SESSION: no GPU and neither library was installed when these adapters were written; the
argument mapping follows the libraries' sources (FlashMLA 9241ae3 `flash_mla/flash_mla_interface.py`,
`csrc/api/sparse_fwd.h`, `tests/ref.py`; DeepGEMM 54e2261 `csrc/apis/gemm.hpp`, `csrc/apis/layout.hpp`).
Each provider is detected by import and gated on compute capability; where the library is missing it reports
why and is never selected. A GPU session must run tests/test_triton_compute_ops.py's vendor checks (they
compare against the reference through the registry) before these are trusted.

flash_mla (sparse_attn) uses `flash_mla_sparse_fwd` (the sparse prefill kernel, bf16 kv):
  our call                              FlashMLA
  q [B, S, H, 512] bf16            ->   q [B*S, h_q, 512], h_q = 64 or 128 (heads zero-padded; padded outputs
                                        are dropped)
  kv [B, N, 512] bf16              ->   kv [B*N, 1, 512] (a view: batches laid end to end)
  idx [B, S, K] int32              ->   indices [B*S, 1, K'] = idx + b*N where 0 <= idx < N, else -1; K' = K
                                        padded with -1 to a multiple of 128 (SM90 needs topk % 128 == 0)
  sink [H] fp32                    ->   attn_sink [h_q] (FlashMLA: out * exp(lse) / (exp(lse) + exp(sink)),
                                        -inf no effect, +inf gives 0: the same definition as ours)
  scale                            ->   sm_scale; d_v = 512
  A row with no valid index gives 0 (FlashMLA's tests/ref.py: lonely queries output 0).
  Cost of the mapping: one small elementwise pass over idx, and a copy of q when H is not 64/128. Worth it
  for prefill. Declined: a kv that is not contiguous (the [B*N, 1, D] flattening would copy it), and
  decode-sized calls: sparse_fwd runs one thread block per query and 64 heads, so B*S*ceil(H/64) blocks below
  half the SMs leave the GPU idle where the Triton split-K kernel spreads the index list. For decode FlashMLA's
  fast kernel is `flash_mla_with_kvcache(..., is_fp8_kvcache=True)`, which
  needs the paged FP8 "fp8_ds_mla" cache (584 B per token: 448 e4m3 + 64 bf16 rope dims + 7 ue8m0 scales
  + pad, pages of 64 tokens, SWA and compressed caches passed as k_cache / extra_k_cache). Converting our
  bf16 kv to that layout on every call would re-quantise the whole cache per step: not worth it. That path
  belongs to a cache-layout step (the model's KV cache written in FlashMLA's layout), not to this registry op.
  The model graph calls `window_sparse_attn` (ring + new rows + compressed entries), for which no FlashMLA
  provider is registered: this adapter serves direct `sparse_attn` calls only.

deep_gemm (fp8_linear) uses `fp8_gemm_nt((x_fp8, x_scales), (w, w_scales), out)`: x is quantised with the
  registry's quant_fp8 (1x128, fp32 scales); weight scales go in as fp32 [ceil(N/128), K/128] (e8m0 scales
  are widened, exact). DeepGEMM's default recipe is (1, 128, 128) on SM90 (fp32 scales, used as given) and on
  SM100 it packs fp32 scales to UE8M0 itself - exact only for power-of-two scales, so scale_fmt=None is
  declined on SM100, and so are fp32 weight scales that are not powers of two (Base checkpoints; checked once
  per weight tensor, see scales_are_pow2). It transforms the scales on every call: a weights-prep step should
  pre-transform weight scales with deep_gemm.transform_sf_into_required_layout once. Output dtype bf16 or
  fp32; SM90's kernel (sm90_fp8_gemm_1d2d) writes bf16 only, so fp32 activations are declined there.

Not provided, with reasons:
- DeepGEMM `fp8_fp4_mqa_logits` for indexer_topk: it takes FP8 (or FP4) q and keys with per-row / per-block
  scales. Our op receives float q and k; quantising them changes the scores (and the selected set) unless the
  inputs are already exactly representable (true for QAT-simulated FP4 values, false with quant_sim off), and
  checking that costs a pass and a host sync. The sound mapping is an op over a quantised indexer cache (the
  132-byte FP8 key layout), i.e. a cache-layout step, not this registry op.
- DeepGEMM grouped GEMMs for moe_experts: possible later (m_grouped_fp8_gemm_nt_contiguous needs rows padded
  per expert to its M alignment and a different batch-invariance argument); not written here.
"""
from __future__ import annotations

import importlib
import weakref

import torch

from dsv4_portable import ops
from dsv4_portable.reference.quant import FP8_LINEAR_BLOCK
from dsv4_portable.registry import register

from .common import capability
from .launch_helpers import num_sms

_FLASH_MLA_MODULES = ("flash_mla", "vllm.third_party.flashmla.flash_mla_interface")
_cache: dict[str, object] = {}


def _find(modules: tuple[str, ...], attr: str):
    """The first importable module that has `attr`, or the reasons none does (cached)."""
    key = f"{modules}:{attr}"
    if key not in _cache:
        reasons = []
        for m in modules:
            try:
                mod = importlib.import_module(m)
            except Exception as e:  # ImportError, or a broken binary extension (OSError, RuntimeError)
                reasons.append(f"import {m} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                continue
            if hasattr(mod, attr):
                _cache[key] = getattr(mod, attr)
                break
            reasons.append(f"{m} has no {attr}")
        else:
            _cache[key] = reasons
    return _cache[key]


def _gpu_reasons(archs: tuple[int, ...], what: str) -> list[str]:
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    major, minor = capability()
    if major not in archs:
        return [f"{what} supports SM{'/SM'.join(f'{a}0' for a in archs)}; this GPU is SM{major}{minor}"]
    return []


def _cuda_tensors(*tensors) -> list[str]:
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return [f"tensor on {t.device}, this provider runs on cuda"]
    return []


# ----------------------------------------------------------------------------------------------- FlashMLA
def flash_mla_availability() -> list[str]:
    fn = _find(_FLASH_MLA_MODULES, "flash_mla_sparse_fwd")
    reasons = list(fn) if isinstance(fn, list) else []
    if reasons:
        reasons = ["FlashMLA not importable (pip install sgl-flash-mla, or a vLLM build with FlashMLA): "
                   + "; ".join(reasons)]
    return reasons + _gpu_reasons((9, 10), "FlashMLA sparse attention")


def flash_mla_sparse_ctas(b: int, s: int, h: int) -> int:
    """Thread blocks flash_mla_sparse_fwd launches: one per query and 64 (padded) heads."""
    return b * s * (1 if h <= 64 else 2)


def _flash_mla_supports(q, kv, sink, idx, scale):
    reasons = _cuda_tensors(q, kv, sink, idx)
    b, s, h = q.shape[:3]
    if q.dtype != torch.bfloat16:
        reasons.append(f"FlashMLA sparse_fwd needs bf16 q/kv, got {q.dtype}")
    if q.shape[-1] != 512:
        reasons.append(f"FlashMLA sparse_fwd with d_v 512 needs head_dim 512, got {q.shape[-1]}")
    if h > 128:
        reasons.append(f"{h} heads > 128 (FlashMLA pads heads to 64 or 128)")
    if kv.shape[0] * kv.shape[1] >= 2 ** 31:
        reasons.append("B*N kv rows exceed int32 indices")
    if not kv.is_contiguous():
        reasons.append("kv must be contiguous: flattening [B, N, D] to FlashMLA's [B*N, 1, D] would copy the "
                       "whole kv on every call")
    ctas, sms = flash_mla_sparse_ctas(b, s, h), num_sms(q.device)
    if ctas < sms // 2:
        reasons.append(f"decode-sized call: flash_mla_sparse_fwd (the prefill kernel) would run {ctas} thread "
                       f"block(s) on {sms} SMs (one per query and 64 heads); the Triton split-K kernel spreads "
                       "the index list over the GPU. FlashMLA's decode kernel (flash_mla_with_kvcache) needs its "
                       "paged FP8 cache layout and is not mapped")
    return reasons


@register("sparse_attn", "flash_mla", "cuda", available=flash_mla_availability, supports=_flash_mla_supports,
          note="FlashMLA flash_mla_sparse_fwd on a bf16 kv (layout: batches flattened to [B*N, 1, 512], indices "
               "offset by b*N, heads padded to 64/128, top-k padded to a multiple of 128). The FP8 paged "
               "decode kernel needs FlashMLA's 584-B cache layout and is not mapped. NOT RUN in the session "
               "that wrote it.")
def sparse_attn_flash_mla(q, kv, sink, idx, scale):
    fwd = _find(_FLASH_MLA_MODULES, "flash_mla_sparse_fwd")
    b, s, h, d = q.shape
    n, k = kv.shape[1], idx.shape[-1]
    hp = 64 if h <= 64 else 128
    qf = q.reshape(b * s, h, d)
    sinkf = sink.float()
    if hp != h:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, hp - h))
        sinkf = torch.nn.functional.pad(sinkf, (0, hp - h))
    offs = (torch.arange(b, device=q.device, dtype=torch.int32) * n).view(b, 1, 1)
    ids = torch.where((idx >= 0) & (idx < n), idx + offs, -1)
    kp = max(128, -(-k // 128) * 128)
    ids = torch.nn.functional.pad(ids, (0, kp - k), value=-1).reshape(b * s, 1, kp).to(torch.int32)
    out = fwd(qf.contiguous(), kv.view(b * n, 1, d), ids.contiguous(), float(scale), 512, sinkf.contiguous())[0]
    return out[:, :h].reshape(b, s, h, d)


# ----------------------------------------------------------------------------------------------- DeepGEMM
def deep_gemm_availability() -> list[str]:
    fn = _find(("deep_gemm",), "fp8_gemm_nt")
    reasons = list(fn) if isinstance(fn, list) else []
    if reasons:
        reasons = ["DeepGEMM not importable (pip install sgl-deep-gemm; PyPI deep-gemm 1.0.0 is a stale stub): "
                   + "; ".join(reasons)]
    return reasons + _gpu_reasons((9, 10), "DeepGEMM fp8_gemm_nt")


_pow2_cache: dict[int, tuple[weakref.ref, int, bool]] = {}


def scales_are_pow2(s: torch.Tensor) -> bool:
    """True when every scale is a positive power of two (e8m0 scales always are). Checked once per weight tensor
    (one host sync at its first use, then cached per tensor object and version): DeepGEMM on SM100 keeps only
    the exponent of fp32 scales, which is exact only for powers of two."""
    if s.dtype == torch.float8_e8m0fnu:
        return True
    key = id(s)
    hit = _pow2_cache.get(key)
    if hit is not None and hit[0]() is s and hit[1] == s._version:
        return hit[2]
    ok = bool((torch.frexp(s.float()).mantissa == 0.5).all())
    if hit is None:
        weakref.finalize(s, _pow2_cache.pop, key, None)
    _pow2_cache[key] = (weakref.ref(s), s._version, ok)
    return ok


def _deep_gemm_supports(x, w, w_scale, scale_fmt="ue8m0"):
    reasons = _cuda_tensors(x, w, w_scale)
    arch = capability()[0]
    if x.dtype not in (torch.bfloat16, torch.float32):
        reasons.append(f"DeepGEMM writes bf16 or fp32 outputs; x is {x.dtype}")
    elif arch == 9 and x.dtype != torch.bfloat16:
        reasons.append(f"DeepGEMM's SM90 FP8 GEMM (1D2D scaling) writes bf16 outputs only; x is {x.dtype}")
    if w_scale.dtype not in (torch.float32, torch.float8_e8m0fnu):
        reasons.append(f"w_scale dtype {w_scale.dtype} not supported (float32 or e8m0)")
    if w.shape[0] % 64:
        reasons.append(f"N = {w.shape[0]} is not a multiple of 64 (conservative TMA/block alignment; unverified)")
    if not w.is_contiguous():
        reasons.append("w must be contiguous (K-major)")
    if arch == 10:
        if scale_fmt is None:
            reasons.append("scale_fmt None gives non-power-of-two activation scales; DeepGEMM on SM100 packs "
                           "scales to UE8M0")
        if w_scale.dtype == torch.float32 and not scales_are_pow2(w_scale):
            reasons.append("w_scale holds fp32 scales that are not powers of two (Base checkpoints); DeepGEMM on "
                           "SM100 packs scales to UE8M0 by keeping the exponent only, which would scale the "
                           "weight down")
    return reasons


@register("fp8_linear", "deep_gemm", "cuda", available=deep_gemm_availability, supports=_deep_gemm_supports,
          note="DeepGEMM fp8_gemm_nt with 1x128 activation / 128x128 weight fp32 scales. NOT RUN in the session "
               "that wrote it.")
def fp8_linear_deep_gemm(x, w, w_scale, scale_fmt="ue8m0"):
    gemm = _find(("deep_gemm",), "fp8_gemm_nt")
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = ops.quant_fp8(x2, FP8_LINEAR_BLOCK, scale_fmt)
    out = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    if out.numel():
        gemm((xq.contiguous(), xs.float().contiguous()), (w, w_scale.float().contiguous()), out)
    return out.view(*x.shape[:-1], w.shape[0])
