"""EP conformance cases (DESIGN.md 5 case 8 and 4): seeded problems, the per-rank worker, and the comparison of
what the ranks computed with the single-device reference (`reference.moe`), one CaseRecord per case.

Every case runs inside one process group per world size (spawning is the slow part). Problems keep V4's shape
of the routing (top-k over many experts, one shared expert) at tiny widths, with adversarial magnitudes (expert
outputs spanning ~6 orders of magnitude) so that a wrong summation order cannot pass by bf16 rounding luck.
Skew: uneven tokens per rank with a rank that has none, experts nobody picks (so some ranks receive nothing),
all tokens to one expert, T = 1, 10% masked slots, a hash-routed layer and redundant expert copies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..reference.moe import ExpertWeights, expert_forward, moe_experts, moe_route, ordered_combine
from ..reference.quant import FP8_LINEAR_BLOCK, dequant_fp8, quant_fp8

E, K, H, INTER, LIMIT = 16, 4, 128, 32, 10.0
WAVE_SIZES = (1, 2, None)


@dataclass
class Problem:
    name: str
    x: torch.Tensor            # [T, H] all ranks' tokens, rank 0's first
    idx: torch.Tensor          # [T, K] logical ids, -1 = none
    w: torch.Tensor            # [T, K] float32
    experts: ExpertWeights
    shared: ExpertWeights
    sizes: list[int]           # tokens per rank
    extra: list[int] = field(default_factory=list)   # redundant copies (logical ids)
    fp8: bool = False

    def rows(self, rank: int) -> slice:
        lo = sum(self.sizes[:rank])
        return slice(lo, lo + self.sizes[rank])


def _experts(g: torch.Generator, n: int, dtype: torch.dtype) -> ExpertWeights:
    """SwiGLU experts whose output scales span 1e-3..1e3 (adversarial for the reduction order)."""
    scale = 10.0 ** (torch.rand(n, 1, 1, generator=g) * 6 - 3)
    return ExpertWeights("bf16", (torch.randn(n, INTER, H, generator=g) * 0.15).to(dtype),
                         (torch.randn(n, H, INTER, generator=g) * 0.15 * scale).to(dtype),
                         (torch.randn(n, INTER, H, generator=g) * 0.15).to(dtype))


def _sizes(total: int, world: int) -> list[int]:
    """Uneven split with rank 1 empty (world >= 2): rank 0 takes twice the others' share."""
    if world == 1:
        return [total]
    weights = [2] + [0] + [1] * (world - 2)
    unit = total // sum(weights)
    sizes = [unit * wt for wt in weights]
    sizes[0] += total - sum(sizes)
    return sizes


