"""Every path a new user takes (issue 22, items 3-6), on tiny random-weight models: the CLI loads every
family from saved tower / VLM checkpoints, ``compress()`` on every VLM the adapters wire, LLaVA's feature
layer captured once, the shallow-defaults warning, packaging (LICENSE, SPDX, ``__version__``, ``import
ipcv``), the demo without weights, backend extras checked before capture, no torch FutureWarning."""

import importlib.metadata
import pathlib
import sys
import tomllib
import types
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import ipcv_adapters  # noqa: E402
import ipcv_compile  # noqa: E402
from ipcv_adapters import IPCVTower, ShallowDefaultsWarning, find_adapter  # noqa: E402
from ipcv_adapters.app.cli import main  # noqa: E402
from ipcv_adapters.llm import UnsupportedVLMError, installed, uninstall  # noqa: E402
from ipcv_adapters.testing import TINY_IPCV, TOWERS, VLMS, tiny_tower, tiny_vlm, tower_inputs, vlm_generate_inputs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tower_of(vlm):
    return vlm.model.visual if hasattr(vlm.model, "visual") else vlm.model.vision_tower


def _images(name):
    return {"internvl": [1, 2], "llava": [0, 0], "llava_onevision": [(56, 112)]}.get(name, [(1, 4, 6), (1, 4, 4)])


def _generate(model, kw):
    with torch.no_grad():
        out = model.generate(**kw, return_dict_in_generate=True)
    return out.sequences, out.cache


# --------------------------------------------------------------------------------------------- item 3: the CLI
def _save(kind, name, tmp_path):
    m = tiny_vlm(name) if kind == "vlm" else tiny_tower(name)
    path = tmp_path / f"{kind}-{name}"
    m.save_pretrained(path)
    return m, str(path)


@pytest.mark.parametrize("kind,name", [("tower", t) for t in TOWERS] + [("vlm", v) for v in VLMS])
def test_load_tower_from_every_saved_checkpoint(kind, name, tmp_path):
    """A saved tower or VLM checkpoint of every family loads through the adapter registry: the tower
    of the registered class, with the saved weights."""
    from ipcv_adapters.loading import load_tower

    m, path = _save(kind, name, tmp_path)
    want = m if kind == "tower" else _tower_of(m)
    tower, mt = load_tower(path)
    assert type(tower) is type(want) and mt == m.config.model_type
    find_adapter(tower)  # an adapter recognises it
    got, ref = tower.state_dict(), want.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("kind,name", [("vlm", v) for v in VLMS] + [("tower", t) for t in ("dinov2", "siglip", "clip")])
