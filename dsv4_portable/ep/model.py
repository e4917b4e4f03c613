"""Expert parallelism for the whole model (`dsv4 run --ep N`): experts sharded over ranks, everything else
replicated, the batch split over ranks.

Each rank keeps only its local experts of every MoE layer and runs its own share of the sequences; every MoE
layer call is one EP exchange among all ranks. A rank with no sequences (or one that finished early) keeps
serving the others' exchanges in `serve_until_done()` until every rank is idle. Each exchange starts with a
small header (active flag, layer id), so ranks agree on which layer's experts they run and a mismatch fails
with a clear error instead of silently mixing layers.
"""
from __future__ import annotations

import torch

from ..reference.moe import ExpertWeights
from .dispatch import EPInputError
from .moe import ep_moe_forward, local_experts
from .placement import ExpertPlacement
from .transport import Comm


class EPContext:
    """Per-rank EP state of a model: the group, the placement and each MoE layer's local experts."""

    def __init__(self, num_experts: int, group=None, wave_size: int | None = None, fp8: bool = False,
                 mode: str = "ordered", placement: ExpertPlacement | None = None):
        self.comm = group if isinstance(group, Comm) else Comm(group)
        self.placement = placement or ExpertPlacement.contiguous(num_experts, self.comm.world_size)
        self.wave_size, self.fp8, self.mode = wave_size, fp8, mode
        self.layers: dict[int, tuple[ExpertWeights, ExpertWeights | None, float]] = {}
        self.topk, self.hidden, self.dtype = 0, 0, torch.float32
        self.calls = 0

    def attach(self, net) -> "EPContext":
        """Shard a Transformer's experts: each MoE keeps this rank's local experts and calls self.moe."""
        cfg = net.cfg
        self.topk, self.hidden, self.dtype = cfg.n_activated_experts, cfg.dim, net.dtype
        for block in net.layers + net.mtp:
            ffn = block.ffn
            local = local_experts(ffn.experts, self.placement, self.comm.rank)
            self.layers[ffn.layer] = (local, ffn.shared, cfg.swiglu_limit)
            key = next((k for k, v in net.params.items() if v is ffn.experts), None)
            if key is not None:
                net.params[key] = local            # drop the other ranks' experts from this process
            ffn.experts = local
            ffn.ep = self
        return self

    def _header(self, active: bool, layer: int) -> torch.Tensor:
        send = torch.tensor([[int(active), layer]] * self.comm.world_size, dtype=torch.int64)
        return self.comm.exchange_counts(send)        # row s: (active, layer) of rank s

    def _run(self, layer: int, x, idx, w):
        local, shared, limit = self.layers[layer]
        self.calls += 1
        return ep_moe_forward(x, idx, w, local, shared, limit, self.placement, self.comm, wave_size=self.wave_size,
                              fp8=self.fp8, mode=self.mode)

    def moe(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One MoE layer for this rank's tokens x [T, H] routed to idx / w [T, K]."""
        if layer not in self.layers:
            raise EPInputError(f"EP: layer {layer} has no sharded experts (attach the context to the model first)")
        head = self._header(True, layer)
        others = {int(l) for a, l in head.tolist() if a}
        if others != {layer}:
            raise RuntimeError(f"EP: rank {self.comm.rank} is at MoE layer {layer} but active ranks are at layers "
                               f"{sorted(others)}; every rank must run the same layers in the same order")
        return self._run(layer, x, idx, w)

    def serve_until_done(self) -> int:
        """Take part in the other ranks' exchanges (with no tokens of our own) until every rank is idle.
        Every rank must call this after its own work. Returns the number of exchanges served."""
        served = 0
        while True:
            head = self._header(False, -1)
            layers = {int(l) for a, l in head.tolist() if a}
            if not layers:
                return served
            if len(layers) > 1:
                raise RuntimeError(f"EP: active ranks are at different MoE layers {sorted(layers)}")
            layer = layers.pop()
            empty_x = torch.empty(0, self.hidden, dtype=self.dtype)
            empty_i = torch.empty(0, self.topk, dtype=torch.int64)
            self._run(layer, empty_x, empty_i, torch.empty(0, self.topk, dtype=torch.float32))
            served += 1


def split_batch(n: int, world_size: int) -> list[range]:
    """Contiguous shares of n sequences, the first ranks taking one more when n % world_size != 0."""
    q, r = divmod(n, world_size)
    out, start = [], 0
    for rank in range(world_size):
        size = q + (rank < r)
        out.append(range(start, start + size))
        start += size
    return out


# ----------------------------------------------------------------------------------------------- dsv4 run --ep
def _run_rank(rank: int, world_size: int, args) -> dict | None:
    """One rank of `dsv4 run --ep N`: load, shard the experts, generate this rank's share, serve the rest."""
    from .. import registry
    from ..api import load_model
    from ..commands import run_prompts
    registry.reset_counts()
    model = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                       quant_sim=not args.no_quant_sim, quiet=True)
    ctx = EPContext(model.config.n_routed_experts).attach(model.net)
    prompts = run_prompts(args, model)
    mine = [prompts[i] for i in split_batch(len(prompts), world_size)[rank]]
    out = None
    if mine:
        out = model.generate(mine, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, cache_layout=args.cache_layout, progress=False)
    served = ctx.serve_until_done()
    return {"rank": rank, "generation": out, "providers": registry.provider_counts(), "path": str(model.path),
            "transport": ctx.comm.transport, "moe_calls": ctx.calls - served, "served": served,
            "local_experts": ctx.placement.local_logical(rank)}


def run_ep(args) -> list[dict]:
    """Spawn args.ep ranks on this host for `dsv4 run --ep N`; returns every rank's result."""
    from .launch import spawn
    if args.device != "cpu":
        raise SystemExit(f"error: --ep {args.ep} runs over the CPU gloo transport only for now; --device "
                         f"{args.device} would need the nccl/hccl transport, which is not wired into `dsv4 run`")
    return spawn(_run_rank, args.ep, args, timeout_s=600.0, collective_timeout_s=120.0)
