"""What fits before loading: weight bytes per weight mode and KV-cache bytes per sequence (DESIGN.md section 6).

All figures are computed from the config (tensor shapes and storage formats), nothing is allocated.
"""
from __future__ import annotations

from .config import ModelConfig
from .model.cache import entry_bytes, fp8_entry_layout, kv_bytes_per_sequence
from .model.checkpoint import expected_tensors

GIB = 2 ** 30


def _linear_bytes(shape, fmt: str, dtype_bytes: int = 2) -> int:
    n, k = shape
    if fmt == "fp8":
        return n * k + (-(-n // 128)) * (-(-k // 128))          # e4m3 + one e8m0 scale per 128x128 block
    if fmt == "fp4":
        return n * k // 2 + n * (k // 32)                       # packed e2m1 + one e8m0 scale per 32
    if fmt == "int8":
        return n * k + 4 * n                                    # int8 + one fp32 scale per output channel
    return n * k * dtype_bytes


def weight_bytes(cfg: ModelConfig, mode: str) -> dict[str, int]:
    """Bytes of the prepared weights for a weight mode, split into routed experts and everything else.

    native: dense linears as stored (FP8 or bf16), experts as stored (FP4/FP8/bf16); bf16: every linear
    dequantised to bf16; fp8: FP4 experts converted to FP8 blocks; int8: dense linears W8A8, experts bf16
    (Ascend A2/A3). In every mode wo_a is dequantised to bf16 (it runs
    as a bf16 einsum, as in DeepSeek's reference), the compressor projections, norms and head are float32."""
    out = {"experts": 0, "other": 0}
    for name, spec in expected_tensors(cfg).items():
        if spec.kind in ("linear", "expert"):
            stored = cfg.expert_dtype if spec.kind == "expert" else cfg.dtype
            fmt = {"native": stored, "bf16": "bf16", "fp8": "fp8" if stored == "fp4" else stored,
                   "int8": "bf16" if spec.kind == "expert" else "int8"}[mode]
            if name.endswith("attn.wo_a"):
                fmt = "bf16"
            key = "experts" if ".ffn.experts." in name else "other"
            out[key] += _linear_bytes(spec.shape, fmt)
        else:
            numel = 1
            for s in spec.shape:
                numel *= s
            f32 = not (name.endswith("embed.weight") or ".ffn.gate.weight" in name or spec.kind == "int")
            out["other"] += numel * (8 if spec.kind == "int" else 4 if f32 else 2)
    out["total"] = out["experts"] + out["other"]
    return out


def deepseek_fp8_entry_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes per compressed KV entry, bytes per indexer key) in DeepSeek's FP8 cache layout, from the config.
    KV entry: the non-rope dims as e4m3, the rope dims as bf16, one ue8m0 scale per 64 non-rope dims, padded to
    8 bytes (V4: 448 + 128 + 7 + 1 = 584). Indexer key: index_head_dim e4m3 values plus one fp32 scale per 128
    (V4: 128 + 4 = 132), as in DeepSeek's V3.2/V4 indexer cache."""
    return fp8_entry_layout(cfg.head_dim, cfg.rope_head_dim)[2], cfg.index_head_dim + 4 * -(-cfg.index_head_dim // 128)


def deepseek_fp8_kv_bytes(cfg: ModelConfig, context: int) -> int:
    """DESIGN.md section 6's yardstick: compressed entries and indexer keys in DeepSeek's FP8 layout
    (deepseek_fp8_entry_bytes), compressed entries only (the window ring and compressor state are negligible at
    long context)."""
    entry, key = deepseek_fp8_entry_bytes(cfg)
    total = 0
    for i in range(cfg.n_layers):
        r = cfg.ratio(i)
        if r:
            total += (context // r) * entry
        if r == 4:
            total += (context // 4) * key
    return total


def plan(cfg: ModelConfig, context: int, batch: int = 1) -> dict:
    kv = {layout: kv_bytes_per_sequence(cfg, context, layout) for layout in ("fp8", "plain")}
    ours_entry, ours_key = entry_bytes(cfg, "fp8")
    return {
        "config": cfg.name, "context": context, "batch": batch,
        "entry_bytes": {"ours_fp8_layout": [ours_entry, ours_key],
                        "deepseek_fp8_layout": list(deepseek_fp8_entry_bytes(cfg))},
        "weights": {m: weight_bytes(cfg, m) for m in ("native", "fp8", "int8", "bf16")},
        "kv_per_sequence": {"ours_fp8_layout": kv["fp8"], "ours_bf16_plain": kv["plain"],
                            "deepseek_fp8_layout": deepseek_fp8_kv_bytes(cfg, context)},
        "kv_bytes_per_token": {"ours_fp8_layout": kv["fp8"]["total"] / context,
                               "deepseek_fp8_layout": deepseek_fp8_kv_bytes(cfg, context) / context},
    }


def format_plan(p: dict) -> str:
    gib = lambda b: f"{b / GIB:10.2f} GiB"  # noqa: E731
    lines = [f"plan for {p['config']}: context {p['context']:,} tokens, batch {p['batch']}", "",
             "weights (prepared, per weight mode):"]
    for mode, w in p["weights"].items():
        lines.append(f"  {mode:7s} total {gib(w['total'])}   routed experts {gib(w['experts'])}   other {gib(w['other'])}")
    lines += ["", "KV cache per sequence:"]
    ours = p["kv_per_sequence"]["ours_fp8_layout"]
    (oe, ok), (de, dk) = p["entry_bytes"]["ours_fp8_layout"], p["entry_bytes"]["deepseek_fp8_layout"]
    label = lambda t: f"  {t + ':':60s}"  # noqa: E731
    lines.append(f"{label(f'ours, fp8 layout ({oe} B/entry, FP4 indexer keys {ok} B)')}{gib(ours['total'])}  "
                 f"(compressed {gib(ours['compressed'])}, indexer {gib(ours['indexer'])}, window {gib(ours['window'])}, "
                 f"state {gib(ours['state'])})  = {p['kv_bytes_per_token']['ours_fp8_layout']:.0f} B/token")
    plain = p["kv_per_sequence"]["ours_bf16_plain"]
    lines.append(f"{label('ours, plain bf16 layout')}{gib(plain['total'])}")
    ds = p["kv_per_sequence"]["deepseek_fp8_layout"]
    lines.append(f"{label(f'DeepSeek FP8 layout ({de} B/entry, FP8 indexer keys {dk} B)')}{gib(ds)}  "
                 f"= {p['kv_bytes_per_token']['deepseek_fp8_layout']:.0f} B/token")
    b = p["batch"]
    if b > 1:
        lines.append(f"  x batch {b}: ours fp8 {gib(ours['total'] * b)}, plain {gib(plain['total'] * b)}")
    w = p["weights"]["native"]["total"]
    lines += ["", f"summary: native weights {w / GIB:.1f} GiB + KV {ours['total'] * b / GIB:.2f} GiB "
                  f"(fp8 layout) for {b} x {p['context']:,} tokens"]
    return "\n".join(lines)
