"""Expert parallelism for the whole model (`dsv4 run --ep N`, `python -m dsv4_portable.ep.run` under torchrun):
experts sharded over ranks, everything else replicated, the batch of prompts split over ranks.

Each rank keeps only its local experts of every MoE layer and runs its own share of the prompts; every MoE
layer call is one EP exchange among all ranks. A rank with no prompts (or one that finished early) keeps
serving the others' exchanges in `serve_until_done()` until every rank is idle. Each exchange starts with a
small header (active flag, layer id), so ranks agree on which layer's experts they run and a mismatch fails
with a clear error instead of silently mixing layers.

Loading only the local experts: `EPContext.keep_expert(layer, expert)` says which experts this rank keeps;
`load_model(..., keep_expert=ctx.keep_expert)` (load_sharded) never reads the others. `attach` also takes a model
loaded with every expert and drops the other ranks' (same result, more I/O).
"""
from __future__ import annotations


import torch

from ..reference.moe import ExpertWeights
from .dispatch import EPInputError
from .moe import ep_moe_forward, local_experts
from .placement import ExpertPlacement
from .transport import Comm


class EPContext:
    """Per-rank EP state of a model: the group, the placement and each MoE layer's local experts.

    mode: "ordered" (bitwise equal to --ep 1) or "partial"; provider: force an EP provider (providers.py), None =
    the device's preference; timeout_s: the longest any exchange may wait for its peers (default: the group's)."""

    def __init__(self, num_experts: int, group=None, wave_size: int | None = None, fp8: bool = False,
                 mode: str = "ordered", placement: ExpertPlacement | None = None, provider: str | None = None,
                 timeout_s: float | None = None):
        self.comm = group if isinstance(group, Comm) else Comm(group, timeout_s)
        self.placement = placement or ExpertPlacement.contiguous(num_experts, self.comm.world_size)
        self.wave_size, self.fp8, self.mode, self.provider = wave_size, fp8, mode, provider
        self._mine = frozenset(self.placement.local_logical(self.comm.rank))
        self.layers: dict[int, tuple[ExpertWeights, ExpertWeights | None, float]] = {}
        self.topk, self.hidden, self.dtype, self.device = 0, 0, torch.float32, torch.device("cpu")
        self.calls = 0

    def keep_expert(self, layer: int, expert: int) -> bool:
        """True for the (logical) experts this rank holds; the same set in every MoE layer."""
        return expert in self._mine

    def _local(self, experts: ExpertWeights, where: str) -> ExpertWeights:
        """This rank's local experts in local-id order, from all E experts or from a stack loaded with
        keep_expert (ExpertWeights.select takes global ids either way)."""
        if experts.ids is None and experts.num_experts != self.placement.num_experts:
            raise EPInputError(f"EP: {where} holds {experts.num_experts} experts; expected all "
                               f"{self.placement.num_experts} or a stack loaded with keep_expert")
        return local_experts(experts, self.placement, self.comm.rank)

    def attach(self, net) -> "EPContext":
        """Shard a Transformer's experts: each MoE keeps this rank's local experts and calls self.moe."""
        cfg = net.cfg
        self.topk, self.hidden, self.dtype = cfg.n_activated_experts, cfg.dim, net.dtype
        for block in net.layers + net.mtp:
            ffn = block.ffn
            local = self._local(ffn.experts, f"MoE layer {ffn.layer}")
            self.device = local.w1.device
            self.layers[ffn.layer] = (local, ffn.shared, cfg.swiglu_limit)
            key = next((k for k, v in net.params.items() if v is ffn.experts), None)
            if key is not None:
                net.params[key] = local            # drop the other ranks' experts from this process
            ffn.experts = local
            ffn.ep = self
        return self

    @property
    def transport(self) -> str:
        """The transport(s) the MoE exchanges actually used, as the providers reported them."""
        return ", ".join(sorted({t for _, t in self.comm.ran})) or self.comm.transport

    @property
    def providers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (p, _), n in self.comm.ran.items():
            out[p] = out.get(p, 0) + n
        return out

    def _header(self, active: bool, layer: int) -> torch.Tensor:
        send = torch.tensor([[int(active), layer]] * self.comm.world_size, dtype=torch.int64, device=self.device)
        return self.comm.exchange_counts(send, "layer header")     # row s: (active, layer) of rank s

    def _run(self, layer: int, x, idx, w):
        local, shared, limit = self.layers[layer]
        self.calls += 1
        # idx comes from the model's router (top-k of E scores, or hash tables checked at load): no range check
        return ep_moe_forward(x, idx, w, local, shared, limit, self.placement, self.comm, wave_size=self.wave_size,
                              fp8=self.fp8, mode=self.mode, provider=self.provider, check_routing=False)

    def moe(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One MoE layer for this rank's tokens x [T, H] routed to idx / w [T, K] by the model's router (ids in
        [0, E), so they are not range-checked again here)."""
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
            empty_x = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
            empty_i = torch.empty(0, self.topk, dtype=torch.int64, device=self.device)
            self._run(layer, empty_x, empty_i, torch.empty(0, self.topk, dtype=torch.float32, device=self.device))
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
def validate_ep(args, world_size: int | None = None) -> None:
    """ValueError (the CLI prints `error: ...`, exit 2) before anything is spawned or loaded: --ep >= 1, the
    experts split evenly over the ranks, enough devices on this host."""
    from ..config import load_config
    from .launch import check_devices, device_type_of
    ep = world_size if world_size is not None else getattr(args, "ep", 1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"--ep must be an int >= 1, got {ep!r}")
    experts = load_config(args.model).n_routed_experts
    if experts % ep:
        raise ValueError(f"--ep {ep}: {args.model}'s {experts} routed experts cannot be split evenly over {ep} ranks "
                         f"(choose a divisor of {experts})")
    dtype = device_type_of(args.device)
    if dtype == "npu":
        from ..devices import ascend_availability      # imports torch_npu, as choosing --device ascend does
        reasons = ascend_availability()
        if reasons:
            raise ValueError(f"--ep {ep} --device ascend: " + "; ".join(reasons))
    if world_size is None:                               # local ranks only; under torchrun LOCAL_WORLD_SIZE counts
        check_devices(dtype, ep)


def load_sharded(args, ctx: EPContext):
    """load_model for this rank: other ranks' experts are never read (ctx.keep_expert)."""
    from ..api import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                      quant_sim=not args.no_quant_sim, quiet=True, keep_expert=ctx.keep_expert)


