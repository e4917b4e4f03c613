"""CPU throughput of our reference path against Hugging Face transformers' eager `DeepseekV4ForCausalLM`, on the
same small config and the same weights, side by side in one process.

One checkpoint (DeepSeek naming, bf16 storage, the tiny preset's dimensions unless --config says otherwise) is
written to a temporary directory and loaded by both. Both run on CPU in --dtype (fp32 default); ours with the QAT
simulation off so both compute the same maths (tests/test_hf_parity.py checks they agree). For each prompt length:
prefill tokens/s (one forward over the prompt into a fresh cache, last-position logits only), then decode
tokens/s (--steps single-token forwards on that cache). Runs alternate ours / transformers and repeat --reps
times; the table shows medians and the ratio ours / transformers (> 1: ours is faster). The last two columns are
the relative difference (max |ours - hf| / max |hf|) of the two models' logits after the prefill (same input: a
check that both ran the same computation, expected ~1e-6 in fp32) and after the last decode step (large only if
their greedy paths parted). By default the indexer has 64 heads, V4's own value: with the tiny preset's 4, exact
zero-score ties in the indexer are common, and the two implementations break them differently.

    python benchmarks/bench_cpu_vs_hf.py [--lengths 128,512,2048] [--steps 16] [--reps 5] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import torch

from dsv4_portable import load_model
from dsv4_portable.config import load_config
from dsv4_portable.model.checkpoint import random_tensors, save_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_config(source: str, index_heads: int | None):
    """The config with float storage: transformers' V4 loads no FP8/FP4 (and it has no FP8 kernels on CPU)."""
    cfg = load_config(source).replace(dtype="bf16", expert_dtype="bf16", scale_fmt=None)
    return cfg.replace(index_n_heads=index_heads) if index_heads else cfg


def run_ours(model, ids, steps):
    cache = model.new_cache(1, ids.shape[1] + steps)
    t0 = time.perf_counter()
    logits = first = model.forward(ids, cache)
    t1 = time.perf_counter()
    for _ in range(steps):
        logits = model.forward(logits.argmax(-1, keepdim=True), cache)
    return t1 - t0, time.perf_counter() - t1, (first, logits)


@torch.no_grad()
def run_hf(model, ids, steps):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1]
    t1 = time.perf_counter()
    for _ in range(steps):
        out = model(out.logits[:, -1].argmax(-1, keepdim=True), cache=out.cache, use_cache=True, logits_to_keep=1)
    return t1 - t0, time.perf_counter() - t1, (first, out.logits[:, -1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="preset name or config.json path (dims; storage forced to bf16)")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--steps", type=int, default=16, help="decode steps after each prompt")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--index-heads", type=int, default=64,
                    help="index_n_heads (default 64 as in V4; 0 keeps the config's: the tiny preset has 4, where "
                         "exact zero-score indexer ties, broken differently by the two, can part their paths)")
    args = ap.parse_args(argv)
    from transformers import DeepseekV4ForCausalLM
    import transformers

    cfg = bench_config(args.config, args.index_heads)
    dtype = DTYPES[args.dtype]
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(pathlib.Path(tmp), cfg, random_tensors(cfg, seed=0))
        ours = load_model(tmp, device="cpu", dtype=dtype, quant_sim=False, quiet=True)
        hf = DeepseekV4ForCausalLM.from_pretrained(tmp, torch_dtype=dtype, attn_implementation="eager").eval()
    print(f"config {cfg.name}: dim {cfg.dim}, {cfg.n_layers} layers {list(cfg.compress_ratios[:cfg.n_layers])}, "
          f"{cfg.n_heads} heads x {cfg.head_dim}, {cfg.n_routed_experts} experts top-{cfg.n_activated_experts}, "
          f"window {cfg.window_size}, indexer {cfg.index_n_heads} heads top-{cfg.index_topk}; dtype {args.dtype}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
          flush=True)

    rows = []
    for n in lengths:
        ids = torch.randint(2, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        times = {"ours": ([], []), "hf": ([], [])}
        for rep in range(args.reps + 1):                  # rep 0 warms up (allocator, lazy init) and is dropped
            order = (("ours", run_ours, ours), ("hf", run_hf, hf))
            for name, fn, model in (order if rep % 2 else order[::-1]):
                pre, dec, logits = fn(model, ids, args.steps)
                if rep:
                    times[name][0].append(pre)
                    times[name][1].append(dec)
                else:
                    times[name] = (times[name][0], times[name][1], [t.float() for t in logits])
        # same computation? prefill logits (same input) and last decode logits (greedy paths may part on a tie)
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
        diff = (rel(times["ours"][2][0], times["hf"][2][0]), rel(times["ours"][2][1], times["hf"][2][1]))
        med = {k: (n / statistics.median(v[0]), args.steps / statistics.median(v[1])) for k, v in times.items()}
        rows.append((n, med, diff))
        spread = " ".join(f"{k} {max(v[i]) / min(v[i]):.2f}" for k, v in times.items() for i in (0, 1))
        print(f"prompt {n}: prefill ours {med['ours'][0]:.0f} tok/s, hf {med['hf'][0]:.0f} tok/s; decode ours "
              f"{med['ours'][1]:.1f} tok/s, hf {med['hf'][1]:.1f} tok/s (rel. logit diff prefill {diff[0]:.1e}, "
              f"last decode {diff[1]:.1e}; max/min time "
              f"prefill, decode: {spread})", flush=True)

    print(f"\nmedians of {args.reps} runs, tokens/s (ratio = ours / transformers)")
    print(f"{'prompt':>7s} {'prefill ours':>13s} {'prefill hf':>11s} {'ratio':>6s} {'decode ours':>12s} "
          f"{'decode hf':>10s} {'ratio':>6s} {'diff prefill':>12s} {'diff decode':>11s}")
    for n, m, diff in rows:
        print(f"{n:7d} {m['ours'][0]:13.0f} {m['hf'][0]:11.0f} {m['ours'][0] / m['hf'][0]:6.2f} "
              f"{m['ours'][1]:12.1f} {m['hf'][1]:10.1f} {m['ours'][1] / m['hf'][1]:6.2f} {diff[0]:12.1e} "
              f"{diff[1]:11.1e}")
    pre = [m["ours"][0] / m["hf"][0] for _, m, _ in rows]
    dec = [m["ours"][1] / m["hf"][1] for _, m, _ in rows]
    print(f"summary: ours / transformers on CPU ({args.dtype}): prefill x{min(pre):.2f}..x{max(pre):.2f}, "
          f"decode x{min(dec):.2f}..x{max(dec):.2f} over prompts {lengths}; logits agree to "
          f"{max(d[0] for _, _, d in rows):.1e} (prefill), {max(d[1] for _, _, d in rows):.1e} (last decode)")


if __name__ == "__main__":
    main()
