"""The DeepSeek-V4 model graph, backend-neutral: every heavy computation is a registry op (dsv4_portable.ops).

    h [B,S,4,D] --hc_pre--> x --attn_norm--> attention --hc_post--> h --hc_pre--> x --ffn_norm--> MoE --hc_post--> h

Parameters keep DeepSeek's checkpoint names (`layers.3.attn.wq_a`, ...); `Weights` maps a name to the tensor (or
to a prepared `Weight` / `ExpertWeights`). One forward handles prefill, decode and chunked prefill: the attention
of a step (`window_sparse_attn`) sees the window ring, this step's rows and the compressed entries, so the three
cases are the same code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from ..reference import ExpertWeights, Yarn, rope_cos_sin, rope_inv_freq
from .cache import KVCache, LayerCache
from .linear import Weight, linear


class ModelInputError(ValueError):
    """Bad input to the model (token ids, lengths, cache) detected before any work."""


class RopeTables:
    """cos/sin tables [P, rope_dim/2] for window-only layers (theta 10000, no YaRN) and compressed layers
    (compress_rope_theta with YaRN), grown on demand."""

    def __init__(self, cfg: ModelConfig, device):
        yarn = Yarn(cfg.original_seq_len, cfg.rope_factor, cfg.beta_fast, cfg.beta_slow) if cfg.original_seq_len else None
        self.inv = {False: rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta),
                    True: rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, yarn)}
        self.device, self.tables, self.length = device, {}, 0

    def get(self, compressed: bool, length: int):
        if length > self.length:
            n = max(length, 2 * self.length, 256)
            pos = torch.arange(n, device=self.device)
            self.tables = {k: rope_cos_sin(pos, inv.to(self.device)) for k, inv in self.inv.items()}
            self.length = n
        return self.tables[compressed]


class Attention:
    """Shared-KV MQA over a sliding window plus compressed entries (CSA with indexer when ratio 4, HCA when 128)."""

    def __init__(self, cfg: ModelConfig, p: dict, prefix: str, ratio: int):
        self.cfg, self.ratio = cfg, ratio
        g = lambda n: p[prefix + n]  # noqa: E731
        self.wq_a, self.q_norm, self.wq_b = g("wq_a"), g("q_norm.weight"), g("wq_b")
        self.wkv, self.kv_norm, self.wo_a, self.wo_b = g("wkv"), g("kv_norm.weight"), g("wo_a"), g("wo_b")
        self.sink = g("attn_sink")
        if ratio:
            self.comp = [g(f"compressor.{n}") for n in ("wkv.weight", "wgate.weight", "ape", "norm.weight")]
        if ratio == 4:
            self.idx_wq_b, self.idx_wproj = g("indexer.wq_b"), g("indexer.weights_proj")
            self.idx_comp = [g(f"indexer.compressor.{n}") for n in ("wkv.weight", "wgate.weight", "ape", "norm.weight")]

    def __call__(self, x: torch.Tensor, lc: LayerCache, p0: int, rope: RopeTables, quant: bool) -> torch.Tensor:
        cfg, ratio = self.cfg, self.ratio
        b, s, _ = x.shape
        h, hd, w = cfg.n_heads, cfg.head_dim, cfg.window_size
        pos = torch.arange(p0, p0 + s, device=x.device)
        cos_t, sin_t = rope.get(ratio > 0, p0 + s)
        cos, sin = cos_t[pos].unsqueeze(0), sin_t[pos].unsqueeze(0)

        qr = ops.rms_norm(linear(x, self.wq_a), self.q_norm, cfg.norm_eps)
        q = ops.rms_norm(linear(qr, self.wq_b).view(b, s, h, hd), None, cfg.norm_eps)
        q = ops.rope(q, cos, sin)
        kv = ops.rope(ops.rms_norm(linear(x, self.wkv), self.kv_norm, cfg.norm_eps), cos, sin)
        if quant:  # QAT: the non-rope dims of every KV entry are FP8 values (blocks of 64)
            kv = torch.cat([ops.fp8_roundtrip(kv[..., :cfg.nope_head_dim], 64), kv[..., cfg.nope_head_dim:]], -1)

        comp = topk = None
        if ratio:
            new = ops.compressor(x, *self.comp[:2], self.comp[2], self.comp[3], cos_t, sin_t, lc.comp_state.kv,
                                 lc.comp_state.score, p0, ratio, False, quant, cfg.norm_eps)
            lc.comp.write(new, p0 // ratio)
            comp = lc.comp.read((p0 + s) // ratio)
            if ratio == 4:
                topk = self._indexer(x, qr, lc, p0, pos, cos, sin, cos_t, sin_t, quant)
        o = ops.window_sparse_attn(q, lc.window.read(), kv, comp, topk, self.sink, hd ** -0.5, p0, ratio)
        o = ops.rope(o, cos, sin, inverse=True)

        keep = min(s, w)                                     # the ring keeps the last `window` positions
        lc.window.write_ring(kv[:, s - keep:], p0 + s - keep)

        g = cfg.o_groups
        o = ops.grouped_linear(o.view(b, s, g, -1), self.wo_a.view(g, cfg.o_lora_rank, -1))
        return linear(o.flatten(2), self.wo_b)

    def _indexer(self, x, qr, lc, p0, pos, cos, sin, cos_t, sin_t, quant):
        cfg = self.cfg
        b, s, _ = x.shape
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        q = ops.rope(linear(qr, self.idx_wq_b).view(b, s, hi, di), cos, sin)
        if quant:
            q = ops.fp4_roundtrip(ops.hadamard(q), 32)
        wc = self.idx_comp
        keys = ops.compressor(x, wc[0], wc[1], wc[2], wc[3], cos_t, sin_t, lc.key_state.kv, lc.key_state.score,
                              p0, 4, True, quant, cfg.norm_eps)
        lc.keys.write(keys, p0 // 4)
        n = (p0 + s) // 4
        weights = linear(x, self.idx_wproj).float() * (di ** -0.5 * hi ** -0.5)
        visible = ((pos + 1) // 4).unsqueeze(0).expand(b, s)
        return ops.indexer_topk(q, lc.keys.read(n), weights, visible, cfg.index_topk)


class MoE:
    def __init__(self, cfg: ModelConfig, p: dict, prefix: str, layer: int):
        self.cfg = cfg
        self.gate_w = p[prefix + "gate.weight"]
        self.hash = cfg.is_hash_layer(layer)
        self.tid2eid = p[prefix + "gate.tid2eid"] if self.hash else None
        self.bias = None if self.hash else p[prefix + "gate.bias"]
        self.experts: ExpertWeights = p[prefix + "experts"]
        self.shared: ExpertWeights = p[prefix + "shared_experts"]
        self.layer = layer
        self.ep = None  # an ep.model.EPContext when the experts are sharded over ranks (dsv4 run --ep N)

    def __call__(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        t = x.reshape(-1, x.shape[-1])
        if self.hash and input_ids is None:
            raise ModelInputError(f"layer {self.layer} routes by token id (hash layer) and needs input_ids")
        ids = input_ids.reshape(-1) if self.hash else None
        w, idx = ops.moe_route(t, self.gate_w, self.bias, self.tid2eid, ids, cfg.n_activated_experts,
                               cfg.score_func, cfg.route_scale)
        if self.ep is not None:
            return self.ep.moe(self.layer, t, idx, w).view_as(x)
        if self.experts.ids is not None:
            raise ModelInputError(f"layer {self.layer} holds only experts {list(self.experts.ids)} (loaded with "
                                  "keep_expert); its MoE runs only with expert parallelism (ep.model.EPContext)")
        y = ops.moe_experts(t, idx, w, self.experts, self.shared, cfg.swiglu_limit)
        return y.view_as(x)


class Block:
    def __init__(self, cfg: ModelConfig, p: dict, prefix: str, layer: int):
        self.cfg = cfg
        g = lambda n: p[prefix + n]  # noqa: E731
        self.attn = Attention(cfg, p, prefix + "attn.", cfg.ratio(layer))
        self.ffn = MoE(cfg, p, prefix + "ffn.", layer)
        self.attn_norm, self.ffn_norm = g("attn_norm.weight"), g("ffn_norm.weight")
        self.hc_attn = (g("hc_attn_fn"), g("hc_attn_scale"), g("hc_attn_base"))
        self.hc_ffn = (g("hc_ffn_fn"), g("hc_ffn_scale"), g("hc_ffn_base"))

    def __call__(self, h, input_ids, lc, p0, rope, quant):
        cfg = self.cfg
        hc = (cfg.norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
        x, post, comb = ops.hc_pre(h, *self.hc_attn, *hc)
        x = self.attn(ops.rms_norm(x, self.attn_norm, cfg.norm_eps), lc, p0, rope, quant)
        h = ops.hc_post(x, h, post, comb)
        x, post, comb = ops.hc_pre(h, *self.hc_ffn, *hc)
        x = self.ffn(ops.rms_norm(x, self.ffn_norm, cfg.norm_eps), input_ids)
        return ops.hc_post(x, h, post, comb)


class Transformer:
    """The whole model. `params` maps DeepSeek checkpoint names to prepared tensors / Weight / ExpertWeights."""

    def __init__(self, cfg: ModelConfig, params: dict, dtype: torch.dtype, device, quant_sim: bool = True):
        self.cfg, self.params, self.dtype, self.device, self.quant_sim = cfg, params, dtype, torch.device(device), quant_sim
        self.layers = [Block(cfg, params, f"layers.{i}.", i) for i in range(cfg.n_layers)]
        self.mtp = [Block(cfg, params, f"mtp.{i}.", cfg.n_layers + i) for i in range(cfg.n_mtp_layers)]
        self.embed, self.head, self.norm = params["embed.weight"], params["head.weight"], params["norm.weight"]
        self.hc_head = (params["hc_head_fn"], params["hc_head_scale"], params["hc_head_base"])
        self.rope = RopeTables(cfg, self.device)

    def new_cache(self, batch: int, max_len: int, layout: str = "auto") -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, layout, self.quant_sim)

    def _check_ids(self, input_ids: torch.Tensor, cache: KVCache | None, values: bool = True) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32,
                                                                                                  torch.int64):
            raise ModelInputError("input_ids must be an integer tensor of shape [batch, seq_len], got "
                                  f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[1] == 0:
            raise ModelInputError("input_ids is empty (seq_len 0)")
        # the value range needs the ids on the host (a device sync on GPU): done where ids come from the user,
        # skipped (values=False) for tokens the model sampled itself or ids already checked as Python lists
        if values:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ModelInputError(f"token ids must be in [0, {self.cfg.vocab_size}); got values in [{lo}, {hi}]")
        if cache is not None:
            cache.check_room(input_ids.shape[1], input_ids.shape[0])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, all_logits: bool = False,
                return_hidden: bool = False, check_ids: bool = True):
        """Run S new tokens per sequence. Without a cache this is a prefill from position 0 into a fresh cache
        sized to the input. Returns logits float32 [B, S, vocab] (all positions) or [B, vocab] (last), and with
        return_hidden also the final mHC streams [B, S, hc, D] (the MTP block's input). check_ids=False skips
        the [0, vocab) range check of the ids' values (for ids known to be in range: sampled by the model)."""
        self._check_ids(input_ids, cache, check_ids)
        if cache is None:                    # sized to the input: it has room by construction
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        input_ids = input_ids.to(self.device)
        p0 = cache.pos
        h = F.embedding(input_ids, self.embed).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)
        for layer, lc in zip(self.layers, cache.layers):
            h = layer(h, input_ids, lc, p0, self.rope, self.quant_sim)
        cache.pos = p0 + input_ids.shape[1]
        logits = self._logits(h if all_logits else h[:, -1:], self.hc_head, self.norm)
        logits = logits if all_logits else logits[:, -1]
        return (logits, h) if return_hidden else logits

    def _logits(self, h, hc_head, norm):
        cfg = self.cfg
        x = ops.rms_norm(ops.hc_head(h, *hc_head, cfg.norm_eps, cfg.hc_eps), norm, cfg.norm_eps)
        return ops.linear(x.float(), self.head)

    @torch.inference_mode()
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache, depth: int = 0):
        """Multi-token prediction: from the main model's final streams at positions t and the tokens at t+1,
        logits for the tokens at t+2 (float32 [B, S, vocab]). The MTP block shares embedding and head and keeps
        its own window cache (cache.mtp, position cache.mtp_pos)."""
        cfg, p = self.cfg, self.params
        if hidden.shape[:2] != next_ids.shape:
            raise ModelInputError(f"MTP: hidden {list(hidden.shape[:2])} and next_ids {list(next_ids.shape)} must "
                                  "cover the same positions")
        pre = f"mtp.{depth}."
        e = ops.rms_norm(F.embedding(next_ids.to(self.device), self.embed), p[pre + "enorm.weight"], cfg.norm_eps)
        x = ops.rms_norm(hidden, p[pre + "hnorm.weight"], cfg.norm_eps)
        x = linear(e, p[pre + "e_proj"]).unsqueeze(2) + linear(x, p[pre + "h_proj"])
        p0 = cache.mtp_pos
        x = self.mtp[depth](x, next_ids, cache.mtp[depth], p0, self.rope, self.quant_sim)
        cache.mtp_pos = p0 + next_ids.shape[1]
        hc = (p[pre + "hc_head_fn"], p[pre + "hc_head_scale"], p[pre + "hc_head_base"])
        return self._logits(x, hc, p[pre + "norm.weight"])


__all__ = ["Transformer", "Weight", "ModelInputError"]
