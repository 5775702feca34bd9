"""tensorrt_check: the rewritten graphs pass (synthetic ViT, batched and packed with a mask; the
adapters' Qwen2-VL and InternVL towers); injected unsupported constructs fail, naming the op."""

import copy
import importlib.util
import operator
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Tuple

import pytest
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ipcv_compile import LocateSpec, capture, rewrite_graph, tensorrt_check
from ipcv_compile.lower import BackendUnavailable, export_program, graph_of
from ipcv_adapters.export import TowerForExport
from ipcv_compile.tensorrt_check import (CONVERTER_OPS, TRT_TOPK_MAX_K, TorchTensorRTUnavailable, _resolve,
                                         compare_with_installed, prepare_for_tensorrt)
from ipcv_compile.tensorrt_check import rules as trt_rules
from ipcv_compile.tensorrt_check.check import _block_of
from ipcv_core import IPCVConfig, SegmentLayout
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

SPEC = LocateSpec(blocks="blocks", attention="attn", ffn="mlp")
VIT = ViTSpec(depth=3, dim=16, heads=2, layerscale=True)
CFG = IPCVConfig(retain=0.5, prune_layer=1, as_depth=1, k=3)


@pytest.fixture(scope="module")
def batched():
    torch.manual_seed(0)
    m = SyntheticViT(VIT).eval()
    h, *_ = make_inputs(VIT, [(4, 4)], 1, batch=2, packed=False)
    rm = rewrite_graph(capture(m, (h,)), CFG, SPEC, SegmentLayout.batched(1))
    return rm, (h,)


@pytest.fixture(scope="module")
def batched_report(batched):
    rm, args = batched
    return tensorrt_check(rm, args)


def test_rewritten_synthetic_vit_passes(batched_report):
    rep = batched_report
    assert rep.ok, rep.format()
    assert rep.input_shapes == [(2, 17, 16)]
    ks = [k for _, k in rep.topk]
    assert ks and all(isinstance(k, int) and k <= TRT_TOPK_MAX_K for k in ks)  # selection K=8, kNN k=3
    assert "sort.default" not in rep.ops  # the rewrite never sorts the token list
    # sort-free compaction (cumsum + scatter) and row gathers (gather, or index_select on flat rows)
    assert "scatter.src" in rep.ops and "cumsum.default" in rep.ops
    assert "gather.default" in rep.ops or "index_select.default" in rep.ops
    assert "TensorRT check: OK" in rep.format()


def test_packed_layout_with_mask_passes():
    vs = ViTSpec(depth=3, dim=16, heads=2, rotary=True)
    m = SyntheticViT(vs).eval()
    h, cos, sin, mask, _ = make_inputs(vs, [(4, 4), (3, 5)], 0, batch=1, packed=True)
    args = (h, cos, sin, mask)
    rm = rewrite_graph(capture(m, args), CFG, SPEC, SegmentLayout.packed([16, 15]))
    rep = tensorrt_check(rm, args)
    assert rep.ok, rep.format()
    assert sorted(k for _, k in rep.topk) == [3, 3, 8, 8]  # per-segment K = ceil(0.5 n), kNN k
    assert any("attention with a mask" in w.reason for w in rep.warnings)


@pytest.mark.parametrize("name", ["qwen2_vl", "internvl"])
def test_adapter_towers_pass(name):
    pytest.importorskip("transformers")
    import ipcv_compile
    from ipcv_adapters.testing import TINY_IPCV, qwen2vl_inputs, tiny_tower, tower_inputs

    rt = ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV)
    if name == "qwen2_vl":
        pv, thw = qwen2vl_inputs([[1, 4, 6], [1, 4, 4]])
        mod, x = TowerForExport(rt, (pv,), {"grid_thw": thw}, embed=lambda t, p: t.patch_embed(p)), pv
    else:
        _, kw = tower_inputs(name, batch=2)
        mod, x = TowerForExport(rt), kw["pixel_values"]
    rep = tensorrt_check(mod, (x,))
    assert rep.ok, rep.format()


