"""Packed layouts (several images / video frames in one sequence): attention within each segment by
construction — no N x N tensor anywhere —, the retain-1.0 rewrite is the HF tower, each image's
output equals the same image alone, and the lowered graphs equal the eager graph."""

import pytest
import torch
import torch.nn.functional as F

import ipcv_adapters
import ipcv_compile
from ipcv_adapters.export import TowerForExport
from ipcv_adapters.testing import TINY_IPCV, qwen2vl_inputs, tiny_tower
from ipcv_compile import ops as ipcv_ops
from ipcv_core.attention import segment_attention, segment_concat, segment_prefix, segment_runs

# 2-5 segments of mixed sizes, videos included (t > 1 -> one segment per frame)
LAYOUTS = [
    [[1, 4, 6], [1, 6, 4]],
    [[1, 4, 4], [3, 4, 6]],
    [[1, 2, 6], [1, 6, 6], [2, 4, 4]],
    [[1, 4, 4], [1, 4, 4], [1, 8, 4], [1, 2, 2], [1, 6, 4]],
]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def qwen():
    t = tiny_tower("qwen2_vl", depth=4)
    r1 = ipcv_compile.rewrite(t, TINY_IPCV.replace(retain=1.0))
    return t, r1, r1.with_config(retain=0.35)


# ------------------------------------------------------------------------------------- the math
def _loop_attention(q, k, v, ql, kl, mask=None, prefix=False):
    outs, qo, ko = [], 0, 0
    for a, b in zip(ql, kl):
        qs = q[..., ko:ko + a, :] if prefix else q[..., qo:qo + a, :]
        m = None
        if mask is not None:
            rows = slice(ko, ko + a) if prefix else slice(qo, qo + a)
            m = mask[..., rows if mask.shape[-2] > 1 else slice(None), ko:ko + b]
        outs.append(F.scaled_dot_product_attention(qs, k[..., ko:ko + b, :], v[..., ko:ko + b, :], attn_mask=m))
        qo, ko = qo + a, ko + b
    return torch.cat(outs, dim=-2)


@pytest.mark.parametrize("ql,kl", [([5, 5, 5], [5, 5, 5]), ([3, 4, 4, 2], [3, 4, 4, 2]), ([2, 2, 1], [5, 5, 3])])
def test_segment_attention_equals_a_loop_of_sdpa(ql, kl):
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3), (3,)):  # (B, H) or (H,) leading dims
        lq = sum(ql)
        q = torch.randn(*shape, lq, 8, generator=g)
        k = torch.randn(*shape, sum(kl), 8, generator=g)
        v = torch.randn(*shape, sum(kl), 8, generator=g)
        torch.testing.assert_close(segment_attention(q, k, v, q_lengths=ql, kv_lengths=kl), _loop_attention(q, k, v, ql, kl))
        if len(shape) == 2:
            bool_mask = torch.rand(shape[0], 1, lq, sum(kl), generator=g) > 0.3
            bool_mask[..., 0] = True
            bias = torch.randn(shape[0], 1, 1, sum(kl), generator=g)
            for m in (bool_mask, bias):
                torch.testing.assert_close(segment_attention(q, k, v, m, q_lengths=ql, kv_lengths=kl),
                                           _loop_attention(q, k, v, ql, kl, m))
    qp = torch.randn(2, 3, sum(kl), 8, generator=g)  # queries: the first ql rows of each key segment
    k, v = torch.randn(2, 3, sum(kl), 8, generator=g), torch.randn(2, 3, sum(kl), 8, generator=g)
    torch.testing.assert_close(segment_attention(qp, k, v, q_lengths=ql, kv_lengths=kl, q_prefix=True),
                               _loop_attention(qp, k, v, ql, kl, prefix=True))


