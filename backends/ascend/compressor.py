"""compressor -> the fused `compressor` op (vllm-ascend _C_ascend / CANN recipes custom; A3 and 950): projections,
ape, window pooling, RMSNorm and RoPE of the compressed entries in one kernel; the QAT round trip (FP8 of the
non-rope dims, or Hadamard + FP4 for the indexer keys) is applied after it with the registry's ops.

Our op keeps DeepSeek's decode state (kv_state / score_state [B, coff*ratio, coff*d], rows by window: for ratio 4
the previous full window in rows [0, ratio), the current one in rows [ratio, 2*ratio); scores with ape added).
The vendor op keeps a paged state indexed by absolute position whose layout no document states: the spec's
inferred layout (conformance/ascend_spec/compressor.py) is used ONLY through `to_vendor_state` and
`from_vendor_state` below, which build a temporary vendor state for the call and read our state back from it.
If a device run of the vendor check shows the layout differs, these two functions are what changes.

Limits (README / tiling): A3 and 950 (not A2); x bf16/fp16 with wkv / wgate of the same dtype (prepare_weights
stores them in bf16 when that is exact; fp32-valued weights are declined); H in [1024, 10240], 512-aligned;
(d, ratio) = (512, 4), (128, 4) with rotate (the indexer's keys) or (512, 128); 64 rope dims. The RoPE tables
go in x's dtype (README: fp16 / bf16): a deliberate difference from the reference's fp32 tables.
"""
from __future__ import annotations

import torch

from dsv4_portable import ops
from dsv4_portable.reference.quant import FP8_KV_BLOCK
from dsv4_portable.registry import register

from . import chip as chip_mod
from . import vendor_ops
from .common import availability, block_table, device_reasons

COMPRESSOR = ("_C_ascend.compressor", "custom.compressor")
STATE_BLOCK = 16                         # rows per block of the temporary vendor state
COMBOS = {(512, 4, False), (128, 4, True), (512, 128, False)}   # (d, ratio, rotate): C4A, C4Li, C128A


def _open_from(start: int, ratio: int) -> int:
    """First absolute position whose state row matters at `start`: the window holding it, and with overlap
    (ratio 4) the window before."""
    w = start // ratio
    return max(0, (w - 1) * ratio if ratio == 4 else w * ratio)


def _our_row(p: torch.Tensor, start: int, ratio: int) -> torch.Tensor:
    """Row of our state that holds absolute position p (for p in [_open_from(start), start))."""
    w = start // ratio
    if ratio == 4:
        return torch.where(p < w * ratio, p - (w - 1) * ratio, ratio + p - w * ratio)
    return p - w * ratio


