"""Issue 16: stages between the attention and the FFN on the attention's own keys
(``placement="post_attention"``), ToMe's copy-unmerge as a reconstruction rule (``"copy"``), the
cost model for them, and each as a graph rewrite equal to the eager driver (static shapes,
exportable: ONNX + inductor)."""

import pytest
import torch

from ipcv_compile import capture, lower, rewrite_graph
from ipcv_compile.passes.ipcv_rewrite import RewriteError, expected_rows
from ipcv_core import Branches, IPCVConfig, SegmentLayout, gradual_stages, run_ipcv
from ipcv_core.cost import ModelDims, config_flops
from ipcv_core.search import merge_family_config
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

# the synthetic towers (batched with CLS / packed rotary) and the graph-vs-driver helper of the variants
from test_variants import SPEC, _graph_vs_driver, _rel, captured  # noqa: E402,F401


def _post(retain=0.35, first=0, last=3, **kw):
    fields = dict(k=1, selection="bipartite", merge="average", placement="post_attention")
    fields.update(kw)
    return IPCVConfig(retain=retain, stages=gradual_stages(retain, first, last), prune_layer=last, as_depth=0, **fields)


VARIANTS = {
    "merge-avg-k1-from0": dict(),
    "merge-size_bias-k2-from1": dict(first=1, merge="size_bias", k=2),
    "merge-copy (ToMe as a rewrite)": dict(reconstruction="copy"),
    "one-shot-score": "one-shot",
    "merge-plain (no proportional attention)": dict(merge="average_plain"),
    "block-input-copy": dict(placement="block_input", first=1, reconstruction="copy"),
    "every-2nd-block": "every2",
}


