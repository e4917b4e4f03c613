"""Model configuration: one dataclass with checked invariants, read from a checkpoint's config.json (Hugging Face
spelling or DeepSeek's older ModelArgs spelling) or from a built-in preset (flash, pro, tiny).

Unknown keys and inconsistent values raise ConfigError naming the key, before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

import yaml

PRESETS_DIR = pathlib.Path(__file__).parent / "presets"
RATIOS = (0, 4, 128)


class ConfigError(ValueError):
    """A config key is unknown, malformed or inconsistent with the others (`key`: the field concerned)."""

    def __init__(self, msg: str, key: str | None = None):
        super().__init__(msg)
        self.key = key


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4 hyper-parameters (field names follow DeepSeek's inference/model.py ModelArgs)."""
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_inter_dim: int
    n_routed_experts: int
    compress_ratios: tuple[int, ...]   # n_layers + n_mtp_layers entries: 0 window-only, 4 CSA, 128 HCA
    head_dim: int = 512
    rope_head_dim: int = 64
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.0
    swiglu_limit: float = 0.0
    n_hash_layers: int = 0
    n_mtp_layers: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    window_size: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536        # YaRN; 0 disables it
    rope_factor: float = 16.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    dtype: str = "fp8"                   # storage of the dense linears in the checkpoint: fp8 or bf16
    scale_fmt: str | None = "ue8m0"      # activation scale rule: ue8m0 (pow2) or None (amax/448)
    expert_dtype: str = "fp8"            # storage of routed experts: fp4, fp8 or bf16
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        def need(cond, key, msg):
            if not cond:
                raise ConfigError(f"config key '{key}': {msg}", key)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f.name, f"must be an int, got {v!r}")
            if f.type == "float":
                need(isinstance(v, (int, float)) and not isinstance(v, bool), f.name, f"must be a number, got {v!r}")
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "q_lora_rank", "o_groups", "o_lora_rank",
                    "moe_inter_dim", "n_routed_experts", "head_dim", "rope_head_dim", "n_activated_experts",
                    "index_n_heads", "index_head_dim", "index_topk", "window_size", "hc_mult", "hc_sinkhorn_iters",
                    "max_position_embeddings")
        for k in positive:
            need(getattr(self, k) > 0, k, f"must be > 0, got {getattr(self, k)}")
        need(self.rope_head_dim % 2 == 0 and self.rope_head_dim < self.head_dim, "rope_head_dim",
             f"must be even and smaller than head_dim {self.head_dim}, got {self.rope_head_dim}")
        need((self.head_dim - self.rope_head_dim) % 64 == 0, "head_dim",
             f"head_dim - rope_head_dim = {self.head_dim - self.rope_head_dim} must be a multiple of 64 (FP8 KV blocks)")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim % 32 == 0,
             "index_head_dim", f"must be a power of two >= 32 (Hadamard + FP4 blocks), got {self.index_head_dim}")
        need(self.index_head_dim > self.rope_head_dim, "index_head_dim",
             f"must exceed rope_head_dim {self.rope_head_dim}, got {self.index_head_dim}")
        need(self.n_heads * self.head_dim % self.o_groups == 0, "o_groups",
             f"n_heads*head_dim = {self.n_heads * self.head_dim} must be divisible by o_groups {self.o_groups}")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"{self.n_activated_experts} exceeds n_routed_experts {self.n_routed_experts}")
        need(self.n_shared_experts == 1, "n_shared_experts", f"V4 has exactly one shared expert, got "
                                                             f"{self.n_shared_experts}")
        need(self.score_func in ("sqrtsoftplus", "sigmoid", "softmax"), "score_func",
             f"must be sqrtsoftplus, sigmoid or softmax, got {self.score_func!r}")
        need(0 <= self.n_hash_layers <= self.n_layers, "n_hash_layers",
             f"must be between 0 and n_layers {self.n_layers}, got {self.n_hash_layers}")
        need(self.n_mtp_layers >= 0, "n_mtp_layers", f"must be >= 0, got {self.n_mtp_layers}")
        need(isinstance(self.compress_ratios, tuple) and len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
             "compress_ratios", f"needs n_layers + n_mtp_layers = {self.n_layers + self.n_mtp_layers} entries "
                                f"(the last ones are the MTP layers), got {len(self.compress_ratios)}")
        bad = [r for r in self.compress_ratios if r not in RATIOS]
        need(not bad, "compress_ratios", f"entries must be 0 (window only), 4 (CSA) or 128 (HCA), got {bad}")
        need(self.dtype in ("fp8", "bf16"), "dtype", f"must be fp8 or bf16, got {self.dtype!r}")
        need(self.expert_dtype in ("fp4", "fp8", "bf16"), "expert_dtype",
             f"must be fp4, fp8 or bf16, got {self.expert_dtype!r}")
        need(self.scale_fmt in ("ue8m0", None), "scale_fmt", f"must be ue8m0 or null, got {self.scale_fmt!r}")
        need(self.dim % 128 == 0 or self.dtype == "bf16", "dim",
             f"{self.dim} must be a multiple of 128 for FP8 block-quantised linears")
        need(self.hc_eps >= 0 and self.norm_eps >= 0, "hc_eps", "eps values must be >= 0")

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        d.pop("name")
        return d

    def to_hf_dict(self) -> dict:
        """The config.json of a checkpoint directory, in DeepSeek's Hugging Face spelling."""
        hf = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "num_key_value_heads": 1}
        for ours, theirs in _HF_NAMES.items():
            hf[theirs] = getattr(self, ours)
        hf["compress_ratios"] = list(self.compress_ratios)
        hf["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                              "beta_slow": self.beta_slow, "original_max_position_embeddings": self.original_seq_len}
        if self.dtype == "fp8":
            q = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
            if self.scale_fmt:
                q["scale_fmt"] = self.scale_fmt
            hf["quantization_config"] = q
        hf["expert_dtype"] = self.expert_dtype
        hf["torch_dtype"] = "bfloat16"
        return hf


# ours -> Hugging Face root config.json key
_HF_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "head_dim": "head_dim", "rope_head_dim": "qk_rope_head_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank", "moe_inter_dim": "moe_intermediate_size", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor", "swiglu_limit": "swiglu_limit", "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers", "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim",
    "index_topk": "index_topk", "window_size": "sliding_window", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
    "max_position_embeddings": "max_position_embeddings", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
# DeepSeek ModelArgs spelling -> ours (identical names are implied)
_ARGS_NAMES = {"moe_inter_dim": "moe_inter_dim", "route_scale": "route_scale", "window_size": "window_size",
               "rope_head_dim": "rope_head_dim", "n_hash_layers": "n_hash_layers", "original_seq_len": "original_seq_len",
               "rope_factor": "rope_factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
               "expert_dtype": "expert_dtype", "scale_fmt": "scale_fmt", "score_func": "score_func",
               "n_activated_experts": "n_activated_experts", "norm_eps": "norm_eps"}
# Keys that do not change inference; each must hold the value V4 implies (None = any value).
_HF_FIXED = {
    "architectures": None, "model_type": None, "transformers_version": None, "torch_dtype": None, "dtype": None,
    "auto_map": None, "initializer_range": None, "use_cache": None, "attention_dropout": None, "pad_token_id": None,
    "output_router_logits": None, "router_aux_loss_coef": None, "router_jitter_noise": None, "aux_loss_alpha": None,
    "seq_aux": None, "ep_size": None, "num_key_value_heads": 1, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "first_k_dense_replace": 0, "n_group": 1,
    "topk_group": 1, "topk_method": "noaux_tc", "norm_topk_prob": True, "kv_lora_rank": None,
}
# ModelArgs keys that size the reference code's buffers, not the model: accepted with any value and ignored.
# max_seq_len is its pre-allocated cache (4096 by default), not the model's context (a cache is sized per call:
# Model.new_cache(batch, max_len)).
_ARGS_IGNORED = ("max_batch_size", "max_seq_len")


def _parse_rope_scaling(rs, out: dict) -> None:
    if rs is None:
        out["original_seq_len"] = 0
        return
    if not isinstance(rs, dict):
        raise ConfigError(f"config key 'rope_scaling': expected a mapping, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config key 'rope_scaling.type': V4 uses yarn, got {kind!r}")
    names = {"factor": "rope_factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
             "original_max_position_embeddings": "original_seq_len"}
    for k, v in rs.items():
        if k in ("type", "rope_type"):
            continue
        if k in ("mscale", "mscale_all_dim"):
            if v not in (0, 1, 1.0):  # V4 applies no attention-scale factor
                raise ConfigError(f"config key 'rope_scaling.{k}': V4 uses no YaRN mscale, got {v!r}")
            continue
        if k not in names:
            raise ConfigError(f"config key 'rope_scaling.{k}' is unknown (known: {', '.join(names)})")
        out[names[k]] = v


def _parse_quantization(q, out: dict) -> None:
    if q is None:
        return
    if not isinstance(q, dict):
        raise ConfigError(f"config key 'quantization_config': expected a mapping, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config key 'quantization_config.quant_method': only fp8 is supported, got {method!r}")
    for k, v in q.items():
        if k == "weight_block_size" and list(v) != [128, 128]:
            raise ConfigError(f"config key 'quantization_config.weight_block_size': V4 uses [128, 128], got {v!r}")
        elif k == "fmt" and v != "e4m3":
            raise ConfigError(f"config key 'quantization_config.fmt': V4 uses e4m3, got {v!r}")
        elif k == "scale_fmt":
            out["scale_fmt"] = v
        elif k == "expert_dtype":
            out["expert_dtype"] = v
        elif k not in ("quant_method", "weight_block_size", "fmt", "activation_scheme", "scale_fmt", "expert_dtype",
                       "modules_to_not_convert"):
            raise ConfigError(f"config key 'quantization_config.{k}' is unknown")
    out["dtype"] = "fp8"


# transformers' DeepseekV4Config re-saves a config in its own terms: per-layer `layer_types` (without the MTP
# layer) instead of compress_ratios, `mlp_layer_types` instead of num_hash_layers, `partial_rotary_factor` beside
# qk_rope_head_dim, `compress_rates`, and `rope_parameters` {"main": ..., "compress": ...} instead of rope_scaling.
_LAYER_TYPES = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_TRANSFORMERS_KEYS = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters")


def _rotary_dims(factor, raw: dict, key: str) -> int:
    """rope_head_dim from a partial_rotary_factor `key`: factor x head_dim (the config's, else ModelConfig's
    default) must be a whole number of dims."""
    hd = raw.get("head_dim", ModelConfig.head_dim)          # the dataclass default
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (factor, hd))
    rd = factor * hd if numbers else None
    if rd is None or not float(rd).is_integer():             # NaN and inf are not either
        raise ConfigError(f"config key '{key}': {factor!r} x head_dim {hd!r} is not a whole number of dims", key)
    return int(rd)