def to_vendor_state(kv_state, score_state, start: int, steps: int, ratio: int):
    """(state_cache [1 + B*nb, STATE_BLOCK, 2*coff*d] fp32, state_block_table [B, ceil((start+steps)/STATE_BLOCK)]
    int32): our state's rows of the open windows placed at their absolute positions as [kv | score] rows, with
    room for this call's tokens. ASSUMED vendor layout (see the module docstring and the spec)."""
    b, _, c = kv_state.shape
    end = start + steps
    lo = _open_from(start, ratio)
    base = lo // STATE_BLOCK
    nb = -(-end // STATE_BLOCK) - base
    state = torch.zeros(1 + b * nb, STATE_BLOCK, 2 * c, dtype=torch.float32, device=kv_state.device)
    # batch i's block j (j >= base) is state block 1 + i * nb + (j - base); block 0: before the open windows,
    # never touched
    table = block_table(torch.arange(b, device=kv_state.device), nb, base + nb) + (1 - base)
    table[:, :base] = 0
    p = torch.arange(lo, start, device=kv_state.device)
    if p.numel():
        rows = _our_row(p, start, ratio)
        blk = table[:, p // STATE_BLOCK].long()                       # [B, n]
        state[blk, p % STATE_BLOCK] = torch.cat([kv_state[:, rows], score_state[:, rows]], dim=-1).float()
    return state, table


def from_vendor_state(state, table, kv_state, score_state, end: int, ratio: int) -> None:
    """Write our state for position `end` (the next token) in place from the vendor state rows of the windows
    still open there; rows of windows that do not exist (before position 0, or not yet started) are kv 0 /
    score -inf, as the reference keeps them."""
    c = kv_state.shape[-1]
    kv_state.zero_()
    score_state.fill_(float("-inf"))
    lo = _open_from(end, ratio)
    p = torch.arange(lo, end, device=state.device)
    if p.numel():
        rows = _our_row(p, end, ratio)
        got = state[table[:, p // STATE_BLOCK].long(), p % STATE_BLOCK]          # [B, n, 2c]
        kv_state[:, rows] = got[..., :c].to(kv_state.dtype)
        score_state[:, rows] = got[..., c:].to(score_state.dtype)


def _supports(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state, start_pos, ratio, rotate=False,
              quant=True, eps=1e-6):
    b, s, dim = x.shape
    d = norm_weight.shape[0]
    reasons = device_reasons(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state)
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"activations {x.dtype}; the fused compressor takes bf16/fp16")
    if wkv.dtype != x.dtype or wgate.dtype != x.dtype:
        reasons.append(f"wkv/wgate are {wkv.dtype}/{wgate.dtype}; the op takes them in x's dtype ({x.dtype}) "
                       "(prepare_weights stores them so when that is exact)")
    if not (1024 <= dim <= 10240 and dim % 512 == 0):
        reasons.append(f"hidden size {dim}; the op takes 1024..10240, a multiple of 512")
    if (d, ratio, bool(rotate)) not in COMBOS:
        reasons.append(f"(d {d}, ratio {ratio}, rotate {rotate}); the op takes C4A (512, 4), C4Li (128, 4, the "
                       "indexer keys) or C128A (512, 128)")
    if 2 * cos.shape[-1] != 64:
        reasons.append(f"{2 * cos.shape[-1]} rope dims; the op takes rope_head_dim 64")
    if kv_state.dtype != torch.float32:
        reasons.append(f"state {kv_state.dtype}; the op's state is fp32")
    return reasons


def _available() -> list[str]:
    return availability(COMPRESSOR)()


@register("compressor", "cann", "npu", available=_available, supports=_supports,
          note="fused compressor (A3/950) through to_vendor_state / from_vendor_state (ASSUMED state layout), "
               "QAT after it")
def compressor_cann(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state, start_pos, ratio,
                    rotate=False, quant=True, eps=1e-6):
    b, s, _ = x.shape
    coff = 2 if ratio == 4 else 1
    state, table = to_vendor_state(kv_state, score_state, start_pos, s, ratio)
    n_out = -(-s // ratio)
    w0 = start_pos // ratio
    epos = ((torch.arange(n_out, device=x.device) + w0) * ratio).clamp(max=cos.shape[0] - 1)   # padding rows: any
    tab = lambda t: t[epos].repeat_interleave(2, -1).to(x.dtype).expand(b, -1, -1).contiguous()  # noqa: E731
    # the 950 build takes an fp32 norm weight (vllm-ascend compressor.py); the A3 build x's dtype
    norm = norm_weight.to(torch.float32 if chip_mod.chip() == "950" else x.dtype)
    out = vendor_ops.call(COMPRESSOR, x.contiguous(), wkv, wgate, state, ape.float(), norm, tab(sin), tab(cos),
                          table, None, None, torch.full((b,), start_pos, dtype=torch.int32, device=x.device), 64,
                          ratio, coff, float(eps), 2, 1)
    from_vendor_state(state, table, kv_state, score_state, start_pos + s, ratio)
    entries = out[:, :(start_pos + s) // ratio - w0]
    if quant and entries.shape[1]:
        if rotate:
            entries = ops.fp4_roundtrip(ops.hadamard(entries), 32)
        else:
            rd = 2 * cos.shape[-1]
            entries = torch.cat([ops.fp8_roundtrip(entries[..., :-rd], FP8_KV_BLOCK), entries[..., -rd:]], dim=-1)
    return entries
