"""Spec of the MC2 expert-parallel ops npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2, executable on
CPU: the documented semantics with a REAL exchange (the reference EP's transport, dsv4_portable.ep.transport, over
the process group that `group_ep` names: gloo on CPU, packed rows, every wait bounded by the group's timeout),
after the documented argument contract is checked.

Sources: the per-SoC rules of hicann/ops-transformer mc2/moe_distribute_dispatch_v2/README.md (the newest read;
also research/ascend.md 3.10): A2 'fullmesh' EP {2..8, 16, 32, 64, 128, 192, 256, 384}, 'hierarchy' {16, 32, 64},
experts <= 1024 (512), H <= 10240 and % 32, BS <= 256 (512); A3 EP 2..768, experts <= 1024, H 1024..8192,
BS <= 512 (256 with 'fullmesh_v2' / 'hierarchy'), K <= 16, TP parameters reserved. Signatures, outputs and the A2
rules of combine_v2 (expand_scales required, no shared_expert_x, x_active_mask reserved) from op-plugin
docs/context/torch_npu-npu_moe_distribute_dispatch_v2.md and ..._combine_v2.md. Older releases of those docs are
narrower (A2 EP 16..256 and <= 24 experts per rank, A3 without expert_scales, combine H <= 7168): a real op of such
a release rejects calls this spec accepts, which the vendor check on an NPU host would show.

What the spec fixes that the vendor leaves open (the adapter must not depend on it, and does not):
- expand_x rows are grouped by local expert (counts in expert_token_nums: that grouping IS documented and is what
  callers feed to a grouped GEMM); within an expert the spec orders them by source rank, then token;
- assist_info_for_combine / ep_recv_counts / expand_scales are opaque (the doc says their values differ per chip
  and algorithm): the spec stores the source (rank, token, slot) of each row in the first 3 of 128 int32 per row;
- combine reduces in fp32: sum over k in order of expert_scales[t,k] * y[t,k], then + shared_expert_x, cast to
  expand_x's dtype. The vendor's reduction order is its own: compare with a tolerance, never bitwise.
Not modelled (SpecNotModelledError): quantisation (quant_mode 2, comm_quant_mode 2), TP domains
(tp_world_size 2), shared-expert ranks, special (zero / copy / const) experts, elastic scaling, the 950.

`comm_name(group)` gives a gloo group the name that plays the HCCL communicator name's part; the stand-in torch_npu
exposes it as `spec_comm_name` (a real host uses `group._get_backend(npu).get_hccl_comm_name(rank)`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dsv4_portable.ep.transport import Comm, Field, pack, unpack

from .contract import (SpecNotModelledError, check_in, check_int, check_tensor, empty_float, need, require_soc,
                       spec_op)

SRC = ("op-plugin torch_npu-npu_moe_distribute_dispatch_v2.md / _combine_v2.md; per-SoC limits "
       "research/ascend.md 3.10 (ops-transformer mc2 README)")
FLOATS16 = (torch.bfloat16, torch.float16)
A2_EP_SIZES = (2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 192, 256, 384)      # comm_alg 'fullmesh' (and '')
A2_HIERARCHY_EP_SIZES = (16, 32, 64)
A2_COMM_ALGS = ("", "fullmesh", "hierarchy")
A3_COMM_ALGS = ("", "fullmesh_v1", "fullmesh_v2", "hierarchy")
ASSIST_WIDTH = 128                      # assist_info_for_combine has A * 128 int32 entries

_GROUPS: dict[str, object] = {}
_COMMS: dict[str, Comm] = {}            # one EP transport per named group (its exchanges wait at most its timeout)


def comm_name(group=None) -> str:
    """The name `group_ep` takes for a (gloo) process group under the spec: the HCCL comm name's stand-in."""
    pg = group if group is not None else dist.group.WORLD
    for name, known in _GROUPS.items():
        if known is pg:
            return name
    name = f"spec_hccl_comm_{len(_GROUPS)}"
    _GROUPS[name] = pg
    return name


def _group(op: str, name) -> Comm:
    """The exchanges of the group `group_ep` names: dsv4_portable.ep.transport's Comm over it, so the simulated
    MC2 exchange waits at most the group's timeout, as the reference EP's exchanges do."""
    need(isinstance(name, str) and 1 <= len(name) < 128, op, "group_ep", f"is {name!r}",
         "the EP communicator name, a string of 1..127 characters", SRC)
    need(name in _GROUPS, op, "group_ep", f"is {name!r}, which names no communicator",
         "the name from get_hccl_comm_name (under the spec: comm_name(group))", SRC)
    if name not in _COMMS:
        _COMMS[name] = Comm(_GROUPS[name])
    return _COMMS[name]


