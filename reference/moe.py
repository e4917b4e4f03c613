"""MoE routing and experts (DESIGN.md 2.6), with the ordered combine that makes EP bitwise reproducible.

Expert (routed and shared): g = w1(x), u = w3(x) (linear outputs in the activation dtype, then fp32);
if swiglu_limit > 0: u = clamp(u, -L, L), g = clamp(g, max=L) (asymmetric; the shared expert too);
h = silu(g) * u; the routing weight multiplies h BEFORE w2; h is cast to the activation dtype; y = w2(h).

Combine ("ordered", DESIGN.md 4): out[t] = cast(float(shared[t]) + sum_{k=0..K-1, idx>=0} float(y[t, k])),
summed sequentially in k in fp32 (the routing weight is already inside y). Expert GEMMs run in fixed 16-row
tiles so a row's result does not depend on which other rows share its expert; with both, expert-parallel
execution equals this single-device reference bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .invariant import f64
import torch.nn.functional as F

from .quant import FP8_LINEAR_BLOCK, dequant_fp4_weight, dequant_fp8, dequant_fp8_weight, linear_f32, quant_fp8

EXPERT_FORMATS = ("bf16", "fp8", "fp4")


@dataclass
class ExpertWeights:
    """Stacked weights of E experts in one storage format (the shared expert is an ExpertWeights with E=1).

    fmt "bf16": w1, w3 [E, I, D] and w2 [E, D, I] in any float dtype, no scales.
    fmt "fp8":  float8_e4m3fn weights of those shapes, s1/s3 [E, ceil(I/128), ceil(D/128)], s2 [E, ceil(D/128),
                ceil(I/128)] (float32 or e8m0).
    fmt "fp4":  packed int8/uint8 w1, w3 [E, I, D/2], w2 [E, D, I/2]; s1/s3 [E, I, D/32], s2 [E, D, I/32].
    ids: None when the stack holds experts 0..E-1 in order; else the global expert id of each position (a model
    loaded with keep_expert holds only some of a layer's experts). moe_experts and expert_forward index by
    position; `select` takes global ids.
    """
    fmt: str
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    s3: torch.Tensor | None = None
    scale_fmt: str | None = "ue8m0"  # activation scale rule used by quantised formats
    ids: tuple[int, ...] | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[2] * (2 if self.fmt == "fp4" else 1)

    @property
    def inter(self) -> int:
        return self.w1.shape[1]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every field's shape, derived from w1 (E, I and D)."""
        e, i, d = self.num_experts, self.inter, self.hidden
        if self.fmt == "fp4":
            return {"w1": (e, i, d // 2), "w3": (e, i, d // 2), "w2": (e, d, i // 2),
                    "s1": (e, i, d // 32), "s3": (e, i, d // 32), "s2": (e, d, i // 32)}
        shapes = {"w1": (e, i, d), "w3": (e, i, d), "w2": (e, d, i)}
        if self.fmt == "fp8":
            c = lambda v: -(-v // 128)  # noqa: E731
            shapes.update(s1=(e, c(i), c(d)), s3=(e, c(i), c(d)), s2=(e, c(d), c(i)))
        return shapes

    def check(self, where: str = "experts") -> None:
        """Raise ValueError naming the first field whose format, dtype or shape is wrong."""
        if self.fmt not in EXPERT_FORMATS:
            raise ValueError(f"{where}: unknown expert format {self.fmt!r} (expected one of {EXPERT_FORMATS})")
        if self.w1.dim() != 3:
            raise ValueError(f"{where}: 'w1' must be [E, I, D] (packed [E, I, D/2] for fp4), got {list(self.w1.shape)}")
        if self.ids is not None and len(self.ids) != self.num_experts:
            raise ValueError(f"{where}: 'ids' names {len(self.ids)} experts but the stack holds {self.num_experts}")
        shapes = self.expected_shapes()
        dtypes = {"bf16": None, "fp8": (torch.float8_e4m3fn,), "fp4": (torch.int8, torch.uint8)}[self.fmt]
        for name, shape in shapes.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"{where}: format {self.fmt} needs '{name}' of shape {list(shape)}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: '{name}' has shape {list(t.shape)}, expected {list(shape)}")
            if name.startswith("w") and dtypes is not None and t.dtype not in dtypes:
                raise ValueError(f"{where}: '{name}' has dtype {t.dtype}, format {self.fmt} needs {dtypes[0]}")
            if name.startswith("w") and dtypes is None and not t.dtype.is_floating_point:
                raise ValueError(f"{where}: '{name}' has dtype {t.dtype}, format bf16 needs a float dtype")

    def select(self, experts) -> "ExpertWeights":
        """The experts with these global ids (a slice or index tensor of ids), in that order, in the same format.
        The result holds positions 0..n-1 (ids None), as expert parallelism's local experts do."""
        if self.ids is not None:       # a partial stack: global id -> position
            pos = {e: j for j, e in enumerate(self.ids)}
            wanted = list(range(max(self.ids, default=-1) + 1)[experts]) \
                if isinstance(experts, slice) else [int(e) for e in torch.as_tensor(experts).reshape(-1)]
            missing = [e for e in wanted if e not in pos]
            if missing:
                raise ValueError(f"experts {missing} were not loaded (this stack holds experts {list(self.ids)}; "
                                 "see keep_expert)")
            experts = torch.tensor([pos[e] for e in wanted], dtype=torch.int64, device=self.w1.device)
        pick = lambda t: None if t is None else t[experts]  # noqa: E731
        return ExpertWeights(self.fmt, pick(self.w1), pick(self.w2), pick(self.w3), pick(self.s1), pick(self.s2),
                             pick(self.s3), self.scale_fmt)


def expert_linear(x: torch.Tensor, ew: ExpertWeights, which: str, e: int) -> torch.Tensor:
    """x [M, K] @ W_e^T for weight `which` (w1/w2/w3) of expert e, batch-invariant; output in x's dtype.
    Quantised formats quantise x to FP8 (blocks of 128) first, as fp8_linear/fp4_linear do."""
    w, s = getattr(ew, which)[e], getattr(ew, "s" + which[1])
    if ew.fmt == "bf16":
        return linear_f32(x, w).to(x.dtype)
    xq, xs = quant_fp8(x, FP8_LINEAR_BLOCK, ew.scale_fmt)
    xd = dequant_fp8(xq, xs, FP8_LINEAR_BLOCK)
    wd = dequant_fp8_weight(w, s[e]) if ew.fmt == "fp8" else dequant_fp4_weight(w, s[e])
    return linear_f32(xd, wd).to(x.dtype)


def expert_forward(x: torch.Tensor, ew: ExpertWeights, e: int, weight: torch.Tensor | None,
                   swiglu_limit: float) -> torch.Tensor:
    """One SwiGLU expert on rows x [M, D]; weight [M] float32 routing weights or None (shared expert)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = expert_linear(x, ew, "w1", e).to(cd)
    u = expert_linear(x, ew, "w3", e).to(cd)
    if swiglu_limit > 0:
        u = u.clamp(-swiglu_limit, swiglu_limit)
        g = g.clamp(max=swiglu_limit)
    h = f64(F.silu, g) * u
    if weight is not None:
        h = weight.to(cd).unsqueeze(-1) * h
    return expert_linear(h.to(x.dtype), ew, "w2", e)


def moe_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
              input_ids: torch.Tensor | None, topk: int, score_func: str = "sqrtsoftplus",
              route_scale: float = 1.0):
    """Router. x: [T, D]; gate_weight: [E, D]; bias: float32 [E] or None; tid2eid: [V, K] int (hash layers) or
    None; input_ids: [T] int (required when tid2eid is given); topk: K.

    s = score_func(x.float() @ W.float()^T) with sqrtsoftplus = sqrt(softplus(.)), sigmoid or softmax.
    Selection: top-k of s + bias, or idx = tid2eid[input_ids] on hash layers. Weights use the UNBIASED scores:
    w = gather(s, idx), normalised to sum 1 (not for softmax), times route_scale.
    Returns (weights float32 [T, K], idx int64 [T, K])."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = linear_f32(x.to(cd), gate_weight)
    if score_func == "softmax":
        scores = f64(torch.softmax, logits, -1)
    elif score_func == "sigmoid":
        scores = f64(torch.sigmoid, logits)
    elif score_func == "sqrtsoftplus":
        scores = f64(lambda t: F.softplus(t).sqrt(), logits)
    else:
        raise ValueError(f"unknown score_func {score_func!r} (sqrtsoftplus, sigmoid or softmax)")
    if tid2eid is not None:
        idx = tid2eid[input_ids.long()].long()
    else:
        biased = scores if bias is None else scores + bias.to(cd)
        idx = biased.topk(topk, dim=-1).indices
    w = scores.gather(1, idx)
    if score_func != "softmax":
        w = w / w.sum(-1, keepdim=True)
    w = w * route_scale
    return w.to(torch.float32 if cd == torch.float32 else cd), idx


def moe_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights,
                shared: ExpertWeights | None = None, swiglu_limit: float = 0.0) -> torch.Tensor:
    """Routed experts plus shared expert with the ordered combine.

    x: [T, D]; idx: [T, K] int expert ids (-1 = no expert for that slot); weights: float32 [T, K];
    experts: ExpertWeights with E experts; shared: ExpertWeights with 1 expert or None.
    Returns [T, D] in x's dtype (see module doc for the exact arithmetic)."""
    t, k = idx.shape
    per_slot = torch.zeros(t, k, x.shape[1], dtype=x.dtype, device=x.device)
    flat = idx.reshape(-1)
    for e in torch.unique(flat[flat >= 0]).tolist():
        rows = (flat == e).nonzero().squeeze(1)                 # slots in (token, k) order
        tok = rows // k
        per_slot.view(t * k, -1)[rows] = expert_forward(x[tok], experts, e, weights.reshape(-1)[rows],
                                                        swiglu_limit)
    return ordered_combine(per_slot, idx, shared_out=None if shared is None else
                           expert_forward(x, shared, 0, None, swiglu_limit))


def ordered_combine(per_slot: torch.Tensor, idx: torch.Tensor, shared_out: torch.Tensor | None) -> torch.Tensor:
    """out[t] = cast(float(shared[t]) + sum_k float(y[t, k]) over valid slots), sequential in k, fp32."""
    cd = torch.float64 if per_slot.dtype == torch.float64 else torch.float32
    acc = torch.zeros(per_slot.shape[0], per_slot.shape[2], dtype=cd, device=per_slot.device)
    if shared_out is not None:
        acc += shared_out.to(cd)
    for j in range(idx.shape[1]):
        acc += torch.where((idx[:, j] >= 0).unsqueeze(-1), per_slot[:, j].to(cd), 0)
    return acc.to(per_slot.dtype)
