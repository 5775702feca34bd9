"""Issue 14 — nothing silently wrong: each of the issue's items 1-12 as a test that failed before and
passes now (or pins a documented behaviour), plus a table of bad inputs / bad configs and what they
must give.  Tiny config-only towers; exports are shared through module fixtures to stay fast."""

import copy
import io
import json
import os
import warnings

import pytest
import torch
from torch import nn

import ipcv_adapters
import ipcv_compile
from ipcv_adapters.export import TowerForExport
from ipcv_adapters.testing import (TINY_IPCV, patch_dim, qwen2vl_inputs, tiny_internvl_vlm, tiny_qwen2vl_vlm,
                                   tiny_tower, tower_inputs)
from ipcv_compile import lower
from ipcv_compile.backends.artifacts import load_artifact
from ipcv_core import IPCVConfig

pytest.importorskip("transformers")

CFG = TINY_IPCV  # retain 0.35, l_p 1, Δ 2, k 4 on 4-block towers
BATCHED = ("internvl", "dinov2", "siglip", "clip")


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _outs(o):
    return [t for t in (o.last_hidden_state, getattr(o, "pooler_output", None)) if t is not None]


@pytest.fixture(scope="module")
def towers():
    return {n: tiny_tower(n) for n in ("qwen2_vl", *BATCHED)}


@pytest.fixture(scope="module")
def rewritten(towers):
    return {n: ipcv_compile.rewrite(t, CFG) for n, t in towers.items()}


# ----------------------------------------------------------------------------- 1. save / load
@pytest.mark.parametrize("kind", ["qwen2_vl", "internvl"])
def test_1_vlm_save_pretrained_round_trips_the_tower(kind, tmp_path):
    """The rewritten tower's state_dict keys are the original's: a VLM saved after the rewrite
    reloads with its own vision weights (before: model.visual.tower.* keys, a random tower on load);
    rewriting again after the load is one call."""
    if kind == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as Cls

        m, path = tiny_qwen2vl_vlm(), "visual"
    else:
        from transformers import InternVLForConditionalGeneration as Cls

        m, path = tiny_internvl_vlm(), "vision_tower"
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tower = getattr(m.model, path)
    rt = ipcv_compile.rewrite(tower, CFG)
    assert rt.state_dict().keys() == tower.state_dict().keys()
    setattr(m.model, path, rt)
    assert m.state_dict().keys() == before.keys()
    m.save_pretrained(tmp_path)
    m2 = Cls.from_pretrained(tmp_path)
    after = m2.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    t2 = getattr(m2.model, path)
    assert type(t2) is type(tower)  # a plain HF tower: rewrite it again (one call)
    rt2 = ipcv_compile.rewrite(t2, CFG)
    args, kw = tower_inputs(kind, batch=2, seed=3)
    with torch.no_grad():
        assert torch.equal(rt2(*args, **kw).last_hidden_state, rt(*args, **kw).last_hidden_state)
    # and the rewritten tower loads a state dict by the original's keys, into the same tensors
    rt.load_state_dict(tower.state_dict())


