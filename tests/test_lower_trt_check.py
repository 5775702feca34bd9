"""tensorrt_check: the rewritten graphs pass (synthetic ViT, batched and packed with a mask; the
adapters' Qwen2-VL and InternVL towers); injected unsupported constructs fail, naming the op."""

import copy

import pytest
import torch

from ipcv_compile import LocateSpec, capture, rewrite_graph, tensorrt_check
from ipcv_compile.lower import TowerForExport, export_program
from ipcv_compile.tensorrt_check import CONVERTER_OPS, TRT_TOPK_MAX_K, _resolve, prepare_for_tensorrt
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
    assert "scatter.src" in rep.ops and "gather.default" in rep.ops and "cumsum.default" in rep.ops
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
