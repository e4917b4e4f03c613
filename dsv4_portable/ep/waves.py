"""The wave schedule of fine-grained EP (DESIGN.md 4): a rank's local experts are processed in waves of
`wave_size` experts, and the exchange for wave i+1 is in flight while wave i computes.

    counts for every wave (one small exchange)
    start dispatch(0)
    for wave i:  wait dispatch(i); start dispatch(i+1); compute(i); start combine(i)
    wait every combine; put the returned slot rows in place (or add the partial sums)

Wave i is local experts [i*w, (i+1)*w) on every rank, so all ranks run the same number of waves and issue the
same collectives in the same order. The ordered combine reduces per (token, slot) at the source after all waves
have returned, so the output does not depend on the wave size. `overlap=False` runs the same waves with every
exchange waited for before the next step: the no-overlap baseline the benchmark compares against.
On gloo the asynchronous all_to_all runs on the process group's worker threads while this thread computes.
"""
from __future__ import annotations

from typing import Callable

import torch

from .dispatch import EPHandle, add_partials, layout_counts, scatter_slots, start_combine, start_dispatch
from .placement import ExpertPlacement
from .transport import Comm, from_bytes


def num_waves(experts_per_rank: int, wave_size: int | None) -> int:
    w = experts_per_rank if wave_size is None else wave_size
    if not isinstance(w, int) or w < 1:
        raise ValueError(f"wave_size must be a positive int or None (all local experts), got {wave_size!r}")
    return -(-experts_per_rank // w)


def run_waves(comm: Comm, xs: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype, phys: torch.Tensor,
              weights: torch.Tensor, placement: ExpertPlacement, compute: Callable, wave_size: int | None,
              mode: str, apply_weights: bool, overlap: bool = True, timings: dict | None = None):
    """Dispatch, compute and combine wave by wave.

    compute(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, handle) -> y [N, K, H] for one wave's rows.
    Returns per_slot [T, K, H] (mode "ordered": every dispatched slot's expert output, in place) or the fp32 sum
    of the per-rank partial sums [T, H] (mode "partial", rank order within a wave, waves in order)."""
    eloc = placement.experts_per_rank
    n = num_waves(eloc, wave_size)
    w = eloc if wave_size is None else wave_size
    t, k = phys.shape
    wave_of = torch.where(phys >= 0, (phys % eloc) // w, -1)
    masks = [wave_of == i for i in range(n)]
    send = torch.cat([layout_counts(phys, m, eloc, comm.world_size) for m in masks], dim=1)   # [R, 2n]
    recv = comm.exchange_counts(send)

    def dispatch(i: int, async_op: bool):
        return start_dispatch(comm, xs, scales, dtype, phys, weights, masks[i], placement,
                              recv[:, 2 * i].tolist(), recv[:, 2 * i + 1].tolist(), async_op)

    clock = timings if timings is not None else {}
    combines: list[tuple[EPHandle, tuple]] = []
    pending = dispatch(0, overlap)
    for i in range(n):
        t0 = _now()
        got = pending.finish()
        clock["wait_s"] = clock.get("wait_s", 0.0) + _now() - t0
        if i + 1 < n:
            pending = dispatch(i + 1, overlap)
        t0 = _now()
        y = compute(*got)
        clock["compute_s"] = clock.get("compute_s", 0.0) + _now() - t0
        h = got[4]
        combines.append((h, start_combine(comm, y, h, mode, apply_weights, overlap)))
    t0 = _now()
    hdim = xs.shape[1]
    out = torch.zeros(t, k, hdim, dtype=dtype) if mode == "ordered" else torch.zeros(t, hdim, dtype=torch.float32)
    for h, (buf, work, rdtype, shape) in combines:
        if work is not None:
            work.wait()
        rows = from_bytes(buf, rdtype, shape)
        if mode == "ordered":
            scatter_slots(out, h, rows)
        else:
            add_partials(out, h, rows)
    clock["wait_s"] = clock.get("wait_s", 0.0) + _now() - t0
    return out


def _now() -> float:
    import time
    return time.perf_counter()
