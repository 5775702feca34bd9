"""Specifications of ipcv_core: config, selection, neighbours, NGR, restore and the eager driver."""

import math

import pytest
import torch

import ipcv_core.reconstruct as ngr_mod
from ipcv_core import (
    AttnContext,
    IPCVConfig,
    SegmentLayout,
    feature_difference_score,
    knn_kept,
    neighbour_weights,
    ngr,
    num_keep,
    plan_segments,
    restore,
    run_blocks,
    run_ipcv,
    select_per_segment,
)
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

SPECS = [
    ViTSpec(),
    ViTSpec(rotary=True, fused_qkv=False, layerscale=True, ffn="gated", norm="rms"),
    ViTSpec(rotary=True, fused_qkv=True, layerscale=True),
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(retain=0.0), "retain"),
        (dict(retain=1.5), "retain"),
        (dict(retain=float("nan")), "retain"),
        (dict(k=0), "k"),
        (dict(prune_layer=0), "prune_layer"),
        (dict(as_depth=-1), "as_depth"),
        (dict(min_keep=0), "min_keep"),
        (dict(weighting="max"), "weighting"),
        (dict(similarity_temperature=0.0), "similarity_temperature"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"IPCVConfig.{field}"):
        IPCVConfig(**kwargs)


def test_depth_validation_names_field_and_range():
    with pytest.raises(ValueError, match=r"prune_layer must be in \[1, depth-1\] = \[1, 5\]"):
        IPCVConfig(prune_layer=6, as_depth=0).validate_depth(6)
    with pytest.raises(ValueError, match=r"as_depth must be in \[0, depth - prune_layer\] = \[0, 3\]"):
        IPCVConfig(prune_layer=3, as_depth=4).validate_depth(6)
    IPCVConfig(prune_layer=3, as_depth=3).validate_depth(6)  # the boundary is allowed


def test_driver_rejects_prune_layer_beyond_depth():
    m = SyntheticViT(ViTSpec(depth=4))
    h, *_ , layout = make_inputs(m.spec, [(3, 3)])
    with pytest.raises(ValueError, match="prune_layer"):
        run_ipcv(h, m.branches(), IPCVConfig(prune_layer=4, as_depth=0), layout)


def test_config_json_round_trip(tmp_path):
    cfg = IPCVConfig(retain=0.2, prune_layer=5, as_depth=2, k=3, weighting="similarity")
    p = tmp_path / "c.json"
    cfg.to_json(str(p))
    assert IPCVConfig.from_json(str(p)) == cfg
    with pytest.raises(ValueError, match="unknown IPCVConfig field"):
        IPCVConfig.from_dict({"retian": 0.5})


def test_num_keep_rounding():
    assert num_keep(10, 0.7) == 7  # 0.7*10 = 7.000000000000001 in floats: must not round up to 8
    assert num_keep(10, 0.35) == 4  # ceil(3.5)
    assert num_keep(1024, 0.5) == 512
    assert num_keep(1024, 0.35) == 359  # ceil(358.4)
    assert num_keep(3, 0.01) == 1  # at least one
    assert num_keep(10, 0.1, min_keep=4) == 4
    assert num_keep(3, 0.5, min_keep=10) == 3  # never more than n
    assert num_keep(7, 1.0) == 7


# ----------------------------------------------------------------------------- selection
def test_selection_keeps_exactly_k_per_segment_and_protected():
    torch.manual_seed(0)
    lengths = (17, 10, 5)
    layout = SegmentLayout.packed(lengths, protected=1)
    scores = torch.rand(2, sum(lengths))
    scores[:, [0, 17, 27]] = -1.0  # protected tokens score lowest: must still be kept
    keep, rem, plan = select_per_segment(scores, layout, 0.35)
    starts = [0, 17, 27]
    for b in range(2):
        k, r = keep[b].tolist(), rem[b].tolist()
        assert sorted(k) == k and sorted(r) == r, "index lists must be ascending"
        assert sorted(k + r) == list(range(32))
        for s, n in zip(starts, lengths):
            in_seg = [i for i in k if s <= i < s + n]
            assert s in in_seg, "protected token removed"
            assert len(in_seg) - 1 == math.ceil(0.35 * (n - 1) - 1e-9)
            # the kept prunable tokens are exactly the top-scoring ones of the segment
            seg_scores = scores[b, s + 1 : s + n]
            top = set((torch.topk(seg_scores, len(in_seg) - 1).indices + s + 1).tolist())
            assert set(in_seg) - {s} == top
    assert [sp.keep for sp in plan.segments] == [6, 4, 2]