# ----------------------------------------------------------------------------- 2. modules changed after the rewrite
def test_2_changed_parameters_and_modules_are_followed():
    """The graph reads the tower's live tensors: a .data copy and a reassigned Parameter are used
    without capturing again; a replaced submodule (another Linear, a LoRA-style wrapper) is detected
    at the next call, named in a warning, and captured again — every result equals the eager driver
    on the changed tower (before: the graph silently kept the old parameters)."""
    t = tiny_tower("dinov2")
    rt = ipcv_compile.rewrite(t, CFG)
    _, kw = tower_inputs("dinov2", batch=2, seed=3)

    def check(expect_warning=None):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with torch.no_grad():
                got = rt(**kw).last_hidden_state
                want = ipcv_adapters.run_eager(t, CFG, **kw)[0].last_hidden_state
        msgs = [str(x.message) for x in w if "ipcv" in str(x.message)]
        assert _rel(got, want) <= 1e-5
        if expect_warning is None:
            assert not msgs, msgs
        else:
            assert any(expect_warning in m and "capturing it again" in m for m in msgs), msgs
        return got

    base = check()
    fc1 = t.encoder.layer[2].mlp.fc1
    with torch.no_grad():
        fc1.weight.data.mul_(3.0)  # in place: the same tensor
    assert not torch.equal(check(), base) and rt.stats["captures"] == 1
    fc1.weight = nn.Parameter(torch.randn_like(fc1.weight))  # a new Parameter object, same shape
    check()
    assert rt.stats["captures"] == 1
    t.encoder.layer[2].mlp.fc1 = nn.Linear(fc1.in_features, fc1.out_features)
    check("encoder.layer.2.mlp.fc1 was replaced")
    assert rt.stats["captures"] == 2

    class LoRA(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora_A = base, nn.Linear(base.in_features, 2, bias=False)
            self.lora_B = nn.Linear(2, base.out_features, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    q = t.encoder.layer[1].attention.q_proj
    t.encoder.layer[1].attention.q_proj = LoRA(q)
    check("encoder.layer.1.attention.q_proj was replaced (Linear -> LoRA)")
    check()  # no second capture


# ----------------------------------------------------------------------------- 3. packed exports carry their layout
@pytest.fixture(scope="module")
def qwen_files(rewritten, tmp_path_factory):
    rt = rewritten["qwen2_vl"]
    d = tmp_path_factory.mktemp("qwen")
    pv, thw = qwen2vl_inputs([[1, 4, 6], [1, 4, 4]], seed=0)
    mod = TowerForExport(rt, (pv,), {"grid_thw": thw})
    out = {}
    for fmt in ("onnx", "pt2"):
        lower(mod, fmt, (pv,), path=str(d / f"q.{fmt}"), dynamic=False)
        out[fmt] = str(d / f"q.{fmt}")
    return rt, out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_3_packed_file_records_and_checks_its_layout(qwen_files, fmt):
    """A Qwen2-VL file exported for grid_thw [[1,4,6],[1,4,4]] records it in its own metadata; the
    project's loader runs it for that layout and refuses every other one with the same patch count
    (before: swapped order, [[1,2,20]], even [[1,8,5]] ran and returned wrong numbers)."""
    rt, files = qwen_files
    m = load_artifact(files[fmt])
    assert m.metadata["fixed_inputs"] == {"grid_thw": [[1, 4, 6], [1, 4, 4]]}
    assert m.metadata["layout"]["segment_lengths"] == [24, 16]
    pv, thw = qwen2vl_inputs([[1, 4, 6], [1, 4, 4]], seed=4)
    with torch.no_grad():
        ref = rt(pv, grid_thw=thw)
        last, pooled = m(pv, grid_thw=thw)
    assert _rel(last, ref.last_hidden_state) <= 1e-4 and _rel(pooled, ref.pooler_output) <= 1e-4
    for other in ([[1, 4, 4], [1, 4, 6]], [[1, 2, 20]], [[1, 8, 5]]):
        with pytest.raises(ValueError, match=r"exported for grid_thw=\[\[1, 4, 6\], \[1, 4, 4\]\].*" + 
                           str(other).replace("[", r"\[").replace("]", r"\]")):
            m(pv, grid_thw=torch.tensor(other))
    with pytest.raises(TypeError, match="pass grid_thw"):
        m(pv)
    if fmt == "onnx":  # the file alone: the metadata is in the ONNX model itself
        import onnx

        props = {p.key: p.value for p in onnx.load(files[fmt], load_external_data=False).metadata_props}
        assert json.loads(props["ipcv"])["fixed_inputs"]["grid_thw"] == [[1, 4, 6], [1, 4, 4]]


# ----------------------------------------------------------------------------- 4 / 10. the CLI
def test_4_cli_siglip_and_clip_inspect_and_trt_check(capsys):
    """README lists tiny:siglip / tiny:clip: inspect and trt-check run (before: a traceback, a 70 px
    example on 56 px towers); inspect prints row counts as numbers for the example (item 11)."""
    from ipcv_adapters.app.cli import main

    for model in ("tiny:siglip", "tiny:clip"):
        assert main(["inspect", model]) == 0
        out = capsys.readouterr().out
        table = out.split("rows for this input (")[1].split("after last block")[0].splitlines()[2:]
        assert len(table) == 4  # one line per block, every count a number (not "s87 - 1")
        assert all(c.strip().isdigit() for line in table for c in line.split("|")[2:]), table
        assert main(["trt-check", model]) == 0
        capsys.readouterr()


def test_4_cli_export_siglip_native_size(tmp_path, capsys):
    from ipcv_adapters.app.cli import main

    out = tmp_path / "s.onnx"
    assert main(["export", "tiny:siglip", "--format", "onnx", "--out", str(out), "--quiet"]) == 0
    side = json.loads((tmp_path / "s.onnx.json").read_text())["ipcv_export"]
    assert side["dynamic_dims"] == {"pixel_values": {"0": "batch"}}  # honestly static image size (item 5)
    assert side["verified_on"] == [[2, 3, 56, 56], [1, 3, 56, 56]]


def test_10_cli_config_errors_exit_2(capsys, tmp_path):
    from ipcv_adapters.app.cli import main

    assert main(["inspect", "tiny:dinov2", "--prune-layer", "4"]) == 2
    err = capsys.readouterr().err
    assert "prune_layer" in err and "depth 4" in err and "Traceback" not in err
    assert main(["inspect", "tiny:dinov2", "--config", str(tmp_path / "missing.json")]) == 2
    assert "--config" in capsys.readouterr().err


def test_10_rewrite_api_errors():
    """The lead's fixes, verified: a number is retain, cache_size passes through, a second rewrite
    says so."""
    t = tiny_tower("clip", depth=3)
    rt = ipcv_compile.rewrite(t, 0.5, prune_layer=1, as_depth=1, k=2, cache_size=4)
    assert rt.ipcv_config.retain == 0.5 and rt.cache_size == 4
    with pytest.raises(ValueError, match="already IPCV-rewritten"):
        ipcv_compile.rewrite(rt, 0.5)


# ----------------------------------------------------------------------------- 5. native-size exports
@pytest.fixture(scope="module")
def dinov2_files(rewritten, tmp_path_factory):
    rt = rewritten["dinov2"]
    d = tmp_path_factory.mktemp("dinov2")
    out = {}
    for size in (56, 70):  # the native size, and another
        x = torch.randn(2, 3, size, size)
        for fmt in ("onnx", "pt2"):
            p = str(d / f"d{size}.{fmt}")
            out[size, fmt] = (p, lower(TowerForExport(rt, (x,)), fmt, (x,), path=p))
    return rt, out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("size", [56, 70])
def test_5_exports_serve_the_sizes_they_declare(dinov2_files, size, fmt):
    """Exported at the native size (56 px) or another (70 px), a DINOv2 file declares batch, height
    and width dynamic and serves them all, the native size included (before: a native-size file
    failed at any other size; a 70 px pt2 refused 56 px)."""
    rt, files = dinov2_files
    path, lw = files[size, fmt]
    assert lw.dynamic_dims == {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    m = load_artifact(path)
    for b, h, w in ((1, 56, 56), (3, 70, 70), (2, 84, 56)):
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = rt(pixel_values=x)
        got = m(x)
        for g, r in zip(got, _outs(ref)):
            assert g.shape == r.shape and _rel(g, r) <= 1e-4


def test_5_fixed_size_tower_is_honestly_static(rewritten, tmp_path):
    """SigLIP without interpolate_pos_encoding serves its native size only: the file says so
    (batch dynamic, image size static) and refuses another size itself."""
    x = torch.randn(2, 3, 56, 56)
    mod = TowerForExport(rewritten["siglip"], (x,))
    assert not mod.sizes_dynamic
    lw = lower(mod, "pt2", (x,), path=str(tmp_path / "s.pt2"))
    assert lw.dynamic_dims == {"pixel_values": {0: "batch"}}
    m = load_artifact(str(tmp_path / "s.pt2"))
    assert m(torch.randn(3, 3, 56, 56))[0].shape == (3, 16, 64)
    with pytest.raises(Exception):
        m(torch.randn(1, 3, 70, 70))


# ----------------------------------------------------------------------------- 6. one-patch images
@pytest.mark.parametrize("name", BATCHED)
def test_6_one_patch_image(name, towers, rewritten):
    """A 14 px image (one patch) keeps its only patch (K = ceil(r * 1) = 1: no pruning for it) and
    equals the original tower (before: Guard failed: hidden_states.size()[1] >= 3)."""
    kw = {"pixel_values": torch.randn(2, 3, 14, 14)}
    if name in ("siglip", "clip"):
        kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        got, ref = rewritten[name](**kw), towers[name](**kw)
    for g, r in zip(_outs(got), _outs(ref)):
        assert torch.equal(g, r)


# ----------------------------------------------------------------------------- 7. NaN / inf images
def _nan_call(rt, name, value):
    args, kw = tower_inputs(name, batch=3, seed=5)
    if name == "qwen2_vl":  # entries [1,4,6], [2,4,4], [1,6,4]: rows 24..55 are the video
        bad = args[0].clone()
        bad[30, 3] = value
        return (args, kw), ((bad,), kw), (slice(24, 40), [slice(0, 24), slice(40, 56), slice(56, 80)])
    x = kw["pixel_values"].clone()
    x[1, 0, 5, 5] = value
    return (args, kw), (args, {"pixel_values": x}), (1, [0, 2])


@pytest.mark.parametrize("name", ["qwen2_vl", *BATCHED])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_7_nan_image_is_nan_and_the_others_unchanged(name, value, towers, rewritten):
    """The NaN rule (README): an image with a NaN / inf value gets NaN outputs, every other image's
    output is bit-identical to the clean call's — in the rewritten graph and in the eager driver —
    and the tower warns naming the image (before: the whole batch raised 'scores contain NaN')."""
    rt, t = rewritten[name], towers[name]
    (a0, k0), (a1, k1), (bad, good) = _nan_call(rt, name, value)
    with torch.no_grad():
        clean = rt(*a0, **k0).last_hidden_state
        with pytest.warns(UserWarning, match=r"\[1\] hold non-finite values"):
            dirty = rt(*a1, **k1).last_hidden_state
        e_clean = ipcv_adapters.run_eager(t, CFG, *a0, **k0)[0].last_hidden_state
        e_dirty = ipcv_adapters.run_eager(t, CFG, *a1, **k1)[0].last_hidden_state
    for out, ref in ((dirty, clean), (e_dirty, e_clean)):
        assert torch.isnan(out[bad]).all()
        for g in good:
            assert torch.equal(out[g], ref[g])


def test_7_nan_rule_in_onnx_and_inductor(rewritten, tmp_path):
    """The same rule through the lowered backends (ONNX file of the whole DINOv2 tower; inductor on
    the synthetic ViT's rewritten graph — one small compile)."""
    from ipcv_core import SegmentLayout
    from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs

    rt = rewritten["dinov2"]
    x = torch.randn(3, 3, 56, 56)
    lw = lower(TowerForExport(rt, (x,)), "onnx", (x,), path=str(tmp_path / "d.onnx"))
    clean = lw(x)[0]
    x[1, 0, 3, 3] = float("nan")
    dirty = lw(x)[0]
    assert torch.isnan(dirty[1]).all() and torch.equal(dirty[[0, 2]], clean[[0, 2]])

    spec = ViTSpec(depth=3, dim=16, heads=2)
    torch.manual_seed(0)
    vit = SyntheticViT(spec).eval()
    (h, *_) = make_inputs(spec, [(4, 4)], 1, batch=3, packed=False, seed=1)
    gm = ipcv_compile.capture(vit, (h,))
    rm = ipcv_compile.rewrite_graph(gm, IPCVConfig(retain=0.5, prune_layer=1, as_depth=1, k=3),
                                    ipcv_compile.LocateSpec(blocks="blocks", attention="attn", ffn="mlp"),
                                    SegmentLayout.batched(protected=1))
    ind = lower(rm, "inductor", (h,))
    clean = ind(h)
    h2 = h.clone()
    h2[1, 4, 0] = float("inf")
    dirty = ind(h2)
    assert torch.isnan(dirty[1]).all() and torch.equal(dirty[[0, 2]], clean[[0, 2]])


# ----------------------------------------------------------------------------- 8. grid-aware configs export
def test_8_grid_aware_config_exports_for_one_image_size(towers, tmp_path, capsys):
    """A tuned config that needs the patch grid (stratified selection, spatial neighbours) exports:
    the file is for the example's image size and says so (before: LoweringError 'give
    SegmentLayout(grids=...)'); ``ipcv export --config`` reads such a config."""
    # (spatial neighbours tie exactly on the grid, and PyTorch / ONNX Runtime break TopK ties differently —
    # README, "Method conventions" — so the file is compared on stratified selection + feature neighbours)
    cfg = CFG.replace(selection="stratified", weighting="similarity", k=3)
    rt = ipcv_compile.rewrite(towers["internvl"], cfg)
    with pytest.raises(ValueError, match="needs the patch grid.*give example"):
        TowerForExport(rt)
    x = torch.randn(2, 3, 56, 56)
    mod = TowerForExport(rt, (x,))
    lw = lower(mod, "onnx", (x,), path=str(tmp_path / "g.onnx"))
    assert lw.dynamic_dims == {"pixel_values": {0: "batch"}}
    x2 = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ref = ipcv_adapters.run_eager(towers["internvl"], cfg, pixel_values=x2)[0].last_hidden_state
        assert _rel(rt(pixel_values=x2).last_hidden_state, ref) <= 1e-5
    assert _rel(lw(x2)[0], ref) <= 1e-4
    assert lw.module.metadata["layout"]["grids"] == [[4, 4]]
    from ipcv_adapters.app.cli import main

    (tmp_path / "tuned.json").write_text(cfg.to_json())
    assert main(["inspect", "tiny:internvl", "--config", str(tmp_path / "tuned.json")]) == 0
    assert "IPCV rewrite: retain=0.35" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 9. casting after the rewrite
@pytest.mark.parametrize("name", ["qwen2_vl", "internvl", "dinov2"])
def test_9_cast_after_rewrite(name):
    """.to(bfloat16) after the rewrite: the next call notices (a warning saying to rewrite after
    .to()), captures again in bf16 and returns what the eager driver returns on the bf16 tower
    (before: 'Tensor dtype mismatch' on Qwen2-VL / InternVL, silently mixed dtypes on DINOv2)."""
    t = tiny_tower(name)
    rt = ipcv_compile.rewrite(t, CFG)
    rt.to(torch.bfloat16)
    assert next(t.parameters()).dtype == torch.bfloat16  # .to() moved the original's own tensors
    args, kw = tower_inputs(name, batch=2, seed=2, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"is now bfloat16.*rewrite after"):
        with torch.no_grad():
            got = rt(*args, **kw)
    with torch.no_grad():
        want = ipcv_adapters.run_eager(t, CFG, *args, **kw)[0]
        orig = t(*args, **kw)
    for g, w, o in zip(_outs(got), _outs(want), _outs(orig)):
        assert g.dtype == o.dtype == torch.bfloat16
        assert _rel(g, w) <= 1e-2


@pytest.mark.parametrize("name", ["qwen2_vl", *BATCHED])
def test_9_bf16_pixels_into_an_fp32_rewrite_give_the_original_dtype(name, towers, rewritten):
    args, kw = tower_inputs(name, batch=2, seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        got, ref = rewritten[name](*args, **kw), towers[name](*args, **kw)
    for g, r in zip(_outs(got), _outs(ref)):
        assert g.dtype == r.dtype


# ----------------------------------------------------------------------------- 11. artifacts
@pytest.mark.parametrize("name", ["qwen2_vl", "dinov2"])
def test_11_torch_save_load_without_capture(name, towers, rewritten, monkeypatch):
    """torch.save(rewritten tower) works (before: a local lambda could not be pickled) and loads
    without capturing again (the capture travels as a weightless torch.export archive, bound to
    the loaded tower's tensors); the loaded tower gives the same outputs."""
    rt = rewritten[name]
    args, kw = tower_inputs(name, batch=2, seed=4)
    with torch.no_grad():
        ref = rt(*args, **kw)
    buf = io.BytesIO()
    torch.save(rt, buf)
    buf.seek(0)
    import ipcv_compile.api as api

    monkeypatch.setattr(api, "capture", lambda *a, **k: pytest.fail("captured again on load"))
    rt2 = torch.load(buf, weights_only=False)
    with torch.no_grad():
        got = rt2(*args, **kw)
    for g, r in zip(_outs(got), _outs(ref)):
        assert torch.equal(g, r)
    assert rt2.state_dict().keys() == rt.state_dict().keys()
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(rt2.parameters(), rt.parameters()))


def test_11_pt2_stores_each_weight_once_and_onnx_names_outputs(dinov2_files, qwen_files):
    """A pt2 / ONNX file holds each weight once (before: the block weights twice — lifted
    constants beside the parameters — 181 MB vs 89 MB); ONNX outputs are named
    last_hidden_state / pooler_output; dynamic dims have human names, in the file too."""
    import onnx

    rt, files = dinov2_files
    n_tower = sum(p.numel() for p in rt.parameters())
    ep = torch.export.load(files[56, "pt2"][0])
    assert sum(v.numel() for v in ep.state_dict.values()) == n_tower
    assert not [k for k, v in ep.constants.items() if isinstance(v, torch.Tensor) and v.numel() > 1]
    model = onnx.load(files[56, "onnx"][0])
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output"]
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert sum(int(torch.tensor(list(i.dims)).prod()) if i.dims else 1 for i in model.graph.initializer) <= n_tower + 64
    qrt, qfiles = qwen_files
    ep = torch.export.load(qfiles["pt2"])
    assert sum(v.numel() for v in ep.state_dict.values()) == sum(p.numel() for p in qrt.parameters())


# ----------------------------------------------------------------------------- 12. retain 1.0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen2_vl", *BATCHED])
def test_12_retain_one_is_bit_exact_for_sdpa_towers(name, dtype):
    """What README says holds: at retain 1.0 the rewritten tower equals the original bit for bit
    (SDPA towers, fp32 and bf16; before: Qwen2-VL 4.8e-7 / 7.8e-3 off)."""
    t = tiny_tower(name, dtype=dtype)
    rt = ipcv_compile.rewrite(t, CFG.replace(retain=1.0))
    args, kw = tower_inputs(name, batch=3, seed=6, dtype=dtype)
    with torch.no_grad():
        for g, r in zip(_outs(rt(*args, **kw)), _outs(t(*args, **kw))):
            assert torch.equal(g, r)


@pytest.mark.parametrize("name", ["qwen2_vl", "dinov2"])
def test_12_eager_attention_towers_equal_their_sdpa_selves(name):
    """A tower loaded with attn_implementation="eager" is run with SDPA inside the graph: at retain
    1.0 it equals the same weights under SDPA bit for bit, and differs from eager attention by the
    kernels' rounding only (README's bound: <= 1e-5 relative in fp32)."""
    t = tiny_tower(name, attn="eager")
    s = tiny_tower(name, attn="sdpa")  # the same seed: the same weights
    rt = ipcv_compile.rewrite(t, CFG.replace(retain=1.0))
    args, kw = tower_inputs(name, batch=2, seed=7)
    with torch.no_grad():
        for g, r, e in zip(_outs(rt(*args, **kw)), _outs(s(*args, **kw)), _outs(t(*args, **kw))):
            assert torch.equal(g, r)
            assert _rel(g, e) <= 1e-5


# ----------------------------------------------------------------------------- the bad-input table
def _expect(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


BAD = {
    "retain 0": (lambda t, rt: ipcv_compile.rewrite(t, 0.0), ValueError, r"retain must be a number in \(0, 1\]"),
    "retain 1.5": (lambda t, rt: ipcv_compile.rewrite(t, 1.5), ValueError, "retain"),
    "retain nan": (lambda t, rt: ipcv_compile.rewrite(t, float("nan")), ValueError, "retain"),
    "retain as text": (lambda t, rt: ipcv_compile.rewrite(t, "0.3"), TypeError, "IPCVConfig or a retain ratio"),
    "prune_layer past the depth": (lambda t, rt: ipcv_compile.rewrite(t, CFG.replace(prune_layer=4)), ValueError,
                                   r"prune_layer must be in \[1, depth-1\]"),
    "as_depth past the depth": (lambda t, rt: ipcv_compile.rewrite(t, CFG.replace(as_depth=4)), ValueError, "as_depth"),
    "cache_size 0": (lambda t, rt: ipcv_compile.rewrite(t, CFG, cache_size=0), ValueError, "cache_size"),
    "rewrite twice": (lambda t, rt: ipcv_compile.rewrite(rt, CFG), ValueError, "already IPCV-rewritten"),
    "output_attentions": (lambda t, rt: rt(**tower_inputs("dinov2")[1], output_attentions=True), NotImplementedError,
                          "output_attentions"),
    "unknown keyword": (lambda t, rt: rt(**tower_inputs("dinov2")[1], foo=1), TypeError, "unsupported keyword"),
    "grid-aware export without an example": (
        lambda t, rt: TowerForExport(rt.with_config(selection="stratified")), ValueError, "give example"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_and_calls_raise_saying_what(case, towers, rewritten):
    fn, exc, match = BAD[case]
    _expect(lambda: fn(towers["dinov2"], rewritten["dinov2"]), exc, match)


def test_bad_inputs_give_the_documented_behaviour(towers, rewritten):
    """The inputs of the issue: a NaN image (NaN for it, a warning naming it, the others unchanged —
    test_7), a one-patch image (no pruning for it — test_6), bf16 pixels (the original's dtype —
    test_9), a packed layout that does not match the pixels (a ValueError naming both counts), a
    non-square image (served, equal to the eager driver)."""
    rt, t = rewritten["qwen2_vl"], towers["qwen2_vl"]
    pv, thw = qwen2vl_inputs([[1, 4, 6]], seed=1)
    with pytest.raises(ValueError, match="describe 16 patches but hidden_states has 24"):
        rt(pv, grid_thw=torch.tensor([[1, 4, 4]]))
    x = torch.randn(2, 3, 28, 70)
    with torch.no_grad():
        got = rewritten["dinov2"](pixel_values=x).last_hidden_state
        ref = ipcv_adapters.run_eager(towers["dinov2"], CFG, pixel_values=x)[0].last_hidden_state
    assert got.shape == (2, 1 + 2 * 5, 64) and _rel(got, ref) <= 1e-5
