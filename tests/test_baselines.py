"""Defining properties of the baselines (ToMe, ToFu, DART(ViT), naive prune, IPCV ablations) on
synthetic inputs.  Fast: small synthetic ViTs only."""

import math

import pytest
import torch

from ipcv_core import AttnContext, num_keep, run_blocks
from benchmarks.baselines import (
    MergeTracker,
    bipartite_soft_matching,
    dart_keep_mask,
    even_schedule,
    merge_mlerp,
    merge_prune,
    merge_wavg,
    new_positions,
)
from benchmarks.methods import METHODS, run_dart, run_ipcv_method, run_prune, run_tofu, run_tome
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

SPEC = ViTSpec(dim=32, depth=6, heads=4, layerscale=True)
# small-model settings for the methods that prune at one layer
KW = {
    "ipcv": dict(prune_layer=2, as_depth=2, k=3),
    "ipcv_no_as": dict(prune_layer=2, k=3),
    "ipcv_no_reint": dict(prune_layer=2, as_depth=2, k=3),
    "ipcv_sim": dict(prune_layer=2, as_depth=2, k=3),
    "random_ipcv": dict(prune_layer=2, as_depth=2, k=3),
    "prune_copy": dict(prune_layer=2),
    "prune_lp": dict(prune_layer=2),
    "dart": dict(prune_layer=2, num_pivots=3),
    "ipcv_config": dict(prune_layer=2, as_depth=2, k=3),
}


@pytest.fixture(scope="module")
def model():
    return SyntheticViT(SPEC)


def _inputs(batch=3, grid=(6, 5), seed=0, clustered=True):
    h, _, _, _, layout = make_inputs(SPEC, [grid], protected=1, batch=batch, packed=False, seed=seed)
    if clustered:  # image-like: groups of near-duplicate tokens, so matching / copying is meaningful
        g = torch.Generator().manual_seed(seed + 1)
        centres = torch.randn(batch, 5, SPEC.dim, generator=g)
        which = torch.randint(0, 5, (batch, h.shape[1]), generator=g)
        h = torch.gather(centres, 1, which.unsqueeze(-1).expand(-1, -1, SPEC.dim)) + 0.3 * h
    return h, layout


class Recorder:
    """Wraps a block and records the rows each branch sees (and the attention bias)."""

    def __init__(self, blk, log):
        self.blk, self.log = blk, log

    def attention_branch(self, x_q, x_kv, ctx):
        self.log.append(("attn", x_q.shape[1], x_kv.shape[1], ctx.bias))
        return self.blk.attention_branch(x_q, x_kv, ctx)

    def ffn_branch(self, x):
        self.log.append(("ffn", x.shape[1]))
        return self.blk.ffn_branch(x)

    def key_features(self, x):
        return self.blk.key_features(x)


# ----------------------------------------------------------------------------- schedule
def test_even_schedule_reaches_target_and_respects_half_limit():
    for n, keep, depth in [(1024, 205, 12), (256, 52, 12), (1024, 666, 12), (30, 2, 6), (7, 7, 4), (9, 1, 6)]:
        s = even_schedule(n, keep, depth)
        assert len(s) == depth and sum(s) == n - keep
        cur = n
        for r in s:
            assert 0 <= r <= cur // 2
            cur -= r
        if n >= 256:  # realistic sizes: constant up to the remainder, which goes first
            assert max(s) - min(s) <= 1 and s == sorted(s, reverse=True)
    assert even_schedule(1024, 205, 12) == [69] * 3 + [68] * 9
    with pytest.raises(ValueError, match="at most half"):
        even_schedule(100, 1, 2)


# ----------------------------------------------------------------------------- matching / merging
def test_bipartite_matching_merges_exactly_r_and_never_touches_protected():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 8)
    metric = x.clone()
    metric[:, 0] = metric[:, 1]  # CLS identical to a prunable token: still never matched
    m = bipartite_soft_matching(metric, 4, protected=1)
    assert m.r == 4 and m.out_len == 11 - 4
    tr = MergeTracker(2, 11)
    y = tr.step(x, m, "wavg")
    assert y.shape == (2, 7, 8)
    assert torch.equal(y[:, 0], x[:, 0]) and (tr.size[:, 0] == 1).all()
    assert (tr.assign[:, 0] == 0).all() and ((tr.assign[:, 1:] == 0).sum() == 0)
    assert not tr.removed_mask()[:, 0].any()
    assert int(tr.removed_mask().sum(1).unique()) == 4
    # r is capped at half of the prunable tokens
    assert bipartite_soft_matching(metric, 100, protected=1).r == 5