# ----------------------------------------------------------------------------------------------- contract
def _check_domain(op, soc, bs_arg, bs, h, k, ep_world_size, ep_rank_id, moe_expert_num, group_tp, tp_world_size,
                  tp_rank_id, expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs, comm_alg):
    """The rules shared by dispatch_v2 and combine_v2 (per SoC and comm_alg). Returns the local expert count.
    On A2, comm_alg '' runs 'fullmesh' unless HCCL env variables select 'hierarchy'; the spec takes '' as
    'fullmesh' (the default the README describes)."""
    if soc == "A2":
        check_in(op, "comm_alg", comm_alg, A2_COMM_ALGS, SRC)
        hierarchy = comm_alg == "hierarchy"
        sizes = A2_HIERARCHY_EP_SIZES if hierarchy else A2_EP_SIZES
        check_in(op, "ep_world_size", ep_world_size, sizes, SRC,
                 f"one of {sizes} on A2 with comm_alg {comm_alg or 'fullmesh'!r}")
        check_int(op, "moe_expert_num", moe_expert_num, SRC, 1, 512 if hierarchy else 1024,
                  rule=f"1..{512 if hierarchy else 1024} on A2 with comm_alg {comm_alg or 'fullmesh'!r}")
        check_int(op, "shared_expert_rank_num", shared_expert_rank_num, SRC, 0, 0,
                  rule="0 on A2 (no shared-expert ranks)")
        check_int(op, "tp_world_size", tp_world_size, SRC, 0, 0, rule="0 on A2 (no TP domain)")
        need(group_tp == "", op, "group_tp", f"is {group_tp!r}", "'' on A2 (no TP domain)", SRC)
        need(h % 32 == 0 and 0 < h <= 10240, op, "x", f"has H={h}", "H a multiple of 32, <= 10240 on A2", SRC)
        need(0 < bs <= (512 if hierarchy else 256), op, bs_arg, f"has BS={bs} tokens",
             f"0 < BS <= {512 if hierarchy else 256} on A2 with comm_alg {comm_alg or 'fullmesh'!r}", SRC)
    else:
        check_in(op, "comm_alg", comm_alg, A3_COMM_ALGS, SRC)
        if comm_alg == "hierarchy":
            need(16 <= ep_world_size <= 256 and ep_world_size % 16 == 0, op, "ep_world_size",
                 f"is {ep_world_size}", "16..256 and a multiple of 16 on A3 with comm_alg 'hierarchy'", SRC)
        check_int(op, "ep_world_size", ep_world_size, SRC, 2, 768, rule="2..768 on A3")
        check_int(op, "moe_expert_num", moe_expert_num, SRC, 1, 512 if comm_alg == "hierarchy" else 1024,
                  rule="1..1024 on A3 (1..512 with comm_alg 'hierarchy')")
        need(1024 <= h <= 8192, op, "x", f"has H={h}", "1024 <= H <= 8192 on A3", SRC)
        short = comm_alg in ("fullmesh_v2", "hierarchy")
        need(0 < bs <= (256 if short else 512), op, bs_arg, f"has BS={bs} tokens",
             "0 < BS <= 512 on A3 (<= 256 with comm_alg 'fullmesh_v2' or 'hierarchy')", SRC)
        check_int(op, "tp_world_size", tp_world_size, SRC, 0, 1, rule="0 or 1 on A3 (TP domain parameters are "
                  "reserved placeholders)")
        need(isinstance(group_tp, str) and len(group_tp) < 128, op, "group_tp", f"is {group_tp!r}",
             "a string shorter than 128 characters (a reserved placeholder)", SRC)
        check_int(op, "shared_expert_rank_num", shared_expert_rank_num, SRC, 0, ep_world_size - 1)
        if shared_expert_rank_num:
            raise SpecNotModelledError(op, "shared-expert ranks (shared_expert_rank_num > 0)")
        check_int(op, "shared_expert_num", shared_expert_num, SRC, 0, 4)
        check_int(op, "expert_shard_type", expert_shard_type, SRC, 0, 0, rule="only 0 on A3")
    check_int(op, "tp_rank_id", tp_rank_id, SRC, 0, 0, rule="0 (no TP domain)")
    check_int(op, "ep_rank_id", ep_rank_id, SRC, 0, ep_world_size - 1)
    moe_ranks = ep_world_size - shared_expert_rank_num
    need(moe_expert_num % moe_ranks == 0, op, "moe_expert_num", f"is {moe_expert_num} for {moe_ranks} MoE ranks",
         "moe_expert_num % (ep_world_size - shared_expert_rank_num) == 0", SRC)
    need(0 < k <= min(16, moe_expert_num), op, "expert_ids", f"has K={k} slots per token",
         "0 < K <= 16 and K <= moe_expert_num", SRC)
    check_int(op, "global_bs", global_bs, SRC, 0, None)
    return moe_expert_num // moe_ranks


