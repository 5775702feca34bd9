"""Specifications of ipcv_compile on synthetic ViTs: rewritten graph == eager driver, sizes follow
the kept count, node-level shapes, re-entrancy, clear errors."""

import threading

import pytest
import torch

from ipcv_compile import LocateError, LocateSpec, capture, locate, rewrite, rewrite_graph
from ipcv_compile.api import _fresh
from ipcv_core import IPCVConfig, SegmentLayout, run_ipcv
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

SPEC = LocateSpec(blocks="blocks", attention="attn", ffn="mlp")
DEPTH = 6

# (model spec, grids, protected, packed) — several shapes of ViT and of segment structure
CASES = {
    "plain-batched": (ViTSpec(depth=DEPTH), [(6, 6)], 0, False),
    "cls-layerscale-separate-gated": (
        ViTSpec(depth=DEPTH, layerscale=True, fused_qkv=False, ffn="gated", norm="rms"), [(5, 6)], 1, False),
    "rotary-fused-packed3": (ViTSpec(depth=DEPTH, rotary=True, fused_qkv=True), [(4, 4), (3, 5), (2, 3)], 0, True),
    "rotary-separate-cls-packed2": (
        ViTSpec(depth=DEPTH, rotary=True, fused_qkv=False, layerscale=True), [(4, 5), (3, 3)], 1, True),
}


def _args(cos, sin, mask, h):
    return (h, cos, sin, mask)


@pytest.fixture(scope="module")
def captured():
    """One capture per case (export is the slow part); every config rewrites a copy."""
    out = {}
    for name, (spec, grids, prot, packed) in CASES.items():
        m = SyntheticViT(spec).eval()
        batch = 1 if packed else 2
        h, cos, sin, mask, layout = make_inputs(spec, grids, prot, batch=batch, packed=packed)
        if not packed:
            layout = SegmentLayout.batched(prot)  # no grid: one graph for every token count
        args = _args(cos, sin, mask, h)
        out[name] = (m, args, layout, capture(m, args))
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _driver(m, args, layout, cfg):
    h, cos, sin, _ = args
    with torch.no_grad():
        return m.norm(run_ipcv(h, m.branches(cos, sin), cfg, layout).hidden_states)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("r", [1.0, 0.5, 0.35, 0.2])
@pytest.mark.parametrize("lp", [1, 3])
@pytest.mark.parametrize("delta", ["0", "2", "rest"])
def test_rewritten_graph_equals_eager_driver(captured, case, r, lp, delta):
    m, args, layout, gm = captured[case]
    d = DEPTH - lp if delta == "rest" else int(delta)
    cfg = IPCVConfig(retain=r, prune_layer=lp, as_depth=d, k=3)
    rm = rewrite_graph(gm, cfg, SPEC, layout)
    with torch.no_grad():
        out = rm(*args)
    assert out.shape == args[0].shape
    assert rel(out, _driver(m, args, layout, cfg)) <= 1e-5
    if r == 1.0:
        with torch.no_grad():
            ref = m(*args)
        assert (out - ref).abs().max().item() <= 1e-6


def test_retain_one_bit_exact_through_public_api():
    spec, grids, prot, packed = CASES["cls-layerscale-separate-gated"]
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, layout = make_inputs(spec, grids, prot, batch=2, packed=False)
    rm = rewrite(m, IPCVConfig(retain=1.0, as_depth=2), example_inputs=(h, cos, sin, mask), spec=SPEC, layout=layout)
    with torch.no_grad():
        assert torch.equal(rm(h, cos, sin, mask), m(h, cos, sin, mask))


def test_one_graph_serves_two_token_counts(captured):
    m, args, layout, gm = captured["cls-layerscale-separate-gated"]
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=2, k=4)
    rm = rewrite_graph(gm, cfg, SPEC, layout)
    spec = CASES["cls-layerscale-separate-gated"][0]
    for grid, batch in [((5, 6), 2), ((7, 9), 3), ((3, 4), 1)]:
        h, cos, sin, mask, _ = make_inputs(spec, [grid], 1, batch=batch, packed=False, seed=batch)
        with torch.no_grad():
            out = rm(h, cos, sin, mask)
        assert out.shape == h.shape
        assert rel(out, _driver(m, (h, cos, sin, mask), layout, cfg)) <= 1e-5


