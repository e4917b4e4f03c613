"""Conformance section "vendor op vs spec": on an NPU host, each real vendor op against this spec on seeded inputs.

A vendor reads these records to see at once where a CANN op and our understanding of it differ (signature,
layout, or numerics). On CPU the same code runs against any module of ops (the tests use the stand-in and a
deliberately perturbed copy), so the comparison itself is tested.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..metrics import compare_tensor
from ..records import CaseRecord
from ..runner import versions
from . import SPEC_OPS
from .contract import active_soc, use_soc
from dsv4_portable.registry import Tolerance

BF16 = torch.bfloat16
BF16_TOL = Tolerance("allclose", 1e-2, 1.6e-2, source="bf16 output rounding")
F32_TOL = Tolerance("allclose", 1e-5, 1e-4, source="fp32 accumulation order")
HF32_TOL = Tolerance("allclose", 4e-3, 4e-3, max_mismatch=0.02, source="vendor test of npu_hc_pre: 4e-3, >=98% pass")


def _cases(soc: str) -> list[tuple[str, str, Callable[[torch.Generator], tuple[tuple, dict]], Tolerance]]:
    """(spec key, case id, seeded (args, kwargs) on CPU, tolerance)."""
    def r(g, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    cases = [
        ("torch_npu.npu_rms_norm", "rms_norm/bf16", lambda g: ((r(g, 4, 7, 512, dtype=BF16), r(g, 512, dtype=BF16)),
                                                              {"epsilon": 1e-6}), BF16_TOL),
        ("torch_npu.npu_rotary_mul", "rotary_mul/interleave", lambda g: (
            (r(g, 2, 5, 4, 64, dtype=BF16), r(g, 1, 5, 1, 64, dtype=BF16), r(g, 1, 5, 1, 64, dtype=BF16)),
            {"rotary_mode": "interleave"}), BF16_TOL),
        ("_C_ascend.npu_hc_post", "hc_post/asymmetric", lambda g: (
            (r(g, 3, 4096, dtype=BF16), r(g, 3, 4, 4096, dtype=BF16), torch.rand(3, 4, generator=g),
             torch.rand(3, 4, 4, generator=g)), {}), BF16_TOL),
        ("_C_ascend.npu_hc_pre_v2", "hc_pre_v2/flash", lambda g: (
            (r(g, 3, 4, 4096, dtype=BF16), r(g, 24, 16384, scale=0.01), torch.tensor([0.5, 1.0, 2.0]),
             r(g, 24, scale=0.3), 4, 20, 1e-6, 1e-6), {}), HF32_TOL),
        ("torch_npu.npu_moe_gating_top_k", "gating/sqrtsoftplus", lambda g: (
            (r(g, 16, 64), 6), {"bias": r(g, 64, scale=0.1), "norm_type": 2, "routed_scaling_factor": 1.5}), F32_TOL),
        ("torch_npu.npu_moe_gating_top_k", "gating/hash", lambda g: (
            (r(g, 16, 64), 6), {"input_ids": torch.randint(0, 100, (16,), generator=g),
                                "tid2eid": torch.randint(0, 64, (100, 6), generator=g, dtype=torch.int32),
                                "norm_type": 2}), F32_TOL),
        ("torch_npu.npu_moe_init_routing_v2", "init_routing/counts", lambda g: (
            (r(g, 16, 256, dtype=BF16), torch.randint(0, 8, (16, 2), generator=g, dtype=torch.int32)),
            {"active_num": 32, "expert_num": 8, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True}),
         F32_TOL),
        ("torch_npu.npu_grouped_matmul", "grouped_matmul/bf16", lambda g: (
            ([r(g, 20, 256, dtype=BF16)], [r(g, 4, 256, 128, dtype=BF16, scale=0.05)]),
            {"group_list": torch.tensor([5, 0, 9, 6]), "split_item": 3, "group_type": 0, "group_list_type": 1}),
         BF16_TOL),
        ("torch_npu.npu_lightning_indexer", "lightning_indexer/decode", lambda g: (
            (r(g, 2, 1, 8, 128, dtype=BF16), r(g, 2, 40, 1, 128, dtype=BF16), r(g, 2, 1, 8).abs()),
            {"actual_seq_lengths_query": torch.ones(2, dtype=torch.int32),
             "actual_seq_lengths_key": torch.tensor([40, 17], dtype=torch.int32), "sparse_count": 8,
             "sparse_mode": 0}), None),
    ]
    if soc == "950":
        from dsv4_portable.reference.quant import quant_fp8, quant_fp8_weight
        def qmm(g):
            xq, xs = quant_fp8(r(g, 8, 256, dtype=BF16), 128)
            w, ws = quant_fp8_weight(r(g, 128, 256, scale=0.05))
            return (xq, w.t().contiguous(), ws.t().contiguous()), {"pertoken_scale": xs, "output_dtype": BF16,
                                                                    "group_sizes": [1, 128, 128]}
        cases.append(("torch_npu.npu_quant_matmul", "quant_matmul/fp8_blocks", qmm, BF16_TOL))
    return cases


def _real_op(module, key: str):
    ns, name = key.split(".", 1)
    if ns == "torch_npu":
        return getattr(module, name, None)
    return getattr(getattr(torch.ops, ns, None), name, None)


def _outputs(out) -> list[torch.Tensor]:
    out = out if isinstance(out, (list, tuple)) else [out]
    return [o for o in out if isinstance(o, torch.Tensor) and o.numel()]


def vendor_spec_records(progress: Callable[[str], None] = print, module=None, overrides: dict | None = None,
                        device: str | None = None) -> list[CaseRecord]:
    """Run every vendor op against its spec. module: the torch_npu to test (default: the imported one); overrides:
    {spec key: callable} replacing ops (tests); device: where the vendor op runs ("npu" on a real host)."""
    import sys
    module = module or sys.modules.get("torch_npu")
    soc_id = int(module.npu.get_soc_version())
    from .contract import soc_family
    soc = soc_family(soc_id)
    dev = device or ("cpu" if getattr(module, "__spec_standin__", False) else "npu")
    vers = versions()
    records = []
    with use_soc(soc) if active_soc() is None else _nullcontext():
        for key, case_id, make, tol in _cases(soc):
            t0 = time.perf_counter()
            args, kwargs = make(torch.Generator().manual_seed(7))
            rec = CaseRecord("vendor_spec", key, f"vendor_spec/{case_id}", 7, key, {}, f"{dev} ({soc}, SoC {soc_id})",
                             vers, {}, {}, tolerance={} if tol is None else {**tol.__dict__})
            real = (overrides or {}).get(key) or _real_op(module, key)
            if real is None:
                rec.status, rec.message = "skip", f"{key} is not present on this host"
            else:
                try:
                    expect = _outputs(SPEC_OPS[key](*args, **kwargs))
                    on_dev = [a.to(dev) if isinstance(a, torch.Tensor) else
                              [t.to(dev) for t in a] if isinstance(a, list) else a for a in args]
                    kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                    got = [o.cpu() for o in _outputs(real(*on_dev, **kw_dev))]
                    rec.status, rec.message = "pass", ""
                    if len(got) != len(expect):
                        rec.status, rec.message = "fail", f"{len(got)} outputs, spec has {len(expect)}"
                    for i, (o, e) in enumerate(zip(got, expect)):
                        if tol is None:          # top-k indices: compare as sets per row
                            same = all(set(a.tolist()) == set(b.tolist()) for a, b in
                                       zip(o.reshape(-1, o.shape[-1]), e.reshape(-1, e.shape[-1])))
                            if not same:
                                rec.status, rec.message = "fail", f"output {i}: top-k sets differ from the spec"
                            continue
                        c = compare_tensor(o, e, tol, None, f"output {i}")
                        rec.max_abs = max(rec.max_abs or 0.0, c.max_abs)
                        rec.similarity = min(rec.similarity or 1.0, c.similarity)
                        if not c.ok and rec.status == "pass":
                            rec.status, rec.message = "fail", c.message
                except Exception as e:   # a signature or layout the real op rejects is itself a finding
                    rec.status, rec.message = "error", f"{type(e).__name__}: {e}"
            rec.duration_s = time.perf_counter() - t0
            records.append(rec)
            progress(f"vendor op vs spec {case_id:32s} {rec.status} {rec.message[:120]}")
    return records


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