def _check_expert_ids(op, expert_ids, bs, moe_expert_num):
    check_tensor(op, "expert_ids", expert_ids, SRC, dtypes=(torch.int32,), ndim=2)
    need(expert_ids.shape[0] == bs, op, "expert_ids", f"has {expert_ids.shape[0]} rows", f"one per token ({bs})", SRC)
    ids = expert_ids.long()
    need(bool(((ids >= 0) & (ids < moe_expert_num)).all()), op, "expert_ids",
         f"has values in [{int(ids.min())}, {int(ids.max())}]", f"every id in [0, moe_expert_num={moe_expert_num})",
         SRC)
    row_sorted = ids.sort(dim=1).values
    need(bool((row_sorted[:, 1:] != row_sorted[:, :-1]).all()), op, "expert_ids", "repeats an expert within a row",
         "the K ids of one row are distinct", SRC)


def _check_token_mask(op, mask, bs, k, allow_2d: bool):
    check_tensor(op, "x_active_mask", mask, SRC, dtypes=(torch.bool,), ndim=(1, 2) if allow_2d else 1)
    need(tuple(mask.shape) in ((bs,), (bs, k)), op, "x_active_mask", f"has shape {list(mask.shape)}",
         f"[BS={bs}]" + (f" or [BS, K={k}]" if allow_2d else ""), SRC)
    if mask.dim() == 1:
        m = mask.long()
        need(bool((m[1:] <= m[:-1]).all()), op, "x_active_mask", f"is {mask.tolist()}",
             "true entries before false ones (e.g. [true, false, true] is invalid)", SRC)


def _agree_on_bs(op, comm: Comm, bs, ep_world_size, global_bs, all_active: bool) -> int:
    """Every rank's BS (one small exchange): the documented global_bs rule. Returns the effective global BS."""
    sizes = comm.exchange_counts(torch.full((ep_world_size, 1), bs, dtype=torch.int64), f"{op}: BS")[:, 0].tolist()
    max_bs = max(sizes)
    if len(set(sizes)) > 1:
        need(global_bs == max_bs * ep_world_size, op, "global_bs", f"is {global_bs} with BS {sizes} across ranks",
             "max_bs * ep_world_size when ranks have different BS", SRC)
        need(all_active, op, "x_active_mask", "masks tokens while ranks have different BS",
             "every token active when BS differs across ranks", SRC)
    else:
        need(global_bs in (0, bs * ep_world_size), op, "global_bs", f"is {global_bs} with BS {bs} on every rank",
             "0 or BS * ep_world_size when every rank has the same BS", SRC)
    return global_bs or bs * ep_world_size


def _not_modelled(op, **args):
    for name, value in args.items():
        if value not in (None, 0):
            raise SpecNotModelledError(op, f"{name}={value!r}")


