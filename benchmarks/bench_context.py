"""Decode time per token as the context grows: V4's compressed attention should grow far slower than full
attention (DESIGN.md section 6). Runs the reference path on the chosen device, one process, contexts side by side.

Per layer and token, a window-only layer reads `window` entries, a CSA layer window + index_topk entries plus an
indexer scan of S/4 keys, an HCA layer window + S/128 entries; full attention would read S. The table prints the
measured ms/token, its growth relative to the smallest context, and these entry counts.

Timing: one untimed warm-up generation first (allocator, lazy tables); every context is prefilled, then the
contexts take decode steps in turn (--warmup untimed rounds, then --steps timed ones, each step timed alone), so
a neighbour stealing the CPU slows all contexts alike. The table shows the median step, its spread (max/min) and
the ratios to the smallest context.

    python benchmarks/bench_context.py [--model tiny] [--contexts 1024,4096,16384] [--device cpu] [--steps 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv4_portable import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=9, help="timed decode steps per context (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps per context")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (bounds memory)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = load_model(args.model, device=args.device, quiet=True)
    cfg = m.config
    contexts = [int(c) for c in args.contexts.split(",")]
    n = args.warmup + args.steps
    too_long = [c for c in contexts if c + n > cfg.max_position_embeddings]
    if too_long:                                                # before any work
        ap.error(f"--contexts {too_long} + {n} decode steps exceed the model's max_position_embeddings "
                 f"{cfg.max_position_embeddings}")
    m.generate([list(range(2, 66))], max_new_tokens=4)         # warm-up: first calls pay for lazy setup
    runs = []
    for ctx in contexts:                                        # prefill every context first ...
        ids = torch.randint(2, cfg.vocab_size, (1, ctx + n))
        cache = m.new_cache(1, ctx + n)
        t0 = time.perf_counter()
        for a in range(0, ctx, args.chunk):
            m.forward(ids[:, a:min(ctx, a + args.chunk)], cache)
        runs.append((ctx, ids, cache, time.perf_counter() - t0, []))
        print(f"context {ctx}: prefill {runs[-1][3]:.2f} s", flush=True)
    for j in range(n):                  # ... then decode them in turn, so a busy moment hits every context alike
        for ctx, ids, cache, _, steps in runs:
            t0 = time.perf_counter()
            m.forward(ids[:, ctx + j:ctx + j + 1], cache)
            steps.append(time.perf_counter() - t0)
    rows = []
    for ctx, _, _, prefill, steps in runs:
        steps = steps[args.warmup:]
        per_tok, spread = statistics.median(steps), max(steps) / min(steps)
        entries = 0
        for i in range(cfg.n_layers):
            r = cfg.ratio(i)
            entries += cfg.window_size + (min(cfg.index_topk, ctx // 4) if r == 4 else ctx // r if r else 0)
        scanned = sum(ctx // 4 for i in range(cfg.n_layers) if cfg.ratio(i) == 4)
        rows.append((ctx, prefill, per_tok, entries, scanned, ctx * cfg.n_layers, spread))
        print(f"context {ctx}: decode median {per_tok * 1e3:.1f} ms/token (max/min {spread:.2f} over "
              f"{args.steps} steps)", flush=True)
    base = rows[0]
    print(f"\n{'context':>8s} {'ms/token':>9s} {'max/min':>8s} {'x smallest':>10s} {'entries read':>13s} "
          f"{'x smallest':>10s} {'indexer keys':>13s} {'full-attn entries':>18s}")
    for ctx, _, t, e, sc, full, spread in rows:
        print(f"{ctx:8d} {t * 1e3:9.1f} {spread:8.2f} {t / base[2]:10.2f} {e:13d} {e / base[3]:10.2f} {sc:13d} "
              f"{full:18d}")
    last = rows[-1]
    print(f"summary: context x{last[0] / base[0]:.0f} -> decode time x{last[2] / base[2]:.2f} "
          f"(attended entries x{last[3] / base[3]:.2f}, full attention would be x{last[5] / base[5]:.0f}); "
          f"model {cfg.name}, device {args.device}")


if __name__ == "__main__":
    main()
