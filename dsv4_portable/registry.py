"""The op registry: ops defined by their reference function, providers per device type, backends as policies.

An `Op` is a contract: its pure-PyTorch reference function defines what it computes, its `spec` checks the
arguments before any work is done, and its `tolerance` says how another implementation is compared to it.
A `Provider` is one implementation of one op for one device type (`cpu`, `cuda`, `npu`), with
`availability()` (can it run on this machine at all) and `supports(*args)` (can it run this call), each returning
a list of reasons; an empty list means yes.

A `Backend` (chosen by `--device cpu|cuda|ascend`) is an ordered provider policy for one device type. Dispatch
takes the first provider of the active backend that is available and supports the call; the reference is the
declared last resort. Dispatch is strict: a provider that raises fails the call, nothing silently falls back.
Every call is counted per (op, provider) so a run can report which implementation actually ran.

Plain Python dispatch on purpose: `torch.library.custom_op` costs several times more per call (see
benchmarks/bench_dispatch.py).
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

REFERENCE = "reference"


class OpInputError(ValueError):
    """An op was called with a missing, misshapen or wrongly typed argument."""


class UnknownDeviceError(ValueError):
    """A device/backend name that the library does not know."""


class BackendUnavailableError(RuntimeError):
    """A known backend that cannot run on this machine (the message says why and what to do)."""


class NoProviderError(RuntimeError):
    """No provider of the active backend can run this call (only possible when the reference is excluded)."""


# ----------------------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """How a provider's output is compared with the reference.

    kind: "exact" (bitwise), "allclose" (|a-b| <= atol + rtol*|b| elementwise), "set" (index sets per row are
    compared; order is not part of the contract) or "similarity" (1 - cosine-type similarity <= max_diff).
    atol may scale with the reduction length: atol_per_sqrt_k * sqrt(k) is added when the case states k.
    """
    kind: str
    atol: float = 0.0
    rtol: float = 0.0
    atol_per_sqrt_k: float = 0.0
    max_diff: float = 0.0
    max_mismatch: float = 0.0  # fraction of elements allowed outside atol/rtol (quantised boundaries)
    source: str = ""

    def describe(self) -> str:
        if self.kind == "exact":
            return f"bitwise ({self.source})"
        if self.kind == "set":
            return f"index sets equal ({self.source})"
        if self.kind == "similarity":
            return f"1-sim <= {self.max_diff:g} ({self.source})"
        extra = f" + {self.atol_per_sqrt_k:g}*sqrt(k)" if self.atol_per_sqrt_k else ""
        mm = f", mismatch <= {self.max_mismatch:g}" if self.max_mismatch else ""
        return f"atol {self.atol:g}{extra}, rtol {self.rtol:g}{mm} ({self.source})"


# ----------------------------------------------------------------------------------------------- argument specs
_FLOAT_KINDS = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "f32": (torch.float32, torch.float64),  # fp64 accepted so the reference can run in float64
    "int": (torch.int32, torch.int64),
    "int32": (torch.int32,),
    "int64": (torch.int64,),
    "index": (torch.int32, torch.int64),
    "fp8": (torch.float8_e4m3fn,),
    "packed4": (torch.int8, torch.uint8),
    "int8": (torch.int8,),
    "scale": (torch.float32, torch.float64, torch.float8_e8m0fnu),
    "any": None,
}


@dataclass(frozen=True)
class Arg:
    """One tensor argument: name, symbolic shape ("B S H D", numbers allowed, "*" for any number of leading
    dims), dtype kind (a key of _FLOAT_KINDS), optional, and `same_dtype` naming another argument."""
    name: str
    shape: str
    dtype: str = "float"
    optional: bool = False
    same_dtype: str | None = None


def _check_args(op_name: str, spec: Sequence[Arg], values: dict[str, Any]) -> None:
    dims: dict[str, int] = {}
    device = None
    first = None
    for a in spec:
        t = values.get(a.name)
        if t is None:
            if a.optional:
                continue
            raise OpInputError(f"{op_name}: argument '{a.name}' is missing (expected a tensor of shape [{a.shape}])")
        if not isinstance(t, torch.Tensor):
            raise OpInputError(f"{op_name}: argument '{a.name}' must be a torch.Tensor of shape [{a.shape}], "
                               f"got {type(t).__name__}")
        allowed = _FLOAT_KINDS[a.dtype]
        if allowed is not None and t.dtype not in allowed:
            raise OpInputError(f"{op_name}: '{a.name}' has dtype {t.dtype}; expected one of "
                               f"{', '.join(str(d) for d in allowed)}")
        if a.same_dtype is not None:
            other = values.get(a.same_dtype)
            if isinstance(other, torch.Tensor) and other.dtype != t.dtype:
                raise OpInputError(f"{op_name}: '{a.name}' has dtype {t.dtype} but '{a.same_dtype}' has "
                                   f"{other.dtype}; they must match")
        if device is None:
            device, first = t.device, a.name
        elif t.device != device:
            raise OpInputError(f"{op_name}: '{a.name}' is on {t.device} but '{first}' is on {device}; "
                               "all tensors of one call must be on the same device")
        want = a.shape.split()
        got = tuple(t.shape)
        if want and want[0] == "*":
            want = want[1:]
            if len(got) < len(want):
                raise OpInputError(f"{op_name}: '{a.name}' has shape {list(got)}; expected [..., {' '.join(want)}]")
            got = got[len(got) - len(want):]
        elif len(got) != len(want):
            raise OpInputError(f"{op_name}: '{a.name}' has shape {list(got)}; expected [{a.shape}] "
                               f"({len(want)} dims)")
        for sym, n in zip(want, got):
            if sym.isdigit():
                if int(sym) != n:
                    raise OpInputError(f"{op_name}: '{a.name}' has shape {list(t.shape)}; expected [{a.shape}] "
                                       f"with {sym} in that position")
            elif sym in dims and dims[sym] != n:
                raise OpInputError(f"{op_name}: '{a.name}' has shape {list(t.shape)}; expected [{a.shape}] "
                                   f"with {sym}={dims[sym]} (fixed by an earlier argument)")
            else:
                dims[sym] = n


# ----------------------------------------------------------------------------------------------- providers
@dataclass
class Provider:
    """One implementation of one op on one device type."""
    op: str
    name: str
    device_type: str  # "cpu", "cuda" or "npu"; the reference uses "any"
    fn: Callable[..., Any]
    available_fn: Callable[[], list[str]] | None = None
    supports_fn: Callable[..., list[str]] | None = None
    note: str = ""
    # Whether a row's result is claimed not to depend on the other rows of the call (conformance fails a claimed
    # one that differs; an unclaimed one is recorded). The reference claims it; a provider whose launch plan
    # follows the batch (split-K chosen from the grid size, a device matmul's own tiling) says False.
    batch_invariant: bool = True
    _availability: list[str] | None = field(default=None, repr=False)

    def availability(self) -> list[str]:
        """Reasons this provider cannot run on this machine at all (cached; empty = available)."""
        if self._availability is None:
            self._availability = list(self.available_fn()) if self.available_fn else []
        return self._availability

    def available(self) -> bool:
        return not self.availability()

    def supports(self, *args, **kwargs) -> list[str]:
        """Reasons this provider cannot run this particular call (empty = supported)."""
        return list(self.supports_fn(*args, **kwargs)) if self.supports_fn else []

    def reset(self) -> None:
        self._availability = None


class Op:
    """A registry op: the reference function is the definition; providers are faster twins of it."""

    def __init__(self, name: str, reference: Callable[..., Any], spec: Sequence[Arg] = (),
                 tolerance: Tolerance | dict[str, Tolerance] | None = None,
                 check: Callable[..., None] | None = None):
        self.name = name
        self.reference = reference
        self.spec = tuple(spec)
        if isinstance(tolerance, Tolerance) or tolerance is None:
            tolerance = {"default": tolerance or Tolerance("allclose", 1e-5, 1.3e-6, source="fp32 default")}
        self.tolerances: dict[str, Tolerance] = tolerance
        self.extra_check = check
        self.__doc__ = reference.__doc__
        self.providers: list[Provider] = [Provider(name, REFERENCE, "any", reference)]
        self.counts: Counter[str] = Counter()
        self._params = list(_param_names(reference))
        self._plan_key: tuple | None = None
        self._plan: list[Provider] = []

    @property
    def params(self) -> list[str]:
        """The op's argument names, in order (those of its reference function)."""
        return list(self._params)

    def tolerance(self, dtype: torch.dtype | str | None = None) -> Tolerance:
        """The tolerance for outputs of `dtype` (keys: "bfloat16", "float16", "float32", ..., "default")."""
        key = str(dtype).replace("torch.", "") if dtype is not None else "default"
        return self.tolerances.get(key, self.tolerances.get("default") or next(iter(self.tolerances.values())))

    def __repr__(self) -> str:
        return f"<Op {self.name}: {', '.join(p.name for p in self.providers)}>"

    # -- argument checking --------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        values = dict(zip(self._params, args))
        if len(args) > len(self._params):
            raise OpInputError(f"{self.name}: takes {len(self._params)} arguments, got {len(args)}")
        for k, v in kwargs.items():
            if k not in self._params:
                raise OpInputError(f"{self.name}: unknown argument '{k}' (arguments: {', '.join(self._params)})")
            if k in values:
                raise OpInputError(f"{self.name}: argument '{k}' given twice")
            values[k] = v
        return values

    def validate(self, *args, **kwargs) -> None:
        """Raise OpInputError naming the argument if the call breaks the op's contract."""
        values = self.bind(args, kwargs)
        _check_args(self.name, self.spec, values)
        if self.extra_check is not None:
            self.extra_check(**values)

    # -- providers -----------------------------------------------------------------------------------------
    def register(self, provider: Provider) -> Provider:
        if provider.op != self.name:
            raise ValueError(f"provider {provider.name} is for op {provider.op}, not {self.name}")
        self.providers = [p for p in self.providers if not (p.name == provider.name and
                                                            p.device_type == provider.device_type)]
        self.providers.insert(len(self.providers) - 1, provider)  # the reference stays last
        self._plan_key = None
        return provider

    def provider(self, name: str, device_type: str | None = None) -> Provider:
        for p in self.providers:
            if p.name == name and (device_type is None or p.device_type in (device_type, "any")):
                return p
        known = ", ".join(f"{p.name}[{p.device_type}]" for p in self.providers)
        raise KeyError(f"op {self.name} has no provider '{name}' (known: {known})")

    def candidates(self, backend: "Backend | None" = None) -> list[Provider]:
        """The providers the backend would try for this op, in order (reference last)."""
        backend = backend or active_backend()
        key = (backend.name, tuple(backend.preference), len(self.providers))  # preference may change (tests)
        if key != self._plan_key:
            own = [p for p in self.providers if p.device_type == backend.device_type]
            rank = {n: i for i, n in enumerate(backend.preference)}
            own.sort(key=lambda p: rank.get(p.name, len(rank)))
            self._plan = own + [self.providers[-1]]
            self._plan_key = key
        return self._plan

    def select(self, *args, **kwargs) -> Provider:
        for p in self.candidates():
            if p.available() and not p.supports(*args, **kwargs):
                return p
        raise NoProviderError(f"{self.name}: no provider can run this call")  # unreachable: reference last

    def explain(self, *args, backend: "Backend | None" = None, **kwargs) -> list[tuple[str, str, list[str]]]:
        """[(provider, "chosen" | "skipped" | "not reached", reasons)] for this call on the backend."""
        out, chosen = [], False
        for p in self.candidates(backend):
            if chosen:
                out.append((p.name, "not reached", []))
                continue
            reasons = p.availability()
            if not reasons and (args or kwargs):
                reasons = p.supports(*args, **kwargs)
            if reasons:
                out.append((p.name, "skipped", reasons))
            else:
                out.append((p.name, "chosen", []))
                chosen = True
        return out

    # -- calling -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self.validate(*args, **kwargs)
        p = self.select(*args, **kwargs)
        self.counts[p.name] += 1
        return p.fn(*args, **kwargs)

    def run(self, provider: str, *args, device_type: str | None = None, **kwargs):
        """Run one named provider (conformance, benchmarks). Raises if it cannot run this call."""
        self.validate(*args, **kwargs)
        p = self.provider(provider, device_type)
        reasons = p.availability() or p.supports(*args, **kwargs)
        if reasons:
            raise NoProviderError(f"{self.name}: provider '{provider}' cannot run this call: {'; '.join(reasons)}")
        self.counts[p.name] += 1
        return p.fn(*args, **kwargs)


