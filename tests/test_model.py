"""The model graph: cached decode equals prefill, batching, cache layouts, weight modes, checkpoint errors."""
import json
import pathlib

import pytest
import torch

import dsv4_portable as dsv4
from dsv4_portable.config import ConfigError, load_preset
from dsv4_portable.model.cache import CacheError
from dsv4_portable.model.checkpoint import CheckpointError, random_tensors, save_checkpoint
from dsv4_portable.model.transformer import ModelInputError

CFG = load_preset("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_fp8")
    save_checkpoint(path, CFG, random_tensors(CFG, seed=1), shards=3)
    return path


@pytest.fixture(scope="module")
def model32(ckpt):
    return dsv4.load_model(ckpt, dtype="fp32", quiet=True)


def ids(n, batch=1, seed=0):
    return torch.randint(2, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, x, n):
    """Prefill x[:, :n], then feed the rest one token at a time; logits for every position."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    out = [model.forward(x[:, :n], cache, all_logits=True)]
    for j in range(n, x.shape[1]):
        out.append(model.forward(x[:, j:j + 1], cache, all_logits=True))
    return torch.cat(out, 1)


# The reference graph is batch-invariant (reference/invariant.py), so these equalities are bitwise, with FP8
# activation quantisation and QAT on: any drift would flip quantisation boundaries and show up here.
@pytest.mark.parametrize("n, m", [(3, 3), (4, 2), (7, 3), (15, 3), (127, 3), (255, 3)])
def test_prefill_then_decode_equals_one_prefill(model32, n, m):
    """Prompt lengths around the ratio-4 and ratio-128 boundaries (and the 16-token window)."""
    x = ids(n + m, seed=n)
    full = model32.forward(x, all_logits=True)
    assert torch.equal(decode_logits(model32, x, n), full)


def test_chunked_prefill_split_at_non_multiple(model32):
    x = ids(262, seed=3)
    full = model32.forward(x, all_logits=True)
    cache = model32.new_cache(1, 262)
    parts = [model32.forward(x[:, a:b], cache, all_logits=True) for a, b in ((0, 5), (5, 131), (131, 262))]
    assert torch.equal(torch.cat(parts, 1), full)


def test_bf16_decode_equals_prefill(ckpt):
    m = dsv4.load_model(ckpt, dtype="bf16", quiet=True)
    x = ids(133, seed=11)
    assert torch.equal(decode_logits(m, x, 126), m.forward(x, all_logits=True))


def test_batch_equals_each_prompt_alone(model32):
    x = ids(37, batch=3, seed=4)
    both = model32.forward(x, all_logits=True)
    for b in range(3):
        assert torch.equal(both[b:b + 1], model32.forward(x[b:b + 1], all_logits=True))


def test_fp8_cache_layout_is_bitwise_equal_to_plain(ckpt):
    m = dsv4.load_model(ckpt, dtype="bf16", quiet=True)
    x = ids(140, batch=2, seed=5)
    outs = {}
    for layout in ("plain", "fp8"):
        cache = m.new_cache(2, 150, layout)
        outs[layout] = [m.forward(x, cache, all_logits=True)] + [m.forward(x[:, j:j + 1], cache) for j in range(6)]
        assert cache.layout == layout
    for a, b in zip(outs["plain"], outs["fp8"]):
        assert torch.equal(a, b)
    fp8 = m.new_cache(1, 1024, "fp8")
    plain = m.new_cache(1, 1024, "plain")
    assert fp8.nbytes() < plain.nbytes()
    with pytest.raises(CacheError, match="quant_sim"):
        dsv4.load_model(ckpt, dtype="bf16", quant_sim=False, quiet=True).new_cache(1, 8, "fp8")


def _fp8_activation_error_bound(x, w):
    """Elementwise bound on |act_quant(x) @ W^T - x @ W^T| for W [N, K] float32 and the FP8 block-128 activation
    rule: e4m3 has 3 mantissa bits, so rounding x/s moves it by at most half an ulp, |v| * 2^-4 for normal values
    and 2^-10 below the smallest normal 2^-6 (in units of the block's power-of-two scale s); summed through |W|.
    Plus fp32 accumulation slack (K * 2^-24 relative to sum |x||W|)."""
    from dsv4_portable.reference.quant import quant_fp8
    _, s = quant_fp8(x, 128)
    s = s.repeat_interleave(128, -1)
    err = torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10)
    return err @ w.abs().t() + x.shape[-1] * 2.0 ** -24 * (x.abs() @ w.abs().t())


def test_weight_modes_agree(ckpt):
    from dsv4_portable.model.linear import Weight, linear
    from dsv4_portable.reference import ExpertWeights
    from dsv4_portable.reference.moe import expert_linear
    from dsv4_portable.reference.quant import dequant_fp4_weight, dequant_fp8_weight
    models = {w: dsv4.load_model(ckpt, dtype="fp32", weights=w, quiet=True) for w in ("native", "bf16", "fp8")}
    x = ids(40, seed=6)
    logits = {w: m.forward(x, all_logits=True) for w, m in models.items()}
    # fp8 mode converts FP4 experts exactly to FP8 blocks: the same numbers, bit for bit
    assert torch.equal(logits["native"], logits["fp8"])
    sim = torch.nn.functional.cosine_similarity(logits["native"].flatten(), logits["bf16"].flatten(), 0)
    assert sim > 0.99, sim
    # Per linear: bf16 mode holds exactly the dequantised weights and runs the plain matmul; native runs the
    # quantised linear, which differs only by the FP8 rounding of the activations, within its derived bound.
    g = torch.Generator().manual_seed(0)
    native, bf16 = models["native"].net.params, models["bf16"].net.params
    checked, worst = 0, 0.0
    for name, wn in native.items():
        if isinstance(wn, Weight) and wn.fmt in ("fp8", "fp4"):
            pairs = [(lambda a, wn=wn: linear(a, wn), lambda a, n=name: linear(a, bf16[n]),
                      dequant_fp8_weight(wn.w, wn.scale) if wn.fmt == "fp8" else dequant_fp4_weight(wn.w, wn.scale),
                      bf16[name].w)]
        elif isinstance(wn, ExpertWeights) and wn.fmt != "bf16":
            deq = dequant_fp8_weight if wn.fmt == "fp8" else dequant_fp4_weight
            pairs = [(lambda a, e=e, k=k, ew=wn: expert_linear(a, ew, k, e),
                      lambda a, e=e, k=k, ew=bf16[name]: expert_linear(a, ew, k, e),
                      deq(getattr(wn, k)[e], getattr(wn, "s" + k[1])[e]), getattr(bf16[name], k)[e])
                     for e in (0, wn.num_experts - 1) for k in ("w1", "w2", "w3")]
        else:
            continue
        for run_native, run_bf16, w_deq, w_bf16 in pairs:
            assert torch.equal(w_bf16, w_deq), name
            a = torch.randn(16, w_deq.shape[1], generator=g)
            a[3, :128] *= 1e-3                           # a block with small values (subnormal FP8 codes)
            diff = (run_native(a) - run_bf16(a)).abs()
            bound = _fp8_activation_error_bound(a, w_deq)
            assert (diff <= bound).all(), (name, (diff / bound).max())
            assert diff.max() > 0, name                  # native really quantises the activations
            worst = max(worst, (diff / bound).max().item())
            checked += 1
    assert checked > 40 and worst > 0.05, (checked, worst)  # every quantised linear; the bound is not vacuous


def test_quant_sim_changes_numerics_only_slightly(ckpt):
    x = ids(30, seed=7)
    on = dsv4.load_model(ckpt, dtype="fp32", quiet=True).forward(x, all_logits=True)
    off = dsv4.load_model(ckpt, dtype="fp32", quant_sim=False, quiet=True).forward(x, all_logits=True)
    assert not torch.equal(on, off)
    assert torch.nn.functional.cosine_similarity(on.flatten(), off.flatten(), 0) > 0.98


def test_mtp_block_runs_on_main_hidden_states(model32):
    """MTP wiring assembled by hand from DeepSeek's MTPBlock: e = enorm(embed(t+1)), x = hnorm(hidden_t),
    x = e_proj(e) (broadcast over the 4 streams) + h_proj(x), then the MTP layer's block on its own cache, then
    its hc_head, its norm and the shared fp32 head. Reference functions only (not the registry ops)."""
    from dsv4_portable import reference as R
    net, cfg = model32.net, CFG
    x = ids(20, seed=8)
    cache = model32.new_cache(1, 20)
    logits, hidden = net.forward(x, cache, all_logits=True, return_hidden=True)
    mtp = net.mtp_forward(hidden[:, :-1], x[:, 1:], cache)
    assert mtp.shape == (1, 19, CFG.vocab_size) and torch.isfinite(mtp).all() and cache.mtp_pos == 19

    p, eps = net.params, cfg.norm_eps

    def lin(a, wt):
        assert wt.fmt == "fp8"
        return R.fp8_linear(a, wt.w, wt.scale, wt.scale_fmt)
    e = R.rms_norm(net.embed[x[:, 1:]], p["mtp.0.enorm.weight"], eps)
    h = R.rms_norm(hidden[:, :-1], p["mtp.0.hnorm.weight"], eps)
    h = lin(e, p["mtp.0.e_proj"])[:, :, None, :] + lin(h, p["mtp.0.h_proj"])
    fresh = model32.new_cache(1, 20)
    h = net.mtp[0](h, x[:, 1:], fresh.mtp[0], 0, net.rope, net.quant_sim)
    y = R.hc_head(h, p["mtp.0.hc_head_fn"], p["mtp.0.hc_head_scale"], p["mtp.0.hc_head_base"], eps, cfg.hc_eps)
    want = R.linear(R.rms_norm(y, p["mtp.0.norm.weight"], eps).float(), net.head)
    assert torch.equal(mtp, want)
    # not the main model's head path: the MTP block's own hc_head and norm make a difference
    main = R.linear(R.rms_norm(R.hc_head(h, *net.hc_head, eps, cfg.hc_eps), net.norm, eps).float(), net.head)
    assert not torch.allclose(main, want)


def test_generate_greedy_and_seeded_sampling(ckpt):
    m = dsv4.load_model(ckpt, dtype="bf16", quiet=True)
    p = ids(12, seed=9)[0].tolist()
    a = m.generate([p], max_new_tokens=5)
    b = m.generate([p, p], max_new_tokens=5)
    assert a.tokens[0] == b.tokens[0] == b.tokens[1] and len(a.tokens[0]) == 5
    s1 = m.generate([p], max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3).tokens
    s2 = m.generate([p], max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3).tokens
    assert s1 == s2
    stop = a.tokens[0][1]
    c = m.generate([p], max_new_tokens=5, stop_tokens=[stop])
    assert c.tokens[0] == a.tokens[0][:2]


# ----------------------------------------------------------------------------------------------- bad input
def test_prompt_longer_than_cache_is_refused_before_work(model32):
    cache = model32.new_cache(1, 10)
    with pytest.raises(CacheError, match="exceed the cache length 10"):
        model32.forward(ids(11), cache)
    assert cache.pos == 0
    with pytest.raises(ModelInputError, match=r"token ids must be in \[0, 1024\)"):
        model32.forward(torch.tensor([[1, 5000]]))
    with pytest.raises(ModelInputError, match="max_position_embeddings"):
        model32.generate([[1, 2]], max_new_tokens=70000)
    with pytest.raises(ModelInputError, match=r"temperature must be >= 0 \(0: greedy\), got -1"):
        model32.generate([[1, 2]], temperature=-1)             # was run as greedy
    with pytest.raises(CacheError, match=r"layout='fp8' keeps bf16 rope dims and needs dtype='bf16', got "
                                         r"dtype='float32'"):
        model32.new_cache(1, 8, "fp8")


def _copy(ckpt, tmp_path, mutate):
    tensors = random_tensors(CFG, seed=1)
    mutate(tensors)
    save_checkpoint(tmp_path, CFG, tensors)
    return tmp_path


def test_missing_and_misshapen_tensors_reported_together(tmp_path):
    def mutate(t):
        del t["layers.1.attn.wkv.weight"]
        del t["layers.2.ffn.experts.3.w2.scale"]
        t["layers.0.attn.attn_sink"] = torch.zeros(7)
        t["layers.0.bogus"] = torch.zeros(1)
    path = _copy(None, tmp_path, mutate)
    with pytest.raises(CheckpointError) as e:
        dsv4.load_model(path, quiet=True)
    msg = str(e.value)
    assert "missing: layers.1.attn.wkv.weight" in msg
    assert "misshapen: layers.2.ffn.experts.3.w2" in msg
    assert "misshapen: layers.0.attn.attn_sink: got F32 [7]" in msg
    assert "unexpected: layers.0.bogus" in msg


def test_truncated_file_and_config_mismatch(ckpt, tmp_path):
    import shutil
    bad = tmp_path / "trunc"
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        dsv4.load_model(bad, quiet=True)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["moe_intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"misshapen: layers.0.ffn.experts.0.w1"):
        dsv4.load_model(other, quiet=True)
    cfg["bogus_key"] = 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'bogus_key' is unknown"):
        dsv4.load_model(other, quiet=True)


def test_hash_layer_needs_input_ids(model32):
    moe = model32.net.layers[0].ffn
    assert moe.hash
    with pytest.raises(ModelInputError, match="hash layer"):
        moe(torch.zeros(1, 2, CFG.dim), None)


def test_unknown_device_and_dtype(ckpt):
    with pytest.raises(dsv4.UnknownDeviceError, match="unknown device 'gpu'"):
        dsv4.load_model(ckpt, device="gpu", quiet=True)
    with pytest.raises(ValueError, match=r"dtype 'int8' is unknown \(choose bf16, "):
        dsv4.load_model(ckpt, dtype="int8", quiet=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        dsv4.load_model(pathlib.Path("/nonexistent"), quiet=True)


def test_text_prompts_with_tokenizer_json(ckpt, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path / "with_tok"
    shutil.copytree(ckpt, d)
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "[UNK]", "the", "quick", "brown", "fox"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), CFG.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    m = dsv4.load_model(d, quiet=True)
    assert m.encode("the quick brown fox") == [3, 4, 5, 6]
    out = m.generate("the quick brown fox", max_new_tokens=4)
    same = m.generate([[3, 4, 5, 6]], max_new_tokens=4)
    assert out.tokens == same.tokens and out.texts == [tok.decode(out.tokens[0])]
    with pytest.raises(ModelInputError, match="no tokenizer.json"):
        dsv4.load_model(ckpt, quiet=True).generate("text needs a tokenizer")


# ----------------------------------------------------------------------------------------------- streaming loader
class ReadLog:
    """Wraps safetensors.safe_open in the loader and records every tensor actually read."""

    def __init__(self, monkeypatch):
        from dsv4_portable.model import checkpoint
        real, self.names = checkpoint.safe_open, []
        log = self

        class Handle:
            def __init__(self, *a, **k):
                self.cm = real(*a, **k)

            def __enter__(self):
                self.fh = self.cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

            def keys(self):
                return self.fh.keys()

            def get_tensor(self, name):
                log.names.append(name)
                return self.fh.get_tensor(name)
        monkeypatch.setattr(checkpoint, "safe_open", Handle)


def test_keep_expert_never_reads_dropped_experts_and_shards_like_ep(ckpt, model32, monkeypatch):
    from dsv4_portable.ep.moe import local_experts
    from dsv4_portable.ep.placement import ExpertPlacement
    placement = ExpertPlacement.contiguous(CFG.n_routed_experts, 2)
    mine = set(placement.local_logical(1))                  # rank 1 of 2: experts 4..7
    log = ReadLog(monkeypatch)
    part = dsv4.load_model(ckpt, dtype="fp32", quiet=True, keep_expert=lambda layer, e: e in mine)
    read_experts = {int(n.split(".ffn.experts.")[1].split(".")[0]) for n in log.names if ".ffn.experts." in n}
    assert read_experts == mine
    assert len(log.names) == len(set(log.names))            # each tensor read once
    for full_block, part_block in zip(model32.net.layers + model32.net.mtp, part.net.layers + part.net.mtp):
        ew = part_block.ffn.experts
        assert ew.ids == tuple(sorted(mine)) and ew.num_experts == len(mine)
        want, got = local_experts(full_block.ffn.experts, placement, 1), local_experts(ew, placement, 1)
        for f in ("w1", "w2", "w3", "s1", "s2", "s3"):
            assert torch.equal(getattr(want, f), getattr(got, f)), f
        assert torch.equal(part_block.ffn.shared.w1, full_block.ffn.shared.w1)
    with pytest.raises(ValueError, match=r"experts \[0\] were not loaded"):
        part.net.layers[1].ffn.experts.select(torch.tensor([0]))
    with pytest.raises(ModelInputError, match="keep_expert"):       # routing picks global ids: needs EP
        part.forward(ids(5))


@pytest.mark.parametrize("weights", ["native", "bf16", "fp8", "int8"])
def test_a_layer_whose_experts_are_all_dropped_gets_an_empty_stack_shaped_as_prepared(ckpt, weights, monkeypatch):
    full = dsv4.load_model(ckpt, dtype="fp32", weights=weights, quiet=True)
    log = ReadLog(monkeypatch)
    part = dsv4.load_model(ckpt, dtype="fp32", weights=weights, quiet=True, keep_expert=lambda layer, e: layer != 1)
    assert not any(n.startswith("layers.1.ffn.experts.") for n in log.names)
    got, want = part.net.layers[1].ffn.experts, full.net.layers[1].ffn.experts
    assert got.num_experts == 0 and got.ids == () and got.fmt == want.fmt
    for f in ("w1", "w2", "w3", "s1", "s2", "s3"):
        g, w = getattr(got, f), getattr(want, f)
        assert (g is None) == (w is None), f
        if g is not None:
            assert g.shape[1:] == w.shape[1:] and g.dtype == w.dtype and g.device == w.device, f
    got.check()
    kept, whole = part.net.layers[0].ffn.experts, full.net.layers[0].ffn.experts
    assert kept.ids is None and all(torch.equal(getattr(kept, f), getattr(whole, f)) for f in ("w1", "w2", "w3"))


def test_index_weight_map_is_checked_against_the_headers(ckpt, tmp_path):
    import shutil
    bad = tmp_path / "index"
    shutil.copytree(ckpt, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    first, second = sorted(set(wm.values()))[:2]
    moved = next(k for k, v in sorted(wm.items()) if v == first)
    wm[moved] = second
    dropped = next(k for k, v in sorted(wm.items()) if v == second and k != moved)
    del wm[dropped]
    wm["layers.0.ghost.weight"] = first
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        dsv4.load_model(bad, quiet=True)
    msg = str(e.value)
    assert f"maps '{moved}' to {second}, but it is in {first}" in msg
    assert f"'{dropped}' is in {second} but not listed" in msg
    assert "maps 'layers.0.ghost.weight' to" in msg and "no such tensor" in msg


def test_bad_tid2eid_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    def mutate(t):
        t["layers.0.ffn.gate.tid2eid"][5, 0] = CFG.n_routed_experts
        t["layers.0.ffn.gate.tid2eid"][9, 1] = -1
    path = _copy(None, tmp_path, mutate)
    log = ReadLog(monkeypatch)
    with pytest.raises(CheckpointError, match=r"layers.0.ffn.gate.tid2eid: 2 entries outside \[0, 8\) "
                                              r"\(min -1, max 8\)"):
        dsv4.load_model(path, quiet=True)
    assert log.names == ["layers.0.ffn.gate.tid2eid"]


def test_load_progress_in_a_log_and_summary_line(ckpt, capsys):
    dsv4.load_model(ckpt, dtype="fp32")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("weights: cpu: native (auto")
    done = [l for l in err if l.endswith("MiB/s") and "done" in l]
    assert [l.split(" shard ")[1].split()[0] for l in done] == ["1/3", "2/3", "3/3"]
    assert "(100%)" in done[-1] and not any("\r" in l for l in err)
    assert err[-1].startswith(f"loaded {len(json.loads((ckpt / 'model.safetensors.index.json').read_text())['weight_map'])} tensors")
    assert "from 3 shard(s)" in err[-1] and "weights=native" in err[-1]


# ----------------------------------------------------------------------------------------------- cache hot path
def _no_host_reads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a cache write read a tensor back to the host")
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("layout", ["plain", "fp8"])
def test_ring_writes_store_each_row_in_its_slot_without_host_reads(layout, monkeypatch):
    from dsv4_portable.model.cache import EntryStore, KeyStore
    from dsv4_portable.reference import quant as Q
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 5, 128, generator=g).bfloat16()
    if layout == "fp8":   # what the store can hold exactly: FP8 blocks of 64 in the non-rope dims, bf16 rope dims
        want_rows = torch.cat([Q.fp8_roundtrip(rows[..., :64], 64), rows[..., 64:]], -1)
    else:
        want_rows = rows
    keys = torch.randn(2, 3, 128, generator=g).bfloat16()
    want_keys = Q.fp4_roundtrip(keys, 32) if layout == "fp8" else keys
    ring = EntryStore(2, 16, 128, 64, torch.bfloat16, "cpu", layout)
    ks = KeyStore(2, 8, 128, torch.bfloat16, "cpu", layout)
    _no_host_reads(monkeypatch)
    ring.write_ring(rows, 30)                           # positions 30..34 -> slots 14, 15, 0, 1, 2 (wraps)
    ks.write(keys, 4)
    monkeypatch.undo()
    got = ring.read()
    assert torch.equal(got[:, [14, 15, 0, 1, 2]], want_rows)
    assert not got[:, 3:14].any()                       # nothing else touched
    assert torch.equal(ks.read(7)[:, 4:], want_keys) and not ks.read(4).any()
    flat = EntryStore(2, 16, 128, 64, torch.bfloat16, "cpu", layout)
    _no_host_reads(monkeypatch)
    flat.write(rows, 2)                                 # entries 2..6
    flat.write_ring(rows, 40)                           # positions 40..44 -> slots 8..12 (no wrap)
    monkeypatch.undo()
    got = flat.read()
    assert torch.equal(got[:, 2:7], want_rows) and torch.equal(got[:, 8:13], want_rows)
    assert not got[:, :2].any() and not got[:, 7].any() and not got[:, 13:].any()
    if layout == "fp8":                                 # the pad bytes after the scales stay zero
        assert not flat.data[..., flat.scale_at + flat.n_scales:].any()


def test_generate_checks_prompt_ids_once_on_the_lists(ckpt, monkeypatch):
    from dsv4_portable.model.transformer import Transformer
    m = dsv4.load_model(ckpt, dtype="bf16", quiet=True)
    seen = []
    real = Transformer._check_ids
    monkeypatch.setattr(Transformer, "_check_ids", lambda self, x, c, values=True: (seen.append(values),
                                                                                  real(self, x, c, values)))
    m.generate([[5, 6, 7]], max_new_tokens=4)
    assert seen and not any(seen)                       # no device-side range check in prefill or decode
    seen.clear()
    with pytest.raises(ModelInputError, match=r"token ids must be in \[0, 1024\); got 1024, 5000"):
        m.generate([[5, 1024], [5000, 3]], max_new_tokens=2)
    assert not seen                                     # refused before any forward
    m.forward(torch.tensor([[5, 6]]))
    assert seen == [True]                               # user ids through forward: checked once
