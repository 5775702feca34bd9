"""The rewrite as a torch.fx pass with named torch.library ops, the variant rules and the compiler's
extension point: what each promises, checked on a small synthetic ViT."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

import ipcv_compile
from ipcv_compile import LocateSpec, capture, locate
from ipcv_compile import ops as ipcv_ops
from ipcv_compile.extension import UnsupportedModuleError, register_rewriter, rewriters, unregister_rewriter
from ipcv_compile.lower import export_program
from ipcv_compile.passes import PIPELINE
from ipcv_compile.passes.fused_projection import UnsplittableProjection, analyse_fused_projection
from ipcv_compile.passes.ipcv_rewrite import IPCVRewritePass, RewriteError, expected_rows
from ipcv_compile.passes.segment_attention import SegmentAttentionPass
from ipcv_core import IPCVConfig, SegmentLayout, run_ipcv
from ipcv_core.rules import SelectionRule, register_selection, selection_names, selection_rule
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

SPEC = LocateSpec(blocks="blocks", attention="attn", ffn="mlp")
CFG = IPCVConfig(retain=0.5, prune_layer=2, as_depth=2, k=3)


@pytest.fixture(scope="module")
def vit():
    spec = ViTSpec(depth=5, rotary=True)
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, _ = make_inputs(spec, [(5, 6)], 1, batch=2, packed=False)
    args = (h, cos, sin, mask)
    return m, args, capture(m, args)


def _fresh(gm):
    return ipcv_compile.api._fresh(gm)


def test_pass_is_a_passbase_and_inserts_named_ipcv_ops(vit):
    m, args, gm = vit
    rm = ipcv_compile.rewrite_graph(gm, CFG, SPEC, SegmentLayout.batched(1))
    assert isinstance(IPCVRewritePass(locate(_fresh(gm), SPEC), CFG, SegmentLayout.batched(1)), PassBase)
    targets = [n.target for n in rm.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(ipcv_ops.prune) == 1
    assert targets.count(ipcv_ops.reconstruct) == 1  # the reintegration
    assert targets.count(ipcv_ops.ngr) == CFG.as_depth  # AS blocks: the removed rows' values only
    code = rm.print_readable(print_output=False)
    assert "torch.ops.ipcv.prune.default(" in code and "torch.ops.ipcv.reconstruct.default(" in code
    assert "selection = 'score'" in code and "retain = 0.5" in code  # typed, printable static arguments


def test_export_keeps_named_nodes_and_decomposition_lowers_them_to_aten(vit):
    m, args, gm = vit
    rm = ipcv_compile.rewrite_graph(gm, CFG, SPEC, SegmentLayout.batched(1))
    kept = export_program(rm, args, decompose=False)
    assert ipcv_ops.has_ipcv_ops(kept.graph)
    lowered = export_program(rm, args)
    assert not ipcv_ops.has_ipcv_ops(lowered.graph)
    assert all(n.target.namespace == "aten" for n in lowered.graph.nodes
               if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(*args), rm(*args), rtol=1e-5, atol=1e-5)


def test_flop_counter_sees_the_work_inside_the_ops(vit):
    """ipcv.prune's neighbour search is a bmm: counted when the op runs as a CIA op."""
    from torch.utils.flop_counter import FlopCounterMode

    m, args, gm = vit
    rm = ipcv_compile.rewrite_graph(gm, CFG, SPEC, SegmentLayout.batched(1))
    h = args[0]
    with FlopCounterMode(display=False) as fc:
        ipcv_ops.prune(h, h * 0.5, h, None, None, None, stage=0, **ipcv_ops.layout_args(SegmentLayout.batched(1), 1),
                       **ipcv_ops.config_args(CFG))
    assert fc.get_total_flops() > 0
    with FlopCounterMode(display=False) as fc_all, torch.no_grad():
        rm(*args)
    assert fc_all.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0


