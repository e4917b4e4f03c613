"""Ascend MC2 EP provider: one MoE layer as npu_moe_distribute_dispatch_v2 -> local experts (the registry's
moe_experts) -> npu_moe_distribute_combine_v2 (research/ascend.md 3.10; the executable spec of both ops is
conformance/ascend_spec/ep.py, which the CPU tests run in place of torch_npu).

How our contract maps onto the ops:
- MC2's expert ids are our physical ids (placement.to_physical, redundant copies included); moe_expert_num is the
  number of physical experts, experts e * E_local .. on rank e.
- Every rank passes the same BS: the tokens are padded to the largest token count over the ranks
  (EPCall.max_tokens, agreed by one small exchange) and the padding is masked out with a 1-D x_active_mask
  (valid rows first, as the ops require); global_bs = BS * ep_world_size.
- -1 slots: MC2 wants K distinct valid ids per row and A2 has no per-slot mask, so a -1 slot gets an expert id its
  row does not use and routing weight 0: combine multiplies that expert output by 0. (It costs one dispatched row
  per -1 slot; A3's 2-D mask could avoid it, one path for both chips is kept on purpose.)
- Routing weights go in as expert_scales and combine applies them AFTER w2 (V4 applies them before w2), and the
  vendor reduces in its own order: so this provider serves the tolerance-checked "partial" combine only and
  declines "ordered" (bitwise) calls, which torch-dist runs.
  A2: dispatch carries the weights along (expand_scales) and combine requires them; A3 takes none in dispatch.
- Local experts: the registry's moe_experts on the received rows (grouped by local expert, expert_token_nums per
  expert) with unit weights, so the ascend backend's providers (or the reference) compute them.
- Shared expert: the registry's moe_experts too (the shared stack as one expert, unit weights), so the ascend
  providers compute it; it goes in as shared_expert_x on A3; A2's combine takes none, so it is added here in fp32.
- A3 gets the TP placeholders group_tp = the EP comm name, tp_world_size 1, tp_rank_id 0 (as vllm-ascend passes).
- quant_mode 0 (bf16 on the wire): A2/A3 have no FP8 and MC2's quant_mode 2 is per-token int8, not DeepSeek's FP8
  recipe, so FP8 dispatch is declined.
"""
from __future__ import annotations

import sys

import torch

from .providers import EPCall

DISPATCH = ("torch_npu.npu_moe_distribute_dispatch_v2",)     # vendor_ops candidates ("namespace.op")
COMBINE = ("torch_npu.npu_moe_distribute_combine_v2",)
A2_EP_SIZES = (2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 192, 256, 384)
SIMULATED_LABEL = "ascend-spec stand-in over cpu-gloo (simulated)"


def _chip() -> str | None:
    from ..backends.ascend.chip import chip        # imported on use: importing ep must not load the backend
    return chip()


def _simulated() -> bool:
    from ..backends.ascend.common import simulated
    return simulated()


def availability() -> list[str]:
    if "torch_npu" not in sys.modules:
        return ["torch_npu is not loaded (choose --device ascend on an Ascend host)"]
    from ..backends.ascend import vendor_ops
    reasons = vendor_ops.reasons(DISPATCH) + vendor_ops.reasons(COMBINE)
    chip = _chip()
    if chip not in ("A2", "A3"):
        reasons.append(f"chip {chip or 'unknown'}: the MC2 adapter follows the A2/A3 contracts only")
    return reasons


def supports(call: EPCall) -> list[str]:
    """Reasons this call cannot go through MC2 (every rank sees the same call, so all decide alike)."""
    chip = _chip()
    r = []
    if call.mode == "ordered":
        r.append("combine_v2 weights after w2 and reduces in the vendor's order; the bitwise ordered combine runs "
                 "on torch-dist")
    if call.fp8:
        r.append("FP8 dispatch: A2/A3 have no FP8 and MC2's quant_mode 2 is per-token int8, not DeepSeek's FP8 "
                 "recipe (torch-dist sends FP8 as bytes)")
    if call.wave_size is not None and call.wave_size < call.experts_per_rank:
        r.append("a wave schedule: dispatch_v2 / combine_v2 exchange a whole layer at once")
    if call.dtype not in (torch.bfloat16, torch.float16):
        r.append(f"activations {call.dtype}: dispatch_v2 takes bf16 / fp16")
    if call.world_size < 2:
        r.append("world size 1: MC2 needs an EP domain of at least 2 ranks")
    if call.topk > 16 or call.topk >= call.num_physical:
        r.append(f"top-{call.topk} of {call.num_physical} experts: MC2 takes K <= 16, and -1 slots need a spare id")
    bs = call.max_tokens or 1
    if chip == "A2":
        if call.world_size not in A2_EP_SIZES:
            r.append(f"EP {call.world_size}: A2 (fullmesh) takes EP sizes {A2_EP_SIZES}")
        if call.num_physical > 1024:
            r.append(f"{call.num_physical} experts: A2 takes at most 1024 (fullmesh)")
        if call.hidden % 32 or call.hidden > 10240:
            r.append(f"hidden {call.hidden}: A2 takes a multiple of 32 up to 10240")
        if bs > 256:
            r.append(f"{bs} tokens on a rank: A2 takes BS <= 256")
    elif chip == "A3":
        if call.world_size > 768:
            r.append(f"EP {call.world_size}: A3 takes 2..768")
        if call.num_physical > 1024:
            r.append(f"{call.num_physical} experts: A3 takes at most 1024")
        if not 1024 <= call.hidden <= 8192:
            r.append(f"hidden {call.hidden}: A3 takes 1024..8192")
        if bs > 512:
            r.append(f"{bs} tokens on a rank: A3 takes BS <= 512")
    return r


