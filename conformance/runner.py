"""Run conformance cases: one provider of one backend against the reference computed on CPU.

For each case and provider: the case's arguments are built on CPU from its seed, moved to the backend's device,
run through the provider twice (bitwise determinism), and compared with the reference computed on CPU, in float64
for float32 cases where the op allows it (bf16 cases, the quantisers and the stateful compressor keep their own
dtype: their contract includes the intermediate roundings, or is a same-recipe bit pattern). Row-wise ops are also
run on batch element 0 alone (batch invariance). A provider that declines a case through supports() yields a "skip"
record with its reasons; it is never counted as a pass.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
import time
from typing import Callable, Iterable

import torch

from dsv4_portable import __version__, reference as ref
from dsv4_portable.reference.moe import ExpertWeights
from dsv4_portable.registry import Backend, get_op

from .cases import Case
from .metrics import Comparison, bitwise_equal, compare_tensor, compare_topk_sets
from .records import CaseRecord


# ----------------------------------------------------------------------------------------------- environment
def versions() -> dict[str, str]:
    out = {"dsv4_portable": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("triton", "flash_mla", "deep_gemm", "sgl-flash-mla", "sgl-deep-gemm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)       # metadata only: never imports the package
        except importlib.metadata.PackageNotFoundError:
            pass
    npu = sys.modules.get("torch_npu")                        # only if the ascend backend already imported it
    if npu is not None:
        out["torch_npu"] = getattr(npu, "__version__", "?")
    return out


def device_name(backend: Backend) -> str:
    sim = backend.simulated()
    if sim:
        return f"cpu ({backend.name} simulated: {sim})"
    if backend.device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    if backend.device_type == "npu":
        npu = getattr(torch, "npu", None)
        try:
            return f"{npu.get_device_name()} (SoC {sys.modules['torch_npu'].npu.get_soc_version()})"
        except Exception:   # older torch_npu builds lack one of the two
            return "npu"
    return f"cpu ({platform.machine()})"


# ----------------------------------------------------------------------------------------------- tensors
def _map(obj, fn):
    """Apply fn to every tensor in an argument tree (tuples, lists, ExpertWeights)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, ExpertWeights):
        return dataclasses.replace(obj, **{f.name: _map(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.name != "fmt"
                                           and f.name != "scale_fmt"})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    return obj


def _to64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() and t.element_size() > 1 and t.dtype != torch.float64 else t


def _tree(obj) -> list[torch.Tensor]:
    out = []
    _map(obj, lambda t: out.append(t) or t)
    return out


def _shapes(args: tuple, op) -> tuple[dict, dict]:
    names = op.params
    shapes, dtypes = {}, {}
    for i, a in enumerate(args):
        name = names[i] if i < len(names) else f"arg{i}"
        if isinstance(a, torch.Tensor):
            shapes[name], dtypes[name] = list(a.shape), str(a.dtype).replace("torch.", "")
        elif isinstance(a, ExpertWeights):
            shapes[name], dtypes[name] = {"w1": list(a.w1.shape), "E": a.num_experts}, a.fmt
        elif a is not None and not isinstance(a, (float, int, str, bool)):
            shapes[name] = repr(a)
    return shapes, dtypes


# ----------------------------------------------------------------------------------------------- one case
def _compare(case: Case, out: tuple, expect: tuple, args_cpu: tuple) -> Comparison:
    op = get_op(case.op)
    tol = op.tolerance(case.dtype)
    if case.op == "indexer_topk":
        q, k, w, visible = args_cpu[:4]
        scores = ref.indexer_scores(q.double(), k.double(), w.double())
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.arange(n) >= visible.unsqueeze(-1).long(), float("-inf"))
        return compare_topk_sets(out[0], expect[0], scores, "idx", tol)
    if len(out) != len(expect):
        return Comparison(False, message=f"{len(out)} outputs, reference has {len(expect)}")
    worst = Comparison(True, similarity=1.0)
    for i, (o, e) in enumerate(zip(out, expect)):
        c = compare_tensor(o, e, tol, case.k, f"output {i}")
        worst.max_abs, worst.max_rel = max(worst.max_abs, c.max_abs), max(worst.max_rel, c.max_rel)
        worst.mismatch_frac = max(worst.mismatch_frac, c.mismatch_frac)
        worst.similarity = min(worst.similarity, c.similarity)
        if not c.ok and worst.ok:
            worst.ok, worst.message = False, c.message
    return worst


def _vendor_ops_called() -> list[str]:
    from dsv4_portable.backends.ascend import vendor_ops
    return vendor_ops.take_called()


