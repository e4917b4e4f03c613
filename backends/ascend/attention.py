"""window_sparse_attn -> npu_sparse_attn_sharedkv (+ its metadata op) on A2/A3: one V4 attention step, the
sliding window (ring of 128 + this step's rows) and, for CSA/HCA layers, the compressed entries.

Layout (vllm-ascend's: layout_q TND, layout_kv PA_ND; csrc/attention/sparse_attn_sharedkv/README.md):
- q [B*S, 64, 512] per 64-head group (the op takes N1 = 64 only; heads are independent, so V4-Pro's 128 heads run
  as two calls with their halves of the sinks); cu_seqlens_q = 0, S, 2S, ...; seqused_kv = start_pos + S.
- ori_kv: the op reads a window as absolute positions through a block table. The registry op hands us the ring
  (position p < start_pos in slot p % W) and this step's rows separately and must not change the ring, so a
  temporary paged buffer holds positions [base, start_pos + S) (base: the window's first position rounded down to
  a block), the ring rows gathered into place and the new rows after them; block-table entries before `base`
  point at block 0 and are never read (the window mask starts at p - 127 >= base).
- cmp_kv: the compressed store read in place as pages when it is the head of a cache store, else a padded copy;
  CSA's top-k list padded with -1 to the 512 entries the op takes, entries not yet visible to a row set to -1.
Limits checked in supports(): A2/A3; bf16/fp16; heads a multiple of 64; head dim 512; window 128 (the op's window
is ori_win_left = 127 past positions); ratio 0, 4 (with a top-k list of at most 512) or 128 (without one).
The tiny model (4 heads, head dim 128, window 16) is always declined.
"""
from __future__ import annotations

import torch

from dsv4_portable.registry import register

from . import vendor_ops
from .common import availability, block_table, device_reasons, padded_rows, paged_rows

ATTN = ("_C_ascend.npu_sparse_attn_sharedkv", "custom.npu_sparse_attn_sharedkv")
METADATA = ("_C_ascend.npu_sparse_attn_sharedkv_metadata", "custom.npu_sparse_attn_sharedkv_metadata")
HEADS, HEAD_DIM, WINDOW, TOPK = 64, 512, 128, 512
ORI_BLOCK = 128                        # block size of the temporary window buffer (a multiple of 16, <= 1024)


def _metadata_op() -> vendor_ops.Candidates:
    """The metadata op of the same build as the attention op (their tilings go together)."""
    ns = vendor_ops.where(ATTN).split(".", 1)[0]
    return tuple(c for c in METADATA if c.startswith(ns + "."))


def _available() -> list[str]:
    reasons = availability(ATTN)()
    if not reasons and vendor_ops.reasons(_metadata_op()):
        reasons = [f"{vendor_ops.where(ATTN)} is present but its metadata op is not"]
    return reasons


def _supports(q, window, kv, comp, topk, sink, scale, start_pos, ratio):
    b, s, h, d = q.shape
    reasons = device_reasons(q, window, kv, comp, topk, sink)
    if q.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"dtype {q.dtype}; npu_sparse_attn_sharedkv takes bf16/fp16")
    if h % HEADS:
        reasons.append(f"{h} heads; npu_sparse_attn_sharedkv takes N1 = 64 (calls of 64 heads)")
    if d != HEAD_DIM:
        reasons.append(f"head dim {d}; npu_sparse_attn_sharedkv takes 512")
    if window.shape[1] != WINDOW:
        reasons.append(f"window {window.shape[1]}; the op's window is 128 (ori_win_left 127)")
    if ratio not in (0, 4, 128):
        reasons.append(f"compression ratio {ratio}; the op takes 4 (CSA) or 128 (HCA)")
    if ratio == 4 and (topk is None or topk.shape[-1] > TOPK):
        reasons.append("ratio 4 needs a top-k list of at most 512 entries (cmp_sparse_indices K2 = 512 only); got "
                       + ("none" if topk is None else f"{topk.shape[-1]}"))
    if ratio == 128 and topk is not None:
        reasons.append("a top-k list on a ratio-128 layer; the op's sparse mode is for ratio 4")
    return reasons


_METADATA_CACHE: dict[tuple, torch.Tensor] = {}


