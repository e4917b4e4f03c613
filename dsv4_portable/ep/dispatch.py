"""EP dispatch and combine (DESIGN.md 4), DeepEP-shaped, over the torch.distributed transport.

Dispatch (compact layout): each token goes once to every rank that holds at least one of its selected experts,
with its row of x (or FP8 bytes plus per-128 scales), its K expert ids translated to that rank's local ids (-1
for slots that live elsewhere), its K routing weights and its source index. Rows arrive ordered by source rank,
then source index: the canonical order, so two runs receive identical tensors.

Combine ("ordered", the canonical one): the receiver returns one row per processed (token, slot); the source puts
them back in their slots and reduces in fp32, starting from the bias (the V4 shared expert) and adding slot
k = 0..K-1 in order. With batch-invariant expert GEMMs this equals the single-device MoE bit for bit.
Combine ("partial", DeepEP's default style): each receiving rank reduces its slots of a token in fp32, in k order,
and returns ONE row per (token, rank) in y's dtype instead of one row per slot; the source starts from the bias
in fp32 and adds the ranks' partial rows in rank order. Exactly:
    P_r[t] = cast_y( sum_{k=0..K-1, slot (t,k) on rank r} [w[t,k] *] float(y[t,k]) )   (fp32, sequential in k)
    out[t] = cast_y( (((float(bias[t]) + float(P_r0[t])) + float(P_r1[t])) + ...) )  (ranks holding a slot of t,
                                                                                       in rank order)
It moves at most as many bytes as ordered (fewer whenever a rank holds two or more slots of a token), rounds
each partial to y's dtype, and is deterministic: tests check it bitwise against an emulation of this order.
It is not the single-device MoE's order, so against that it is a tolerance check only. The wave schedule
keeps the partial sums per (token, rank) across all waves, so the result does not depend on the wave size.

The functions here are split in a "plan" (sender side bookkeeping), the exchanges and the reductions so that the
wave schedule (waves.py) can reuse them per wave; ep_dispatch / ep_combine are the one-shot forms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference.quant import FP8_LINEAR_BLOCK, quant_fp8
from .placement import ExpertPlacement
from .transport import Comm, Field, from_bytes, pack, to_bytes, unpack

COMBINE_MODES = ("ordered", "partial")


class EPInputError(ValueError):
    """An EP call with a missing, misshapen or wrongly typed argument."""


@dataclass
class EPHandle:
    """Everything combine needs, plus the layout counts tests and reports look at.

    Sender side (this rank's T tokens): `num_tokens_per_rank[R]` rows sent to each rank, `num_tokens_per_expert[P]`
    slots routed to each physical expert, `send_token[S]` token of each sent row (rank order, then token order),
    `slot_token` / `slot_k` every dispatched (token, slot) in the order the receivers return them (rank, token,
    k), `topk_idx` physical ids [T, K], `topk_weights` [T, K].
    Receiver side: `num_recv_per_rank[R]` rows from each source rank, `recv_src_rank` / `recv_src_index` global
    source of every received row, `recv_topk_idx` local ids, `recv_topk_weights`, `num_recv_per_local_expert`,
    `recv_slots_per_rank[R]` processed slots per source rank."""
    rank: int
    world_size: int
    num_tokens: int
    hidden: int
    dtype: torch.dtype
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    send_token: torch.Tensor
    slot_token: torch.Tensor
    slot_k: torch.Tensor
    slots_per_rank: list[int]
    num_recv_per_rank: list[int] = field(default_factory=list)
    recv_src_rank: torch.Tensor | None = None
    recv_src_index: torch.Tensor | None = None
    recv_topk_idx: torch.Tensor | None = None
    recv_topk_weights: torch.Tensor | None = None
    num_recv_per_local_expert: torch.Tensor | None = None
    recv_slots_per_rank: list[int] = field(default_factory=list)

    @property
    def send_counts(self) -> list[int]:
        return self.num_tokens_per_rank.tolist()


def check_dispatch_args(x, topk_idx, topk_weights, placement: ExpertPlacement, world_size: int,
                        check_values: bool = True) -> None:
    """Clear errors before any work or communication is done. check_values: also check that every topk_idx value
    is in [-1, E) (one reduction and one host read); False for callers whose ids are valid by construction."""
    if isinstance(x, tuple):
        if len(x) != 2 or x[0].dtype != torch.float8_e4m3fn:
            raise EPInputError("ep_dispatch: 'x' as a tuple must be (x_q float8_e4m3fn [T, H], scales float32 "
                               "[T, H/128])")
        xq, s = x
        if s.shape != (xq.shape[0], xq.shape[1] // FP8_LINEAR_BLOCK):
            raise EPInputError(f"ep_dispatch: scales have shape {list(s.shape)}, expected "
                               f"[{xq.shape[0]}, {xq.shape[1] // FP8_LINEAR_BLOCK}]")
        x = xq
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise EPInputError(f"ep_dispatch: 'x' must be [T, H], got {getattr(x, 'shape', type(x).__name__)}")
    t = x.shape[0]
    if topk_idx.dim() != 2 or topk_idx.shape[0] != t or topk_idx.dtype not in (torch.int32, torch.int64):
        raise EPInputError(f"ep_dispatch: 'topk_idx' must be int [T={t}, K], got {list(topk_idx.shape)} "
                           f"{topk_idx.dtype}")
    if topk_weights.shape != topk_idx.shape or not topk_weights.dtype.is_floating_point:
        raise EPInputError(f"ep_dispatch: 'topk_weights' must be float {list(topk_idx.shape)}, got "
                           f"{list(topk_weights.shape)} {topk_weights.dtype}")
    devices = {t.device for t in (x, topk_idx, topk_weights)}
    if len(devices) > 1:
        raise EPInputError(f"ep_dispatch: x, topk_idx and topk_weights must be on one device, got "
                           f"{sorted(str(d) for d in devices)}")
    if placement.world_size != world_size:
        raise EPInputError(f"ep_dispatch: placement is for {placement.world_size} ranks, the group has "
                           f"{world_size}")
    if check_values and topk_idx.numel():
        lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist()
        if hi >= placement.num_experts or lo < -1:
            raise EPInputError(f"ep_dispatch: 'topk_idx' values must be in [-1, {placement.num_experts - 1}], got "
                               f"[{lo}, {hi}]")


def plan_dispatch(phys: torch.Tensor, slot_mask: torch.Tensor, experts_per_rank: int, world_size: int,
                  num_physical: int):
    """Sender side layout for the slots in slot_mask. Returns (send_token, local_idx [S, K], counts per rank,
    slot_token, slot_k, slots per rank, per physical expert histogram)."""
    t, k = phys.shape
    mask = slot_mask & (phys >= 0)
    dst = torch.where(mask, phys // experts_per_rank, -1)
    local = phys % experts_per_rank
    send_token, local_rows, counts, slot_tok, slot_k, slot_counts = [], [], [], [], [], []
    for r in range(world_size):
        on_r = dst == r                                        # [T, K]
        toks = on_r.any(1).nonzero().squeeze(1)
        send_token.append(toks)
        local_rows.append(torch.where(on_r[toks], local[toks], -1))
        counts.append(toks.numel())
        tk = on_r.nonzero()                                    # row-major: token order, then k
        slot_tok.append(tk[:, 0])
        slot_k.append(tk[:, 1])
        slot_counts.append(tk.shape[0])
    per_expert = torch.bincount(phys[mask], minlength=num_physical)
    return (torch.cat(send_token), torch.cat(local_rows) if local_rows else
            torch.empty(0, k, dtype=torch.int64, device=phys.device),
            counts, torch.cat(slot_tok), torch.cat(slot_k), slot_counts, per_expert)


def payload_fields(hidden: int, k: int, dtype: torch.dtype, fp8: bool) -> list[Field]:
    x = [Field("x", torch.float8_e4m3fn, (hidden,)), Field("scales", torch.float32, (hidden // FP8_LINEAR_BLOCK,))] \
        if fp8 else [Field("x", dtype, (hidden,))]
    return x + [Field("idx", torch.int64, (k,)), Field("w", torch.float32, (k,)), Field("src", torch.int64, ())]


@dataclass
class PendingDispatch:
    """A payload exchange in flight; finish() waits and fills the receiver side of the handle."""
    handle: EPHandle
    fields: list[Field]
    buf: torch.Tensor
    work: object
    fp8: bool

    comm: Comm

    def finish(self):
        self.comm.wait(self.work, "dispatch")
        h = self.handle
        got = {k: v.clone() for k, v in unpack(self.fields, self.buf).items()}   # own storage, not the buffer's
        dev = self.buf.device
        h.recv_src_rank = torch.repeat_interleave(torch.arange(h.world_size, device=dev),
                                                  torch.tensor(h.num_recv_per_rank, dtype=torch.int64, device=dev))
        h.recv_src_index = got["src"]
        h.recv_topk_idx = got["idx"]
        h.recv_topk_weights = got["w"]
        return got["x"], (got["scales"] if self.fp8 else None), got["idx"], got["w"], h


def start_dispatch(comm: Comm, xs: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype, phys, weights,
                   slot_mask, placement: ExpertPlacement, recv_counts: list[int], recv_slots: list[int],
                   async_op: bool) -> PendingDispatch:
    """Send the rows for the slots in slot_mask; recv_counts / recv_slots come from a counts exchange."""
    t, k = phys.shape
    eloc = placement.experts_per_rank
    send_token, local_idx, counts, slot_tok, slot_k, slot_counts, per_expert = plan_dispatch(
        phys, slot_mask, eloc, comm.world_size, placement.num_physical)
    fields = payload_fields(xs.shape[1], k, dtype, scales is not None)
    tensors = [xs[send_token]] + ([scales[send_token]] if scales is not None else []) + \
        [local_idx, weights.float()[send_token], send_token]
    buf, work = comm.all_to_all(pack(fields, tensors, xs.device), counts, recv_counts, "dispatch", async_op=True)
    if not async_op:
        comm.wait(work, "dispatch")
        work = None
    h = EPHandle(comm.rank, comm.world_size, t, xs.shape[1], dtype, phys, weights,
                 torch.tensor(counts, dtype=torch.int64, device=xs.device), per_expert, send_token, slot_tok, slot_k,
                 slot_counts, num_recv_per_rank=list(recv_counts), recv_slots_per_rank=list(recv_slots))
    return PendingDispatch(h, fields, buf, work, scales is not None, comm)


def layout_counts(phys: torch.Tensor, slot_mask: torch.Tensor, experts_per_rank: int, world_size: int) -> torch.Tensor:
    """[R, 2]: (rows, slots) this rank sends to each rank for the slots in slot_mask."""
    mask = slot_mask & (phys >= 0)
    dst = torch.where(mask, phys // experts_per_rank, -1)
    ranks = torch.arange(world_size, device=phys.device).view(-1, 1, 1)
    on = dst.unsqueeze(0) == ranks                                # [R, T, K]
    return torch.stack([on.any(2).sum(1), on.sum((1, 2))], dim=1).to(torch.int64)


def split_x(x, fp8: bool):
    """(x | (x_q, scales)) -> (rows to send, scales or None, activation dtype). fp8=True quantises x here with
    the reference recipe (e4m3, ue8m0 per-128 scales), before anything is sent."""
    if isinstance(x, tuple):
        return x[0], x[1].float(), torch.bfloat16
    if fp8:
        xq, s = quant_fp8(x, FP8_LINEAR_BLOCK, "ue8m0")
        return xq, s, x.dtype
    return x, None, x.dtype


def ep_dispatch(x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, placement: ExpertPlacement,
                group=None, fp8: bool = False):
    """Send each token to the ranks holding its experts.

    x: [T, H] activations, or a tuple (x_q float8_e4m3fn [T, H], scales float32 [T, H/128]) already quantised;
    topk_idx: int [T, K] logical expert ids, -1 = no expert; topk_weights: float [T, K]; placement: where the
    experts live (redundant copies are chosen here); group: torch.distributed group (None = default, or world
    size 1 without torch.distributed); fp8: quantise x (reference recipe) before sending.
    Returns (recv_x [N, H], recv_scales [N, H/128] or None, recv_topk_idx int64 [N, K] local ids (-1 = slot not
    on this rank), recv_topk_weights float32 [N, K], handle), rows ordered by (source rank, source index)."""
    comm = group if isinstance(group, Comm) else Comm(group)
    check_dispatch_args(x, topk_idx, topk_weights, placement, comm.world_size)
    xs, scales, dtype = split_x(x, fp8)
    phys = placement.to_physical(topk_idx, comm.rank)
    everything = torch.ones_like(phys, dtype=torch.bool)
    recv = comm.exchange_counts(layout_counts(phys, everything, placement.experts_per_rank, comm.world_size))
    pending = start_dispatch(comm, xs, scales, dtype, phys, topk_weights, everything, placement,
                             recv[:, 0].tolist(), recv[:, 1].tolist(), async_op=False)
    out = pending.finish()
    eloc = placement.experts_per_rank
    idx = out[2]
    out[4].num_recv_per_local_expert = torch.bincount(idx[idx >= 0], minlength=eloc)
    return out




# ----------------------------------------------------------------------------------------------- combine
def ordered_payload(y: torch.Tensor, recv_topk_idx: torch.Tensor) -> torch.Tensor:
    """Receiver side rows of the ordered combine: one row per processed slot (row order, then k), y's dtype."""
    return y[recv_topk_idx >= 0]


def partial_rows(pieces: list[tuple], world_size: int, apply_weights: bool, dtype: torch.dtype):
    """Receiver side rows of the partial combine, from every wave's received rows.

    pieces: [(recv_src_rank [N], recv_src_index [N], recv_topk_idx [N, K], recv_topk_weights [N, K], y [N, K, H])]
    (one per wave; a token may arrive in several waves with different slots). Returns (rows [U, H] in `dtype`, one
    per distinct source token in (source rank, source index) order, each the fp32 sum of its slots on this rank in
    k order; rows per source rank [R])."""
    src_r, src_i, ks, vals, ws = [], [], [], [], []
    for rank_of_row, index_of_row, idx, w, y in pieces:
        rows, k = (idx >= 0).nonzero().unbind(1)
        src_r.append(rank_of_row[rows])
        src_i.append(index_of_row[rows])
        ks.append(k)
        vals.append(y[rows, k])
        ws.append(w[rows, k])
    device = pieces[0][4].device
    kdim, hdim = pieces[0][4].shape[1], pieces[0][4].shape[2]
    src_r, src_i, ks, vals, ws = (torch.cat(v) for v in (src_r, src_i, ks, vals, ws))
    base = int(src_i.max()) + 1 if src_i.numel() else 1
    token, inverse = torch.unique(src_r * base + src_i, sorted=True, return_inverse=True)
    acc = torch.zeros(token.shape[0], hdim, dtype=torch.float32, device=device)
    for j in range(kdim):                       # sequential in k, fp32; a token has at most one slot j
        sel = ks == j
        term = vals[sel].float()
        if apply_weights:
            term = ws[sel].float().unsqueeze(1) * term
        acc[inverse[sel]] += term
    per_rank = torch.bincount(token // base, minlength=world_size)
    return acc.to(dtype), per_rank.tolist()


def tokens_per_rank(phys: torch.Tensor, experts_per_rank: int, world_size: int) -> tuple[torch.Tensor, list[int]]:
    """Sender side of the partial combine: the tokens with at least one slot on each rank, rank after rank (token
    order within a rank), and how many per rank."""
    dst = torch.where(phys >= 0, phys // experts_per_rank, -1)
    toks = [(dst == r).any(1).nonzero().squeeze(1) for r in range(world_size)]
    return torch.cat(toks), [t.numel() for t in toks]


def add_partials(acc: torch.Tensor, send_token: torch.Tensor, counts: list[int], rows: torch.Tensor) -> None:
    """acc [T, H] fp32 += float(partial rows), one rank's segment after the other (rank order)."""
    start = 0
    for n in counts:
        seg = send_token[start:start + n]
        acc[seg] += rows[start:start + n].float()
        start += n


def scatter_slots(per_slot: torch.Tensor, h: EPHandle, rows: torch.Tensor) -> None:
    """Put returned slot rows (rank, token, k order) into per_slot [T, K, H]."""
    per_slot[h.slot_token, h.slot_k] = rows


def ordered_reduce(per_slot: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """out[t] = cast(float(bias[t]) + sum_{k=0..K-1, idx>=0} [w[t,k] *] float(y[t,k])), sequential in k, fp32."""
    t, k, hdim = per_slot.shape
    acc = torch.zeros(t, hdim, dtype=torch.float32, device=per_slot.device)
    if bias is not None:
        acc += bias.float()
    for j in range(k):
        term = per_slot[:, j].float()
        if topk_weights is not None:
            term = topk_weights[:, j:j + 1].float() * term
        acc += torch.where((topk_idx[:, j] >= 0).unsqueeze(-1), term, 0)
    return acc.to(per_slot.dtype)


def partial_reduce(acc_rows: tuple[torch.Tensor, list[int]], send_token: torch.Tensor, num_tokens: int,
                   bias: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Source side of the partial combine: float(bias) first, then every rank's partial rows in rank order."""
    rows, counts = acc_rows
    acc = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=device)
    if bias is not None:
        acc += bias.float()
    add_partials(acc, send_token, counts, rows)
    return acc.to(dtype)


def ep_combine(y: torch.Tensor, handle: EPHandle, bias: torch.Tensor | None = None, mode: str = "ordered",
               apply_weights: bool = True, group=None) -> torch.Tensor:
    """Return expert outputs to their tokens and reduce.

    y: [N, K, H] expert outputs for the received rows of `handle` (slot j of row i is read only where
    handle.recv_topk_idx[i, j] >= 0); bias: [T, H] added first (the shared expert's output) or None;
    mode: "ordered" (canonical: equals the single-device MoE bitwise) or "partial" (per-rank fp32 partial sums
    sent in y's dtype; exact order in the module doc); apply_weights: multiply slot k by its routing weight
    (DeepEP style); False when the experts already applied it (V4 applies the routing weight before w2).
    Returns out [T, H] in y's dtype."""
    if mode not in COMBINE_MODES:
        raise EPInputError(f"ep_combine: mode must be one of {COMBINE_MODES}, got {mode!r}")
    n = handle.recv_topk_idx.shape[0]
    if y.dim() != 3 or y.shape[0] != n or y.shape[1] != handle.recv_topk_idx.shape[1]:
        raise EPInputError(f"ep_combine: 'y' must be [N={n}, K={handle.recv_topk_idx.shape[1]}, H], got "
                           f"{list(y.shape)}")
    if bias is not None and tuple(bias.shape) != (handle.num_tokens, y.shape[2]):
        raise EPInputError(f"ep_combine: 'bias' must be [{handle.num_tokens}, {y.shape[2]}], got {list(bias.shape)}")
    comm = group if isinstance(group, Comm) else Comm(group)
    if mode == "ordered":
        rows = ordered_payload(y, handle.recv_topk_idx)
        buf = comm.all_to_all(to_bytes(rows), handle.recv_slots_per_rank, handle.slots_per_rank, "combine")
        per_slot = torch.zeros(handle.num_tokens, handle.topk_idx.shape[1], y.shape[2], dtype=y.dtype,
                               device=y.device)
        scatter_slots(per_slot, handle, from_bytes(buf, y.dtype, tuple(rows.shape[1:])))
        return ordered_reduce(per_slot, handle.topk_idx, handle.topk_weights if apply_weights else None, bias)
    rows, per_rank = partial_rows([(handle.recv_src_rank, handle.recv_src_index, handle.recv_topk_idx,
                                    handle.recv_topk_weights, y)], comm.world_size, apply_weights, y.dtype)
    buf = comm.all_to_all(to_bytes(rows), per_rank, handle.send_counts, "combine")
    back = from_bytes(buf, y.dtype, (y.shape[2],))
    return partial_reduce((back, handle.send_counts), handle.send_token, handle.num_tokens, bias, y.dtype, y.device)
