"""Spec of the fused KV compressor `compressor` (vllm-ascend _C_ascend build; CANN recipes' custom build):
projections, ape, per-feature softmax pooling of each window (two overlapping windows for ratio 4), RMSNorm and
RoPE of the compressed entries, with the partial windows kept in a paged fp32 state cache.

Sources: vllm-ascend csrc/attention/compressor/README.md (formula, shapes, A2 not supported), op_host/arch32/
compressor_tiling.h (dtypes, D 128/512, rope_head_dim 64, cache_mode 1), csrc/torch_binding.cpp (schema; output
[B, ceil(S/ratio), D] for BSH), vllm_ascend/models/deepseek_v4/compressor.py (call: rotary_mode 2, cache_mode 1,
coff 2 with overlap, state_dim = 2 * coff * D, norm_weight fp32 on the 950).

STATE LAYOUT (inferred: no document states it): the state cache holds one row per absolute token position p of a
sequence, state_cache[block_table[b, p // block_size], p % block_size] = [kv(p) | score(p) + ape[p % ratio]]
(kv first, then the score with the positional bias added; coff*D features each). A block-table entry 0 means
"do not update", so block 0 is never a sequence's block. The op writes the rows of this step's tokens and reads the
rows of the earlier tokens of every window it completes (for ratio 4 also the whole previous window). A device run
of the vendor check (a prefill, then decode steps across a window boundary, comparing entries and state rows)
confirms or refutes this; the backend converts to and from it in named functions (backends/ascend/compressor.py).
"""
from __future__ import annotations

import torch

from .contract import (SpecNotModelledError, check_in, check_int, check_shape, check_tensor, need, placeholder,
                       require_soc, rope_rotate, spec_op)

SRC = ("vllm-ascend csrc/attention/compressor/README.md; op_host/arch32/compressor_tiling.h; csrc/torch_binding.cpp; "
       "vllm_ascend/models/deepseek_v4/compressor.py")
CHIPS = ("A3", "950")                  # README: A2 not supported
COMBOS = {(512, 2, 4): "C4A", (128, 2, 4): "C4Li", (512, 1, 128): "C128A"}   # (D, coff, ratio)
HALVES = (torch.bfloat16, torch.float16)