# ------------------------------------------------------------------------------------ failures
def _graph_copy_with(batched, target, make_args):
    """A copy of the rewritten graph's exported ATen graph with one extra node feeding the output."""
    rm, args = batched
    ep = export_program(rm, args, dynamic=False)
    gm = copy.deepcopy(ep.graph_module)
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    x = next(n for n in g.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    with g.inserting_before(out):
        n = g.call_function(target, make_args(x))
    out.args = ((*out.args[0], n),)
    gm.recompile()
    return gm


def test_injected_nonzero_fails_naming_the_op(batched):
    gm = _graph_copy_with(batched, torch.ops.aten.nonzero.default, lambda x: (x,))
    rep = tensorrt_check(gm)
    assert not rep.ok and rep.unsupported_ops == ["aten.nonzero"]
    assert "nonzero" in rep.format() and "data-dependent" in rep.format()


def test_injected_reducing_scatter_fails(batched):
    gm = _graph_copy_with(batched, torch.ops.aten.scatter_add.default, lambda x: (x, 1, x, x))
    rep = tensorrt_check(gm)
    assert not rep.ok and "aten.scatter_add" in rep.unsupported_ops
    assert "no reduction" in rep.format()


def test_injected_op_without_converter_fails(batched):
    gm = _graph_copy_with(batched, torch.ops.aten.searchsorted.Tensor, lambda x: (x, x))
    rep = tensorrt_check(gm)
    assert rep.unsupported_ops == ["aten.searchsorted.Tensor"]
    assert "no torch-tensorrt converter" in rep.format()


def test_torch_cond_fails_naming_it(batched):
    rm, args = batched

    class WithCond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rm = rm

        def forward(self, h):
            y = self.rm(h)
            return torch.cond(y.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (y,))

    rep = tensorrt_check(WithCond(), args)
    assert not rep.ok and "torch.cond" in rep.unsupported_ops
    assert "torch.where" in rep.format()


def test_nonzero_in_a_module_fails(batched):
    rm, args = batched

    class WithNonzero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rm = rm

        def forward(self, h):
            y = self.rm(h)
            return y, torch.nonzero(y[..., 0] > 0)

    rep = tensorrt_check(WithNonzero(), args)
    assert not rep.ok and "aten.nonzero" in rep.unsupported_ops
    assert any("unbacked" in p.reason or "data-dependent" in p.reason for p in rep.problems)


def test_topk_over_3840_fails():
    """A 64 x 64 grid (4096 prunable tokens) at retain 0.95 keeps K = 3892 > 3840 in one TopK."""
    m = SyntheticViT(VIT).eval()
    h, *_ = make_inputs(VIT, [(64, 64)], 1, batch=1, packed=False)
    rm = rewrite_graph(capture(m, (h,)), CFG.replace(retain=0.95), SPEC, SegmentLayout.batched(1))
    rep = tensorrt_check(rm, (h,))
    assert not rep.ok and rep.unsupported_ops == ["aten.topk"]
    assert "k=3892 exceeds TensorRT's TopK limit of 3840" in rep.format()


def test_dynamic_topk_fails(batched):
    rm, args = batched
    ep = export_program(rm, args, dynamic=True)  # K = ceil(0.5 * (N - 1)) is symbolic
    rep = tensorrt_check(ep)
    assert "aten.topk" in rep.unsupported_ops and "not a static int" in rep.format()
    assert any(w.op == "input" for w in rep.warnings)


# ------------------------------------------------------------------------------------ allowlist
def test_allowlist_names_are_real_aten_ops():
    missing = sorted(n for n in CONVERTER_OPS if not _resolve(n))
    assert len(missing) <= 3, missing  # a torch release may rename an overload or two
    for n in ("topk.default", "scatter.src", "gather.default", "cumsum.default", "scaled_dot_product_attention.default"):
        assert _resolve(n)


def test_baddbmm_is_prepared_away():
    class Dist(torch.nn.Module):
        def forward(self, a, b):
            return torch.baddbmm((a * a).sum(-1, keepdim=True), a, b.transpose(1, 2), alpha=-2.0)

    a, b = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    ep = export_program(Dist(), (a, b), dynamic=False)
    assert any(n.target is torch.ops.aten.baddbmm.default for n in ep.graph.nodes)
    assert tensorrt_check(ep).ok
    prepared = prepare_for_tensorrt(ep)
    assert not any(n.target is torch.ops.aten.baddbmm.default for n in prepared.graph.nodes)
    assert torch.allclose(prepared.module()(a, b), Dist()(a, b), atol=1e-5)


# ------------------------------------------------------------------------------------ rule chain
# One case (or more) per rule of ipcv_compile.tensorrt_check.rules.RULES: the rule named must decide
# on the node named, and the report must hold exactly the findings / lowering counts given.
aten = torch.ops.aten
PROBE = "probe"


def _graph(build, shape=(2, 8)):
    """A GraphModule x -> build(graph, x) -> output; build names the node under test with _probe."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(shape)
    g.output(build(g, x))
    return fx.GraphModule(torch.nn.Module(), g)


def _probe(g, target, *args, val=None, **kwargs):
    n = g.create_node("call_function", target, args, kwargs, name=PROBE)
    if val is not None:
        n.meta["val"] = val
    return n


def _exported(fn, *inputs):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return lambda: (M(), inputs)


def _unbacked_chain(g, x):
    """probe's value has an unbacked symbol; so has its user: reported once, where it appears."""
    u = ShapeEnv().create_unbacked_symint()
    p = _probe(g, aten.add.Tensor, x, x, val=u)
    later = g.call_function(aten.mul.Tensor, (p, p))
    later.meta["val"] = u * 2
    return later


def _dynamic_k_topk(g, x):
    k = g.call_function(operator.floordiv, (g.call_function(aten.sym_size.int, (x, 1)), 2))
    return _probe(g, aten.topk.default, x, k)


def _eye_of_symbolic_size(g, x):
    return _probe(g, aten.eye.default, g.call_function(aten.sym_size.int, (x, 0)))


NO_CONVERTER = "no torch-tensorrt converter (torch-tensorrt 2.13 aten_ops_converters.py) and not removed by its lowering"
DATA_DEP = " (TensorRT needs static shapes; no data-dependent output shapes)"
UNBACKED = "output shape depends on tensor data (unbacked symbol in meta['val'])"
_IDX = torch.zeros(4, 5, dtype=torch.long)


@dataclass
class RuleCase:
    rule: str  # the rule that must decide on `node`
    make: Callable[[], Any]  # -> a GraphModule, or (module, example inputs)
    node: str = PROBE
    problems: Sequence[Tuple[str, str, str]] = ()  # exactly report.problems: (node, op, reason)
    warnings: Sequence[Tuple[str, str, str]] = ()
    handled: Dict[str, int] = field(default_factory=dict)  # exactly report.handled_by_lowering
    ops: Dict[str, int] = field(default_factory=dict)  # included in report.ops
    max_topk: int = TRT_TOPK_MAX_K
    id: str = ""


RULE_CASES = [
    RuleCase("higher_order_op", lambda: _graph(lambda g, x: _probe(g, torch.ops.higher_order.cond, x, x, x, (x,))),
             problems=[(PROBE, "torch.cond", "torch.cond has no TensorRT converter (use torch.where on both branches)")],
             id="cond"),
    RuleCase("higher_order_op", lambda: _graph(lambda g, x: _probe(g, torch.ops.higher_order.while_loop, x, x, (x,), ())),
             problems=[(PROBE, "torch.while_loop", "torch.while_loop has no TensorRT converter")], id="while_loop"),
    RuleCase("higher_order_op", lambda: _graph(lambda g, x: _probe(g, torch.ops.higher_order.invoke_subgraph, x, "s")),
             problems=[(PROBE, "higher_order.invoke_subgraph",
                        "higher-order op invoke_subgraph has no TensorRT converter")], id="other_hop"),
    RuleCase("data_dependent_op", _exported(torch.nonzero, torch.randn(3, 4)), node="nonzero",
             problems=[("nonzero", "aten.nonzero", "nonzero has a data-dependent output shape" + DATA_DEP)],
             handled={"_assert_scalar.default": 2}, id="nonzero"),
    RuleCase("unbacked_output", _exported(lambda x: x[x > 0], torch.randn(4, 5)), node="index",
             problems=[("index", "index.Tensor", UNBACKED),
                       ("index", "aten.index", "boolean-mask indexing (data-dependent shape; uses nonzero)")],
             handled={"_assert_scalar.default": 2}, id="bool_index_export"),
    RuleCase("unbacked_output", lambda: _graph(_unbacked_chain), problems=[(PROBE, "add.Tensor", UNBACKED)],
             ops={"add.Tensor": 1, "mul.Tensor": 1}, id="first_appearance_only"),
    RuleCase("getitem", _exported(lambda x: torch.max(x, 1), torch.randn(3, 4)), node="getitem",
             ops={"max.dim": 1, "getitem": 2}, id="tuple_output"),
    RuleCase("python_scalar_op",
             lambda: _graph(lambda g, x: _probe(g, operator.mul, g.call_function(aten.sym_size.int, (x, 0)), 2)),
             ops={"_operator.mul": 1, "sym_size.int": 1}, id="sym_mul"),
    RuleCase("not_aten", lambda: _graph(lambda g, x: _probe(g, torch.relu, x)),
             problems=[(PROBE, "torch.relu",
                        "not an ATen op: export the module first (tensorrt_check(module, example_inputs=...))")],
             id="torch_function"),
    RuleCase("topk_limit", lambda: _graph(_dynamic_k_topk),
             problems=[(PROBE, "aten.topk", "k is not a static int (TensorRT TopK needs a constant k; build one engine "
                                            "per token count: export with static shapes)")], id="dynamic_k"),
    RuleCase("topk_limit", lambda: _graph(lambda g, x: _probe(g, aten.topk.default, x, 3)), max_topk=2,
             problems=[(PROBE, "aten.topk", "k=3 exceeds TensorRT's TopK limit of 2 (fewer tokens per segment, or "
                                            "split the selection)")], id="k_over_limit"),
    RuleCase("topk_limit", lambda: _graph(lambda g, x: _probe(g, aten.topk.default, x, 2)), max_topk=2,
             ops={"topk.default": 1}, id="k_at_limit"),
    RuleCase("sort_limit", _exported(lambda x: x.sort(-1).values, torch.randn(1, 3841)), node="sort",
             problems=[("sort", "aten.sort", "sort over 3841 elements exceeds TensorRT's TopK limit of 3840")],
             id="sort_3841"),
    RuleCase("sort_limit", _exported(lambda x: x.sort(-1).values, torch.randn(1, 3840)), node="sort",
             ops={"sort.default": 1}, id="sort_3840"),
    RuleCase("sort_limit", lambda: _graph(lambda g, x: _probe(g, aten.sort.default, g.placeholder("no_meta"))),
             problems=[(PROBE, "aten.sort", "sort over a dimension that is not static")], id="sort_unknown_dim"),
    RuleCase("reducing_scatter", _exported(lambda x, i: x.scatter_add(1, i, x), torch.randn(4, 5), _IDX),
             node="scatter_add",
             problems=[("scatter_add", "aten.scatter_add", "scatter_add: TensorRT scatter layers have no reduction")],
             id="scatter_add"),
    RuleCase("reducing_scatter", lambda: _graph(lambda g, x: _probe(g, aten.scatter.reduce, x, 1, x, x, reduce="add")),
             problems=[(PROBE, "aten.scatter", "scatter with reduce=: TensorRT scatter layers have no reduction")],
             id="scatter_reduce_kw"),
    RuleCase("index_put_accumulate",
             _exported(lambda x, i: x.index_put((i[0],), x[0], accumulate=True), torch.randn(4, 5), _IDX),
             node="index_put",
             problems=[("index_put", "aten.index_put", "index_put with accumulate=True: TensorRT ScatterND has no "
                                                       "reduction")], id="accumulate"),
    RuleCase("boolean_index", _exported(lambda x: x[x > 0], torch.randn(4, 5)), node="index",
             problems=[("index", "index.Tensor", UNBACKED),
                       ("index", "aten.index", "boolean-mask indexing (data-dependent shape; uses nonzero)")],
             handled={"_assert_scalar.default": 2}, id="bool_mask"),
    RuleCase("has_converter", _exported(lambda x, i: x[i[0]], torch.randn(4, 5), _IDX), node="index",
             ops={"index.Tensor": 1}, id="integer_index"),
    RuleCase("masked_attention",
             _exported(lambda q, m: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m),
                       torch.randn(1, 2, 6, 8), torch.ones(6, 6, dtype=torch.bool)),
             node="scaled_dot_product_attention",
             warnings=[("scaled_dot_product_attention", "scaled_dot_product_attention.default",
                        "attention with a mask: IAttentionLayer in torch-tensorrt >= 2.13 (older releases decompose "
                        "it, decompose_attention=True)")], id="sdpa_mask"),
    RuleCase("has_converter", _exported(torch.relu, torch.randn(3)), node="relu", ops={"relu.default": 1}, id="relu"),
    RuleCase("removed_by_lowering", _exported(torch.nn.functional.silu, torch.randn(3)), node="silu",
             handled={"silu.default": 1}, id="trt_own_decomposition"),
    RuleCase("removed_by_lowering",
             lambda: _graph(lambda g, x: _probe(g, aten._assert_scalar.default, True, "msg")),
             handled={"_assert_scalar.default": 1}, id="assert_erased"),
    RuleCase("constant_folded_factory", lambda: _graph(lambda g, x: _probe(g, aten.zeros.default, [3])),
             handled={"zeros.default": 1}, id="factory_table"),
    RuleCase("constant_folded_factory", lambda: _graph(lambda g, x: _probe(g, aten.linspace.default, 0.0, 1.0, 5)),
             handled={"linspace.default": 1}, id="factory_static_args"),
    RuleCase("functionalized_inplace", lambda: _graph(lambda g, x: _probe(g, aten.mul_.Tensor, x, x)),
             handled={"mul_.Tensor (functionalized)": 1}, id="mul_"),
    RuleCase("to_copy", lambda: _graph(lambda g, x: _probe(g, aten.to.dtype, x, torch.float16)),
             handled={"to.dtype (-> _to_copy)": 1}, id="to_dtype"),
    RuleCase("decomposed_by_trt", lambda: _graph(lambda g, x: _probe(g, aten.addcmul.default, x, x, x)),
             handled={"addcmul.default (decomposed)": 1}, id="addcmul"),
    RuleCase("decomposed_by_trt", lambda: _graph(_eye_of_symbolic_size),  # a size from the graph: not folded
             handled={"eye.default (decomposed)": 1}, id="eye_symbolic"),
    RuleCase("no_converter", lambda: _graph(lambda g, x: _probe(g, aten.searchsorted.Tensor, x, x)),
             problems=[(PROBE, "aten.searchsorted.Tensor", NO_CONVERTER)], id="searchsorted"),
    RuleCase("no_converter", lambda: _graph(lambda g, x: _probe(g, aten.lgamma_.default, x)),  # lgamma: no converter
             problems=[(PROBE, "aten.lgamma_.default", NO_CONVERTER)], id="inplace_without_converter"),
]


