"""`dsv4 run` with expert parallelism across processes started by torchrun (one host or many).

    torchrun --standalone --nproc-per-node 4 -m dsv4_portable.ep.run --max-new-tokens 8 --json
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             -m dsv4_portable.ep.run --model /path/to/DeepSeek-V4-Flash --device cuda --prompt "Hello"

Takes `dsv4 run`'s flags (--ep is the torchrun world size and may be left out). Every rank joins the process
group for --device (cpu: gloo; cuda: nccl, one GPU per local rank; ascend: hccl, one NPU per local rank), loads
the model keeping only its experts, generates its share of the prompts and serves the other ranks' MoE
exchanges; rank 0 prints the summary (every prompt's tokens, the EP transport and providers that ran).
Exit status 2 with `error: ...` for bad input (checked before the process group is joined where possible).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from ..commands import add_run_args
    p = argparse.ArgumentParser(prog="torchrun ... -m dsv4_portable.ep.run", description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--ep-combine", choices=["ordered", "partial"], default="ordered",
                   help="ordered: bitwise equal to --ep 1; partial: per-rank partial sums (on Ascend A2/A3 through "
                        "MC2 dispatch_v2 / combine_v2 where the call fits)")
    p.add_argument("--ep-timeout", type=float, default=120.0,
                   help="seconds any EP exchange may wait for its peers (the process-group timeout too)")
    args = p.parse_args(argv)
    try:
        world = int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        print("error: WORLD_SIZE is not set: start this module with torchrun", file=sys.stderr)
        return 2
    if args.ep not in (1, world):
        print(f"error: --ep {args.ep} but torchrun started {world} ranks (leave --ep out)", file=sys.stderr)
        return 2
    args.ep = world
    import torch.distributed as dist

    from .launch import init_from_env
    from .model import merge_generations, run_rank, validate_ep
    try:
        validate_ep(args, world_size=world)
        rank, world, _ = init_from_env(args.device, args.ep_timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_rank(rank, world, args)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)              # rides the gloo (host) part of the group
    dist.destroy_process_group()
    if rank != 0:
        return 0
    out = merge_generations(gathered)
    summary = {"model": result["path"], "device": args.device, "ep": world, "transport": result["transport"],
               "ep_providers": result["ep_providers"], "prompts": result["num_prompts"],
               "generated_tokens": out.tokens, "text": out.texts or None,
               "experts_per_rank": {r["rank"]: [r["local_experts"][0], r["local_experts"][-1]] for r in gathered},
               "prefill_tokens_per_s": round(out.prefill_tps, 2), "decode_tokens_per_s": round(out.decode_tps, 2)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for i, toks in enumerate(out.tokens):
            print(f"prompt {i}: generated {toks}")
        print(f"summary: {world} ranks over {summary['transport']}; EP providers {summary['ep_providers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
