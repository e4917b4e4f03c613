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
from typing import Callable

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
    nbytes: int = 0


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
        begin, end = m["data_offsets"]
        if end > data_len:
            raise CheckpointError(f"{path.name}: truncated: tensor '{name}' ends at byte {end} of the data section "
                                  f"but the file holds only {data_len} data bytes")
        out[name] = TensorInfo(path, m["dtype"], tuple(m["shape"]), end - begin)
    return out


INDEX = "model.safetensors.index.json"


def _weight_map(ckpt: pathlib.Path) -> dict[str, str] | None:
    index = ckpt / INDEX
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{INDEX}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{INDEX}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def checkpoint_files(ckpt: pathlib.Path, weight_map: dict[str, str] | None = None) -> list[pathlib.Path]:
    """The shard files: those index.json lists (weight_map, as _weight_map parsed it), else every *.safetensors."""
    if weight_map is not None:
        files = sorted({ckpt / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{INDEX} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model.safetensors, no index and no *.safetensors shards")
    return files


def scan(ckpt: pathlib.Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every shard's header: (tensors by name, problems). Problems are index.json entries that disagree with the
    headers (a tensor mapped to a shard that does not hold it, a tensor that the index does not list)."""
    tensors: dict[str, TensorInfo] = {}
    weight_map = _weight_map(ckpt)                     # read and parsed once: it names the shards and is checked
    for f in checkpoint_files(ckpt, weight_map):
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor '{name}' appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    problems = []
    if weight_map is not None:
        for name, fname in sorted(weight_map.items()):
            info = tensors.get(name)
            if info is None:
                problems.append(f"index: {INDEX} maps '{name}' to {fname}, whose header has no such tensor")
            elif info.file.name != fname:
                problems.append(f"index: {INDEX} maps '{name}' to {fname}, but it is in {info.file.name}")
        problems += [f"index: '{n}' is in {i.file.name} but not listed in {INDEX}"
                     for n, i in sorted(tensors.items()) if n not in weight_map]
    return tensors, problems


# tensors the reference implementation knowingly drops (MTP's duplicate embedding/head, as DeepSeek's convert.py)
IGNORED_SUFFIXES = ("mtp.0.embed.weight", "mtp.0.head.weight", "mtp.0.emb.tok_emb.weight")


def _raise_problems(problems: list[str]) -> None:
    if problems:
        head = f"checkpoint does not match its config ({len(problems)} problem(s)):\n  "
        raise CheckpointError(head + "\n  ".join(problems[:60]) + ("\n  ..." if len(problems) > 60 else ""))


def validate(cfg: ModelConfig, found: dict[str, TensorInfo], problems: list[str] | None = None) -> dict[str, str]:
    """Check names/shapes/dtypes; returns {logical name: storage format}. Raises listing every problem (those
    passed in as `problems` included)."""
    problems, formats, used = list(problems or []), {}, set()
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
    mixed = {}
    for name, fmt in formats.items():
        stack = _expert_of(cfg, name)
        if stack is not None:
            mixed.setdefault(stack[0], set()).add(fmt)
    problems += [f"mixed: the routed experts of {k} mix storage formats {sorted(v)}" for k, v in mixed.items()
                 if len(v) > 1]
    _raise_problems(problems)
    return formats


def _expert_of(cfg: ModelConfig, name: str) -> tuple[str, int, int] | None:
    """'layers.3.ffn.experts.7.w1' -> ('layers.3.ffn.experts', layer 3, expert 7); MTP block m is layer
    n_layers + m (as in the model). None for anything that is not a routed expert's weight."""
    if ".ffn.experts." not in name:
        return None
    stack, rest = name.split(".ffn.experts.")
    kind, idx = stack.split(".")
    layer = int(idx) + (cfg.n_layers if kind == "mtp" else 0)
    return stack + ".ffn.experts", layer, int(rest.split(".")[0])


# ----------------------------------------------------------------------------------------------- loading
def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class LoadProgress:
    """Bytes read against the total from the headers: a live line on a terminal; in a log one line per shard
    and one per 10% within a long shard. `finish` prints the summary line."""

    def __init__(self, total: int, n_files: int, quiet: bool, stream=None):
        self.total, self.n_files, self.quiet = max(total, 1), n_files, quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.t0, self.last_live, self.last_decile = 0, time.perf_counter(), 0.0, 0
        self.last_line = self.t0

    def _line(self, what: str) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (f"loading weights: {_fmt_bytes(self.done)} / {_fmt_bytes(self.total)} "
                f"({100 * self.done / self.total:.0f}%) {what}, {_fmt_bytes(self.done / dt)}/s")

    def _print(self, msg: str, live: bool) -> None:
        self.last_line = time.perf_counter()
        if not self.quiet:
            print(("\r" + msg + "\x1b[K") if live else msg, end="" if live else "\n", file=self.stream, flush=True)

    def add(self, nbytes: int, where: str) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.tty:
            if now - self.last_live > 0.2:
                self.last_live = now
                self._print(self._line(where), True)
            return
        decile = 10 * self.done // self.total
        # within a long shard, a line per 10% (not for loads that take no time; 100% is the shard's own line)
        if self.last_decile < decile < 10 and now - self.last_line >= 1.0:
            self.last_decile, self.last_line = decile, now
            self._print(self._line(where), False)

    def shard_done(self, shard: int, name: str) -> None:
        if self.tty:
            self._print(self._line(f"shard {shard}/{self.n_files}"), True)
        else:
            self.last_decile = 10 * self.done // self.total
            self._print(self._line(f"shard {shard}/{self.n_files} {name} done"), False)

    def finish(self, summary: str) -> None:
        if self.tty:
            self._print("", True)
        self._print(f"{summary} in {time.perf_counter() - self.t0:.1f} s", False)


KeepExpert = Callable[[int, int], bool]


def load_params(ckpt: pathlib.Path, cfg: ModelConfig, dtype: torch.dtype, device, weights: str = "native",
                quiet: bool = False, keep_expert: KeepExpert | None = None) -> dict:
    """Check the whole checkpoint, then stream it shard by shard into the parameters of `Transformer` on `device`.

    Order: every shard's header is read and checked against the config (names, shapes, dtypes, data inside the
    file, index.json agreeing with the headers), then the hash layers' `ffn.gate.tid2eid` tables are read and
    their values checked to lie in [0, n_routed_experts); every problem found is reported at once in one
    CheckpointError and nothing else has been read or allocated. Then each tensor is read, prepared for the
    weight mode and moved to `device` right away (routed experts are copied into per-layer stacks on the device,
    each allocated once, shaped by the first expert prepared for it), so host memory holds little beyond one
    tensor in flight besides what is already prepared.

    keep_expert(layer, expert) -> bool: which routed experts to load (layer counts MTP blocks after the main
    layers, as the model does: MTP block m is layer cfg.n_layers + m). A routed expert it rejects is never read.
    Each MoE layer's `ExpertWeights` then holds only the kept experts, stacked in ascending global id order, with
    `ids` = those global ids (`ids` is None when every expert is loaded). Position j of the stack is expert
    ids[j]; `ExpertWeights.select` takes GLOBAL ids, so the expert-parallel `local_experts(experts, placement,
    rank)` (which selects `placement.local_logical(rank)`) gives the same local stack whether the model was loaded
    whole or with keep_expert keeping at least that rank's experts. Shared experts are always loaded. A model
    loaded with a subset can run its MoE layers only through an EP context (the routing picks global ids).
    """
    if weights not in WEIGHT_MODES:
        raise CheckpointError(f"unknown weight mode {weights!r} (choose {', '.join(WEIGHT_MODES)})")
    found, problems = scan(ckpt)
    formats = validate(cfg, found, problems)
    specs = expected_tensors(cfg)

    # what to read: checkpoint key -> logical name; experts not kept are skipped (their headers were checked)
    want: dict[str, str] = {}
    kept: dict[str, list[int]] = {}       # expert stack -> global ids kept, ascending
    skipped = 0
    for name, spec in specs.items():
        keys = [name + ".weight", name + ".scale"] if spec.kind in ("linear", "expert", "flinear") else [name]
        stack = _expert_of(cfg, name)
        if stack is not None:
            key, layer, eid = stack
            ids = kept.setdefault(key, [])                      # also for a layer whose every expert is dropped
            if keep_expert is not None and not keep_expert(layer, eid):
                skipped += name.endswith(".w1")
                continue
            if name.endswith(".w1"):
                ids.append(eid)
        want.update({k: name for k in keys if k in found})

    files = sorted({found[k].file for k in want})
    progress = LoadProgress(sum(found[k].nbytes for k in want), len(files), quiet)
    out: dict = {}
    problems = []
    for name, spec in specs.items():                            # small routing tables first: checked before the rest
        if spec.kind == "int":
            with safe_open(found[name].file, framework="pt") as fh:
                t = fh.get_tensor(name)
            progress.add(found[name].nbytes, "routing tables")
            bad = (t < 0) | (t >= cfg.n_routed_experts)
            if bool(bad.any()):
                problems.append(f"bad values: {name}: {int(bad.sum())} entries outside [0, {cfg.n_routed_experts}) "
                                f"(min {int(t.min())}, max {int(t.max())})")
            out[name] = t.to(device=device, dtype=torch.int64)
            del want[name]
    _raise_problems(problems)

    stacks = {key: _ExpertStack(key, ids, cfg.n_routed_experts, cfg.scale_fmt, device) for key, ids in kept.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}            # a linear whose .weight or .scale is still to come
    for n_file, f in enumerate(files, 1):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                name = want.get(key)
                if name is None:
                    continue
                parts = pending.setdefault(name, {})
                parts[key[len(name) + 1:] if key != name else ""] = fh.get_tensor(key)
                progress.add(found[key].nbytes, f"shard {n_file}/{len(files)}")
                spec = specs[name]
                if spec.kind in ("linear", "expert", "flinear") and \
                        ("weight" not in parts or (formats[name] != "bf16" and "scale" not in parts)):
                    continue
                del pending[name]
                _place(cfg, name, spec, parts, formats, weights, dtype, device, out, stacks)
        progress.shard_done(n_file, f.name)
    for key, stack in stacks.items():
        if not stack.ids:                                       # every expert dropped: shaped as if prepared
            for which, weight in _prepared_from_header(cfg, key, formats, found, weights, dtype).items():
                stack.allocate(which, weight)
        out[key] = stack.weights()
    for name in specs:                                          # shared experts: one-expert stacks
        if name.endswith(".ffn.shared_experts.w1"):
            base = name[:-3]
            out[base] = _one_expert({w: out.pop(f"{base}.{w}") for w in ("w1", "w2", "w3")}, cfg.scale_fmt)
    prepared = sum(_nbytes(v) for v in out.values())
    progress.finish(f"loaded {len(want) + sum(1 for s in specs.values() if s.kind == 'int')} tensors "
                    f"({_fmt_bytes(progress.done)}) from {len(files)} shard(s)"
                    + (f", {skipped} routed experts not kept (keep_expert) and not read" if skipped else "")
                    + f"; prepared {_fmt_bytes(prepared)} on {device} (weights={weights}, "
                      f"dtype={str(dtype).replace('torch.', '')})")
    return out


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, Weight):
        return v.nbytes()
    return sum(t.numel() * t.element_size() for t in (v.w1, v.w2, v.w3, v.s1, v.s2, v.s3) if t is not None)


def _mode_for(name: str, weights: str) -> str:
    # int8 W8A8 covers the dense linears; experts go to bf16 (the grouped GEMM runs bf16 there)
    is_expert = ".ffn.experts." in name or ".ffn.shared_experts." in name
    return "bf16" if weights == "int8" and is_expert else weights


def _place(cfg, name, spec, parts, formats, weights, dtype, device, out, stacks) -> None:
    """Prepare one checkpoint tensor (or weight + scale pair) and put it where the model expects it."""
    if spec.kind in ("linear", "expert", "flinear"):
        weight = _prepare_linear(parts["weight"], parts.get("scale"), formats[name], _mode_for(name, weights), dtype,
                                 name.endswith("attn.wo_a"), cfg.scale_fmt)
        stack = _expert_of(cfg, name)
        if stack is not None:
            stacks[stack[0]].put(stack[2], name.rsplit(".", 1)[1], weight)
        else:
            out[name] = weight.to(device)
        return
    t = parts[""]
    if name.endswith("embed.weight") or ".ffn.gate.weight" in name:
        out[name] = t.to(device=device, dtype=dtype)
    else:  # norms, mHC, sinks, compressor (fp32 linears), ape, bias, head: float32
        out[name] = t.to(device=device, dtype=torch.float32)


def _prepared_from_header(cfg, key, formats, found, weights, dtype) -> dict[str, Weight]:
    """What `_prepare_linear` makes of w1/w3/w2 of the experts of stack `key`, run on zero weights (unit scales)
    of the shapes and dtypes the headers give for expert 0: the layout of a stack none of whose experts is read."""
    out = {}
    for w in ("w1", "w3", "w2"):
        name = f"{key}.0.{w}"
        wi, si = found[name + ".weight"], found.get(name + ".scale")
        zero = torch.zeros(wi.shape, dtype=ST_DTYPES[wi.dtype])
        unit = None if si is None else torch.ones(si.shape).to(ST_DTYPES[si.dtype])
        out[w] = _prepare_linear(zero, unit, formats[name], _mode_for(name, weights), dtype, False, cfg.scale_fmt)
    return out


class _ExpertStack:
    """The routed experts of one MoE layer, stacked on the device. Each of w1/w2/w3 (and its scales) is allocated
    there once, shaped by the first prepared expert weight that arrives, and every expert is copied into it."""

    def __init__(self, key: str, ids: list[int], n_experts: int, scale_fmt, device):
        self.key, self.ids, self.n_experts, self.scale_fmt, self.device = key, ids, n_experts, scale_fmt, device
        self.pos = {e: j for j, e in enumerate(ids)}
        self.t: dict[str, torch.Tensor | None] = {}
        self.fmt: str | None = None
        self.filled = 0

    def allocate(self, which: str, weight: Weight) -> None:
        """The stack of weight `which` (w1/w2/w3) and its scales, for experts prepared like `weight`."""
        if self.fmt not in (None, weight.fmt):    # validate() refuses a layer whose experts mix formats
            raise CheckpointError(f"{self.key}: prepared expert weights mix formats {self.fmt} and {weight.fmt}")
        self.fmt, n = weight.fmt, len(self.ids)
        self.t[which] = torch.empty((n, *weight.w.shape), dtype=weight.w.dtype, device=self.device)
        self.t["s" + which[1]] = None if weight.scale is None else \
            torch.empty((n, *weight.scale.shape), dtype=weight.scale.dtype, device=self.device)

    def put(self, eid: int, which: str, weight: Weight) -> None:
        if which not in self.t:
            self.allocate(which, weight)
        j = self.pos[eid]
        self.t[which][j].copy_(weight.w)
        if weight.scale is not None:
            self.t["s" + which[1]][j].copy_(weight.scale)
        self.filled += 1

    def weights(self) -> ExpertWeights:
        if self.filled != 3 * len(self.ids) or len(self.t) != 6:   # every kept expert's w1, w2, w3 was read
            raise CheckpointError(f"{self.key}: {self.filled} of {3 * len(self.ids)} expert weights were read")
        t = self.t
        whole = len(self.ids) == self.n_experts      # ids are sorted and unique, so this is 0..E-1
        return ExpertWeights(self.fmt, t["w1"], t["w2"], t["w3"], t["s1"], t["s2"], t["s3"], self.scale_fmt,
                             ids=None if whole else tuple(self.ids))


def _one_expert(parts: dict, scale_fmt) -> ExpertWeights:
    """The shared expert as a one-expert ExpertWeights (already on the device)."""
    fmts = {w.fmt for w in parts.values()}
    if len(fmts) != 1:
        raise CheckpointError(f"the shared expert's w1/w2/w3 mix storage formats: {sorted(fmts)}")
    fmt = fmts.pop()
    st = lambda k, a: getattr(parts[k], a).unsqueeze(0)  # noqa: E731
    if fmt == "bf16":
        return ExpertWeights("bf16", st("w1", "w"), st("w2", "w"), st("w3", "w"))
    return ExpertWeights(fmt, st("w1", "w"), st("w2", "w"), st("w3", "w"), st("w1", "scale"), st("w2", "scale"),
                         st("w3", "scale"), scale_fmt)


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
