"""The KV cache: per layer a sliding-window ring, the compressed entries, and the compressor/indexer decode state.

Two layouts for the attention entries (window and compressed):
- "plain": rows of head_dim values in the model dtype.
- "fp8" (DeepSeek's layout, DESIGN.md section 6): 584 bytes per entry = 448 e4m3 non-rope values, 64 bf16 rope
  values, 7 ue8m0 scales (one per 64 non-rope values) and 1 pad byte. Indexer keys: 64 bytes of packed FP4 + 4
  ue8m0 scales (68 bytes). With quant_sim on, every cached entry is already FP8-representable in its non-rope dims
  and every indexer key FP4-representable, so this layout stores them exactly: the model's logits are bitwise those
  of the plain layout (tests/test_model.py::test_fp8_cache_layout_is_bitwise_equal_to_plain shows it). It needs bf16 activations (the rope dims are bf16).
All rows of a batch share the same position (prompts in one batch have equal length).

Writes are on the decode hot path: they never read a value back to the host (no `.tolist()`, no `.any()`), so
a GPU step is not stalled by the cache. Scales come from the quantisers' power-of-two rule and are stored with
`e8m0_bits` unchecked; the checked `float_to_e8m0` is for load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference as R
from ..config import ModelConfig

FP8_ENTRY_BYTES = 584   # V4: 448 + 2*64 + 7 scale bytes, padded to a multiple of 8
FP4_KEY_BYTES = 68      # V4 indexer: 128 FP4 values (64 bytes) + 4 scales


def fp8_entry_layout(head_dim: int, rope_dim: int) -> tuple[int, int, int]:
    """(scale byte offset, number of scales, total bytes) of one packed FP8 entry."""
    nope = head_dim - rope_dim
    scale_at = nope + 2 * rope_dim
    return scale_at, nope // 64, -(-(scale_at + nope // 64) // 8) * 8


class CacheError(ValueError):
    """The cache cannot hold what was asked (too long a prompt, wrong batch, unsupported layout)."""


def python_arg(name: str, *value) -> str:
    """An argument as a Python caller writes it, for messages: `top_p`, or with a value `layout='fp8'`. The
    argument checkers take the speller as a parameter so the CLI runs the same checks in its flags' words
    (commands.cli_arg: `--top-p`, `--cache-layout fp8`)."""
    return f"{name}={value[0]!r}" if value else name


def check_layout(layout: str, dtype: torch.dtype, quant_sim: bool, arg=python_arg) -> str:
    """The cache layout `layout` ("auto", "plain" or "fp8") stands for with these activations; CacheError if it
    cannot hold them exactly. Pure: nothing is allocated."""
    if layout == "auto":
        return "fp8" if (quant_sim and dtype == torch.bfloat16) else "plain"
    if layout not in ("plain", "fp8"):
        raise CacheError(f"{arg('layout', layout)} is unknown (plain, fp8 or auto)")
    if layout == "fp8" and dtype != torch.bfloat16:
        raise CacheError(f"{arg('layout', 'fp8')} keeps bf16 rope dims and needs {arg('dtype', 'bf16')}, got "
                         f"{arg('dtype', str(dtype).removeprefix('torch.'))}")
    if layout == "fp8" and not quant_sim:
        raise CacheError(f"{arg('layout', 'fp8')} stores entries exactly only with the QAT simulation on: drop "
                         f"{arg('quant_sim', False)} or use {arg('layout', 'plain')}")
    return layout


class EntryStore:
    """[B, N, head_dim] rows, stored plain or in the packed FP8 layout; read back as the model dtype."""

    def __init__(self, batch: int, n: int, head_dim: int, rope_dim: int, dtype: torch.dtype, device, layout: str):
        self.layout, self.head_dim, self.rope_dim, self.dtype = layout, head_dim, rope_dim, dtype
        self.nope = head_dim - rope_dim
        self.scale_at, self.n_scales, nbytes = fp8_entry_layout(head_dim, rope_dim)
        if layout == "plain":
            self.data = torch.zeros(batch, n, head_dim, dtype=dtype, device=device)
        else:
            self.data = torch.zeros(batch, n, nbytes, dtype=torch.uint8, device=device)

    def _pack(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows [B, n, head_dim] as stored (the model dtype, or packed FP8 entries [B, n, bytes] uint8), written
        into `out` (a [B, n, ...] slice of the store) or, without one, into a new tensor. The pad byte is never
        written: the store starts zeroed."""
        if self.layout == "plain":
            return rows.to(self.dtype) if out is None else out.copy_(rows)
        if out is None:
            out = rows.new_zeros(*rows.shape[:-1], self.data.shape[-1], dtype=torch.uint8)
        q, s = R.quant_fp8(rows[..., :self.nope], 64)
        out[..., :self.nope] = q.view(torch.uint8)
        out[..., self.nope:self.nope + 2 * self.rope_dim] = rows[..., self.nope:].to(torch.bfloat16).contiguous() \
            .view(torch.uint8)
        out[..., self.scale_at:self.scale_at + self.n_scales] = R.quant.e8m0_bits(s)
        return out

    def write(self, rows: torch.Tensor, start: int) -> None:
        """rows [B, n, head_dim] at entry positions [start, start+n) (slot indices, not token positions), packed
        straight into the store."""
        self._pack(rows, self.data[:, start:start + rows.shape[1]])

    def write_ring(self, rows: torch.Tensor, first_pos: int) -> None:
        """The window ring: rows [B, n, head_dim] of token positions first_pos .. first_pos+n-1 (n <= ring size)
        into slots pos % size, as at most two contiguous slices computed from Python ints. Packed straight into
        the store unless the rows wrap around the end (then packed once and copied as two slices)."""
        size, n = self.data.shape[1], rows.shape[1]
        if n > size:
            raise CacheError(f"write_ring: {n} rows do not fit a ring of {size} slots")
        a = first_pos % size
        head = min(n, size - a)
        if head == n:
            self._pack(rows, self.data[:, a:a + n])
            return
        packed = self._pack(rows)
        self.data[:, a:a + head] = packed[:, :head]
        self.data[:, :n - head] = packed[:, head:]

    def read(self, n: int | None = None) -> torch.Tensor:
        """The first n entries as [B, n, head_dim] in the model dtype: plain, a view of the store; fp8, the n
        entries dequantised into a new tensor (every read, i.e. every step)."""
        d = self.data if n is None else self.data[:, :n]
        if self.layout == "plain":
            return d
        q = d[..., :self.nope].contiguous().view(torch.float8_e4m3fn)
        s = R.quant.e8m0_to_float(d[..., self.scale_at:self.scale_at + self.n_scales].contiguous())
        nope = R.dequant_fp8(q, s, 64).to(self.dtype)
        rope = d[..., self.nope:self.nope + 2 * self.rope_dim].contiguous().view(torch.bfloat16).to(self.dtype)
        return torch.cat([nope, rope], dim=-1)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class KeyStore:
    """Indexer keys [B, N, index_head_dim]: plain, or packed FP4 (64 bytes) + 4 ue8m0 scales per key."""

    def __init__(self, batch: int, n: int, dim: int, dtype: torch.dtype, device, layout: str):
        self.layout, self.dim, self.dtype = layout, dim, dtype
        if layout == "plain":
            self.data = torch.zeros(batch, n, dim, dtype=dtype, device=device)
        else:
            self.data = torch.zeros(batch, n, dim // 2 + dim // 32, dtype=torch.uint8, device=device)

    def write(self, rows: torch.Tensor, start: int) -> None:
        n = rows.shape[1]
        if self.layout == "plain":
            self.data[:, start:start + n] = rows.to(self.dtype)
            return
        packed, s = R.quant_fp4(rows, 32)
        self.data[:, start:start + n, :self.dim // 2] = packed
        self.data[:, start:start + n, self.dim // 2:] = R.quant.e8m0_bits(s)

    def read(self, n: int) -> torch.Tensor:
        """The first n keys [B, n, dim] in the model dtype: plain, a view of the store; fp8, dequantised anew."""
        d = self.data[:, :n]
        if self.layout == "plain":
            return d
        s = R.quant.e8m0_to_float(d[..., self.dim // 2:].contiguous())
        return R.dequant_fp4(d[..., :self.dim // 2], s, 32).to(self.dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class CompressorState:
    kv: torch.Tensor      # fp32 [B, coff*ratio, coff*d]
    score: torch.Tensor

    @classmethod
    def new(cls, batch, ratio, d, device):
        coff = 2 if ratio == 4 else 1
        return cls(torch.zeros(batch, coff * ratio, coff * d, device=device),
                   torch.full((batch, coff * ratio, coff * d), float("-inf"), device=device))

    def nbytes(self) -> int:
        return 2 * self.kv.numel() * 4


class LayerCache:
    def __init__(self, cfg: ModelConfig, ratio: int, batch: int, max_len: int, dtype, device, layout: str):
        self.ratio = ratio
        w = cfg.window_size
        self.window = EntryStore(batch, w, cfg.head_dim, cfg.rope_head_dim, dtype, device, layout)
        self.comp = self.comp_state = self.keys = self.key_state = None
        if ratio:
            self.comp = EntryStore(batch, max_len // ratio, cfg.head_dim, cfg.rope_head_dim, dtype, device, layout)
            self.comp_state = CompressorState.new(batch, ratio, cfg.head_dim, device)
        if ratio == 4:
            self.keys = KeyStore(batch, max_len // ratio, cfg.index_head_dim, dtype, device, layout)
            self.key_state = CompressorState.new(batch, ratio, cfg.index_head_dim, device)

    def parts(self):
        return [p for p in (self.window, self.comp, self.comp_state, self.keys, self.key_state) if p is not None]


class KVCache:
    """Pre-allocated cache for `batch` sequences of up to `max_len` tokens."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.bfloat16, device="cpu",
                 layout: str = "auto", quant_sim: bool = True, n_layers: int | None = None):
        layout = check_layout(layout, dtype, quant_sim)
        if max_len < 1 or batch < 1:
            raise CacheError(f"cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        if max_len > cfg.max_position_embeddings:
            raise CacheError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        self.cfg, self.batch, self.max_len, self.layout = cfg, batch, max_len, layout
        self.dtype, self.device = dtype, torch.device(device)
        n = cfg.n_layers if n_layers is None else n_layers
        self.layers = [LayerCache(cfg, cfg.ratio(i), batch, max_len, dtype, device, layout) for i in range(n)]
        self.mtp = [LayerCache(cfg, cfg.ratio(cfg.n_layers + i), batch, max_len, dtype, device, layout)
                    for i in range(cfg.n_mtp_layers)]
        self.pos = 0          # tokens already in the cache (same for every row)
        self.mtp_pos = 0

    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != self.batch:
            raise CacheError(f"input batch {batch} does not match the cache's batch {self.batch}")
        if self.pos + new_tokens > self.max_len:
            raise CacheError(f"{new_tokens} new tokens after {self.pos} cached exceed the cache length "
                             f"{self.max_len}; create a longer cache (max_len)")

    def nbytes(self) -> int:
        return sum(p.nbytes() for lc in self.layers + self.mtp for p in lc.parts())

    def bytes_per_token(self) -> float:
        """Allocated bytes divided by the capacity in tokens (window rings and states amortised)."""
        return self.nbytes() / (self.batch * self.max_len)


def entry_bytes(cfg: ModelConfig, layout: str, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes per attention entry, bytes per indexer key) for a layout."""
    if layout == "fp8":
        return fp8_entry_layout(cfg.head_dim, cfg.rope_head_dim)[2], cfg.index_head_dim // 2 + cfg.index_head_dim // 32
    return cfg.head_dim * dtype_bytes, cfg.index_head_dim * dtype_bytes


def kv_bytes_per_sequence(cfg: ModelConfig, context: int, layout: str = "fp8", dtype_bytes: int = 2,
                          include_mtp: bool = False) -> dict:
    """Cache bytes for one sequence of `context` tokens, by part (no allocation)."""
    e, k = entry_bytes(cfg, layout, dtype_bytes)
    n_layers = cfg.n_layers + (cfg.n_mtp_layers if include_mtp else 0)
    out = {"window": 0, "compressed": 0, "indexer": 0, "state": 0}
    for i in range(n_layers):
        r = cfg.ratio(i)
        out["window"] += cfg.window_size * e
        if r:
            coff = 2 if r == 4 else 1
            out["compressed"] += (context // r) * e
            out["state"] += 2 * 4 * coff * r * coff * cfg.head_dim
        if r == 4:
            out["indexer"] += (context // 4) * k
            out["state"] += 2 * 4 * 8 * 2 * cfg.index_head_dim
    out["total"] = sum(out.values())
    return out