def _param_names(fn: Callable) -> Iterable[str]:
    import inspect
    for name, prm in inspect.signature(fn).parameters.items():
        if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY):
            yield name


OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable, spec: Sequence[Arg] = (),
              tolerance: Tolerance | dict[str, Tolerance] | None = None, check: Callable[..., None] | None = None) -> Op:
    if name in OPS:
        raise ValueError(f"op {name} is already defined")
    op = OPS[name] = Op(name, reference, spec, tolerance, check)
    return op


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise OpInputError(f"unknown op '{name}' (known ops: {', '.join(sorted(OPS))})") from None


def register(op: str, name: str, device_type: str, *, available: Callable[[], list[str]] | None = None,
             supports: Callable[..., list[str]] | None = None, note: str = "", batch_invariant: bool = True):
    """Decorator: register `fn` as provider `name` of `op` on `device_type`."""
    def deco(fn):
        get_op(op).register(Provider(op, name, device_type, fn, available, supports, note, batch_invariant))
        return fn
    return deco


# ----------------------------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """A `--device` choice: a device type plus an ordered provider preference; the reference is implicit last."""
    name: str
    device_type: str
    preference: list[str]
    modules: list[str]  # modules whose import registers this backend's providers
    available_fn: Callable[[], list[str]] | None = None
    help: str = ""
    # Returns a description when the backend runs simulated on CPU tensors (Triton interpreter, Ascend spec
    # stand-in): a correctness check of its providers, never a device result. None on real hardware.
    simulated_fn: Callable[[], str | None] | None = None
    # requested weight mode -> (mode to load with, a sentence saying why): how this device runs the checkpoint's
    # FP8/FP4 weights. None: "auto" means native, anything else is taken as asked.
    weights_fn: Callable[[str], tuple[str, str]] | None = None
    _loaded: bool = False

    def weight_mode(self, requested: str = "auto") -> tuple[str, str]:
        """(weight mode, reason) for a requested mode ("auto" lets the device decide)."""
        if self.weights_fn is not None:
            return self.weights_fn(requested)
        if requested == "auto":
            return "native", f"{self.name}: native (auto: the checkpoint's formats run as stored)"
        return requested, f"{self.name}: {requested} (as requested)"

    def simulated(self) -> str | None:
        return self.simulated_fn() if self.simulated_fn else None

    def availability(self) -> list[str]:
        return list(self.available_fn()) if self.available_fn else []

    def load_providers(self) -> list[str]:
        """Import the provider modules (never torch_npu itself; that happens on first availability probe)."""
        errors = []
        if not self._loaded:
            for m in self.modules:
                try:
                    importlib.import_module(m)
                except ImportError as e:  # a missing optional package only disables those providers
                    errors.append(f"{m}: {e}")
            self._loaded = True
        return errors

    def torch_device(self) -> torch.device:
        return torch.device("cpu" if self.simulated() else self.device_type)


