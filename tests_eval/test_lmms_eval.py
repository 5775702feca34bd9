"""ipcv's lmms-eval models end to end (issue 24): `python -m lmms_eval --model ipcv_* ...` on a tiny checkpoint
saved offline and a local task of ../shared/data images (conftest.py).  Runs in .venv-eval (`make test-eval`).

* the models are found through this distribution's `lmms_eval.models` entry point;
* at retain 1.0 with llm=none the predictions equal lmms-eval's stock wrapper for the same checkpoint (Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL, InternVL3 through `internvl_hf`, LLaVA-OneVision through `llava_hf`), at batch 1 and at
  batch 2 (left padding), single- and multi-image prompts;
* at retain 0.35 Qwen3-VL (deepstack taps), InternVL3 + FastV and LLaVA-OneVision + DART run, and the kept ViT
  patches / LLM visual tokens they record are the cost model's;
* at retain 0.35 + DART the recorded FLOPs / kept tokens / KV-cache bytes are the cost model's (recomputed here
  from the checkpoint's sizes), and the results JSON carries their means;
* a bad --model_args value fails, naming the argument, before any result is written.
"""

import json
import math
import pathlib

import pytest

from conftest import TASK, read_results, run_lmms_eval
from ipcv_core import IPCVConfig
from ipcv_core.config import num_keep
from ipcv_core.cost import LLMDims, ModelDims, config_flops, kv_cache_bytes, llm_prefill_flops

CPU = "device_map=cpu"


def test_entry_point_registers_the_models():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    for mid in ("ipcv_qwen2_vl", "ipcv_qwen2_5_vl", "ipcv_qwen3_vl", "ipcv_internvl3", "ipcv_llava_onevision"):
        assert mid in MODEL_REGISTRY_V2.list_model_names()
    from ipcv_adapters.eval.lmms import IPCVInternVL3Chat, IPCVLlavaOneVisionChat, IPCVQwen2_5VLChat, IPCVQwen2VL

    assert get_model("ipcv_qwen2_vl") is IPCVQwen2VL
    assert get_model("ipcv_qwen2_5_vl") is IPCVQwen2_5VLChat  # the chat class when both exist, as lmms-eval's own
    assert get_model("ipcv_internvl3") is IPCVInternVL3Chat
    assert get_model("ipcv_llava_onevision") is IPCVLlavaOneVisionChat
    # each is lmms-eval's stock wrapper with IPCVModel in front
    for ours, stock in (("ipcv_internvl3", "internvl_hf"), ("ipcv_llava_onevision", "llava_hf"),
                        ("ipcv_qwen3_vl", "qwen3_vl")):
        cls = get_model(ours)
        assert cls.__mro__[1].__name__ == "IPCVModel" and cls.__mro__[2] is get_model(stock)


@pytest.mark.parametrize("family,stock,ours,batch", [
    ("qwen2_vl", "qwen2_vl", "ipcv_qwen2_vl", 1),
    ("qwen2_vl", "qwen2_vl", "ipcv_qwen2_vl", 2),
    ("qwen2_5_vl", "qwen2_5_vl", "ipcv_qwen2_5_vl", 1),
    ("qwen3_vl", "qwen3_vl", "ipcv_qwen3_vl", 1),
    ("internvl3", "internvl_hf", "ipcv_internvl3", 1),  # lmms-eval's wrapper: chat only, batch 1, bf16
    ("llava_onevision", "llava_hf", "ipcv_llava_onevision", 1),  # lmms-eval's chat llava_hf: batch 1
])
def test_retain_1_equals_the_stock_wrapper(checkpoints, task_dir, tmp_path, family, stock, ours, batch):
    ck = checkpoints[family]
    run_lmms_eval(stock, f"pretrained={ck},{CPU}", task_dir, tmp_path / "stock", batch)
    run_lmms_eval(ours, f"pretrained={ck},retain=1.0,llm=none,{CPU}", task_dir, tmp_path / "ours", batch)
    res_s, pred_s = read_results(tmp_path / "stock")
    res_o, pred_o = read_results(tmp_path / "ours")
    assert len(pred_o) == 5 and pred_o == pred_s
    assert any(p.strip() for p in pred_o.values())  # something was generated
    assert res_o["results"][TASK]["exact_match,none"] == res_s["results"][TASK]["exact_match,none"]
    thr = res_o["throughput"]
    assert thr["avg_ipcv_samples"] == 5
    assert thr["avg_ipcv_vit_flops"] == thr["avg_ipcv_vit_flops_vanilla"] > 0  # nothing removed
    assert thr["avg_ipcv_llm_visual_tokens_kept"] == thr["avg_ipcv_llm_visual_tokens"] > 0


