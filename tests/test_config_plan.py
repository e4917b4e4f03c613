"""Config parsing (both spellings, checked invariants) and the memory plan against DESIGN.md section 6."""
import json

import pytest

from dsv4_portable.config import ConfigError, from_hf_dict, from_model_args, load_config, load_preset
from dsv4_portable.plan import GIB, deepseek_fp8_kv_bytes, plan, weight_bytes

FLASH_HF = {  # the fields of DeepSeek-V4-Flash's root config.json (research/cuda.md 1.2)
    "architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280, "hidden_size": 4096,
    "moe_intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 0,
    "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6, "rope_theta": 10000, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "head_dim": 512, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "sliding_window": 128, "compress_rope_theta": 160000, "o_lora_rank": 1024, "o_groups": 8, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "num_hash_layers": 3, "hc_mult": 4, "hc_eps": 1e-6,
    "hc_sinkhorn_iters": 20, "swiglu_limit": 10.0, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 65536},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    "expert_dtype": "fp4", "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
}

FLASH_ARGS = {  # DeepSeek's inference/config.json (ModelArgs spelling)
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_heads": 64,
    "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6, "score_func": "sqrtsoftplus",
    "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
    "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536, "rope_theta": 10000,
    "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0",
    "expert_dtype": "fp4", "compress_rope_theta": 160000, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_both_spellings_and_the_preset_agree():
    a, b, c = from_hf_dict(FLASH_HF), from_model_args(FLASH_ARGS), load_preset("flash")
    assert a == b == c
    assert a.compress_ratios.count(4) == 21 and a.compress_ratios.count(128) == 20 and a.ratio(0) == 0
    assert from_hf_dict(c.to_hf_dict()) == c


def test_pro_preset():
    pro = load_preset("pro")
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.n_routed_experts, pro.index_topk) == (7168, 61, 128, 384, 1024)
    assert pro.compress_ratios[:61].count(4) == 30 and pro.compress_ratios[:61].count(128) == 31


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "4096", "'hidden_size'.*int"),
    ("compress_ratios", [0, 4], "'compress_ratios'.*44 entries"),
    ("compress_ratios", [0, 0] + [4, 64] * 20 + [4, 0], "'compress_ratios'.*64"),
    ("num_key_value_heads", 8, "'num_key_value_heads'"),
    ("scoring_func", "relu", "'scoring_func'"),
    ("num_experts_per_tok", 300, "'num_experts_per_tok'"),
    ("o_groups", 7, "'o_groups'"),
    ("flash_attention", True, "'flash_attention' is unknown"),
    ("rope_scaling", {"type": "linear"}, "rope_scaling.type"),
    ("quantization_config", {"quant_method": "awq"}, "quant_method"),
])
def test_malformed_keys_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_hf_dict({**FLASH_HF, key: value})


def test_missing_key_is_named():
    bad = dict(FLASH_HF)
    del bad["num_attention_heads"]
    with pytest.raises(ConfigError, match="'num_attention_heads'"):
        from_hf_dict(bad)


def test_load_config_from_dir_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLASH_HF))
    assert load_config(tmp_path) == load_preset("flash")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not a preset"):
        load_config(tmp_path / "nowhere")