def _metadata(b, s, kv_len, ratio, has_cmp, cu_q, seqused, device) -> torch.Tensor:
    """The op's per-step tiling, made once per (batch, rows, kv length, layer kind): every layer of that kind in
    this step shares it, as in vLLM (dsa_v1.py _build_sas_metadata)."""
    key = (b, s, kv_len, ratio, has_cmp, str(device))
    if key not in _METADATA_CACHE:
        if len(_METADATA_CACHE) > 16:                  # keep only recent steps
            _METADATA_CACHE.clear()
        _METADATA_CACHE[key] = vendor_ops.call(
            _metadata_op(), num_heads_q=HEADS, num_heads_kv=1, head_dim=HEAD_DIM, cu_seqlens_q=cu_q,
            seqused_kv=seqused, batch_size=b, max_seqlen_q=s, max_seqlen_kv=kv_len,
            cmp_topk=TOPK if (has_cmp and ratio == 4) else 0, cmp_ratio=ratio if has_cmp else 1, ori_mask_mode=4,
            cmp_mask_mode=3, ori_win_left=WINDOW - 1, ori_win_right=0, layout_q="TND", layout_kv="PA_ND",
            has_ori_kv=True, has_cmp_kv=has_cmp, device=str(device))
    return _METADATA_CACHE[key]


def _window_pages(window, kv, start_pos):
    """(blocks [B*nb, ORI_BLOCK, 1, D], block table [B, ceil((p0+S)/ORI_BLOCK)]): positions [base, p0+S) in a new
    buffer; ring rows for positions < p0 (slot p % W), this step's rows after them."""
    b, s, d = kv.shape
    w, p0 = window.shape[1], start_pos
    base = max(0, p0 - (w - 1)) // ORI_BLOCK * ORI_BLOCK
    old = torch.arange(base, p0, device=kv.device) % w
    rows = torch.cat([window[:, old], kv], dim=1)                     # [B, p0 + S - base, D]
    blocks, _, nb = padded_rows(rows, ORI_BLOCK)
    first = base // ORI_BLOCK
    width = -(-(p0 + s) // ORI_BLOCK)
    table = block_table(torch.arange(b, device=kv.device), nb, width) - first
    return blocks, table.clamp_min(0)                                  # blocks before `base`: never read


@register("window_sparse_attn", "cann", "npu", available=_available, supports=_supports,
          note="npu_sparse_attn_sharedkv (+ metadata): TND queries in 64-head calls, PA_ND window and compressed "
               "pages; A2/A3, heads a multiple of 64, head dim 512, window 128")
def window_sparse_attn_cann(q, window, kv, comp, topk, sink, scale, start_pos, ratio):
    b, s, h, d = q.shape
    kv_len = start_pos + s
    dev = q.device
    cu_q = (torch.arange(b + 1, dtype=torch.int32, device=dev) * s)
    seqused = torch.full((b,), kv_len, dtype=torch.int32, device=dev)
    ori_blocks, ori_table = _window_pages(window, kv, start_pos)
    has_cmp = bool(ratio) and comp.shape[1] > 0
    extra = {}
    if has_cmp:
        cmp_blocks, bs, per_batch = paged_rows(comp) or padded_rows(comp, 128)
        extra = dict(cmp_kv=cmp_blocks, cmp_block_table=block_table(torch.arange(b, device=dev), per_batch,
                                                                    -(-comp.shape[1] // bs)), cmp_mask_mode=3)
        if topk is not None:
            visible = ((torch.arange(start_pos, kv_len, device=dev) + 1) // ratio).view(1, s, 1)
            ids = torch.where((topk >= 0) & (topk < visible), topk, -1).to(torch.int32)
            ids = torch.nn.functional.pad(ids, (0, TOPK - ids.shape[-1]), value=-1)
            extra["cmp_sparse_indices"] = ids.reshape(b * s, 1, TOPK)
    meta = _metadata(b, s, kv_len, ratio, has_cmp, cu_q, seqused, dev)
    outs = []
    for h0 in range(0, h, HEADS):                      # the op takes 64 query heads; heads are independent
        out, _lse = vendor_ops.call(
            ATTN, q[:, :, h0:h0 + HEADS].reshape(b * s, HEADS, d).contiguous(), ori_kv=ori_blocks,
            ori_block_table=ori_table, cu_seqlens_q=cu_q, seqused_kv=seqused,
            sinks=sink[h0:h0 + HEADS].float().contiguous(), metadata=meta, softmax_scale=float(scale),
            cmp_ratio=ratio if has_cmp else 1, ori_mask_mode=4, ori_win_left=WINDOW - 1, ori_win_right=0,
            layout_q="TND", layout_kv="PA_ND", **extra)
        outs.append(out.view(b, s, HEADS, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
