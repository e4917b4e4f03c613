"""Expert parallelism on CPU gloo at world sizes 1/2/4/8 (DESIGN.md 4, 5 case 8).

One process group per world size runs every problem (spawning dominates the cost); the ranks return raw
tensors and every check below recomputes the expectation from the global problem with the single-device
reference (`reference.moe`, `reference.quant`) or by hand, never with the EP code.
"""
import time

import pytest
import torch

from dsv4_portable.ep.conformance import E, H, K, LIMIT, WAVE_SIZES, model_ids, problems, rank_worker
from dsv4_portable.ep.dispatch import EPInputError, ep_dispatch
from dsv4_portable.ep.launch import EPLaunchError, spawn
from dsv4_portable.ep.placement import ExpertPlacement
from dsv4_portable.reference.moe import expert_forward, moe_experts
from dsv4_portable.reference.quant import dequant_fp8, quant_fp8

WORLDS = [1, 2, 4, 8]
MODEL_BATCH = 3          # 3 sequences: at --ep 2 an uneven split, at --ep 4 one rank has none


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"w{w}")
def run(request):
    world = request.param
    ranks = spawn(rank_worker, world, 0, MODEL_BATCH if world in (2, 4) else 0, timeout_s=300,
                  collective_timeout_s=60)
    return world, {p.name: p for p in problems(world)}, ranks


def _cat(ranks, name, key):
    return torch.cat([r[name][key] for r in ranks])


def _single_device(p):
    """The single-device MoE: moe_experts, or for FP8 dispatch the routed experts on the FP8 round trip of x."""
    if not p.fp8:
        return moe_experts(p.x, p.idx, p.w, p.experts, p.shared, LIMIT)
    q, s = quant_fp8(p.x, 128, "ue8m0")
    xr = dequant_fp8(q, s, 128).to(p.x.dtype)
    acc = expert_forward(p.x, p.shared, 0, None, LIMIT).float()
    for j in range(K):                       # hand-written ordered combine: shared first, then k in order
        col = torch.zeros(p.x.shape[0], H, dtype=p.x.dtype)
        for t in range(p.x.shape[0]):
            e = int(p.idx[t, j])
            if e >= 0:
                col[t] = expert_forward(xr[t:t + 1], p.experts, e, p.w[t, j:j + 1], LIMIT)[0]
        acc += col.float()
    return acc.to(p.x.dtype)


def test_transport_label(run):
    world, _, ranks = run
    assert all(r["transport"] == "cpu-gloo multi-process" for r in ranks)