def _agree(out: dict, field: str, value, key: str, other: str) -> None:
    """Set out[field] = value, or check that the value another key already gave agrees."""
    if field in out and out[field] != value:
        raise ConfigError(f"config key '{key}': implies {field} = {value!r} but '{other}' gives {out[field]!r}", key)
    out[field] = value


def _parse_transformers_keys(tf: dict, raw: dict, out: dict) -> None:
    n = raw.get("num_hidden_layers")
    if "compress_rates" in tf and tf["compress_rates"] != _COMPRESS_RATES:
        raise ConfigError(f"config key 'compress_rates': DeepSeek-V4 uses {_COMPRESS_RATES}, got "
                          f"{tf['compress_rates']!r}", "compress_rates")
    if "layer_types" in tf:
        lt = tf["layer_types"]
        bad = [t for t in lt if t not in _LAYER_TYPES] if isinstance(lt, list) else lt
        if bad or len(lt) != n:
            raise ConfigError(f"config key 'layer_types': needs num_hidden_layers = {n} entries from "
                              f"{', '.join(_LAYER_TYPES)}; got {len(lt) if isinstance(lt, list) else lt!r} entries"
                              + (f", unknown {bad}" if bad else ""), "layer_types")
        ratios = tuple(_LAYER_TYPES[t] for t in lt)
        if "compress_ratios" in out:
            given = tuple(out["compress_ratios"])
            if given[:n] != ratios:
                i = next((i for i, (a, b) in enumerate(zip(given, ratios)) if a != b), min(len(given), n))
                raise ConfigError(f"config key 'layer_types': layer {i} is {lt[i]!r} but 'compress_ratios' gives "
                                  f"{given[i] if i < len(given) else 'nothing'}", "layer_types")
        else:   # transformers keeps no entry for the MTP layer: both released V4 configs have 0 (window only) there
            out["compress_ratios"] = ratios + (0,) * raw.get("num_nextn_predict_layers", 1)
    if "mlp_layer_types" in tf:
        mt = tf["mlp_layer_types"]
        k = next((i for i, t in enumerate(mt) if t != "hash_moe"), len(mt)) if isinstance(mt, list) else -1
        if k < 0 or len(mt) != n or any(t != "moe" for t in mt[k:]):
            raise ConfigError(f"config key 'mlp_layer_types': needs num_hidden_layers = {n} entries, 'hash_moe' "
                              f"layers first and 'moe' after them; got {mt!r}", "mlp_layer_types")
        _agree(out, "n_hash_layers", k, "mlp_layer_types", "num_hash_layers")
    if "partial_rotary_factor" in tf:
        _agree(out, "rope_head_dim", _rotary_dims(tf["partial_rotary_factor"], raw, "partial_rotary_factor"),
               "partial_rotary_factor", "qk_rope_head_dim")
    rp = tf.get("rope_parameters")
    if rp is None:
        return
    if not isinstance(rp, dict):
        raise ConfigError(f"config key 'rope_parameters': expected a mapping, got {rp!r}", "rope_parameters")
    if not ("main" in rp or "compress" in rp):       # the flat form: the same keys as rope_scaling
        rp = {"compress": rp}
    unknown = sorted(set(rp) - {"main", "compress"})
    if unknown:
        raise ConfigError(f"config key 'rope_parameters.{unknown[0]}' is unknown (main, compress)", "rope_parameters")
    main, comp = dict(rp.get("main") or {}), dict(rp.get("compress") or {})
    for part, d, theta in (("main", main, "rope_theta"), ("compress", comp, "compress_rope_theta")):
        if "rope_theta" in d:
            _agree(out, theta, d.pop("rope_theta"), f"rope_parameters.{part}.rope_theta", theta)
        if "partial_rotary_factor" in d:
            key = f"rope_parameters.{part}.partial_rotary_factor"
            _agree(out, "rope_head_dim", _rotary_dims(d.pop("partial_rotary_factor"), raw, key), key,
                   "qk_rope_head_dim")
    kind = main.pop("rope_type", main.pop("type", "default"))
    if kind != "default" or main:
        raise ConfigError(f"config key 'rope_parameters.main': V4's window layers use plain RoPE (rope_type "
                          f"default, no other keys), got {rp['main']!r}", "rope_parameters")
    if comp.pop("attention_factor", 1.0) not in (1, 1.0):
        raise ConfigError("config key 'rope_parameters.compress.attention_factor': V4 applies no YaRN "
                          "attention scale (1.0)", "rope_parameters")
    yarn: dict = {}
    kinds = {comp.pop("rope_type", None), comp.pop("type", None)} - {None}
    if kinds <= {"default"} and not comp:
        yarn["original_seq_len"] = 0
    else:
        _parse_rope_scaling({"type": kinds.pop() if len(kinds) == 1 else sorted(kinds), **comp}, yarn)
    for field, v in yarn.items():
        _agree(out, field, v, "rope_parameters.compress", "rope_scaling")