def test_segment_runs_concat_and_prefix():
    assert segment_runs([4, 4, 2, 2, 4], [4, 4, 2, 2, 4]) == [(4, 4, 2), (2, 2, 2), (4, 4, 1)]
    a = torch.arange(7.0).view(1, 7, 1)
    b = -torch.arange(1.0, 6.0).view(1, 5, 1)
    c = segment_concat(a, b, [2, 2, 3], [2, 2, 1], dim=1)
    assert c.flatten().tolist() == [0, 1, -1, -2, 2, 3, -3, -4, 4, 5, 6, -5]
    assert torch.equal(segment_prefix(c, [4, 4, 4], [2, 2, 3], dim=1), a)


# ------------------------------------------------------------------------------------- the graphs
def _square_tensors(gm, n_tokens):
    """Values the graph computes from its inputs (meta["val"] after propagation at the layout's
    sizes) with two dims of at least the token count: an N x N mask or score matrix."""
    from_inputs = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in from_inputs for a in n.all_input_nodes):
            from_inputs.add(n)
    bad = []
    for n in from_inputs:
        vals = n.meta.get("val")
        for v in (vals if isinstance(vals, (list, tuple)) else [vals]):
            if isinstance(v, torch.Tensor) and sum(int(s) >= n_tokens for s in v.shape) >= 2:
                bad.append((n.name, tuple(v.shape)))
    return bad


# token counts above every weight / activation width of the tiny tower (3 x 64), so that only an
# N x N tensor can have two dims >= N
LARGE = [[[1, 8, 12], [2, 8, 8]], [[1, 12, 12], [1, 8, 8], [1, 4, 6]], [[4, 8, 8]]]


@pytest.mark.parametrize("grids", LARGE, ids=lambda g: "-".join("x".join(map(str, r)) for r in g))
@pytest.mark.parametrize("retain", [1.0, 0.35])
def test_no_n_by_n_tensor_in_a_packed_graph(qwen, grids, retain):
    t, r1, r35 = qwen
    tw = r1 if retain == 1.0 else r35
    pv, thw = qwen2vl_inputs(grids)
    n = pv.shape[0]
    assert n > 3 * t.config.embed_dim
    prep = tw.adapter.prepare(pv, grid_thw=thw)
    assert all(sum(int(d) >= n for d in s.shape) < 2 for s in prep.side)  # no mask among the stack inputs
    g = tw.graph_for(prep.layout)
    g.refresh_meta()
    assert _square_tensors(g.graph_module, n) == []
    assert any(nd.target is ipcv_ops.segment_attention for nd in g.graph_module.graph.nodes)


@pytest.mark.parametrize("grids", LAYOUTS, ids=lambda g: "-".join("x".join(map(str, r)) for r in g))
def test_packed_graph_equals_hf_and_driver(qwen, grids):
    t, r1, r35 = qwen
    pv, thw = qwen2vl_inputs(grids, seed=len(grids))
    with torch.no_grad():
        ref = t(pv, grid_thw=thw)
        one = r1(pv, grid_thw=thw)
        out = r35(pv, grid_thw=thw)
        eager, res = ipcv_adapters.run_eager(t, TINY_IPCV, pv, grid_thw=thw)
    assert (one.last_hidden_state - ref.last_hidden_state).abs().max().item() <= 1e-6
    assert (one.pooler_output - ref.pooler_output).abs().max().item() <= 1e-6
    assert _rel(out.last_hidden_state, eager.last_hidden_state) <= 1e-5
    assert _rel(out.pooler_output, eager.pooler_output) <= 1e-5
    prep = r35.adapter.prepare(pv, grid_thw=thw)
    assert len(prep.layout.lengths) == sum(g[0] for g in grids) >= 2


def test_retain_one_is_only_per_segment_attention(qwen):
    """The vanilla-equivalent path: no prune / gather / reconstruct op at all."""
    t, r1, _ = qwen
    pv, thw = qwen2vl_inputs(LAYOUTS[1])
    g = r1.graph_for(r1.adapter.prepare(pv, grid_thw=thw).layout)
    targets = {n.target for n in g.graph_module.graph.nodes if n.op == "call_function"}
    assert ipcv_ops.segment_attention in targets
    assert not targets & (set(ipcv_ops.IPCV_OPS) - {ipcv_ops.segment_attention})
    assert dict(g.report.inserted) == {"ipcv_segment_attention": r1.adapter.depth}


