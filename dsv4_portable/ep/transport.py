"""The data plane of the reference EP: torch.distributed all_to_all_single over an existing process group.

Device-agnostic: payloads stay on the device of the tensors they come from (cpu, cuda or npu) and go through the
group's backend for that device (gloo on CPU, nccl on CUDA, hccl on Ascend; a mixed group such as
"cpu:gloo,cuda:nccl" keeps the small count exchanges on gloo, on the host). Gloo's all_to_all cannot carry float8
(nor int16), so every payload travels as raw bytes: the tensors of one row are viewed as uint8 and laid side by
side, one collective per exchange.

Timeouts are explicit: every collective is issued asynchronously and waited for with `work.wait(timeout)`, where
the timeout is `Comm.timeout_s` (default: the group's own timeout). A peer that fails or stops answering makes the
wait raise EPTransportError naming this rank and the exchange, instead of hanging the run.
"""
from __future__ import annotations

import datetime
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch's default process-group timeouts (30 min; 10 min for nccl): a group created without timeout= has one of
# them, far too long for a rank to sit in a dead exchange, so such a group gets a warning.
TORCH_DEFAULT_TIMEOUTS_S = (1800.0, 600.0)
FALLBACK_TIMEOUT_S = 300.0


class EPTransportError(RuntimeError):
    """An EP exchange failed or timed out (the message names the rank and the exchange)."""


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] tensor -> uint8 [N, nbytes per row] (a view when possible)."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    per_row = 1
    for s in t.shape[1:]:
        per_row *= s
    return t.contiguous().reshape(t.shape[0], per_row).view(torch.uint8)