def _exchange(comm: Comm, what: str, send_counts: list[int], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows of tensors (one row count; send_counts[r] of them, in order, to rank r) to their ranks: a counts
    exchange, then the rows packed side by side in one exchange (ep.transport)."""
    recv_counts = comm.exchange_counts(torch.tensor(send_counts, dtype=torch.int64).view(-1, 1),
                                       f"{what} counts")[:, 0].tolist()
    fields = [Field(str(i), t.dtype, tuple(t.shape[1:])) for i, t in enumerate(tensors)]
    got = unpack(fields, comm.all_to_all(pack(fields, list(tensors), tensors[0].device), send_counts, recv_counts,
                                         what))
    return [got[f.name] for f in fields]


# ----------------------------------------------------------------------------------------------- dispatch
@spec_op("npu_moe_distribute_dispatch_v2", ("torch_npu",), SRC)
def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                   scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                   performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                   expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
                                   global_bs=0, expert_token_nums_type=1, comm_alg="", zero_expert_num=0,
                                   copy_expert_num=0, const_expert_num=0, y_dtype=None, x_dtype=None,
                                   scales_dtype=None):
    """(expand_x [A, H], dynamic_scales, assist_info_for_combine int32 [A*128], expert_token_nums int64 [E_local],
    ep_recv_counts int32, tp_recv_counts int32, expand_scales fp32 [A] (A2) or None (A3)).

    Every active (token, slot) goes to the rank holding expert_ids[t, k] (expert e on rank e // E_local) with its
    row of x; expand_x holds the received rows grouped by local expert (expert_token_nums of them per expert),
    A = global_bs * min(E_local, K) rows in all (global_bs = BS * ep_world_size when 0); rows past the received
    ones are zero. Collective over group_ep: every rank calls it with the same domain arguments."""
    op = "npu_moe_distribute_dispatch_v2"
    soc = require_soc(op, ("A2", "A3", "950"), SRC)
    if soc == "950":
        raise SpecNotModelledError(op, "the 950 contract")
    check_tensor(op, "x", x, SRC, dtypes=FLOATS16, ndim=2)
    bs, h = x.shape
    k = expert_ids.shape[1] if isinstance(expert_ids, torch.Tensor) and expert_ids.dim() == 2 else 0
    local_e = _check_domain(op, soc, "x", bs, h, k, ep_world_size, ep_rank_id, moe_expert_num, group_tp,
                            tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num, shared_expert_rank_num,
                            global_bs, comm_alg)
    _check_expert_ids(op, expert_ids, bs, moe_expert_num)
    check_in(op, "quant_mode", quant_mode, (0, 2), SRC, "0 (none) or 2 (dynamic per-token int8)")
    if quant_mode == 2 or scales is not None:
        raise SpecNotModelledError(op, "dynamic quantisation (quant_mode 2, scales)")
    check_in(op, "expert_token_nums_type", expert_token_nums_type, (0, 1), SRC, "0 prefix sums, 1 counts")
    check_tensor(op, "expert_scales", expert_scales, SRC, dtypes=(torch.float32,), ndim=2, optional=True)
    need(expert_scales is None or tuple(expert_scales.shape) == (bs, k), op, "expert_scales",
         f"has shape {list(expert_scales.shape) if expert_scales is not None else None}", f"[BS={bs}, K={k}]", SRC)
    if soc == "A2":
        for name, value in (("zero_expert_num", zero_expert_num), ("copy_expert_num", copy_expert_num),
                            ("const_expert_num", const_expert_num)):
            check_int(op, name, value, SRC, 0, 0, rule="0 on A2 (no special experts)")
        need(elastic_info is None, op, "elastic_info", "is given", "None on A2 (reserved)", SRC)
    else:
        need(not (comm_alg == "fullmesh_v2" and x_active_mask is not None), op, "x_active_mask", "is given with "
             "comm_alg 'fullmesh_v2'", "no x_active_mask with 'fullmesh_v2' on A3", SRC)
        _not_modelled(op, zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                      const_expert_num=const_expert_num, elastic_info=elastic_info)
    _not_modelled(op, performance_info=performance_info)
    for name, value in (("y_dtype", y_dtype), ("x_dtype", x_dtype), ("scales_dtype", scales_dtype)):
        need(value is None, op, name, f"is {value!r}", "None on A2/A3 (950 only)", SRC)
    need(not (soc == "A2" and comm_alg == "hierarchy" and x_active_mask is not None), op, "x_active_mask",
         "is given with comm_alg 'hierarchy'", "no x_active_mask with 'hierarchy' on A2", SRC)
    active = torch.ones(bs, k, dtype=torch.bool)
    if x_active_mask is not None:
        _check_token_mask(op, x_active_mask, bs, k, allow_2d=soc == "A3")
        active = x_active_mask.unsqueeze(1).expand(bs, k) if x_active_mask.dim() == 1 else x_active_mask.clone()
    comm = _group(op, group_ep)
    need(comm.world_size == ep_world_size, op, "ep_world_size",
         f"is {ep_world_size}, the group has {comm.world_size} ranks", "the size of group_ep", SRC)
    need(comm.rank == ep_rank_id, op, "ep_rank_id", f"is {ep_rank_id} on rank {comm.rank}",
         "this rank's id in group_ep", SRC)
    gbs = _agree_on_bs(op, comm, bs, ep_world_size, global_bs, bool(active.all()))
    a_rows = gbs * min(local_e, k)

    ids = expert_ids.long()
    tok, slot = active.nonzero().unbind(1)                      # active slots, token order then k
    dst, expert = ids[tok, slot] // local_e, ids[tok, slot] % local_e
    order = torch.argsort(dst * (local_e * bs * k) + expert * (bs * k) + tok * k + slot)   # by rank, expert, token
    tok, slot, dst, expert = tok[order], slot[order], dst[order], expert[order]
    weights = expert_scales[tok, slot] if expert_scales is not None else torch.zeros(tok.shape[0])
    meta = torch.stack([torch.full_like(tok, ep_rank_id), tok, slot, expert], 1)
    send_counts = torch.bincount(dst, minlength=ep_world_size).tolist()
    rows, meta, weights = _exchange(comm, op, send_counts, x[tok], meta, weights.float())
    by_expert = torch.argsort(meta[:, 3], stable=True)          # stable: source rank, then token, within an expert
    rows, meta, weights = rows[by_expert], meta[by_expert], weights[by_expert]
    n = rows.shape[0]

    expand_x = torch.zeros(a_rows * max(tp_world_size, 1), h, dtype=x.dtype)
    expand_x[:n] = rows
    assist = torch.zeros(a_rows, ASSIST_WIDTH, dtype=torch.int32)
    assist[:n, :3] = meta[:, :3].to(torch.int32)
    per_expert = torch.bincount(meta[:, 3], minlength=local_e)
    expert_token_nums = per_expert if expert_token_nums_type == 1 else per_expert.cumsum(0)
    per_pair = torch.bincount(meta[:, 3] * ep_world_size + meta[:, 0], minlength=local_e * ep_world_size)
    prefix = per_pair.cumsum(0).to(torch.int32)                 # (local expert, source rank) pairs, prefix sums
    if soc == "A2":
        ep_recv_counts = torch.cat([prefix, torch.zeros(2 * gbs * k, dtype=torch.int32)])
        tp_recv_counts = torch.empty(0, dtype=torch.int32)
        expand_scales = torch.zeros(a_rows, dtype=torch.float32)
        expand_scales[:n] = weights
    else:
        ep_recv_counts = prefix
        tp_recv_counts = torch.tensor([n], dtype=torch.int32)
        expand_scales = None
    return (expand_x, empty_float(), assist.reshape(-1), expert_token_nums.to(torch.int64), ep_recv_counts,
            tp_recv_counts, expand_scales)


# ----------------------------------------------------------------------------------------------- combine
@spec_op("npu_moe_distribute_combine_v2", ("torch_npu",), SRC)
def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                  expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0,
                                  comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """x [BS, H] in expand_x's dtype: the rows of expand_x (expert outputs, in dispatch_v2's row order) go back to
    their source tokens; x[t] = cast(sum_{k in order} expert_scales[t, k] * y[t, k] (fp32) + shared_expert_x[t]).
    Collective over group_ep, the reverse path of dispatch_v2."""
    op = "npu_moe_distribute_combine_v2"
    soc = require_soc(op, ("A2", "A3", "950"), SRC)
    if soc == "950":
        raise SpecNotModelledError(op, "the 950 contract")
    check_tensor(op, "expand_x", expand_x, SRC, dtypes=FLOATS16, ndim=2)
    check_tensor(op, "expert_scales", expert_scales, SRC, dtypes=(torch.float32,), ndim=2)
    bs, k = expert_scales.shape
    h = expand_x.shape[1]
    local_e = _check_domain(op, soc, "expert_scales", bs, h, k, ep_world_size, ep_rank_id, moe_expert_num,
                            group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                            shared_expert_rank_num, global_bs, comm_alg)
    _check_expert_ids(op, expert_ids, bs, moe_expert_num)
    need(tuple(expert_ids.shape) == (bs, k), op, "expert_scales", f"has shape {[bs, k]}",
         f"expert_ids' shape {list(expert_ids.shape)}", SRC)
    check_in(op, "comm_quant_mode", comm_quant_mode, (0, 2), SRC, "0 (none) or 2 (int8 in transit)")
    if comm_quant_mode == 2:
        raise SpecNotModelledError(op, "int8 communication (comm_quant_mode 2)")
    _not_modelled(op, elastic_info=elastic_info, ori_x=ori_x, const_expert_alpha_1=const_expert_alpha_1,
                  const_expert_alpha_2=const_expert_alpha_2, const_expert_v=const_expert_v,
                  zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    check_tensor(op, "assist_info_for_combine", assist_info_for_combine, SRC, dtypes=(torch.int32,), ndim=1)
    check_tensor(op, "ep_send_counts", ep_send_counts, SRC, dtypes=(torch.int32,), ndim=1)
    a_rows = assist_info_for_combine.shape[0] // ASSIST_WIDTH
    need(assist_info_for_combine.shape[0] % ASSIST_WIDTH == 0 and expand_x.shape[0] == a_rows * max(tp_world_size, 1),
         op, "assist_info_for_combine", f"has {assist_info_for_combine.shape[0]} entries for expand_x "
         f"{list(expand_x.shape)}", "A * 128 entries, expand_x [max(tp_world_size, 1) * A, H]", SRC)
    pairs = local_e * ep_world_size
    if soc == "A2":
        check_tensor(op, "expand_scales", expand_scales, SRC, dtypes=(torch.float32,), ndim=1)
        need(expand_scales.shape[0] == a_rows, op, "expand_scales", f"has {expand_scales.shape[0]} entries",
             f"A = {a_rows} (dispatch_v2's expand_scales; required on A2)", SRC)
        need(shared_expert_x is None, op, "shared_expert_x", "is given", "not supported on A2", SRC)
        need(x_active_mask is None, op, "x_active_mask", "is given", "reserved on A2 (leave the default)", SRC)
        need(tp_send_counts is None, op, "tp_send_counts", "is given", "None on A2 (no TP domain)", SRC)
        need(ep_send_counts.shape[0] >= moe_expert_num, op, "ep_send_counts", f"has {ep_send_counts.shape[0]} "
             "entries", "moe_expert_num + 2 * global_bs * K * server_num entries (dispatch_v2's ep_recv_counts)", SRC)
    else:
        need(expand_scales is None, op, "expand_scales", "is given", "not supported on A3 (leave the default)", SRC)
        need(ep_send_counts.shape[0] == pairs * max(tp_world_size, 1), op, "ep_send_counts",
             f"has {ep_send_counts.shape[0]} entries", "ep_world_size * max(tp_world_size, 1) * local_expert_num",
             SRC)
        check_tensor(op, "tp_send_counts", tp_send_counts, SRC, dtypes=(torch.int32,), ndim=1, optional=True)
        if x_active_mask is not None:
            _check_token_mask(op, x_active_mask, bs, k, allow_2d=False)
        if shared_expert_x is not None:
            check_tensor(op, "shared_expert_x", shared_expert_x, SRC, dtypes=(expand_x.dtype,), ndim=(2, 3))
            need(shared_expert_x.numel() == bs * h and shared_expert_x.shape[-1] == h, op, "shared_expert_x",
                 f"has shape {list(shared_expert_x.shape)}", f"[BS={bs}, H={h}] (or 3-D with the same elements)",
                 SRC)
    comm = _group(op, group_ep)
    need(comm.world_size == ep_world_size and comm.rank == ep_rank_id, op, "ep_rank_id",
         f"is {ep_rank_id} of {ep_world_size} on rank {comm.rank} of {comm.world_size}",
         "this rank's id in group_ep, whose size is ep_world_size", SRC)
    gbs = _agree_on_bs(op, comm, bs, ep_world_size, global_bs, True)
    need(a_rows >= gbs * min(local_e, k), op, "expand_x", f"has A={a_rows} rows",
         f"A >= global_bs * min(local_expert_num, K) = {gbs * min(local_e, k)}", SRC)

    n = int(ep_send_counts[pairs - 1])                          # prefix sums: the last pair's is the row count
    meta = assist_info_for_combine.view(a_rows, ASSIST_WIDTH)[:n, :3].long()
    order = torch.argsort(meta[:, 0], stable=True)              # back to the source ranks, rank after rank
    send_counts = torch.bincount(meta[:, 0], minlength=ep_world_size).tolist()
    rows, where = _exchange(comm, op, send_counts, expand_x[:n][order], meta[order][:, 1:])
    per_slot = torch.zeros(bs, k, h, dtype=torch.float32)
    present = torch.zeros(bs, k, dtype=torch.bool)
    per_slot[where[:, 0], where[:, 1]] = rows.float()
    present[where[:, 0], where[:, 1]] = True
    acc = torch.zeros(bs, h, dtype=torch.float32)
    for j in range(k):
        acc += torch.where(present[:, j:j + 1], expert_scales[:, j:j + 1] * per_slot[:, j], 0)
    if shared_expert_x is not None:
        acc += shared_expert_x.reshape(bs, h).float()
    return acc.to(expand_x.dtype)