def test_rotary_graph_serves_two_token_counts():
    spec = ViTSpec(depth=4, rotary=True, fused_qkv=True)
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, _ = make_inputs(spec, [(6, 6)], 0, batch=2, packed=False)
    layout = SegmentLayout.batched()
    cfg = IPCVConfig(retain=0.5, prune_layer=1, as_depth=1, k=3)
    rm = rewrite(m, cfg, example_inputs=(h, cos, sin, mask), spec=SPEC, layout=layout)
    h2, cos2, sin2, mask2, _ = make_inputs(spec, [(5, 9)], 0, batch=3, packed=False, seed=7)
    with torch.no_grad():
        out = rm(h2, cos2, sin2, mask2)
    assert rel(out, _driver(m, (h2, cos2, sin2, mask2), layout, cfg)) <= 1e-5


def _rows(v, dim=-2):
    return v.shape[dim]


def test_node_shapes_follow_kept_count(captured):
    """FFN nodes of blocks >= l_p see K rows; SDPA queries in AS blocks see K rows, keys N rows;
    after the AS range keys are K rows too; reintegration brings N rows back."""
    m, args, layout, gm = captured["plain-batched"]
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=2, k=3)
    rm = rewrite_graph(gm, cfg, SPEC, layout).refresh_meta()
    N = args[0].shape[1]
    # the meta shapes are symbolic in N; evaluate them at the example N
    gmap_sym = next(n for n in rm.graph_module.graph.nodes if n.op == "placeholder").meta["val"].shape[1]
    sym = gmap_sym.node.expr

    def ev(s):
        return int(s.node.expr.subs(sym, N)) if isinstance(s, torch.SymInt) else int(s)

    K = 13  # ceil(0.35 * 36)
    seen_ffn, seen_core = set(), set()
    for n in rm.graph_module.graph.nodes:
        info = n.meta.get("ipcv") or {}
        if "block" not in info or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        b, v = info["block"], n.meta["val"]
        if info.get("role") == "ffn":
            seen_ffn.add(b)
            assert ev(v.shape[1]) == (K if b >= 2 else N), (n.name, b)
        if info.get("role") == "attention_core":
            seen_core.add(b)
            q, k = n.args[0].meta["val"], n.args[1].meta["val"]
            assert ev(q.shape[-2]) == (K if b >= 2 else N)
            assert ev(k.shape[-2]) == (N if b < 4 else K)
    assert seen_ffn == set(range(DEPTH)) and seen_core == set(range(DEPTH))
    out_node = next(n for n in rm.graph_module.graph.nodes if n.op == "output")
    assert ev(out_node.args[0][0].meta["val"].shape[1]) == N


def test_sizes_repointed_no_stale_token_count(captured):
    """Export feeds one sym_size of an input to every reshape; after the rewrite no reshape in a
    pruned block may read it (they get -1 and follow the rows they are given)."""
    m, args, layout, gm = captured["rotary-fused-packed3"]
    before = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert before and any(
        any(a in before for a in n.args[1]) for n in gm.graph.nodes if n.target is torch.ops.aten.view.default
    ), "premise: captured reshapes read the input's token count"
    cfg = IPCVConfig(retain=0.5, prune_layer=1, as_depth=2, k=3)
    rm = rewrite_graph(gm, cfg, SPEC, layout)
    assert len(rm.report.sizes_repointed) == 2 * (DEPTH - 1)  # qkv view + out reshape per pruned block
    for n in rm.graph_module.graph.nodes:
        if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default) and (n.meta.get("ipcv") or {}).get("block", 0) >= 1:
            assert not any(isinstance(a, torch.fx.Node) for a in n.args[1]), n.format_node()