def hccl_comm_name(group, rank: int) -> str:
    """The communicator name MC2 ops take as group_ep: the one place that knows how to get it. A real host asks the
    group's hccl backend; the spec stand-in names its gloo groups itself."""
    npu = sys.modules["torch_npu"]
    if _simulated():
        return npu.spec_comm_name(group)
    import torch.distributed as dist
    pg = group if group is not None else dist.group.WORLD
    return pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def fill_masked_slots(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [N, K] int64 with -1 for no expert -> every -1 replaced by an id its row does not use (the smallest
    free ones, in slot order), so each row holds K distinct valid ids. Vectorised, no host sync."""
    n, k = ids.shape
    valid = ids >= 0
    used = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=ids.device)
    used.scatter_(1, torch.where(valid, ids, num_experts), True)            # column E collects the -1 slots
    free_count = (~used[:, :num_experts]).to(torch.int64).cumsum(1)           # [N, E] non-decreasing per row
    nth_masked = (~valid).to(torch.int64).cumsum(1)                           # 1 for the row's first -1 slot, ...
    pick = torch.searchsorted(free_count, nth_masked.contiguous())            # first id with that many free ids
    return torch.where(valid, ids, pick)


def mc2_moe_forward(x, topk_idx, topk_weights, experts, shared, swiglu_limit, placement, comm, call, **_options):
    """The mc2 provider (see the module doc): out [T, H] in x's dtype."""
    from .. import ops
    from ..backends.ascend import vendor_ops
    chip = _chip()
    t, h = x.shape
    k = topk_idx.shape[1]
    bs, world, dev = call.max_tokens, comm.world_size, x.device
    if not bs:                                           # no rank has tokens: nothing to exchange (all agree)
        return x.new_zeros(0, h)
    phys = placement.to_physical(topk_idx, comm.rank)
    ids = torch.full((bs, k), -1, dtype=torch.int64, device=dev)
    ids[:t] = phys
    weights = torch.zeros(bs, k, dtype=torch.float32, device=dev)
    weights[:t] = torch.where(phys >= 0, topk_weights.float(), 0.0)
    ids = fill_masked_slots(ids, placement.num_physical).to(torch.int32)
    x_padded = torch.zeros(bs, h, dtype=x.dtype, device=dev)
    x_padded[:t] = x
    active = torch.arange(bs, device=dev) < t
    name = hccl_comm_name(comm.group, comm.rank)
    domain = (name, world, comm.rank, placement.num_physical)
    tp = {"group_tp": name, "tp_world_size": 1, "tp_rank_id": 0} if chip == "A3" else {}
    expand_x, _, assist, per_expert, ep_recv, tp_recv, expand_scales = vendor_ops.call(
        DISPATCH, x_padded, ids, *domain, x_active_mask=active, expert_scales=weights if chip == "A2" else None,
        quant_mode=0, global_bs=bs * world, expert_token_nums_type=1, **tp)
    # The one host sync of the layer: the expert GEMMs' row count depends on the routing. Knowing it, the expert
    # ids of the rows are made without another (repeat_interleave with output_size).
    n = int(per_expert.sum())
    y = torch.zeros_like(expand_x)
    if n:
        local = torch.repeat_interleave(torch.arange(placement.experts_per_rank, device=dev), per_expert.long(),
                                        output_size=n)
        y[:n] = ops.moe_experts(expand_x[:n], local.view(-1, 1), torch.ones(n, 1, device=dev), experts, None,
                                swiglu_limit)
    bias = None
    if shared is not None and t:       # a one-expert stack with unit weights through the registry (module doc)
        bias = ops.moe_experts(x, torch.zeros(t, 1, dtype=torch.int64, device=dev), torch.ones(t, 1, device=dev),
                               shared, None, swiglu_limit)
    if chip == "A2":
        extra = {"expand_scales": expand_scales}
    else:
        shared_x = torch.zeros(bs, h, dtype=x.dtype, device=dev)
        if bias is not None:
            shared_x[:t] = bias
        extra = {"tp_send_counts": tp_recv, "x_active_mask": active, "shared_expert_x": shared_x}
    out = vendor_ops.call(COMBINE, y, ids, assist, ep_recv, weights, *domain, global_bs=bs * world, **tp,
                          **extra)[:t]
    if chip == "A2" and bias is not None:
        out = (out.float() + bias.float()).to(x.dtype)
    label = SIMULATED_LABEL if _simulated() else f"device {'multi' if world > 1 else 'single'}-rank (hccl)"
    comm.ran[("mc2", label)] += 1
    return out