def test_every_rule_has_a_case():
    assert {c.rule for c in RULE_CASES} == {r.__name__ for r in trt_rules.RULES}
    assert trt_rules.RULES[-1] is trt_rules.no_converter  # the fallback decides last


@pytest.mark.parametrize("case", RULE_CASES, ids=[f"{c.rule}-{c.id}" for c in RULE_CASES])
def test_rule(case, monkeypatch):
    decided = []

    def recording(rule):
        def run(n, ctx):
            verdict = rule(n, ctx)
            if verdict is not None:
                decided.append((rule.__name__, n.name))
            return verdict

        return run

    monkeypatch.setattr(trt_rules, "RULES", tuple(recording(r) for r in trt_rules.RULES))
    made = case.make()
    program, inputs = (made, None) if isinstance(made, fx.GraphModule) else made
    rep = tensorrt_check(program, inputs, max_topk=case.max_topk)
    assert (case.rule, case.node) in decided, decided
    assert [(p.node, p.op, p.reason) for p in rep.problems] == list(case.problems), rep.format()
    assert [(w.node, w.op, w.reason) for w in rep.warnings if w.op != "input"] == list(case.warnings)
    assert dict(rep.handled_by_lowering) == case.handled
    assert {k: rep.ops[k] for k in case.ops} == case.ops
    assert rep.ok == (not case.problems)