def test_matching_pairs_most_similar_tokens():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # layout after protected: A = even, B = odd positions
    metric = torch.stack([a[0], a[1], a[1] + 0.01, a[0] + 0.5]).unsqueeze(0)  # A0~B1, A1(=pos2)~B0
    m = bipartite_soft_matching(metric, 2)
    pairs = sorted(zip(m.src[0].tolist(), m.dst[0].tolist()))
    assert pairs == [(0, 1), (1, 0)]


def test_wavg_preserves_size_weighted_sum_and_total_size():
    torch.manual_seed(1)
    x = torch.randn(3, 17, 6, dtype=torch.float64)
    tr = MergeTracker(3, 17, dtype=torch.float64)
    for r in (4, 3, 2):
        before = (x * tr.size).sum(1)
        x = tr.step(x, bipartite_soft_matching(torch.randn(3, x.shape[1], 5), r, protected=1), "wavg")
        torch.testing.assert_close((x * tr.size).sum(1), before)
        assert torch.all(tr.size.sum(1) == 17)
    # unmerge: every original token gets the value of the token it ended in; length restored
    full = tr.unmerge(x)
    assert full.shape == (3, 17, 6)
    for b in range(3):
        for i in range(17):
            assert torch.equal(full[b, i], x[b, tr.assign[b, i]])
    # group sizes agree with the assignment
    counts = torch.zeros(3, x.shape[1]).scatter_add(1, tr.assign, torch.ones(3, 17))
    assert torch.equal(counts, tr.size.squeeze(-1).float())


def test_new_positions_agrees_with_merge():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 4)
    m = bipartite_soft_matching(torch.randn(2, 10, 3), 3, protected=1)
    pos = new_positions(m, 2)
    y, _ = merge_prune(x, torch.ones(2, 10, 1), m)
    # a token that was not merged away sits where new_positions says
    src_abs = 1 + 2 * m.src
    for b in range(2):
        for i in range(10):
            if i not in src_abs[b].tolist():
                assert torch.equal(y[b, pos[b, i]], x[b, i])


def test_mlerp_preserves_norms_and_direction():
    torch.manual_seed(3)
    x = torch.randn(2, 13, 8, dtype=torch.float64) * torch.rand(2, 13, 1, dtype=torch.float64).add(0.5)
    size = torch.randint(1, 4, (2, 13, 1)).double()
    m = bipartite_soft_matching(torch.randn(2, 13, 4), 5, protected=1)
    y, s2 = merge_mlerp(x, size, m)
    avg, s_w = merge_wavg(x, size, m)
    assert torch.equal(s2, s_w)
    pos = new_positions(m, 2)
    for b in range(2):
        for j in range(y.shape[1]):
            members = (pos[b] == j).nonzero().flatten()
            norms = x[b, members].norm(dim=-1)
            torch.testing.assert_close(y[b, j].norm(), norms.max())  # the norm is the largest member's
            if len(members) == 1:
                assert torch.equal(y[b, j], x[b, members[0]])  # untouched tokens unchanged
            else:
                cos = torch.nn.functional.cosine_similarity(y[b, j], avg[b, j], dim=0)
                assert cos > 1 - 1e-9  # direction of the size-weighted average
                assert y[b, j].norm() > avg[b, j].norm()  # plain averaging would shrink it


def test_prune_step_drops_sources_and_keeps_sizes():
    torch.manual_seed(4)
    x = torch.randn(1, 9, 4)
    m = bipartite_soft_matching(torch.randn(1, 9, 3), 3, protected=1)
    tr = MergeTracker(1, 9)
    y = tr.step(x, m, "prune")
    assert y.shape[1] == 6 and torch.all(tr.size == 1)
    kept_vals = {tuple(v.tolist()) for v in y[0]}
    assert all(tuple(x[0, i].tolist()) in kept_vals for i in range(9) if not tr.removed_mask()[0, i])


# ----------------------------------------------------------------------------- ToMe / ToFu runners
@pytest.mark.parametrize("runner", [run_tome, run_tofu])
def test_merging_runner_merges_scheduled_count_per_layer(model, runner):
    h, layout = _inputs()
    log = []
    blocks = [Recorder(b, log) for b in model.branches()]
    retain = 0.2
    out = runner(h, blocks, retain, layout)
    n = h.shape[1] - 1
    sched = out.info["schedule"]
    assert sched == even_schedule(n, num_keep(n, retain), SPEC.depth)
    ffn_rows = [e[1] for e in log if e[0] == "ffn"]
    attn_rows = [e[1] for e in log if e[0] == "attn"]
    cur = h.shape[1]
    for li, r in enumerate(sched):
        assert attn_rows[li] == cur
        cur -= r
        assert ffn_rows[li] == cur  # exactly r tokens merged in block li, between attention and FFN
    assert cur == 1 + num_keep(n, retain)
    assert out.hidden_states.shape == h.shape
    assert int(out.removed.sum(1).unique()) == n - num_keep(n, retain)
    assert not out.removed[:, 0].any()