def test_requires_rejects_a_graph_map_of_another_graph_and_a_depth_that_does_not_fit(vit):
    m, args, gm = vit
    a, b = _fresh(gm), _fresh(gm)
    with pytest.raises(RewriteError, match="not located on this GraphModule"):
        IPCVRewritePass(locate(a, SPEC), CFG, SegmentLayout.batched(1))(b)
    with pytest.raises(ValueError, match="prune_layer"):
        IPCVRewritePass(locate(b, SPEC), IPCVConfig(retain=0.5, prune_layer=9), SegmentLayout.batched(1))(b)
    with pytest.raises(RewriteError, match="patch grid"):
        IPCVRewritePass(locate(b, SPEC), CFG.replace(selection="stratified"), SegmentLayout.batched(1))(b)


def test_ensures_checks_the_rows_every_block_sees(vit):
    m, args, gm = vit
    g = _fresh(gm)
    rw = IPCVRewritePass(locate(g, SPEC), CFG, SegmentLayout.batched(1))
    rw(g)  # passes: the schedule's rows
    n = args[0].shape[1]
    rows = expected_rows(CFG, SegmentLayout.batched(1), 5, n)
    K = 1 + (n - 1 + 1) // 2
    assert [r["ffn"] for r in rows] == [n, n, K, K, K]
    assert [r["keys"] for r in rows] == [n, n, n, n, K]
    # a pass that forgot to feed the pruned block its kept rows is caught by ensures (the rewritten
    # graph no longer runs: rows and gathered tables / reconstruction disagree)
    import ipcv_compile.passes.insert_stages as stages_mod
    import ipcv_compile.passes.ipcv_rewrite as rw_mod

    orig = stages_mod.feed_residual
    try:
        stages_mod.feed_residual = lambda blk, rows: None if blk.index == CFG.prune_layer else orig(blk, rows)
        broken = _fresh(gm)
        with pytest.raises(RewriteError, match="does not run at the example sizes"):
            IPCVRewritePass(locate(broken, SPEC), CFG.replace(as_depth=0), SegmentLayout.batched(1))(broken)
    finally:
        stages_mod.feed_residual = orig
    # rows that run but differ from the schedule are named per block
    orig_rows = rw_mod.expected_rows
    try:
        rw_mod.expected_rows = lambda *a: [{**r, "ffn": r["ffn"] + 1} for r in orig_rows(*a)]
        g2 = _fresh(gm)
        with pytest.raises(RewriteError, match="block 0: rows seen after the rewrite"):
            IPCVRewritePass(locate(g2, SPEC), CFG, SegmentLayout.batched(1))(g2)
    finally:
        rw_mod.expected_rows = orig_rows


def test_prune_outputs_are_a_named_tuple_and_the_driver_uses_the_same_stage_function(vit):
    m, args, gm = vit
    h, cos, sin, _ = args
    res = run_ipcv(h, m.branches(cos, sin), CFG, SegmentLayout.batched(1))
    st = res.stages[0]
    assert st._fields[:4] == ("x_keep", "x_rem", "keep_idx", "rem_idx") and st.positions.shape == st.keep_idx.shape
    # the graph op returns the same fields in the same order
    out = ipcv_ops.prune(h, h * 0.5, h, None, None, None, stage=0, **ipcv_ops.layout_args(SegmentLayout.batched(1), 1),
                         **ipcv_ops.config_args(CFG))
    assert len(out) == len(st._fields)


def test_selection_rules_declare_what_they_need_and_new_rules_register():
    assert selection_rule("bipartite").needs_key_metric and selection_rule("bipartite").max_removed_fraction == 0.5
    assert selection_rule("stratified").needs_grid and selection_rule("stratified").at_stage(1).name == "score"
    assert IPCVConfig(selection="stratified").needs_grid and not IPCVConfig().needs_grid
    assert IPCVConfig(selection="bipartite").needs_key_metric

    def last_tokens(s):
        return s.positions.float()

    register_selection(SelectionRule("test_last_tokens", last_tokens))
    assert "test_last_tokens" in selection_names()
    spec = ViTSpec(depth=3)
    m = SyntheticViT(spec).eval()
    h, *_ = make_inputs(spec, [(4, 4)], 0, batch=1, packed=False)
    res = run_ipcv(h, m.branches(), IPCVConfig(retain=0.25, prune_layer=1, as_depth=0, k=2,
                                               selection="test_last_tokens"), SegmentLayout.batched(0))
    assert res.keep_idx[0].tolist() == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="IPCVConfig.selection must be one of"):
        IPCVConfig(selection="no_such_rule")