def test_topk_records_every_k():
    gm = _graph(lambda g, x: (_probe(g, aten.topk.default, x, 2),
                              g.create_node("call_function", aten.topk.default, (x,), {"k": 3}, name="second")))
    rep = tensorrt_check(gm, max_topk=2)
    assert rep.topk == [(PROBE, 2), ("second", 3)]  # k given by keyword is read too
    assert [p.node for p in rep.problems] == ["second"]
    dyn = tensorrt_check(_graph(_dynamic_k_topk))
    assert [n for n, _ in dyn.topk] == [PROBE] and isinstance(dyn.topk[0][1], fx.Node)  # the k node, as it is


# ------------------------------------------------------------------------------------ _block_of
def _stack(*paths):
    return {f"m{i}": (p, torch.nn.Module) for i, p in enumerate(paths)}


@pytest.mark.parametrize("stack, block", [
    (_stack("encoder", "encoder.stages.3", "encoder.stages.3.attn"), 3),  # no blocks / layer / layers
    (_stack("vision_model.encoder.layers.11.mlp.fc1"), 11),
    (_stack("trunk.2", "trunk.2.mixer.12.proj"), 12),  # the last index of the innermost path
    (_stack("patch_embed", "patch_embed.proj"), None),
    ({}, None),
])
def test_block_of_reads_any_indexed_module_path(stack, block):
    n = fx.Graph().placeholder("x")
    n.meta["nn_module_stack"] = stack
    assert _block_of(n) == block