@spec_op("compressor", ("_C_ascend", "custom"), SRC)
def compressor(x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos, state_block_table, cu_seqlens,
               seqused, start_pos, rope_head_dim, cmp_ratio, coff, norm_eps, rotary_mode, cache_mode):
    """cmp_kv [B, ceil(S/ratio), D] (BSH x [B, S, H]): the entries whose window ends in this step, per batch, then
    padding (undefined). Entry of window w pools, per feature f, softmax over tokens of score * kv: ratio 128 the
    tokens [w*r, (w+1)*r) of all D features; ratio 4 (coff 2) features [0, D) of window w-1 with features [D, 2D) of
    window w (8 rows; a window before position 0 contributes nothing). Then RMSNorm (norm_weight, norm_eps) and RoPE
    of the last rope_head_dim dims with rope_cos/rope_sin row j for entry j (interleave: rotary_mode 2). state_cache
    is updated in place (layout in the module docstring)."""
    op = "compressor"
    soc = require_soc(op, CHIPS, SRC)
    check_tensor(op, "x", x, SRC, dtypes=HALVES, ndim=(2, 3))
    if x.dim() == 2 or cu_seqlens is not None:
        raise SpecNotModelledError(op, "the TH layout (x [T, H] with cu_seqlens)")
    b, s, h = x.shape
    need(1024 <= h <= 10240 and h % 512 == 0, op, "x", f"has H={h}", "H in [1024, 10240], a multiple of 512", SRC)
    check_in(op, "cmp_ratio", cmp_ratio, (4, 128), SRC)
    check_in(op, "coff", coff, (1, 2), SRC)
    check_in(op, "rope_head_dim", rope_head_dim, (64,), SRC, "only 64")
    check_in(op, "rotary_mode", rotary_mode, (1, 2), SRC, "1 half, 2 interleave")
    check_in(op, "cache_mode", cache_mode, (1,), SRC, "only 1 (contiguous)")
    need(isinstance(norm_eps, float) and norm_eps > 0, op, "norm_eps", f"is {norm_eps!r}", "a positive float", SRC)
    norm_dtypes = (torch.float32,) if soc == "950" else HALVES       # vLLM: "A5 compressor kernel needs float"
    check_tensor(op, "norm_weight", norm_weight, SRC, dtypes=norm_dtypes, ndim=1)
    d = norm_weight.shape[0]
    need((d, coff, cmp_ratio) in COMBOS, op, "norm_weight" if d not in (128, 512) else "coff",
         f"gives (D, coff, ratio) = ({d}, {coff}, {cmp_ratio})", "C4A (512, 2, 4), C4Li (128, 2, 4) or C128A "
         "(512, 1, 128)", SRC)
    for name, w in (("wkv", wkv), ("wgate", wgate)):
        check_tensor(op, name, w, SRC, dtypes=(x.dtype,), ndim=2)
        check_shape(op, name, w, (coff * d, h), SRC, "[coff * D, H]")
    check_tensor(op, "ape", ape, SRC, dtypes=(torch.float32,), ndim=2)
    check_shape(op, "ape", ape, (cmp_ratio, coff * d), SRC, "[cmp_ratio, coff * D]")
    n_out = -(-s // cmp_ratio)
    for name, t in (("rope_sin", rope_sin), ("rope_cos", rope_cos)):
        check_tensor(op, name, t, SRC, dtypes=(x.dtype,), ndim=3)     # README: fp16 / bf16 (the tiling may add fp32)
        check_shape(op, name, t, (b, n_out, rope_head_dim), SRC, "[B, ceil(S / cmp_ratio), rope_head_dim]")
    check_tensor(op, "state_cache", state_cache, SRC, dtypes=(torch.float32,), ndim=3)
    blocks, bs, width = state_cache.shape
    need(bs % 16 == 0 and 0 < bs <= 1024, op, "state_cache", f"has block_size {bs}", "a multiple of 16, <= 1024",
         SRC)
    need(width == 2 * coff * d, op, "state_cache", f"has rows of {width}", f"2 * coff * D = {2 * coff * d} "
         "(kv_state + score_state)", SRC)
    check_tensor(op, "start_pos", start_pos, SRC, dtypes=(torch.int32,), ndim=1)
    need(start_pos.shape[0] == b, op, "start_pos", f"has {start_pos.shape[0]} entries", f"one per batch ({b})", SRC)
    if seqused is not None:
        raise SpecNotModelledError(op, "seqused (fewer compressed tokens than S)")
    starts = [int(v) for v in start_pos.tolist()]
    need(all(v >= 0 for v in starts), op, "start_pos", f"is {starts}", "non-negative positions", SRC)
    check_tensor(op, "state_block_table", state_block_table, SRC, dtypes=(torch.int32,), ndim=2)
    cols = -(-(max(starts) + s) // bs)
    need(state_block_table.shape[0] == b and state_block_table.shape[1] >= cols, op, "state_block_table",
         f"has shape {list(state_block_table.shape)}", f"[B={b}, >= ceil(Smax / block_size) = {cols}]", SRC)
    table = state_block_table.long()
    need(bool(((table >= 0) & (table < blocks)).all()), op, "state_block_table", "names blocks outside the cache",
         f"block ids in [0, {blocks})", SRC)

    xf = x.float()
    kv = xf @ wkv.float().t()                                          # [B, S, coff*D]
    score = xf @ wgate.float().t()
    out = placeholder((b, n_out, d), x.dtype)
    c = coff * d
    for bi, sp in enumerate(starts):
        pos = torch.arange(sp, sp + s)
        rows = torch.cat([kv[bi], score[bi] + ape[pos % cmp_ratio]], dim=-1)          # [S, 2c]
        blk = table[bi, pos // bs]
        keep = blk != 0                                                # entry 0: "no update"
        state_cache[blk[keep], (pos % bs)[keep]] = rows[keep]

        def read(p0, p1):                                              # state rows of positions [p0, p1)
            p = torch.arange(max(p0, 0), p1)
            ids = table[bi, p // bs]
            need(bool((ids != 0).all()), op, "state_block_table", f"maps a needed position of batch {bi} (in "
                 f"[{p0}, {p1})) to block 0", "every position of an open window in a real block", SRC)
            got = state_cache[ids, p % bs]
            if p0 < 0:                                                 # before position 0: kv 0, score -inf
                pad = torch.cat([torch.zeros(-p0, c), torch.full((-p0, c), float("-inf"))], dim=-1)
                got = torch.cat([pad, got])
            return got

        r = cmp_ratio
        for j, w in enumerate(range(sp // r, (sp + s) // r)):
            if coff == 2:
                prev, cur = read((w - 1) * r, w * r), read(w * r, (w + 1) * r)
                kvw = torch.cat([prev[:, :d], cur[:, d:c]])                            # [2r, D]
                scw = torch.cat([prev[:, c:c + d], cur[:, c + d:]])
            else:
                cur = read(w * r, (w + 1) * r)
                kvw, scw = cur[:, :d], cur[:, c:]
            pooled = (kvw * torch.softmax(scw, dim=0)).sum(0)
            normed = norm_weight.float() * pooled * torch.rsqrt(pooled.square().mean() + norm_eps)
            rd = rope_head_dim
            rot = normed[-rd:]
            rot = rot * rope_cos[bi, j].float() + rope_rotate(rot, rotary_mode == 2) * rope_sin[bi, j].float()
            out[bi, j] = torch.cat([normed[:-rd], rot]).to(x.dtype)
    return out


def VENDOR_CASES():
    """Vendor check: a prefill ending just before a window boundary, then single-token steps across it, for each
    combination; compared: every emitted entry and the state rows of the open windows afterwards (what the
    backend reads back). A wrong guess of the state layout fails here on a device."""
    from .contract import active_soc
    from .vendor_check import Tolerance, VendorCase

    tol = Tolerance("allclose", 2e-2, 1.6e-2, max_mismatch=2e-3, source="bf16 entries; fp32 state")

    def make(d, coff, ratio, steps):
        def build(g):
            h, b, bs = 1024, 2, 16
            total = sum(steps)
            x = (torch.randn(b, total, h, generator=g)).to(torch.bfloat16)
            wkv = (torch.randn(coff * d, h, generator=g) * h ** -0.5).to(torch.bfloat16)
            wgate = (torch.randn(coff * d, h, generator=g) * h ** -0.5).to(torch.bfloat16)
            ape = torch.randn(ratio, coff * d, generator=g) * 0.1
            norm = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.float32 if active_soc() == "950" else torch.bfloat16)
            nb = -(-total // bs)
            table = (1 + torch.arange(b * nb, dtype=torch.int32)).view(b, nb)      # block 0: never a sequence's
            state = torch.zeros(1 + b * nb, bs, 2 * coff * d)
            ang = torch.rand(b, total, 32, generator=g) * 6
            cos, sin = (f(ang).repeat_interleave(2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
            return (x, wkv, wgate, state, ape, norm, cos, sin, table, steps), {}
        return build

    def run(op, args, kwargs):
        x, wkv, wgate, state, ape, norm, cos, sin, table, steps = args
        state = state.clone()
        outs, sp, ratio = [], 0, ape.shape[0]
        coff = wkv.shape[0] // norm.shape[0]
        for s in steps:
            n_out = -(-s // ratio)
            j = torch.arange(n_out, device=x.device) + sp // ratio          # entry rows of this call
            tab = lambda t: t[:, (j * ratio).clamp(max=t.shape[1] - 1)].contiguous()  # noqa: E731
            out = op(x[:, sp:sp + s].contiguous(), wkv, wgate, state, ape, norm, tab(sin), tab(cos), table, None,
                     None, torch.full((x.shape[0],), sp, dtype=torch.int32, device=x.device), 64, ratio, coff, 1e-6, 2,
                     1)
            n_new = (sp + s) // ratio - sp // ratio
            outs.append(out[:, :n_new])
            sp += s
        w1 = sp // ratio
        lo = max(0, (w1 - (coff - 1)) * ratio)                          # the rows the backend reads back
        p = torch.arange(lo, sp, device=x.device)
        bs = state.shape[1]
        outs.append(torch.stack([state[table[bi, p // bs].long(), p % bs] for bi in range(x.shape[0])]))
        return outs

    spec = [("c4a/prefill_then_decode", make(512, 2, 4, [7, 1, 1, 2])),
            ("c4li/prefill_then_decode", make(128, 2, 4, [3, 1, 5])),
            ("c128a/prefill_then_decode", make(512, 1, 128, [126, 1, 1, 2]))]
    return [VendorCase("compressor", f"compressor/{cid}", m, tol, chips=CHIPS, run=run) for cid, m in spec]
