"""EP dispatch / combine cost and the wave schedule's overlap, at V4-Flash routing shapes, over CPU gloo.

V4-Flash (presets/flash.yaml): hidden 4096, 256 routed experts, top-6, one shared expert. Every rank routes
`--tokens` tokens with random top-6 experts; the figures are the slowest rank's median over `--reps` runs, all
measured side by side in one process group:
  - ep_dispatch in bf16 and FP8 (e4m3 + per-128 scales), ep_combine ordered and partial: time and bytes moved
    to other ranks per token (this rank's sends / its tokens);
  - the EP MoE forward with the wave schedule (`--waves` waves, all_to_all of wave i+1 in flight while wave i
    computes) against the same waves with every exchange waited for (no overlap): ratio no-overlap / overlap.
The expert intermediate size is `--inter` (default 256, not Flash's 2048) and every local expert shares one set
of weights (a view), so the run fits a CPU box; transport and layout are at full Flash width. CPU gloo only:
these numbers say nothing about NVLink / RDMA / HCCS.

    python benchmarks/bench_ep.py [--world 2] [--tokens 64] [--reps 5] [--waves 4] [--inter 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _rank(rank: int, world: int, a) -> dict:
    import torch.distributed as dist

    from dsv4_portable.ep.dispatch import ep_combine, ep_dispatch
    from dsv4_portable.ep.moe import ep_moe_forward
    from dsv4_portable.ep.placement import ExpertPlacement
    from dsv4_portable.ep.transport import Comm
    from dsv4_portable.reference.moe import ExpertWeights
    g = torch.Generator().manual_seed(rank)
    hidden, experts, topk = 4096, 256, 6
    x = torch.randn(a.tokens, hidden, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(a.tokens)])
    w = torch.rand(a.tokens, topk, generator=g)
    pl = ExpertPlacement.contiguous(experts, world)
    comm = Comm()
    one = [torch.randn(1, *s, generator=g).bfloat16() * 0.02 for s in
           ((a.inter, hidden), (hidden, a.inter), (a.inter, hidden))]
    local = ExpertWeights("bf16", *(t.expand(pl.experts_per_rank, *t.shape[1:]) for t in one))
    shared = ExpertWeights("bf16", *one)

    def timed(fn):
        times, out = [], None
        for _ in range(a.reps):
            dist.barrier()
            sent0 = comm.bytes_sent
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            sent = comm.bytes_sent - sent0
        return statistics.median(times), sent / a.tokens, out

    res = {}
    res["dispatch_bf16"] = timed(lambda: ep_dispatch(x, idx, w, pl, comm))[:2]
    res["dispatch_fp8"] = timed(lambda: ep_dispatch(x, idx, w, pl, comm, fp8=True))[:2]
    rx, _, ridx, rw, h = ep_dispatch(x, idx, w, pl, comm)
    y = torch.randn(rx.shape[0], topk, hidden, generator=g).bfloat16()
    res["combine_ordered"] = timed(lambda: ep_combine(y, h, None, "ordered", group=comm))[:2]
    res["combine_partial"] = timed(lambda: ep_combine(y, h, None, "partial", group=comm))[:2]
    wave = pl.experts_per_rank // a.waves
    for name, overlap in (("moe_no_overlap", False), ("moe_waves_overlap", True)):
        clock: dict = {}
        t, b, out = timed(lambda: ep_moe_forward(x, idx, w, local, shared, 10.0, pl, comm, wave_size=wave,
                                                 overlap=overlap, timings=clock))
        res[name] = (t, b)
        res[name + "_split"] = (clock.get("compute_s", 0) / a.reps, clock.get("wait_s", 0) / a.reps)
        res[name + "_out"] = out
    res["same_output"] = torch.equal(res["moe_no_overlap_out"], res["moe_waves_overlap_out"])
    res["transport"] = comm.transport
    for k in ("moe_no_overlap_out", "moe_waves_overlap_out"):
        del res[k]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--inter", type=int, default=256, help="expert intermediate size (Flash: 2048)")
    a = ap.parse_args(argv)
    if 256 % a.world or (256 // a.world) % a.waves:
        raise SystemExit(f"error: 256 experts must split evenly over --world {a.world} ranks and --waves {a.waves}")
    from dsv4_portable.ep.launch import spawn
    t0 = time.perf_counter()
    ranks = spawn(_rank, a.world, a, timeout_s=900, collective_timeout_s=300)
    slow = {k: max(r[k][0] for r in ranks) for k in ranks[0] if isinstance(ranks[0][k], tuple)}
    per_tok = {k: statistics.mean(r[k][1] for r in ranks) for k in slow}
    print(f"EP at V4-Flash routing: hidden 4096, 256 experts, top-6, {a.tokens} tokens/rank, world {a.world}, "
          f"{ranks[0]['transport']}; expert inter {a.inter}, {a.waves} waves; median of {a.reps}, slowest rank")
    print(f"{'step':22s} {'ms':>9s} {'bytes/token':>12s}")
    for k in ("dispatch_bf16", "dispatch_fp8", "combine_ordered", "combine_partial", "moe_no_overlap",
              "moe_waves_overlap"):
        print(f"{k:22s} {slow[k] * 1e3:9.2f} {per_tok[k]:12.0f}")
    for k in ("moe_no_overlap", "moe_waves_overlap"):
        c, wt = max(r[k + "_split"][0] for r in ranks), max(r[k + "_split"][1] for r in ranks)
        print(f"  {k}: compute {c * 1e3:.1f} ms, waiting on exchanges {wt * 1e3:.1f} ms (per forward)")
    print(f"ratios: fp8/bf16 dispatch bytes {per_tok['dispatch_fp8'] / per_tok['dispatch_bf16']:.3f}, time "
          f"{slow['dispatch_fp8'] / slow['dispatch_bf16']:.2f}; partial/ordered combine bytes "
          f"{per_tok['combine_partial'] / per_tok['combine_ordered']:.3f}, time "
          f"{slow['combine_partial'] / slow['combine_ordered']:.2f}; no-overlap/overlap MoE time "
          f"{slow['moe_no_overlap'] / slow['moe_waves_overlap']:.2f}")
    same = all(r["same_output"] for r in ranks)
    print(f"summary: world {a.world}, wave schedule output {'bitwise equal to' if same else 'DIFFERS from'} the "
          f"no-overlap schedule, overlap speedup {slow['moe_no_overlap'] / slow['moe_waves_overlap']:.2f}x, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
