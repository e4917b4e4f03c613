"""`dsv4 devices`, `dsv4 run` and `dsv4 plan` (wired into the CLI in cli.py)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import registry
from .registry import BACKENDS, OPS


# ----------------------------------------------------------------------------------------------- devices
def add_devices_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--explain", action="store_true", help="per op: the provider each backend would use and why "
                                                          "the others were skipped")


def devices_main(args) -> int:
    """Each backend: available or not (with the reason), and with --explain the provider chosen per op."""
    for name, b in BACKENDS.items():
        load_errors = b.load_providers()
        reasons = b.availability()
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        if not reasons and b.simulated():
            status += f" (simulated: {b.simulated()})"
        print(f"{name:7s} (device type {b.device_type}): {status}")
        for e in load_errors:
            print(f"        provider module not loaded: {e}")
        if args.explain:
            for op_name, op in OPS.items():
                rows = op.explain(backend=b)
                chosen = next((p for p, st, _ in rows if st == "chosen"), "-")
                skipped = [f"{p} ({'; '.join(r)})" for p, st, r in rows if st == "skipped"]
                line = f"    {op_name:15s} -> {chosen}"
                if skipped:
                    line += "   skipped: " + ", ".join(skipped)
                print(line)
        if args.explain and b.device_type == "npu" and not reasons:   # where each vendor op was found
            from .backends.ascend import vendor_ops
            for op, where in sorted(vendor_ops.resolved_ops().items()):
                print(f"    vendor op {op:28s} {where}")
    usable = [n for n, b in BACKENDS.items() if not b.availability()]
    print(f"summary: {len(usable)} of {len(BACKENDS)} backends usable here: {', '.join(usable)}")
    return 0


# ----------------------------------------------------------------------------------------------- run
def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' (built-in, the default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or ascend")
    p.add_argument("--prompt", default=None, help="text (needs tokenizer.json) or comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bf16", help="activation dtype: bf16 or fp32")
    p.add_argument("--weights", default="native", choices=["native", "bf16", "fp8", "int8"],
                   help="native (checkpoint formats), bf16 (dequantise), fp8 (FP4 experts -> FP8), int8 (W8A8 "
                        "dense linears, bf16 experts; Ascend A2/A3)")
    p.add_argument("--no-quant-sim", action="store_true", help="turn DeepSeek's QAT simulation off")
    p.add_argument("--cache-layout", default="auto", choices=["auto", "fp8", "plain"])
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="expert parallelism over N local ranks (CPU gloo): experts sharded, the rest replicated, "
                        "the batch split over ranks")


def run_prompt(args, model):
    if args.prompt is None:
        return list(range(2, 34)) if model.tokenizer is None else "The quick brown fox"
    if model.tokenizer is None or all(p.strip().isdigit() for p in args.prompt.split(",")):
        try:
            return [int(t) for t in args.prompt.split(",")]
        except ValueError:
            raise SystemExit(f"error: {args.model} has no tokenizer.json; --prompt must be comma-separated token ids")
    return args.prompt


def run_main(args) -> int:
    from .api import load_model
    registry.reset_counts()
    ep = getattr(args, "ep", 1)
    if ep < 1:
        raise SystemExit(f"error: --ep must be >= 1, got {ep}")
    if ep > 1:
        from .ep.model import run_ep
        ranks = run_ep(args)
        lead = ranks[0]
        out, counts = lead["generation"], lead["providers"]
        model_path = lead["path"]
        print(f"ep: {ep} ranks over {lead['transport']}; experts per rank " +
              ", ".join(f"{r['rank']}:{r['local_experts'][0]}-{r['local_experts'][-1]}" for r in ranks) +
              f"; rank 0 ran {lead['moe_calls']} MoE exchanges, the others served them", file=sys.stderr)
    else:
        model = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                           quant_sim=not args.no_quant_sim)
        out = model.generate([run_prompt(args, model)], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             cache_layout=args.cache_layout, progress=True)
        counts = registry.provider_counts()
        model_path = model.path
    simulated = registry.get_backend(args.device).simulated()
    device = args.device + (f" [simulated: {simulated}]" if simulated else "")
    summary = {
        "model": str(model_path), "device": device, "ep": ep, "dtype": args.dtype, "weights": args.weights,
        "quant_sim": not args.no_quant_sim, "prompt_tokens": out.prefill_tokens,
        "generated_tokens": out.tokens[0], "text": out.texts[0] if out.texts else None,
        "prefill_tokens_per_s": round(out.prefill_tps, 2), "decode_tokens_per_s": round(out.decode_tps, 2),
        "kv_cache_layout": out.cache_layout, "kv_cache_bytes": out.cache_bytes,
        "kv_cache_bytes_per_token": round(out.cache_bytes_per_token, 1), "providers": counts,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"generated: {out.tokens[0]}")
    if out.texts:
        print(f"text: {out.texts[0]!r}")
    print(f"prefill: {out.prefill_tokens} tokens at {out.prefill_tps:.1f} tokens/s")
    print(f"decode:  {out.decode_tokens} tokens at {out.decode_tps:.1f} tokens/s")
    print(f"kv cache: {out.cache_layout} layout, {out.cache_bytes / 2**20:.2f} MiB "
          f"({out.cache_bytes_per_token:.0f} B per token of capacity)")
    print("providers used:")
    for op, per in sorted(counts.items()):
        print(f"  {op:15s} " + ", ".join(f"{p} x{n}" for p, n in per.items()))
    vendor = sum(n for per in counts.values() for p, n in per.items() if p != "reference")
    total = sum(n for per in counts.values() for n in per.values())
    print(f"summary: {len(out.tokens[0])} tokens on {device}; {vendor} of {total} op calls ran a backend "
          f"provider, {total - vendor} the reference")
    return 0


# ----------------------------------------------------------------------------------------------- plan
def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="flash", help="flash, pro, tiny, or a checkpoint directory")
    p.add_argument("--context", type=int, default=1048576)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true")


def plan_main(args) -> int:
    from .config import load_config
    from .plan import format_plan, plan
    if args.context < 1 or args.batch < 1:
        raise SystemExit("error: --context and --batch must be >= 1")
    cfg = load_config(args.config)
    p = plan(cfg, args.context, args.batch)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def torch_info() -> str:
    return f"torch {torch.__version__}, python {sys.version.split()[0]}"
