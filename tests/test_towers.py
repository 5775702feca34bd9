"""The towers people deploy now (Qwen2.5-VL with window attention, Qwen3-VL with deepstack taps,
Qwen3.5, LLaVA-1.5 / LLaVA-OneVision through CLIP / SigLIP): taps equal the eager driver's
reconstruction, per-image / per-frame isolation, generate() of every VLM class, per-model defaults
clipped to the depth, ONNX export — all on tiny random-weight models built from configs."""

import pytest
import torch

import ipcv_adapters
import ipcv_compile
from ipcv_adapters.export import TowerForExport
from ipcv_adapters.testing import (
    PACKED, TINY_IPCV, VLMS, qwen2vl_inputs, patch_dim, tiny_tower, tiny_vlm, tower_inputs, vlm_generate_inputs,
)
from ipcv_compile import ops as ipcv_ops
from ipcv_core import IPCVConfig

NEW_PACKED = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def towers():
    out = {}
    for name in NEW_PACKED + ("clip", "siglip"):
        t = tiny_tower(name)
        r1 = ipcv_compile.rewrite(t, TINY_IPCV.replace(retain=1.0))
        out[name] = (t, r1, r1.with_config(retain=0.35))
    return out


# ------------------------------------------------------------------------------------- taps
def test_qwen3vl_deepstack_taps_equal_the_drivers_reconstruction(towers):
    t, r1, r35 = towers["qwen3_vl"]
    args, kw = tower_inputs("qwen3_vl", batch=3, seed=2)
    with torch.no_grad():
        ref = t(*args, **kw)
        one = r1(*args, **kw)
        out = r35(*args, **kw)
        eager, res = ipcv_adapters.run_eager(t, TINY_IPCV, *args, **kw)
    assert len(out.deepstack_features) == len(ref.deepstack_features) == len(t.deepstack_visual_indexes)
    for a, b in zip(one.deepstack_features, ref.deepstack_features):
        assert (a - b).abs().max().item() <= 1e-6
    for a, b, r in zip(out.deepstack_features, eager.deepstack_features, ref.deepstack_features):
        assert a.shape == r.shape and _rel(a, b) <= 1e-5
    assert sorted(res.taps) == list(t.deepstack_visual_indexes)
    g = r35.graph_for(r35.adapter.prepare(*args, **kw).layout, r35.adapter.default_taps)
    names = [n.name for n in g.graph_module.graph.nodes if n.target is ipcv_ops.reconstruct]
    # one reconstruct per tap at or after the prune point, one for the output
    assert len(names) == sum(i >= TINY_IPCV.prune_layer for i in t.deepstack_visual_indexes) + 1


@pytest.mark.parametrize("name", ["clip", "qwen2_5_vl"])
def test_hidden_states_are_restored_at_their_block(towers, name):
    """output_hidden_states=-2 (LLaVA's feature layer, what transformers 5 passes) and =True: each
    entry at or after the prune point is IPCV's reconstruction at that block, as the driver's."""
    t, r1, r35 = towers[name]
    args, kw = tower_inputs(name, batch=2, seed=3)
    depth = r35.adapter.depth
    with torch.no_grad():
        ref_all = t(*args, **kw, output_hidden_states=True).hidden_states
        one = r1(*args, **kw, output_hidden_states=-2).hidden_states
        out = r35(*args, **kw, output_hidden_states=-2).hidden_states
        every = r35(*args, **kw, output_hidden_states=True).hidden_states
        eager = ipcv_adapters.run_eager(t, TINY_IPCV, *args, output_hidden_states=True, **kw)[0].hidden_states
    assert len(one) == len(out) == len(every) == depth + 1
    assert [i for i, h in enumerate(out) if h is not None] == [depth - 1]  # only the requested entry
    assert (one[-2] - ref_all[-2]).abs().max().item() <= 1e-6
    for i in range(depth + 1):
        assert _rel(every[i], eager[i]) <= 1e-5
    assert _rel(out[-2], eager[-2]) <= 1e-5
    assert (every[-2] - ref_all[-2]).abs().max().item() > 1e-4  # pruned: a reconstruction, not the original


# ------------------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("name", NEW_PACKED)
def test_each_image_and_frame_equals_it_alone(towers, name):
    t, r1, r35 = towers[name]
    grids = [[1, 8, 8], [2, 4, 8], [1, 4, 4]]
    pv, thw = qwen2vl_inputs(grids, seed=4, in_dim=patch_dim(name))
    with torch.no_grad():
        both = r35(pv, grid_thw=thw).last_hidden_state
        start = 0
        for g in grids:
            n = g[0] * g[1] * g[2]
            alone = r35(pv[start:start + n], grid_thw=torch.tensor([g])).last_hidden_state
            assert (both[start:start + n] - alone).abs().max().item() <= 1e-6
            start += n


def test_qwen2_5_windows_are_attention_windows(towers):
    """The layout carries each frame's windows; window blocks attend per window before pruning and
    with window groups after it, full-attention blocks per frame."""
    t, r1, r35 = towers["qwen2_5_vl"]
    pv, thw = qwen2vl_inputs([[1, 8, 8], [2, 4, 8]], in_dim=patch_dim("qwen2_5_vl"))
    prep = r35.adapter.prepare(pv, grid_thw=thw)
    assert prep.layout.lengths == (64, 32, 32)
    assert prep.layout.windows == ((16, 16, 16, 16), (16, 16), (16, 16))
    spec = r35.adapter.spec
    assert spec.windowed_blocks == tuple(i for i in range(4) if i not in t.fullatt_block_indexes)
    g = r35.graph_for(prep.layout)
    cores = {n.meta["ipcv"]["block"]: n for n in g.graph_module.graph.nodes if n.target is ipcv_ops.segment_attention}
    assert len(cores[0].kwargs["q_lengths"]) == 8  # block 0 (windowed, before pruning): per window
    assert cores[1].args[5] is None  # block 1 (full attention): per frame, no groups
    assert cores[2].args[5] is not None  # block 2 (windowed, pruned): per frame with window groups
    with torch.no_grad():
        eager = ipcv_adapters.run_eager(t, TINY_IPCV, pv, grid_thw=thw)[0]
        assert _rel(r35(pv, grid_thw=thw).pooler_output, eager.pooler_output) <= 1e-5