def test_selection_ties_deterministic_exact_k_ascending():
    scores = torch.ones(2, 12)
    scores[:, 3] = 2.0
    keep, rem, _ = select_per_segment(scores, SegmentLayout(), 0.5)
    keep2, rem2, _ = select_per_segment(scores.clone(), SegmentLayout(), 0.5)
    assert torch.equal(keep, keep2) and torch.equal(rem, rem2)
    for b in range(2):
        assert 3 in keep[b].tolist() and len(set(keep[b].tolist())) == 6
        assert keep[b].tolist() == sorted(keep[b].tolist()) and rem[b].tolist() == sorted(rem[b].tolist())
        assert sorted(keep[b].tolist() + rem[b].tolist()) == list(range(12))


def test_compact_lists_true_positions_in_order():
    from ipcv_core.selection import compact

    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    assert compact(mask, 3).tolist() == [[1, 2, 4], [0, 3, 4]]
    assert compact(~mask, 2).tolist() == [[0, 3], [1, 2]]


def test_selection_equal_segments_vectorised_path_matches_loop():
    torch.manual_seed(1)
    scores = torch.rand(2, 4 * 9)
    layout = SegmentLayout.packed((9, 9, 9, 9), protected=1)
    keep, rem, plan = select_per_segment(scores, layout, 0.4)
    # reference: segment by segment through the general path (different lengths force the loop)
    for b in range(2):
        ref_keep, ref_rem = [], []
        for s in range(4):
            sub = scores[b : b + 1, s * 9 : (s + 1) * 9]
            k1, r1, _ = select_per_segment(sub, SegmentLayout(None, 1), 0.4)
            ref_keep += (k1[0] + s * 9).tolist()
            ref_rem += (r1[0] + s * 9).tolist()
        assert keep[b].tolist() == ref_keep and rem[b].tolist() == ref_rem


def test_nan_scores_keep_a_valid_set_and_stay_in_their_row():
    """Issue 14 (was: NaN scores raise): a row with NaN / inf scores still keeps K distinct positions
    (compiled graphs cannot raise on data), and the other rows' selection is unchanged."""
    s = torch.rand(3, 8)
    ref_keep, ref_rem, _ = select_per_segment(s.clone(), SegmentLayout(), 0.5)
    s[1, 3] = float("nan")
    s[1, 5] = float("inf")
    keep, rem, _ = select_per_segment(s, SegmentLayout(), 0.5)
    assert sorted(keep[1].tolist() + rem[1].tolist()) == list(range(8))  # a partition of the row
    assert torch.equal(keep[[0, 2]], ref_keep[[0, 2]]) and torch.equal(rem[[0, 2]], ref_rem[[0, 2]])


def test_feature_difference_score_is_l2_of_update():
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    torch.testing.assert_close(feature_difference_score(a, b), (a - b).pow(2).sum(-1).sqrt())


# ----------------------------------------------------------------------------- neighbours / NGR / restore
def _brute_knn(h_rem, h_keep, k):
    d = torch.cdist(h_rem.double(), h_keep.double())
    return torch.topk(d, k, largest=False).indices


