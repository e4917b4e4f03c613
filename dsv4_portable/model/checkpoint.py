"""Checkpoint directories in DeepSeek's own tensor naming: what must be there, checking it, loading it.

A checkpoint is `config.json` plus `model.safetensors` or shards listed in `model.safetensors.index.json`.
Before a single tensor is read, every shard's header is parsed and checked against the tensors the config implies
(names, shapes, dtypes, and that the data lies within the file): all missing, unexpected, misshapen or truncated
entries are reported at once. Then shards stream in one at a time, with progress.

Weight modes: `native` keeps FP8/FP4 weights and runs the quantised linears; `bf16` dequantises every linear at
load (to the model dtype); `fp8` converts FP4 experts exactly to FP8 blocks (for GPUs without FP4 units); `int8`
requantises the dense linears to W8A8 with per-channel scales and dequantises experts to bf16 (Ascend A2/A3).
"""
from __future__ import annotations

import json
import pathlib
import struct
import sys
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..reference import ExpertWeights
from ..reference import quant as Q
from .linear import Weight

WEIGHT_MODES = ("native", "bf16", "fp8", "int8")
ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16,
             "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8,
             "I32": torch.int32, "I64": torch.int64}
FLOATS = {"BF16", "F16", "F32"}
SCALES = {"F8_E8M0", "F32"}
INTS = {"I32", "I64"}


class CheckpointError(ValueError):
    """The checkpoint directory does not match its config (the message lists every problem)."""


