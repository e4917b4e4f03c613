"""Every registry op of DeepSeek-V4: its reference (the definition), its argument contract and its tolerance.

The model graph calls these (`ops.sparse_attn(...)`); the active backend picks the provider. Docstrings of the
reference functions in dsv4_portable.reference are the contracts; `help(ops.sparse_attn)` shows them.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .registry import Arg, OpInputError, Tolerance, define_op

# ----------------------------------------------------------------------------------------------- tolerances
EXACT = Tolerance("exact", source="quantisers are bit-exact against the same-recipe reference (DESIGN.md 5)")
_BF16_SRC = "bf16 output rounding (rtol 1.6e-2, vLLM IR) + atol scaled by reduction length"


def _float_tol(bf16_atol=1e-3, f32_atol=1e-5, per_sqrt_k=0.0, mismatch=0.0, src=_BF16_SRC):
    return {
        "bfloat16": Tolerance("allclose", bf16_atol, 1.6e-2, per_sqrt_k, max_mismatch=mismatch, source=src),
        "float16": Tolerance("allclose", bf16_atol / 4, 2e-3, per_sqrt_k / 4, max_mismatch=mismatch, source=src),
        "float32": Tolerance("allclose", f32_atol, 1e-4, per_sqrt_k / 256, max_mismatch=mismatch,
                             source="fp32 accumulation-order differences"),
        "default": Tolerance("allclose", bf16_atol, 1.6e-2, per_sqrt_k, max_mismatch=mismatch, source=src),
    }


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise OpInputError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------- quantisation
def _check_block(op):
    def check(x, block_size, **_):
        _need(_is_int(block_size) and block_size > 0, f"{op}: block_size must be a positive int, got {block_size!r}")
        _need(x.shape[-1] % block_size == 0,
              f"{op}: last dim of 'x' ({x.shape[-1]}) must be a multiple of block_size {block_size}")
        fmt = _.get("scale_fmt", "ue8m0")
        _need(fmt in ("ue8m0", None), f"{op}: scale_fmt must be 'ue8m0' or None, got {fmt!r}")
    return check


quant_fp8 = define_op("quant_fp8", ref.quant_fp8, [Arg("x", "* N")], EXACT, _check_block("quant_fp8"))
quant_fp4 = define_op("quant_fp4", ref.quant_fp4, [Arg("x", "* N")], EXACT, _check_block("quant_fp4"))
fp8_roundtrip = define_op("fp8_roundtrip", ref.fp8_roundtrip, [Arg("x", "* N")], EXACT,
                          _check_block("fp8_roundtrip"))
fp4_roundtrip = define_op("fp4_roundtrip", ref.fp4_roundtrip, [Arg("x", "* N")], EXACT,
                          _check_block("fp4_roundtrip"))


def _check_linear(op, fp4):
    def check(x, w, w_scale, scale_fmt="ue8m0"):
        k = x.shape[-1]
        _need(k % 128 == 0, f"{op}: last dim of 'x' ({k}) must be a multiple of 128 (activation quant blocks)")
        wk = w.shape[1] * (2 if fp4 else 1)
        _need(wk == k, f"{op}: 'w' has shape {list(w.shape)} ({'packed, ' if fp4 else ''}K={wk}) but 'x' has K={k}")
        want = (w.shape[0], k // 32) if fp4 else (-(-w.shape[0] // 128), -(-k // 128))
        _need(tuple(w_scale.shape) == want, f"{op}: 'w_scale' has shape {list(w_scale.shape)}; expected {list(want)}")
        _need(scale_fmt in ("ue8m0", None), f"{op}: scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    return check


_GEMM_TOL = _float_tol(bf16_atol=1e-2, f32_atol=1e-4, per_sqrt_k=2e-3)
fp8_linear = define_op("fp8_linear", ref.fp8_linear,
                       [Arg("x", "* K"), Arg("w", "N K", "fp8"), Arg("w_scale", "NB KB", "scale")],
                       _GEMM_TOL, _check_linear("fp8_linear", False))
fp4_linear = define_op("fp4_linear", ref.fp4_linear,
                       [Arg("x", "* K"), Arg("w", "N KH", "packed4"), Arg("w_scale", "N KS", "scale")],
                       _GEMM_TOL, _check_linear("fp4_linear", True))

def _check_plain_linear(x, w):
    _need(w.shape[1] == x.shape[-1], f"linear: 'w' has shape {list(w.shape)} but 'x' has K={x.shape[-1]}")


def _check_grouped_linear(x, w):
    _need(x.dim() >= 2 and x.shape[-2] == w.shape[0] and x.shape[-1] == w.shape[2],
          f"grouped_linear: 'x' {list(x.shape)} must end in [G, K] = [{w.shape[0]}, {w.shape[2]}] to match 'w' "
          f"{list(w.shape)}")


def _check_int8_linear(x, w, w_scale):
    _need(w.shape[1] == x.shape[-1], f"int8_linear: 'w' has shape {list(w.shape)} but 'x' has K={x.shape[-1]}")
    _need(tuple(w_scale.shape) == (w.shape[0],),
          f"int8_linear: 'w_scale' has shape {list(w_scale.shape)}; expected [{w.shape[0]}] (one per output channel)")


int8_linear = define_op(
    "int8_linear", ref.int8_linear, [Arg("x", "* K"), Arg("w", "N K", "int8"), Arg("w_scale", "N", "f32")],
    _float_tol(bf16_atol=1e-2, f32_atol=1e-4, src="int32 products exact; scaling order and one output rounding"),
    _check_int8_linear)
linear = define_op("linear", ref.linear, [Arg("x", "* K"), Arg("w", "N K")], _GEMM_TOL, _check_plain_linear)
grouped_linear = define_op("grouped_linear", ref.grouped_linear, [Arg("x", "* K"), Arg("w", "G N K")], _GEMM_TOL,
                           _check_grouped_linear)

# ----------------------------------------------------------------------------------------------- norm, rope
rms_norm = define_op("rms_norm", ref.rms_norm, [Arg("x", "* D"), Arg("weight", "D", "float", optional=True)],
                     _float_tol(bf16_atol=1e-2, f32_atol=1e-5))


def _check_rope(x, cos, sin, inverse=False):
    _need(x.dim() in (3, 4), f"rope: 'x' must be [B, S, D] or [B, S, H, D], got {list(x.shape)}")
    _need(cos.shape == sin.shape, f"rope: 'cos' {list(cos.shape)} and 'sin' {list(sin.shape)} must match")
    _need(cos.dim() == 3 and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1],
          f"rope: 'cos'/'sin' must be [B or 1, S, R/2] = [{x.shape[0]} or 1, {x.shape[1]}, R/2], got {list(cos.shape)}")
    _need(2 * cos.shape[-1] <= x.shape[-1],
          f"rope: rope dims {2 * cos.shape[-1]} exceed the head dim {x.shape[-1]} of 'x'")


rope = define_op("rope", ref.rope, [Arg("x", "* D"), Arg("cos", "* R", "f32"), Arg("sin", "* R", "f32")],
                 _float_tol(bf16_atol=1e-2, f32_atol=1e-5), _check_rope)


def _check_hadamard(x):
    d = x.shape[-1]
    _need(d > 0 and d & (d - 1) == 0, f"hadamard: last dim of 'x' ({d}) must be a power of two")


hadamard = define_op("hadamard", ref.hadamard, [Arg("x", "* D")], _float_tol(bf16_atol=1e-2), _check_hadamard)

# ----------------------------------------------------------------------------------------------- attention
def _check_sparse_attn(q, kv, sink, idx, scale):
    _need(isinstance(scale, float) and scale > 0, f"sparse_attn: 'scale' must be a positive float, got {scale!r}")


sparse_attn = define_op(
    "sparse_attn", ref.sparse_attn,
    [Arg("q", "B S H D"), Arg("kv", "B N D", same_dtype="q"), Arg("sink", "H", "f32"), Arg("idx", "B S K", "int32")],
    _float_tol(bf16_atol=2e-3, f32_atol=2e-5), _check_sparse_attn)


def _check_window_attn(q, window, kv, comp, topk, sink, scale, start_pos, ratio):
    _need(isinstance(scale, float) and scale > 0,
          f"window_sparse_attn: 'scale' must be a positive float, got {scale!r}")
    _need(_is_int(start_pos) and start_pos >= 0,
          f"window_sparse_attn: 'start_pos' must be an int >= 0, got {start_pos!r}")
    _need(_is_int(ratio) and ratio >= 0, f"window_sparse_attn: 'ratio' must be an int >= 0, got {ratio!r}")
    _need(window.shape[1] >= 1, "window_sparse_attn: 'window' must hold at least one slot")
    if ratio == 0:
        _need(comp is None and topk is None,
              "window_sparse_attn: a window-only layer (ratio 0) takes no 'comp' and no 'topk'")
    else:
        _need(comp is not None, f"window_sparse_attn: ratio {ratio} needs the compressed entries 'comp'")
        visible = (start_pos + q.shape[1]) // ratio      # entries the last query sees (c < (p+1)//ratio)
        _need(comp.shape[1] >= visible,
              f"window_sparse_attn: 'comp' holds {comp.shape[1]} entries but {visible} are visible to the queries at "
              f"positions {start_pos}..{start_pos + q.shape[1] - 1} (ratio {ratio})")


window_sparse_attn = define_op(
    "window_sparse_attn", ref.window_sparse_attn,
    [Arg("q", "B S H D"), Arg("window", "B W D", same_dtype="q"), Arg("kv", "B S D", same_dtype="q"),
     Arg("comp", "B N D", optional=True, same_dtype="q"), Arg("topk", "B S K", "int32", optional=True),
     Arg("sink", "H", "f32")],
    _float_tol(bf16_atol=2e-3, f32_atol=2e-5), _check_window_attn)


def _check_indexer(q, k, w, visible, topk):
    _need(_is_int(topk) and topk > 0, f"indexer_topk: 'topk' must be a positive int, got {topk!r}")


indexer_topk = define_op(
    "indexer_topk", ref.indexer_topk,
    [Arg("q", "B S H D"), Arg("k", "B N D", same_dtype="q"), Arg("w", "B S H", "f32"), Arg("visible", "B S", "int")],
    Tolerance("set", source="top-k set semantics, order free (DESIGN.md 2.4)"), _check_indexer)


def _check_compressor(x, wkv, wgate, ape, norm_weight, cos, sin, kv_state, score_state, start_pos, ratio,
                      rotate=False, quant=True, eps=1e-6):
    _need(_is_int(ratio) and ratio > 0, f"compressor: 'ratio' must be a positive int, got {ratio!r}")
    _need(_is_int(start_pos) and start_pos >= 0, f"compressor: 'start_pos' must be an int >= 0, got {start_pos!r}")
    coff = 2 if ratio == 4 else 1
    d = norm_weight.shape[0]
    b, s, dim = x.shape
    for name, t, want in (("wkv", wkv, (coff * d, dim)), ("wgate", wgate, (coff * d, dim)),
                          ("ape", ape, (ratio, coff * d)), ("kv_state", kv_state, (b, coff * ratio, coff * d)),
                          ("score_state", score_state, (b, coff * ratio, coff * d))):
        _need(tuple(t.shape) == want, f"compressor: '{name}' has shape {list(t.shape)}; expected {list(want)} "
                                      f"(ratio {ratio}, coff {coff}, d {d}, dim {dim})")
    _need(kv_state.dtype == torch.float32 or kv_state.dtype == torch.float64,
          f"compressor: 'kv_state' must be float32, got {kv_state.dtype}")
    last = (start_pos + s) // ratio - 1
    _need(cos.shape[0] > last * ratio if last >= 0 else True,
          f"compressor: RoPE tables have {cos.shape[0]} positions; entry at position {last * ratio} needs more")
    rd = 2 * cos.shape[-1]
    _need(rd <= d, f"compressor: rope dims {rd} exceed the entry width {d}")
    if quant and rotate:
        _need(d % 32 == 0 and d & (d - 1) == 0, f"compressor: rotated (indexer) entries need a power-of-two width "
                                                 f"that is a multiple of the FP4 block 32, got {d}")
    elif quant:
        _need((d - rd) % 64 == 0, f"compressor: the {d - rd} non-rope dims must be a multiple of the FP8 KV block 64")


compressor = define_op(
    "compressor", ref.compressor,
    [Arg("x", "B S DIM"), Arg("wkv", "C DIM"), Arg("wgate", "C DIM"), Arg("ape", "R C", "f32"),
     Arg("norm_weight", "D"), Arg("cos", "P H2", "f32"), Arg("sin", "P H2", "f32"),
     Arg("kv_state", "B RS C", "f32"), Arg("score_state", "B RS C", "f32")],
    _float_tol(bf16_atol=2e-2, f32_atol=1e-4, mismatch=2e-3,
               src="pooled fp32 + bf16 cast; QAT rounding may flip an element by one FP8/FP4 step"),
    _check_compressor)

# ----------------------------------------------------------------------------------------------- mHC
def _check_hc(n_rows):
    def check(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20):
        n, d = h.shape[-2], h.shape[-1]
        rows = n_rows(n)
        _need(tuple(fn.shape) == (rows, n * d), f"hc: 'fn' has shape {list(fn.shape)}; expected {[rows, n * d]}")
        _need(tuple(base.shape) == (rows,), f"hc: 'base' has shape {list(base.shape)}; expected {[rows]}")
        _need(_is_int(iters) and iters >= 1, f"hc: 'iters' must be an int >= 1, got {iters!r}")
    return check


_HC_TOL = _float_tol(bf16_atol=1e-2, f32_atol=1e-5)
hc_pre = define_op("hc_pre", ref.hc_pre,
                   [Arg("h", "B S N D"), Arg("fn", "M ND", "f32"), Arg("scale", "3", "f32"), Arg("base", "M", "f32")],
                   _HC_TOL, _check_hc(lambda n: (2 + n) * n))
hc_post = define_op("hc_post", ref.hc_post,
                    [Arg("o", "B S D"), Arg("h", "B S N D", same_dtype="o"), Arg("post", "B S N", "f32"),
                     Arg("comb", "B S N N", "f32")], _HC_TOL)


def _check_hc_head(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6):
    _check_hc(lambda n: n)(h, fn, scale, base, norm_eps, hc_eps)


hc_head = define_op("hc_head", ref.hc_head,
                    [Arg("h", "B S N D"), Arg("fn", "N ND", "f32"), Arg("scale", "1", "f32"), Arg("base", "N", "f32")],
                    _HC_TOL, _check_hc_head)

# ----------------------------------------------------------------------------------------------- MoE
def _check_route(x, gate_weight, bias, tid2eid, input_ids, topk, score_func="sqrtsoftplus", route_scale=1.0):
    _need(score_func in ("sqrtsoftplus", "sigmoid", "softmax"),
          f"moe_route: unknown score_func {score_func!r} (sqrtsoftplus, sigmoid or softmax)")
    _need(_is_int(topk) and 0 < topk <= gate_weight.shape[0],
          f"moe_route: 'topk' must be an int in [1, {gate_weight.shape[0]}], got {topk!r}")
    if tid2eid is not None:
        _need(input_ids is not None, "moe_route: this is a hash-routed layer (tid2eid given) and needs 'input_ids' "
                                     "(the token ids of the rows of x); none were passed")
        _need(tuple(tid2eid.shape[1:]) == (topk,), f"moe_route: 'tid2eid' has shape {list(tid2eid.shape)}; "
                                                   f"expected [vocab, {topk}]")
        _need(input_ids.shape == x.shape[:1], f"moe_route: 'input_ids' has shape {list(input_ids.shape)}; "
                                              f"expected [{x.shape[0]}] (one id per row of x)")
        # Value ranges only for CPU tensors: on a device each check would be a host sync per layer and step. There
        # the model checks the ids where they enter (Transformer.forward, generate) and the loader checks tid2eid.
        if input_ids.device.type == "cpu" and tid2eid.device.type == "cpu" and input_ids.numel():
            v, e = tid2eid.shape[0], gate_weight.shape[0]
            lo, hi = int(input_ids.min()), int(input_ids.max())
            _need(0 <= lo and hi < v, f"moe_route: 'input_ids' must be in [0, {v}) (the rows of 'tid2eid'), got "
                                      f"values in [{lo}, {hi}]")
            picked = tid2eid[input_ids.long()]
            elo, ehi = int(picked.min()), int(picked.max())
            _need(0 <= elo and ehi < e, f"moe_route: 'tid2eid' maps these tokens to experts in [{elo}, {ehi}]; "
                                        f"expert ids must be in [0, {e}) (the rows of 'gate_weight')")


moe_route = define_op(
    "moe_route", ref.moe_route,
    [Arg("x", "T D"), Arg("gate_weight", "E D"), Arg("bias", "E", "f32", optional=True),
     Arg("tid2eid", "V K", "int", optional=True), Arg("input_ids", "T", "int", optional=True)],
    {"default": Tolerance("allclose", 1e-5, 1e-5, source="fp32 router; indices compared exactly")},
    _check_route)


def _check_experts(x, idx, weights, experts, shared=None, swiglu_limit=0.0):
    for name, ew in (("experts", experts), ("shared", shared)):
        if ew is None and name == "shared":
            continue
        try:
            ew.check(f"moe_experts: '{name}'")
        except AttributeError:
            raise OpInputError(f"moe_experts: '{name}' must be an ExpertWeights, got {type(ew).__name__}") from None
        except ValueError as e:
            raise OpInputError(str(e)) from None
        _need(ew.hidden == x.shape[1], f"moe_experts: '{name}' have hidden size {ew.hidden} but 'x' has "
                                       f"{x.shape[1]}")
        # idx holds global expert ids and the op indexes the stack by position: only a full stack (ids None) fits
        _need(ew.ids is None, f"moe_experts: '{name}' is a partial stack (experts {list(ew.ids or ())}) indexed by "
                              "global ids; route it through expert parallelism (ExpertWeights.select)")
    if shared is not None:
        _need(shared.num_experts == 1, f"moe_experts: 'shared' must hold 1 expert, got {shared.num_experts}")


moe_experts = define_op(
    "moe_experts", ref.moe_experts,
    [Arg("x", "T D"), Arg("idx", "T K", "index"), Arg("weights", "T K", "f32")],
    _float_tol(bf16_atol=1e-2, f32_atol=1e-4, per_sqrt_k=2e-3), _check_experts)
