"""Executable spec of the Ascend vendor ops the ascend backend calls (ships with the conformance suite).

Each spec op is a pure-PyTorch implementation of the op's documented semantics that first enforces its documented
argument contract (names, layouts, dtype ids, enum values, shape limits, chip generation) and raises
VendorContractError naming the op, the argument, the rule and its source. Sources: /work/shared/research/ascend.md
(torch_npu 2.13.0 op schemas and docstrings, vllm-ascend, cann-recipes-infer, ops-transformer docs).

On CPU the tests install it as a stand-in `torch_npu` (standin.py) and run the Ascend providers through it; on an
NPU host `vendor_check.py` runs the real ops against it ("vendor op vs spec" section of the conformance report).
"""
from . import gemm, indexer, mhc, moe, norm_rope  # noqa: F401  (registers the spec ops)
from . import ep  # noqa: F401  (MC2 dispatch_v2 / combine_v2: expert parallelism over a real process group)
from .contract import SPEC_OPS, SpecNotModelledError, VendorContractError, use_soc  # noqa: F401

# Where the spec deliberately computes differently from our reference (and why); the conformance tolerance of
# each Ascend provider accounts for these.
DELIBERATE_DIFFERENCES = {
    "npu_rotary_mul": "r1/r2 (cos/sin) are in x's dtype: bf16 tables round cos/sin to 8 bits, where the reference "
                      "keeps fp32 tables (our provider therefore passes the rope dims and tables in fp32).",
    "npu_hc_pre_v2 / npu_hc_pre": "the device computes the mixing product in HF32 (truncated mantissa; the "
                                  "vendor's own test allows 4e-3 on y); the spec computes it in fp32, like the "
                                  "reference.",
    "npu_moe_gating_top_k": "weights are normalised by (sum + eps), eps = 1e-20 by default; the reference divides "
                            "by the sum. Ties in the top-k order are unspecified by the vendor.",
    "npu_grouped_matmul": "bf16 products with fp32 accumulation in the vendor's own order; the reference uses "
                          "fixed 16-row fp32 tiles (batch-invariant), so results agree to the GEMM tolerance only.",
    "npu_quant_matmul": "block-scaled FP8 (950) accumulates in the vendor's order; int8 W8A8 (A2/A3) is a "
                        "different recipe from DeepSeek's FP8 blocks and is compared by similarity only.",
    "npu_lightning_indexer": "top-k ties are unspecified; compared as sets.",
    "npu_moe_distribute_dispatch_v2 / combine_v2": "combine weights the expert outputs after w2 (expert_scales) and "
                                                   "reduces in the vendor's order, where V4 applies the routing "
                                                   "weight before w2 and the reference reduces in k order: EP "
                                                   "through MC2 is compared by tolerance only.",
}