def test_rewrite_does_not_touch_the_capture(captured):
    m, args, layout, gm = captured["plain-batched"]
    n_before = len(gm.graph.nodes)
    code_before = gm.code
    rewrite_graph(gm, IPCVConfig(retain=0.2, prune_layer=1, as_depth=1), SPEC, layout)
    assert len(gm.graph.nodes) == n_before and gm.code == code_before
    with torch.no_grad():
        assert torch.equal(gm(*args), m(*args))


def test_reentrant_threads_match_sequential(captured):
    m, args, layout, gm = captured["cls-layerscale-separate-gated"]
    spec = CASES["cls-layerscale-separate-gated"][0]
    rm = rewrite_graph(gm, IPCVConfig(retain=0.35, prune_layer=2, as_depth=2), SPEC, layout)
    inputs = [make_inputs(spec, [(5, 6)], 1, batch=2, packed=False, seed=s)[:4] for s in range(6)]
    with torch.no_grad():
        seq = [rm(h, c, s, mk) for h, c, s, mk in inputs]
    results = [None] * len(inputs)

    def work(i):
        h, c, s, mk = inputs[i]
        with torch.no_grad():
            for _ in range(3):
                results[i] = rm(h, c, s, mk)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, seq):
        assert torch.equal(a, b)
    # no tensors stashed on the module between calls
    state = {k for k, v in vars(rm).items() if isinstance(v, torch.Tensor)}
    state |= {k for k, v in vars(rm.graph_module).items() if isinstance(v, torch.Tensor)}
    assert not state


def test_packed_graph_rejects_another_layout(captured):
    m, args, layout, gm = captured["rotary-fused-packed3"]
    rm = rewrite_graph(gm, IPCVConfig(retain=0.5, prune_layer=1, as_depth=1), SPEC, layout)
    spec = CASES["rotary-fused-packed3"][0]
    h, cos, sin, mask, _ = make_inputs(spec, [(4, 4), (3, 3)], 0)
    with pytest.raises(ValueError, match="segment lengths"):
        rm(h, cos, sin, mask)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (LocateSpec(blocks="layers", attention="attn", ffn="mlp"), "no block nodes found for LocateSpec.blocks='layers'"),
        (LocateSpec(blocks="blocks", attention="self_attn", ffn="mlp"), "attention module 'blocks.0.self_attn'"),
        (LocateSpec(blocks="blocks", attention="attn", ffn="ffn"), "FFN module 'blocks.0.ffn'"),
    ],
)
def test_locator_errors_name_the_missing_piece(captured, spec, needle):
    gm = captured["plain-batched"][3]
    with pytest.raises(LocateError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        locate(_fresh(gm), spec)


def test_locator_error_without_sdpa():
    class ManualAttnViT(SyntheticViT):
        pass

    spec = ViTSpec(depth=3)
    m = ManualAttnViT(spec).eval()
    # replace SDPA by an explicit softmax attention in every block
    import types

    def rows(self, x_q, x_kv, ctx, cos=None, sin=None):
        B, L, D = x_q.shape
        qkv = self.qkv(x_kv).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, L, D))

    for blk in m.blocks:
        blk.attn.rows = types.MethodType(rows, blk.attn)
    h, cos, sin, mask, layout = make_inputs(spec, [(4, 4)], 0, batch=2, packed=False)
    gm = capture(m, (h,))
    with pytest.raises(LocateError, match="attention core: no aten.scaled_dot_product_attention in blocks.0.attn"):
        locate(gm, SPEC)


def test_summary_and_readable_graph(captured):
    m, args, layout, gm = captured["rotary-fused-packed3"]
    rm = rewrite_graph(gm, IPCVConfig(retain=0.5, prune_layer=1, as_depth=2, k=3), SPEC, layout)
    s = rm.summary()
    assert "prune + AS" in s and "kept rows only" in s and "ipcv_prune x1" in s
    assert "reintegration" in s
    code = rm.print_readable(print_output=False)
    assert "ipcv_prune" in code and "ipcv_reconstruct" in code
    assert rm.nodes_after > 0 and rm.nodes_before > 0