_HF_SPELLING = {**_HF_NAMES, "original_seq_len": "rope_scaling.original_max_position_embeddings",
                "rope_factor": "rope_scaling.factor", "beta_fast": "rope_scaling.beta_fast",
                "beta_slow": "rope_scaling.beta_slow", "dtype": "quantization_config",
                "scale_fmt": "quantization_config.scale_fmt", "expert_dtype": "expert_dtype"}


def from_hf_dict(raw: dict, name: str = "custom") -> ModelConfig:
    """Parse a Hugging Face root config.json (DeepSeek's V4 spelling)."""
    rev = {v: k for k, v in _HF_NAMES.items()}
    out: dict = {"dtype": "bf16", "scale_fmt": None, "expert_dtype": "bf16", "name": name}
    quant_seen = "quantization_config" in raw
    tf: dict = {}
    for k, v in raw.items():
        if k in _TRANSFORMERS_KEYS:
            tf[k] = v
        elif k in rev:
            out[rev[k]] = v
        elif k == "compress_ratios":
            out["compress_ratios"] = tuple(v) if isinstance(v, (list, tuple)) else v
        elif k == "rope_scaling":
            _parse_rope_scaling(v, out)
        elif k == "quantization_config":
            _parse_quantization(v, out)
        elif k == "expert_dtype":
            out["expert_dtype"] = v if v is not None else out["expert_dtype"]
        elif k in _HF_FIXED:
            want = _HF_FIXED[k]
            if want is not None and v != want:
                raise ConfigError(f"config key '{k}': DeepSeek-V4 requires {want!r}, got {v!r}")
        else:
            raise ConfigError(f"config key '{k}' is unknown (not part of the DeepSeek-V4 config)")
    if quant_seen and out["expert_dtype"] == "bf16" and "expert_dtype" not in raw \
            and "expert_dtype" not in (raw.get("quantization_config") or {}):
        out["expert_dtype"] = "fp8"  # FP8 checkpoints without an expert_dtype keep FP8 experts
    _parse_transformers_keys(tf, raw, out)
    if "rope_scaling" not in raw and "original_seq_len" not in out:
        out["original_seq_len"] = 0
    return _build(out, _HF_SPELLING)


