"""Decode time per token as the context grows: V4's compressed attention should grow far slower than full
attention (DESIGN.md section 6). Runs the reference path on the chosen device, one process, contexts side by side.

Per layer and token, a window-only layer reads `window` entries, a CSA layer window + index_topk entries plus an
indexer scan of S/4 keys, an HCA layer window + S/128 entries; full attention would read S. The table prints the
measured ms/token, its growth relative to the smallest context, and these entry counts.

    python benchmarks/bench_context.py [--model tiny] [--contexts 1024,4096,16384] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv4_portable import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (bounds memory)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = load_model(args.model, device=args.device, quiet=True)
    cfg = m.config
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(2, cfg.vocab_size, (1, ctx + args.steps))
        cache = m.new_cache(1, ctx + args.steps)
        t0 = time.perf_counter()
        for a in range(0, ctx, args.chunk):
            logits = m.forward(ids[:, a:min(ctx, a + args.chunk)], cache)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for j in range(args.steps):
            logits = m.forward(ids[:, ctx + j:ctx + j + 1], cache)
        per_tok = (time.perf_counter() - t0) / args.steps
        entries = 0
        for i in range(cfg.n_layers):
            r = cfg.ratio(i)
            entries += cfg.window_size + (min(cfg.index_topk, ctx // 4) if r == 4 else ctx // r if r else 0)
        scanned = sum(ctx // 4 for i in range(cfg.n_layers) if cfg.ratio(i) == 4)
        rows.append((ctx, prefill, per_tok, entries, scanned, ctx * cfg.n_layers))
        print(f"context {ctx}: prefill {prefill:.2f} s, decode {per_tok * 1e3:.1f} ms/token", flush=True)
    base = rows[0]
    print(f"\n{'context':>8s} {'ms/token':>9s} {'x smallest':>10s} {'entries read':>13s} {'indexer keys':>13s} "
          f"{'full-attn entries':>18s}")
    for ctx, _, t, e, sc, full in rows:
        print(f"{ctx:8d} {t * 1e3:9.1f} {t / base[2]:10.2f} {e:13d} {sc:13d} {full:18d}")
    last = rows[-1]
    print(f"summary: context x{last[0] / base[0]:.0f} -> decode time x{last[2] / base[2]:.2f} "
          f"(attended entries x{last[3] / base[3]:.2f}, full attention would be x{last[5] / base[5]:.0f}); "
          f"model {cfg.name}, device {args.device}")


if __name__ == "__main__":
    main()