def test_tome_proportional_attention_bias_is_log_size(model):
    h, layout = _inputs()
    log = []
    blocks = [Recorder(b, log) for b in model.branches()]
    run_tome(h, blocks, 0.35, layout)
    biases = [e[3] for e in log if e[0] == "attn"]
    assert biases[0] is None  # nothing merged before block 0
    for b in biases[1:]:
        sizes = b.exp().squeeze(1).squeeze(1)  # (B, L)
        torch.testing.assert_close(sizes.sum(-1), torch.full((h.shape[0],), float(h.shape[1])))
        assert torch.allclose(sizes, sizes.round())
    assert (biases[-1] > 0).any()


def test_tome_unmerge_gives_each_token_its_groups_value(model):
    """Unmerge: a merged-away token carries the final value of a kept (representative) token of
    its own image; kept tokens carry their own, distinct values; sizes account for every token."""
    h, layout = _inputs(batch=2)
    out = run_tome(h, model.branches(), 0.35, layout)
    y = out.hidden_states
    for b in range(2):
        kept = out.keep_idx[b]
        assert torch.unique(y[b, kept], dim=0).shape[0] == len(kept)
        for i in out.removed[b].nonzero().flatten().tolist():
            assert (y[b, kept] == y[b, i]).all(-1).sum() == 1
    assert out.info["sizes"].sum() == h.shape[0] * h.shape[1]


def test_tofu_prunes_early_and_merges_late(model):
    h, layout = _inputs()
    out = run_tofu(h, model.branches(), 0.35, layout)
    assert out.info["modes"] == ["prune", "prune", "mlerp", "mlerp", "mlerp", "mlerp"]
    out2 = run_tofu(h, model.branches(), 0.35, layout, prune_blocks=0)
    assert set(out2.info["modes"]) == {"mlerp"}
    assert not torch.allclose(out.hidden_states, out2.hidden_states)


# ----------------------------------------------------------------------------- DART
def test_dart_keeps_pivots_and_exactly_k():
    torch.manual_seed(5)
    h = torch.randn(3, 40, 16)
    keys = torch.randn(3, 40, 8)
    for keep, p in [(12, 4), (3, 4), (40, 2), (1, 8)]:
        mask = dart_keep_mask(h, keys, keep, p)
        assert mask.sum(1).tolist() == [keep] * 3
        pivots = torch.topk(keys.abs().sum(-1), min(p, keep), dim=-1).indices
        assert torch.gather(mask, 1, pivots).all()


def test_dart_prefers_tokens_unlike_the_pivot():
    h = torch.zeros(1, 6, 2)
    h[0, :, 0] = 1.0
    h[0, 4] = torch.tensor([0.0, 1.0])  # the only token unlike the others
    keys = torch.zeros(1, 6, 3)
    keys[0, 0] = 5.0  # token 0 is the pivot
    mask = dart_keep_mask(h, keys, 2, num_pivots=1)
    assert mask[0].nonzero().flatten().tolist() == [0, 4]


def test_run_dart_keeps_k_and_cls(model):
    h, layout = _inputs()
    out = run_dart(h, model.branches(), 0.35, layout, prune_layer=2, num_pivots=3)
    n = h.shape[1] - 1
    assert out.keep_idx.shape[1] == 1 + num_keep(n, 0.35)
    assert (out.keep_idx[:, 0] == 0).all()


# ----------------------------------------------------------------------------- restore by copy / l_p
@pytest.mark.parametrize("runner", [
    lambda h, b, l: run_prune(h, b, 0.35, l, prune_layer=2, restore_mode="copy"),
    lambda h, b, l: run_dart(h, b, 0.35, l, prune_layer=2, num_pivots=3),
])
def test_copy_restore_copies_a_kept_token_of_the_same_image(model, runner):
    h, layout = _inputs(batch=3)
    out = runner(h, model.branches(), layout)
    y = out.hidden_states
    for b in range(3):
        kept = out.keep_idx[b, 1:]  # CLS excluded: never a source
        rem = out.removed[b].nonzero().flatten()
        assert len(rem) > 0
        for i in rem.tolist():
            same = (y[b, kept] == y[b, i]).all(-1)
            assert same.any(), "removed row is not a copy of a kept row of its own image"
            others = torch.cat([y[c, out.keep_idx[c]] for c in range(3) if c != b])
            assert not (others == y[b, i]).all(-1).any()


