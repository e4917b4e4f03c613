"""Conformance section "vendor op vs spec": on an NPU host, each real vendor op against this spec on seeded inputs.

A vendor reads these records to see at once where a CANN op and our understanding of it differ (signature,
layout, or numerics). Every case runs against each namespace where the op is present on the host (torch_npu,
torch.ops.npu, custom, _C_ascend, ...), so a record names exactly which build was checked; ops the backend resolved
that no case covers get a "skip" record saying so. Outputs the op allocates but leaves undefined (spec
placeholders) are compared by shape and dtype only. On CPU the same code runs against any module of ops (the
tests use the stand-in and deliberately deviating copies), so the comparison itself is tested.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Callable

import torch

from ..metrics import compare_tensor
from ..records import CaseRecord
from ..runner import versions
from . import SPEC_OPS
from .contract import active_soc, is_placeholder, soc_family, use_soc
from dsv4_portable.backends.ascend import vendor_ops
from dsv4_portable.registry import Tolerance

BF16 = torch.bfloat16
BF16_TOL = Tolerance("allclose", 1e-2, 1.6e-2, source="bf16 output rounding")
F32_TOL = Tolerance("allclose", 1e-5, 1e-4, source="fp32 accumulation order")
HF32_TOL = Tolerance("allclose", 4e-3, 4e-3, max_mismatch=0.02, source="vendor test of npu_hc_pre: 4e-3, >=98% pass")
INT8_TOL = Tolerance("allclose", 1.0, 0.0, max_mismatch=0.01, source="int8 rounding of ties: 1 step on <= 1%")
SETS = None                                  # top-k indices: compared as sets per row


@dataclasses.dataclass
class VendorCase:
    op: str                                  # spec op name
    case_id: str
    make: Callable[[torch.Generator], tuple[tuple, dict]]      # seeded (args, kwargs) on CPU
    tol: Tolerance | tuple[Tolerance, ...] | None      # one for all outputs, one per output, or SETS
    chips: tuple[str, ...] = ("A2", "A3", "950")
    namespaces: tuple[str, ...] | None = None  # default: every namespace the spec op lives in
    post: Callable[[list], list] | None = None  # outputs -> the tensors to compare (e.g. int8 as float)
    # the op needs a metadata tensor from its own build: make() then returns (args, kwargs, metadata kwargs) and
    # the metadata op of the same namespace (real or spec) fills kwargs["metadata"]
    metadata_op: str | None = None
    # a stateful case: run(op, args, kwargs) calls the op (real or spec) several times and returns what to compare
    run: Callable | None = None


def _r(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _cases() -> list[VendorCase]:
    r = _r

    def rope(g):                             # DSV4 layout: SBND tokens x heads with S11D tables
        ang = torch.rand(10, 1, 1, 32, generator=g) * 6
        cos, sin = (f(ang).repeat_interleave(2, -1) for f in (torch.cos, torch.sin))
        return (r(g, 10, 1, 4, 64), cos, sin), {"rotary_mode": "interleave"}

    def gating(norm_type, hashed=False):
        def make(g):
            kw = {"norm_type": norm_type, "routed_scaling_factor": 1.5}
            if hashed:
                kw.update(input_ids=torch.randint(0, 100, (16,), generator=g),
                          tid2eid=torch.randint(0, 64, (100, 6), generator=g, dtype=torch.int32))
            else:
                kw["bias"] = r(g, 64, scale=0.1)
            return (r(g, 16, 64), 6), kw
        return make

    def indexer_tnd_paged(g):                # the provider's layout: one query row per sequence, paged keys
        rows, bs = 3, 16
        keys = r(g, 4, bs, 1, 128, dtype=BF16)
        return (r(g, rows, 8, 128, dtype=BF16), keys, r(g, rows, 8, dtype=BF16).abs()), {
            "actual_seq_lengths_query": torch.arange(1, rows + 1, dtype=torch.int32),
            "actual_seq_lengths_key": torch.tensor([40, 17, 0], dtype=torch.int32),
            "block_table": torch.tensor([[0, 1, 2], [0, 1, 2], [3, 3, 3]], dtype=torch.int32),
            "layout_query": "TND", "layout_key": "PA_BSND", "sparse_count": 8, "sparse_mode": 0}

    def gmm(transposed):
        def make(g):
            w = r(g, 4, 128, 256, dtype=BF16, scale=0.05)          # [E, N, K]
            return ([r(g, 20, 256, dtype=BF16)], [w.transpose(1, 2) if transposed else w.transpose(1, 2).contiguous()]
                    ), {"group_list": torch.tensor([5, 0, 9, 6]), "split_item": 3, "group_type": 0,
                        "group_list_type": 1}
        return make

    def int8_qmm(g):
        from dsv4_portable.reference.quant import quant_int8_weight
        w, ws = quant_int8_weight(r(g, 96, 256, scale=0.05))
        xq = torch.randint(-127, 128, (8, 256), generator=g, dtype=torch.int8)
        return (xq, w.t(), ws.float()), {"pertoken_scale": torch.rand(8, generator=g) * 0.02 + 1e-3,
                                         "output_dtype": BF16}

    def fp8_qmm(g):
        from dsv4_portable.reference.quant import quant_fp8, quant_fp8_weight
        xq, xs = quant_fp8(r(g, 8, 256, dtype=BF16), 128)
        w, ws = quant_fp8_weight(r(g, 128, 256, scale=0.05))
        return (xq, w.t(), ws.float().t()), {"pertoken_scale": xs.float(), "output_dtype": BF16,
                                             "group_sizes": [1, 128, 128]}

    def hc_pre(kw):
        def make(g):
            args = (r(g, 3, 4, 4096, dtype=BF16), r(g, 24, 16384, scale=0.01), torch.tensor([0.5, 1.0, 2.0]),
                    r(g, 24, scale=0.3))
            if kw:
                return args, {"hc_mult": 4, "hc_sinkhorn_iters": 20, "norm_eps": 1e-6, "hc_eps": 1e-6}
            return args + (4, 20, 1e-6, 1e-6), {}
        return make

    def hc_post(g):                           # an asymmetric comb catches a transposed application
        comb = torch.rand(1, 3, 4, 4, generator=g)
        comb[..., 0, 3] += 2.0
        return (r(g, 1, 3, 4096, dtype=BF16), r(g, 1, 3, 4, 4096, dtype=BF16), torch.rand(1, 3, 4, generator=g),
                comb), {}

    def mx_gmm(g):                           # W4A8 MX (950): DeepSeek FP8 activations, checkpoint FP4 experts
        from dsv4_portable.reference.quant import float_to_e8m0, quant_fp4_weight, quant_fp8
        m, k, n, e = 12, 256, 128, 3
        xq, xs = quant_fp8(r(g, m, k, dtype=BF16), 128)
        xs = float_to_e8m0(xs).view(torch.uint8).repeat_interleave(4, -1).reshape(m, k // 64, 2)
        pairs = [quant_fp4_weight(r(g, n, k, scale=0.05)) for _ in range(e)]
        w = torch.stack([p[0] for p in pairs]).view(torch.uint8)                          # [E, N, K/2]
        ws = float_to_e8m0(torch.stack([p[1] for p in pairs])).view(torch.uint8)          # [E, N, K/32]
        return ([xq], [w.transpose(1, 2)]), {
            "antiquant_scale": [ws.reshape(e, n, k // 64, 2).transpose(1, 2)], "per_token_scale": [xs],
            "per_token_scale_dtype": torch.float8_e8m0fnu, "group_list": torch.tensor([5, 0, 7]), "split_item": 2,
            "group_type": 0, "group_list_type": 1, "x_dtype": torch.float8_e4m3fn, "weight_dtype": 296,
            "output_dtype": BF16}

    cases = [
        VendorCase("npu_grouped_matmul", "grouped_matmul/w4a8_mx", mx_gmm, BF16_TOL, chips=("950",)),
        VendorCase("npu_rms_norm", "rms_norm/bf16", lambda g: ((r(g, 4, 7, 512, dtype=BF16), r(g, 512, dtype=BF16)),
                                                             {"epsilon": 1e-6}), BF16_TOL),
        VendorCase("npu_rotary_mul", "rotary_mul/interleave_sbnd", rope, F32_TOL),
        VendorCase("npu_hc_post", "hc_post/asymmetric", hc_post, BF16_TOL),
        VendorCase("npu_hc_pre_v2", "hc_pre_v2/flash", hc_pre(False), HF32_TOL),
        VendorCase("npu_hc_pre", "hc_pre/flash", hc_pre(True), HF32_TOL, chips=("A3", "950")),
        VendorCase("npu_moe_gating_top_k", "gating/sigmoid", gating(1), F32_TOL, namespaces=("torch_npu", "custom")),
        VendorCase("npu_moe_gating_top_k", "gating/sqrtsoftplus", gating(2), F32_TOL, namespaces=("custom",)),
        VendorCase("npu_moe_gating_top_k", "gating/hash", gating(2, hashed=True), F32_TOL, namespaces=("custom",)),
        VendorCase("moe_gating_top_k_hash", "gating_hash/sqrtsoftplus", gating(2), F32_TOL),
        VendorCase("moe_gating_top_k_hash", "gating_hash/hash", gating(2, hashed=True), F32_TOL),
        VendorCase("npu_moe_init_routing_v2", "init_routing/counts", lambda g: (
            (r(g, 16, 256, dtype=BF16), torch.randint(0, 8, (16, 2), generator=g, dtype=torch.int32)),
            {"active_num": 32, "expert_num": 8, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True}),
            F32_TOL),
        VendorCase("npu_grouped_matmul", "grouped_matmul/bf16", gmm(False), BF16_TOL),
        VendorCase("npu_grouped_matmul", "grouped_matmul/bf16_transposed_weight", gmm(True), BF16_TOL),
        VendorCase("npu_lightning_indexer", "lightning_indexer/bsnd_decode", lambda g: (
            (r(g, 2, 1, 8, 128, dtype=BF16), r(g, 2, 40, 1, 128, dtype=BF16), r(g, 2, 1, 8, dtype=BF16).abs()),
            {"actual_seq_lengths_query": torch.ones(2, dtype=torch.int32),
             "actual_seq_lengths_key": torch.tensor([40, 17], dtype=torch.int32), "sparse_count": 8,
             "sparse_mode": 0}), SETS),
        VendorCase("npu_lightning_indexer", "lightning_indexer/tnd_paged_rows", indexer_tnd_paged, SETS),
        VendorCase("npu_dynamic_quant", "dynamic_quant/int8", lambda g: ((r(g, 6, 256, dtype=BF16, scale=3.0),), {}),
                   (INT8_TOL, F32_TOL), chips=("A2", "A3"), post=lambda out: [out[0].float(), out[1]]),
        VendorCase("npu_quant_matmul", "quant_matmul/int8_transposed_x2", int8_qmm, BF16_TOL, chips=("A2", "A3")),
        VendorCase("npu_quant_matmul", "quant_matmul/fp8_blocks", fp8_qmm, BF16_TOL, chips=("950",)),
        VendorCase("npu_format_cast", "format_cast/nd", lambda g: ((r(g, 64, 32, dtype=BF16), 2), {}), F32_TOL),
    ]
    return cases + _extra_cases()


def _extra_cases() -> list[VendorCase]:
    """Cases of the fused attention and compressor ops (their spec modules add them)."""
    from . import attention, compressor
    return attention.VENDOR_CASES() + compressor.VENDOR_CASES()


def _outputs(out) -> list[torch.Tensor]:
    out = out if isinstance(out, (list, tuple)) else [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _to(obj, dev):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, dev) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj


def _spec_op(name: str, namespace: str):
    return next((op for op in SPEC_OPS.values() if op.name == name and namespace in op.namespaces), None)


def _compare(rec: CaseRecord, case: VendorCase, got: list, expect: list) -> None:
    rec.status, rec.message = "pass", ""
    if len(got) != len(expect):
        rec.status, rec.message = "fail", f"{len(got)} outputs, spec has {len(expect)}"
        return
    if case.post is not None:
        flags = [is_placeholder(e) for e in expect]
        got, expect = case.post(got), case.post(expect)
        for e, f in zip(expect, flags):
            if f:
                e._spec_undefined = True
    for i, (o, e) in enumerate(zip(got, expect)):
        if is_placeholder(e):            # allocated by the op, values undefined: shape and dtype only
            if tuple(o.shape) != tuple(e.shape) or o.dtype != e.dtype:
                rec.status, rec.message = "fail", (f"output {i}: {list(o.shape)} {o.dtype}, spec allocates "
                                                   f"{list(e.shape)} {e.dtype} (values undefined)")
            continue
        if case.tol is SETS:             # top-k indices: compare as sets per row
            same = o.shape == e.shape and all(set(a.tolist()) == set(b.tolist()) for a, b in
                                              zip(o.reshape(-1, o.shape[-1]), e.reshape(-1, e.shape[-1])))
            if not same and rec.status == "pass":
                rec.status, rec.message = "fail", f"output {i}: top-k sets differ from the spec"
            continue
        c = compare_tensor(o, e, case.tol[i] if isinstance(case.tol, tuple) else case.tol, None, f"output {i}")
        rec.max_abs = max(rec.max_abs or 0.0, c.max_abs)
        rec.similarity = min(rec.similarity or 1.0, c.similarity)
        if not c.ok and rec.status == "pass":
            rec.status, rec.message = "fail", c.message


def vendor_spec_records(progress: Callable[[str], None] = print, module=None, overrides: dict | None = None,
                        device: str | None = None, only: set[str] | None = None) -> list[CaseRecord]:
    """Run every vendor op against its spec. module: the torch_npu to test (default: the imported one); overrides:
    {"namespace.name": callable} replacing ops (tests); device: where the vendor op runs ("npu" on a real host);
    only: spec op names to check (default: all, and a skip record for each resolved op no case covers)."""
    module = module or sys.modules.get("torch_npu")
    # the extension namespaces (_C_ascend, custom) exist once their modules are imported: the backend's probe
    # imports every installed one (a no-op when the backend already did)
    vendor_ops.load_extensions()
    soc_id = int(module.npu.get_soc_version())
    soc = soc_family(soc_id)
    dev = device or ("cpu" if getattr(module, "__spec_standin__", False) else "npu")
    where = f"{dev} ({soc}, SoC {soc_id})"
    vers = versions()
    records, covered = [], set()
    with use_soc(soc) if active_soc() is None else contextlib.nullcontext():
        for case in _cases():
            spec_namespaces = next((op.namespaces for op in SPEC_OPS.values() if op.name == case.op), ())
            for ns in case.namespaces or spec_namespaces:       # a case for another chip still covers the op
                covered.update({f"{ns}.{case.op}"} | ({f"{ns}.{case.metadata_op}"} if case.metadata_op else set()))
            if soc not in case.chips or (only is not None and case.op not in only):
                continue
            found = False
            for ns in case.namespaces or spec_namespaces:
                key = f"{ns}.{case.op}"
                real = (overrides or {}).get(key) or vendor_ops.lookup(key, module)
                if real is None:
                    continue
                found = True
                records.append(_run(case, key, real, _spec_op(case.op, ns), ns, dev, where, vers, progress))
            if not found:
                rec = CaseRecord("vendor_spec", case.op, f"vendor_spec/{case.case_id}", 7, "-", {}, where, vers, {},
                                 {}, status="skip", message=f"{case.op} is not present on this host in "
                                 + ", ".join(case.namespaces or spec_namespaces))
                records.append(rec)
                progress(f"vendor op vs spec {case.case_id:40s} skip  {rec.message[:120]}")
        if only is None:
            records += _uncovered(covered, where, vers)
    return records


def _run(case, key, real, spec_op, ns, dev, where, vers, progress) -> CaseRecord:
    t0 = time.perf_counter()
    made = case.make(torch.Generator().manual_seed(7))
    args, kwargs = made[0], dict(made[1])
    if case.metadata_op:
        kwargs["__metadata__"] = made[2]
    rec = CaseRecord("vendor_spec", key, f"vendor_spec/{case.case_id}/{ns}", 7, key, {}, where, vers, {}, {},
                     tolerance={} if case.tol is None else {**(case.tol[0] if isinstance(case.tol, tuple)
                                                               else case.tol).__dict__})
    try:
        real_kwargs = _to(kwargs, dev)
        if case.metadata_op:
            meta_kwargs = kwargs.pop("__metadata__")
            real_kwargs.pop("__metadata__")
            kwargs["metadata"] = _spec_op(case.metadata_op, ns).invoke(ns, (), meta_kwargs)
            real_kwargs["metadata"] = vendor_ops.lookup(f"{ns}.{case.metadata_op}")(
                **{**_to(meta_kwargs, dev), "device": dev})
        if case.run is not None:
            expect = _outputs(case.run(lambda *a, **k: spec_op.invoke(ns, a, k), args, kwargs))
            got = [o.cpu() for o in _outputs(case.run(real, _to(args, dev), real_kwargs))]
        else:
            expect = _outputs(spec_op.invoke(ns, args, kwargs))
            got = [o.cpu() for o in _outputs(real(*_to(args, dev), **real_kwargs))]
        _compare(rec, case, got, expect)
    except Exception as e:   # noqa: BLE001  (a signature or layout the real op rejects is itself a finding)
        rec.status, rec.message = "error", f"{type(e).__name__}: {e}"
    rec.duration_s = time.perf_counter() - t0
    progress(f"vendor op vs spec {case.case_id + '/' + ns:40s} {rec.status} {rec.message[:120]}")
    return rec


def _uncovered(covered: set, where: str, vers: dict) -> list[CaseRecord]:
    """A skip record for every vendor op the backend resolved that no case above checked."""
    out = []
    for cands, key in sorted(vendor_ops.resolved_ops().items()):
        if cands.startswith("extension ") or key.startswith("not found") or key in covered:
            continue
        out.append(CaseRecord("vendor_spec", key, f"vendor_spec/uncovered/{key}", 0, key, {}, where, vers, {}, {},
                              status="skip", message=f"the backend resolved {key} ({cands}); no vendor-check case "
                                                     "covers it yet"))
    return out
