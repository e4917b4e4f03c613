"""Comparing a provider's outputs with the reference's: error metrics and the pass/fail rule of the op's tolerance.

Float outputs: max abs / max rel error, the fraction of elements outside atol + rtol*|ref| (the mismatch
fraction), and DeepSeek's similarity 1 - calc_diff (calc_diff = 1 - 2*sum(x*y) / sum(x*x + y*y), in float64).
Quantised outputs (float8, packed int8) and integer outputs are compared bit for bit. Top-k index sets are compared
tie-aware against the reference's scores.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from dsv4_portable.registry import Tolerance


@dataclasses.dataclass
class Comparison:
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch_frac: float = 0.0
    similarity: float = 1.0
    message: str = ""


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so -0.0 != 0.0 and NaN == NaN compare as stored."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bitwise_equal(a: tuple, b: tuple) -> bool:
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    x, y = out.double().flatten(), ref.double().flatten()
    fin = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[fin], y[fin]
    denom = (x * x + y * y).sum().item()
    return 1.0 if denom == 0 else 2 * (x * y).sum().item() / denom


def _is_exact_kind(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or t.element_size() == 1     # ints, float8, e8m0


def compare_tensor(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance, k: int | None, name: str) -> Comparison:
    out, ref = out.detach().cpu(), ref.detach().cpu()
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(False, math.inf, math.inf, 1.0, 0.0, f"{name}: shape {list(out.shape)}, reference "
                                                                f"{list(ref.shape)}")
    if tol.kind == "exact" or _is_exact_kind(ref):
        if out.dtype != ref.dtype and not (out.is_floating_point() and ref.dtype == torch.float64):
            return Comparison(False, message=f"{name}: dtype {out.dtype}, reference {ref.dtype}")
        same = bits(out) == bits(ref) if out.dtype == ref.dtype else out.double() == ref
        frac = 1.0 - same.double().mean().item() if same.numel() else 0.0
        c = _float_metrics(out, ref) if ref.is_floating_point() and ref.element_size() > 1 else Comparison(True)
        c.mismatch_frac, c.ok = frac, frac == 0.0
        if not c.ok:
            first = (~same).nonzero()[0].tolist()
            c.message = f"{name}: {frac:.2%} of elements differ bitwise, first at {first}"
        return c
    c = _float_metrics(out, ref)
    o, r = out.double(), ref.double()
    fin = torch.isfinite(r)
    if torch.isnan(o[fin]).any() or not torch.equal(o[~fin].nan_to_num(), r[~fin].nan_to_num()):
        c.ok, c.message = False, f"{name}: non-finite values differ from the reference"
        return c
    atol = tol.atol + (tol.atol_per_sqrt_k * math.sqrt(k) if k else 0.0)
    if tol.kind == "similarity":
        c.ok = 1.0 - c.similarity <= tol.max_diff
    else:
        bad = ((o[fin] - r[fin]).abs() > atol + tol.rtol * r[fin].abs())
        c.mismatch_frac = bad.double().mean().item() if bad.numel() else 0.0
        c.ok = c.mismatch_frac <= tol.max_mismatch
    if not c.ok:
        c.message = (f"{name}: {c.mismatch_frac:.3%} of elements outside atol {atol:.3g} + rtol {tol.rtol:g}*|ref| "
                     f"(allowed {tol.max_mismatch:g}); max abs {c.max_abs:.3g}, similarity {c.similarity:.8f}")
    return c


def _float_metrics(out: torch.Tensor, ref: torch.Tensor) -> Comparison:
    o, r = out.double(), ref.double()
    fin = torch.isfinite(o) & torch.isfinite(r)
    d = (o[fin] - r[fin]).abs()
    max_abs = d.max().item() if d.numel() else 0.0
    max_rel = (d / r[fin].abs().clamp_min(1e-30)).max().item() if d.numel() else 0.0
    return Comparison(True, max_abs, max_rel, 0.0, similarity(o, r))


def compare_topk_sets(out: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, name: str,
                      tol: Tolerance | None = None) -> Comparison:
    """Index rows [..., K] with -1 padding, judged against the reference's scores [..., N] (-inf = invisible).

    A row passes when it is a valid top-k set: as many valid indices as the reference row, all distinct and
    visible, and none beaten by an unselected visible entry, i.e. min(selected scores) >= max(unselected scores)
    - eps. Any member of a tie may be chosen and order is free. eps = tol.atol + tol.rtol * max|score| of the row
    (0 by default: exact ties only; a provider that computes the scores in lower precision may state a margin).
    """
    out, ref, scores = out.cpu().long(), ref.cpu().long(), scores.cpu().double()
    if out.shape != ref.shape:
        return Comparison(False, message=f"{name}: shape {list(out.shape)}, reference {list(ref.shape)}")
    o2, r2, s2 = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), scores.reshape(-1, scores.shape[-1])
    n = s2.shape[1]
    bad, first, why = 0, None, ""
    for i in range(o2.shape[0]):
        ov, rv = o2[i][o2[i] >= 0], r2[i][r2[i] >= 0]
        row = s2[i]
        if ov.numel() != rv.numel():
            problem = f"{ov.numel()} valid indices, reference {rv.numel()}"
        elif ov.unique().numel() != ov.numel():
            problem = "repeated index"
        elif bool((ov >= n).any()) or bool(torch.isinf(row[ov]).any()):
            problem = "an invisible or out-of-range index"
        else:
            rest = torch.ones(n, dtype=torch.bool)
            rest[ov] = False
            rest &= torch.isfinite(row)
            finite = row[torch.isfinite(row)]
            eps = 0.0 if tol is None else tol.atol + tol.rtol * (finite.abs().max().item() if finite.numel() else 0.0)
            lowest = row[ov].min().item() if ov.numel() else math.inf
            beaten = rest.any() and row[rest].max().item() > lowest + eps
            problem = f"selected score {lowest:.6g} < unselected {row[rest].max().item():.6g}" if beaten else ""
        if problem:
            bad += 1
            if first is None:
                first, why = i, problem
    frac = bad / max(1, o2.shape[0])
    msg = "" if not bad else (f"{name}: {bad} of {o2.shape[0]} rows are not a valid top-k set (first row {first}: "
                              f"{why}; {sorted(o2[first][o2[first] >= 0].tolist())} vs reference "
                              f"{sorted(r2[first][r2[first] >= 0].tolist())})")
    return Comparison(bad == 0, 0.0, 0.0, frac, 1.0 - frac, msg)