# ------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("name,depth,expect", [
    ("qwen2_5_vl", 2, (1, 1)), ("qwen3_vl", 4, (3, 1)), ("clip", 12, (3, 7)), ("internvl", 4, (3, 1)),
    ("internvl", 12, (7, 3)), ("siglip", 3, (2, 1)),
])
def test_rewrite_with_no_other_argument_uses_the_towers_defaults_clipped(name, depth, expect):
    t = tiny_tower(name, depth=depth)
    rt = ipcv_compile.rewrite(t, retain=0.35)
    assert (rt.ipcv_config.prune_layer, rt.ipcv_config.as_depth) == expect
    args, kw = tower_inputs(name, batch=1, seed=5)
    with torch.no_grad():
        out = rt(*args, **kw).last_hidden_state
        eager = ipcv_adapters.run_eager(t, IPCVConfig(retain=0.35), *args, **kw)[0]
    assert _rel(out, eager.last_hidden_state) <= 1e-5
    assert f"l_p={expect[0]} Δ={expect[1]}" in rt.summary()


# ------------------------------------------------------------------------------------- VLMs
def _cases(name):
    if name in PACKED:
        return {"one image": dict(images=[(1, 8, 8)]), "two images": dict(images=[(1, 8, 8), (1, 4, 8)]),
                "video": dict(images=[], video=(2, 8, 8))}
    if name == "internvl":
        return {"one image": dict(images=[1]), "two images": dict(images=[1, 1])}
    if name == "llava":
        return {"one image": dict(images=[1]), "two images": dict(images=[1, 1])}
    return {"one image": dict(images=[(100, 60)]), "two images": dict(images=[(100, 60), (56, 112)])}


@pytest.mark.parametrize("name", [n for n in VLMS if n not in ("qwen2_vl", "internvl")])  # those: test_e2e_generate
def test_generate_unchanged_at_retain_one_and_runs_pruned(name):
    model = tiny_vlm(name)
    attr = VLMS[name]
    original = getattr(model.model, attr)
    exact = ipcv_compile.rewrite(original, TINY_IPCV.replace(retain=1.0))
    pruned = exact.with_config(retain=0.35)
    for case, spec in _cases(name).items():
        kw = vlm_generate_inputs(model, name, spec["images"], seed=7, video=spec.get("video"))
        with torch.no_grad():
            ref = model.generate(**kw)
            try:
                setattr(model.model, attr, exact)
                out = model.generate(**kw)
                setattr(model.model, attr, pruned)
                out_p = model.generate(**kw)
            finally:
                setattr(model.model, attr, original)
        assert torch.equal(out, ref), f"{name} {case}: generated ids differ at retain 1.0"
        assert out_p.shape[0] == 1 and out_p.shape[1] > kw["input_ids"].shape[1], f"{name} {case}: no tokens generated"


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", NEW_PACKED)
def test_onnx_export_of_one_layout(towers, name, tmp_path):
    _, _, r35 = towers[name]
    pv, thw = qwen2vl_inputs([[1, 8, 8], [1, 4, 8]], seed=8, in_dim=patch_dim(name))
    mod = TowerForExport(r35, (pv,), {"grid_thw": thw})
    with torch.no_grad():
        ref = mod(pv)
    with torch.no_grad():
        eager = r35(pv, grid_thw=thw)
    deep = list(getattr(eager, "deepstack_features", None) or [])
    assert len(ref) == 2 + len(deep) and (name != "qwen3_vl" or deep)  # Qwen3-VL: its deepstack features too
    assert torch.equal(ref[1], eager.pooler_output) and all(torch.equal(a, b) for a, b in zip(ref[2:], deep))
    lw = ipcv_compile.lower(mod, "onnx", (pv,), dynamic=False, path=str(tmp_path / f"{name}.onnx"))
    got = lw(pv, grid_thw=thw)  # the file is for this layout; the loader checks it at every call
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert _rel(g, r) <= 1e-4
    with pytest.raises(ValueError, match="exported for grid_thw"):
        lw(pv, grid_thw=torch.tensor([[1, 4, 8], [1, 8, 8]]))


def test_onnx_export_of_qwen3vl_with_stratified_selection(tmp_path):
    """Qwen3-VL's file holds its position-interpolation tables as constants, and the stratified
    selection's patch-grid tables are lifted by a second export: the two sets must not share names
    (torch names both ``lifted_tensor_N``; ONNX failed with "lifted_tensor_1 is not a buffer")."""
    t = tiny_tower("qwen3_vl")
    rt = ipcv_compile.rewrite(t, TINY_IPCV.replace(selection="stratified"))
    pv, thw = qwen2vl_inputs([[1, 6, 6], [3, 4, 4]], seed=1, in_dim=patch_dim("qwen3_vl"))
    mod = TowerForExport(rt, (pv,), {"grid_thw": thw})
    with torch.no_grad():
        ref = mod(pv)
    lw = ipcv_compile.lower(mod, "onnx", (pv,), dynamic=False, path=str(tmp_path / "qwen3_vl_stratified.onnx"))
    got = lw(pv, grid_thw=thw)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert _rel(g, r) <= 1e-4
