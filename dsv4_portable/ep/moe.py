"""The expert-parallel MoE forward: route locally, dispatch, local experts, combine (DESIGN.md 2.6 and 4).

With the ordered combine this equals the single-device `moe_experts` BIT FOR BIT for the same routing: every
routed slot runs the same batch-invariant expert (fixed 16-row GEMM tiles, reference `expert_forward`, routing
weight applied before w2 as V4 does), and the source adds shared expert then slots k = 0..K-1 in fp32.
"""
from __future__ import annotations

import torch

from ..reference.moe import ExpertWeights, expert_forward
from ..reference.quant import FP8_LINEAR_BLOCK, dequant_fp8
from .dispatch import COMBINE_MODES, EPInputError, check_dispatch_args, ordered_reduce, split_x
from .placement import ExpertPlacement
from .transport import Comm
from .waves import run_waves


def local_experts(experts: ExpertWeights, placement: ExpertPlacement, rank: int) -> ExpertWeights:
    """The weights of `rank`'s local experts (redundant copies included), in local-id order."""
    return experts.select(torch.tensor(placement.local_logical(rank), dtype=torch.int64))


def expert_compute(local: ExpertWeights, swiglu_limit: float, record: list | None = None):
    """compute() for run_waves: each local expert on its received rows, slot outputs in y [N, K, H].
    record (if given) collects (src_rank, src_index, k) of every processed slot, for the exactly-once check."""
    def compute(recv_x, recv_scales, recv_idx, recv_w, handle):
        x = recv_x if recv_scales is None else \
            dequant_fp8(recv_x, recv_scales, FP8_LINEAR_BLOCK).to(handle.dtype)
        y = torch.zeros(recv_idx.shape[0], recv_idx.shape[1], x.shape[1], dtype=handle.dtype)
        for e in torch.unique(recv_idx[recv_idx >= 0]).tolist():
            slots = (recv_idx == e).nonzero()                 # received rows in canonical order, then k
            rows, ks = slots[:, 0], slots[:, 1]
            y[rows, ks] = expert_forward(x[rows], local, e, recv_w[rows, ks], swiglu_limit)
            if record is not None:
                record.append(torch.stack([handle.recv_src_rank[rows], handle.recv_src_index[rows], ks], 1))
        return y
    return compute


def ep_moe_forward(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: ExpertWeights,
                   shared: ExpertWeights | None, swiglu_limit: float, placement: ExpertPlacement, group=None, *,
                   wave_size: int | None = None, fp8: bool = False, mode: str = "ordered", overlap: bool = True,
                   record: list | None = None, timings: dict | None = None) -> torch.Tensor:
    """MoE output [T, H] (x's dtype) for this rank's tokens.

    x: [T, H] this rank's tokens (T may be 0); topk_idx int [T, K] logical ids (-1 = none); topk_weights float32
    [T, K]; experts: this rank's LOCAL experts (see local_experts); shared: the shared expert (1 expert) or None;
    placement: where experts live; group: process group or Comm; wave_size: local experts per wave (None = all);
    fp8: send activations as FP8 (reference recipe, quantised at the source); mode: "ordered" (bitwise equal to
    the single-device MoE) or "partial" (per-rank pre-reduction, tolerance only); overlap: False waits for every
    exchange before the next step (benchmark baseline)."""
    comm = group if isinstance(group, Comm) else Comm(group)
    check_dispatch_args(x, topk_idx, topk_weights, placement, comm.world_size)
    if mode not in COMBINE_MODES:
        raise EPInputError(f"ep_moe_forward: mode must be one of {COMBINE_MODES}, got {mode!r}")
    if experts.num_experts != placement.experts_per_rank:
        raise EPInputError(f"ep_moe_forward: 'experts' must be this rank's {placement.experts_per_rank} local "
                           f"experts (see local_experts), got {experts.num_experts}")
    xs, scales, dtype = split_x(x, fp8)
    phys = placement.to_physical(topk_idx, comm.rank)
    routed = run_waves(comm, xs, scales, x.dtype, phys, topk_weights, placement,
                       expert_compute(experts, swiglu_limit, record), wave_size, mode, apply_weights=False,
                       overlap=overlap, timings=timings)
    bias = expert_forward(x, shared, 0, None, swiglu_limit) if shared is not None and x.shape[0] else None
    if mode == "ordered":
        return ordered_reduce(routed, topk_idx, None, bias)
    return (routed if bias is None else bias.float() + routed).to(x.dtype)