def from_model_args(raw: dict, name: str = "custom") -> ModelConfig:
    """Parse DeepSeek's inference/config.json (ModelArgs spelling: dim, n_layers, n_heads, ...)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out: dict = {"name": name}
    scale_dtype = "fp8"                      # ModelArgs' default
    for k, v in raw.items():
        if k in _ARGS_NAMES:
            out[_ARGS_NAMES[k]] = v
        elif k in ("dtype",):
            out["dtype"] = v
        elif k == "compress_ratios":
            out["compress_ratios"] = tuple(v) if isinstance(v, (list, tuple)) else v
        elif k == "scale_dtype":
            scale_dtype = v
        elif k in fields:
            out[k] = v
        elif k in _ARGS_IGNORED:
            continue
        else:
            raise ConfigError(f"config key '{k}' is unknown (not a DeepSeek-V4 ModelArgs field)")
    if out.get("expert_dtype") is None:
        out["expert_dtype"] = "fp8" if out.get("dtype", "fp8") == "fp8" else "bf16"
    # DeepSeek's Transformer uses one activation scale rule for the linears and the KV QAT round trip: "ue8m0"
    # when scale_dtype is fp8, else scale_fmt. Not a ModelConfig field: it decides scale_fmt.
    if scale_dtype not in ("fp8", "fp32"):
        raise ConfigError(f"config key 'scale_dtype': must be fp8 or fp32, got {scale_dtype!r}", "scale_dtype")
    if scale_dtype == "fp8":
        out["scale_fmt"] = "ue8m0"
    elif out.get("scale_fmt") is None:
        raise ConfigError("config key 'scale_dtype': fp32 with scale_fmt null makes DeepSeek quantise activations and "
                          "the KV QAT round trip with amax/448 scales; this library's KV round trip uses ue8m0 scales "
                          "only, so the model would not be DeepSeek's (set scale_fmt: ue8m0)", "scale_dtype")
    return _build(out, {v: k for k, v in _ARGS_NAMES.items()})


def _build(kw: dict, spelling: dict | None = None) -> ModelConfig:
    """ModelConfig(**kw), with errors naming keys as the source spelled them."""
    spelling = spelling or {}
    missing = [f.name for f in dataclasses.fields(ModelConfig)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kw]
    if missing:
        raise ConfigError("config is missing required key(s): " + ", ".join(f"'{spelling.get(m, m)}'" for m in missing))
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        if e.key and e.key in spelling:
            raise ConfigError(str(e).replace(f"'{e.key}'", f"'{spelling[e.key]}'", 1), spelling[e.key]) from None
        raise


def load_config(source: str | pathlib.Path) -> ModelConfig:
    """A preset name (flash, pro, tiny), a checkpoint directory, or a config.json / preset .yaml path."""
    src = str(source)
    if src in list_presets():
        return load_preset(src)
    path = pathlib.Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"no config at {path} (and '{src}' is not a preset: {', '.join(list_presets())})")
    if path.suffix in (".yaml", ".yml"):
        return _from_yaml(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    name = path.parent.name
    return from_model_args(raw, name) if "dim" in raw or "n_layers" in raw else from_hf_dict(raw, name)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{name}' (presets: {', '.join(list_presets())})")
    return _from_yaml(path)


def _from_yaml(path: pathlib.Path) -> ModelConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: a preset must be a YAML mapping of config keys (key: value lines), got "
                          f"{type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{path.name}: unknown config key(s): {', '.join(unknown)}")
    if isinstance(raw.get("compress_ratios"), list):
        raw["compress_ratios"] = tuple(raw["compress_ratios"])
    return _build({"name": path.stem, **raw})
