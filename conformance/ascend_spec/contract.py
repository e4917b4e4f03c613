"""Shared pieces of the Ascend vendor-op spec: the contract error, SoC profiles, dtype ids, argument checks,
the call log and the `SpecOp` wrapper that gives every spec op its documented Python signature.

Every check raises `VendorContractError` naming the op, the argument and the documented rule with its source,
before any work is done. A call the vendor would accept but this spec does not model raises
`SpecNotModelledError` instead (a limit of the spec, not a contract violation).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch


class VendorContractError(ValueError):
    """A call breaks the documented argument contract of an Ascend vendor op.

    Attributes: op (spec op name), arg (the offending argument), rule (the documented rule), source."""

    def __init__(self, op: str, arg: str, problem: str, rule: str = "", source: str = ""):
        self.op, self.arg, self.problem, self.rule, self.source = op, arg, problem, rule, source
        text = f"{op}: argument '{arg}' {problem}"
        if rule:
            text += f"; documented rule: {rule}"
        if source:
            text += f" [{source}]"
        super().__init__(text)


class SpecNotModelledError(NotImplementedError):
    """A documented vendor mode that this executable spec does not implement (yet)."""

    def __init__(self, op: str, what: str):
        super().__init__(f"{op}: {what} is a documented vendor mode that the spec does not model")


# ----------------------------------------------------------------------------------------------- SoC profiles
# Runtime SoC ids as torch_npu.npu.get_soc_version() reports them (vllm-ascend vllm_ascend/device/hardware.py
# device_type_from_runtime_soc): 220-225 Atlas A2 (910B), 250-255 Atlas A3 (910C), 260 Ascend 950.
SOC_FAMILIES = ("A2", "A3", "950")
SOC_VERSION = {"A2": 223, "A3": 250, "950": 260}   # one representative id per family for the stand-in
SOC_DEVICE_NAME = {"A2": "Ascend910B3", "A3": "Ascend910_9391", "950": "Ascend950PR"}
SOC_SOURCE = "vllm-ascend vllm_ascend/device/hardware.py::device_type_from_runtime_soc"

_ACTIVE_SOC: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv4_ascend_spec_soc", default=None)


def soc_family(soc: str | int) -> str:
    """'A2' | 'A3' | '950' from a family name or a runtime SoC id (220-225, 250-255, 260)."""
    if isinstance(soc, str) and soc.upper() in ("A2", "A3"):
        return soc.upper()
    if isinstance(soc, str) and soc in ("950", "A5"):
        return "950"
    if isinstance(soc, int) and not isinstance(soc, bool):
        if 220 <= soc <= 225:
            return "A2"
        if 250 <= soc <= 255:
            return "A3"
        if soc == 260:
            return "950"
    raise ValueError(f"unknown Ascend SoC {soc!r}: expected 'A2', 'A3', '950' or a runtime SoC id "
                     f"(220-225 A2, 250-255 A3, 260 950; {SOC_SOURCE})")


def active_soc() -> str | None:
    """The SoC family the spec currently checks against (None when no profile is active)."""
    return _ACTIVE_SOC.get()


@contextlib.contextmanager
def use_soc(soc: str | int):
    """Run spec ops under the contract of one chip generation ('A2', 'A3', '950' or a SoC id)."""
    token = _ACTIVE_SOC.set(soc_family(soc))
    try:
        yield _ACTIVE_SOC.get()
    finally:
        _ACTIVE_SOC.reset(token)


def require_soc(op: str, allowed: Iterable[str], source: str) -> str:
    """The active SoC family, or VendorContractError if the op is not documented for it."""
    soc = active_soc()
    allowed = tuple(allowed)
    if soc is None:
        raise VendorContractError(op, "<soc>", "was called with no SoC profile active",
                                  f"supported on {', '.join(allowed)}; activate one with use_soc() or "
                                  "standin.installed(soc)", source)
    if soc not in allowed:
        raise VendorContractError(op, "<soc>", f"is not supported on {soc}", f"supported on {', '.join(allowed)}",
                                  source)
    return soc


# ----------------------------------------------------------------------------------------------- dtype ids
# torch_npu accepts dtypes either as torch.dtype objects or as integer ids: c10 ScalarType values for the
# standard types (op-plugin op_plugin/python/meta/_meta_registrations.py TORCH_DTYPE_MAP: int8 1, int32 3,
# float16 5, float32 6, bfloat16 15, float8_e5m2 23, float8_e4m3fn 24) and torch_npu's own ids for types torch
# lacks or that only it names (op-plugin docstrings / vllm-ascend tests/ut/conftest.py: hifloat8 290,
# float8_e5m2 291, float8_e4m3fn 292, float8_e8m0fnu 293, float4_e2m1fn_x2 296, float4_e1m2fn_x2 297).
DTYPE_SOURCE = ("op-plugin _meta_registrations.py TORCH_DTYPE_MAP; torch_npu docstrings; "
                "vllm-ascend tests/ut/conftest.py")
DTYPE_IDS: dict[int, str] = {
    0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 15: "bfloat16", 16: "quint4x2",
    23: "float8_e5m2", 24: "float8_e4m3fn",
    290: "hifloat8", 291: "float8_e5m2", 292: "float8_e4m3fn", 293: "float8_e8m0fnu",
    296: "float4_e2m1fn_x2", 297: "float4_e1m2fn_x2",
}
TORCH_NPU_DTYPE_IDS = {"hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
                       "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297}


def dtype_name(value: Any) -> str | None:
    """Canonical name ('int8', 'bfloat16', 'float8_e4m3fn', 'float4_e2m1fn_x2', ...) of a torch.dtype or an
    integer dtype id; None if it is neither."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, int) and not isinstance(value, bool):
        return DTYPE_IDS.get(value)
    return None


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def check_dtype_arg(op: str, arg: str, value: Any, allowed: Sequence[str], source: str) -> str:
    """Resolve a dtype argument (torch.dtype or id) and check it is one of `allowed` (names)."""
    name = dtype_name(value)
    if name is None or name not in allowed:
        raise VendorContractError(op, arg, f"is {value!r} ({name or 'not a dtype or known dtype id'})",
                                  f"one of {', '.join(allowed)}", f"{source}; ids: {DTYPE_SOURCE}")
    return name


