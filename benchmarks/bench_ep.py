"""EP dispatch / combine cost and the wave schedule's overlap, at V4-Flash routing shapes, over CPU gloo.

V4-Flash (presets/flash.yaml): hidden 4096, 256 routed experts, top-6. Every rank routes `--tokens` tokens with
random top-6 experts; each figure is the slowest rank's median over `--reps` runs (ranks start each run
together after a barrier), all measured side by side in one process group:
  - ep_dispatch in bf16 and FP8 (e4m3 + per-128 scales), ep_combine ordered and partial: time, and bytes this
    rank sent to other ranks per token of its own;
  - the MoE layer through the wave schedule (waves.run_waves) end to end, with the exchange of wave i+1 in
    flight while wave i computes (overlap) and with every exchange waited for at once (no overlap).
    The two schedules alternate rep by rep (same background load). compute = time inside the expert step
    (no-overlap runs); exchange = median no-overlap total - compute; hidden = median over reps of (no-overlap -
    overlap) of the slowest rank; overlap ratio = hidden / exchange, the share of the exchange the schedule hid
    (1 = all, 0 = none), reported as not measurable when the no-overlap times' spread exceeds the exchange.
Experts (`--experts`): "swiglu" runs the reference SwiGLU experts (expert by expert, fixed 16-row tiles) of
intermediate size `--inter` (Flash: 2048; every local expert shares one weight set, a view, so the run fits a CPU
box); "gemm" is a cheap stand-in, one GEMM pair over each wave's received rows, whose cost --inter tunes to the
exchange's (where an overlap can show at all); "identity" returns the received rows (no compute: the pure
exchange). With the reference experts compute dwarfs a CPU gloo exchange even at a small --inter. CPU gloo only: these numbers say
nothing about NVLink / RDMA / HCCS.

    python benchmarks/bench_ep.py [--world 2] [--tokens 64] [--reps 5] [--waves 4] [--experts swiglu] [--inter 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, EXPERTS, TOPK = 4096, 256, 6


def _rank(rank: int, world: int, a) -> dict:
    import torch.distributed as dist

    from dsv4_portable.ep.dispatch import ep_combine, ep_dispatch, split_x
    from dsv4_portable.ep.moe import expert_compute
    from dsv4_portable.ep.placement import ExpertPlacement
    from dsv4_portable.ep.transport import Comm
    from dsv4_portable.ep.waves import run_waves
    from dsv4_portable.reference.moe import ExpertWeights
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.tokens, HIDDEN, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(a.tokens)])
    w = torch.rand(a.tokens, TOPK, generator=g)
    pl = ExpertPlacement.contiguous(EXPERTS, world)
    comm = Comm()
    one = [torch.randn(1, *s, generator=g).bfloat16() * 0.02 for s in
           ((a.inter, HIDDEN), (HIDDEN, a.inter), (a.inter, HIDDEN))]
    local = ExpertWeights("bf16", *(t.expand(pl.experts_per_rank, *t.shape[1:]) for t in one))

    def timed(fn):
        times, sent, out = [], 0, None
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
    y = torch.randn(rx.shape[0], TOPK, HIDDEN, generator=g).bfloat16()
    res["combine_ordered"] = timed(lambda: ep_combine(y, h, None, "ordered", group=comm))[:2]
    res["combine_partial"] = timed(lambda: ep_combine(y, h, None, "partial", group=comm))[:2]

    if a.experts == "identity":
        def compute(recv_x, recv_scales, recv_idx, recv_w, handle):
            return recv_x.unsqueeze(1).expand(-1, TOPK, -1)
    elif a.experts == "gemm":
        w1, w2 = one[0][0], one[1][0]                    # [inter, H], [H, inter]

        def compute(recv_x, recv_scales, recv_idx, recv_w, handle):
            # one GEMM pair over the wave's rows (every local expert the same weights): cost ~ rows * H * inter
            # without the per-expert loop, so --inter tunes compute against the exchange
            h = torch.nn.functional.silu(recv_x @ w1.t())
            return (h @ w2.t()).unsqueeze(1).expand(-1, TOPK, -1)
    else:
        compute = expert_compute(local, 10.0)
    xs, scales, dtype = split_x(x, False)
    phys = pl.to_physical(idx, rank)
    wave = pl.experts_per_rank // a.waves
    # The two schedules alternate rep by rep, so both see the same background load on a shared box; the
    # overlap is judged from the paired differences.
    times: dict = {"no_overlap": [], "overlap": []}
    clock: dict = {}
    outs = {}
    for _ in range(a.reps):
        for name, overlap in (("no_overlap", False), ("overlap", True)):
            dist.barrier()
            t0 = time.perf_counter()
            outs[name] = run_waves(comm, xs, scales, dtype, phys, w, pl, compute, wave, "ordered",
                                   apply_weights=False, bias=None, overlap=overlap,
                                   timings=clock if not overlap else None)
            times[name].append(time.perf_counter() - t0)
    sent0 = comm.bytes_sent
    run_waves(comm, xs, scales, dtype, phys, w, pl, compute, wave, "ordered", apply_weights=False, bias=None)
    res["moe_no_overlap"] = (statistics.median(times["no_overlap"]), (comm.bytes_sent - sent0) / a.tokens)
    res["moe_overlap"] = (statistics.median(times["overlap"]), (comm.bytes_sent - sent0) / a.tokens)
    res["moe_times"] = times
    res["compute_no_overlap"] = clock.get("compute_s", 0.0) / a.reps
    res["same_output"] = torch.equal(outs["no_overlap"], outs["overlap"])
    res["transport"] = comm.transport
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--experts", choices=["swiglu", "gemm", "identity"], default="swiglu")
    ap.add_argument("--inter", type=int, default=256, help="expert intermediate size (Flash: 2048)")
    a = ap.parse_args(argv)
    if a.world < 2 or EXPERTS % a.world or (EXPERTS // a.world) % a.waves:
        raise SystemExit(f"error: --world must be >= 2 and {EXPERTS} experts must split evenly over --world "
                         f"{a.world} ranks and --waves {a.waves}")
    from dsv4_portable.ep.launch import spawn
    t0 = time.perf_counter()
    ranks = spawn(_rank, a.world, a, timeout_s=1800, collective_timeout_s=900)
    slow = {k: max(r[k][0] for r in ranks) for k in ranks[0] if isinstance(ranks[0][k], tuple)}
    per_tok = {k: statistics.mean(r[k][1] for r in ranks) for k in slow}
    compute = max(r["compute_no_overlap"] for r in ranks)
    no = [max(r["moe_times"]["no_overlap"][i] for r in ranks) for i in range(a.reps)]      # slowest rank per rep
    ov = [max(r["moe_times"]["overlap"][i] for r in ranks) for i in range(a.reps)]
    exchange = statistics.median(no) - compute
    hidden = statistics.median([n - o for n, o in zip(no, ov)])
    q = statistics.quantiles(no, n=4) if a.reps >= 4 else [min(no), 0, max(no)]
    spread = q[2] - q[0]
    experts = {"identity": "identity experts", "gemm": f"one shared GEMM pair per wave, inter {a.inter}",
               "swiglu": f"SwiGLU experts, inter {a.inter}"}[a.experts]
    print(f"EP at V4-Flash routing: hidden {HIDDEN}, {EXPERTS} experts, top-{TOPK}, {a.tokens} tokens/rank, world "
          f"{a.world}, {ranks[0]['transport']}; {experts}, {a.waves} waves; median of {a.reps}, slowest rank")
    print(f"{'step':22s} {'ms':>9s} {'bytes/token':>12s}")
    for k in ("dispatch_bf16", "dispatch_fp8", "combine_ordered", "combine_partial", "moe_no_overlap", "moe_overlap"):
        print(f"{k:22s} {slow[k] * 1e3:9.2f} {per_tok[k]:12.0f}")
    measurable = spread < exchange
    ratio = f"{hidden / exchange:.2f}" if measurable and exchange > 0 else "not measurable"
    print(f"MoE layer: compute {compute * 1e3:.1f} ms, exchange {exchange * 1e3:.1f} ms (no-overlap total - compute; "
          f"packing, all_to_all, unpacking, reduction), no-overlap spread (IQR) {spread * 1e3:.1f} ms; overlap hid "
          f"{hidden * 1e3:.1f} ms (median paired difference): overlap ratio {ratio}"
          + ("" if measurable else " (the run-to-run spread exceeds the exchange time)"))
    print(f"ratios: fp8/bf16 dispatch bytes {per_tok['dispatch_fp8'] / per_tok['dispatch_bf16']:.3f}, time "
          f"{slow['dispatch_fp8'] / slow['dispatch_bf16']:.2f}; partial/ordered combine bytes "
          f"{per_tok['combine_partial'] / per_tok['combine_ordered']:.3f}, time "
          f"{slow['combine_partial'] / slow['combine_ordered']:.2f}")
    same = all(r["same_output"] for r in ranks)
    print(f"summary: world {a.world}, {experts}: overlap ratio {ratio}, wave schedule output "
          f"{'bitwise equal to' if same else 'DIFFERS from'} the no-overlap schedule, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
