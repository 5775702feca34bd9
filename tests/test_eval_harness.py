"""Issue 24, the parts that need no lmms-eval (the end-to-end runs are tests_eval/, `make test-eval`): importing
ipcv never imports lmms-eval; the --model_args options and their errors; the entry point; the per-sample cost
records of :class:`ipcv_adapters.eval.CostMeter` against the cost model (images, video, multi-image, batch 2)."""

import ast
import math
import pathlib
import subprocess
import sys
import tomllib
import warnings

import pytest
import torch

from ipcv_adapters.eval import MODELS, CostMeter, parse_options, summarize
from ipcv_core import IPCVConfig
from ipcv_core.config import num_keep
from ipcv_core.cost import LLMDims, ModelDims, config_flops, kv_cache_bytes, llm_prefill_flops
from ipcv_core.search import merge_family_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_ipcv_never_imports_lmms_eval():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'lmms_eval':\n"
        "            raise AssertionError('lmms_eval imported')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ipcv, ipcv_adapters, ipcv_adapters.eval, ipcv_adapters.eval.options, ipcv_adapters.eval.stats\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'lmms_eval']\n"
        "print('clean')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert p.returncode == 0 and "clean" in p.stdout, p.stderr


def test_entry_point_and_manifest_classes():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["lmms_eval.models"] == {"ipcv": "ipcv_adapters.eval:manifests"}
    assert any(d.startswith("lmms-eval") for d in meta["optional-dependencies"]["eval"])
    tree = ast.parse((ROOT / "ipcv_adapters" / "eval" / "lmms.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    named = {c for pair in MODELS.values() for c in pair if c}
    assert named and named <= classes
    assert set(MODELS) == {"ipcv_qwen2_vl", "ipcv_qwen2_5_vl", "ipcv_qwen3_vl", "ipcv_internvl3", "ipcv_llava_onevision"}


# --------------------------------------------------------------------------------------------- options
def test_options_take_ours_and_leave_the_wrappers():
    kw = dict(pretrained="x", device_map="cpu", retain=0.2, method="ipcv", llm="dart", llm_layer=3, k=8,
              prune_layer=2, max_pixels=1000)
    o = parse_options(kw)
    assert kw == dict(pretrained="x", device_map="cpu", max_pixels=1000)
    assert (o.method, o.retain, o.llm, o.llm_retain, o.llm_layer) == ("ipcv", 0.2, "dart", 0.2, 3)
    assert o.vit_config(32) == IPCVConfig(retain=0.2, k=8, prune_layer=2)
    assert parse_options({"method": "random", "retain": 0.5}).vit_config(12) == IPCVConfig(retain=0.5, selection="random")
    # ToMe: gradual bipartite merging from block 0 between attention and FFN, copy-unmerge
    tome = parse_options({"method": "tome", "retain": 0.35}).vit_config(32)
    assert tome == merge_family_config(0.35, 32, first=0, placement="post_attention", reconstruction="copy")
    assert tome.schedule[0][0] == 0 and len(tome.schedule) == 32 and tome.merge == "average"
    # llm=none / retain 1.0 / method none leave the tower alone
    assert parse_options({"retain": 1.0}).vit_config(32) is None
    assert parse_options({"method": "none", "llm": "fastv", "retain": 0.35}).vit_config(32) is None
    assert parse_options({}).llm is None and parse_options({}).retain == 0.35


def test_options_tuned_config_path(tmp_path):
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=0, k=1, selection="bipartite", merge="average",
                     stages=((1, 0.6),))
    path = tmp_path / "tuned.json"
    cfg.to_json(str(path))
    o = parse_options({"method": str(path)})
    assert o.retain == 0.35 and o.vit_config(12) == cfg
    assert parse_options({"method": str(path), "retain": 0.35}).vit_config(12) == cfg
    with pytest.raises(ValueError, match="retain must be left out or equal to the config's own retain 0.35"):
        parse_options({"method": str(path), "retain": 0.5})
    with pytest.raises(ValueError, match="method must be one of"):
        parse_options({"method": str(tmp_path / "missing.json")})


@pytest.mark.parametrize("kw,message", [
    ({"retain": 1.5}, "--model_args retain must be a number in (0, 1]"),
    ({"retain": "half"}, "--model_args retain must be a number in (0, 1]"),
    ({"method": "visionzip"}, "--model_args method must be one of ('ipcv', 'tome', 'tofu', 'dart_vit', 'random', 'none')"),
    ({"method": "dart_vit", "selection": "score"}, "--model_args selection must be left out with method=dart_vit"),
    ({"method": "dart_vit", "prune_layer": 0}, "IPCVConfig.prune_layer"),
    ({"llm": "sparsevlm"}, "--model_args llm must be one of ('none', 'dart', 'fastv')"),
    ({"llm": "dart", "llm_retain": 0}, "--model_args llm_retain must be a number in (0, 1]"),
    ({"llm_retain": 0.5}, "llm_retain must be left out when llm=none"),
    ({"llm": "dart", "llm_layer": 0}, "--model_args llm_layer must be an int >= 1"),
    ({"k": 0}, "IPCVConfig.k must be an int >= 1"),
    ({"selection": "best"}, "IPCVConfig.selection"),
    ({"stages": "1"}, "--model_args stages must be given in a config JSON"),
    ({"method": "none", "k": 3}, "--model_args k must be left out with method=none"),
])
def test_bad_options_name_the_argument(kw, message):
    with pytest.raises(ValueError) as e:
        parse_options(dict(kw))
    assert message in str(e.value)


def test_tofu_option_is_tomes_schedule_with_the_tofu_merge_rule():
    cfg = parse_options({"method": "tofu", "retain": 0.35}).vit_config(32)
    tome = parse_options({"method": "tome", "retain": 0.35}).vit_config(32)
    assert cfg == tome.replace(merge="tofu")  # same matching, placement, schedule and copy-unmerge
    rule = cfg.merge_rule
    assert [rule.drops_at(layer, cfg.prune_layer) for layer, _ in cfg.schedule] == [b < 32 // 3 for b in range(32)]
    assert rule.norm_preserving and rule.attention_bias


def test_dart_vit_option_is_the_dart_selection_rule():
    o = parse_options({"method": "dart_vit", "retain": 0.35, "prune_layer": 2})
    assert o.method == "dart_vit" and o.compresses_vit
    cfg = o.vit_config(12)
    assert cfg == IPCVConfig(retain=0.35, prune_layer=2, selection="dart", reconstruction="copy", as_depth=0, k=1)
    assert cfg.needs_key_metric and cfg.reconstruction_rule.copies_neighbour
    assert parse_options({"method": "dart_vit", "retain": 1.0}).vit_config(12) is None


# --------------------------------------------------------------------------------------------- cost records
def _tiny(name, text_layers=3):
    from ipcv_adapters.testing import tiny_vlm

    return tiny_vlm(name, text_layers=text_layers)


def _vit_dims(model):
    v = model.config.vision_config
    width = getattr(v, "embed_dim", None) if model.config.model_type == "qwen2_vl" else v.hidden_size
    heads = v.num_heads
    ffn = model.model.visual.blocks[0].mlp
    return ModelDims(width, ffn_params=sum(p.numel() for p in ffn.parameters()), key_dim=width // heads), v.depth


def _llm_dims(model):
    t = model.config.text_config
    return LLMDims(t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                   t.num_key_value_heads, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
                   t.vocab_size)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_cost_records_match_the_cost_model(name):
    import ipcv_adapters
    from ipcv_adapters.testing import left_pad_batch, qwen2vl_generate_inputs

    m = _tiny(name)
    cfg = IPCVConfig(retain=0.35, prune_layer=1, as_depth=2, k=4)
    ipcv_adapters.compress(m, vit_retain=0.35, vit_config=cfg, llm="dart", llm_retain=0.35, llm_layer=1)
    meter = CostMeter(m)
    vit, depth = _vit_dims(m)
    llm = _llm_dims(m)
    prompts = [[("image", (1, 8, 8)), ("video", (2, 4, 8))],   # image + video
               [("image", (1, 4, 8)), ("image", (1, 8, 4))]]   # two images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = [qwen2vl_generate_inputs(p, seed=i, family=name, max_new_tokens=3) for i, p in enumerate(prompts)]
        for kw in one:
            m.generate(**kw)
        singles = meter.take()
        m.generate(**left_pad_batch(one))
        batched = meter.take()
    assert len(singles) == len(batched) == 2
    for p, rec, brec in zip(prompts, singles, batched):
        grids = [(k, *g) for k, g in p]
        assert [tuple(g) for g in rec["vit_grids"]] == grids == [tuple(g) for g in brec["vit_grids"]]
        assert rec["vit_patches_kept"] == sum(t * num_keep(h * w, 0.35) for _, t, h, w in grids)
        assert rec["vit_flops"] == pytest.approx(sum(t * config_flops(cfg, h * w, 0, depth, vit) for _, t, h, w in grids))
        assert rec["vit_flops_vanilla"] == pytest.approx(sum(t * config_flops(None, h * w, 0, depth, vit)
                                                             for _, t, h, w in grids))
        # Qwen2 family: one LLM span per image and per video (t*h*w/4 tokens)
        spans = [t * h * w // 4 for _, t, h, w in grids]
        kept = sum(num_keep(n, 0.35) for n in spans)
        L = rec["llm_prompt_tokens"]
        assert L == one[prompts.index(p)]["input_ids"].shape[1] == brec["llm_prompt_tokens"]
        rows = [L] + [L - sum(spans) + kept] * (llm.layers - 1)
        for r in (rec, brec):
            assert r["llm_visual_tokens"] == sum(spans)
            assert r["llm_visual_tokens_kept"] == r["llm_visual_tokens_kept_measured"] == kept
            assert r["llm_prefill_flops"] == pytest.approx(llm_prefill_flops(rows, llm))
            assert r["kv_cache_bytes"] == r["kv_cache_bytes_measured"] == kv_cache_bytes(rows, llm, 4)
            assert r["decode_steps"] == 2
        assert rec["kv_cache_bytes_allocated"] == rec["kv_cache_bytes"] and rec["batch"] == 1
        assert brec["batch"] == 2 and brec["kv_cache_bytes_allocated"] >= brec["kv_cache_bytes"]  # + padding
    s = summarize(singles)
    assert s["samples"] == 2 and s["vit_flops"] == pytest.approx((singles[0]["vit_flops"] + singles[1]["vit_flops"]) / 2)
    assert s["vit_flops_ratio"] < 1 and s["llm_prefill_flops_ratio"] < 1
    assert s["prefill_s_per_batch"] == pytest.approx(s["prefill_s_per_sample"])
    meter.remove()
    m.generate(**one[0])
    assert meter.take() == []


def test_uncompressed_model_records_vanilla_costs():
    from ipcv_adapters.testing import qwen2vl_generate_inputs

    m = _tiny("qwen2_vl")
    meter = CostMeter(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.generate(**qwen2vl_generate_inputs([("image", (1, 8, 8))], max_new_tokens=2))
    (rec,) = meter.take()
    assert rec["vit_flops"] == rec["vit_flops_vanilla"] and rec["vit_patches_kept"] == rec["vit_patches"] == 64
    assert rec["llm_visual_tokens_kept"] == rec["llm_visual_tokens"] == 16
    assert rec["llm_prefill_flops"] == rec["llm_prefill_flops_vanilla"]


@pytest.mark.parametrize("method", ["tome", "tofu"])
def test_merge_method_config_rewrites_a_qwen_tower_and_generates(method):
    import ipcv_adapters
    from ipcv_adapters.testing import qwen2vl_generate_inputs

    m = _tiny("qwen2_vl")
    opts = parse_options({"method": method, "retain": 0.5})
    cfg = opts.vit_config(m.config.vision_config.depth)
    ipcv_adapters.compress(m, vit_retain=0.5, vit_config=cfg, llm=None)
    meter = CostMeter(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.generate(**qwen2vl_generate_inputs([("image", (1, 8, 8))], max_new_tokens=2))
    assert out.shape[1] > 0
    (rec,) = meter.take()
    assert rec["vit_patches_kept"] == math.ceil(0.5 * 64) and rec["vit_flops"] < rec["vit_flops_vanilla"]
    assert torch.isfinite(torch.tensor(rec["vit_flops"]))


def test_dart_vit_rewrites_a_qwen_tower_and_generates():
    """method=dart_vit through compress (the graph rewrite of the HF tower): keeps ceil(r n) patches, costs less."""
    import ipcv_adapters
    from ipcv_adapters.testing import qwen2vl_generate_inputs

    m = _tiny("qwen2_vl")
    cfg = parse_options({"method": "dart_vit", "retain": 0.35, "prune_layer": 1}).vit_config(m.config.vision_config.depth)
    ipcv_adapters.compress(m, vit_retain=0.35, vit_config=cfg, llm=None)
    meter = CostMeter(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.generate(**qwen2vl_generate_inputs([("image", (1, 8, 8)), ("image", (1, 4, 8))], max_new_tokens=2))
    assert out.shape[1] > 0
    (rec,) = meter.take()
    assert rec["vit_patches_kept"] == num_keep(64, 0.35) + num_keep(32, 0.35)
    assert 0 < rec["vit_flops"] < rec["vit_flops_vanilla"]


@pytest.mark.parametrize("name,protected", [("internvl", 1), ("llava_onevision", 0)])
def test_cost_records_of_tile_towers(name, protected):
    """InternVL / LLaVA-OneVision towers run a batch of tiles: one segment per tile (CLS protected), recorded at
    batch 1; at batch 2 the tile-to-row assignment is unknown and the ViT fields are left out."""
    import ipcv_adapters
    from ipcv_adapters.testing import IMAGE_SIZE, left_pad_batch, vlm_generate_inputs

    m = _tiny(name)
    cfg = IPCVConfig(retain=0.35, prune_layer=1, as_depth=2, k=4)
    ipcv_adapters.compress(m, vit_retain=0.35, vit_config=cfg, llm="fastv", llm_retain=0.35, llm_layer=1)
    images = [2, 1] if name == "internvl" else [(56, 56), (56, 112)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (LLaVA-OneVision's inputs ask the tower for the token counts: no meter yet)
        one = [vlm_generate_inputs(m, name, [img], seed=i, max_new_tokens=2) for i, img in enumerate(images)]
    meter = CostMeter(m)
    v = m.config.vision_config
    ffn = 2 * v.hidden_size * v.intermediate_size + v.intermediate_size + v.hidden_size  # fc1, fc2 + biases
    vit = ModelDims(v.hidden_size, ffn_params=ffn, key_dim=v.hidden_size // v.num_attention_heads)
    depth, side = v.num_hidden_layers, IMAGE_SIZE // 14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in one:
            m.generate(**kw)
        singles = meter.take()
        both = left_pad_batch(one)
        if "image_sizes" in both:
            both["image_sizes"] = torch.cat([kw["image_sizes"] for kw in one])
        m.generate(**both)
        batched = meter.take()
    for kw, rec in zip(one, singles):
        if name == "internvl":
            tiles = kw["pixel_values"].shape[0]
        else:  # AnyRes: the tiles the image's size needs (+ the base image), the padding tiles dropped
            from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

            tiles = image_size_to_num_patches(kw["image_sizes"][0].tolist(), m.config.image_grid_pinpoints, IMAGE_SIZE)
        assert rec["vit_grids"] == [["tile", 1, side, side]] * tiles
        assert rec["vit_patches"] == tiles * side * side
        assert rec["vit_patches_kept"] == tiles * num_keep(side * side, 0.35)
        n = side * side + protected
        assert rec["vit_flops"] == pytest.approx(tiles * config_flops(cfg, n, protected, depth, vit))
        assert rec["vit_flops_vanilla"] == pytest.approx(tiles * config_flops(None, n, protected, depth, vit))
        assert rec["llm_visual_tokens_kept"] == rec["llm_visual_tokens_kept_measured"] < rec["llm_visual_tokens"]
    assert len(batched) == 2 and not any("vit_flops" in r or "vit_grids" in r for r in batched)
    assert all(r["llm_visual_tokens_kept"] == r["llm_visual_tokens_kept_measured"] for r in batched)
