"""Variants beyond the paper: defining properties, and graph rewrite == eager driver for each."""

import math

import pytest
import torch

from ipcv_compile import LocateSpec, capture, rewrite_graph
from ipcv_core import IPCVConfig, SegmentLayout, run_ipcv
from ipcv_core.prune import prune_stage
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs
from ipcv_core.variants import absorb_sizes, hash_scores, merge_average, zorder_groups


def test_hash_scores_deterministic_and_spread():
    a, b = hash_scores(1000, 0), hash_scores(1000, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, hash_scores(1000, 1))
    assert 0.0 <= a.min() and a.max() < 1.0
    assert abs(a.mean().item() - 0.5) < 0.05 and len(set(a.tolist())) > 990


@pytest.mark.parametrize("h,w,k", [(6, 6, 18), (7, 5, 7), (16, 16, 52), (3, 9, 27)])
def test_zorder_groups_partition_the_grid_compactly(h, w, k):
    g = zorder_groups(h, w, k)
    members = [m for m in g.flatten().tolist() if m != h * w]
    assert sorted(members) == list(range(h * w)), "groups must partition the grid"
    sizes = (g != h * w).sum(1)
    assert sizes.max() - sizes.min() <= 1
    # compact on average (a Z-order run may straddle a quadrant boundary now and then)
    areas = []
    for row in g.tolist():
        cells = [m for m in row if m != h * w]
        rs, cs = [m // w for m in cells], [m % w for m in cells]
        areas.append((max(rs) - min(rs) + 1) * (max(cs) - min(cs) + 1) / len(cells))
    assert sum(areas) / len(areas) <= 3.0


def test_stratified_selection_covers_every_group():
    torch.manual_seed(0)
    layout = SegmentLayout.packed((1 + 64, 1 + 30), protected=1, grids=((8, 8), (5, 6)))
    h = torch.randn(2, 96, 8)
    cfg = IPCVConfig(retain=0.25, prune_layer=1, as_depth=0, selection="stratified", k=2)
    st = prune_stage(h, h * 0.5, h, layout, cfg, 0)
    scores = st.scores
    for b in range(2):
        keep = set(st.keep_idx[b].tolist())
        for start, (gh, gw), K in [(1, (8, 8), 16), (66, (5, 6), 8)]:
            groups = zorder_groups(gh, gw, K)
            for row in groups.tolist():
                cells = [start + m for m in row if m != gh * gw]
                kept_here = [c for c in cells if c in keep]
                assert len(kept_here) == 1, "exactly one kept token per group"
                best = max(cells, key=lambda c: scores[b, c].item())
                assert kept_here[0] == best, "the best eq.1 score of the group is kept"
        assert 0 in keep and 65 in keep


def test_spatial_neighbours_are_grid_nearest_kept_tokens():
    torch.manual_seed(0)
    layout = SegmentLayout.batched(protected=1, grid=(6, 7))
    h = torch.randn(1, 43, 8)
    cfg = IPCVConfig(retain=0.3, prune_layer=1, as_depth=0, reconstruction="spatial", k=3)
    st = prune_stage(h, torch.zeros_like(h), h, layout, cfg, 0)
    keep, rem = st.keep_idx[0].tolist(), st.rem_idx[0].tolist()
    coord = lambda p: ((p - 1) // 7, (p - 1) % 7)
    for i, rp in enumerate(rem):
        d = lambda p: (coord(p)[0] - coord(rp)[0]) ** 2 + (coord(p)[1] - coord(rp)[1]) ** 2
        cand = sorted(d(p) for p in keep if p != 0)
        got = sorted(d(keep[j]) for j in st.nbr_idx[0, i].tolist())
        assert got == cand[:3], "neighbours must be the 3 grid-nearest kept tokens"
        assert 0 not in [keep[j] for j in st.nbr_idx[0, i].tolist()]
    torch.testing.assert_close(st.nbr_w.sum(-1), torch.ones(1, len(rem)))


def test_absorb_sizes_and_merge_average():
    idx = torch.tensor([[[0, 1], [0, 2], [2, 0]]])
    valid = torch.ones(1, 3, 2, dtype=torch.bool)
    sizes = absorb_sizes(idx, valid, 4)
    assert sizes.tolist() == [[3.0, 1.0, 2.0, 1.0]]
    assert sizes.sum() == 4 + 3
    hk, hr = torch.randn(1, 4, 5), torch.randn(1, 3, 5)
    m = merge_average(hk, hr, idx, sizes)
    torch.testing.assert_close(m[0, 0], (hk[0, 0] + hr[0, 0] + hr[0, 1]) / 3)
    torch.testing.assert_close(m[0, 2], (hk[0, 2] + hr[0, 2]) / 2)
    torch.testing.assert_close(m[0, 1], hk[0, 1])


def test_reference_mode_is_default():
    assert IPCVConfig().is_reference and not IPCVConfig(selection="random").is_reference
    with pytest.raises(ValueError, match="IPCVConfig.selection"):
        IPCVConfig(selection="best")
    with pytest.raises(ValueError, match="patch grid"):
        x = torch.randn(1, 10, 4)
        prune_stage(x, torch.randn(1, 10, 4), x, SegmentLayout(), IPCVConfig(selection="stratified", prune_layer=1), 0)


SPEC = LocateSpec(blocks="blocks", attention="attn", ffn="mlp")
VARIANTS = [
    dict(selection="random"),
    dict(selection="stratified"),
    dict(selection="stratified_random", reconstruction="spatial"),
    dict(reconstruction="spatial", weighting="similarity"),
    dict(selection="stratified", merge="size_bias", as_depth=0),
    dict(selection="stratified", merge="average", reconstruction="spatial", as_depth=1),
]


@pytest.fixture(scope="module")
def captured():
    out = {}
    for name, (spec, grids, prot, packed) in {
        "batched-cls": (ViTSpec(depth=4, layerscale=True, fused_qkv=False), [(5, 6)], 1, False),
        "packed-rotary": (ViTSpec(depth=4, rotary=True), [(4, 4), (3, 5)], 0, True),
    }.items():
        m = SyntheticViT(spec).eval()
        h, cos, sin, mask, layout = make_inputs(spec, grids, prot, batch=1 if packed else 2, packed=packed)
        args = (h, cos, sin, mask)
        out[name] = (m, args, layout, capture(m, args))
    return out


def _graph_vs_driver(case, cfg):
    """``(rewritten module, graph output, eager driver output after the final norm, driver result)``."""
    m, args, layout, gm = case
    rm = rewrite_graph(gm, cfg, SPEC, layout)
    h, cos, sin, _ = args
    with torch.no_grad():
        out = rm(*args)
        res = run_ipcv(h, m.branches(cos, sin), cfg, layout)
    return rm, out, m.norm(res.hidden_states), res


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("case", ["batched-cls", "packed-rotary"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_variant_graph_equals_driver(captured, case, variant):
    cfg = IPCVConfig(**{**dict(retain=0.35, prune_layer=1, as_depth=2, k=3), **variant})
    _, out, ref, _ = _graph_vs_driver(captured[case], cfg)
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("case", ["batched-cls", "packed-rotary"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(stages=((1, 0.6),), prune_layer=2, as_depth=1),
        dict(stages=((1, 0.7), (2, 0.5)), prune_layer=3, as_depth=0, selection="stratified_random", reconstruction="spatial"),
        dict(stages=((1, 0.6),), prune_layer=3, as_depth=1, selection="stratified", weighting="similarity"),
    ],
    ids=["2stage-AS", "3stage-random-spatial", "2stage-stratified"],
)
def test_multistage_graph_equals_driver(captured, case, variant):
    cfg = IPCVConfig(**{**dict(retain=0.35, k=3), **variant})
    rm, out, ref, res = _graph_vs_driver(captured[case], cfg)
    assert len(res.stages) == len(cfg.stages) + 1
    assert _rel(out, ref) <= 1e-5
    assert rm.report.inserted["ipcv_prune"] == len(cfg.stages) + 1


def test_multistage_keeps_the_scheduled_counts():
    spec = ViTSpec(depth=5)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    cfg = IPCVConfig(retain=0.25, stages=((1, 0.75), (2, 0.5)), prune_layer=3, as_depth=1, k=3)
    res = run_ipcv(h, m.branches(), cfg, layout)
    assert [st.keep_idx.shape[1] for st in res.stages] == [1 + 27, 1 + 18, 1 + 9]
    assert res.keep_idx.shape[1] == 10 and res.rem_idx.shape[1] == 27
    assert (res.keep_idx[:, 0] == 0).all()
    assert sorted(res.keep_idx[0].tolist() + res.rem_idx[0].tolist()) == list(range(37))
    with pytest.raises(ValueError, match="IPCVConfig.stages"):
        IPCVConfig(retain=0.5, stages=((2, 0.4),), prune_layer=3)


def test_benchmark_variant_runner_and_rows():
    """The harness's variant rows run any IPCVConfig (square grid inferred) and the tuned configs
    written by `ipcv tune` load as rows."""
    from benchmarks import run as bench
    from benchmarks.methods import METHODS

    spec = ViTSpec(depth=4)
    m = SyntheticViT(spec).eval()
    h, *_ = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    fields = dict(selection="stratified", reconstruction="spatial", weighting="similarity", k=3, prune_layer=1, as_depth=1)
    out = METHODS["ipcv_config"](h, m.branches(), 0.35, SegmentLayout.batched(1), **fields)
    ref = run_ipcv(h, m.branches(), IPCVConfig(retain=0.35, **fields), SegmentLayout.batched(1, (6, 6)))
    assert torch.equal(out.hidden_states, ref.hidden_states)
    args = bench.parse_args([])
    labels = [c.variant for c in bench.build_configs(args) if c.method == "ipcv_config"]
    assert labels.count("stratified") == 3
    for r in (0.5, 0.35, 0.2):
        t = bench.tuned_fields(r)
        if t is not None:
            IPCVConfig(retain=r, **t)  # a valid config
            assert "tuned" in labels


def test_tome_twin_row_is_the_tuned_schedule_with_tomes_unmerge():
    """The issue-16 harness compares a tuned merge config with ToMe at exactly its FLOPs: the same
    fields with ``reconstruction="copy"``; configs with nothing to compare get no twin row."""
    from benchmarks import run as bench
    from benchmarks.grid import tome_twin
    from ipcv_core.cost import ModelDims, config_flops
    from ipcv_core.search import merge_family_config

    d = merge_family_config(0.35, 12, first=0, front=0.6, placement="post_attention").to_dict()
    d.pop("retain"), d.pop("extras")
    twin = tome_twin(d)
    assert twin == {**d, "reconstruction": "copy"}
    dims = ModelDims(384, ffn_params=2 * 384 * 1536, key_dim=64)
    kw = dict(n_tokens=1025, protected=1, depth=12, dims=dims)
    assert config_flops(IPCVConfig(retain=0.35, **twin), **kw) == config_flops(IPCVConfig(retain=0.35, **d), **kw)
    assert tome_twin({**d, "k": 3}) is None and tome_twin({**d, "merge": "size_bias"}) is None
    assert tome_twin(dict(selection="score", reconstruction="feature", k=10, merge="none")) is None
    args = bench.parse_args(["--variant-set", "issue16"])
    labels = [c.variant for c in bench.build_configs(args) if c.method == "ipcv_config"]
    for r in (0.5, 0.35, 0.2):
        t = bench.tuned_fields(r)
        if t is not None and tome_twin(t) is not None:
            assert "ToMe as a rewrite, tuned schedule" in labels


# ----------------------------------------------------------------------------- gradual bipartite merging
def test_bipartite_selection_removes_what_tome_matching_removes():
    """One bipartite stage removes exactly the A tokens ToMe's bipartite soft matching merges away
    (an independent implementation in benchmarks.baselines), per segment, and keeps every B token."""
    from benchmarks.baselines.merging import bipartite_soft_matching
    from ipcv_core.segments import plan_segments
    from ipcv_core.variants import bipartite_scores, normalise_metric

    torch.manual_seed(0)
    P, n, r = 1, 40, 13
    metric = torch.randn(2, P + n, 6)
    layout = SegmentLayout.batched(P)
    cfg = IPCVConfig(retain=(n - r) / n, prune_layer=1, as_depth=0, selection="bipartite", k=1)
    x = torch.randn(2, P + n, 8)
    st = prune_stage(x, torch.zeros(2, P + n, 8), x, layout, cfg, 0, metric=metric)
    m = bipartite_soft_matching(metric, r, P)
    for b in range(2):
        removed = sorted(st.rem_idx[b].tolist())
        assert removed == sorted((P + 2 * m.src[b]).tolist())
        assert all((p - P) % 2 == 0 for p in removed), "only set-A tokens are removed"
    # packed: segments match separately (a segment's scores ignore the other segment's tokens)
    lay2 = SegmentLayout.packed((P + 20, P + 15), P)
    mt = normalise_metric(torch.randn(1, 2 * P + 35, 6))
    s_joint = bipartite_scores(mt, plan_segments(lay2, 2 * P + 35, 1.0))
    s_alone = bipartite_scores(mt[:, P + 20:], plan_segments(SegmentLayout.batched(P), P + 15, 1.0))
    assert torch.equal(s_joint[:, P + 20:], s_alone)


def test_gradual_merge_sizes_accumulate_and_neighbours_are_cosine_nearest():
    spec = ViTSpec(depth=5, layerscale=True)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    from ipcv_core import gradual_stages

    stages = gradual_stages(0.3, 1, 4)
    assert [l for l, _ in stages] == [1, 2, 3]
    assert all(a > b for (_, a), (_, b) in zip(stages, stages[1:])) and stages[-1][1] > 0.3
    cfg = IPCVConfig(retain=0.3, stages=stages, prune_layer=4, as_depth=0, selection="bipartite", merge="average", k=1)
    with torch.no_grad():
        res = run_ipcv(h, m.branches(), cfg, layout)
    sizes = torch.exp(res.stages[-1].log_size)
    # every original token is counted exactly once in the final sizes (sizes add over stages)
    torch.testing.assert_close(sizes.sum(1), torch.full((2,), 37.0))
    assert sizes.max() > 2.5, "some rows absorbed earlier-merged rows"
    # each stage's first neighbour is the cosine-nearest kept prunable row (head-averaged keys)
    st = res.stages[0]
    keys = m.blocks[1].key_features(run_blocks_upto(m, h, 1))
    kn = torch.nn.functional.normalize(keys, dim=-1)
    for b in range(2):
        kept = [p for p in st.keep_idx[b].tolist() if p != 0]
        for i, rp in enumerate(st.rem_idx[b].tolist()[:5]):
            sims = {p: (kn[b, rp] @ kn[b, p]).item() for p in kept}
            got = st.keep_idx[b, st.nbr_idx[b, i, 0]].item()
            assert abs(sims[got] - max(sims.values())) < 1e-5


def run_blocks_upto(m, h, n):
    from ipcv_core import run_blocks

    return run_blocks(h, m.branches()[:n])


def test_bipartite_stage_removing_more_than_half_is_rejected():
    with pytest.raises(ValueError, match="at most half"):
        IPCVConfig(retain=0.3, prune_layer=1, as_depth=0, selection="bipartite").validate_depth(4)
    with pytest.raises(ValueError, match="at most half"):
        IPCVConfig(retain=0.3, stages=((1, 0.7),), prune_layer=2, as_depth=0, selection="bipartite").validate_depth(4)
    IPCVConfig(retain=0.35, stages=((1, 0.7),), prune_layer=2, as_depth=0, selection="bipartite").validate_depth(4)


@pytest.mark.parametrize(
    "variant",
    [
        dict(merge="average", k=1, as_depth=0),
        dict(merge="size_bias", k=2, as_depth=1, weighting="similarity"),
    ],
    ids=["average-k1", "size_bias-AS"],
)
def test_gradual_bipartite_graph_equals_driver(captured, variant):
    from ipcv_core import gradual_stages

    cfg = IPCVConfig(retain=0.35, stages=gradual_stages(0.35, 1, 3), prune_layer=3, selection="bipartite", **variant)
    rm, out, ref, _ = _graph_vs_driver(captured["batched-cls"], cfg)
    assert _rel(out, ref) <= 1e-5
    assert rm.report.inserted["ipcv_key_metric"] == 3 and rm.report.key_copies > 0
    assert rm.report.inserted["ipcv_attention_bias"] >= 1


def test_gradual_bipartite_graph_keeps_segments_independent(captured):
    """Packed rotary tower (keys after rotary in the graph): changing one segment's tokens leaves the
    other segment's output bit-identical."""
    from ipcv_core import gradual_stages

    m, args, layout, gm = captured["packed-rotary"]
    cfg = IPCVConfig(retain=0.4, stages=gradual_stages(0.4, 1, 3), prune_layer=3, as_depth=0,
                     selection="bipartite", merge="average", k=1)
    rm = rewrite_graph(gm, cfg, SPEC, layout)
    h, cos, sin, mask = args
    n0 = layout.lengths[0]
    h2 = h.clone()
    h2[..., n0:, :] = torch.randn_like(h2[..., n0:, :])
    with torch.no_grad():
        a, b = rm(h, cos, sin, mask), rm(h2, cos, sin, mask)
    assert torch.equal(a[..., :n0, :], b[..., :n0, :])
    assert not torch.equal(a[..., n0:, :], b[..., n0:, :])
    assert torch.isfinite(a).all()


def test_gradual_bipartite_rotary_graph_equals_driver(captured):
    """Rotary tower: the graph's metric is the SDPA key (rotary applied); the eager driver's
    key_features applies rotary at the rows' original positions — the same keys at every stage."""
    from ipcv_core import gradual_stages

    cfg = IPCVConfig(retain=0.4, stages=gradual_stages(0.4, 1, 3), prune_layer=3, as_depth=0,
                     selection="bipartite", merge="average", k=2)
    _, out, ref, _ = _graph_vs_driver(captured["packed-rotary"], cfg)
    assert _rel(out, ref) <= 1e-5


def test_bipartite_in_the_eager_driver_needs_key_features():
    from ipcv_core import Branches

    spec = ViTSpec(depth=3)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(4, 4)], 1, batch=1, packed=False)
    blocks = [Branches(b.attention, b.ffn) for b in m.branches()]  # no keys
    cfg = IPCVConfig(retain=0.6, prune_layer=1, as_depth=0, selection="bipartite", k=1)
    with pytest.raises(ValueError, match="key_features"):
        run_ipcv(h, blocks, cfg, layout)


# ----------------------------------------------------------------------------- DART(ViT) as a selection rule
DART = dict(selection="dart", reconstruction="copy", as_depth=0, k=1)


@pytest.mark.parametrize("prune_layer,retain", [(1, 0.35), (2, 0.2)])
def test_dart_rule_keeps_what_the_benchmark_dart_keeps(prune_layer, retain):
    """selection='dart' in the eager driver keeps exactly run_dart's keep set (one scoring function,
    ipcv_core.selection.dart_keep_mask, imported by the harness), and the kept rows' outputs are identical
    (both run the later blocks on the kept rows only)."""
    from benchmarks.baselines import selection as bsel
    from benchmarks.methods import run_dart
    from ipcv_core.selection import dart_keep_mask

    assert bsel.dart_keep_mask is dart_keep_mask  # moved, not copied
    spec = ViTSpec(depth=4)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    with torch.no_grad():
        ref = run_dart(h, m.branches(), retain, SegmentLayout.batched(1), prune_layer=prune_layer)
        res = run_ipcv(h, m.branches(), IPCVConfig(retain=retain, prune_layer=prune_layer, **DART), layout)
    assert torch.equal(res.keep_idx, ref.keep_idx)
    D = h.shape[-1]
    kept = lambda x: torch.gather(x, 1, ref.keep_idx.unsqueeze(-1).expand(-1, -1, D))
    assert _rel(kept(res.hidden_states), kept(ref.hidden_states)) <= 1e-5
    # every removed row is a copy (to fp32 rounding: NGR with one neighbour) of one kept row's final value
    for b in range(2):
        finals = res.hidden_states[b, ref.keep_idx[b, 1:]]
        for r in res.rem_idx[b].tolist():
            assert (res.hidden_states[b, r] - finals).norm(dim=-1).min() <= 1e-5 * finals.norm(dim=-1).max()


def test_dart_rule_needs_the_keys():
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="selection='dart' needs"):
        prune_stage(x, x, x, SegmentLayout(), IPCVConfig(retain=0.5, prune_layer=1, **DART), 0)


def test_dart_rule_scores_each_segment_alone():
    """Packed layout: every segment's keep set is DART's keep set of that segment on its own rows."""
    from ipcv_core.segments import plan_segments
    from ipcv_core.selection import dart_keep_mask, dart_segment_scores

    torch.manual_seed(0)
    layout = SegmentLayout.packed((1 + 20, 1 + 12), protected=1)
    h, keys = torch.randn(1, 34, 8), torch.randn(1, 34, 6)
    plan = plan_segments(layout, 34, 0.35)
    s = dart_segment_scores(h, keys, plan)
    assert s[0, 0] == 1 and s[0, 21] == 1  # protected
    for start, n in ((1, 20), (22, 12)):
        alone = dart_keep_mask(h[:, start:start + n], keys[:, start:start + n], math.ceil(0.35 * n))
        assert torch.equal(s[:, start:start + n].bool(), alone)


@pytest.mark.parametrize("case", ["batched-cls", "packed-rotary"])
def test_dart_graph_equals_driver(captured, case):
    cfg = IPCVConfig(retain=0.35, prune_layer=1, **DART)
    rm, out, ref, res = _graph_vs_driver(captured[case], cfg)
    assert _rel(out, ref) <= 1e-5
    assert rm.report.inserted["ipcv_key_metric"] == 1 and rm.report.inserted["ipcv_prune"] == 1


# ----------------------------------------------------------------------------- ToFu as a merge rule
def test_mlerp_merge_equals_a_loop_reference():
    """MLERP: a kept row absorbing removed rows takes the direction of the group's size-weighted mean and
    the largest norm in the group; a kept row absorbing nothing (or only invalid neighbours) is unchanged."""
    from ipcv_core.variants import merge_mlerp

    g = torch.Generator().manual_seed(0)
    B, K, R, D = 2, 4, 6, 5
    hk, hr = torch.randn(B, K, D, generator=g), torch.randn(B, R, D, generator=g) * 3
    nbr = torch.randint(0, K, (B, R, 2), generator=g)
    nbr[:, :, 0] = torch.tensor([0, 0, 2, 2, 2, 1])  # row 3 absorbs nothing
    valid = torch.ones(B, R, 2, dtype=torch.bool)
    valid[1, 5, 0] = False  # batch row 1: row 1 absorbs nothing either
    sk, sr = torch.rand(B, K, generator=g) + 1, torch.rand(B, R, generator=g) + 1
    sizes = absorb_sizes(nbr, valid, K, sk, sr)
    got = merge_mlerp(hk, hr, nbr, valid, sizes, sk, sr)
    for b in range(B):
        for j in range(K):
            group = [i for i in range(R) if nbr[b, i, 0] == j and valid[b, i, 0]]
            if not group:
                assert torch.equal(got[b, j], hk[b, j])
                continue
            acc = sk[b, j] * hk[b, j] + sum(sr[b, i] * hr[b, i] for i in group)
            avg = acc / (sk[b, j] + sum(sr[b, i] for i in group))
            norm = max([hk[b, j].norm()] + [hr[b, i].norm() for i in group])
            torch.testing.assert_close(got[b, j], avg / avg.norm() * norm, rtol=1e-5, atol=1e-6)


def _tofu(depth, retain=0.35):
    from ipcv_core.search import merge_family_config

    return merge_family_config(retain, depth, first=0, k=1, merge="tofu", placement="post_attention",
                               reconstruction="copy")


def test_tofu_stages_drop_early_and_merge_with_mlerp_later():
    spec = ViTSpec(depth=6, layerscale=True)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    cfg = _tofu(6)
    with torch.no_grad():
        res = run_ipcv(h, m.branches(), cfg, layout)
    drops = [cfg.merge_rule.drops_at(layer, cfg.prune_layer) for layer, _ in cfg.schedule]
    assert drops == [True, True, False, False, False, False]  # layer < (5 + 1) // 3
    n_rows = [37] + [st.keep_idx.shape[1] for st in res.stages]
    for i, st in enumerate(res.stages):
        sizes = torch.exp(st.log_size)
        if drops[i]:  # pruned: nothing absorbed, every kept row still one token
            torch.testing.assert_close(sizes, torch.ones_like(sizes))
    # the dropped tokens are counted nowhere; every other original token exactly once
    dropped = sum(n_rows[i] - n_rows[i + 1] for i in range(len(drops)) if drops[i])
    torch.testing.assert_close(torch.exp(res.stages[-1].log_size).sum(1), torch.full((2,), 37.0 - dropped))
    assert res.hidden_states.shape == h.shape and torch.isfinite(res.hidden_states).all()


def test_tofu_graph_equals_driver(captured):
    cfg = _tofu(4)
    assert cfg.merge_rule.drops_at(0, cfg.prune_layer) and not cfg.merge_rule.drops_at(1, cfg.prune_layer)
    rm, out, ref, _ = _graph_vs_driver(captured["batched-cls"], cfg)
    assert _rel(out, ref) <= 1e-5
    assert rm.report.inserted["ipcv_attention_bias"] >= 1
