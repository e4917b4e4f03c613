"""Triton kernel of the Hadamard rotation (the indexer's QAT rotation, DESIGN.md 2.4).

One program rotates BLOCK_R rows of length D as one tensor-core product y = x @ H_D * D^-0.5. H_D (Sylvester
order, H[i, j] = (-1)^popcount(i & j)) is generated in registers, never read from memory. Its entries are +-1,
exact in every float format, so with bf16/fp16 rows each product is exact and the fp32 accumulator holds the
same terms the reference butterfly adds, in a different order (hence a tolerance, not bit-exactness).
fp32 rows take the butterfly instead (BUTTERFLY): an exact-fp32 tl.dot would hold H_D in shared memory as fp32
(256 KB at D = 256, over sm90's 227 KB) and run on FMA units; the butterfly needs no H_D, does D*log2(D)
additions per row and adds in the reference's order, so fp32 results are the reference's bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import cast_out, hadamard_butterfly


@triton.jit
def hadamard_kernel(x_ptr, y_ptr, n_rows, row_stride, scale, D: tl.constexpr, BLOCK_R: tl.constexpr,
                    BUTTERFLY: tl.constexpr, LOG2_D: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
                    OUT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    mask = (rows < n_rows)[:, None]
    x = tl.load(x_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if BUTTERFLY:
        y = hadamard_butterfly(x.to(tl.float32), BLOCK_R, D, LOG2_D) * scale
    else:
        # parity of popcount(i & j), one bit at a time (D <= 256: 8 bits)
        both = cols[:, None] & cols[None, :]
        parity = both & 1
        for b in tl.static_range(1, 8):
            parity = parity ^ ((both >> b) & 1)
        h = (1 - 2 * parity).to(DOT_DT)
        y = tl.dot(x.to(DOT_DT), h, input_precision=PRECISION) * scale
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], cast_out(y, OUT_DT, INTERPRET), mask=mask)