@dataclass(frozen=True)
class Spec:
    """An expected tensor: kind linear / expert (FP8, FP4 or float storage, with a `.scale` beside quantised
    weights), flinear (a linear stored in float only), float, or int; shape is the logical [N, K] for linears."""
    kind: str
    shape: tuple[int, ...]


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    """Every tensor (by DeepSeek name, without .weight/.scale for linears) the config implies."""
    d, hc = cfg.dim, cfg.hc_mult
    mix = (2 + hc) * hc
    spec: dict[str, Spec] = {
        "embed.weight": Spec("float", (cfg.vocab_size, d)), "head.weight": Spec("float", (cfg.vocab_size, d)),
        "norm.weight": Spec("float", (d,)), "hc_head_fn": Spec("float", (hc, hc * d)),
        "hc_head_base": Spec("float", (hc,)), "hc_head_scale": Spec("float", (1,)),
    }

    def block(pre: str, layer: int):
        r = cfg.ratio(layer)
        s = {"attn_norm.weight": Spec("float", (d,)), "ffn_norm.weight": Spec("float", (d,))}
        for part in ("attn", "ffn"):
            s[f"hc_{part}_fn"] = Spec("float", (mix, hc * d))
            s[f"hc_{part}_base"] = Spec("float", (mix,))
            s[f"hc_{part}_scale"] = Spec("float", (3,))
        h, hd, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        s.update({"attn.wq_a": Spec("linear", (cfg.q_lora_rank, d)), "attn.q_norm.weight": Spec("float", (cfg.q_lora_rank,)),
                  "attn.wq_b": Spec("linear", (h * hd, cfg.q_lora_rank)), "attn.wkv": Spec("linear", (hd, d)),
                  "attn.kv_norm.weight": Spec("float", (hd,)),
                  "attn.wo_a": Spec("linear", (g * cfg.o_lora_rank, h * hd // g)),
                  "attn.wo_b": Spec("linear", (d, g * cfg.o_lora_rank)), "attn.attn_sink": Spec("float", (h,))})
        if r:
            coff = 2 if r == 4 else 1
            s.update({"attn.compressor.wkv.weight": Spec("float", (coff * hd, d)),
                      "attn.compressor.wgate.weight": Spec("float", (coff * hd, d)),
                      "attn.compressor.ape": Spec("float", (r, coff * hd)),
                      "attn.compressor.norm.weight": Spec("float", (hd,))})
        if r == 4:
            hi, di = cfg.index_n_heads, cfg.index_head_dim
            s.update({"attn.indexer.wq_b": Spec("linear", (hi * di, cfg.q_lora_rank)),
                      "attn.indexer.weights_proj": Spec("flinear", (hi, d)),
                      "attn.indexer.compressor.wkv.weight": Spec("float", (2 * di, d)),
                      "attn.indexer.compressor.wgate.weight": Spec("float", (2 * di, d)),
                      "attn.indexer.compressor.ape": Spec("float", (4, 2 * di)),
                      "attn.indexer.compressor.norm.weight": Spec("float", (di,))})
        e, i = cfg.n_routed_experts, cfg.moe_inter_dim
        s["ffn.gate.weight"] = Spec("float", (e, d))
        if cfg.is_hash_layer(layer):
            s["ffn.gate.tid2eid"] = Spec("int", (cfg.vocab_size, cfg.n_activated_experts))
        else:
            s["ffn.gate.bias"] = Spec("float", (e,))
        for j in range(e):
            for w, shp in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
                s[f"ffn.experts.{j}.{w}"] = Spec("expert", shp)
        for w, shp in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
            s[f"ffn.shared_experts.{w}"] = Spec("linear", shp)
        spec.update({pre + k: v for k, v in s.items()})

    for layer in range(cfg.n_layers):
        block(f"layers.{layer}.", layer)
    for m in range(cfg.n_mtp_layers):
        pre = f"mtp.{m}."
        block(pre, cfg.n_layers + m)
        spec.update({pre + "e_proj": Spec("linear", (d, d)), pre + "h_proj": Spec("linear", (d, d)),
                     pre + "enorm.weight": Spec("float", (d,)), pre + "hnorm.weight": Spec("float", (d,)),
                     pre + "norm.weight": Spec("float", (d,)), pre + "hc_head_fn": Spec("float", (hc, hc * d)),
                     pre + "hc_head_base": Spec("float", (hc,)), pre + "hc_head_scale": Spec("float", (1,))})
    return spec


# ----------------------------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated or corrupt: header claims {n} bytes, file has {size}")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    out, data_len = {}, size - 8 - n
    for name, m in meta.items():
        if name == "__metadata__":
            continue
        end = m["data_offsets"][1]
        if end > data_len:
            raise CheckpointError(f"{path.name}: truncated: tensor '{name}' ends at byte {end} of the data section "
                                  f"but the file holds only {data_len} data bytes")
        out[name] = TensorInfo(path, m["dtype"], tuple(m["shape"]))
    return out


def checkpoint_files(ckpt: pathlib.Path) -> list[pathlib.Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name}: unreadable ({e})") from None
        files = sorted({ckpt / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index.name} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model.safetensors, no index and no *.safetensors shards")
    return files


def scan(ckpt: pathlib.Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in checkpoint_files(ckpt):
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor '{name}' appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    return tensors


# tensors the reference implementation knowingly drops (MTP's duplicate embedding/head, as DeepSeek's convert.py)
IGNORED_SUFFIXES = ("mtp.0.embed.weight", "mtp.0.head.weight", "mtp.0.emb.tok_emb.weight")


def validate(cfg: ModelConfig, found: dict[str, TensorInfo]) -> dict[str, str]:
    """Check names/shapes/dtypes; returns {logical name: storage format}. Raises listing every problem."""
    problems, formats, used = [], {}, set()
    for name, spec in expected_tensors(cfg).items():
        if spec.kind in ("linear", "expert", "flinear"):
            w, s = found.get(name + ".weight"), found.get(name + ".scale")
            used.update(k for k in (name + ".weight", name + ".scale") if k in found)
            if w is None:
                problems.append(f"missing: {name}.weight (expected {list(spec.shape)})")
                continue
            n, k = spec.shape
            if w.dtype == "F8_E4M3" and spec.kind != "flinear":
                want_s = (-(-n // 128), -(-k // 128))
                ok = w.shape == (n, k) and s is not None and s.shape == want_s and s.dtype in SCALES
                fmt = "fp8"
                want = f"F8_E4M3 {[n, k]} + .scale {list(want_s)} (F8_E8M0 or F32)"
            elif w.dtype in ("I8", "U8") and spec.kind == "expert":
                want_s = (n, k // 32)
                ok = w.shape == (n, k // 2) and s is not None and s.shape == want_s and s.dtype in SCALES
                fmt = "fp4"
                want = f"packed FP4 {[n, k // 2]} + .scale {list(want_s)} (F8_E8M0 or F32)"
            else:
                ok, fmt = w.dtype in FLOATS and w.shape == (n, k) and s is None, "bf16"
                want = f"{[n, k]} in BF16/F16/F32 (or FP8{' / packed FP4' if spec.kind == 'expert' else ''} + .scale)"
            if not ok:
                got = f"{w.dtype} {list(w.shape)}" + (f" + .scale {s.dtype} {list(s.shape)}" if s else "")
                problems.append(f"misshapen: {name}: got {got}; expected {want}")
            formats[name] = fmt
        else:
            t = found.get(name)
            used.add(name)
            if t is None:
                problems.append(f"missing: {name} (expected {list(spec.shape)})")
            elif t.shape != spec.shape or t.dtype not in (INTS if spec.kind == "int" else FLOATS):
                kinds = "I32/I64" if spec.kind == "int" else "BF16/F16/F32"
                problems.append(f"misshapen: {name}: got {t.dtype} {list(t.shape)}; expected {kinds} {list(spec.shape)}")
    unexpected = sorted(k for k in found if k not in used and not k.endswith(IGNORED_SUFFIXES))
    problems += [f"unexpected: {k} ({found[k].dtype} {list(found[k].shape)})" for k in unexpected]
    if problems:
        head = f"checkpoint does not match its config ({len(problems)} problem(s)):\n  "
        raise CheckpointError(head + "\n  ".join(problems[:60]) + ("\n  ..." if len(problems) > 60 else ""))
    return formats


# ----------------------------------------------------------------------------------------------- loading
def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def load_params(ckpt: pathlib.Path, cfg: ModelConfig, dtype: torch.dtype, device, weights: str = "native",
                quiet: bool = False) -> dict:
    """Validate, then stream every shard and prepare the parameters of `Transformer` on `device`."""
    if weights not in WEIGHT_MODES:
        raise CheckpointError(f"unknown weight mode {weights!r} (choose {', '.join(WEIGHT_MODES)})")
    found = scan(ckpt)
    formats = validate(cfg, found)
    raw: dict[str, torch.Tensor] = {}
    files = sorted({i.file for i in found.values()})
    t0, nbytes = time.time(), 0
    for n, f in enumerate(files, 1):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                t = fh.get_tensor(name)
                nbytes += t.numel() * t.element_size()
                raw[name] = t
        _progress(f"loading shard {n}/{len(files)} {f.name} ({nbytes / 2**20:.1f} MiB so far)", quiet)
    params = prepare(cfg, raw, formats, dtype, device, weights)
    _progress(f"loaded {len(files)} shard(s), {nbytes / 2**20:.1f} MiB in {time.time() - t0:.1f} s "
              f"(weights={weights}, dtype={str(dtype).replace('torch.', '')}, device={device})", quiet)
    return params


def prepare(cfg: ModelConfig, raw: dict, formats: dict, dtype, device, weights: str) -> dict:
    """Checkpoint tensors -> model parameters per weight mode (consumes `raw`)."""
    out: dict = {}
    experts: dict[str, dict] = {}
    scale_fmt = cfg.scale_fmt
    for name, spec in expected_tensors(cfg).items():
        if spec.kind in ("linear", "expert", "flinear"):
            w, s, fmt = raw.pop(name + ".weight"), raw.pop(name + ".scale", None), formats[name]
            is_expert = ".ffn.experts." in name or ".ffn.shared_experts." in name
            # int8 W8A8 covers the dense linears; experts go to bf16 (the grouped GEMM runs bf16 there)
            mode = "bf16" if weights == "int8" and is_expert else weights
            weight = _prepare_linear(w, s, fmt, mode, dtype, name.endswith("attn.wo_a"), scale_fmt)
            if is_expert:
                base, which = name.rsplit(".", 1)
                key = base.rsplit(".", 1)[0] if ".ffn.experts." in name else base
                eid = int(base.rsplit(".", 1)[1]) if ".ffn.experts." in name else 0
                experts.setdefault(key, {}).setdefault(which, {})[eid] = weight
            else:
                out[name] = weight.to(device)
        else:
            t = raw.pop(name)
            if spec.kind == "int":
                out[name] = t.to(device=device, dtype=torch.int64)
            elif name.endswith(("embed.weight",)) or ".ffn.gate.weight" in name:
                out[name] = t.to(device=device, dtype=dtype)
            else:  # norms, mHC, sinks, compressor (fp32 linears), ape, bias, head: float32
                out[name] = t.to(device=device, dtype=torch.float32)
    for key, parts in experts.items():
        out[key] = _stack_experts(parts, device, scale_fmt)
    return out


def _prepare_linear(w, s, fmt, mode, dtype, dequant_always, scale_fmt):
    if mode == "int8" and not dequant_always:      # W8A8: requantise per output channel from the exact weights
        full = w.float() if fmt == "bf16" else (Q.dequant_fp8_weight(w, s) if fmt == "fp8" else
                                                Q.dequant_fp4_weight(w, s))
        q, ws = Q.quant_int8_weight(full)
        return Weight(q, ws, "int8")
    if fmt == "bf16":  # float storage; wo_a stays a plain tensor (the grouped einsum views it per group)
        return w.to(dtype) if dequant_always else Weight(w.to(dtype))
    if mode == "bf16" or dequant_always:  # wo_a runs as a bf16 einsum, as in DeepSeek's reference
        full = Q.dequant_fp8_weight(w, s) if fmt == "fp8" else Q.dequant_fp4_weight(w, s)
        return full.to(dtype) if dequant_always else Weight(full.to(dtype))
    if fmt == "fp4" and mode == "fp8":
        q, s8 = Q.fp4_to_fp8_weight(w, s.float())
        return Weight(q, s8, "fp8", scale_fmt)
    return Weight(w, s.float(), fmt, scale_fmt)


def _stack_experts(parts: dict, device, scale_fmt) -> ExpertWeights:
    ws = {k: [parts[k][i] for i in sorted(parts[k])] for k in ("w1", "w2", "w3")}
    fmts = {w.fmt for v in ws.values() for w in v}
    if len(fmts) != 1:
        raise CheckpointError(f"experts of one layer mix storage formats: {sorted(fmts)}")
    fmt = fmts.pop()
    st = lambda k, a: torch.stack([getattr(w, a) for w in ws[k]]).to(device)  # noqa: E731
    if fmt == "bf16":
        return ExpertWeights("bf16", st("w1", "w"), st("w2", "w"), st("w3", "w"))
    return ExpertWeights(fmt, st("w1", "w"), st("w2", "w"), st("w3", "w"), st("w1", "scale"), st("w2", "scale"),
                         st("w3", "scale"), scale_fmt)


# ----------------------------------------------------------------------------------------------- writing
def save_checkpoint(ckpt: pathlib.Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write config.json (Hugging Face spelling) and the tensors as `shards` safetensors files (+ index)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    names = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in names}, ckpt / "model.safetensors")
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, ckpt / fname)
        weight_map.update({k: fname for k in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))


def random_tensors(cfg: ModelConfig, seed: int = 0, dense: str | None = None, experts: str | None = None,
                   float_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random weights in checkpoint format: linears as FP8 (+e8m0 scales), FP4 experts (+e8m0), or float.
    Scales are chosen so activations stay O(1) through the layers."""
    dense = dense or cfg.dtype
    experts = experts or cfg.expert_dtype
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {}
    for name, spec in expected_tensors(cfg).items():
        shp = spec.shape
        if spec.kind in ("linear", "expert", "flinear"):
            w = rnd(*shp) / shp[1] ** 0.5
            fmt = {"expert": experts, "linear": dense, "flinear": "bf16"}[spec.kind]
            if fmt == "fp8":
                q, s = Q.quant_fp8_weight(w)
                out[name + ".weight"], out[name + ".scale"] = q, Q.float_to_e8m0(s)
            elif fmt == "fp4":
                q, s = Q.quant_fp4_weight(w)
                out[name + ".weight"], out[name + ".scale"] = q, Q.float_to_e8m0(s)
            else:
                out[name + ".weight"] = w.to(float_dtype)
        elif spec.kind == "int":
            out[name] = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:shp[1]]
                                     for _ in range(shp[0])]).to(torch.int32)
        elif name.endswith("norm.weight"):
            out[name] = (1 + 0.1 * rnd(*shp)).to(float_dtype)
        elif name.endswith(("_fn",)):
            out[name] = (rnd(*shp) / shp[1] ** 0.5).float()
        elif name.endswith("_scale"):
            out[name] = (0.5 + torch.rand(*shp, generator=g)).float()
        elif name.endswith(("_base", "attn_sink", "gate.bias")):
            out[name] = (0.5 * rnd(*shp)).float()
        elif name.endswith("ape"):
            out[name] = (0.5 * rnd(*shp)).float()
        elif name.endswith("embed.weight"):
            out[name] = rnd(*shp).to(float_dtype)
        else:  # head, gate, compressor projections
            out[name] = (rnd(*shp) / shp[-1] ** 0.5).to(float_dtype)
    return out
