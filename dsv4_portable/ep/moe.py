"""The expert-parallel MoE forward: route locally, dispatch, local experts, combine (DESIGN.md 2.6 and 4).

`ep_moe_forward` describes the call (EPCall), lets providers.py pick the exchange for the active device
(torch-dist everywhere; Ascend MC2 for the partial combine on A2/A3) and records what ran in `Comm.ran`.

With torch-dist and the ordered combine this equals the single-device `moe_experts` BIT FOR BIT for the same
routing: every routed slot runs the same batch-invariant expert (fixed 16-row GEMM tiles, reference
`expert_forward`, routing weight applied before w2 as V4 does), and the source adds the shared expert then slots
k = 0..K-1 in fp32. The partial combine starts from the same shared-expert output (see dispatch.py for its order).
"""
from __future__ import annotations

import torch

from ..reference.moe import ExpertWeights, expert_forward
from ..reference.quant import FP8_LINEAR_BLOCK, dequant_fp8
from . import providers
from .dispatch import COMBINE_MODES, EPInputError, check_dispatch_args, split_x
from .placement import ExpertPlacement
from .providers import EPCall
from .transport import Comm
from .waves import num_waves, run_waves


def local_experts(experts: ExpertWeights, placement: ExpertPlacement, rank: int) -> ExpertWeights:
    """The weights of `rank`'s local experts (redundant copies included), in local-id order."""
    return experts.select(torch.tensor(placement.local_logical(rank), dtype=torch.int64, device=experts.w1.device))


def expert_compute(local: ExpertWeights, swiglu_limit: float, record: list | None = None):
    """compute() for run_waves: each local expert on its received rows, slot outputs in y [N, K, H].
    record (if given) collects (src_rank, src_index, k) of every processed slot, for the exactly-once check."""
    def compute(recv_x, recv_scales, recv_idx, recv_w, handle):
        x = recv_x if recv_scales is None else \
            dequant_fp8(recv_x, recv_scales, FP8_LINEAR_BLOCK).to(handle.dtype)
        y = torch.zeros(recv_idx.shape[0], recv_idx.shape[1], x.shape[1], dtype=handle.dtype, device=x.device)
        for e in torch.unique(recv_idx[recv_idx >= 0]).tolist():
            slots = (recv_idx == e).nonzero()                 # received rows in canonical order, then k
            rows, ks = slots[:, 0], slots[:, 1]
            y[rows, ks] = expert_forward(x[rows], local, e, recv_w[rows, ks], swiglu_limit)
            if record is not None:
                record.append(torch.stack([handle.recv_src_rank[rows], handle.recv_src_index[rows], ks], 1))
        return y
    return compute


def torch_dist_forward(x, topk_idx, topk_weights, experts, shared, swiglu_limit, placement, comm, call, *,
                       wave_size=None, fp8=False, mode="ordered", overlap=True, record=None, timings=None):
    """The torch-dist provider: the wave schedule over all_to_all_single (waves.py)."""
    xs, scales, _ = split_x(x, fp8)
    phys = placement.to_physical(topk_idx, comm.rank)
    bias = expert_forward(x, shared, 0, None, swiglu_limit) if shared is not None and x.shape[0] else None
    out = run_waves(comm, xs, scales, x.dtype, phys, topk_weights, placement,
                    expert_compute(experts, swiglu_limit, record), wave_size, mode, apply_weights=False, bias=bias,
                    overlap=overlap, timings=timings)
    comm.ran[("torch-dist", comm.transport)] += 1
    return out


def describe_call(comm: Comm, x: torch.Tensor, topk_idx: torch.Tensor, placement: ExpertPlacement, fp8: bool,
                  mode: str, wave_size: int | None, device_type: str | None = None) -> EPCall:
    """The call as every rank sees it. The largest token count over the ranks is exchanged only when a candidate
    provider of this device needs it (one small collective)."""
    if device_type is None:
        from ..registry import active_backend
        device_type = active_backend().device_type
    max_tokens = None
    if any(p.needs_max_tokens for p in providers.candidates(device_type)):
        mine = torch.full((comm.world_size, 1), x.shape[0], dtype=torch.int64, device=x.device)
        max_tokens = int(comm.exchange_counts(mine, "token counts").max())
    return EPCall(device_type, comm.world_size, x.shape[1], topk_idx.shape[1], placement.num_physical,
                  placement.experts_per_rank, max_tokens, x.dtype, fp8, mode, wave_size)


def ep_moe_forward(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: ExpertWeights,
                   shared: ExpertWeights | None, swiglu_limit: float, placement: ExpertPlacement, group=None, *,
                   wave_size: int | None = None, fp8: bool = False, mode: str = "ordered", overlap: bool = True,
                   record: list | None = None, timings: dict | None = None, provider: str | None = None,
                   device_type: str | None = None, check_routing: bool = True) -> torch.Tensor:
    """MoE output [T, H] (x's dtype) for this rank's tokens. Every rank of the group must call it together.

    x: [T, H] this rank's tokens (T may be 0); topk_idx int [T, K] logical ids (-1 = none); topk_weights float32
    [T, K]; experts: this rank's LOCAL experts (see local_experts); shared: the shared expert (1 expert) or None;
    placement: where experts live; group: process group or Comm; wave_size: local experts per wave (None = all);
    fp8: send activations as FP8 (reference recipe, quantised at the source); mode: "ordered" (bitwise equal to
    the single-device MoE) or "partial" (per-rank partial sums, see dispatch.py); overlap: False waits for every
    exchange before the next step (benchmark baseline); provider: force one EP provider (providers.py), None =
    the device's preference; device_type: the device whose providers are considered (default: the active
    backend's); check_routing: False when the caller's topk_idx is valid by construction (the model's router,
    EPContext), which skips the range check's host read on every layer."""
    comm = group if isinstance(group, Comm) else Comm(group)
    check_dispatch_args(x, topk_idx, topk_weights, placement, comm.world_size, check_values=check_routing)
    if mode not in COMBINE_MODES:
        raise EPInputError(f"ep_moe_forward: mode must be one of {COMBINE_MODES}, got {mode!r}")
    if experts.num_experts != placement.experts_per_rank:
        raise EPInputError(f"ep_moe_forward: 'experts' must be this rank's {placement.experts_per_rank} local "
                           f"experts (see local_experts), got {experts.num_experts}")
    num_waves(placement.experts_per_rank, wave_size)           # a bad wave size fails before any exchange
    call = describe_call(comm, x, topk_idx, placement, fp8, mode, wave_size, device_type)
    chosen, _ = providers.select(call, provider)
    return chosen.fn(x, topk_idx, topk_weights, experts, shared, swiglu_limit, placement, comm, call,
                     wave_size=wave_size, fp8=fp8, mode=mode, overlap=overlap, record=record, timings=timings)