# ----------------------------------------------------------------------------------------------- checks
def fail(op: str, arg: str, problem: str, rule: str = "", source: str = ""):
    raise VendorContractError(op, arg, problem, rule, source)


def need(cond: bool, op: str, arg: str, problem: str, rule: str, source: str) -> None:
    if not cond:
        raise VendorContractError(op, arg, problem, rule, source)


def check_in(op: str, arg: str, value: Any, allowed: Iterable[Any], source: str, rule: str = "") -> None:
    allowed = tuple(allowed)
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise VendorContractError(op, arg, f"is {value!r}", rule or f"one of {allowed}", source)
    if value not in allowed:
        raise VendorContractError(op, arg, f"is {value!r}", rule or f"one of {allowed}", source)


def check_int(op: str, arg: str, value: Any, source: str, lo: int | None = None, hi: int | None = None,
              rule: str = "") -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and lo is not None and value < lo:
        ok = False
    if ok and hi is not None and value > hi:
        ok = False
    if not ok:
        rng = rule or f"an int in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise VendorContractError(op, arg, f"is {value!r}", rng, source)
    return value


def check_tensor(op: str, arg: str, t: Any, source: str, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None, optional: bool = False) -> torch.Tensor | None:
    """Type, dtype, rank and non-emptiness of a tensor argument ("no empty tensors" is a rule of every
    fused DSV4 op read for this spec)."""
    if t is None:
        if optional:
            return None
        raise VendorContractError(op, arg, "is missing", "a tensor is required", source)
    if not isinstance(t, torch.Tensor):
        raise VendorContractError(op, arg, f"is a {type(t).__name__}", "a torch.Tensor", source)
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise VendorContractError(op, arg, f"has dtype {str(t.dtype).replace('torch.', '')}", f"dtype in {{{names}}}",
                                  source)
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            raise VendorContractError(op, arg, f"has {t.dim()} dims (shape {list(t.shape)})",
                                      f"{' or '.join(str(d) for d in dims)} dims", source)
    if t.numel() == 0:
        raise VendorContractError(op, arg, f"is empty (shape {list(t.shape)})", "no empty tensors", source)
    return t


def check_shape(op: str, arg: str, t: torch.Tensor, want: Sequence[int | None], source: str, rule: str = "") -> None:
    """Exact shape with None as a wildcard."""
    got = tuple(t.shape)
    ok = len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got))
    if not ok:
        shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
        raise VendorContractError(op, arg, f"has shape {list(got)}", rule or f"shape {shown}", source)


