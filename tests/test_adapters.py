"""ipcv_adapters: rewritten towers vs the original HF towers (r = 1) and vs ipcv_core's eager driver
run through the adapters' branches (r < 1), on tiny random-weight towers built from configs."""

import copy
import threading

import pytest
import torch
from torch import nn

import ipcv_adapters
import ipcv_compile
import ipcv_core
from ipcv_adapters.testing import TINY_IPCV, TOWERS, qwen2vl_inputs, tiny_tower, tower_inputs

CFG = TINY_IPCV  # retain 0.35, l_p 1, Δ 2, k 4 on 4-block towers


def _out(o):
    return o.last_hidden_state, o.pooler_output


def _max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def _rel(a, b):
    return _max_abs(a, b) / max(b.float().abs().max().item(), 1e-12)


@pytest.fixture(scope="module")
def towers():
    return {name: tiny_tower(name) for name in TOWERS}


@pytest.fixture(scope="module")
def rewritten(towers):
    """name -> (rewritten at r = 1, rewritten at r = 0.35); one capture per tower."""
    out = {}
    for name, t in towers.items():
        r1 = ipcv_compile.rewrite(t, CFG.replace(retain=1.0))
        out[name] = (r1, r1.with_config(retain=CFG.retain))
    return out


# ------------------------------------------------------------------------------------- all towers
@pytest.mark.parametrize("name", TOWERS)
def test_retain_one_equals_hf_tower(name, towers, rewritten):
    t = towers[name]
    args, kwargs = tower_inputs(name, batch=2, seed=1)
    with torch.no_grad():
        ref = t(*args, **kwargs)
        out = rewritten[name][0](*args, **kwargs)
    assert type(out) is type(ref)
    for a, b in zip(_out(out), _out(ref)):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _max_abs(a, b) <= 1e-6


@pytest.mark.parametrize("name", TOWERS)
def test_pruned_equals_eager_driver(name, towers, rewritten):
    t = towers[name]
    args, kwargs = tower_inputs(name, batch=2, seed=2)
    with torch.no_grad():
        ref = t(*args, **kwargs)
        out = rewritten[name][1](*args, **kwargs)
        eager, res = ipcv_adapters.run_eager(t, CFG, *args, **kwargs)
    assert res.rem_idx.shape[1] > 0  # tokens were removed
    for a, b, r in zip(_out(out), _out(eager), _out(ref)):
        if b is None:
            continue
        assert a.shape == r.shape  # same shape as the original tower's
        assert _rel(a, b) <= 1e-5
    assert _max_abs(out.last_hidden_state, ref.last_hidden_state) > 1e-4  # and it did prune


