"""Parity with an independent implementation: Hugging Face transformers' `DeepseekV4ForCausalLM` (eager).

Both load the same checkpoint directory, written in DeepSeek's own tensor naming with a config.json in DeepSeek's
Hugging Face spelling (transformers renames the tensors at load through its `deepseek_v4` conversion mapping).
Weights are stored in bf16 (no FP8/FP4: transformers' V4 runs plain-precision maths) and both run in fp32 with
our QAT simulation off (`quant_sim=False`, DESIGN.md 2.1), so the logits must agree to fp32 rounding.

The config exercises every layer kind: HCA (ratio 128) and CSA (ratio 4, with indexer) on hash-routed layers,
then window-only and CSA on top-k routed layers, a 16-token window, and 520-token prompts (4 HCA entries,
130 CSA entries against index_topk 8, so the indexer's selection decides the result).

index_n_heads is 64 (V4's own value) on purpose: with few indexer heads an entry whose ReLU terms are all 0 scores
exactly 0, and such exact ties are broken differently (our reference: lowest index, stable; transformers:
torch.topk's unspecified order). Both are valid under the indexer's set contract (DESIGN.md 2.4), but one flipped
pick changes every later position. With 64 heads an all-zero score has probability ~2^-64.
"""
import pytest
import torch

import transformers   # a test requirement (pyproject [test]: transformers>=5.5): missing, these tests fail

import dsv4_portable as dsv4
from dsv4_portable.config import ModelConfig
from dsv4_portable.model.checkpoint import random_tensors, save_checkpoint

CFG = ModelConfig(
    vocab_size=512, dim=64, n_layers=4, n_heads=4, q_lora_rank=64, o_groups=2, o_lora_rank=32, moe_inter_dim=32,
    n_routed_experts=8, n_activated_experts=2, compress_ratios=(128, 4, 0, 4, 0), head_dim=128, rope_head_dim=64,
    score_func="sqrtsoftplus", route_scale=1.5, swiglu_limit=10.0, n_hash_layers=2, index_n_heads=64,
    index_head_dim=128, index_topk=8, window_size=16, max_position_embeddings=65536, dtype="bf16", scale_fmt=None,
    expert_dtype="bf16")
# max |ours - hf| relative to max |logit|. Achieved ~1e-6 (fp32 rounding of two independent implementations);
# 1e-5 keeps a 5x margin (measured 2.1e-6 prefill, 1.9e-6 decode); one Sinkhorn iteration fewer gives 4.6e-4,
# dropping the up-projection clamp 0.8.
RTOL = 1e-5
CLAMP_GAIN = 8.0   # w1/w3 of routed and shared experts scaled up so the SwiGLU clamp at |10| really acts


def tokens(batch, n, seed):
    return torch.randint(2, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def parity_tensors():
    t = random_tensors(CFG, seed=7)
    for name in t:
        if (".ffn.experts." in name or ".ffn.shared_experts." in name) and name.endswith((".w1.weight", ".w3.weight")):
            t[name] = t[name] * CLAMP_GAIN
    return t


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.fail(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM (the test extra needs "
                    "transformers>=5.5)")
    path = tmp_path_factory.mktemp("hf_parity")
    save_checkpoint(path, CFG, parity_tensors())
    ours = dsv4.load_model(path, device="cpu", dtype=torch.float32, quant_sim=False, quiet=True)
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    return ours, hf.eval(), info


def test_transformers_loads_every_tensor(models):
    """Nothing left at its random init, nothing dropped (MTP tensors are ignored by transformers by design)."""
    _, hf, info = models
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert hf.config.layer_types == ["heavily_compressed_attention", "compressed_sparse_attention",
                                     "sliding_attention", "compressed_sparse_attention"]
    assert hf.config.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe"]


def _clamped_fraction(hf, run):
    """Fraction of gate/up pre-activations beyond the SwiGLU limit, routed (selected slots) and shared, while
    transformers runs `run()`: the clamp must act in both, or the parity says nothing about it."""
    seen = {"routed": [], "shared": []}

    def routed(mod, args):
        h, idx, _ = args
        for e in idx.unique().tolist():
            tok = (idx == e).any(-1)
            seen["routed"].append(torch.nn.functional.linear(h[tok], mod.gate_up_proj[e]).abs().flatten())

    def shared(mod, args, out):
        seen["shared"].append(out.abs().flatten())
    hooks = []
    for layer in hf.model.layers:
        hooks.append(layer.mlp.experts.register_forward_pre_hook(routed))
        for proj in (layer.mlp.shared_experts.gate_proj, layer.mlp.shared_experts.up_proj):
            hooks.append(proj.register_forward_hook(shared))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    lim = CFG.swiglu_limit
    return out, {k: (torch.cat(v) > lim).float().mean().item() for k, v in seen.items()}


def test_prefill_logits_match_every_position(models):
    ours, hf, _ = models
    x = tokens(2, 520, seed=0)
    with torch.no_grad():
        a = ours.forward(x, all_logits=True)
        b, clamped = _clamped_fraction(hf, lambda: hf(x, use_cache=False).logits)
    assert clamped["routed"] > 0.05 and clamped["shared"] > 0.05, clamped
    err = rel_err(a, b)
    print(f"\nprefill [2, 520]: max abs err {(a - b).abs().max().item():.3e}, relative {err:.3e}; "
          f"clamped pre-activations {clamped}")
    assert err < RTOL


def test_decode_logits_match(models):
    """Prefill 381 tokens, then 11 single-token steps (across the HCA boundary at 384 and several CSA ones),
    each with its own cache; also a chunked prefill split at non-multiples of 4."""
    ours, hf, _ = models
    p, n = 381, 12
    x = tokens(1, p + n, seed=1)
    with torch.no_grad():
        cache = ours.new_cache(1, p + n)
        a = [ours.forward(x[:, :p], cache, all_logits=True)]
        a += [ours.forward(x[:, j:j + 1], cache, all_logits=True) for j in range(p, p + n)]
        hc = transformers.DynamicCache(config=hf.config)
        b = []
        for lo, hi in [(0, 5), (5, p)] + [(j, j + 1) for j in range(p, p + n)]:
            out = hf(x[:, lo:hi], cache=hc, use_cache=True)
            b.append(out.logits)
            hc = out.cache
    a, b = torch.cat(a, 1), torch.cat(b, 1)
    err = rel_err(a, b)
    print(f"\ndecode: max abs err {(a - b).abs().max().item():.3e}, relative {err:.3e}")
    assert err < RTOL


def test_greedy_decode_tokens_equal(models):
    ours, hf, _ = models
    p, n = 381, 12
    x = tokens(1, p, seed=2)
    with torch.no_grad():
        mine = ours.generate([x[0].tolist()], max_new_tokens=n).tokens[0]
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=CFG.eos_token_id)[0, p:].tolist()
    assert mine == theirs