def _skewed_topk(g, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hot experts 0..3, experts 12..15 never chosen, 10% of slots masked, weights with mixed magnitudes."""
    score = torch.rand(t, E, generator=g)
    score[:, :4] += 0.6
    score[:, 12:] = -1.0
    idx = score.topk(K, dim=-1).indices
    idx[torch.rand(t, K, generator=g) < 0.1] = -1
    w = (torch.rand(t, K, generator=g) + 0.05) * 10.0 ** (torch.randint(-2, 3, (t, K), generator=g).float())
    return idx, w.float()


def problems(world: int, seed: int = 0) -> list[Problem]:
    g = torch.Generator().manual_seed(seed + 1000 * world)
    t = 48
    out = []
    ex, sh = _experts(g, E, torch.float32), _experts(g, 1, torch.float32)
    x = torch.randn(t, H, generator=g) * (1 + 30 * (torch.rand(t, 1, generator=g) > 0.8))
    idx, w = _skewed_topk(g, t)
    out.append(Problem("skew_bf16", x.bfloat16(), idx, w, ex, sh, _sizes(t, world)))
    out.append(Problem("skew_fp32", x, idx, w, ex, sh, _sizes(t, world)))
    one = torch.full((t, K), -1, dtype=torch.int64)
    one[:, 0] = 5                                    # every token to expert 5 (one rank gets all, the rest none)
    out.append(Problem("all_tokens_one_expert", x.bfloat16(), one, w, ex, sh, _sizes(t, world)))
    out.append(Problem("t1", x[:1].bfloat16(), idx[:1], w[:1], ex, sh, [1] + [0] * (world - 1)))
    # hash-routed layer: experts from a token-id table, weights from the (unbiased) router scores
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(64)])
    ids = torch.randint(0, 64, (t,), generator=g)
    gate = torch.randn(E, H, generator=g) * 0.1
    hw, hidx = moe_route(x, gate, None, tid2eid, ids, K, "sqrtsoftplus", 1.5)
    out.append(Problem("hash_layer", x.bfloat16(), hidx, hw, ex, sh, _sizes(t, world)))
    out.append(Problem("redundant_experts", x.bfloat16(), idx, w, ex, sh, _sizes(t, world),
                       extra=[i % 4 for i in range(world)]))
    out.append(Problem("fp8_dispatch", x.bfloat16(), idx, w, ex, sh, _sizes(t, world), fp8=True))
    return out


# ----------------------------------------------------------------------------------------------- per rank
def rank_worker(rank: int, world: int, seed: int = 0, model_batch: int = 0) -> dict:
    """Run every problem on this rank; return raw outputs (the checks happen in the parent)."""
    from .dispatch import ep_combine, ep_dispatch
    from .moe import ep_moe_forward, local_experts
    from .placement import ExpertPlacement
    from .transport import Comm
    comm = Comm()
    res = {}
    for p in problems(world, seed):
        sl = p.rows(rank)
        x, idx, w = p.x[sl], p.idx[sl], p.w[sl]
        pl = ExpertPlacement.redundant(E, world, p.extra) if p.extra else ExpertPlacement.contiguous(E, world)
        loc = local_experts(p.experts, pl, rank)
        r = {"placement": pl.phy2log}
        record: list = []
        for ws in WAVE_SIZES:
            r[f"out_w{ws}"] = ep_moe_forward(x, idx, w, loc, p.shared, LIMIT, pl, comm, wave_size=ws, fp8=p.fp8,
                                             record=record if ws is None else None)
        r["out_no_overlap"] = ep_moe_forward(x, idx, w, loc, p.shared, LIMIT, pl, comm, wave_size=1, fp8=p.fp8,
                                             overlap=False)
        r["out_partial"] = ep_moe_forward(x, idx, w, loc, p.shared, LIMIT, pl, comm, fp8=p.fp8, mode="partial")
        r["processed"] = torch.cat(record) if record else torch.empty(0, 3, dtype=torch.int64)
        rx, rs, ridx, rw, h = ep_dispatch(x, idx, w, pl, comm, fp8=p.fp8)
        r.update(recv_x=rx.view(torch.uint8) if p.fp8 else rx, recv_scales=rs, recv_idx=ridx, recv_w=rw,
                 recv_src_rank=h.recv_src_rank, recv_src_index=h.recv_src_index,
                 per_rank=h.num_tokens_per_rank, per_expert=h.num_tokens_per_expert,
                 per_local_expert=h.num_recv_per_local_expert, phys=h.topk_idx)
        # identity experts through the public combine, DeepEP style (weights applied in combine)
        y = (dequant_fp8(rx, rs, FP8_LINEAR_BLOCK).to(x.dtype) if p.fp8 else rx).unsqueeze(1).expand(-1, K, -1)
        bias = expert_forward(x, p.shared, 0, None, LIMIT) if x.shape[0] else torch.zeros(0, H, dtype=x.dtype)
        r["identity_combine"] = ep_combine(y.contiguous(), h, bias, "ordered", apply_weights=True, group=comm)
        res[p.name] = r
    if model_batch:
        res["model"] = _model_logits(rank, world, model_batch, seed)
    res["transport"] = comm.transport
    return res


def model_ids(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(2, 1024, (batch, 12), generator=g)


def _model_logits(rank: int, world: int, batch: int, seed: int):
    """The tiny model with experts sharded: prefill logits of this rank's share, then one decode step."""
    from ..api import load_model
    from .model import EPContext, split_batch
    m = load_model("tiny", quiet=True)
    ctx = EPContext(m.config.n_routed_experts).attach(m.net)
    ids = model_ids(batch, seed)[list(split_batch(batch, world)[rank])]
    out = None
    if ids.shape[0]:
        cache = m.new_cache(ids.shape[0], ids.shape[1] + 1)
        pre = m.forward(ids, cache, all_logits=True)
        nxt = m.forward(pre[:, -1].argmax(-1).view(-1, 1), cache)
        out = (pre, nxt)
    ctx.serve_until_done()
    return out


# ----------------------------------------------------------------------------------------------- oracle
def oracle(p: Problem) -> torch.Tensor:
    """The single-device MoE for the same routing (FP8 dispatch: routed experts see the FP8 round trip of x)."""
    if not p.fp8:
        return moe_experts(p.x, p.idx, p.w, p.experts, p.shared, LIMIT)
    q, s = quant_fp8(p.x, FP8_LINEAR_BLOCK, "ue8m0")
    xr = dequant_fp8(q, s, FP8_LINEAR_BLOCK).to(p.x.dtype)
    t = p.x.shape[0]
    per_slot = torch.zeros(t, K, H, dtype=p.x.dtype)
    for e in torch.unique(p.idx[p.idx >= 0]).tolist():
        tok, kk = (p.idx == e).nonzero().unbind(1)
        per_slot[tok, kk] = expert_forward(xr[tok], p.experts, e, p.w[tok, kk], LIMIT)
    return ordered_combine(per_slot, p.idx, expert_forward(p.x, p.shared, 0, None, LIMIT))


def ep_records(device: str, world_sizes: list[int], progress=print, seed: int = 0) -> list:
    """One CaseRecord per (world size, problem) plus the failure-hygiene case. The transport that ran is
    recorded: this suite runs the torch.distributed transport over CPU gloo processes only; other devices get
    an explicit skip record with the reasons their EP transports did not run."""
    from ..conformance.records import CaseRecord
    from ..conformance.runner import versions
    from .launch import EPLaunchError, spawn
    from .providers import explain
    vers = versions()
    recs = []
    dev_type = {"cuda": "cuda", "ascend": "npu"}.get(device, "cpu")
    if dev_type != "cpu":
        _, skipped = explain(dev_type)
        recs.append(CaseRecord("ep", "ep_dispatch", f"ep/{device}/device_transport", seed, "-", skipped, device,
                               vers, {}, {}, status="skip", transport=None,
                               message="no device EP transport ran; the cases below ran on cpu-gloo processes"))
    for world in world_sizes:
        t0 = time.perf_counter()
        try:
            ranks = spawn(rank_worker, world, seed, 0, timeout_s=300, collective_timeout_s=60)
        except EPLaunchError as e:
            recs.append(CaseRecord("ep", "ep_moe", f"ep/w{world}/launch", seed, "torch-dist", {}, "cpu", vers, {},
                                   {}, status="error", message=str(e), transport="cpu-gloo multi-process"))
            continue
        elapsed = time.perf_counter() - t0
        for p in problems(world, seed):
            recs.append(_record(p, world, ranks, seed, vers, elapsed / 7, CaseRecord))
            progress(f"ep w{world} {p.name}: {recs[-1].status} {recs[-1].message}")
    recs.append(_failure_record(seed, vers, CaseRecord))
    progress(f"ep failure hygiene: {recs[-1].status} {recs[-1].message}")
    return recs


def _record(p: Problem, world: int, ranks: list[dict], seed, vers, duration, CaseRecord):
    ref = oracle(p)
    got = {k: torch.cat([r[p.name][k] for r in ranks]) for k in
           ["out_wNone", "out_w1", "out_w2", "out_no_overlap", "out_partial"]}
    bad = [k for k in ["out_wNone", "out_w1", "out_w2", "out_no_overlap"] if not torch.equal(got[k], ref)]
    part = (got["out_partial"].double() - ref.double()).abs()
    scale = ref.double().abs().amax().clamp_min(1e-30)
    partial_rel = float(part.max() / scale) if part.numel() else 0.0
    slots = torch.cat([r[p.name]["processed"] for r in ranks])
    offsets = torch.tensor([sum(p.sizes[:s]) for s in range(world)])
    seen = sorted((int(offsets[a]) + int(b), int(c)) for a, b, c in slots.tolist())
    want = sorted((int(t), int(k)) for t, k in (p.idx >= 0).nonzero().tolist())
    problems_found = []
    if bad:
        problems_found.append(f"ordered combine not bitwise equal for {bad}")
    if seen != want:
        problems_found.append("(token, slot) pairs not processed exactly once")
    if partial_rel > 1e-2:
        problems_found.append(f"partial combine off by {partial_rel:.2e} (relative to max |out|)")
    msg = "; ".join(problems_found) or (f"bitwise equal for waves {WAVE_SIZES} and no-overlap; exactly-once ok; "
                                        f"partial max err {partial_rel:.1e} of max |out|")
    return CaseRecord("ep", "ep_moe", f"ep/w{world}/{p.name}", seed, "torch-dist", {}, "cpu", vers,
                      {"x": list(p.x.shape), "topk_idx": list(p.idx.shape), "tokens_per_rank": p.sizes},
                      {"x": str(p.x.dtype).replace("torch.", ""), "dispatch": "fp8" if p.fp8 else "native"},
                      max_abs=float(part.max()) if part.numel() else 0.0, max_rel=partial_rel,
                      deterministic=not bad, tolerance={"exact": True, "source": "ordered combine, DESIGN.md 4; "
                                                        "partial combine: relative 1e-2"},
                      transport="cpu-gloo multi-process", status="fail" if problems_found else "pass",
                      message=msg, duration_s=duration)


def _hang_rank1(rank: int, world: int) -> None:
    import torch.distributed as dist
    if rank == 1:
        time.sleep(120)               # a rank that stops answering
    t = torch.zeros(world, 2, dtype=torch.int64)
    dist.all_to_all_single(torch.empty_like(t), t)


def _failure_record(seed, vers, CaseRecord):
    from .launch import EPLaunchError, spawn
    t0 = time.perf_counter()
    try:
        spawn(_hang_rank1, 2, timeout_s=60, collective_timeout_s=3)
        status, msg = "fail", "a hanging rank did not fail the run"
    except EPLaunchError as e:
        elapsed = time.perf_counter() - t0
        ok = elapsed < 20 and "rank 0" in str(e)
        status, msg = ("pass" if ok else "fail"), f"ended after {elapsed:.1f} s (group timeout 3 s): {str(e)[:160]}"
    return CaseRecord("ep", "ep_moe", "ep/w2/hanging_rank_times_out", seed, "torch-dist", {}, "cpu", vers, {}, {},
                      tolerance={"max_seconds": 20}, transport="cpu-gloo multi-process", status=status, message=msg,
                      duration_s=time.perf_counter() - t0)
