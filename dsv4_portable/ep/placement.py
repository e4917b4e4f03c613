"""Where each expert lives: a placement is separate from how tokens travel (DESIGN.md 4).

Physical experts are numbered 0..P-1 and rank r owns the contiguous block [r*P/R, (r+1)*P/R). `phy2log[p]` says
which logical expert (whose weights) physical expert p holds. Without redundancy P = E and phy2log is the
identity. With redundant replicas (EPLB style) a hot logical expert has several physical copies; each routed slot
picks one copy deterministically by its source token: replica = (src_index + src_rank) % copies, so a rerun
moves the same rows to the same ranks and replicas share the load. The logical-to-physical remap happens before
dispatch, so the transport only ever sees physical ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    phy2log: tuple[int, ...]   # [P] logical expert held by each physical expert
    num_experts: int           # E logical experts
    world_size: int            # R ranks

    def __post_init__(self):
        p, e, r = len(self.phy2log), self.num_experts, self.world_size
        if r < 1:
            raise ValueError(f"placement: world_size must be >= 1, got {r}")
        if p % r:
            raise ValueError(f"placement: {p} physical experts cannot be split evenly over {r} ranks")
        if sorted(set(self.phy2log)) != list(range(e)):
            raise ValueError(f"placement: phy2log must hold every logical expert 0..{e - 1} at least once")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Expert e on rank e // (E/R): the default."""
        return cls(tuple(range(num_experts)), num_experts, world_size)

    @classmethod
    def redundant(cls, num_experts: int, world_size: int, extra: list[int]) -> "ExpertPlacement":
        """The E experts plus one more physical copy of each logical expert listed in `extra` (appended after
        them, so the copies land on the last ranks). E + len(extra) must divide evenly over the ranks."""
        bad = [e for e in extra if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"placement: redundant experts {bad} are not in 0..{num_experts - 1}")
        return cls(tuple(range(num_experts)) + tuple(extra), num_experts, world_size)

    @property
    def num_physical(self) -> int:
        return len(self.phy2log)

    @property
    def experts_per_rank(self) -> int:
        return self.num_physical // self.world_size

    def local_logical(self, rank: int) -> list[int]:
        """The logical expert (weights) behind each of `rank`'s local experts, in local-id order."""
        n = self.experts_per_rank
        return list(self.phy2log[rank * n:(rank + 1) * n])

    def copies(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2phy [E, maxcnt] with -1 padding, logcnt [E]) on `device`: EPLB's two tables."""
        lists = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log):
            lists[e].append(p)
        width = max(len(c) for c in lists)
        log2phy = torch.tensor([c + [-1] * (width - len(c)) for c in lists], dtype=torch.int64, device=device)
        return log2phy, torch.tensor([len(c) for c in lists], dtype=torch.int64, device=device)

    def to_physical(self, topk_idx: torch.Tensor, rank: int) -> torch.Tensor:
        """Logical ids [T, K] (-1 = none) of this rank's tokens -> physical ids (-1 stays -1).

        Replica choice (deterministic, no randomness and no load feedback): token t of rank `rank` routed to a
        logical expert with c copies takes copy (t + rank) % c, copies numbered in phy2log order. Same input, same
        physical ids, on every run and every device."""
        if self.num_physical == self.num_experts and self.phy2log == tuple(range(self.num_experts)):
            return topk_idx.long().clone()
        log2phy, logcnt = self.copies(topk_idx.device)
        idx = topk_idx.long()
        valid = idx >= 0
        safe = idx.clamp_min(0)
        token = torch.arange(idx.shape[0], dtype=torch.int64, device=idx.device).unsqueeze(1).expand_as(idx)
        replica = (token + rank) % logcnt[safe]
        return torch.where(valid, log2phy[safe, replica], -1)