def check_prefix_sums(op: str, arg: str, t: torch.Tensor, source: str, first_zero: bool = True) -> list[int]:
    """cu_seqlens-style prefix sums: int32, 1-D, non-decreasing from 0. first_zero: B+1 entries starting with the
    0 (cu_seqlens); else B entries, the batches' ends only (the first >= 0)."""
    check_tensor(op, arg, t, source, dtypes=(torch.int32,), ndim=1)
    vals = [int(v) for v in t.tolist()]
    ends = vals if first_zero else [0] + vals
    need(all(b >= a for a, b in zip(ends, ends[1:])), op, arg, f"is {vals}",
         "prefix sums: every element >= the previous one" + ("" if first_zero else ", the first >= 0"), source)
    if first_zero:
        need(vals[0] == 0, op, arg, f"starts at {vals[0]}", "prefix sums starting at 0", source)
    return vals


def check_paged_cache(op: str, arg: str, cache: torch.Tensor, source: str, max_block: int = 1024) -> int:
    """[num_blocks, block_size, ...] with block_size a multiple of 16 and <= 1024 (PageAttention rule of the
    DSV4 attention / indexer ops). Returns block_size."""
    bs = cache.shape[1]
    need(bs % 16 == 0 and 0 < bs <= max_block, op, arg, f"has block_size {bs} (shape {list(cache.shape)})",
         f"block_size a multiple of 16 and <= {max_block}", source)
    return bs