BACKENDS: dict[str, Backend] = {}
_state = threading.local()


def add_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownDeviceError(f"unknown device '{name}' (choose one of: {', '.join(BACKENDS)})") from None


def active_backend() -> Backend:
    b = getattr(_state, "backend", None)
    return b if b is not None else BACKENDS["cpu"]


def check_available(name: str) -> Backend:
    """The backend `name` with its providers loaded, if it can run here; else UnknownDeviceError or
    BackendUnavailableError with the reasons. The active backend is left as it is."""
    b = get_backend(name)
    b.load_providers()
    reasons = b.availability()
    if reasons:
        raise BackendUnavailableError(f"--device {name} is not available on this machine: "
                                      + "; ".join(reasons) + (f". {b.help}" if b.help else ""))
    return b


def set_backend(name: str, *, require_available: bool = True) -> Backend:
    """Make `name` the active backend for this thread. Raises if it cannot run here (with the reasons)."""
    if require_available:
        b = check_available(name)
    else:
        b = get_backend(name)
        b.load_providers()
    _state.backend = b
    return b


@contextlib.contextmanager
def use_backend(name: str, *, require_available: bool = True):
    prev = getattr(_state, "backend", None)
    b = set_backend(name, require_available=require_available)
    try:
        yield b
    finally:
        _state.backend = prev


def explain(op_name: str, *args, backend: "Backend | str | None" = None, **kwargs):
    """[(provider, "chosen" | "skipped" | "not reached", reasons)] for calling op `op_name` with these
    arguments on `backend` (a name, a Backend, or None for the active one). With no arguments, only
    availability is considered."""
    b = get_backend(backend) if isinstance(backend, str) else backend
    if b is not None:
        b.load_providers()
    return get_op(op_name).explain(*args, backend=b, **kwargs)


def provider_counts() -> dict[str, dict[str, int]]:
    """{op: {provider: calls}} since the last reset, for ops that ran."""
    return {name: dict(op.counts) for name, op in OPS.items() if op.counts}


def reset_counts() -> None:
    for op in OPS.values():
        op.counts.clear()


def reset_availability() -> None:
    """Forget every provider's cached availability (after a vendor library appears or goes, e.g. in tests)."""
    for op in OPS.values():
        for p in op.providers:
            p.reset()
