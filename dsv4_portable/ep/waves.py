"""The wave schedule of fine-grained EP (DESIGN.md 4): a rank's local experts are processed in waves of
`wave_size` experts, and the exchange for wave i+1 is in flight while wave i computes.

    counts for every wave (one small exchange)
    start dispatch(0)
    for wave i:  wait dispatch(i); start dispatch(i+1); compute(i); [ordered: start combine(i)]
    ordered: wait every combine, put the returned slot rows in place, reduce at the source in k order
    partial: one combine after the last wave (per-(token, rank) partial sums over all waves), reduce in rank order

Wave i is local experts [i*w, (i+1)*w) on every rank, so all ranks run the same number of waves and issue the
same collectives in the same order. Both combines reduce per token over all waves in a fixed order (ordered: slot
k = 0..K-1 at the source; partial: k order per rank, then rank order), so the output does not depend on the wave
size. The partial combine's single exchange waits for the last wave: its rows are sums over every wave.
`overlap=False` runs the same waves with every exchange waited for before the next step: the no-overlap baseline
the benchmark compares against. On gloo the asynchronous all_to_all runs on the process group's worker threads
while this thread computes.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .dispatch import (EPHandle, layout_counts, ordered_payload, ordered_reduce, partial_reduce, partial_rows,
                       scatter_slots, start_dispatch, tokens_per_rank)
from .placement import ExpertPlacement
from .transport import Comm, from_bytes, to_bytes


def num_waves(experts_per_rank: int, wave_size: int | None) -> int:
    w = experts_per_rank if wave_size is None else wave_size
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise ValueError(f"wave_size must be a positive int or None (all local experts), got {wave_size!r}")
    return -(-experts_per_rank // w)


def run_waves(comm: Comm, xs: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype, phys: torch.Tensor,
              weights: torch.Tensor, placement: ExpertPlacement, compute: Callable, wave_size: int | None,
              mode: str, apply_weights: bool, bias: torch.Tensor | None, overlap: bool = True,
              timings: dict | None = None) -> torch.Tensor:
    """Dispatch, compute and combine wave by wave; returns the combined output [T, H] in `dtype`.

    compute(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, handle) -> y [N, K, H] for one wave's rows.
    bias [T, H] (the shared expert's output) is the fp32 starting value of every token's sum (both modes).
    timings (if given) accumulates compute_s (time inside compute)."""
    eloc = placement.experts_per_rank
    n = num_waves(eloc, wave_size)
    w = eloc if wave_size is None else wave_size
    t, k = phys.shape
    wave_of = torch.where(phys >= 0, (phys % eloc) // w, -1)
    masks = [wave_of == i for i in range(n)]
    layout = [layout_counts(phys, m, eloc, comm.world_size) for m in masks]
    recv = comm.exchange_counts(torch.cat(layout, dim=1), "wave counts")      # [R, 2n]: (rows, slots) per wave

    def dispatch(i: int):
        return start_dispatch(comm, xs, scales, dtype, phys, weights, masks[i], placement,
                              recv[:, 2 * i].tolist(), recv[:, 2 * i + 1].tolist(), async_op=overlap)

    clock = timings if timings is not None else {}
    ordered_back: list[tuple[EPHandle, torch.Tensor, object, tuple]] = []
    partial_pieces: list[tuple] = []
    pending = dispatch(0)
    for i in range(n):
        got = pending.finish()
        if i + 1 < n:
            pending = dispatch(i + 1)
        t0 = time.perf_counter()
        y = compute(*got)
        clock["compute_s"] = clock.get("compute_s", 0.0) + time.perf_counter() - t0
        h = got[4]
        if mode == "ordered":
            rows = ordered_payload(y, h.recv_topk_idx)
            buf, work = comm.all_to_all(to_bytes(rows), h.recv_slots_per_rank, h.slots_per_rank, "combine",
                                        async_op=True)
            if not overlap:
                comm.wait(work, "combine")
                work = None
            ordered_back.append((h, buf, work, tuple(rows.shape[1:])))
        else:
            partial_pieces.append((h.recv_src_rank, h.recv_src_index, h.recv_topk_idx, h.recv_topk_weights, y))
    if mode == "ordered":
        per_slot = torch.zeros(t, k, xs.shape[1], dtype=dtype, device=xs.device)
        for h, buf, work, shape in ordered_back:
            comm.wait(work, "combine")
            scatter_slots(per_slot, h, from_bytes(buf, dtype, shape))
        return ordered_reduce(per_slot, phys, weights if apply_weights else None, bias)
    rows, per_rank = partial_rows(partial_pieces, comm.world_size, apply_weights, dtype)
    send_token, counts = tokens_per_rank(phys, eloc, comm.world_size)
    buf = comm.all_to_all(to_bytes(rows), per_rank, counts, "combine")
    back = from_bytes(buf, dtype, (xs.shape[1],))
    return partial_reduce((back, counts), send_token, t, bias, dtype, xs.device)
