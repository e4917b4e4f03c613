"""Shared checks of the Ascend providers: where tensors must live, which chips a vendor op serves, and views of
cache storage in the paged layouts the fused ops read."""
from __future__ import annotations

import sys

import torch

from . import chip as chip_mod
from . import vendor_ops

# Chips each vendor op is used on, by "namespace.name" (the backend's own reading; the spec keeps its own).
# Where the op-plugin doc's table lists A2/A3 only but public 950 code calls the op, the 950 is included and the
# evidence is named in the spec's ASSUMPTIONS (conformance/ascend_spec/__init__.py).
ALL_CHIPS = ("A2", "A3", "950")
CHIPS = {
    "custom.npu_hc_pre": ("A3", "950"),                       # cann-recipes doc: A3 and 950
    "torch_npu.npu_dynamic_quant": ("A2", "A3"),              # int8 destinations are A2/A3 (doc)
    "npu.npu_dynamic_quant": ("A2", "A3"),
    "_C_ascend.npu_sparse_attn_sharedkv": ("A2", "A3"),       # kernel README: 950 not supported
    "custom.npu_sparse_attn_sharedkv": ("A2", "A3"),
    "_C_ascend.compressor": ("A3", "950"),                    # compressor README: A2 not supported
    "custom.compressor": ("A3", "950"),
}


def simulated() -> bool:
    """True under the spec stand-in (conformance/ascend_spec/standin.py): ops run on CPU tensors."""
    return bool(getattr(sys.modules.get("torch_npu"), "__spec_standin__", False))


def device_reasons(*tensors) -> list[str]:
    want = "cpu" if simulated() else "npu"
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != want:
            return [f"tensor on {t.device}, this provider runs on {want}" + (" (spec stand-in)" if simulated() else "")]
    return []


def chip_reasons(key: str, chips: tuple[str, ...] | None = None) -> list[str]:
    """Why the resolved vendor op `key` ("namespace.name", or a mode of one) is not used on this chip (empty when
    it is); chips: where it is used (default: its CHIPS entry, else every chip)."""
    chips = chips or CHIPS.get(key, ALL_CHIPS)
    c = chip_mod.chip()
    if c in chips:
        return []
    return [f"{key} is used on {', '.join(chips)}; this chip is {c or 'unknown'} (SoC {chip_mod.soc_version()})"]


def availability(*candidate_sets: vendor_ops.Candidates):
    """available_fn for a provider that needs one op out of each candidate set, on a chip each op serves."""
    def available() -> list[str]:
        out = []
        for cands in candidate_sets:
            missing = vendor_ops.reasons(cands)
            out += missing or chip_reasons(vendor_ops.where(cands))
        return out
    return available


def paged_rows(t: torch.Tensor, max_block: int = 1024) -> tuple[torch.Tensor, int, int] | None:
    """A zero-copy paged view [B * cap / bs, bs, 1, D] of the rows t [B, N, D] when t is the head of a per-batch
    store of `cap` contiguous rows (a KV cache slice store[:, :N]) whose capacity divides into blocks of bs rows
    (a multiple of 16, at most max_block). Returns (blocks, bs, blocks per batch), or None when the storage does
    not allow it (the caller then pads a copy). The blocks past row N hold whatever the store holds: the fused ops
    read only rows below the lengths they are given."""
    b, n, d = t.shape
    if t.stride(2) != 1 or t.stride(1) != d or t.stride(0) % d:
        return None
    cap = t.stride(0) // d                      # rows per batch in the store (N for a fresh tensor)
    bs = next((s for s in (1024, 512, 256, 128, 64, 32, 16) if s <= max_block and cap % s == 0), None)
    if bs is None or cap < n:
        return None
    if t.storage_offset() + b * cap * d > t.untyped_storage().nbytes() // t.element_size():
        return None
    view = torch.as_strided(t, (b * cap // bs, bs, 1, d), (bs * d, d, d, 1), t.storage_offset())
    return view, bs, cap // bs


def padded_rows(t: torch.Tensor, bs: int) -> tuple[torch.Tensor, int, int]:
    """A copy of t [B, N, D] padded to a multiple of bs rows per batch, as blocks [B * nb, bs, 1, D]."""
    b, n, d = t.shape
    nb = max(1, -(-n // bs))
    out = torch.nn.functional.pad(t, (0, 0, 0, nb * bs - n))
    return out.reshape(b * nb, bs, 1, d), bs, nb


def block_table(batch_of_row: torch.Tensor, blocks_per_batch: int, n_blocks: int) -> torch.Tensor:
    """int32 [R, n_blocks]: row r reads blocks batch_of_row[r] * blocks_per_batch + j (device ops only)."""
    j = torch.arange(n_blocks, device=batch_of_row.device, dtype=torch.int32)
    return (batch_of_row.to(torch.int32).unsqueeze(1) * blocks_per_batch + j).contiguous()