def test_knn_same_segment_only_and_matches_brute_force():
    torch.manual_seed(0)
    layout = SegmentLayout.packed((30, 20), protected=1)
    h = torch.randn(1, 50, 8)
    keep, rem, plan = select_per_segment(torch.rand(1, 50), layout, 0.4)
    hk, hr = h[0, keep[0]][None], h[0, rem[0]][None]
    idx, valid = knn_kept(hr, hk, plan, 3, chunk_elems=16)  # tiny chunks: many blocks
    assert valid.all()
    seg_of = lambda pos: 0 if pos < 30 else 1
    for i, rpos in enumerate(rem[0].tolist()):
        nb_pos = keep[0, idx[0, i]].tolist()
        assert all(seg_of(p) == seg_of(rpos) for p in nb_pos), "neighbour from another segment"
        assert 0 not in nb_pos and 30 not in nb_pos, "protected tokens are not neighbours"
        cand = [j for j, p in enumerate(keep[0].tolist()) if seg_of(p) == seg_of(rpos) and p not in (0, 30)]
        ref = [cand[j] for j in _brute_knn(hr[0, i : i + 1], hk[0, cand], 3)[0].tolist()]
        assert idx[0, i].tolist() == ref


def test_knn_fewer_kept_than_k_uses_all_kept():
    layout = SegmentLayout.packed((10,), protected=0)
    h = torch.randn(1, 10, 4)
    keep, rem, plan = select_per_segment(torch.rand(1, 10), layout, 0.2)  # keeps 2
    hk, hr = h[0, keep[0]][None], h[0, rem[0]][None]
    idx, valid = knn_kept(hr, hk, plan, 5)
    assert idx.shape == (1, 8, 5)
    assert valid.sum(-1).eq(2).all()
    w = neighbour_weights(hr, hk, idx, valid, "mean")
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 8))
    assert (w[..., 2:] == 0).all() and torch.allclose(w[..., :2], torch.full((1, 8, 2), 0.5))
    assert {tuple(sorted(r)) for r in idx[0, :, :2].tolist()} == {(0, 1)}


def test_knn_memory_bounded_no_cross_segment_matrix(monkeypatch):
    """2 segments x 8192 tokens x 1280 dims: every distance block lies within one segment and
    holds at most ``chunk_elems`` entries (64 Mi floats would be one 8192x8192 segment matrix)."""
    torch.manual_seed(0)
    n, D = 8192, 1280
    layout = SegmentLayout.packed((n, n))
    h = torch.randn(1, 2 * n, D)
    keep, rem, plan = select_per_segment(torch.rand(1, 2 * n), layout, 0.5)
    hk, hr = h[0, keep[0]][None], h[0, rem[0]][None]
    blocks = []
    orig = ngr_mod.pairwise_sq_dist

    def spy(a, b):
        blocks.append((a.shape[1], b.shape[1]))
        return orig(a, b)

    monkeypatch.setattr(ngr_mod, "pairwise_sq_dist", spy)
    chunk = 1 << 22
    idx, _ = knn_kept(hr, hk, plan, 10, chunk_elems=chunk)
    K_seg = plan.segments[0].keep
    assert all(cols == K_seg for _, cols in blocks), "a distance block spans more than one segment"
    assert max(r * c for r, c in blocks) <= chunk
    assert sum(r for r, _ in blocks) == rem.shape[1]
    assert len(blocks) >= 2 * math.ceil(plan.segments[0].remove * K_seg / chunk)
    # spot-check correctness on a few rows of segment 1
    for i in (4096, 6000, 8191):
        seg_rows = slice(K_seg, 2 * K_seg)
        ref = _brute_knn(hr[0, i : i + 1], hk[0, seg_rows], 10)[0] + K_seg
        assert set(idx[0, i].tolist()) == set(ref.tolist())


def test_ngr_matches_equation_5():
    torch.manual_seed(0)
    hk_lp, hk_l, hr_lp = torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    idx = torch.tensor([[[0, 2], [3, 1]]])
    w = torch.full((1, 2, 2), 0.5)
    out = ngr(hr_lp, hk_lp, hk_l, idx, w)
    delta = hk_l - hk_lp
    exp0 = hr_lp[0, 0] + (delta[0, 0] + delta[0, 2]) / 2
    exp1 = hr_lp[0, 1] + (delta[0, 3] + delta[0, 1]) / 2
    torch.testing.assert_close(out[0], torch.stack([exp0, exp1]))
    # at l = l_p the reconstruction is the removed tokens' own value
    torch.testing.assert_close(ngr(hr_lp, hk_lp, hk_lp, idx, w), hr_lp)