def run_case(case: Case, provider: str, backend: Backend, device: str, vers: dict) -> CaseRecord:
    op = get_op(case.op)
    t0 = time.perf_counter()
    args_cpu = case.args()
    shapes, dtypes = _shapes(args_cpu, op)
    tdev = backend.torch_device()
    args = _map(args_cpu, lambda t: t.to(tdev))
    rows = op.explain(*case.first_call_args(args), backend=backend)
    skipped = {p: r for p, status, r in rows if status == "skipped"}
    tol = op.tolerance(case.dtype)
    # float64 only for float32 cases: a bf16 case's contract includes its intermediate bf16 roundings (e.g. the
    # SwiGLU output before an FP8 re-quantisation), which a float64 run would not reproduce.
    use64 = case.fp64_reference and tol.kind != "exact" and case.dtype == torch.float32
    tol_rec = {**dataclasses.asdict(tol), "reference_dtype": "float64" if use64 else str(case.dtype).split(".")[-1]}
    rec = CaseRecord("op", case.op, case.case_id, case.seed, provider, skipped, device, vers, shapes, dtypes,
                     tolerance=tol_rec)
    try:
        p = op.provider(provider, backend.device_type)
    except KeyError:
        p = None
    reasons = ([f"{case.op} has no provider '{provider}' on device type {backend.device_type}"] if p is None
               else p.availability() or p.supports(*case.first_call_args(args)))
    if reasons:
        rec.status, rec.message = "skip", "; ".join(reasons)
        rec.duration_s = time.perf_counter() - t0
        return rec

    def call(*a):
        return op.run(provider, *a, device_type=backend.device_type)      # validates the arguments first

    def on_cpu(out):
        return tuple(o.detach().cpu() for o in out)

    vendor_called = _vendor_ops_called if backend.device_type == "npu" else list
    vendor_called()                                      # forget what earlier cases called
    try:
        expect = case.execute(lambda *a: op.run("reference", *a), _map(args_cpu, _to64) if use64 else args_cpu)
        if case.check_reference is not None:
            problem = case.check_reference(args_cpu, expect)
            if problem:
                raise AssertionError(f"case precondition: {problem}")
        out = on_cpu(case.execute(call, args))
        again = on_cpu(case.execute(call, _map(args_cpu, lambda t: t.to(tdev))))
        rec.deterministic = bitwise_equal(out, again)
        if case.slice0 is not None:
            one = on_cpu(case.execute(call, _map(case.slice0(args_cpu), lambda t: t.to(tdev))))
            rec.batch_invariant = bitwise_equal(one, tuple(o[:1] for o in out))
        c = _compare(case, out, expect, args_cpu)
    except Exception as e:   # a provider that raises fails its case (strict: no fallback), with the error text
        rec.status, rec.message = "error", f"{type(e).__name__}: {e}"
        rec.duration_s = time.perf_counter() - t0
        return rec
    rec.max_abs, rec.max_rel, rec.mismatch_frac, rec.similarity = c.max_abs, c.max_rel, c.mismatch_frac, c.similarity
    rec.vendor_ops = vendor_called() or None
    problems = [c.message] if not c.ok else []
    if not rec.deterministic:
        problems.append("two runs of the same input differ bitwise")
    notes = []
    if rec.batch_invariant is False:
        if p.batch_invariant:
            problems.append("batch element 0 alone differs bitwise from its row in the batch")
        else:
            notes.append("batch element 0 alone differs bitwise from its row in the batch (this provider does not "
                         "claim batch invariance)")
    rec.status = "fail" if problems else "pass"
    rec.message = "; ".join(problems + notes)
    rec.duration_s = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------------------------- many cases
def providers_for(case: Case, backend: Backend, policy: str) -> list[str]:
    """'chosen': what dispatch would pick for this call; 'all': every provider of the backend's device type plus
    the reference; otherwise one provider by name."""
    op = get_op(case.op)
    own = [p.name for p in op.candidates(backend)]
    if policy == "all":
        return own
    if policy == "chosen":
        args = case.first_call_args(_map(case.args(), lambda t: t.to(backend.torch_device())))
        return [next((p for p, status, _ in op.explain(*args, backend=backend) if status == "chosen"), "reference")]
    return [policy]


def run_cases(cases: Iterable[Case], backend: Backend, policy: str = "chosen",
              progress: Callable[[str], None] = print) -> list[CaseRecord]:
    cases = list(cases)
    dev, vers = device_name(backend), versions()
    records = []
    for i, case in enumerate(cases, 1):
        for provider in providers_for(case, backend, policy):
            r = run_case(case, provider, backend, dev, vers)
            records.append(r)
            extra = f"  {r.message[:160]}" if r.status != "pass" else ""
            progress(f"[{i}/{len(cases)}] {case.case_id:48s} {provider:12s} {r.status:5s} {r.duration_s:6.2f} s"
                     f"{extra}")
    return records
