"""Offline GPU compile check of the providers' Triton kernels (no GPU needed).

The providers are run on `meta` tensors (shapes, no memory) at DeepSeek-V4 sizes while launch.intercept routes
each launch here: the kernel is compiled by triton for a CUDA target (default sm90 = H100/H200) with the same
constexprs, num_warps and num_stages, and the argument specialisation Triton applies at run time (16-byte
aligned pointers, ints divisible by 16 unless the kernel opts out with do_not_specialize). Reported per
launch: shared memory, registers and stack bytes (from the cubin via the cuobjdump bundled with triton), the
bytes of register spill stores (ptxas -v, run again on the kernel's PTX when it has a stack frame), whether
the loads of the main loop were pipelined (asynchronous copies in the TTGIR), the widest global load (vector
width in 32-bit words), and what the products compile to: `wgmma` (Hopper warp-group MMA), `mma.sync`
(Ampere-style tensor-core MMA), `tcgen05` (Blackwell), `fma` (a tl.dot lowered to scalar FMAs: no tensor
cores) or `none` (no tl.dot). Compute cases (GEMMs, attention, indexer, MoE) and memory-bound cases
(quantisers, norm/RoPE, Hadamard, mHC, compressor, routing) are both covered.

This catches GPU-only compile errors and gross resource problems on a CPU-only machine; it says nothing about
speed or numerical results on the GPU. Exit status 1 (naming each kernel and case) when a launch needs more
shared memory than a block may use on the target, or spills registers.

Usage: python -m dsv4_portable.backends.cuda.compile_check [--arch 90] [--only compute|memory]
(TRITON_INTERPRET must be unset).
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
# bytes of shared memory one block may use (opt-in maximum per block; CUDA programming guide, per arch)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


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
            if v % 16 == 0 and not _no_specialise(kernel, i):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    return sig, consts, attrs


def _no_specialise(kernel, i: int) -> bool:
    params = getattr(kernel, "params", None)
    return bool(params) and params[i].do_not_specialize


def product_kind(ttgir: str, ptx: str) -> str:
    """What the kernel's tl.dot products compile to (see the module doc)."""
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma" if re.search(r"\btt\.dot\b", ttgir) else "none"


def widest_load(ptx: str) -> int:
    """Widest global load of 32-bit words (4 = 128-bit vector loads); 0 when there is none."""
    widths = [int(w or 1) for w in re.findall(r"ld\.global(?:\.nc)?(?:\.L1::\w+)?(?:\.v(\d))?\.b32", ptx)]
    return max(widths or [0])


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Bytes of register spill stores, as ptxas -v reports them for this PTX (the same ptxas and register
    allocation option Triton uses). A stack frame alone is not a spill: on sm100 some kernels keep an 8-byte
    frame around a call with 80 registers in use."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", out],
                             capture_output=True, text=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def _resource_usage(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    # the per-thread stack frame (STACK: spills and call frames) and other local arrays (LOCAL)
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", 0)) +
            int(found.get("LOCAL", 0))}


