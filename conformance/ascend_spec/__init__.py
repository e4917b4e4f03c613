"""Executable spec of the Ascend vendor ops the ascend backend calls (ships with the conformance suite).

Each spec op is a pure-PyTorch implementation of the op's documented semantics that first enforces its documented
argument contract (names, layouts, strides, dtype ids, enum values, shape limits, chip generation) and raises
VendorContractError naming the op, the argument, the rule and its source. Sources, per op in each module:
op-plugin's torch_npu API docs (docs/zh/custom_APIs/torch_npu/*.md) and kernel glue
(op_plugin/ops/opapi/*.cpp), vllm-ascend's kernel READMEs, csrc/torch_binding.cpp checks and op definitions
(csrc/**/op_host/*_def.cpp: which SoCs a kernel is built for), cann-recipes-infer; summarised in
/work/shared/research/ascend.md.

On CPU the tests install it as a stand-in `torch_npu` (standin.py) and run the Ascend providers through it; on an
NPU host `vendor_check.py` runs the real ops against it ("vendor op vs spec" section of the conformance report).
"""
from . import attention, compressor, gemm, indexer, mhc, moe, norm_rope  # noqa: F401  (registers the spec ops)
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
    "npu_moe_gating_top_k / moe_gating_top_k_hash": "weights are normalised by (sum + eps), eps = 1e-20 by "
                                                    "default; the reference divides by the sum. Ties in the top-k "
                                                    "order are unspecified by the vendor. norm_out [T, E] and "
                                                    "init_routing's expanded_scale [T] are always allocated; the "
                                                    "spec returns them as placeholders (values undefined).",
    "npu_grouped_matmul": "bf16 products with fp32 accumulation in the vendor's own order; the reference uses "
                          "fixed 16-row fp32 tiles (batch-invariant), so results agree to the GEMM tolerance only.",
    "npu_quant_matmul": "block-scaled FP8 (950) accumulates in the vendor's order; int8 W8A8 (A2/A3) is a "
                        "different recipe from DeepSeek's FP8 blocks and is compared by similarity only.",
    "npu_lightning_indexer": "top-k ties are unspecified; compared as sets. On the 950 the op takes no fp32 head "
                             "weights: the provider casts the reference's fp32 weights to the query dtype (bf16).",
    "compressor": "projections as bf16 x bf16 products with fp32 accumulation (the reference: fp32 linears on the "
                  "same bf16-valued weights, equal up to order); RoPE tables in x's dtype (README: fp16 / bf16) "
                  "where the reference keeps fp32 tables; pooling result not rounded to bf16 before RMSNorm. The "
                  "QAT round trip runs after the op (registry ops), so a one-ulp difference before it can move an "
                  "element by a whole FP8/FP4 step: the Ascend compressor cases compare with QAT off.",
    "npu_sparse_attn_sharedkv": "softmax over window + compressed keys in the kernel's block order and precision; "
                                "the reference's online softmax uses fixed 64-entry blocks in fp32.",
    "linear / grouped_linear (plain device matmul)": "bf16 products, fp32 accumulation in the device's order and "
                                                     "tiling: not batch-invariant by construction, unlike the "
                                                     "reference's fixed 16-row tiles.",
}

# What the spec assumes where the documents are silent or disagree, with the evidence; a device run of the vendor
# check confirms or refutes each one.
ASSUMPTIONS = {
    "chips beyond the doc tables": "npu_rms_norm, npu_rotary_mul, npu_moe_gating_top_k (torch_npu), "
                                   "npu_moe_init_routing_v2, npu_grouped_matmul and npu_dynamic_quant (fp8) list "
                                   "A2/A3 only in op-plugin's docs; the spec accepts them on the 950 because "
                                   "vllm-ascend calls them there (ops/layernorm.py, ops/rope_dsv4.py with no chip "
                                   "branch; device/device_op.py A5DeviceAdaptor).",
    "npu_rotary_mul r1/r2 dtype": "the doc lists fp16/bf16/fp32 for input, r1 and r2 without saying they must "
                                  "match; the spec requires r1/r2 in input's dtype.",
    "norm_type 2 = sqrt(softplus)": "documented only for the hash gating kernel (custom / _C_ascend builds; "
                                    "kernel Sqrt after Softplus, cann-recipes golden), with weights normalised by "
                                    "(sum + eps) like sigmoid; torch_npu's op documents 0/1 and the spec rejects 2 "
                                    "there.",
    "npu_lightning_indexer -1 padding": "rows with fewer visible keys than sparse_count are padded with -1.",
    "npu_sparse_attn_sharedkv semantics": "cmp_mask_mode 3 lets the query at position p see compressed entry c iff "
                                          "c < (p + 1) // cmp_ratio, with p = seqused_kv - q_len + i; a batch's "
                                          "compressed store holds seqused_kv // cmp_ratio entries; -1 entries of "
                                          "cmp_sparse_indices are padding; the sink is an unscaled logit with a "
                                          "zero value row (DeepSeek V4's definition).",
    "compressor state layout": "one fp32 row per absolute position through the block table, [kv | score + ape], "
                               "block-table entry 0 = no update; rope tables row j = entry j's position, "
                               "interleave tables at the full rotary width (pairs duplicated) like "
                               "npu_rotary_mul's; the signature of custom.compressor equals _C_ascend's.",
    "npu_grouped_matmul W4A8 MX (950)": "FP4 weights as the [E, K/2, N] transposed view of the checkpoint's "
                                        "[E, N, K/2] bytes (low nibble first) in ND format (vllm-ascend first casts "
                                        "them to FRACTAL_NZ with customize_dtype/input_dtype; whether ND is taken "
                                        "is unverified), e8m0 scales [E, K/64, N, 2] and [M, K/64, 2] as uint8; the "
                                        "activation scales are DeepSeek's 1x128 ue8m0 scales repeated per 32-block, "
                                        "so no OCP MX rounding is involved.",
    "npu_hc_pre / npu_moe_gating_top_k (custom)": "CANN recipes' custom_ops builds take the same arguments and "
                                                  "compute the same as the vllm-ascend builds of the same kernels.",
    "npu_moe_distribute_dispatch_v2 / combine_v2": "combine weights the expert outputs after w2 (expert_scales) and "
                                                   "reduces in the vendor's order, where V4 applies the routing "
                                                   "weight before w2 and the reference reduces in k order: EP "
                                                   "through MC2 is compared by tolerance only.",
}
