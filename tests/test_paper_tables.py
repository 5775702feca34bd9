"""scripts/paper_tables.py (issue 24): the runs it plans, the lmms-eval command lines, and the markdown tables
it writes from result files (fake ones here: the Qwen2-VL-7B runs need a GPU machine and the weights)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "scripts" / "paper_tables.py")
pt = importlib.util.module_from_spec(_spec)
sys.modules["paper_tables"] = pt  # dataclasses look their module up
_spec.loader.exec_module(pt)


def test_plan_covers_both_tables_once_per_row():
    runs = pt.plan([1, 4])
    keys = [(r.label, r.retain) for r in runs]
    assert len(keys) == len(set(keys))
    t1 = {(m, r) for m in pt.TABLE1_METHODS for r in pt.TABLE1_RATIOS} | {("vanilla", 1.0)}
    t4 = {(m, r) for m in pt.TABLE4_METHODS for r in pt.TABLE4_RATIOS} | {("vanilla", 1.0)}
    assert set(keys) == t1 | t4
    by = {(r.label, r.retain): r for r in runs}
    assert by[("IPCV+DART", 0.35)].tasks == [t for t, _ in pt.TABLE1_TASKS.values()]  # Table 1's: all 7 tasks
    assert by[("FastV", 0.65)].tasks == ["mmbench_en_dev"]  # Table 4 only


def test_commands_carry_the_rows_model_args(tmp_path):
    run = pt.Run("IPCV+DART", 0.35, ["GQA", "POPE"])
    cmd = pt.command(run, tmp_path, "Qwen/Qwen2-VL-7B-Instruct", limit=50)
    assert cmd[1:5] == ["-m", "lmms_eval", "--model", "ipcv_qwen2_vl"]
    margs = dict(kv.split("=", 1) for kv in cmd[cmd.index("--model_args") + 1].split(","))
    assert margs == {"pretrained": "Qwen/Qwen2-VL-7B-Instruct", "method": "ipcv", "retain": "0.35", "llm": "dart",
                     "llm_retain": "0.35", "llm_layer": "2", "ipcv_stats": str(tmp_path / "IPCV_DART_r0.35" / "ipcv_stats.jsonl")}
    assert cmd[cmd.index("--tasks") + 1] == "gqa,pope" and cmd[cmd.index("--limit") + 1] == "50"
    assert pt.method_args("DART", 0.2)["method"] == "none" and pt.method_args("ToMe", 0.2)["llm"] == "none"
    with pytest.raises(ValueError, match="unknown row 'ToFu'"):
        pt.method_args("ToFu", 0.5)


def _fake(out, run, scores, costs):
    d = out / run.name / "Qwen__Qwen2-VL-7B-Instruct"
    d.mkdir(parents=True)
    results = {t: {k: scores[c], "alias": t} for c, (t, k) in pt.TABLE1_TASKS.items() if c in scores}
    (d / "20261207_000000_results.json").write_text(json.dumps(
        {"results": results, "throughput": {f"avg_ipcv_{k}": v for k, v in costs.items()}}))


def test_tables_from_fake_results(tmp_path):
    base = {"GQA": 0.60, "MMB": 80.0, "MME": 1600.0, "POPE": 0.86, "SQA": 0.70, "VQAv2": 0.80, "TextVQA": 0.80}
    van_costs = dict(vit_flops=2e12, llm_prefill_flops=8e12, llm_decode_flops=1e12, kv_cache_bytes=76.6e6,
                     llm_visual_tokens=1000, llm_visual_tokens_kept=1000, prefill_s_per_sample=0.5)
    for run in pt.plan([1, 4]):
        f = 1.0 if run.label == "vanilla" else 0.9  # every compressed row at 90 % of vanilla
        costs = dict(van_costs, llm_visual_tokens_kept=1000 * run.retain, prefill_s_per_sample=0.5 * run.retain,
                     kv_cache_bytes=76.6e6 * f)
        if run.label == "DART" and run.retain == 0.2:
            continue  # a run that has not finished
        _fake(tmp_path, run, {c: base[c] * f for c in run.columns}, costs)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_tables.py"), "--out", str(tmp_path),
                        "--collect-only"], capture_output=True, text=True)
    assert p.returncode == 1 and "no results yet for: DART_r0.2" in p.stderr  # told what is missing
    t1 = (tmp_path / "table1.md").read_text().splitlines()
    assert t1[2] == "| Method | GQA | MMB | MME | POPE | SQA | VQAv2 | TextVQA | Avg |"
    assert t1[4] == "| Vanilla | 60.0 | 80.0 | 1600.0 | 86.0 | 70.0 | 80.0 | 80.0 | 100.0% |"
    assert t1[5].startswith("| *Retain 0.5 (50% removed)*")
    assert t1[6] == "| ToMe | 54.0 | 72.0 | 1440.0 | 77.4 | 63.0 | 72.0 | 72.0 | 90.0% |"
    assert [line.split(" |")[0] for line in t1[5:]] == [
        "| *Retain 0.5 (50% removed)*", "| ToMe", "| DART", "| IPCV+DART", "| *Retain 0.35 (65% removed)*", "| ToMe",
        "| DART", "| IPCV+DART", "| *Retain 0.2 (80% removed)*", "| ToMe", "| DART", "| IPCV+DART"]
    assert t1[-2] == "| DART | – | – | – | – | – | – | – | – |"  # the missing run
    t4 = (tmp_path / "table4.md").read_text().splitlines()
    assert t4[4] == "| Vanilla | 1 | 11.00 | 76.6 | 1000 / 1000 | 100.0% | 80.0 |"
    row = next(line for line in t4 if line.startswith("| IPCV+DART | 0.35 |"))
    assert row == "| IPCV+DART | 0.35 | 11.00 | 68.9 | 350 / 1000 | 35.0% | 72.0 |"
    assert len(t4) == 5 + len(pt.TABLE4_RATIOS) * len(pt.TABLE4_METHODS)


def test_dry_run_prints_the_commands(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_tables.py"), "--out", str(tmp_path),
                        "--tables", "4", "--dry-run", "--pretrained", "/ckpt"], capture_output=True, text=True)
    assert p.returncode == 0
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 + len(pt.TABLE4_RATIOS) * len(pt.TABLE4_METHODS)
    assert all("-m lmms_eval --model ipcv_qwen2_vl" in line and "--tasks mmbench_en_dev" in line for line in lines)