def _dims(ck):
    cfg = json.loads((pathlib.Path(ck) / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    width, mlp = v["embed_dim"], v["embed_dim"] * v["mlp_ratio"]
    vit = ModelDims(width, ffn_params=2 * width * mlp + mlp + width, key_dim=width // v["num_heads"])  # fc1, fc2 + biases
    llm = LLMDims(hidden=t["hidden_size"], intermediate=t["intermediate_size"], layers=t["num_hidden_layers"],
                  heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
                  vocab=t["vocab_size"])
    return vit, v["depth"], llm


def test_recorded_costs_match_the_cost_model(checkpoints, task_dir, tmp_path):
    ck = checkpoints["qwen2_vl"]
    stats = tmp_path / "stats.jsonl"
    run_lmms_eval("ipcv_qwen2_vl", f"pretrained={ck},retain=0.35,method=ipcv,prune_layer=1,as_depth=2,llm=dart,"
                  f"llm_retain=0.35,llm_layer=1,ipcv_stats={stats},{CPU}", task_dir, tmp_path / "out")
    res, preds = read_results(tmp_path / "out")
    assert len(preds) == 5 and "exact_match,none" in res["results"][TASK]
    recs = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(recs) == 5
    assert sorted(len(r["vit_grids"]) for r in recs) == [1, 1, 1, 2, 2]  # two multi-image samples
    vit, depth, llm = _dims(ck)
    cfg = IPCVConfig(retain=0.35, prune_layer=1, as_depth=2)
    K = 1
    for r in recs:
        assert r["options"]["method"] == "ipcv" and r["options"]["llm"] == "dart"
        grids = r["vit_grids"]
        # ViT: one segment per frame of h*w patches, K = ceil(0.35 n) kept in the pruned blocks
        assert r["vit_patches"] == sum(t * h * w for _, t, h, w in grids)
        assert r["vit_patches_kept"] == sum(t * math.ceil(0.35 * h * w) for _, t, h, w in grids)
        assert r["vit_flops"] == pytest.approx(sum(t * config_flops(cfg, h * w, 0, depth, vit) for _, t, h, w in grids))
        assert r["vit_flops_vanilla"] == pytest.approx(sum(t * config_flops(None, h * w, 0, depth, vit)
                                                           for _, t, h, w in grids))
        assert r["vit_flops"] < r["vit_flops_vanilla"]
        # LLM: every image is one span of t*h*w/4 tokens; DART keeps ceil(0.35 n) of each from layer K on
        spans = [t * h * w // 4 for _, t, h, w in grids]
        assert r["llm_visual_tokens"] == sum(spans)
        kept = sum(num_keep(n, 0.35) for n in spans)
        assert r["llm_visual_tokens_kept"] == r["llm_visual_tokens_kept_measured"] == kept
        L = r["llm_prompt_tokens"]
        rows = [L] * K + [L - sum(spans) + kept] * (llm.layers - K)
        assert r["llm_prefill_flops"] == pytest.approx(llm_prefill_flops(rows, llm))
        assert r["llm_prefill_flops_vanilla"] == pytest.approx(llm_prefill_flops([L] * llm.layers, llm))
        # KV cache after the prefill (fp32 checkpoint: 4 bytes a value): cost model == what the cache held
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_measured"] == r["kv_cache_bytes_allocated"] \
            == kv_cache_bytes(rows, llm, 4)
        assert r["prefill_s"] > 0 and r["batch"] == 1
    # the results JSON carries the per-sample means
    thr = res["throughput"]
    for key in ("vit_flops", "llm_prefill_flops", "kv_cache_bytes", "llm_visual_tokens_kept", "vit_patches_kept"):
        assert thr[f"avg_ipcv_{key}"] == pytest.approx(sum(r[key] for r in recs) / 5)
    assert thr["avg_ipcv_vit_flops_ratio"] < 1 and thr["avg_ipcv_llm_prefill_flops_ratio"] < 1


@pytest.mark.parametrize("family,ours,llm", [
    ("qwen3_vl", "ipcv_qwen3_vl", "dart"),           # deepstack taps at vision blocks 1 and 2; llm_layer >= 2
    ("internvl3", "ipcv_internvl3", "fastv"),        # the paper's InternVL3 row: IPCV + FastV
    ("llava_onevision", "ipcv_llava_onevision", "dart"),
])
def test_retain_035_runs_and_records_the_kept_tokens(checkpoints, task_dir, tmp_path, family, ours, llm):
    stats = tmp_path / "stats.jsonl"
    run_lmms_eval(ours, f"pretrained={checkpoints[family]},retain=0.35,method=ipcv,prune_layer=1,as_depth=2,llm={llm},"
                  f"llm_layer=2,ipcv_stats={stats},{CPU}", task_dir, tmp_path / "out")
    res, preds = read_results(tmp_path / "out")
    assert len(preds) == 5 and "exact_match,none" in res["results"][TASK]
    assert any(p.strip() for p in preds.values())  # generation did not fail (the wrappers log errors, answer "")
    recs = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(recs) == 5
    for r in recs:
        assert r["options"]["method"] == "ipcv" and r["options"]["llm"] == llm
        grids = r["vit_grids"]
        assert grids and all(kind in ("image", "tile") for kind, *_ in grids)
        # ViT: one segment per image (Qwen) / tile (InternVL, LLaVA-OneVision), ceil(0.35 n) of its n patches kept
        assert r["vit_patches"] == sum(t * h * w for _, t, h, w in grids)
        assert r["vit_patches_kept"] == sum(t * num_keep(h * w, 0.35) for _, t, h, w in grids) < r["vit_patches"]
        assert 0 < r["vit_flops"] < r["vit_flops_vanilla"]
        # LLM: ceil(0.35 n) of every visual span from layer 2 on, as the pruned cache really held
        assert r["llm_visual_tokens"] > 0
        assert r["llm_visual_tokens_kept"] == r["llm_visual_tokens_kept_measured"] < r["llm_visual_tokens"]
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_measured"]
        assert r["llm_prefill_flops"] < r["llm_prefill_flops_vanilla"]
    assert sum(len(r["vit_grids"]) > 1 for r in recs) >= 2  # the multi-image samples (and multi-tile images)


@pytest.mark.parametrize("method,extra", [("dart_vit", ",prune_layer=1"), ("tofu", "")])
def test_baseline_methods_run(checkpoints, task_dir, tmp_path, method, extra):
    """method=dart_vit (the library's selection='dart' rule) and method=tofu (merge='tofu' on ToMe's schedule), each a
    graph rewrite of the HF tower, run end to end and keep ceil(r n) patches per image."""
    ck = checkpoints["qwen2_vl"]
    stats = tmp_path / "stats.jsonl"
    run_lmms_eval("ipcv_qwen2_vl", f"pretrained={ck},retain=0.35,method={method}{extra},ipcv_stats={stats},{CPU}",
                  task_dir, tmp_path / "out")
    res, preds = read_results(tmp_path / "out")
    assert len(preds) == 5 and any(p.strip() for p in preds.values())
    recs = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(recs) == 5
    for r in recs:
        assert r["options"]["method"] == method and r["options"].get("prune_layer") == (1 if extra else None)
        assert r["vit_patches_kept"] == sum(t * num_keep(h * w, 0.35) for _, t, h, w in r["vit_grids"])
        assert 0 < r["vit_flops"] < r["vit_flops_vanilla"]
        assert r["llm_visual_tokens_kept"] == r["llm_visual_tokens"]  # llm=none


def test_tome_and_batching_run(checkpoints, task_dir, tmp_path):
    """ToMe (the graph rewrite) + FastV at batch 2 with multi-image prompts runs and records its costs."""
    ck = checkpoints["qwen2_vl"]
    run_lmms_eval("ipcv_qwen2_vl", f"pretrained={ck},retain=0.5,method=tome,llm=fastv,llm_layer=2,{CPU}",
                  task_dir, tmp_path / "out", batch_size=2)
    res, preds = read_results(tmp_path / "out")
    assert len(preds) == 5
    thr = res["throughput"]
    assert thr["avg_ipcv_vit_flops"] < thr["avg_ipcv_vit_flops_vanilla"]
    assert thr["avg_ipcv_llm_visual_tokens_kept"] == thr["avg_ipcv_llm_visual_tokens_kept_measured"] \
        < thr["avg_ipcv_llm_visual_tokens"]


@pytest.mark.parametrize("args,message", [
    ("retain=1.5", "--model_args retain must be a number in (0, 1]"),
    ("method=visionzip", "--model_args method must be one of ('ipcv', 'tome', 'tofu', 'dart_vit', 'random', 'none')"),
    ("k=0", "IPCVConfig.k must be an int >= 1"),
])
def test_bad_model_args_fail_naming_the_argument(checkpoints, task_dir, tmp_path, args, message):
    p = run_lmms_eval("ipcv_qwen2_vl", f"pretrained={checkpoints['qwen2_vl']},{args},{CPU}", task_dir, tmp_path,
                      check=False)
    assert message in p.stdout + p.stderr
    assert not list(pathlib.Path(tmp_path).rglob("*_results.json"))


def test_vllm_backend_model_args_carry_the_plugin_config():
    """README's `--model vllm` route (untested with vLLM: .venv-eval has none): lmms-eval's parser keeps the
    braces' commas, and its vllm wrapper (simple/vllm.py __init__) turns a '{...}' value into a dict for LLM(...);
    the `ipcv` entry is then a valid IPCVConfig."""
    import inspect

    from lmms_eval.utils import simple_parse_args_string

    src = (pathlib.Path(inspect.getfile(simple_parse_args_string)).parent / "models" / "simple" / "vllm.py").read_text()
    assert 'startswith("{")' in src and "json.loads(value)" in src and "self.client = LLM(" in src
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "hf_overrides={" in x and x.strip().startswith("--model_args"))
    args = simple_parse_args_string(line.strip().split(None, 1)[1].strip("'"))
    assert set(args) == {"model", "hf_overrides"}
    overrides = json.loads(args["hf_overrides"])  # what the wrapper does to '{...}' values
    cfg = IPCVConfig.from_dict(overrides["ipcv"])
    assert cfg.retain == 0.35 and cfg.k == 10