def test_one_graph_serves_batch_sizes_and_resolutions(towers, rewritten):
    t, rt = towers["dinov2"], rewritten["dinov2"][1]
    rewrites = rt.stats["rewrites"]
    for batch, size in [(1, 56), (3, 56), (2, 70)]:
        _, kw = tower_inputs("dinov2", batch=batch, seed=batch, size=size)
        with torch.no_grad():
            out = rt(**kw).last_hidden_state
            eager, _ = ipcv_adapters.run_eager(t, CFG, **kw)
        assert out.shape == (batch, 1 + (size // 14) ** 2, 64)
        assert _rel(out, eager.last_hidden_state) <= 1e-5
    assert rt.stats["rewrites"] == rewrites


# ------------------------------------------------------------------------------------- Qwen2-VL
def test_qwen2vl_images_do_not_leak(towers, rewritten):
    """3 images of different sizes packed at r = 0.35: each image's rows (pre-merger and merged) equal
    its output when run alone."""
    t, rt = towers["qwen2_vl"], rewritten["qwen2_vl"][1]
    grids = [[1, 8, 6], [1, 4, 4], [1, 6, 10]]
    pv, thw = qwen2vl_inputs(grids, seed=3)
    with torch.no_grad():
        both = rt(pv, grid_thw=thw)
        start = mstart = 0
        for g in grids:
            n = g[0] * g[1] * g[2]
            alone = rt(pv[start:start + n], grid_thw=torch.tensor([g]))
            assert torch.allclose(both.last_hidden_state[start:start + n], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
            assert torch.allclose(both.pooler_output[mstart:mstart + n // 4], alone.pooler_output, atol=1e-5, rtol=1e-5)
            start, mstart = start + n, mstart + n // 4
        assert start == pv.shape[0] and mstart == both.pooler_output.shape[0]


def test_qwen2vl_video_segments_are_frames(towers, rewritten):
    t, rt = towers["qwen2_vl"], rewritten["qwen2_vl"][1]
    pv, thw = qwen2vl_inputs([[1, 4, 6], [3, 4, 4]], seed=4)  # an image and a 3-frame video
    prep = rt.adapter.prepare(pv, grid_thw=thw)
    assert prep.layout.lengths == (24, 16, 16, 16)
    with torch.no_grad():
        out = rt(pv, grid_thw=thw)
        ref = t(pv, grid_thw=thw)
        eager, res = ipcv_adapters.run_eager(t, CFG, pv, grid_thw=thw)
    assert [s.keep for s in res.plan.segments] == [9, 6, 6, 6]  # ceil(0.35 * n) per frame
    assert out.pooler_output.shape == ref.pooler_output.shape == (6 + 12, 96)
    assert _rel(out.last_hidden_state, eager.last_hidden_state) <= 1e-5
    assert _rel(out.pooler_output, eager.pooler_output) <= 1e-5


def test_qwen2vl_new_layout_gets_a_new_graph(towers, rewritten):
    """Same token count, different segmentation: a stale graph would keep the wrong per-segment K."""
    t, rt = towers["qwen2_vl"], rewritten["qwen2_vl"][1]
    layouts = [[[1, 4, 8], [1, 4, 4]], [[1, 4, 4], [1, 4, 8]], [[1, 8, 6]], [[2, 4, 6]], [[3, 4, 4]]]  # all 48 patches
    for grids in layouts + layouts[:1]:
        pv, thw = qwen2vl_inputs(grids, seed=5)
        with torch.no_grad():
            out = rt(pv, grid_thw=thw)
            eager, _ = ipcv_adapters.run_eager(t, CFG, pv, grid_thw=thw)
        assert _rel(out.last_hidden_state, eager.last_hidden_state) <= 1e-5
        assert _rel(out.pooler_output, eager.pooler_output) <= 1e-5
    lengths = {lay.lengths for lay in rt.cached_layouts}
    assert {(32, 16), (16, 32), (48,), (24, 24), (16, 16, 16)} <= lengths


def test_qwen2vl_cache_is_bounded_and_thread_safe(towers, rewritten):
    t, rt = towers["qwen2_vl"], rewritten["qwen2_vl"][1]
    small = ipcv_adapters.IPCVTower(t, rt.adapter, CFG, cache_size=2, captured=rt._captured)
    grids = [[[1, 4, 4]], [[1, 4, 6]], [[1, 6, 6]]]
    inputs = [qwen2vl_inputs(g, seed=6) for g in grids]
    with torch.no_grad():
        expected = [t_ for t_ in (small(pv, grid_thw=thw).pooler_output for pv, thw in inputs)]
    assert len(small.cached_layouts) == 2
    results, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(2):
                    pv, thw = inputs[i % 3]
                    results.setdefault(i, []).append(small(pv, grid_thw=thw).pooler_output)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, outs in results.items():
        for o in outs:
            assert torch.equal(o, expected[i % 3])
    assert len(small.cached_layouts) == 2


# ------------------------------------------------------------------------------------- InternVL
def test_internvl_tiles_independent_and_cls_kept(towers, rewritten):
    t, rt = towers["internvl"], rewritten["internvl"][1]
    _, kw = tower_inputs("internvl", batch=3, seed=7)
    x = kw["pixel_values"]
    with torch.no_grad():
        out = rt(pixel_values=x).last_hidden_state
        eager, res = ipcv_adapters.run_eager(t, CFG, pixel_values=x)
        for i in range(3):
            alone = rt(pixel_values=x[i:i + 1]).last_hidden_state
            assert torch.allclose(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert (res.keep_idx[:, 0] == 0).all()  # CLS kept, first
    assert not (res.rem_idx == 0).any()  # and never removed
    assert res.keep_idx.shape[1] == 1 + 6  # ceil(0.35 * 16) patches per tile + CLS
    assert out.shape == (3, 17, 64)
    assert _rel(out[:, 0], eager.last_hidden_state[:, 0]) <= 1e-5  # CLS row at index 0 of each tile


# ------------------------------------------------------------------------------------- bf16, API
def test_bf16_through_the_rewritten_graph():
    """A bf16 tower is captured in bf16 (no cast needed); bf16 inputs give bf16 outputs."""
    t = tiny_tower("clip", dtype=torch.bfloat16)
    _, kw = tower_inputs("clip", batch=2, seed=8, dtype=torch.bfloat16)
    cfg = CFG.replace(retain=0.5)
    rt = ipcv_compile.rewrite(t, cfg)
    with torch.no_grad():
        ref = t(**kw)
        out = rt(**kw)
        eager, _ = ipcv_adapters.run_eager(t, cfg, **kw)
    for a, b in zip(_out(out), _out(ref)):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    assert _rel(out.last_hidden_state, eager.last_hidden_state) <= 1e-2  # bf16 rounding
    assert _rel(out.pooler_output, eager.pooler_output) <= 1e-2


def test_eager_attention_tower_is_captured_with_sdpa():
    """A tower built with attn_implementation="eager" still gives one SDPA per block in the graph
    (the block-stack shells carry their own config copy); the user's tower keeps "eager"."""
    t = tiny_tower("siglip", depth=3, attn="eager")
    _, kw = tower_inputs("siglip", batch=2, seed=11)
    rt = ipcv_compile.rewrite(t, CFG.replace(retain=1.0))
    with torch.no_grad():
        ref, out = t(**kw), rt(**kw)
    assert t.config._attn_implementation == "eager"
    assert _max_abs(out.last_hidden_state, ref.last_hidden_state) <= 1e-6
    assert _max_abs(out.pooler_output, ref.pooler_output) <= 1e-6


def test_original_tower_is_untouched(towers, rewritten):
    t = towers["qwen2_vl"]
    assert t.config._attn_implementation == "sdpa"
    assert all(b.attn.config is t.config for b in t.blocks)
    rt = rewritten["qwen2_vl"][0]
    assert rt.spatial_merge_size == t.spatial_merge_size and rt.dtype == t.dtype and rt.config is t.config
    # the rewritten tower's parameter tree is the original's: same names (no "tower." prefix), same
    # tensors, no duplicated weights (issue 14: VLM save_pretrained / from_pretrained round-trip)
    assert dict(rt.named_parameters()).keys() == dict(t.named_parameters()).keys()
    assert all(a is b for a, b in zip(rt.parameters(), t.parameters()))


def test_output_flags(towers, rewritten):
    t, rt = towers["internvl"], rewritten["internvl"][0]
    _, kw = tower_inputs("internvl", batch=1, seed=9)
    with torch.no_grad():
        ref = t(**kw, output_hidden_states=-1, return_dict=True)
        out = rt(**kw, output_hidden_states=-1, return_dict=True)
        tup = rt(**kw, return_dict=False)
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert _max_abs(out.hidden_states[-1], ref.hidden_states[-1]) <= 1e-6
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)
    with torch.no_grad():  # every hidden state: at retain 1.0 the original tower's
        every, ref_every = rt(**kw, output_hidden_states=True), t(**kw, output_hidden_states=True)
    assert len(every.hidden_states) == len(ref_every.hidden_states) == rt.adapter.depth + 1
    for a, b in zip(every.hidden_states, ref_every.hidden_states):
        assert _max_abs(a, b) <= 1e-6
    with pytest.raises(NotImplementedError, match="output_attentions"):
        rt(**kw, output_attentions=True)
    with pytest.raises(TypeError, match="unsupported keyword"):
        rt(**kw, something_else=1)


def test_unsupported_tower_error_lists_supported_and_how_to_add():
    with pytest.raises(ipcv_adapters.UnsupportedTowerError) as ei:
        ipcv_compile.rewrite(nn.Linear(4, 4), retain=0.5)
    msg = str(ei.value)
    assert "Qwen2VisionTransformerPretrainedModel" in msg and "InternVLVisionModel" in msg and "CLIPVisionModel" in msg
    assert "register_adapter" in msg and "TowerAdapter" in msg

    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.visual = tiny_tower("qwen2_vl", depth=2)

    with pytest.raises(ipcv_adapters.UnsupportedTowerError, match=r"model\.visual"):
        ipcv_compile.rewrite(VLM(), retain=0.5)


def test_depth_is_validated_before_capture():
    """Defaults are clipped to the depth; an explicit value that does not fit raises, naming it."""
    with pytest.raises(ValueError, match="prune_layer"):
        ipcv_compile.rewrite(tiny_tower("clip", depth=2), retain=0.5, prune_layer=3)
    with pytest.raises(ValueError, match="as_depth"):
        ipcv_compile.rewrite(tiny_tower("clip", depth=4), retain=0.5, prune_layer=3, as_depth=2)


def test_deepcopy_of_rewritten_tower(towers, rewritten):
    rt = rewritten["clip"][1]
    cp = copy.deepcopy(rt)
    _, kw = tower_inputs("clip", batch=2, seed=10)
    with torch.no_grad():
        assert torch.equal(cp(**kw).last_hidden_state, rt(**kw).last_hidden_state)


GRID_VARIANT = dict(selection="stratified", reconstruction="spatial", weighting="similarity", k=3)


@pytest.mark.parametrize("name", ["qwen2_vl", "internvl", "dinov2"])
def test_grid_aware_variant_equals_eager_driver(name, towers, rewritten):
    """Stratified selection + spatial neighbours need each adapter's patch grid (and Qwen2-VL's
    2x2 window token order); the rewritten graph must equal the eager driver."""
    t = towers[name]
    cfg = CFG.replace(**GRID_VARIANT)
    tw = rewritten[name][1].with_config(cfg)
    args, kwargs = tower_inputs(name, seed=5)
    prep = tw.adapter.prepare(*args, **kwargs)
    assert prep.layout.grids is not None
    if name == "qwen2_vl":
        assert prep.layout.merge == t.spatial_merge_size
    with torch.no_grad():
        got = tw(*args, **kwargs)
    ref, res = ipcv_adapters.run_eager(t, cfg, *args, **kwargs)
    assert _rel(got.last_hidden_state, ref.last_hidden_state) <= 1e-5
    # the paper's selection keeps a different set on the same input
    assert not torch.equal(ipcv_adapters.run_eager(t, CFG, *args, **kwargs)[1].keep_idx, res.keep_idx)


@pytest.mark.parametrize("name", TOWERS)
def test_gradual_bipartite_merge_equals_eager_driver(name, towers, rewritten):
    """ToMe-style gradual merging (bipartite matching on the keys the attention core sees, sizes
    accumulated, proportional attention) through each adapter: graph == eager driver, whose
    ``key_features`` applies rotary at the rows' positions for Qwen2-VL."""
    t = towers[name]
    depth = rewritten[name][1].adapter.depth
    cfg = CFG.replace(retain=0.4, stages=ipcv_core.gradual_stages(0.4, 1, depth - 1), prune_layer=depth - 1,
                      as_depth=0, selection="bipartite", merge="average", k=2)
    tw = rewritten[name][1].with_config(cfg)
    args, kwargs = tower_inputs(name, batch=2, seed=6)
    with torch.no_grad():
        got = tw(*args, **kwargs)
        ref, res = ipcv_adapters.run_eager(t, cfg, *args, **kwargs)
    assert len(res.stages) == depth - 1
    assert _rel(got.last_hidden_state, ref.last_hidden_state) <= 1e-5