def test_cli_inspect_saved_checkpoint_of_every_family(kind, name, tmp_path, capsys):
    _, path = _save(kind, name, tmp_path)
    assert main(["inspect", path, "--retain", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "IPCV rewrite: retain=0.5" in out and "rows for this input" in out


def test_cli_export_saved_qwen3vl_checkpoint_pt2(tmp_path, capsys):
    """The acceptance path beyond inspect: a saved Qwen3-VL VLM exports (pt2 needs no extra) and
    verifies against the eager rewrite."""
    import json

    _, path = _save("vlm", "qwen3_vl", tmp_path)
    out = tmp_path / "q3.pt2"
    assert main(["export", path, "--format", "pt2", "--out", str(out), "--retain", "0.5", "--prune-layer", "1",
                 "--as-depth", "2", "--quiet"]) == 0
    side = json.loads((tmp_path / "q3.pt2.json").read_text())["ipcv_export"]
    assert side["adapter"] == "qwen3_vl" and side["verify_max_rel_error"] <= 1e-4


def test_tiny_names_cover_every_registered_adapter():
    """``tiny:<family>`` for every tower family (one list: the registry's classes, the testing module's
    configs), LLaVA / LLaVA-OneVision as the towers of their VLMs; both spellings of the Qwen names."""
    from ipcv_adapters.loading import TINY_MODELS, load_tower, tower_classes

    towers = {}
    for name in TINY_MODELS:
        t, kind = load_tower(f"tiny:{name}")
        assert kind == "tiny"
        towers[name] = type(t)
    assert set(towers.values()) == set(tower_classes())
    assert {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "internvl", "dinov2", "siglip", "clip", "llava",
            "llava-onevision"} <= set(TINY_MODELS)
    assert type(load_tower("tiny:qwen2_5_vl")[0]) is towers["qwen2.5-vl"]


def test_cli_inspect_tiny_packed_families(capsys):
    for name in ("qwen2.5-vl", "qwen3-vl", "qwen3.5"):
        assert main(["inspect", f"tiny:{name}", "--retain", "0.5"]) == 0
        assert "grid_thw [[1, 4, 6], [1, 4, 4]]" in capsys.readouterr().out


def test_cli_unknown_checkpoint_type_names_what_is_supported(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'bert'" in err and "no vision tower ipcv has an adapter for" in err and "Qwen3VLVisionModel" in err


# --------------------------------------------------------------------------------------------- item 4: compress()
def test_compress_qwen3vl_generates_and_equals_plain_at_retain_one():
    """Acceptance: compress() on a Qwen3-VL VLM (deepstack) generates; at retain 1.0 the ids are the plain
    model's — with the tower rewritten at retain 1.0 too; at 0.35 the pruned layers cache fewer tokens."""
    model = tiny_vlm("qwen3_vl", text_layers=4)
    kw = vlm_generate_inputs(model, "qwen3_vl", [(1, 4, 6), (1, 4, 4)], max_new_tokens=5, video=(2, 4, 4))
    ref, ref_cache = _generate(model, kw)
    for llm in ("dart", "fastv"):
        ipcv_adapters.compress(model, vit_retain=1.0, llm=llm, llm_retain=1.0, llm_layer=2)
        try:
            got, _ = _generate(model, kw)
        finally:
            uninstall(model)
        assert torch.equal(got, ref), llm
    # the rewritten tower at retain 1.0 (vit_retain=1.0 leaves the tower alone, so rewrite it here)
    plain_tower = model.model.visual
    model.model.visual = ipcv_compile.rewrite(plain_tower, TINY_IPCV.replace(retain=1.0))
    try:
        ipcv_adapters.compress(model, vit_retain=None, llm="dart", llm_retain=1.0, llm_layer=2)
        got, _ = _generate(model, kw)
        uninstall(model)
    finally:
        model.model.visual = plain_tower
    assert torch.equal(got, ref)
    ipcv_adapters.compress(model, vit_retain=0.35, vit_config=TINY_IPCV, llm="dart", llm_retain=0.35, llm_layer=2)
    try:
        assert isinstance(model.model.visual, IPCVTower)
        got, cache = _generate(model, kw)
    finally:
        uninstall(model)
    assert model.model.visual is plain_tower
    assert got.shape == ref.shape
    assert cache.layers[3].get_seq_length() < cache.layers[0].get_seq_length() == ref_cache.layers[0].get_seq_length()


def test_qwen3_family_spans_one_per_video_frame():
    from ipcv_adapters.llm import find_family

    model = tiny_vlm("qwen3_vl")
    kw = vlm_generate_inputs(model, "qwen3_vl", [(1, 4, 6)], video=(2, 4, 4))
    fam = find_family(model)
    spans = fam.spans({**kw, "attention_mask": kw["attention_mask"]})
    assert [n for _, n in spans[0]] == [6, 4, 4]  # the image (4*6/4) and two frames (4*4/4 each)


def test_compress_qwen3vl_deepstack_needs_llm_layer_past_its_layers():
    model = tiny_vlm("qwen3_vl", text_layers=4)  # deepstack_visual_indexes [1, 2]: added after layers 0, 1
    with pytest.raises(ValueError, match=r"llm_layer must be >= 2 for Qwen3VLForConditionalGeneration: its deepstack"):
        ipcv_adapters.compress(model, vit_retain=None, llm="dart", llm_layer=1)
    assert installed(model) is None


@pytest.mark.parametrize("name", list(VLMS))
def test_compress_every_vlm(name):
    """Every VLM the adapters wire: the ViT side (llm=None) replaces the tower and generates; DART at
    retain 1.0 generates the plain model's ids; uninstall restores the tower."""
    model = tiny_vlm(name, text_layers=4)
    kw = vlm_generate_inputs(model, name, _images(name), max_new_tokens=4)
    ref, _ = _generate(model, kw)
    tower = _tower_of(model)
    ipcv_adapters.compress(model, vit_retain=0.35, vit_config=TINY_IPCV, llm=None)
    try:
        assert isinstance(_tower_of(model), IPCVTower)
        got, _ = _generate(model, kw)
        assert got.shape == ref.shape
    finally:
        uninstall(model)
    assert _tower_of(model) is tower
    with ipcv_compress(model, vit_retain=1.0, llm="dart", llm_retain=1.0, llm_layer=2):
        assert torch.equal(_generate(model, kw)[0], ref)


class ipcv_compress:
    def __init__(self, model, **kw):
        self.model, self.kw = model, kw

    def __enter__(self):
        return ipcv_adapters.compress(self.model, **self.kw)

    def __exit__(self, *exc):
        uninstall(self.model)


class _OtherVLM(nn.Module):
    """A VLM class no LLM family knows, holding a supported tower at ``model.vision_tower``."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = tiny_tower("clip")
        self.config = types.SimpleNamespace(vision_feature_layer=-2)


def test_compress_unsupported_llm_side_says_why_and_llm_none_works():
    model = _OtherVLM()
    with pytest.raises(UnsupportedVLMError, match=r"compress\(llm='dart'\): LLM-side pruning does not support _OtherVLM"
                       r".*supported: \[.*'LlavaForConditionalGeneration'.*'Qwen3VLForConditionalGeneration'.*llm=None"):
        ipcv_adapters.compress(model, vit_retain=0.35, llm="dart")
    assert not isinstance(model.model.vision_tower, IPCVTower)
    tower = model.model.vision_tower
    ipcv_adapters.compress(model, vit_retain=0.35, vit_config=TINY_IPCV, llm=None)
    rt = model.model.vision_tower
    assert isinstance(rt, IPCVTower) and rt.adapter.feature_taps == (2,)  # -2 of 4 blocks: block 2's output
    _, kw = tower_inputs("clip")
    with torch.no_grad():
        rt(**kw, output_hidden_states=-2)
    assert rt.stats["captures"] == 1
    uninstall(model)
    assert model.model.vision_tower is tower
    with pytest.raises(UnsupportedVLMError, match="no vision tower ipcv supports in Module"):
        ipcv_adapters.compress(nn.Module(), vit_retain=0.35, llm=None)


# --------------------------------------------------------------------------------------------- item 5: rewrite
def test_llava_generate_captures_the_tower_once():
    """LLaVA reads vision_feature_layer -2: with it known at rewrite time (compress, or feature_layers=),
    the first generate() captures nothing more; without it the first generate() captures again."""
    model = tiny_vlm("llava")
    kw = vlm_generate_inputs(model, "llava", [0, 0])
    plain = model.model.vision_tower
    model.model.vision_tower = ipcv_compile.rewrite(plain, TINY_IPCV)
    _generate(model, kw)
    assert model.model.vision_tower.stats["captures"] == 2  # the feature layer, captured inside generate()
    model.model.vision_tower = ipcv_compile.rewrite(plain, TINY_IPCV, feature_layers=model.config.vision_feature_layer)
    rt = model.model.vision_tower
    assert rt.stats["captures"] == 1
    _generate(model, kw)
    _generate(model, kw)
    assert rt.stats["captures"] == 1
    model.model.vision_tower = plain
    ipcv_adapters.compress(model, vit_retain=0.35, vit_config=TINY_IPCV, llm=None)
    try:
        _generate(model, kw)
        assert model.model.vision_tower.stats["captures"] == 1
    finally:
        uninstall(model)
    with pytest.raises(ValueError, match=r"feature_layers: 5 is not an index into the 5 hidden states .* \[-5, 4\]"):
        ipcv_compile.rewrite(plain, TINY_IPCV, feature_layers=5)


def test_shallow_tower_defaults_warn_naming_the_resolved_schedule():
    tower = tiny_tower("internvl", depth=8)
    with pytest.warns(ShallowDefaultsWarning, match=r"clipped to l_p=7, Δ=1: only 1 of 8 block\(s\).*prune_layer=.*as_depth="):
        rt = ipcv_compile.rewrite(tower, retain=0.35)
    assert (rt.ipcv_config.prune_layer, rt.ipcv_config.as_depth) == (7, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShallowDefaultsWarning)
        ipcv_compile.rewrite(tower, retain=0.35, prune_layer=2, as_depth=2)  # set explicitly: silent
        ipcv_compile.rewrite(tower, retain=1.0)  # nothing to prune: silent
        ipcv_compile.rewrite(tiny_tower("internvl", depth=12), retain=0.35)  # 7, 3 fit: silent


def test_rewrite_and_call_emit_no_future_warning():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for name in ("qwen2_vl", "dinov2"):
            rt = ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV)
            args, kw = tower_inputs(name)
            with torch.no_grad():
                rt(*args, **kw)
    assert not [w for w in rec if issubclass(w.category, FutureWarning)], [str(w.message) for w in rec]


# --------------------------------------------------------------------------------------------- item 6: packaging
def test_license_spdx_classifiers_and_packages():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = meta["project"]
    assert proj["license"] == "Apache-2.0" and proj["license-files"] == ["LICENSE"]
    assert proj["classifiers"] and not [c for c in proj["classifiers"] if c.startswith("License ::")]
    assert "ipcv" in meta["tool"]["setuptools"]["packages"]["find"]["include"]


def test_one_version_and_import_ipcv():
    import ipcv
    import ipcv_core

    assert ipcv.__version__ == ipcv_core.__version__ == ipcv_compile.__version__ == ipcv_adapters.__version__
    try:
        assert ipcv.__version__ == importlib.metadata.version("ipcv")
    except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        assert ipcv.__version__ == "0+unknown"
    assert ipcv.rewrite is ipcv_compile.rewrite and ipcv.compress is ipcv_adapters.compress
    assert ipcv.IPCVConfig is ipcv_core.IPCVConfig
    assert set(ipcv.__all__) == {"rewrite", "compress", "IPCVConfig", "__version__"}


def test_demo_without_weights_says_what_is_missing(monkeypatch, tmp_path, capsys):
    from ipcv_adapters.app import demo

    monkeypatch.setattr(demo, "DEFAULT_MODEL", str(tmp_path / "weights" / "dinov2-small"))
    monkeypatch.setattr(demo, "DEFAULT_IMAGES", str(tmp_path / "data" / "imagenet-samples"))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "cannot find DINOv2-S weights at" in err and "../shared" in err and "--model" in err and "--images" in err


def test_missing_onnx_extra_exits_3_before_loading(monkeypatch, tmp_path, capsys):
    """The backend's modules are checked before anything is loaded or captured (exit 3, README)."""
    from ipcv_adapters import loading

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError

    def no_load(model):
        raise AssertionError("the model was loaded before the backend check")

    monkeypatch.setattr(loading, "load_tower", no_load)
    rc = main(["export", "tiny:dinov2", "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "'onnxruntime'" in err and "ipcv[onnx]" in err
    readme = (ROOT / "README.md").read_text()
    assert "3 when\na backend is missing" in readme


def test_compiler_example_batch_with_per_token_side_inputs():
    """README's compiler example: (B, N, d) rotary tables with dynamic_shapes and hidden_input serve other
    batch sizes and token counts; without dynamic_shapes the capture error says what to pass."""
    from torch.export import Dim

    from ipcv_compile import LocateSpec, rewrite
    from ipcv_compile.api import CaptureError
    from ipcv_core import IPCVConfig, SegmentLayout
    from ipcv_core.testing import SyntheticViT, ViTSpec

    m = SyntheticViT(ViTSpec(rotary=True, depth=4)).eval()
    d = m.spec.dim // m.spec.heads
    g = torch.Generator().manual_seed(0)
    hidden, cos, sin = (torch.randn(2, 17, n, generator=g) for n in (m.spec.dim, d, d))
    spec = LocateSpec(blocks="blocks", attention="attn", ffn="mlp", hidden_input="hidden_states")
    batch, tokens = Dim("batch"), Dim("tokens")
    dyn = ({0: batch, 1: tokens},) * 3
    rm = rewrite(m, IPCVConfig(retain=1.0, prune_layer=1, as_depth=2, k=4), example_inputs=(hidden, cos, sin),
                 spec=spec, layout=SegmentLayout.batched(protected=1), dynamic_shapes=dyn)
    h3, c3, s3 = (torch.randn(3, 20, n, generator=g) for n in (m.spec.dim, d, d))
    with torch.no_grad():
        assert torch.allclose(rm(h3, c3, s3), m(h3, c3, s3), rtol=0, atol=1e-5)
    assert isinstance(rm.summary(), str)
    with pytest.raises(CaptureError, match=r"(?s)dynamic_shapes=\(\{0: batch, 1: tokens\}, \{0: batch, 1: tokens\}.*batch >= 2"):
        rewrite(m, IPCVConfig(retain=0.35, prune_layer=1, as_depth=2, k=4), example_inputs=(hidden, cos, sin),
                spec=spec, layout=SegmentLayout.batched(protected=1))