def run_rank(rank: int, world_size: int, args) -> dict:
    """One rank of an EP run: load, shard the experts, generate this rank's share of the prompts, serve the
    rest. Returns this rank's generation (None without prompts) and what ran."""
    from .. import registry
    from ..commands import run_prompts
    from ..config import load_config
    registry.reset_counts()
    # --ep-combine (ordered | partial) and --ep-timeout: options of the torchrun entry (run.py); `dsv4 run --ep`
    # has neither, so the defaults apply there
    ctx = EPContext(load_config(args.model).n_routed_experts, mode=getattr(args, "ep_combine", "ordered"),
                    timeout_s=getattr(args, "ep_timeout", None))
    model = load_sharded(args, ctx)
    ctx.attach(model.net)
    prompts = run_prompts(args, model)
    share = split_batch(len(prompts), world_size)[rank]
    out = None
    if len(share):
        out = model.generate([prompts[i] for i in share], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             cache_layout=args.cache_layout, progress=False)
    with registry.use_backend(model.backend):           # the experts it serves run on the model's backend
        served = ctx.serve_until_done()
    return {"rank": rank, "generation": out, "prompt_indices": list(share), "num_prompts": len(prompts),
            "providers": registry.provider_counts(), "path": str(model.path), "transport": ctx.transport,
            "ep_providers": ctx.providers, "moe_calls": ctx.calls - served, "served": served,
            "local_experts": ctx.placement.local_logical(rank), "world_size": world_size}


def merge_generations(ranks: list[dict]):
    """One Generation with every prompt's tokens in prompt order, from the ranks' shares (ranks ran at once:
    times are the slowest rank's, token and byte counts add up)."""
    from ..model.generate import Generation
    parts = sorted((r for r in ranks if r["generation"] is not None), key=lambda r: r["prompt_indices"][0])
    gens = [r["generation"] for r in parts]
    return Generation(tokens=[t for g in gens for t in g.tokens],
                      prefill_tokens=sum(g.prefill_tokens for g in gens), prefill_s=max(g.prefill_s for g in gens),
                      decode_tokens=sum(g.decode_tokens for g in gens), decode_s=max(g.decode_s for g in gens),
                      cache_bytes=sum(g.cache_bytes for g in gens), cache_bytes_per_token=gens[0].cache_bytes_per_token,
                      cache_layout=gens[0].cache_layout, texts=[t for g in gens for t in g.texts])


def run_ep(args) -> list[dict]:
    """Spawn args.ep ranks on this host for `dsv4 run --ep N` (cpu: gloo; cuda: nccl; ascend: hccl), after
    validate_ep. Returns every rank's result; the first one's "generation" is merged over all ranks (every
    prompt, in prompt order) and its own share is under "own_generation"."""
    from .launch import spawn
    validate_ep(args)
    ranks = spawn(run_rank, args.ep, args, device=args.device, timeout_s=600.0, collective_timeout_s=120.0)
    ranks[0] = {**ranks[0], "own_generation": ranks[0]["generation"], "generation": merge_generations(ranks)}
    return ranks