def from_bytes(b: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of to_bytes: uint8 [N, nbytes] -> dtype [N, *shape]."""
    item = dtype.itemsize
    if b.shape[0] == 0:       # no rows: nothing to view (a row stride not divisible by item would refuse .view)
        return torch.empty(0, *shape, dtype=dtype, device=b.device)
    if not b.is_contiguous() or b.storage_offset() % item or b.stride(0) % item:
        # a field at an unaligned offset of a packed row: give it its own dense storage (not .clone(), which keeps
        # the strides of a one-row slice)
        b = torch.empty(b.shape, dtype=torch.uint8, device=b.device).copy_(b)
    return b.view(dtype).reshape(b.shape[0], *shape)


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def pack(fields: list[Field], tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Rows of several tensors -> one uint8 [N, sum(nbytes)] buffer (one all_to_all instead of many). Tensor i
    must be fields[i] (its dtype and per-row shape) and all must have the same N, so that unpack(fields, ...)
    gives them back; a mismatch is a ValueError here instead of garbage on the receiving rank."""
    if len(fields) != len(tensors):
        raise ValueError(f"pack: {len(tensors)} tensors for {len(fields)} fields")
    for f, t in zip(fields, tensors):
        if t.dtype != f.dtype or tuple(t.shape[1:]) != f.shape:
            raise ValueError(f"pack: field {f.name!r} is {f.dtype} {list(f.shape)} per row, got {t.dtype} "
                             f"{list(t.shape[1:])}")
    if len({t.shape[0] for t in tensors}) > 1:
        raise ValueError(f"pack: row counts differ: {[t.shape[0] for t in tensors]}")
    if not tensors:
        return torch.empty(0, 0, dtype=torch.uint8, device=device)
    return torch.cat([to_bytes(t) for t in tensors], dim=1)


def unpack(fields: list[Field], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    out, col = {}, 0
    for f in fields:
        out[f.name] = from_bytes(buf[:, col:col + f.nbytes], f.dtype, f.shape)
        col += f.nbytes
    return out


def backend_map(group=None) -> dict[str, str]:
    """{device type: backend} of a process group, e.g. {"cpu": "gloo", "cuda": "nccl"}."""
    text = dist.get_backend_config(group)
    if ":" not in text:                                     # a plain backend name: its home device only
        return {{"gloo": "cpu", "nccl": "cuda", "hccl": "npu"}.get(text, "cpu"): text}
    return dict(part.split(":", 1) for part in text.split(","))


def group_timeout_s(group=None, device_type: str = "cpu") -> float | None:
    """The timeout the group was created with (None when this torch does not expose it)."""
    pg = group if group is not None else dist.group.WORLD
    try:
        return pg._get_backend(torch.device(device_type)).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


class Comm:
    """Rank, world size and the two collectives EP needs, over `group` (None = the default group; a
    single-process run without torch.distributed is world size 1 and moves nothing).

    timeout_s: how long any one exchange may wait for its peers (default: the group's timeout). A group left at
    torch's default timeout (30 min, nccl 10 min) gets a warning and the exchanges wait FALLBACK_TIMEOUT_S."""

    def __init__(self, group=None, timeout_s: float | None = None):
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.backends = backend_map(group) if self.distributed else {}
        self.device_type = "cpu"    # device of the payloads of the last exchange (what actually moved)
        self.bytes_sent = 0         # payload bytes this rank sent to other ranks (for benchmarks)
        self.ran: Counter = Counter()   # (EP provider, transport) -> MoE calls, as the providers report them
        if timeout_s is None and self.distributed:
            own = group_timeout_s(group, "cpu" if "cpu" in self.backends else next(iter(self.backends)))
            if own is None or own in TORCH_DEFAULT_TIMEOUTS_S:
                warnings.warn(f"EP: the process group's timeout is {'unknown' if own is None else f'{own:.0f} s'} "
                              f"(torch's default: was it created without timeout=?); a failed peer would hold every "
                              f"rank that long. Pass timeout= to "
                              f"init_process_group (ep.launch does) or Comm(timeout_s=...); using "
                              f"{FALLBACK_TIMEOUT_S:.0f} s for EP exchanges", stacklevel=2)
                own = FALLBACK_TIMEOUT_S
            timeout_s = own
        self.timeout_s = float(timeout_s if timeout_s is not None else FALLBACK_TIMEOUT_S)

    def backend_for(self, device_type: str) -> str | None:
        return self.backends.get(device_type)

    @property
    def transport(self) -> str:
        """What actually carried the last exchange: 'single process', 'cpu-gloo multi-process', 'device
        single-rank (nccl)', 'device multi-rank (hccl)', ..."""
        if self.device_type == "cpu":
            if self.world_size == 1:
                return "single process"
            return f"cpu-{self.backend_for('cpu')} multi-process"
        backend = self.backend_for(self.device_type) or "no process group"
        kind = "single-rank" if self.world_size == 1 else "multi-rank"
        return f"device {kind} ({backend})"

    def wait(self, work, what: str) -> None:
        """Wait for an asynchronous collective at most timeout_s; a failure names this rank and the exchange."""
        if work is None:
            return
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:   # noqa: BLE001  (gloo/nccl raise RuntimeError subclasses with their own text)
            raise EPTransportError(f"rank {self.rank}: EP exchange '{what}' did not complete within "
                                   f"{self.timeout_s:g} s or failed (a peer rank failed or stopped answering): "
                                   f"{type(e).__name__}: {str(e)[:200]}") from e

    def _count_device(self, device: torch.device) -> torch.device:
        # Small integer exchanges stay on the host when the group has a CPU backend (gloo), to spare the device
        # stream a launch; a device-only group (plain nccl / hccl) takes them on the device.
        return torch.device("cpu") if "cpu" in self.backends else device

    def exchange_counts(self, send: torch.Tensor, what: str = "counts") -> torch.Tensor:
        """send int64 [R, n]: row r goes to rank r. Returns [R, n] on send's device: row s came from rank s."""
        if send.shape[0] != self.world_size:
            raise ValueError(f"exchange_counts: expected {self.world_size} rows, got {send.shape[0]}")
        if self.world_size == 1:
            return send.to(torch.int64).clone()
        dev = self._count_device(send.device)
        payload = send.to(device=dev, dtype=torch.int64).contiguous()
        recv = torch.empty_like(payload)
        self.wait(dist.all_to_all_single(recv, payload, group=self.group, async_op=True), what)
        return recv.to(send.device)

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], what: str = "payload",
                   async_op: bool = False):
        """uint8 rows [sum(send_counts), B] -> [sum(recv_counts), B] on send's device; rows to rank r are the r-th
        segment of send, rows from rank s the s-th segment of the result. With async_op returns (result, work):
        the result is valid after self.wait(work, what)."""
        if send.dtype != torch.uint8:
            raise TypeError(f"all_to_all carries uint8 rows (see to_bytes), got {send.dtype}")
        self.device_type = send.device.type
        width = send.shape[1] if send.dim() == 2 else 0
        recv = torch.empty(sum(recv_counts), width, dtype=torch.uint8, device=send.device)
        self.bytes_sent += width * (sum(send_counts) - send_counts[self.rank])
        work = None
        if self.world_size == 1:
            recv.copy_(send)
        elif width:
            work = dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=self.group,
                                          async_op=True)
        if async_op:
            return recv, work
        self.wait(work, what)
        return recv
