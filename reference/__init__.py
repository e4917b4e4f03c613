"""Pure-PyTorch reference of every DeepSeek-V4 op: the definition the registry and all backends are held to.

Runs on any torch device; computes in fp32 (fp64 when given fp64) and follows DESIGN.md section 2 exactly.
"""
from .attention import (compressed_indices, indexer_scores, indexer_topk, sparse_attn, window_indices,
                        window_sparse_attn)
from .compression import compress_pool, compressor
from .rotation import hadamard
from .mhc import hc_head, hc_post, hc_pre, sinkhorn
from .moe import ExpertWeights, expert_forward, moe_experts, moe_route, ordered_combine
from .norm import rms_norm
from .quant import (dequant_fp4, dequant_fp4_weight, dequant_fp8, dequant_fp8_weight, fp4_decode, fp4_encode,
                    fp4_linear, fp4_roundtrip, fp4_to_fp8_weight, fp8_linear, fp8_roundtrip, grouped_linear, int8_linear,
                    linear, pack_fp4, quant_fp4, quant_fp8, quant_int8_rows, quant_int8_weight, unpack_fp4)
from .rotary import Yarn, rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "compressed_indices", "indexer_scores", "indexer_topk", "sparse_attn", "window_indices", "window_sparse_attn", "compress_pool",
    "compressor", "hadamard", "hc_head", "hc_post", "hc_pre", "sinkhorn", "ExpertWeights", "expert_forward",
    "moe_experts", "moe_route", "ordered_combine", "rms_norm", "dequant_fp4", "dequant_fp4_weight", "dequant_fp8",
    "dequant_fp8_weight", "fp4_decode", "fp4_encode", "fp4_linear", "fp4_roundtrip", "fp4_to_fp8_weight",
    "fp8_linear", "fp8_roundtrip", "grouped_linear", "int8_linear", "linear", "quant_int8_rows", "quant_int8_weight", "pack_fp4", "quant_fp4", "quant_fp8", "unpack_fp4", "Yarn", "rope",
    "rope_cos_sin", "rope_inv_freq",
]
