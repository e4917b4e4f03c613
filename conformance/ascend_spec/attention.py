"""Spec of npu_sparse_attn_sharedkv and npu_sparse_attn_sharedkv_metadata (A2/A3), the fused DeepSeek-V4
attention: a sliding window over the original KV plus all (HCA) or the listed (CSA) compressed entries, shared-KV
MQA with attention sinks.

Sources: vllm-ascend csrc/attention/sparse_attn_sharedkv/README.md (constraints), op_host/
sparse_attn_sharedkv_tiling.{h,cpp} (head dim 512, block sizes, dtypes, masks), op_host/*_def.cpp,
csrc/torch_binding.cpp (schemas), vllm_ascend/attention/dsa_v1.py (how vLLM calls it: TND, PA_ND, ori_win_left
= window - 1, cmp_ratio = max(ratio, 1), cmp_topk = index_topk for ratio 4 else 0).

The metadata op's output is the vendor's AICPU tiling (opaque). The spec's metadata encodes the arguments it was
made with, and the attention spec rejects a call whose arguments disagree with its metadata (stale metadata
across steps or layer types). On a device both halves are the vendor's, and the vendor check compares only the
metadata's shape and dtype.
"""
from __future__ import annotations

import torch

from .contract import (SpecNotModelledError, check_contiguous, check_in, check_int, check_prefix_sums, check_tensor,
                       gather_paged, need, placeholder, require_soc, spec_op)

SRC = ("vllm-ascend csrc/attention/sparse_attn_sharedkv/README.md; op_host/sparse_attn_sharedkv_tiling.cpp; "
       "csrc/torch_binding.cpp")
CHIPS = ("A2", "A3")                 # README: Ascend 950 not supported (its variant is the KV-quant op)
HEADS, HEAD_DIM, TOPK, WIN_LEFT = 64, 512, 512, 127
LAYOUTS = {"BSND": 1, "TND": 2, "PA_ND": 3}
MAGIC = 0x5A5

# metadata slots: the arguments the spec metadata records
_FIELDS = ("magic", "num_heads_q", "num_heads_kv", "head_dim", "batch_size", "max_seqlen_q", "max_seqlen_kv",
           "ori_topk", "cmp_topk", "cmp_ratio", "ori_mask_mode", "cmp_mask_mode", "ori_win_left", "ori_win_right",
           "layout_q", "layout_kv", "has_ori_kv", "has_cmp_kv", "q_rows", "kv_sum")


def _int32(op, arg, t, n=None):
    check_tensor(op, arg, t, SRC, dtypes=(torch.int32,), ndim=1)
    need(n is None or t.shape[0] == n, op, arg, f"has {t.shape[0]} entries", f"{n} entries", SRC)
    return [int(v) for v in t.tolist()]


@spec_op("npu_sparse_attn_sharedkv_metadata", ("_C_ascend", "custom"), SRC)
def npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                                      cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, batch_size=0,
                                      max_seqlen_q=0, max_seqlen_kv=0, ori_topk=0, cmp_topk=0, cmp_ratio=4,
                                      ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128, ori_win_right=0,
                                      layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True,
                                      device="npu"):
    """int32 [1024]: the core split of one attention step (made once per step and layer kind, passed to every
    npu_sparse_attn_sharedkv call of that kind). Here: an encoding of the arguments (values vendor-internal)."""
    op = "npu_sparse_attn_sharedkv_metadata"
    require_soc(op, CHIPS, SRC)
    for name, v, lo in (("num_heads_q", num_heads_q, 1), ("num_heads_kv", num_heads_kv, 1),
                        ("head_dim", head_dim, 1), ("batch_size", batch_size, 1), ("max_seqlen_q", max_seqlen_q, 1),
                        ("max_seqlen_kv", max_seqlen_kv, 1), ("cmp_topk", cmp_topk, 0), ("cmp_ratio", cmp_ratio, 1)):
        check_int(op, name, v, SRC, lo)
    check_in(op, "layout_q", layout_q, ("BSND", "TND"), SRC)
    check_in(op, "layout_kv", layout_kv, ("PA_ND",), SRC, "PA_ND (README: layout_kv only PA_ND)")
    q_rows = batch_size * max_seqlen_q
    if layout_q == "TND":
        need(cu_seqlens_q is not None, op, "cu_seqlens_q", "is missing", "required for TND", SRC)
        cu = _int32(op, "cu_seqlens_q", cu_seqlens_q, batch_size + 1)
        q_rows = cu[-1]
    kv = _int32(op, "seqused_kv", seqused_kv, batch_size) if seqused_kv is not None else []
    values = dict(magic=MAGIC, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, head_dim=head_dim,
                  batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, ori_topk=ori_topk,
                  cmp_topk=cmp_topk, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode,
                  ori_win_left=ori_win_left, ori_win_right=ori_win_right, layout_q=LAYOUTS[layout_q],
                  layout_kv=LAYOUTS[layout_kv], has_ori_kv=int(bool(has_ori_kv)), has_cmp_kv=int(bool(has_cmp_kv)),
                  q_rows=q_rows, kv_sum=sum(kv))
    out = placeholder((1024,), torch.int32)
    out[:len(_FIELDS)] = torch.tensor([values[f] for f in _FIELDS], dtype=torch.int32)
    return out