def test_layout_counts_equal_a_plain_histogram(run):
    world, probs, ranks = run
    for name, p in probs.items():
        per = len(ranks[0][name]["placement"]) // world
        phy2log = torch.tensor(ranks[0][name]["placement"])
        for r, res in enumerate(ranks):
            idx = p.idx[p.rows(r)]
            phys = res[name]["phys"]
            assert torch.equal(torch.where(phys >= 0, phy2log[phys.clamp_min(0)], -1), idx), name  # right experts
            hist_rank = torch.tensor([int(((phys // per == d) & (phys >= 0)).any(1).sum()) for d in range(world)])
            assert torch.equal(res[name]["per_rank"], hist_rank), name
            hist_phys = torch.zeros(len(phy2log), dtype=torch.int64)
            for v in phys[phys >= 0].tolist():
                hist_phys[v] += 1
            assert torch.equal(res[name]["per_expert"], hist_phys), name
            # per logical expert: the replica counts add up to the logical histogram
            logical = torch.zeros(E, dtype=torch.int64).index_add_(0, phy2log, res[name]["per_expert"])
            assert torch.equal(logical, torch.bincount(idx[idx >= 0], minlength=E)), name


def test_dispatched_payload_sorted_by_source_equals_reference(run):
    world, probs, ranks = run
    for name, p in probs.items():
        per = len(ranks[0][name]["placement"]) // world
        for r, res in enumerate(ranks):
            got = res[name]
            key = got["recv_src_rank"] * 10**6 + got["recv_src_index"]
            assert torch.equal(key, key.sort().values), f"{name}: rows not in (source rank, index) order"
            rows = []
            for s in range(world):
                phys = ranks[s][name]["phys"]
                for t in range(phys.shape[0]):
                    on_r = (phys[t] >= 0) & (phys[t] // per == r)
                    if on_r.any():
                        rows.append((s, t, torch.where(on_r, phys[t] % per, -1)))
            assert [(a, b) for a, b, _ in rows] == list(zip(got["recv_src_rank"].tolist(),
                                                            got["recv_src_index"].tolist())), name
            if not rows:
                assert got["recv_x"].shape[0] == 0
                continue
            src = torch.tensor([sum(p.sizes[:a]) + b for a, b, _ in rows])
            assert torch.equal(got["recv_idx"], torch.stack([c for _, _, c in rows])), name
            assert torch.equal(got["recv_w"], p.w[src].float()), name
            if p.fp8:
                q, s = quant_fp8(p.x[src], 128, "ue8m0")
                assert torch.equal(got["recv_x"], q.view(torch.uint8)) and torch.equal(got["recv_scales"], s), name
            else:
                assert torch.equal(got["recv_x"], p.x[src]), name
            assert torch.equal(got["per_local_expert"],
                               torch.bincount(got["recv_idx"][got["recv_idx"] >= 0], minlength=per)), name


def test_every_slot_processed_exactly_once(run):
    world, probs, ranks = run
    for name, p in probs.items():
        seen = [(sum(p.sizes[:a]) + b, c) for r in ranks for a, b, c in r[name]["processed"].tolist()]
        assert sorted(seen) == sorted(map(tuple, (p.idx >= 0).nonzero().tolist())), name
        assert len(seen) == len(set(seen)), name


def test_ep_moe_bitwise_equal_single_device_for_every_wave_size(run):
    world, probs, ranks = run
    for name, p in probs.items():
        ref = _single_device(p)
        for key in [f"out_w{w}" for w in WAVE_SIZES] + ["out_no_overlap"]:
            got = _cat(ranks, name, key)
            assert got.dtype == ref.dtype and torch.equal(got, ref), f"{name} {key}: max diff " \
                f"{(got.double() - ref.double()).abs().max().item()}"


def test_partial_combine_within_tolerance(run):
    world, probs, ranks = run
    for name, p in probs.items():
        ref = _single_device(p).double()
        got = _cat(ranks, name, "out_partial").double()
        assert ((got - ref).abs() <= 1e-2 * ref.abs().amax() + 1e-6).all(), name


def test_identity_experts_through_public_combine(run):
    # C4: identity experts, weights applied by ep_combine: out = cast(shared + sum_k w_k * float(x)) in k order
    world, probs, ranks = run
    for name, p in probs.items():
        x = p.x if not p.fp8 else dequant_fp8(*quant_fp8(p.x, 128, "ue8m0"), 128).to(p.x.dtype)
        acc = expert_forward(p.x, p.shared, 0, None, LIMIT).float()
        for j in range(K):
            acc += torch.where((p.idx[:, j] >= 0).unsqueeze(1), p.w[:, j:j + 1] * x.float(), 0)
        assert torch.equal(_cat(ranks, name, "identity_combine"), acc.to(p.x.dtype)), name


def test_adversarial_data_detects_a_wrong_summation_order():
    # Without this, bitwise equality could hold by luck: a reversed k order must change the fp32 result.
    p = next(q for q in problems(2) if q.name == "skew_fp32")
    per_slot = torch.zeros(p.x.shape[0], K, H)
    for t in range(p.x.shape[0]):
        for j in range(K):
            if p.idx[t, j] >= 0:
                per_slot[t, j] = expert_forward(p.x[t:t + 1], p.experts, int(p.idx[t, j]), p.w[t, j:j + 1], LIMIT)[0]
    shared = expert_forward(p.x, p.shared, 0, None, LIMIT)
    forward, backward = shared.clone(), shared.clone()
    for j in range(K):
        forward += per_slot[:, j]
        backward += per_slot[:, K - 1 - j]
    assert torch.equal(forward, moe_experts(p.x, p.idx, p.w, p.experts, p.shared, LIMIT))
    assert not torch.equal(backward, forward)


def test_skew_cases_are_really_present(run):
    world, probs, ranks = run
    p = probs["skew_bf16"]
    assert (torch.bincount(p.idx[p.idx >= 0], minlength=E) == 0).any()          # an expert with no tokens
    if world > 1:
        assert 0 in p.sizes                                                       # a rank with no tokens
        one = probs["all_tokens_one_expert"]
        assert any(r["all_tokens_one_expert"]["recv_x"].shape[0] == 0 for r in ranks)   # a rank receives nothing
        assert sum(r["all_tokens_one_expert"]["recv_x"].shape[0] for r in ranks) == one.x.shape[0]
    assert probs["t1"].x.shape[0] == 1


def test_tiny_model_ep_same_logits_as_single_device(run):
    world, _, ranks = run
    if world not in (2, 4):
        pytest.skip("the model check runs at --ep 2 and --ep 4")
    from dsv4_portable import load_model
    m = load_model("tiny", quiet=True)
    ids = model_ids(MODEL_BATCH)
    cache = m.new_cache(ids.shape[0], ids.shape[1] + 1)
    pre = m.forward(ids, cache, all_logits=True)
    nxt = m.forward(pre[:, -1].argmax(-1).view(-1, 1), cache)
    got = [r["model"] for r in ranks if r["model"] is not None]
    assert len(got) < world or world == 2                     # at --ep 4 one rank had no sequence and served
    assert torch.equal(torch.cat([g[0] for g in got]), pre)
    assert torch.equal(torch.cat([g[1] for g in got]), nxt)


def _raise_on_rank1(rank, world):
    from dsv4_portable.ep.conformance import rank_worker as work
    if rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return work(rank, world)


def _hang_on_rank1(rank, world):
    if rank == 1:
        time.sleep(120)
    p = problems(world)[0]
    from dsv4_portable.ep.moe import ep_moe_forward, local_experts
    pl = ExpertPlacement.contiguous(E, world)
    return ep_moe_forward(p.x[p.rows(rank)], p.idx[p.rows(rank)], p.w[p.rows(rank)],
                          local_experts(p.experts, pl, rank), p.shared, LIMIT, pl)


def test_injected_failure_ends_quickly_with_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(EPLaunchError, match="rank 1: RuntimeError: injected failure on rank 1"):
        spawn(_raise_on_rank1, 2, timeout_s=60, collective_timeout_s=30)
    assert time.perf_counter() - t0 < 20
    t0 = time.perf_counter()
    with pytest.raises(EPLaunchError, match=r"rank 0: .*Timed out waiting 2000ms"):
        spawn(_hang_on_rank1, 2, timeout_s=60, collective_timeout_s=2)
    assert time.perf_counter() - t0 < 20      # the group timeout (2 s) ends it, not the 60 s launch limit


def test_bad_input_named_before_any_work():
    p = problems(1)[0]
    pl = ExpertPlacement.contiguous(E, 1)
    with pytest.raises(EPInputError, match="topk_weights"):
        ep_dispatch(p.x, p.idx, p.w[:, :2], pl)
    with pytest.raises(EPInputError, match="topk_idx"):
        ep_dispatch(p.x, p.idx + E, p.w, pl)
    with pytest.raises(EPInputError, match="placement is for 2 ranks"):
        ep_dispatch(p.x, p.idx, p.w, ExpertPlacement.contiguous(E, 2))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ExpertPlacement.contiguous(E, 3)


def test_cli_run_ep2_generates_the_same_tokens(capsys):
    import json

    from dsv4_portable.cli import main
    assert main(["run", "--max-new-tokens", "3", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main(["run", "--max-new-tokens", "3", "--json", "--ep", "2"]) == 0
    captured = capsys.readouterr()
    ep = json.loads(captured.out)
    assert ep["ep"] == 2 and ep["generated_tokens"] == single["generated_tokens"]
    assert "cpu-gloo multi-process" in captured.err