def test_block_of_prefers_locate_meta():
    n = fx.Graph().placeholder("x")
    n.meta["nn_module_stack"] = _stack("encoder.stages.3.attn")
    n.meta["ipcv"] = {"block": 5}
    assert _block_of(n) == 5
    n.meta["ipcv"] = {"block": 0}  # block 0 is a block, not "none"
    assert _block_of(n) == 0


def test_findings_name_the_block_of_an_unnamed_module_list():
    def build(g, x):
        p = _probe(g, aten.searchsorted.Tensor, x, x)
        p.meta["nn_module_stack"] = _stack("encoder", "encoder.stages.3", "encoder.stages.3.attn")
        return p

    rep = tensorrt_check(_graph(build))
    assert [p.block for p in rep.problems] == [3]
    assert f"PROBLEM {PROBE} (block 3): aten.searchsorted.Tensor: " in rep.format()


# ------------------------------------------------------------------------------------ compare_with_installed
HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None


@pytest.mark.skipif(not HAS_TORCH_TENSORRT, reason="needs torch-tensorrt")
def test_compare_with_installed_torch_tensorrt():
    diff = compare_with_installed()
    assert diff.version and diff.version != "unknown"
    assert not {"topk.default", "gather.default", "scatter.src", "cumsum.default"} & diff.only_snapshot
    if diff.version.startswith("2.13."):  # the release the snapshot was read from
        assert diff.only_snapshot == frozenset(), sorted(diff.only_snapshot)
        assert "nonzero.default" in diff.only_installed  # left out of the snapshot on purpose