@pytest.mark.parametrize("retain", [1.0, 0.35])
def test_each_image_equals_the_same_image_alone(qwen, retain):
    t, r1, r35 = qwen
    tw = r1 if retain == 1.0 else r35
    grids = [[1, 6, 4], [2, 4, 4], [1, 2, 2], [1, 4, 8]]
    pv, thw = qwen2vl_inputs(grids, seed=9)
    with torch.no_grad():
        both = tw(pv, grid_thw=thw)
        start = 0
        for gr in grids:
            n = gr[0] * gr[1] * gr[2]
            alone = tw(pv[start:start + n], grid_thw=torch.tensor([gr]))
            assert (both.last_hidden_state[start:start + n] - alone.last_hidden_state).abs().max().item() <= 1e-6
            start += n


def test_changing_one_image_leaves_the_others_bit_identical(qwen):
    _, _, r35 = qwen
    grids = [[1, 4, 6], [1, 4, 6], [1, 6, 4]]  # the first two batch into one SDPA
    pv, thw = qwen2vl_inputs(grids, seed=5)
    pv2 = pv.clone()
    pv2[24:48] = torch.randn(24, pv.shape[1])
    with torch.no_grad():
        a, b = r35(pv, grid_thw=thw).last_hidden_state, r35(pv2, grid_thw=thw).last_hidden_state
    assert torch.equal(a[:24], b[:24]) and torch.equal(a[48:], b[48:])
    assert not torch.equal(a[24:48], b[24:48])


@pytest.mark.parametrize("backend", ["onnx", "inductor"])
def test_lowered_packed_layout_equals_eager_graph(qwen, backend, tmp_path):
    _, _, r35 = qwen
    pv, thw = qwen2vl_inputs([[1, 4, 6], [2, 4, 4], [1, 2, 4]], seed=6)
    mod = TowerForExport(r35, (pv,), {"grid_thw": thw})
    with torch.no_grad():
        ref = mod(pv)
    lw = ipcv_compile.lower(mod, backend, (pv,), dynamic=False,
                            **({"path": str(tmp_path / "p.onnx")} if backend == "onnx" else {}))
    with torch.no_grad():  # the onnx file checks the layout it was exported for (issue 14): pass it
        got = lw(pv, grid_thw=thw) if backend == "onnx" else lw(pv)
    for g, r in zip(got, ref):
        assert _rel(g, r) <= 1e-4


def test_segment_attention_with_groups_equals_a_masked_loop():
    """Window attention of kept rows: within each segment a query attends to its own group only."""
    g = torch.Generator().manual_seed(1)
    ql, kl = [3, 3, 2], [5, 5, 4]
    q = torch.randn(1, 2, sum(ql), 8, generator=g)
    k, v = torch.randn(1, 2, sum(kl), 8, generator=g), torch.randn(1, 2, sum(kl), 8, generator=g)
    kv_groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5])
    q_groups = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])
    mask = (q_groups[:, None] == kv_groups[None, :])[None, None]
    got = segment_attention(q, k, v, q_lengths=ql, kv_lengths=kl, q_groups=q_groups, kv_groups=kv_groups)
    torch.testing.assert_close(got, _loop_attention(q, k, v, ql, kl, mask))
    # prefix mode: the queries are the first rows of each key segment, their groups too
    qp = torch.randn(1, 2, sum(kl), 8, generator=g)
    pmask = (kv_groups[:, None] == kv_groups[None, :])[None, None]
    got = segment_attention(qp, k, v, q_lengths=ql, kv_lengths=kl, q_prefix=True, kv_groups=kv_groups)
    torch.testing.assert_close(got, _loop_attention(qp, k, v, ql, kl, pmask, prefix=True))
