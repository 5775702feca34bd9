"""ipcv's lmms-eval models end to end (issue 24): `python -m lmms_eval --model ipcv_* ...` on a tiny checkpoint
saved offline and a local task of ../shared/data images (conftest.py).  Runs in .venv-eval (`make test-eval`).

* the models are found through this distribution's `lmms_eval.models` entry point;
* at retain 1.0 with llm=none the predictions equal lmms-eval's stock wrapper for the same checkpoint, at batch 1
  and at batch 2 (left padding), single- and multi-image prompts;
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

    for mid in ("ipcv_qwen2_vl", "ipcv_qwen2_5_vl", "ipcv_qwen3_vl"):
        assert mid in MODEL_REGISTRY_V2.list_model_names()
    from ipcv_adapters.eval.lmms import IPCVQwen2_5VLChat, IPCVQwen2VL

    assert get_model("ipcv_qwen2_vl") is IPCVQwen2VL
    assert get_model("ipcv_qwen2_5_vl") is IPCVQwen2_5VLChat  # the chat class when both exist, as lmms-eval's own


@pytest.mark.parametrize("family,stock,ours,batch", [
    ("qwen2_vl", "qwen2_vl", "ipcv_qwen2_vl", 1),
    ("qwen2_vl", "qwen2_vl", "ipcv_qwen2_vl", 2),
    ("qwen2_5_vl", "qwen2_5_vl", "ipcv_qwen2_5_vl", 1),
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
    ("method=tofu", "supported methods: ('ipcv', 'tome', 'random', 'none')"),
    ("k=0", "IPCVConfig.k must be an int >= 1"),
])
def test_bad_model_args_fail_naming_the_argument(checkpoints, task_dir, tmp_path, args, message):
    p = run_lmms_eval("ipcv_qwen2_vl", f"pretrained={checkpoints['qwen2_vl']},{args},{CPU}", task_dir, tmp_path,
                      check=False)
    assert message in p.stdout + p.stderr
    assert not list(pathlib.Path(tmp_path).rglob("*_results.json"))
