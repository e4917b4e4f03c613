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
class UsageError(ValueError):
    """A command-line value that cannot work (the CLI prints it as one `error:` line, exit code 2)."""


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' (built-in, the default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or ascend")
    p.add_argument("--prompt", action="append", default=None,
                   help="text (needs tokenizer.json) or comma-separated token ids; repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bf16", help="activation dtype: bf16 or fp32")
    p.add_argument("--weights", default="auto", choices=["auto", "native", "bf16", "fp8", "int8"],
                   help="auto (the device decides: native on cpu, fp8 on GPUs without FP4 units, bf16 on Ascend "
                        "A2/A3), native (checkpoint formats), bf16 (dequantise), fp8 (FP4 experts -> FP8), int8 "
                        "(W8A8 dense linears, bf16 experts; Ascend A2/A3)")
    p.add_argument("--no-quant-sim", action="store_true", help="turn DeepSeek's QAT simulation off")
    p.add_argument("--cache-layout", default="auto", choices=["auto", "fp8", "plain"])
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="expert parallelism over N local ranks (CPU gloo): experts sharded, the rest replicated, "
                        "the batch split over ranks")


DEFAULT_IDS = list(range(2, 34))
DEFAULT_TEXT = "The quick brown fox"


def parse_prompts(args, has_tokenizer: bool) -> list:
    """--prompt values: token-id lists, or text where the checkpoint has a tokenizer. One default prompt."""
    if not args.prompt:
        return [DEFAULT_TEXT if has_tokenizer else list(DEFAULT_IDS)]
    out = []
    for p in args.prompt:
        parts = [t.strip() for t in p.split(",")]
        if parts and all(t.isdigit() for t in parts):
            out.append([int(t) for t in parts])
        elif has_tokenizer and p.strip():
            out.append(p)
        elif not p.strip():
            raise UsageError("--prompt is empty")
        else:
            raise UsageError(f"--prompt {p!r}: {args.model} has no tokenizer.json, so prompts must be "
                             "comma-separated token ids (e.g. --prompt 5,17,42)")
    return out


def run_prompts(args, model) -> list:
    """The prompts of `dsv4 run` for a loaded model (text or token-id lists)."""
    return parse_prompts(args, model.tokenizer is not None)


_FLAGS = {"prompts": "--prompt", "layout": "--cache-layout"}


def cli_arg(name: str, *value) -> str:
    """An API argument as `dsv4 run` spells it, for the API's own checkers: `--top-p`, `--cache-layout fp8`,
    `--no-quant-sim` (the Python spelling is model.cache.python_arg)."""
    if name == "quant_sim" and value:
        return "--no-quant-sim" if not value[0] else "no --no-quant-sim"
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    return f"{flag} {value[0]}" if value else flag


def check_run_args(args) -> list:
    """Every user-input problem of `dsv4 run`, before anything is loaded: the API's own checks (dtype, cache
    layout, generate's arguments) in the flags' words, and the device, checked without making it active.
    Returns the prompts (parse_prompts)."""
    import pathlib

    from .api import parse_dtype
    from .config import load_config, load_preset
    from .model.cache import check_layout
    from .model.generate import check_generate_args
    if args.ep < 1:
        raise UsageError(f"--ep must be >= 1, got {args.ep}")
    registry.check_available(args.device)       # unknown / unavailable device: its own clear error
    if args.ep > 1:
        from .ep.model import validate_ep
        validate_ep(args)                        # expert split, devices per rank
    check_layout(args.cache_layout, parse_dtype(args.dtype, cli_arg), not args.no_quant_sim, cli_arg)
    if args.model == "tiny":
        cfg, has_tok = load_preset("tiny"), False
    else:
        path = pathlib.Path(args.model)
        if not path.is_dir():
            raise UsageError(f"--model {args.model}: checkpoint directory does not exist")
        cfg, has_tok = load_config(path), (path / "tokenizer.json").exists()
    prompts = parse_prompts(args, has_tok)
    check_generate_args(cfg, prompts, args.max_new_tokens, args.temperature, args.top_p, cli_arg)
    return prompts