def test_rewrite_finds_rewriters_through_the_extension_point():
    assert "towers" in rewriters()

    class Toy(nn.Module):
        def forward(self, x):
            return x

    seen = {}

    def toy_rewriter(module, config, **options):
        if not isinstance(module, Toy):
            raise UnsupportedModuleError("not a Toy")
        seen.update(config=config, options=options)
        return module

    register_rewriter("test_toy", toy_rewriter)
    try:
        t = Toy()
        assert ipcv_compile.rewrite(t, 0.5, k=4, cache_size=2) is t
        assert seen["config"].retain == 0.5 and seen["config"].k == 4 and seen["options"] == {"cache_size": 2}
        with pytest.raises(UnsupportedModuleError, match=r"\[test_toy\] not a Toy[\s\S]*\[towers\]"):
            ipcv_compile.rewrite(nn.Linear(2, 2), retain=0.5)  # every rewriter declines: each says why
    finally:
        unregister_rewriter("test_toy")
    assert "test_toy" not in rewriters()


# --------------------------------------------------------------------------------------------- the pipeline
def test_the_rewrite_runs_a_pass_manager_of_small_named_passes(vit, monkeypatch):
    m, args, gm = vit
    ran = []
    orig = PassManager.__call__

    def spy(self, module):
        ran.append([type(p).__name__ for p in self.passes])
        return orig(self, module)

    monkeypatch.setattr(PassManager, "__call__", spy)
    g = ipcv_compile.api._fresh(gm)
    IPCVRewritePass(locate(g, SPEC), CFG, SegmentLayout.batched(1))(g)
    assert ran == [["InsertStagesPass", "GatherSideInputsPass", "KeyMetricPass", "AttentionStabilisationPass",
                    "UseSideInputsPass", "SizeBiasPass", "SegmentAttentionPass", "FollowTokenCountsPass",
                    "ReintegratePass"]]
    assert len(PIPELINE) >= 4 and all(isinstance(p, PassBase) for p in PIPELINE)


def test_the_passes_keep_no_state_and_run_only_inside_the_rewrite(vit):
    """The same pass objects rewrite two graphs alike; a pass called on a bare graph says what is missing."""
    m, args, gm = vit
    outs = []
    for _ in range(2):
        rm = ipcv_compile.rewrite_graph(gm, CFG, SPEC, SegmentLayout.batched(1))
        assert "ipcv_rewrite_context" not in rm.graph_module.meta
        with torch.no_grad():
            outs.append(rm(*args))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(RewriteError, match="run inside IPCVRewritePass"):
        SegmentAttentionPass()(ipcv_compile.api._fresh(gm))


def test_the_rewrite_takes_a_schedule_as_its_config(vit):
    m, args, gm = vit
    from ipcv_core.schedule import Schedule

    g = ipcv_compile.api._fresh(gm)
    rw = IPCVRewritePass(locate(g, SPEC), Schedule.build(CFG, 5), SegmentLayout.batched(1))
    rw(g)
    assert rw.config == CFG.resolve(5)
    with torch.no_grad():
        torch.testing.assert_close(g(*args), ipcv_compile.rewrite_graph(gm, CFG, SPEC, SegmentLayout.batched(1))(*args),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="depth 4"):
        IPCVRewritePass(locate(ipcv_compile.api._fresh(gm), SPEC), Schedule.build(CFG, 4), SegmentLayout.batched(1))


@pytest.fixture(scope="module")
def packed_vit():
    spec = ViTSpec(depth=5, rotary=True, fused_qkv=True)
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, layout = make_inputs(spec, [(3, 3), (2, 3)], 0, batch=1, packed=True)
    args = (h, cos, sin, mask)
    return m, args, layout, capture(m, args)