def test_similarity_weights_sum_to_one_and_prefer_closer():
    hr = torch.tensor([[[1.0, 0.0]]])
    hk = torch.tensor([[[1.0, 0.1], [0.0, 1.0]]])
    idx = torch.tensor([[[0, 1]]])
    w = neighbour_weights(hr, hk, idx, torch.ones(1, 1, 2, dtype=torch.bool), "similarity", 0.1)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1))
    assert w[0, 0, 0] > 0.99


def test_restore_inverts_the_split():
    h = torch.randn(2, 9, 4)
    keep, rem, _ = select_per_segment(torch.rand(2, 9), SegmentLayout(), 0.4)
    hk = torch.gather(h, 1, keep[..., None].expand(-1, -1, 4))
    hr = torch.gather(h, 1, rem[..., None].expand(-1, -1, 4))
    assert torch.equal(restore(hk, hr, keep, rem), h)


# ----------------------------------------------------------------------------- driver
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("grids,protected", [([(5, 5)], 0), ([(4, 4), (3, 5), (2, 3)], 1)])
def test_retain_one_is_bit_identical(spec, grids, protected):
    """At retain 1.0 the driver equals its unpruned path bit for bit; that path attends segment by
    segment (no mask spans two segments), which equals the model with a block-diagonal mask — bit for
    bit for one segment, to float rounding for several (other matmul shapes)."""
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, layout = make_inputs(spec, grids, protected)
    with torch.no_grad():
        ref = m(h, cos, sin, mask)
        plain = m.norm(run_blocks(h, m.branches(cos, sin), layout))
        for lp, d in [(1, 0), (2, 3), (3, 2)]:
            out = run_ipcv(h, m.branches(cos, sin), IPCVConfig(retain=1.0, prune_layer=lp, as_depth=d), layout)
            assert torch.equal(m.norm(out.hidden_states), plain)
    if len(grids) == 1:
        assert torch.equal(plain, ref)
    else:
        assert (plain - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def paper_loop(m, h, cos, sin, cfg):
    """Straightforward loop following the paper's equations for ONE segment (batch 1): attention
    over the full restored sequence for ALL rows (eq. 8), then keep the kept rows (eq. 9)."""
    blocks = m.branches(cos, sin)
    lp, depth = cfg.prune_layer, len(blocks)
    x = h[0]
    N = x.shape[0]
    for blk in blocks[:lp]:
        x_prev = x
        x = (x[None] + blk.attention_branch(x[None], x[None], AttnContext()))[0]
        x = x + blk.ffn_branch(x[None])[0]
    s = (x - x_prev).norm(dim=-1)
    K = math.ceil(cfg.retain * N - 1e-9)
    keep = torch.sort(torch.topk(s, K).indices).values
    rem = torch.tensor(sorted(set(range(N)) - set(keep.tolist())), dtype=torch.long)
    Hk_lp, Hr_lp = x[keep], x[rem]
    nbrs = torch.topk(torch.cdist(Hr_lp.double(), Hk_lp.double()), min(cfg.k, K), largest=False).indices

    def rec(xk):
        return Hr_lp + (xk - Hk_lp)[nbrs].mean(1)

    xk = Hk_lp
    for li in range(lp, depth):
        blk = blocks[li]
        if li < lp + cfg.as_depth:
            full = torch.empty(N, x.shape[1])
            full[keep], full[rem] = xk, rec(xk)
            a = blk.attention_branch(full[None], full[None], AttnContext())[0]
            xk = xk + a[keep]
        else:
            ctx = AttnContext(q_pos=keep[None], kv_pos=keep[None])
            xk = xk + blk.attention_branch(xk[None], xk[None], ctx)[0]
        xk = xk + blk.ffn_branch(xk[None])[0]
    out = torch.empty(N, x.shape[1])
    out[keep], out[rem] = xk, rec(xk)
    return out[None]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("r", [0.5, 0.35, 0.2])
@pytest.mark.parametrize("lp,delta", [(1, 0), (3, 2), (2, 4)])
def test_driver_matches_paper_loop(spec, r, lp, delta):
    m = SyntheticViT(spec).eval()
    h, cos, sin, _, layout = make_inputs(spec, [(6, 6)], 0, seed=3)
    cfg = IPCVConfig(retain=r, prune_layer=lp, as_depth=delta, k=4)
    with torch.no_grad():
        got = run_ipcv(h, m.branches(cos, sin), cfg, layout).hidden_states
        ref = paper_loop(m, h, cos, sin, cfg)
    assert rel_err(got, ref) <= 1e-5


def test_segment_isolation_bit_exact():
    """Changing every token of segment B leaves segment A's selection, neighbours, outputs alone."""
    spec = SPECS[1]
    m = SyntheticViT(spec).eval()
    h, cos, sin, _, layout = make_inputs(spec, [(5, 5), (4, 6)], protected=1, seed=0)
    nA = 26
    h2 = h.clone()
    h2[:, nA:] = torch.randn_like(h2[:, nA:]) * 3
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=2, k=4)
    with torch.no_grad():
        o1 = run_ipcv(h, m.branches(cos, sin), cfg, layout)
        o2 = run_ipcv(h2, m.branches(cos, sin), cfg, layout)
    kA = plan_segments(layout, h.shape[1], 0.35).segments[0]
    nkA, nrA = kA.protected + kA.keep, kA.remove
    assert torch.equal(o1.keep_idx[:, :nkA], o2.keep_idx[:, :nkA])
    assert torch.equal(o1.rem_idx[:, :nrA], o2.rem_idx[:, :nrA])
    assert torch.equal(o1.nbr_idx[:, :nrA], o2.nbr_idx[:, :nrA])
    assert torch.equal(o1.hidden_states[:, :nA], o2.hidden_states[:, :nA])
    assert not torch.equal(o1.hidden_states[:, nA:], o2.hidden_states[:, nA:])


