"""Offline GPU compile check of the compute providers' Triton kernels (no GPU needed).

The providers are run on `meta` tensors (shapes, no memory) at DeepSeek-V4 sizes while launch.intercept routes
each launch here: the kernel is compiled by triton for a CUDA target (default sm90 = H100/H200) with the same
constexprs, num_warps and num_stages, and the argument specialisation Triton applies at run time (16-byte
aligned pointers, ints divisible by 16). Reported per launch: shared memory, registers and spill bytes (from
the cubin via the cuobjdump bundled with triton), and whether the loads of the main loop were pipelined
(asynchronous copies present in the TTGIR). This catches GPU-only compile errors and gross resource problems
on a CPU-only machine; it says nothing about speed or numerical results on the GPU.

Usage: python -m dsv4_portable.backends.cuda.compile_check [--arch 90] (TRITON_INTERPRET must be unset).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

_TT = {torch.float8_e4m3fn: "fp8e4nv", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
       torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}
SMEM_LIMIT = {90: 232448, 100: 232448}  # bytes of shared memory one block may use (sm90 / sm100)


def _signature(kernel, args, meta):
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    values.update({k: v for k, v in meta.items() if k in names})
    const_idx = set(kernel.constexprs)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if i in const_idx:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    return sig, consts, attrs


def _resource_usage(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    # register spills land in the per-thread stack frame (STACK), LOCAL counts other local arrays
    return {"registers": int(found.get("REG", -1)), "spill_bytes": int(found.get("STACK", 0)) +
            int(found.get("LOCAL", 0))}


def compile_launch(kernel, grid, args, meta, arch: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = _signature(kernel, args, meta)
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ttgir = compiled.asm["ttgir"]
    info = {"kernel": kernel.__name__, "grid": tuple(grid), "shared_bytes": compiled.metadata.shared,
            "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
            "mma": "wgmma" if "warp_group_dot" in ttgir else ("mma" if "tt.dot" in ttgir or "mma" in ttgir else
                                                              "none"),
            **options, **{k: str(v) for k, v in consts.items() if k.startswith("BLOCK")}}
    info.update(_resource_usage(compiled.asm["cubin"]))
    return info


def v4_cases():
    """(label, op name, args) at DeepSeek-V4-Flash sizes, as meta tensors."""
    from dsv4_portable.reference.moe import ExpertWeights
    meta = dict(device="meta")
    bf16, fp8, u8 = torch.bfloat16, torch.float8_e4m3fn, torch.uint8
    cases = []
    for m in (1, 48, 4096):
        cases.append((f"fp8_linear M={m} N=4096 K=4096", "fp8_linear",
                      (torch.empty(m, 4096, dtype=bf16, **meta), torch.empty(4096, 4096, dtype=fp8, **meta),
                       torch.empty(32, 32, dtype=torch.float8_e8m0fnu, **meta))))
    cases.append(("fp8_linear M=4096 fp32 weight scales (Base checkpoints)", "fp8_linear",
                  (torch.empty(4096, 4096, dtype=bf16, **meta), torch.empty(4096, 4096, dtype=fp8, **meta),
                   torch.empty(32, 32, dtype=torch.float32, **meta))))
    for m in (1, 4096):
        cases.append((f"linear bf16 M={m} N=1024 K=4096 (bf16 weight mode)", "linear",
                      (torch.empty(m, 4096, dtype=bf16, **meta), torch.empty(1024, 4096, dtype=bf16, **meta))))
    cases.append(("linear fp32 head M=1 N=129280 K=4096", "linear",
                  (torch.empty(1, 4096, dtype=torch.float32, **meta),
                   torch.empty(129280, 4096, dtype=torch.float32, **meta))))
    for m in (1, 4096):
        cases.append((f"fp4_linear M={m} N=2048 K=4096", "fp4_linear",
                      (torch.empty(m, 4096, dtype=bf16, **meta), torch.empty(2048, 2048, dtype=u8, **meta),
                       torch.empty(2048, 128, dtype=torch.float8_e8m0fnu, **meta))))
    for b, s in ((1, 1), (64, 1), (1, 512)):
        cases.append((f"sparse_attn B={b} S={s} H=64 D=512 K=640", "sparse_attn",
                      (torch.empty(b, s, 64, 512, dtype=bf16, **meta), torch.empty(b, 4096, 512, dtype=bf16, **meta),
                       torch.empty(64, dtype=torch.float32, **meta),
                       torch.empty(b, s, 640, dtype=torch.int32, **meta), 512 ** -0.5)))
    for s in (1, 64):
        cases.append((f"indexer_topk S={s} H=64 Di=128 N=65536", "indexer_topk",
                      (torch.empty(1, s, 64, 128, dtype=bf16, **meta), torch.empty(1, 65536, 128, dtype=bf16, **meta),
                       torch.empty(1, s, 64, dtype=torch.float32, **meta),
                       torch.empty(1, s, dtype=torch.int32, **meta), 512)))

    def experts(fmt, e, i=2048, d=4096, scale_fmt="ue8m0"):
        if fmt == "bf16":
            return ExpertWeights("bf16", *(torch.empty(e, *sh, dtype=bf16, **meta) for sh in ((i, d), (d, i), (i, d))))
        if fmt == "fp8":
            w = [torch.empty(e, *sh, dtype=fp8, **meta) for sh in ((i, d), (d, i), (i, d))]
            s = [torch.empty(e, a // 128, b // 128, dtype=torch.float32, **meta) for a, b in ((i, d), (d, i), (i, d))]
        else:
            w = [torch.empty(e, a, b // 2, dtype=u8, **meta) for a, b in ((i, d), (d, i), (i, d))]
            s = [torch.empty(e, a, b // 32, dtype=torch.float8_e8m0fnu, **meta) for a, b in ((i, d), (d, i), (i, d))]
        return ExpertWeights(fmt, w[0], w[1], w[2], s[0], s[1], s[2], scale_fmt)

    for fmt in ("bf16", "fp8", "fp4"):
        for t in (1, 512):
            cases.append((f"moe_experts {fmt} T={t} K=6 E=256 D=4096 I=2048", "moe_experts",
                          (torch.empty(t, 4096, dtype=bf16, **meta), torch.empty(t, 6, dtype=torch.int64, **meta),
                           torch.empty(t, 6, dtype=torch.float32, **meta), experts(fmt, 256),
                           experts("fp8", 1), 10.0)))
    cases.append(("moe_experts fp8 scale_fmt None (plain amax/448 activation scales)", "moe_experts",
                  (torch.empty(64, 4096, dtype=bf16, **meta), torch.empty(64, 6, dtype=torch.int64, **meta),
                   torch.empty(64, 6, dtype=torch.float32, **meta), experts("fp8", 256, scale_fmt=None), None, 10.0)))
    return cases


def run(arch: int = 90, cases=None, progress=print) -> list[dict]:
    """Compile every launch of every case; returns one record per distinct compiled kernel config."""
    from dsv4_portable.devices import interpret_mode
    from dsv4_portable.registry import get_op
    from . import attention, gemm, indexer, moe  # noqa: F401  (register the providers)
    from .launch import intercept
    if interpret_mode():
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (kernels must be JIT functions)")
    records, seen = [], {}

    def hook(kernel, grid, args, meta):
        sig, consts, _ = _signature(kernel, args, meta)
        key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sig.values()),
               meta.get("num_warps"), meta.get("num_stages"))
        if key not in seen:
            seen[key] = compile_launch(kernel, grid, args, meta, arch)
        rec = dict(seen[key], case=current[0], grid=tuple(grid))
        records.append(rec)
        progress(f"  {rec['kernel']:28s} grid {str(rec['grid']):18s} smem {rec['shared_bytes']:6d} "
                 f"regs {rec['registers']:3d} spill {rec['spill_bytes']:4d} async {rec['async_copies']:2d} "
                 f"{rec['mma']}")

    current = [""]
    for label, op, args in cases if cases is not None else v4_cases():
        current[0] = label
        progress(label)
        with intercept(hook):
            get_op(op).provider("triton", "cuda").fn(*args)
    progress(f"compiled {len(seen)} kernel configs for sm{arch} ({len(records)} launches)")
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability * 10 (90 = Hopper)")
    a = ap.parse_args(argv)
    recs = run(a.arch)
    bad = [r for r in recs if r["shared_bytes"] > SMEM_LIMIT.get(a.arch, 232448) or r["spill_bytes"]]
    for r in bad:
        print(f"WARNING {r['case']}: {r['kernel']} smem {r['shared_bytes']} spill {r['spill_bytes']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