def test_a_pass_error_reaches_the_caller_as_itself(packed_vit):
    """The PassManager wraps a pass's exception; the rewrite raises the pass's own RewriteError."""
    m, args, layout, gm = packed_vit
    g = ipcv_compile.api._fresh(gm)
    gmap = locate(g, SPEC)
    core = gmap.blocks[0].attn_cores[0]
    core.kwargs = {**core.kwargs, "is_causal": True}  # per-segment attention refuses a causal SDPA
    with pytest.raises(RewriteError, match="dropout_p=0 and is_causal=False") as e:
        IPCVRewritePass(gmap, CFG, layout)(g)
    assert any("SegmentAttentionPass" in n for n in getattr(e.value, "__notes__", []))


def test_the_rewrite_splits_a_fused_projection_of_packed_rows(packed_vit):
    m, args, layout, gm = packed_vit
    rm = ipcv_compile.rewrite_graph(gm, CFG, SPEC, layout)
    assert rm.report.inserted["q_projection_split"] == CFG.as_depth  # q for the kept rows only
    assert rm.report.unsplit_projections == {}


class _Fused(nn.Module):
    """One attention with a fused qkv projection over packed rows ``(N, D)``; ``layout``: how its
    output columns are split into heads (``"qkv"``: q, k, v blocks; ``"interleaved"``: per head)."""

    def __init__(self, layout="qkv", dim=8, heads=2):
        super().__init__()
        self.layout, self.heads, self.hd = layout, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        n = x.shape[0]
        y = self.qkv(x)
        if self.layout == "scaled":
            y = y * 2.0
        if self.layout == "interleaved":
            qkv = y.view(n, self.heads, 3, self.hd).permute(2, 1, 0, 3)
        else:
            qkv = y.view(n, 3, self.heads, self.hd).permute(1, 2, 0, 3)
        q, k, v = qkv.unbind(0)
        return F.scaled_dot_product_attention(q, k, v)


def _analyse(layout, which):
    x = torch.randn(6, 8)
    gm = capture(_Fused(layout).eval(), (x,), token_dim=0)
    nodes = list(gm.graph.nodes)
    core = next(n for n in nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    x_node = next(n for n in nodes if n.op == "placeholder")
    sym = x_node.meta["val"].shape[0].node.expr
    return analyse_fused_projection(nodes, core.args[which], x_node, sym, 0)


def test_fused_projection_analysis_finds_the_q_k_v_columns():
    cols = [(p.start, p.stop, p.width) for p in (_analyse("qkv", i) for i in range(3))]
    assert cols == [(0, 8, 24), (8, 16, 24), (16, 24, 24)]
    assert _analyse("qkv", 0).linear.target is torch.ops.aten.linear.default


@pytest.mark.parametrize("layout,why", [
    ("interleaved", "not one block"),  # q's columns are spread over the heads
    ("scaled", "not data movement only"),  # a multiply between the projection and q
])
def test_an_unsplittable_projection_says_why(layout, why):
    with pytest.raises(UnsplittableProjection, match=why) as e:
        _analyse(layout, 0)
    assert why in e.value.reason


def test_the_op_decodes_its_config_once(monkeypatch):
    constructed = []
    real = ipcv_ops.IPCVConfig

    def counting(*a, **k):
        constructed.append(k)
        return real(*a, **k)

    monkeypatch.setattr(ipcv_ops, "IPCVConfig", counting)
    ipcv_ops._decode_config.cache_clear()
    h = torch.randn(2, 10, 16)
    kw = dict(stage=0, **ipcv_ops.layout_args(SegmentLayout.batched(1), 1), **ipcv_ops.config_args(CFG))
    first = ipcv_ops.prune(h, h * 0.5, h, None, None, None, **kw)
    second = ipcv_ops.prune(h, h * 0.5, h, None, None, None, **kw)
    assert len(constructed) == 1  # two calls, one IPCVConfig
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    assert ipcv_ops.decode_config(**{k: v for k, v in kw.items() if k in ipcv_ops.config_args(CFG)}) == CFG
    ipcv_ops.prune(h, h * 0.5, h, None, None, None, **{**kw, **ipcv_ops.config_args(CFG.replace(k=2))})
    assert len(constructed) == 2  # another config: decoded once more