def test_compare_without_torch_tensorrt_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # `import torch_tensorrt` fails, installed or not
    with pytest.raises(TorchTensorRTUnavailable, match="needs torch-tensorrt") as e:
        compare_with_installed()
    assert isinstance(e.value, ImportError) and isinstance(e.value, BackendUnavailable)


def _fake_torch_tensorrt(monkeypatch, version, **conversion_attrs):
    root, dynamo, conversion = (types.ModuleType(n) for n in
                                ("torch_tensorrt", "torch_tensorrt.dynamo", "torch_tensorrt.dynamo.conversion"))
    root.__version__, root.dynamo, dynamo.conversion = version, dynamo, conversion
    for k, v in conversion_attrs.items():
        setattr(conversion, k, v)
    for m in (root, dynamo, conversion):
        monkeypatch.setitem(sys.modules, m.__name__, m)


class _FakeRegistry:
    def __init__(self, targets):
        self.targets = set(targets)

    def unique_targets(self):
        return set(self.targets)


def test_compare_with_installed_diffs_the_live_registry(monkeypatch):
    unresolved = {n for n in CONVERTER_OPS if not _resolve(n)}
    targets = {op for n in CONVERTER_OPS - {"cumsum.default", "matmul.default"} for op in _resolve(n)}
    targets |= {aten.matmul,  # a packet key stands for its overloads but "out"
                operator.getitem, torch.ops.prims.div.default, torch.sym_min,  # not ATen: out of the comparison
                aten.searchsorted.Tensor}
    _fake_torch_tensorrt(monkeypatch, "9.9.9", DYNAMO_CONVERTERS=_FakeRegistry(targets))
    diff = compare_with_installed()
    assert diff.version == "9.9.9"
    assert diff.only_installed == {"searchsorted.Tensor"}
    assert diff.only_snapshot == {"cumsum.default"} | unresolved
    assert not diff.same


def test_compare_with_installed_reads_older_registries(monkeypatch):
    _fake_torch_tensorrt(monkeypatch, "2.1.0", DYNAMO_ATEN_CONVERTERS={aten.topk.default: [object()]})
    diff = compare_with_installed()
    assert diff.only_installed == frozenset() and diff.only_snapshot == CONVERTER_OPS - {"topk.default"}


def test_ipcv_ops_are_prepared_away(batched):
    """The rewrite's ops (torch.ops.ipcv.*) have no converter: ipcv decomposes them to ATen first."""
    rm, args = batched

    def ipcv_nodes(p):
        return [n.name for n in p.graph.nodes if getattr(n.target, "namespace", None) == "ipcv"]

    ep = torch.export.export(graph_of(rm), args, strict=False)
    assert ipcv_nodes(ep)  # torch.export keeps the named IPCV nodes
    prepared = prepare_for_tensorrt(ep)
    assert ipcv_nodes(prepared) == []
    assert tensorrt_check(prepared).ok and tensorrt_check(prepared.graph_module).ok  # no decomposition left to do
    torch.testing.assert_close(prepared.module()(*args), rm(*args))