def test_prune_copy_uses_euclidean_nearest_kept_token(model):
    h, layout = _inputs(batch=1)
    blocks = model.branches()
    out = run_prune(h, blocks, 0.35, layout, prune_layer=2, restore_mode="copy")
    h_lp = run_blocks(h, blocks[:2])
    kept = out.keep_idx[0, 1:]
    for i in out.removed[0].nonzero().flatten().tolist():
        d = (h_lp[0, kept] - h_lp[0, i]).norm(dim=-1)
        j = kept[d.argmin()]
        assert torch.equal(out.hidden_states[0, i], out.hidden_states[0, j])


@pytest.mark.parametrize("name", ["prune_lp", "ipcv_no_reint"])
def test_lp_fill_puts_back_the_lp_value(model, name):
    h, layout = _inputs(batch=2)
    blocks = model.branches()
    out = METHODS[name](h, blocks, 0.35, layout, **KW[name])
    h_lp = run_blocks(h, blocks[:2])
    rem = out.removed
    torch.testing.assert_close(out.hidden_states[rem], h_lp[rem])
    assert not torch.allclose(out.hidden_states[~rem], h_lp[~rem])


# ----------------------------------------------------------------------------- IPCV ablations
def test_ablations_change_what_they_claim(model):
    h, layout = _inputs()
    blocks = model.branches()
    base = run_ipcv_method(h, blocks, 0.35, layout, **KW["ipcv"])
    no_as = METHODS["ipcv_no_as"](h, blocks, 0.35, layout, **KW["ipcv_no_as"])
    sim = METHODS["ipcv_sim"](h, blocks, 0.35, layout, **KW["ipcv_sim"])
    rnd = METHODS["random_ipcv"](h, blocks, 0.35, layout, **KW["random_ipcv"])
    assert no_as.info["config"]["as_depth"] == 0
    assert sim.info["config"]["weighting"] == "similarity"
    assert torch.equal(base.keep_idx, no_as.keep_idx) and torch.equal(base.keep_idx, sim.keep_idx)
    for other in (no_as, sim):
        assert not torch.allclose(base.hidden_states, other.hidden_states)
    assert not torch.equal(base.keep_idx, rnd.keep_idx)
    assert rnd.keep_idx.shape == base.keep_idx.shape


def test_random_keep_set_is_seeded_per_image(model):
    h, layout = _inputs(batch=3)
    blocks = model.branches()
    a = METHODS["random_ipcv"](h, blocks, 0.5, layout, **KW["random_ipcv"])
    b = METHODS["random_ipcv"](h[1:2], blocks, 0.5, layout, **KW["random_ipcv"])
    c = METHODS["random_ipcv"](h, blocks, 0.5, layout, seed=1, **KW["random_ipcv"])
    assert torch.equal(a.keep_idx[1:2], b.keep_idx)  # same image, same set, whatever the batch
    assert not torch.equal(a.keep_idx[0], a.keep_idx[1])  # different images, different sets
    assert not torch.equal(a.keep_idx, c.keep_idx)  # the seed matters


# ----------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_full_length_cls_protected_equal_tokens(model, name):
    h, layout = _inputs()
    out = METHODS[name](h, model.branches(), 0.35, layout, **KW.get(name, {}))
    assert out.hidden_states.shape == h.shape
    assert torch.isfinite(out.hidden_states).all()
    assert not out.removed[:, 0].any()
    n = h.shape[1] - 1
    expected = 0 if name == "vanilla" else n - num_keep(n, 0.35)
    assert out.removed.sum(1).tolist() == [expected] * h.shape[0]
    assert torch.equal(out.keep_idx, (~out.removed).nonzero()[:, 1].view(h.shape[0], -1))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_rows_are_independent(model, name):
    h, layout = _inputs(batch=3, seed=7)
    blocks = model.branches()
    full = METHODS[name](h, blocks, 0.35, layout, **KW.get(name, {}))
    for b in range(3):
        one = METHODS[name](h[b : b + 1], blocks, 0.35, layout, **KW.get(name, {}))
        assert torch.equal(one.removed[0], full.removed[b])
        torch.testing.assert_close(one.hidden_states[0], full.hidden_states[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_at_retain_one_is_vanilla(model, name):
    h, layout = _inputs(batch=2)
    blocks = model.branches()
    ref = run_blocks(h, blocks)
    out = METHODS[name](h, blocks, 1.0, layout, **KW.get(name, {}))
    assert not out.removed.any()
    torch.testing.assert_close(out.hidden_states, ref, atol=1e-6, rtol=1e-6)


def test_methods_reject_packed_multi_segment_layouts(model):
    from ipcv_core import SegmentLayout

    h, _ = _inputs(batch=1)
    layout = SegmentLayout.packed((16, 15), protected=1)
    for runner in (run_tome, run_tofu, run_dart, run_prune):
        with pytest.raises(NotImplementedError, match="one segment"):
            runner(h, model.branches(), 0.5, layout)
