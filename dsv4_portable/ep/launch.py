"""Start N ranks on this host and run a function in each, or join ranks started by torchrun.

One host:   results = spawn(fn, world_size, *args, timeout_s=60)
            runs fn(rank, world_size, *args) in N fresh processes (torch.multiprocessing "spawn"), each joined to
            a gloo process group on a free local port with `collective_timeout_s` as the group timeout, and
            returns the N return values (passed back through files with torch.save, not queues).
Many hosts: torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 your_script.py
            and in the script call `init_from_env()` (reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by
            torchrun), then use the default group with the ep functions.

Failure hygiene: a rank that raises writes its traceback and exits non-zero; the parent then stops the other
ranks and raises EPLaunchError naming the rank and the error. A rank that stops answering makes its peers' next
collective fail after `collective_timeout_s` (the process group timeout), which ends the run the same way; the
parent's own `timeout_s` bounds everything else.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class EPLaunchError(RuntimeError):
    """A rank failed, or the run exceeded its time limit."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str = "gloo", collective_timeout_s: float = 60.0) -> None:
    """Join the process group described by torchrun's environment variables."""
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout_s))


def _rank_main(rank, world_size, port, backend, collective_timeout_s, outdir, fn, args):
    torch.set_num_threads(1)      # N ranks share the host's cores
    out = pathlib.Path(outdir)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException as e:  # noqa: BLE001  (any failure must reach the parent with its text)
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        os._exit(1)                # skip process-group teardown, which would wait for the peers
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def spawn(fn, world_size: int, *args, timeout_s: float = 120.0, collective_timeout_s: float = 30.0,
          backend: str = "gloo") -> list:
    """Run fn(rank, world_size, *args) on world_size local ranks; returns the ranks' results in rank order.
    fn must be importable (defined at module level). Raises EPLaunchError within about timeout_s on failure."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsv4-ep-") as outdir:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, collective_timeout_s, outdir,
                                                      fn, args), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        try:
            while True:
                codes = [p.exitcode for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    raise EPLaunchError(_failure_text(failed, codes, outdir, time.monotonic() - t0))
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() - t0 > timeout_s:
                    alive = [r for r, c in enumerate(codes) if c is None]
                    raise EPLaunchError(f"EP run exceeded {timeout_s:.0f} s; ranks {alive} still running "
                                        "(stopped)")
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
        return [torch.load(pathlib.Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _failure_text(failed, codes, outdir, elapsed) -> str:
    # Report the rank whose error file exists first in rank order; others may only have seen the fallout.
    parts = []
    for r in failed:
        err = pathlib.Path(outdir) / f"rank{r}.err"
        text = err.read_text().split("\n\n")[0] if err.exists() else f"exit code {codes[r]}"
        parts.append(f"rank {r}: {text}")
    return f"EP rank failure after {elapsed:.1f} s: " + "; ".join(parts)