def gather_paged(op: str, arg: str, cache: torch.Tensor, table_arg: str, table: torch.Tensor, lengths: list[int],
                 source: str) -> list[torch.Tensor]:
    """The rows of a paged cache [num_blocks, block_size, ...] per batch, read through its block table (int32
    [B, >= the most blocks a batch needs]): batch b's first lengths[b] rows, each flattened past the block dims
    ([lengths[b], prod(cache.shape[2:])])."""
    bs = check_paged_cache(op, arg, cache, source)
    check_tensor(op, table_arg, table, source, dtypes=(torch.int32,), ndim=2)
    width = max((-(-n // bs) for n in lengths), default=0)
    need(table.shape[0] == len(lengths) and table.shape[1] >= width, op, table_arg, f"has shape {list(table.shape)}",
         f"[B={len(lengths)}, >= {width}] (max length / block size, rounded up)", source)
    row = 1
    for s in cache.shape[2:]:
        row *= s
    rows = []
    for b, n in enumerate(lengths):
        ids = table[b, :-(-n // bs)].long()
        need(bool(((ids >= 0) & (ids < cache.shape[0])).all()), op, table_arg, f"row {b} names blocks {ids.tolist()}",
             f"block ids in [0, {cache.shape[0]})", source)
        rows.append(cache[ids].reshape(-1, row)[:n])
    return rows


# ----------------------------------------------------------------------------------------------- call log
def summarize(value: Any) -> str:
    """Short text for the call log: tensors as Tensor[shape](dtype), lists element-wise, scalars by repr."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(summarize(v) for v in value[:8])
        more = ", ..." if len(value) > 8 else ""
        return f"[{inner}{more}]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class CallRecord:
    """One call of a spec op: which op, through which namespace, with which arguments (summarised)."""
    op: str
    namespace: str
    args: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "namespace": self.namespace, "args": dict(self.args)}


class CallLog:
    """Append-only record of every spec-op call (a stand-in for 'which vendor op ran')."""

    def __init__(self):
        self.records: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        self.records.append(record)

    def since(self, start: int) -> list[CallRecord]:
        return self.records[start:]

    def __len__(self) -> int:
        return len(self.records)

    def ops(self, start: int = 0) -> list[str]:
        return [f"{r.namespace}.{r.op}" for r in self.records[start:]]


CALL_LOG = CallLog()


# ----------------------------------------------------------------------------------------------- SpecOp
class SpecOp:
    """A spec op with the vendor's exact Python signature.

    Calling it binds the arguments against the documented signature (names, positional vs keyword-only; a
    mismatch raises VendorContractError naming the argument), records the call in CALL_LOG, then runs the
    spec function, which checks the rest of the contract before computing.

    name: the op's name in its namespaces; namespaces: where the research note says it lives ('torch_npu' is
    the module attribute, 'npu' | 'custom' | '_C_ascend' are torch.ops namespaces);
    source: the document the signature and semantics come from.
    """

    def __init__(self, fn: Callable, name: str, namespaces: Sequence[str], source: str, key: str | None = None):
        self.fn = fn
        self.name = name
        self.namespaces = tuple(namespaces)
        self.source = source
        self.key = key or f"{self.namespaces[0]}.{name}"
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = name
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<SpecOp {self.key}{self.signature}>"

    def __call__(self, *args, **kwargs):
        return self.invoke("spec", args, kwargs)

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        params = list(self.signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
        if len(args) > len(positional):
            extra = len(args) - len(positional)
            if keyword_only:
                names = ", ".join(f"'{p.name}'" for p in keyword_only[:extra])
                raise VendorContractError(self.name, keyword_only[0].name,
                                          f"was passed positionally ({len(args)} positional arguments given)",
                                          f"{names} keyword-only: signature {self.name}{self.signature}",
                                          self.source)
            raise VendorContractError(self.name, "<positional>", f"got {len(args)} positional arguments",
                                      f"at most {len(positional)}: signature {self.name}{self.signature}",
                                      self.source)
        names = {p.name for p in params}
        for k in kwargs:
            if k not in names:
                raise VendorContractError(self.name, k, "is not an argument of this op",
                                          f"signature {self.name}{self.signature}", self.source)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            missing = [p.name for p in positional[len(args):]
                       if p.default is p.empty and p.name not in kwargs]
            missing += [p.name for p in keyword_only if p.default is p.empty and p.name not in kwargs]
            arg = missing[0] if missing else "<arguments>"
            raise VendorContractError(self.name, arg, f"could not be bound ({e})",
                                      f"signature {self.name}{self.signature}", self.source) from None
        return bound

    def invoke(self, namespace: str, args: tuple, kwargs: dict):
        bound = self.bind(args, kwargs)
        CALL_LOG.add(CallRecord(self.name, namespace,
                                {k: summarize(v) for k, v in bound.arguments.items()}))
        return self.fn(*bound.args, **bound.kwargs)


SPEC_OPS: dict[str, SpecOp] = {}


def spec_op(name: str, namespaces: Sequence[str], source: str):
    """Decorator: register `fn` as the spec of vendor op `name`, exposed in `namespaces`."""
    def deco(fn: Callable) -> SpecOp:
        op = SpecOp(fn, name, namespaces, source)
        if op.key in SPEC_OPS:
            raise ValueError(f"spec op {op.key} is defined twice")
        SPEC_OPS[op.key] = op
        return op
    return deco


# ----------------------------------------------------------------------------------------------- numerics helpers
def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def rope_rotate(x: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE's rotated partner of x along the last dim: interleave (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...);
    else rotate_half (x1, x2) -> (-x2, x1)."""
    if interleave:
        pair = x.unflatten(-1, (-1, 2))
        return torch.stack([-pair[..., 1], pair[..., 0]], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def empty_float() -> torch.Tensor:
    """The vendor's 'invalid / not returned' float output (an empty fp32 tensor)."""
    return torch.empty(0, dtype=torch.float32)


def placeholder(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An output the real op always allocates but whose values the documentation leaves undefined (e.g. the
    gating op's norm_out without out_flag). Shape and dtype are part of the contract, the values are not: the
    vendor check compares only the shape and dtype of such outputs (see is_placeholder)."""
    t = torch.zeros(shape, dtype=dtype, device=device)
    t._spec_undefined = True
    return t


def is_placeholder(t) -> bool:
    return bool(getattr(t, "_spec_undefined", False))


def is_transposed_last_two(t: torch.Tensor) -> bool:
    """The last two dims are a transpose of contiguous storage (stride [..., 1, rows]), batch dims packed: the
    one non-contiguous weight layout the matmul ops take (op-plugin QuantMatmulKernelNpuOpApi.cpp
    is_transpose_last_two_dims; npu_grouped_matmul doc: "支持weight转置")."""
    if t.dim() < 2:
        return False
    r, c = t.shape[-2], t.shape[-1]
    if t.stride(-2) != 1 or t.stride(-1) != r or (r == 1 and c == 1):
        return False
    step = r * c
    for d in range(t.dim() - 3, -1, -1):
        if t.stride(d) != step:
            return False
        step *= t.shape[d]
    return True


def check_contiguous(op: str, arg: str, t: torch.Tensor, source: str, allow_transposed: bool = False) -> bool:
    """Contiguous (or, where the op documents it, a transposed view of contiguous storage). Returns whether t is
    the transposed form."""
    if t.is_contiguous():
        return False
    if allow_transposed and is_transposed_last_two(t):
        return True
    rule = "contiguous" + (" or a transpose of the last two dims of contiguous storage" if allow_transposed else "")
    raise VendorContractError(op, arg, f"is non-contiguous (shape {list(t.shape)}, stride {list(t.stride())})",
                              rule, source)