def test_flash_kv_at_1m_matches_design_yardstick():
    """DESIGN.md 6: ~3.8 GiB per 1M-token sequence in DeepSeek's FP8 layout (584 B/entry, 132 B indexer keys)."""
    cfg = load_preset("flash")
    by_hand = 21 * (2 ** 20 // 4) * (584 + 132) + 20 * (2 ** 20 // 128) * 584
    assert deepseek_fp8_kv_bytes(cfg, 2 ** 20) == by_hand
    assert 3.7 < by_hand / GIB < 3.9
    p = plan(cfg, 2 ** 20)
    ours = p["kv_per_sequence"]["ours_fp8_layout"]
    # ours keeps FP4 indexer keys (68 B) instead of FP8 (132 B), plus window rings and compressor state
    want = 21 * (2 ** 20 // 4) * (584 + 68) + 20 * (2 ** 20 // 128) * 584
    assert ours["compressed"] + ours["indexer"] == want
    assert ours["window"] == 43 * 128 * 584
    plain = p["kv_per_sequence"]["ours_bf16_plain"]["total"]
    assert plain > 1.9 * ours["total"]


def test_pro_plain_kv_matches_vllm_figure():
    """vLLM's blog: 9.62 GiB per 1M-token V4-Pro sequence in bf16 (research/cuda.md 4.3)."""
    p = plan(load_preset("pro"), 2 ** 20)["kv_per_sequence"]["ours_bf16_plain"]
    assert abs((p["compressed"] + p["indexer"]) / GIB - 9.62) < 0.02


def test_weight_bytes_by_mode():
    cfg = load_preset("flash")
    native, fp8, bf16 = (weight_bytes(cfg, m) for m in ("native", "fp8", "bf16"))
    e, i, d = 256, 2048, 4096
    fp4_expert_layer = 3 * e * (i * d // 2 + i * d // 32)          # packed + e8m0 per 32
    assert native["experts"] == 44 * fp4_expert_layer                # 43 layers + MTP
    assert fp8["experts"] > 1.8 * native["experts"] and bf16["experts"] == 44 * 3 * e * i * d * 2
    assert 140 < native["total"] / GIB < 160                         # ~149 GB of safetensors plus fp32 head/norms


def test_deepseek_fp8_layout_is_derived_from_the_config():
    from dsv4_portable.plan import deepseek_fp8_entry_bytes
    # DESIGN.md 6: 584 B per entry (448 e4m3 + 64 bf16 rope dims + 7 ue8m0 scales + pad), indexer keys 132 B
    assert deepseek_fp8_entry_bytes(load_preset("flash")) == (584, 132)
    assert deepseek_fp8_entry_bytes(load_preset("pro")) == (584, 132)
    # another shape: 192 non-rope dims (3 scales) + 64 rope dims -> 192 + 128 + 3 = 323, padded to 328;
    # indexer 64 e4m3 + one fp32 scale = 68
    small = load_preset("flash").replace(head_dim=256, index_head_dim=128, rope_head_dim=64)
    assert deepseek_fp8_entry_bytes(small) == (328, 132)
    assert deepseek_fp8_entry_bytes(small.replace(index_head_dim=256)) == (328, 264)
    assert deepseek_fp8_kv_bytes(small, 2 ** 20) == 21 * (2 ** 20 // 4) * (328 + 132) + 20 * (2 ** 20 // 128) * 328


@pytest.mark.parametrize("argv, needle", [
    (["--context", "1048577"], "exceeds the model's max_position_embeddings 1048576"),
    (["--context", "0"], "--context and --batch must be >= 1"),
    (["--batch", "0"], "--context and --batch must be >= 1"),
])
def test_plan_rejects_impossible_sizes(capsys, argv, needle):
    from dsv4_portable.cli import main
    assert main(["plan", "--config", "flash", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def _resaved_by_transformers(cfg_dict, tmp_path):
    """The config.json transformers writes when it re-saves a DeepSeek-V4 config (save_pretrained)."""
    import copy

    import transformers
    transformers.DeepseekV4Config(**copy.deepcopy(cfg_dict)).save_pretrained(tmp_path)   # it edits dicts in place
    return json.loads((tmp_path / "config.json").read_text())


def test_config_resaved_by_transformers_reads_back_the_same(tmp_path):
    raw = _resaved_by_transformers(FLASH_HF, tmp_path)
    # what makes this spelling different: no compress_ratios / num_hash_layers / rope_scaling
    assert {"layer_types", "mlp_layer_types", "rope_parameters", "compress_rates"} <= set(raw)
    assert not {"compress_ratios", "num_hash_layers", "rope_scaling"} & set(raw)
    assert from_hf_dict(raw) == load_preset("flash")
    pro = load_preset("pro")
    raw_pro = _resaved_by_transformers(pro.to_hf_dict(), tmp_path / "pro")
    assert from_hf_dict(raw_pro) == pro
    no_yarn = _resaved_by_transformers({k: v for k, v in FLASH_HF.items() if k != "rope_scaling"}, tmp_path / "ny")
    assert from_hf_dict(no_yarn).original_seq_len == 0


@pytest.mark.parametrize("mutate, match", [
    (lambda r: (r.update(compress_ratios=FLASH_HF["compress_ratios"]),
                r["layer_types"].__setitem__(1, "compressed_sparse_attention")),
     r"'layer_types': layer 1 is 'compressed_sparse_attention' but 'compress_ratios' gives 0"),
    (lambda r: r["layer_types"].__setitem__(5, "dense"), r"'layer_types'.*unknown \['dense'\]"),
    (lambda r: r["layer_types"].pop(), r"'layer_types': needs num_hidden_layers = 43 entries"),
    (lambda r: r.update(num_hash_layers=2), r"'mlp_layer_types': implies n_hash_layers = 3 but 'num_hash_layers' gives 2"),
    (lambda r: r["mlp_layer_types"].__setitem__(7, "hash_moe"), r"'mlp_layer_types'.*'hash_moe' layers first"),
    (lambda r: r.update(partial_rotary_factor=0.25), r"'partial_rotary_factor': implies rope_head_dim = 128"),
    (lambda r: r["rope_parameters"]["compress"].update(partial_rotary_factor=0.1251),   # 64.05 dims: was cut to 64
     r"'rope_parameters.compress.partial_rotary_factor': 0.1251 x head_dim 512 is not a whole number of dims"),
    (lambda r: r.update(partial_rotary_factor="1/8"), r"'partial_rotary_factor': '1/8' x head_dim 512 is not a whole"),
    (lambda r: r.update(partial_rotary_factor=float("nan")), r"'partial_rotary_factor': nan x head_dim 512"),
    (lambda r: r["rope_parameters"]["compress"].update(rope_theta=10000),
     r"'rope_parameters.compress.rope_theta': implies compress_rope_theta = 10000"),
    (lambda r: r["rope_parameters"]["compress"].update(attention_factor=1.277), "attention_factor"),
    (lambda r: (r.update(rope_scaling=FLASH_HF["rope_scaling"]), r["rope_parameters"]["compress"].update(factor=8)),
     r"'rope_parameters.compress': implies rope_factor = 8 but 'rope_scaling' gives 16"),
    (lambda r: r.update(compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 128}),
     "'compress_rates'"),
])
def test_transformers_spelling_inconsistencies_are_named(tmp_path, mutate, match):
    raw = _resaved_by_transformers(FLASH_HF, tmp_path)
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        from_hf_dict(raw)


def test_model_args_max_seq_len_is_not_the_context():
    """ModelArgs' max_seq_len (4096 by default) sizes the reference code's cache; the context stays 1M."""
    cfg = from_model_args({**FLASH_ARGS, "max_seq_len": 4096})
    assert cfg == load_preset("flash") and cfg.max_position_embeddings == 1048576


def test_yaml_preset_that_is_not_a_mapping(tmp_path):
    for text, what in (("- 1\n- 2\n", "list"), ("just words\n", "str"), ("", "NoneType")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"bad.yaml: a preset must be a YAML mapping.*got {what}"):
            load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("vocab_size: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_model_args_scale_rule_follows_deepseek():
    raw = dict(FLASH_ARGS)
    raw.pop("scale_fmt")
    assert from_model_args(raw).scale_fmt == "ue8m0"                    # scale_dtype defaults to fp8: pow2 scales
    assert from_model_args({**raw, "scale_dtype": "fp32", "scale_fmt": "ue8m0"}).scale_fmt == "ue8m0"
    with pytest.raises(ConfigError, match="'scale_dtype'.*amax/448"):
        from_model_args({**raw, "scale_dtype": "fp32"})
    with pytest.raises(ConfigError, match="'scale_dtype': must be fp8 or fp32"):
        from_model_args({**raw, "scale_dtype": "bf16"})