def _decode(metadata) -> dict:
    return dict(zip(_FIELDS, (int(v) for v in metadata[:len(_FIELDS)].tolist())))


def _paged(op, arg, cache, table_arg, table, lengths):
    """Rows [n, D] of a PA_ND cache [blocks, bs, 1, D] per batch, through its block table (the first lengths[b])."""
    check_tensor(op, arg, cache, SRC, ndim=4)
    need(cache.shape[2] == 1, op, arg, f"has KV_N={cache.shape[2]}", "KV_N = 1", SRC)
    need(cache.shape[3] == HEAD_DIM, op, arg, f"has head dim {cache.shape[3]}", f"head dim {HEAD_DIM}", SRC)
    return gather_paged(op, arg, cache, table_arg, table, lengths, SRC)


@spec_op("npu_sparse_attn_sharedkv", ("_C_ascend", "custom"), SRC)
def npu_sparse_attn_sharedkv(q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                             ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                             cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                             softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                             ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False):
    """(out like q, softmax_lse undefined): for query row i of batch b (q_len rows, kv_len = seqused_kv[b]) at
    position p = kv_len - q_len + i: keys are the window positions max(0, p - ori_win_left) .. p of ori_kv, plus
    the compressed entries c < (p + 1) // cmp_ratio of cmp_kv (all of them; or, with cmp_sparse_indices, the
    listed ones, -1 = padding). l = softmax_scale * <q, k>; out = sum softmax(l, sink) * k, the sink an unscaled
    extra logit with a zero value (shared-KV MQA: each key row is also its value row); a row without keys is 0.
    ori_kv / cmp_kv: PA_ND caches [blocks, bs, 1, 512] read through ori_block_table / cmp_block_table; the
    compressed store of batch b holds kv_len // cmp_ratio entries."""
    op = "npu_sparse_attn_sharedkv"
    require_soc(op, CHIPS, SRC)
    check_in(op, "layout_q", layout_q, ("BSND", "TND"), SRC)
    check_in(op, "layout_kv", layout_kv, ("PA_ND",), SRC, "PA_ND (README: layout_kv only PA_ND)")
    tnd = layout_q == "TND"
    check_tensor(op, "q", q, SRC, dtypes=(torch.bfloat16, torch.float16), ndim=3 if tnd else 4)
    check_contiguous(op, "q", q, SRC)
    n1, d = q.shape[-2], q.shape[-1]
    need(n1 == HEADS, op, "q", f"has N1={n1} heads", f"N1 = {HEADS} only", SRC)
    need(d == HEAD_DIM, op, "q", f"has head dim {d}", f"q_head_dim only {HEAD_DIM}", SRC)
    check_in(op, "ori_mask_mode", ori_mask_mode, (4,), SRC, "only 4 (sliding window)")
    check_in(op, "cmp_mask_mode", cmp_mask_mode, (3,), SRC, "only 3 (right-down causal)")
    check_in(op, "ori_win_left", ori_win_left, (WIN_LEFT,), SRC, f"only {WIN_LEFT}")
    check_in(op, "ori_win_right", ori_win_right, (0,), SRC, "only 0")
    check_in(op, "return_softmax_lse", return_softmax_lse, (False,), SRC, "only False (lse is not returned)")
    need(isinstance(softmax_scale, float) and softmax_scale > 0, op, "softmax_scale", f"is {softmax_scale!r}",
         "a positive float", SRC)
    need(ori_kv is not None, op, "ori_kv", "is missing", "every scenario passes ori_kv", SRC)
    check_tensor(op, "ori_kv", ori_kv, SRC, dtypes=(q.dtype,))
    if ori_sparse_indices is not None:
        raise SpecNotModelledError(op, "ori_sparse_indices (README: not supported yet)")
    has_cmp = cmp_kv is not None
    if has_cmp:
        check_tensor(op, "cmp_kv", cmp_kv, SRC, dtypes=(q.dtype,))
        check_in(op, "cmp_ratio", cmp_ratio, (4, 128), SRC, "4 or 128 with cmp_kv")
    else:
        need(cmp_sparse_indices is None and cmp_block_table is None, op, "cmp_sparse_indices" if cmp_sparse_indices
             is not None else "cmp_block_table", "is given without cmp_kv", "only with cmp_kv", SRC)
        check_in(op, "cmp_ratio", cmp_ratio, (0, 1), SRC, "0 or 1 without cmp_kv (vLLM passes 1 for window-only)")
    # batches and query rows
    if tnd:
        need(cu_seqlens_q is not None, op, "cu_seqlens_q", "is missing", "required for TND", SRC)
        cu = check_prefix_sums(op, "cu_seqlens_q", cu_seqlens_q, SRC)
        need(cu[-1] == q.shape[0], op, "cu_seqlens_q", f"is {cu}", f"B+1 prefix sums from 0 to T1 = {q.shape[0]}",
             SRC)
        n_batch, q_lens = len(cu) - 1, [b - a for a, b in zip(cu, cu[1:])]
        starts = cu[:-1]
    else:
        n_batch, s1 = q.shape[:2]
        q_lens, starts = [s1] * n_batch, [b * s1 for b in range(n_batch)]
    need(seqused_kv is not None, op, "seqused_kv", "is missing", "the per-batch kv lengths (PA_ND)", SRC)
    kv_lens = _int32(op, "seqused_kv", seqused_kv, n_batch)
    need(all(n >= ql > 0 for n, ql in zip(kv_lens, q_lens)), op, "seqused_kv", f"is {kv_lens} for q lengths "
         f"{q_lens}", "each kv length >= its q length > 0 (no empty tensors)", SRC)
    if sinks is not None:
        check_tensor(op, "sinks", sinks, SRC, dtypes=(torch.float32,), ndim=1)
        need(sinks.shape[0] == n1, op, "sinks", f"has {sinks.shape[0]} entries", f"one per query head ({n1})", SRC)
    # metadata: mandatory, int32 [1024], made for this call
    check_tensor(op, "metadata", metadata, SRC, dtypes=(torch.int32,), ndim=1)
    need(metadata.shape[0] == 1024, op, "metadata", f"has {metadata.shape[0]} entries", "int32 [1024]", SRC)
    meta = _decode(metadata)
    k2 = cmp_sparse_indices.shape[-1] if cmp_sparse_indices is not None else 0
    want = dict(magic=MAGIC, num_heads_q=n1, num_heads_kv=1, head_dim=d, batch_size=n_batch, cmp_topk=k2,
                cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode,
                ori_win_left=ori_win_left, ori_win_right=ori_win_right, layout_q=LAYOUTS[layout_q],
                layout_kv=LAYOUTS[layout_kv], has_ori_kv=1, has_cmp_kv=int(has_cmp), q_rows=sum(q_lens),
                kv_sum=sum(kv_lens))
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    need(not wrong, op, "metadata", f"was made for other arguments ({', '.join(f'{k} {a} != {b}' for k, (a, b) in wrong.items())})",
         "the metadata of this step and layer kind (npu_sparse_attn_sharedkv_metadata with the same arguments)", SRC)
    need(meta["max_seqlen_q"] >= max(q_lens) and meta["max_seqlen_kv"] >= max(kv_lens), op, "metadata",
         f"has max_seqlen_q {meta['max_seqlen_q']}, max_seqlen_kv {meta['max_seqlen_kv']}",
         f"at least the step's {max(q_lens)} and {max(kv_lens)}", SRC)

    ori_rows = _paged(op, "ori_kv", ori_kv, "ori_block_table", ori_block_table, kv_lens)
    cmp_rows = None
    if has_cmp:
        n_cmp = [n // cmp_ratio for n in kv_lens]
        cmp_rows = _paged(op, "cmp_kv", cmp_kv, "cmp_block_table", cmp_block_table, [max(1, n) for n in n_cmp])
        cmp_rows = [r[:n] for r, n in zip(cmp_rows, n_cmp)]
        if cmp_sparse_indices is not None:
            need(cmp_ratio == 4, op, "cmp_sparse_indices", f"is given with cmp_ratio {cmp_ratio}",
                 "sparse compressed attention (CSA) with cmp_ratio 4", SRC)
            want_shape = (q.shape[0], 1, TOPK) if tnd else (*q.shape[:2], 1, TOPK)
            check_tensor(op, "cmp_sparse_indices", cmp_sparse_indices, SRC, dtypes=(torch.int32,),
                         ndim=len(want_shape))
            need(tuple(cmp_sparse_indices.shape) == want_shape, op, "cmp_sparse_indices",
                 f"has shape {list(cmp_sparse_indices.shape)}", f"{list(want_shape)} (K2 = {TOPK} only)", SRC)

    qf = q.reshape(-1, n1, d).float()
    sel = None if cmp_sparse_indices is None else cmp_sparse_indices.reshape(-1, TOPK).long()
    out = torch.zeros_like(qf)
    for b in range(n_batch):
        kv_len, ql, r0 = kv_lens[b], q_lens[b], starts[b]
        for i in range(ql):
            p = kv_len - ql + i
            keys = [ori_rows[b][max(0, p - ori_win_left):p + 1]]
            if has_cmp:
                vis = min((p + 1) // cmp_ratio, cmp_rows[b].shape[0])
                if sel is None:
                    keys.append(cmp_rows[b][:vis])
                else:
                    ids = sel[r0 + i]
                    keys.append(cmp_rows[b][ids[(ids >= 0) & (ids < vis)]])
            k = torch.cat(keys).float()                                        # [n, D]
            if k.shape[0] == 0:
                continue
            logits = softmax_scale * (qf[r0 + i] @ k.t())                       # [H, n]
            m = logits.amax(-1, keepdim=True)
            sink = sinks.float().view(-1, 1) if sinks is not None else None
            if sink is not None:
                m = torch.maximum(m, sink)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(logits - m)
            denom = e.sum(-1, keepdim=True) + (torch.exp(sink - m) if sink is not None else 0.0)
            out[r0 + i] = torch.where(denom > 0, (e @ k) / denom, torch.zeros(1))
    return out.view(q.shape).to(q.dtype), torch.empty(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- vendor check
def VENDOR_CASES():
    """Cases of the vendor check (vendor_check.py): window only, HCA, CSA with -1 padding and an entry not yet
    visible, and both sink extremes, at B=2 with short steps; the metadata comes from the same build's op."""
    from .vendor_check import BF16_TOL, VendorCase

    def make(p0, s, ratio, csa=False, sink="random", b=2):
        def build(g):
            kv_len, bs = p0 + s, 128
            nb = -(-kv_len // bs)
            ori = (torch.randn(b * nb, bs, 1, HEAD_DIM, generator=g)).to(torch.bfloat16)
            table = torch.arange(b * nb, dtype=torch.int32).view(b, nb).flip(1).contiguous()  # blocks out of order
            kw = dict(ori_kv=ori, ori_block_table=table, cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32) * s,
                      seqused_kv=torch.full((b,), kv_len, dtype=torch.int32), softmax_scale=HEAD_DIM ** -0.5,
                      cmp_ratio=ratio or 1, ori_mask_mode=4, ori_win_left=WIN_LEFT, ori_win_right=0, layout_q="TND",
                      layout_kv="PA_ND",
                      sinks={"random": torch.randn(HEADS, generator=g), "-inf": torch.full((HEADS,), float("-inf")),
                             "huge": torch.full((HEADS,), 1e4)}[sink])
            if ratio:
                n = kv_len // ratio
                cb = -(-n // 16)
                kw.update(cmp_kv=torch.randn(b * cb, 16, 1, HEAD_DIM, generator=g).to(torch.bfloat16),
                          cmp_block_table=torch.arange(b * cb, dtype=torch.int32).view(b, cb), cmp_mask_mode=3)
                if csa:
                    ids = torch.full((b * s, 1, TOPK), -1, dtype=torch.int32)
                    for r in range(b * s):
                        ids[r, 0, :min(20, n)] = torch.randperm(n, generator=g)[:20].int()
                    ids[0, 0, 0] = n - 1                 # not yet visible to the first row: must be ignored
                    kw["cmp_sparse_indices"] = ids
            meta = dict(num_heads_q=HEADS, num_heads_kv=1, head_dim=HEAD_DIM, cu_seqlens_q=kw["cu_seqlens_q"],
                        seqused_kv=kw["seqused_kv"], batch_size=b, max_seqlen_q=s, max_seqlen_kv=kv_len,
                        cmp_topk=TOPK if csa else 0, cmp_ratio=ratio or 1, ori_mask_mode=4, cmp_mask_mode=3,
                        ori_win_left=WIN_LEFT, ori_win_right=0, layout_q="TND", layout_kv="PA_ND",
                        has_ori_kv=True, has_cmp_kv=bool(ratio))
            return (torch.randn(b * s, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16),), kw, meta
        return build

    spec = [("window/prefill_wrapped", make(130, 4, 0)), ("hca/decode", make(385, 1, 128)),
            ("hca/chunk_across_entry", make(250, 8, 128, sink="-inf")), ("csa/decode", make(203, 1, 4, csa=True)),
            ("csa/chunk_sink_huge", make(121, 6, 4, csa=True, sink="huge"))]
    return [VendorCase("npu_sparse_attn_sharedkv", f"sparse_attn_sharedkv/{cid}", m, BF16_TOL, chips=CHIPS,
                       metadata_op="npu_sparse_attn_sharedkv_metadata") for cid, m in spec]