def test_batched_rows_are_independent():
    spec = SPECS[2]
    m = SyntheticViT(spec).eval()
    h, cos, sin, _, layout = make_inputs(spec, [(5, 5)], protected=1, batch=3, packed=False)
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=2, k=4)
    with torch.no_grad():
        full = run_ipcv(h, m.branches(cos, sin), cfg, layout).hidden_states
        for b in range(3):
            one = run_ipcv(h[b : b + 1], m.branches(cos, sin), cfg, layout).hidden_states
            torch.testing.assert_close(full[b : b + 1], one, rtol=1e-6, atol=1e-6)


def test_protected_tokens_kept_in_place():
    spec = SPECS[0]
    m = SyntheticViT(spec).eval()
    h, cos, sin, _, layout = make_inputs(spec, [(5, 5)], protected=1, batch=2, packed=False)
    out = run_ipcv(h, m.branches(), IPCVConfig(retain=0.2, prune_layer=2, as_depth=2), layout)
    assert (out.keep_idx[:, 0] == 0).all()
    assert not (out.rem_idx == 0).any()
    assert out.keep_idx.shape[1] == 1 + math.ceil(0.2 * 25)


def test_without_reintegration_returns_kept_rows_only():
    spec = SPECS[0]
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(5, 5)])
    cfg = IPCVConfig(retain=0.4, prune_layer=2, as_depth=1, reintegrate=False)
    out = run_ipcv(h, m.branches(), cfg, layout)
    assert out.hidden_states.shape == (1, 10, spec.dim)


def test_bf16_dtype_preserved():
    spec = SPECS[1]
    m = SyntheticViT(spec).eval().to(torch.bfloat16)
    h, cos, sin, _, layout = make_inputs(spec, [(4, 4)], dtype=torch.bfloat16)
    out = run_ipcv(h, m.branches(cos, sin), IPCVConfig(retain=0.5, prune_layer=2, as_depth=2, k=3), layout)
    assert out.hidden_states.dtype == torch.bfloat16 and torch.isfinite(out.hidden_states.float()).all()