def compile_launch(kernel, grid, args, meta, arch: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = _signature(kernel, args, meta)
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    info = {"kernel": kernel.__name__, "grid": tuple(grid), "shared_bytes": compiled.metadata.shared,
            "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
            "mma": product_kind(ttgir, ptx), "max_ld_vec": widest_load(ptx),
            **options, **{k: str(v) for k, v in consts.items() if k.startswith("BLOCK")}}
    info.update(_resource_usage(compiled.asm["cubin"]))
    info["spill_bytes"] = _ptxas_spills(ptx, arch) if info["stack_bytes"] else 0
    return info


def compute_cases():
    """(label, op name, args) of the compute-heavy ops at DeepSeek-V4-Flash sizes, as meta tensors."""
    from dsv4_portable.reference.moe import ExpertWeights
    meta = dict(device="meta")
    bf16, fp8, u8 = torch.bfloat16, torch.float8_e4m3fn, torch.uint8
    cases = []
    for m in (1, 48, 4096):
        cases.append((f"fp8_linear M={m} N=4096 K=4096", "fp8_linear",
                      (torch.empty(m, 4096, dtype=bf16, **meta), torch.empty(4096, 4096, dtype=fp8, **meta),
                       torch.empty(32, 32, dtype=torch.float8_e8m0fnu, **meta))))
    cases.append(("fp8_linear M=128 N=512 K=4096 (wkv at a serving batch: 64x64 tiles, split K)", "fp8_linear",
                  (torch.empty(128, 4096, dtype=bf16, **meta), torch.empty(512, 4096, dtype=fp8, **meta),
                   torch.empty(4, 32, dtype=torch.float8_e8m0fnu, **meta))))
    cases.append(("fp8_linear M=4096 fp32 weight scales (Base checkpoints)", "fp8_linear",
                  (torch.empty(4096, 4096, dtype=bf16, **meta), torch.empty(4096, 4096, dtype=fp8, **meta),
                   torch.empty(32, 32, dtype=torch.float32, **meta))))
    for m in (1, 4096):
        cases.append((f"linear bf16 M={m} N=1024 K=4096 (bf16 weight mode)", "linear",
                      (torch.empty(m, 4096, dtype=bf16, **meta), torch.empty(1024, 4096, dtype=bf16, **meta))))
    for t in (1, 4096):
        cases.append((f"grouped_linear wo_a T={t} G=8 N=1024 K=4096 (bf16)", "grouped_linear",
                      (torch.empty(t, 8, 4096, dtype=bf16, **meta), torch.empty(8, 1024, 4096, dtype=bf16, **meta))))
    for m in (1, 64, 512):
        cases.append((f"linear fp32 head M={m} N=129280 K=4096", "linear",
                      (torch.empty(m, 4096, dtype=torch.float32, **meta),
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
    cases.append(("sparse_attn B=1 S=1 H=64 D=512 K=640 float32", "sparse_attn",
                  (torch.empty(1, 1, 64, 512, **meta), torch.empty(1, 4096, 512, **meta),
                   torch.empty(64, **meta), torch.empty(1, 1, 640, dtype=torch.int32, **meta), 512 ** -0.5)))
    cases += window_attn_cases()
    for s, h, di, dt in ((1, 64, 128, bf16), (64, 64, 128, bf16), (64, 64, 128, torch.float32),
                         (64, 128, 256, bf16), (64, 128, 256, torch.float32)):
        cases.append((f"indexer_topk S={s} H={h} Di={di} N=65536 {str(dt)[6:]}", "indexer_topk",
                      (torch.empty(1, s, h, di, dtype=dt, **meta), torch.empty(1, 65536, di, dtype=dt, **meta),
                       torch.empty(1, s, h, dtype=torch.float32, **meta),
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


def window_attn_cases():
    """window_sparse_attn at V4-Flash shapes: ring of 128, CSA top-k 512 and HCA (ratio 128), decode at 64K and
    1M context (split-K), a 4096-token prefill chunk; bf16 and the fp32 activation path."""
    meta = dict(device="meta")
    bf16, f32, i32 = torch.bfloat16, torch.float32, torch.int32

    def case(label, b, s, p0, ratio, dt=bf16):
        n = (p0 + s) // ratio if ratio else 0
        topk = torch.empty(b, s, min(512, n), dtype=i32, **meta) if ratio == 4 else None
        comp = torch.empty(b, max(n, 1), 512, dtype=dt, **meta) if ratio else None
        return (f"window_sparse_attn {label} B={b} S={s} pos {p0} ratio {ratio} {str(dt)[6:]}", "window_sparse_attn",
                (torch.empty(b, s, 64, 512, dtype=dt, **meta), torch.empty(b, 128, 512, dtype=dt, **meta),
                 torch.empty(b, s, 512, dtype=dt, **meta), comp, topk, torch.empty(64, dtype=f32, **meta),
                 512 ** -0.5, p0, ratio))
    return [case("CSA decode", 1, 1, 65535, 4), case("CSA decode", 32, 1, 65535, 4),
            case("HCA decode 1M", 1, 1, 2 ** 20 - 1, 128), case("window-only decode", 1, 1, 4095, 0),
            case("CSA prefill", 1, 4096, 0, 4), case("HCA prefill", 1, 4096, 0, 128),
            case("CSA decode", 1, 1, 65535, 4, f32)]


def memory_cases():
    """(label, op, args) of the memory-bound ops at DeepSeek-V4-Flash sizes as meta tensors: decode and prefill
    shapes of every op, and the fp32 paths."""
    meta = dict(device="meta")
    bf16, f32 = torch.bfloat16, torch.float32

    def e(*shape, dt=bf16):
        return torch.empty(*shape, dtype=dt, **meta)

    def comp(s, ratio, d, rotate, dt=bf16):
        coff = 2 if ratio == 4 else 1
        return (e(1, s, 4096, dt=dt), e(coff * d, 4096, dt=f32), e(coff * d, 4096, dt=f32), e(ratio, coff * d, dt=f32),
                e(d, dt=f32), e(65536, 32, dt=f32), e(65536, 32, dt=f32), e(1, coff * ratio, coff * d, dt=f32),
                e(1, coff * ratio, coff * d, dt=f32), 0 if s > 1 else 4095, ratio, rotate, True)
    return [
        ("quant_fp8 M=4096 K=7168", "quant_fp8", (e(4096, 7168), 128, "ue8m0")),
        ("quant_fp8 plain scales", "quant_fp8", (e(64, 4096), 128, None)),
        ("fp8_roundtrip kv[..., :448]", "fp8_roundtrip", (e(1, 4096, 512)[..., :448], 64, "ue8m0")),
        ("quant_fp4 experts in", "quant_fp4", (e(1024, 4096), 32)),
        ("fp4_roundtrip indexer q", "fp4_roundtrip", (e(1, 64, 64, 128), 32)),
        ("rms_norm hidden", "rms_norm", (e(4096, 4096), e(4096, dt=f32), 1e-6)),
        ("rms_norm q heads (no weight)", "rms_norm", (e(1, 64, 64, 512), None, 1e-6)),
        ("hadamard indexer q prefill", "hadamard", (e(1, 4096, 64, 128),)),
        ("hadamard fp32 rows D=128", "hadamard", (e(4096, 128, dt=f32),)),
        ("hadamard fp32 rows D=256", "hadamard", (e(4096, 256, dt=f32),)),
        ("rope q decode", "rope", (e(64, 1, 64, 512), e(64, 1, 32, dt=f32), e(64, 1, 32, dt=f32), False)),
        ("rope o inverse prefill", "rope", (e(1, 4096, 64, 512), e(1, 4096, 32, dt=f32), e(1, 4096, 32, dt=f32), True)),
        ("hc_pre decode", "hc_pre", (e(1, 1, 4, 4096), e(24, 16384, dt=f32), e(3, dt=f32), e(24, dt=f32))),
        ("hc_pre prefill", "hc_pre", (e(1, 8192, 4, 4096), e(24, 16384, dt=f32), e(3, dt=f32), e(24, dt=f32))),
        ("hc_head", "hc_head", (e(1, 64, 4, 4096), e(4, 16384, dt=f32), e(1, dt=f32), e(4, dt=f32))),
        ("hc_post", "hc_post", (e(1, 4096, 4096), e(1, 4096, 4, 4096), e(1, 4096, 4, dt=f32),
                                e(1, 4096, 4, 4, dt=f32))),
        ("compressor CSA prefill", "compressor", comp(4096, 4, 512, False)),
        ("compressor indexer decode", "compressor", comp(1, 4, 128, True)),
        ("compressor HCA prefill", "compressor", comp(4096, 128, 512, False)),
        ("compressor HCA decode fp32 activations", "compressor", comp(1, 128, 512, False, f32)),
        ("moe_route decode", "moe_route", (e(1, 4096), e(256, 4096), e(256, dt=f32), None, None, 6,
                                           "sqrtsoftplus", 1.5)),
        ("moe_route hash prefill", "moe_route", (e(4096, 4096), e(256, 4096), None, e(129280, 6, dt=torch.int64),
                                                 e(4096, dt=torch.int64), 6, "sqrtsoftplus", 1.5)),
    ]


def v4_cases():
    return compute_cases() + memory_cases()


def problems(records: list[dict], arch: int) -> list[str]:
    """One line per launch that cannot run well on the target: shared memory over the block limit, or spills."""
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[90])
    out = []
    for r in records:
        if r["shared_bytes"] > limit:
            out.append(f"{r['kernel']} ({r['case']}): {r['shared_bytes']} B shared memory > {limit} B on sm{arch}")
        if r["spill_bytes"]:
            out.append(f"{r['kernel']} ({r['case']}): spills {r['spill_bytes']} B of registers")
    return out


def run(arch: int = 90, cases=None, progress=print) -> list[dict]:
    """Compile every launch of every case; returns one record per distinct compiled kernel config."""
    from dsv4_portable.devices import interpret_mode
    from dsv4_portable.registry import get_op
    import dsv4_portable as dsv4
    dsv4.BACKENDS["cuda"].load_providers()   # registers every provider of the backend
    from .launch import intercept
    if interpret_mode():
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (kernels must be JIT functions)")
    records, seen = [], {}

    def hook(kernel, grid, args, meta):
        sig, consts, attrs = _signature(kernel, args, meta)
        key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sig.values()),
               tuple(sorted(attrs)), meta.get("num_warps"), meta.get("num_stages"))
        if key not in seen:
            seen[key] = compile_launch(kernel, grid, args, meta, arch)
        rec = dict(seen[key], case=current[0], grid=tuple(grid))
        records.append(rec)
        progress(f"  {rec['kernel']:28s} grid {str(rec['grid']):18s} smem {rec['shared_bytes']:6d} "
                 f"regs {rec['registers']:3d} spill {rec['spill_bytes']:4d} stack {rec['stack_bytes']:4d} "
                 f"async {rec['async_copies']:2d} ld.v{rec['max_ld_vec']} {rec['mma']}")

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
    ap.add_argument("--only", choices=["compute", "memory"], default=None, help="one group of cases")
    a = ap.parse_args(argv)
    cases = {"compute": compute_cases, "memory": memory_cases, None: v4_cases}[a.only]()
    recs = run(a.arch, cases)
    bad = problems(recs, a.arch)
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
