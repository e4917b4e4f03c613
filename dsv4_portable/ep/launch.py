"""Start N ranks on this host and run a function in each, or join ranks started by torchrun.

One host:   results = spawn(fn, world_size, *args, device="cpu", timeout_s=60)
            runs fn(rank, world_size, *args) in N fresh processes (torch.multiprocessing "spawn"), each joined to
            a process group on a free local port with `collective_timeout_s` as the group timeout, and returns
            the N return values (passed back through files with torch.save, not queues). device "cuda" / "npu"
            binds rank r to device r (after checking there are enough devices).
Many hosts: torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 script.py
            and in the script call `init_from_env(device)` (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
            MASTER_PORT set by torchrun, binds the local device), then use the default group with the ep
            functions. `python -m dsv4_portable.ep.run` is such a script for `dsv4 run`.

Process-group backend per device: cpu "gloo"; cuda "cpu:gloo,cuda:nccl"; npu "cpu:gloo,npu:hccl" (payloads on the
device go through nccl / hccl, the small count exchanges stay on gloo on the host).

Failure hygiene: a rank that raises writes its traceback and exits non-zero; the parent then stops the other
ranks and raises EPLaunchError naming the rank and the error. A rank that stops answering makes its peers' next
exchange fail after the exchange timeout (`Comm.timeout_s`, by default the group timeout `collective_timeout_s`),
which ends the run the same way; the parent's own `timeout_s` bounds everything else. On CUDA,
TORCH_NCCL_BLOCKING_WAIT=1 is set (unless the user set it) so that waiting on an nccl collective honours that
timeout on the host and raises instead of only queueing a stream wait; TORCH_NCCL_ASYNC_ERROR_HANDLING keeps
torch's default (3: the watchdog tears down a process whose collective failed).
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

PG_BACKEND = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "npu": "cpu:gloo,npu:hccl"}
DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda", "ascend": "npu", "npu": "npu"}


class EPLaunchError(RuntimeError):
    """A rank failed, or the run exceeded its time limit."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type_of(device: str) -> str:
    """'cpu' | 'cuda' | 'npu' for a --device value (cpu, cuda, ascend) or a device type."""
    try:
        return DEVICE_TYPE[device]
    except KeyError:
        raise ValueError(f"EP: unknown device {device!r} (cpu, cuda or ascend)") from None


def device_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_type == "npu":
        npu = getattr(torch, "npu", None)      # only present after `import torch_npu` (the ascend backend)
        return npu.device_count() if npu is not None and npu.is_available() else 0
    return os.cpu_count() or 1


def check_devices(device_type: str, ranks_on_this_host: int) -> None:
    """ValueError before anything starts when this host has fewer devices than local ranks (nccl refuses two
    ranks on one GPU; hccl likewise)."""
    if device_type == "cpu":
        return
    have = device_count(device_type)
    if have < ranks_on_this_host:
        raise ValueError(f"EP: {ranks_on_this_host} ranks on this host need {ranks_on_this_host} {device_type} "
                         f"devices (one per rank), {have} visible")


def _set_comm_env(device_type: str) -> None:
    if device_type == "cuda":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")


def bind_device(device_type: str, local_rank: int) -> None:
    """Make local device `local_rank` this process's current device (cuda / npu); nothing on cpu."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    elif device_type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device; only on --device ascend)
        torch.npu.set_device(local_rank)


def init_from_env(device: str = "cpu", collective_timeout_s: float = 60.0) -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) with the backend for `device`, binding local device LOCAL_RANK. Returns (rank, world, local)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"EP: {', '.join(missing)} not set: start this with torchrun (or set them yourself)")
    dtype = device_type_of(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    check_devices(dtype, int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)))
    _set_comm_env(dtype)
    bind_device(dtype, local)
    dist.init_process_group(PG_BACKEND[dtype], timeout=datetime.timedelta(seconds=collective_timeout_s))
    return dist.get_rank(), dist.get_world_size(), local


def to_cpu(obj):
    """Results travel to the parent, which may have no device: tensors inside dicts / lists / tuples go to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _rank_main(rank, world_size, port, device_type, collective_timeout_s, outdir, fn, args):
    torch.set_num_threads(1)      # N ranks share the host's cores
    out = pathlib.Path(outdir)
    try:
        _set_comm_env(device_type)
        bind_device(device_type, rank)
        dist.init_process_group(PG_BACKEND[device_type], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(to_cpu(result), out / f"rank{rank}.pt")
    except BaseException as e:  # noqa: BLE001  (any failure must reach the parent with its text)
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        os._exit(1)                # skip process-group teardown, which would wait for the peers
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def spawn(fn, world_size: int, *args, device: str = "cpu", timeout_s: float = 120.0,
          collective_timeout_s: float = 30.0) -> list:
    """Run fn(rank, world_size, *args) on world_size local ranks; returns the ranks' results in rank order.
    fn must be importable (defined at module level). device: cpu (gloo), cuda (nccl) or ascend / npu (hccl).
    Raises ValueError before starting anything when the host lacks devices, EPLaunchError within about timeout_s
    when a rank fails."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    device_type = device_type_of(device)
    check_devices(device_type, world_size)
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsv4-ep-") as outdir:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, device_type, collective_timeout_s,
                                                      outdir, fn, args), daemon=True) for r in range(world_size)]
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
    # Report every failed rank whose error file exists, in rank order; later ones may only have seen the fallout.
    parts = []
    for r in failed:
        err = pathlib.Path(outdir) / f"rank{r}.err"
        text = err.read_text().split("\n\n")[0] if err.exists() else f"exit code {codes[r]}"
        parts.append(f"rank {r}: {text}")
    return f"EP rank failure after {elapsed:.1f} s: " + "; ".join(parts)