def run_main(args) -> int:
    from .api import load_model
    prompts = check_run_args(args)
    registry.reset_counts()
    ep = args.ep
    if ep > 1:
        from .ep.model import run_ep
        ranks = run_ep(args)
        lead = ranks[0]
        out = lead["generation"]                 # merged over the ranks, every prompt in prompt order
        counts = lead["providers"]
        model_path = lead["path"]
        weights = registry.get_backend(args.device).weight_mode(args.weights)[0]
        print(f"ep: {ep} ranks over {lead['transport']} ({', '.join(lead['ep_providers'])}); experts per rank " +
              ", ".join(f"{r['rank']}:{r['local_experts'][0]}-{r['local_experts'][-1]}" for r in ranks) +
              "; MoE exchanges per rank (own + served for others): " +
              ", ".join(f"{r['rank']}:{r['moe_calls']}+{r['served']}" for r in ranks), file=sys.stderr)
    else:
        model = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                           quant_sim=not args.no_quant_sim)
        out = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, cache_layout=args.cache_layout, progress=True)
        counts = registry.provider_counts()
        model_path, weights = model.path, model.weights
    tokens, texts = out.tokens, out.texts
    simulated = registry.get_backend(args.device).simulated()
    device = args.device + (f" [simulated: {simulated}]" if simulated else "")
    summary = {
        "model": str(model_path), "device": device, "ep": ep, "dtype": args.dtype, "weights": weights,
        "quant_sim": not args.no_quant_sim, "prompt_tokens": out.prefill_tokens,
        "outputs": [{"generated_tokens": t, "text": texts[i] if texts else None} for i, t in enumerate(tokens)],
        "generated_tokens": tokens[0], "text": texts[0] if texts else None,
        "prefill_tokens_per_s": round(out.prefill_tps, 2), "decode_tokens_per_s": round(out.decode_tps, 2),
        "kv_cache_layout": out.cache_layout, "kv_cache_bytes": out.cache_bytes,
        "kv_cache_bytes_per_token": round(out.cache_bytes_per_token, 1), "providers": counts,
    }
    if ep > 1:
        summary["ep_transport"], summary["ep_providers"] = lead["transport"], lead["ep_providers"]
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    for i, t in enumerate(tokens):
        label = f"generated[{i}]" if len(tokens) > 1 else "generated"
        print(f"{label}: {t}")
        if texts:
            print(f"{' ' * (len(label) - 4)}text: {texts[i]!r}")
    print(f"prefill: {out.prefill_tokens} tokens at {out.prefill_tps:.1f} tokens/s")
    print(f"decode:  {out.decode_tokens} tokens at {out.decode_tps:.1f} tokens/s")
    print(f"kv cache: {out.cache_layout} layout, {out.cache_bytes / 2**20:.2f} MiB "
          f"({out.cache_bytes_per_token:.0f} B per token of capacity)")
    print("providers used" + (" (rank 0):" if ep > 1 else ":"))
    for op, per in sorted(counts.items()):
        print(f"  {op:15s} " + ", ".join(f"{p} x{n}" for p, n in per.items()))
    vendor = sum(n for per in counts.values() for p, n in per.items() if p != "reference")
    total = sum(n for per in counts.values() for n in per.values())
    n_tok = sum(len(t) for t in tokens)
    print(f"summary: {n_tok} tokens for {len(tokens)} prompt(s) on {device} (weights {weights}); {vendor} of "
          f"{total} op calls ran a backend provider, {total - vendor} the reference")
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
        raise UsageError(f"--context and --batch must be >= 1, got --context {args.context} --batch {args.batch}")
    cfg = load_config(args.config)
    if args.context > cfg.max_position_embeddings:
        raise UsageError(f"--context {args.context} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    p = plan(cfg, args.context, args.batch)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def torch_info() -> str:
    return f"torch {torch.__version__}, python {sys.version.split()[0]}"
