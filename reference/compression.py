"""KV compressor of CSA (ratio 4, overlapping windows) and HCA (ratio 128) layers (DESIGN.md 2.4).

Every `ratio` tokens become one compressed entry: a per-feature softmax-weighted sum of the window's projected
rows, then RMSNorm, RoPE at the window's first position, then the QAT round trip. With overlap (ratio 4) each
entry pools 2*ratio rows: the first half of the 2d projected features of window i-1 and the second half of
window i (entry 0's missing half is kv 0 / score -inf).

The step function keeps DeepSeek's decode state layout, so prefill, decode and chunked prefill are one code
path and "prefill then decode == one longer prefill" holds by construction:
  kv_state, score_state: fp32 [B, coff*ratio, coff*d]; with overlap rows [0, ratio) hold the previous full
  window and rows [ratio, 2*ratio) the current one (slot ratio + pos % ratio); without, rows [0, ratio) hold the
  current window. Scores are stored with the positional bias `ape` already added. Initial state: kv 0, score -inf.
"""
from __future__ import annotations

import torch

from .invariant import f64
from .rotation import hadamard
from .norm import rms_norm
from .quant import FP8_KV_BLOCK, fp4_roundtrip, fp8_roundtrip, linear_f32
from .rotary import rope


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Pool aligned windows.

    Without overlap: kv, score [B, n*ratio, d] -> [B, n, d], entry i = sum_t kv_t * softmax_t(score_t) over
    rows [i*ratio, (i+1)*ratio), separately for every feature.
    With overlap: kv, score [B, (n+1)*ratio, 2d], rows [0, ratio) being the window before entry 0; entry i pools
    rows [i*ratio, (i+1)*ratio) of features [0, d) together with rows [(i+1)*ratio, (i+2)*ratio) of features
    [d, 2d) (2*ratio rows per feature). Computed in the inputs' float dtype (fp32 in the model)."""
    b, length, c = kv.shape
    if overlap:
        d = c // 2
        n = length // ratio - 1
        kvw = kv.view(b, n + 1, ratio, c)
        scw = score.view(b, n + 1, ratio, c)
        kv8 = torch.cat([kvw[:, :-1, :, :d], kvw[:, 1:, :, d:]], dim=2)   # [B, n, 2*ratio, d]
        sc8 = torch.cat([scw[:, :-1, :, :d], scw[:, 1:, :, d:]], dim=2)
    else:
        n = length // ratio
        kv8 = kv.view(b, n, ratio, c)
        sc8 = score.view(b, n, ratio, c)
    return (kv8 * f64(torch.softmax, sc8, dim=2)).sum(dim=2)


def compressor(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
               norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int,
               rotate: bool = False, quant: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """One compressor step over S new tokens at absolute positions [start_pos, start_pos + S).

    x: [B, S, dim] activations; wkv, wgate: [coff*d, dim] (fp32 linears on x.float(); coff = 2 iff ratio == 4);
    ape: float32 [ratio, coff*d]; norm_weight: [d]; cos, sin: float32 RoPE tables [P, R/2] indexed by absolute
    position (P > last emitted entry's position); kv_state, score_state: float32 [B, coff*ratio, coff*d],
    updated in place; rotate: Hadamard + FP4 QAT (the indexer's keys) instead of FP8 QAT of the non-rope dims;
    quant: apply the QAT round trip (quant_sim).
    Returns the entries completed in this step, [B, n_new, d] in x's dtype, n_new = (start_pos+S)//ratio -
    start_pos//ratio; entry j sits at compressed index start_pos//ratio + j (position (start_pos//ratio + j)*ratio).
    """
    b, s, _ = x.shape
    overlap = ratio == 4
    coff = 2 if overlap else 1
    d = wkv.shape[0] // coff
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    kv = linear_f32(xf, wkv)         # batch-invariant, so chunked prefill equals one prefill bit for bit
    score = linear_f32(xf, wgate)
    pos = torch.arange(start_pos, start_pos + s, device=x.device)
    score = score + ape.to(cd)[pos % ratio]

    w0 = start_pos // ratio                    # window holding start_pos
    have = start_pos - w0 * ratio              # rows of that window already in the state
    cur0 = ratio if overlap else 0
    rows_kv = torch.cat([kv_state[:, cur0:cur0 + have].to(cd), kv], dim=1)
    rows_sc = torch.cat([score_state[:, cur0:cur0 + have].to(cd), score], dim=1)
    n_new = (start_pos + s) // ratio - w0
    full = n_new * ratio
    if overlap:
        prev_kv, prev_sc = kv_state[:, :ratio].to(cd), score_state[:, :ratio].to(cd)
        pooled = compress_pool(torch.cat([prev_kv, rows_kv[:, :full]], 1),
                               torch.cat([prev_sc, rows_sc[:, :full]], 1), ratio, True)
        if n_new > 0:
            kv_state[:, :ratio] = rows_kv[:, full - ratio:full].to(kv_state.dtype)
            score_state[:, :ratio] = rows_sc[:, full - ratio:full].to(score_state.dtype)
    else:
        pooled = compress_pool(rows_kv[:, :full], rows_sc[:, :full], ratio, False)
    rest = rows_kv.shape[1] - full
    kv_state[:, cur0:] = 0
    score_state[:, cur0:] = float("-inf")
    kv_state[:, cur0:cur0 + rest] = rows_kv[:, full:].to(kv_state.dtype)
    score_state[:, cur0:cur0 + rest] = rows_sc[:, full:].to(score_state.dtype)
    if n_new == 0:
        return x.new_zeros(b, 0, d)

    entries = rms_norm(pooled.to(x.dtype), norm_weight, eps)
    epos = (torch.arange(w0, w0 + n_new, device=x.device) * ratio)
    entries = rope(entries, cos[epos].unsqueeze(0), sin[epos].unsqueeze(0))
    if quant:
        if rotate:
            entries = fp4_roundtrip(hadamard(entries))
        else:
            rd = 2 * cos.shape[-1]
            entries = torch.cat([fp8_roundtrip(entries[..., :-rd], FP8_KV_BLOCK), entries[..., -rd:]], dim=-1)
    return entries
