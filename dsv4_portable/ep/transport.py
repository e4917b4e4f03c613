"""The data plane of the reference EP: torch.distributed all_to_all_single over an existing process group.

Runs on any backend (gloo on CPU, nccl, hccl). Gloo's all_to_all cannot carry float8 (nor int16), so every
payload travels as raw bytes: the tensors of one row are viewed as uint8 and laid side by side, one collective
per exchange. Every collective inherits the process group's timeout (init_process_group(timeout=...), set by
ep.launch), so a rank that fails or stops answering makes the others fail within that time instead of hanging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    item = torch.empty((), dtype=dtype).element_size()
    if not b.is_contiguous() or b.storage_offset() % item or (b.shape[0] > 0 and b.stride(0) % item):
        b = torch.empty(b.shape, dtype=torch.uint8).copy_(b)   # a field at an unaligned offset of a packed row
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
        return n * torch.empty((), dtype=self.dtype).element_size()


def pack(fields: list[Field], tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several tensors -> one uint8 [N, sum(nbytes)] buffer (one all_to_all instead of many)."""
    return torch.cat([to_bytes(t) for t in tensors], dim=1) if tensors else torch.empty(0, 0, dtype=torch.uint8)


def unpack(fields: list[Field], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    out, col = {}, 0
    for f in fields:
        out[f.name] = from_bytes(buf[:, col:col + f.nbytes], f.dtype, f.shape)
        col += f.nbytes
    return out


class Comm:
    """Rank, world size and the two collectives EP needs, over `group` (None = the default group; a
    single-process run without torch.distributed is world size 1 and moves nothing)."""

    def __init__(self, group=None):
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.bytes_sent = 0      # payload bytes this rank sent to other ranks (for benchmarks)

    @property
    def transport(self) -> str:
        if not self.distributed:
            return "single process (no transport)"
        backend = dist.get_backend(self.group)
        return "cpu-gloo multi-process" if backend == "gloo" else f"{backend} multi-process"

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """send int64 [R, n]: row r goes to rank r. Returns [R, n]: row s came from rank s."""
        if send.shape[0] != self.world_size:
            raise ValueError(f"exchange_counts: expected {self.world_size} rows, got {send.shape[0]}")
        send = send.to(torch.int64).contiguous()
        if self.world_size == 1:
            return send.clone()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                   async_op: bool = False):
        """uint8 rows [sum(send_counts), B] -> [sum(recv_counts), B]; rows to rank r are the r-th segment of
        send, rows from rank s the s-th segment of the result. With async_op returns (result, work) and the
        result is valid after work.wait()."""
        if send.dtype != torch.uint8:
            raise TypeError(f"all_to_all carries uint8 rows (see to_bytes), got {send.dtype}")
        width = send.shape[1] if send.dim() == 2 else 0
        recv = torch.empty(sum(recv_counts), width, dtype=torch.uint8)
        self.bytes_sent += width * (sum(send_counts) - send_counts[self.rank])
        if self.world_size == 1:
            recv.copy_(send)
            return (recv, None) if async_op else recv
        if width == 0:
            return (recv, None) if async_op else recv
        work = dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=self.group,
                                      async_op=async_op)
        return (recv, work) if async_op else recv