@pytest.mark.parametrize("case", ["batched-cls", "packed-rotary"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_post_attention_graph_equals_driver(captured, case, name):
    v = VARIANTS[name]
    if v == "one-shot":
        cfg = IPCVConfig(retain=0.35, prune_layer=1, k=3, placement="post_attention")
    elif v == "every2":
        cfg = merge_family_config(0.35, 4, first=0, every=2, placement="post_attention")
        assert [sl for sl, _ in cfg.stages] == [0, 2] and cfg.prune_layer == 3
    else:
        cfg = _post(**v)
    rm, out, ref, res = _graph_vs_driver(captured[case], cfg)
    assert _rel(out, ref) <= 1e-5
    rep = rm.report
    assert rep.inserted["ipcv_prune"] == len(cfg.schedule)
    if cfg.post_attention:  # the attention's own keys: no key path copied, one key_metric per key-metric stage
        assert rep.key_copies == 0
        assert rep.inserted["ipcv_key_metric"] == (len(cfg.schedule) if cfg.needs_key_metric else 0)
    else:
        assert rep.key_copies > 0
    # proportional attention after every stage but the last block's (none without it)
    assert (rep.inserted["ipcv_attention_bias"] > 0) == cfg.merge_rule.attention_bias
    m, args, *_ = captured[case]
    with torch.no_grad():
        assert _rel(out, m(*args)) > 1e-3  # something was removed


def test_post_attention_rows_per_block():
    """The stage's block attends over its incoming rows; its FFN and later blocks see the kept rows."""
    cfg = _post(retain=0.5, first=0, last=3).resolve(4)
    rows = expected_rows(cfg, SegmentLayout.batched(1), 4, 1 + 36)
    keeps = [1 + 36] + [1 + int(-(-36 * sr // 1)) for _, sr in cfg.schedule]
    for b in range(4):
        assert rows[b]["queries"] == rows[b]["keys"] == keeps[b]
        assert rows[b]["ffn"] == keeps[b + 1]


def test_post_attention_driver_uses_the_attentions_own_keys():
    """With Block.attention_with_keys the eager driver never calls key_features (no second key
    projection), and gets the same result as with key_features."""
    spec = ViTSpec(depth=3)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    calls = []

    def counted(b):
        def keys(x, pos=None):
            calls.append(x.shape)
            return b.key_features(x, pos)

        def attn_keys(x_q, x_kv, ctx):
            return b.attention(x_q, x_kv, ctx), b.key_features(x_kv, ctx.kv_pos)  # (the keys the attention saw)

        return keys, attn_keys

    plain, native = [], []
    for b in m.branches():
        keys, attn_keys = counted(b)
        plain.append(Branches(b.attention, b.ffn, keys))
        native.append(Branches(b.attention, b.ffn, lambda x, pos=None: pytest.fail("key_features called"), attn_keys))
    cfg = _post(retain=0.4, first=0, last=2)
    with torch.no_grad():
        a = run_ipcv(h, plain, cfg, layout).hidden_states
        n_plain = len(calls)
        b = run_ipcv(h, native, cfg, layout).hidden_states
    assert n_plain == 3 and torch.equal(a, b)


def test_copy_reconstruction_is_tomes_unmerge():
    """reconstruction='copy': every removed token ends with the final value of the kept token that
    absorbed it (one stage: its first neighbour)."""
    spec = ViTSpec(depth=3, layerscale=True)
    m = SyntheticViT(spec).eval()
    h, *_, layout = make_inputs(spec, [(6, 6)], 1, batch=2, packed=False)
    cfg = IPCVConfig(retain=0.6, prune_layer=1, as_depth=0, k=1, selection="bipartite", merge="average",
                     reconstruction="copy", placement="post_attention")
    with torch.no_grad():
        res = run_ipcv(h, m.branches(), cfg, layout)
    st = res.stages[0]
    out = res.hidden_states
    for b in range(2):
        absorber = st.keep_idx[b, st.nbr_idx[b, :, 0]]
        torch.testing.assert_close(out[b, st.rem_idx[b]], out[b, absorber])
    # NGR (the default) differs: own value at the stage + the absorber's later change
    with torch.no_grad():
        ngr = run_ipcv(h, m.branches(), cfg.replace(reconstruction="feature"), layout).hidden_states
    assert not torch.allclose(ngr, out)
    for b in range(2):  # the kept rows are the same computation either way
        torch.testing.assert_close(ngr[b, st.keep_idx[b]], out[b, st.keep_idx[b]])


def test_placement_validation_and_defaults():
    assert IPCVConfig().placement == "block_input" and IPCVConfig().is_reference
    assert not IPCVConfig(placement="post_attention").is_reference
    with pytest.raises(ValueError, match="IPCVConfig.placement"):
        IPCVConfig(placement="mid")
    with pytest.raises(ValueError, match="as_depth must be 0"):
        IPCVConfig(placement="post_attention", prune_layer=2, as_depth=2)
    # AS left to the tower's default resolves to 0 for post-attention stages
    assert IPCVConfig(placement="post_attention").resolve(12).as_depth == 0
    # block 0 is allowed after the attention (its update exists), not at the block input
    IPCVConfig(retain=0.5, prune_layer=0, placement="post_attention").validate_depth(4)
    with pytest.raises(ValueError, match="prune_layer must be an int >= 1"):
        IPCVConfig(retain=0.5, prune_layer=0)
    with pytest.raises(ValueError, match=r"stages layers must increase strictly within \[1"):
        IPCVConfig(retain=0.5, prune_layer=2, stages=((0, 0.8),))
    cfg = merge_family_config(0.35, 12, first=0, placement="post_attention")
    assert cfg.stages[0][0] == 0 and cfg.prune_layer == 11 and cfg.post_attention
    assert IPCVConfig.from_json(cfg.to_json()) == cfg


def test_cost_model_post_attention_and_key_width():
    d = ModelDims(384, 1536, key_dim=64)
    kw = dict(n_tokens=1025, protected=1, depth=12, dims=d)
    blk = merge_family_config(0.5, 12, first=1)
    post = blk.replace(placement="post_attention")
    # same schedule: the post-attention one skips the FFN of merged rows and the key re-projection
    f_blk, f_post = config_flops(blk, **kw), config_flops(post, **kw)
    assert f_post < f_blk
    from ipcv_core.cost import attention_flops, ffn_flops, key_flops, knn_flops, matching_flops, ngr_flops
    from ipcv_core.config import num_keep

    # hand count of a one-stage post-attention config at block 5
    one = IPCVConfig(retain=0.5, prune_layer=5, as_depth=0, k=1, selection="bipartite", merge="average",
                     placement="post_attention")
    K = 1 + num_keep(1024, 0.5)
    R = 1025 - K
    want = 5 * (attention_flops(1025, 1025, d) + ffn_flops(1025, d)) + attention_flops(1025, 1025, d) \
        + knn_flops(R, K, d.metric) + ngr_flops(R, K, 1, d) + matching_flops(1025, d) + ffn_flops(K, d) \
        + 6 * (attention_flops(K, K, d) + ffn_flops(K, d))
    assert config_flops(one, **kw) == pytest.approx(want)
    # the same stage at the block input re-projects the keys
    inp = one.replace(placement="block_input", prune_layer=6)
    assert config_flops(inp, **kw) - config_flops(one, **kw) == pytest.approx(
        key_flops(1025, d) + ffn_flops(1025, d) - ffn_flops(K, d))
    assert matching_flops(1025, d) == 2.0 * 513 * 512 * 64


def test_post_attention_rejects_blocks_without_the_residual_structure():
    """A parallel block (x + A(x) + F(x)) has no residual add between attention and FFN."""
    from torch import nn

    class Par(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.attn = _Attn()
            self.mlp = nn.Linear(16, 16)

        def forward(self, x):
            n = self.norm(x)
            return x + self.attn(n) + self.mlp(n)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Par(), Par()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    x = torch.randn(1, 9, 16)
    gm = capture(Stack().eval(), (x,))
    with pytest.raises(RewriteError, match="residual add between the attention"):
        rewrite_graph(gm, IPCVConfig(retain=0.5, prune_layer=0, placement="post_attention"), SPEC,
                      SegmentLayout.batched(1))


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, 16)


def test_post_attention_merge_onnx_and_inductor_two_sizes(tmp_path):
    """The post-attention merge (ToMe's placement + NGR) lowers like the reference: one ONNX file and
    one inductor graph for two token counts / batch sizes, equal to the eager rewritten graph."""
    vit = ViTSpec(depth=3, dim=16, heads=2, layerscale=True)
    layout = SegmentLayout.batched(protected=1)

    def inputs(grid, batch, seed):
        return (make_inputs(vit, [grid], 1, batch=batch, packed=False, seed=seed)[0],)

    m = SyntheticViT(vit).eval()
    gm = capture(m, inputs((4, 4), 2, 0))
    rm = rewrite_graph(gm, _post(retain=0.5, first=0, last=2), SPEC, layout)
    for backend in ("onnx", "inductor"):
        lw = lower(rm, backend, inputs((4, 4), 2, 0), **({"path": str(tmp_path / "post.onnx")} if backend == "onnx" else {}))
        for i, (grid, batch) in enumerate([((4, 4), 2), ((5, 7), 3)]):
            args = inputs(grid, batch, 10 + i)
            with torch.no_grad():
                ref, out = rm(*args), lw(*args)
            assert out.shape == ref.shape == args[0].shape
            assert _rel(out, ref) <= 1e-4, (backend, grid, batch)


def test_redundancy_measure_and_buckets():
    """The bipartite similarity mass is higher for an image of near-duplicate tokens than for one
    of unrelated tokens; buckets index a static menu (most redundant first)."""
    from ipcv_core.variants import bipartite_redundancy, budget_bucket, normalise_metric

    torch.manual_seed(0)
    base = torch.randn(1, 1, 8)
    flat = normalise_metric(base + 0.05 * torch.randn(1, 33, 8))  # "sky": every token alike
    busy = normalise_metric(torch.randn(1, 33, 8))  # "document": unrelated tokens
    red = bipartite_redundancy(torch.cat([flat, busy]), protected=1)
    assert red.shape == (2,) and red[0] > 0.95 > red[1]
    assert budget_bucket(torch.tensor([0.99, 0.5, 0.1]), [0.9, 0.3]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="descending"):
        budget_bucket(red, [0.3, 0.9])
