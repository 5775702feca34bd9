#!/usr/bin/env python
"""The paper's Table 1 and Table 4 (IPCV, arXiv 2512.18747; Qwen2-VL-7B) as one command for a GPU machine:
builds the lmms-eval command lines (ipcv's lmms-eval model, ``ipcv_adapters.eval``), runs them one after
another (each in its own output folder: a run already finished is not repeated), and writes the tables in
the paper's layout as markdown.

    python scripts/paper_tables.py --pretrained Qwen/Qwen2-VL-7B-Instruct --out runs/qwen2vl7b
    python scripts/paper_tables.py ... --dry-run          # print the commands only
    python scripts/paper_tables.py ... --collect-only     # only (re)write the tables from finished runs
    python scripts/paper_tables.py ... --tables 4 --limit 200   # Table 4 only, on 200 MMBench samples

* **Table 1** (accuracy): GQA, MMB, MME, POPE, SQA, VQAv2, TextVQA at retain 0.5 / 0.35 / 0.2 for ToMe (the
  graph rewrite, ``method=tome``), DART (LLM-side, ``llm=dart``) and IPCV+DART (``method=ipcv,llm=dart``),
  under the vanilla model's row; the last column is the mean of each score relative to vanilla (%).
  Metrics (lmms-eval's names): gqa / scienceqa_img / vqav2_val / textvqa_val ``exact_match``, mmbench_en_dev
  ``gpt_eval_score`` (lmms-eval asks an OpenAI-compatible judge for it: set its API variables, or read the
  submission file), mme ``mme_perception_score``, pope ``pope_f1_score``.
* **Table 4** (efficiency, MMBench-EN, batch 1): TFLOPs (ViT blocks + LLM prefill + decode, the project's cost
  model: ``ipcv_core.cost``; patch embedding and merger, the same for every method, are left out), KV-cache MB
  after the prefill, prefill latency (ViT + LLM prefill, % of vanilla), and the MMB score, for vanilla, ToMe,
  DART, FastV, IPCV and IPCV+DART at 0.65 / 0.5 / 0.35 / 0.2.  The costs are the per-sample means the ipcv
  model writes into the results JSON (``results["throughput"]["avg_ipcv_*"]``).

ToFu and DART(ViT) rows of the paper are not produced: they exist only as eager runners of this project's
benchmark harness (``benchmarks/methods.py``), not as rewrites of a transformers tower (the model rejects them).
The script needs only the Python standard library; lmms-eval runs as ``python -m lmms_eval`` of ``--python``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# paper column -> (lmms-eval task, metric key in results["results"][task])
TABLE1_TASKS = {
    "GQA": ("gqa", "exact_match,none"),
    "MMB": ("mmbench_en_dev", "gpt_eval_score,none"),
    "MME": ("mme", "mme_perception_score,none"),
    "POPE": ("pope", "pope_f1_score,none"),
    "SQA": ("scienceqa_img", "exact_match,none"),
    "VQAv2": ("vqav2_val", "exact_match,none"),
    "TextVQA": ("textvqa_val", "exact_match,none"),
}
TABLE1_RATIOS = (0.5, 0.35, 0.2)
TABLE1_METHODS = ("ToMe", "DART", "IPCV+DART")
TABLE4_TASK = "MMB"
TABLE4_RATIOS = (0.65, 0.5, 0.35, 0.2)
TABLE4_METHODS = ("ToMe", "DART", "FastV", "IPCV", "IPCV+DART")


def method_args(label: str, retain: float, llm_layer: int = 2) -> Dict[str, object]:
    """The ipcv model's --model_args of one row."""
    if label == "vanilla":
        return {"method": "none", "retain": 1.0, "llm": "none"}
    spec = {
        "ToMe": {"method": "tome", "retain": retain, "llm": "none"},
        "IPCV": {"method": "ipcv", "retain": retain, "llm": "none"},
        "DART": {"method": "none", "retain": 1.0, "llm": "dart", "llm_retain": retain, "llm_layer": llm_layer},
        "FastV": {"method": "none", "retain": 1.0, "llm": "fastv", "llm_retain": retain, "llm_layer": llm_layer},
        "IPCV+DART": {"method": "ipcv", "retain": retain, "llm": "dart", "llm_retain": retain, "llm_layer": llm_layer},
    }
    if label not in spec:
        raise ValueError(f"unknown row {label!r}; one of {('vanilla',) + tuple(spec)}")
    return spec[label]


@dataclass
class Run:
    label: str
    retain: float
    columns: List[str] = field(default_factory=list)  # paper columns (TABLE1_TASKS keys) it must score

    @property
    def name(self) -> str:
        return "vanilla" if self.label == "vanilla" else f"{self.label.replace('+', '_')}_r{self.retain:g}"

    @property
    def tasks(self) -> List[str]:
        return [TABLE1_TASKS[c][0] for c in self.columns]


def plan(tables: Sequence[int]) -> List[Run]:
    """The runs both tables need, each (row, ratio) once with the union of its tasks."""
    runs: Dict[Tuple[str, float], Run] = {}

    def need(label, r, cols):
        run = runs.setdefault((label, r), Run(label, r))
        run.columns += [c for c in cols if c not in run.columns]

    if 1 in tables:
        need("vanilla", 1.0, list(TABLE1_TASKS))
        for r in TABLE1_RATIOS:
            for m in TABLE1_METHODS:
                need(m, r, list(TABLE1_TASKS))
    if 4 in tables:
        need("vanilla", 1.0, [TABLE4_TASK])
        for r in TABLE4_RATIOS:
            for m in TABLE4_METHODS:
                need(m, r, [TABLE4_TASK])
    return list(runs.values())


def command(run: Run, out: Path, pretrained: str, model: str = "ipcv_qwen2_vl", python: str = sys.executable,
            batch_size: int = 1, limit: Optional[int] = None, llm_layer: int = 2, extra_model_args: str = "",
            extra: Sequence[str] = ()) -> List[str]:
    args = {"pretrained": pretrained, **method_args(run.label, run.retain, llm_layer),
            "ipcv_stats": str(out / run.name / "ipcv_stats.jsonl")}
    margs = ",".join(f"{k}={v}" for k, v in args.items()) + (f",{extra_model_args}" if extra_model_args else "")
    cmd = [python, "-m", "lmms_eval", "--model", model, "--model_args", margs, "--tasks", ",".join(run.tasks),
           "--batch_size", str(batch_size), "--output_path", str(out / run.name), "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd + list(extra)


def collect(run_dir: Path) -> Optional[Dict]:
    """The merged results of the newest results JSON of every task under ``run_dir`` (None: no results):
    ``{"results": {task: {...}}, "throughput": {...}}``."""
    files = sorted(Path(run_dir).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    merged: Dict = {"results": {}, "throughput": {}}
    for f in files:  # newer files win
        d = json.loads(f.read_text())
        merged["results"].update(d.get("results", {}))
        merged["throughput"].update(d.get("throughput", {}))
    return merged


def score(res: Optional[Dict], column: str) -> Optional[float]:
    if res is None:
        return None
    task, key = TABLE1_TASKS[column]
    v = res["results"].get(task, {}).get(key)
    if v is None or isinstance(v, str):
        return None
    # lmms-eval reports exact_match / F1 as fractions, the paper percentages; MMB (a percentage) and MME (its own
    # score) as they are
    return float(v) * (1.0 if column in ("MMB", "MME") else 100.0)


def _fmt(v: Optional[float], spec: str = "{:.1f}") -> str:
    return "–" if v is None else spec.format(v)


def table1(results: Dict[Tuple[str, float], Optional[Dict]]) -> str:
    cols = list(TABLE1_TASKS)
    van = results.get(("vanilla", 1.0))
    head = "| Method | " + " | ".join(cols) + " | Avg |"
    out = ["**Table 1** — Qwen2-VL-7B, lmms-eval (ipcv_qwen2_vl); Avg = mean score relative to vanilla", "",
           head, "|" + "---|" * (len(cols) + 2)]

    def row(label, res):
        vals = [score(res, c) for c in cols]
        rel = [v / score(van, c) * 100 for v, c in zip(vals, cols) if v is not None and score(van, c)]
        avg = (f"{sum(rel) / len(rel):.1f}%" if len(rel) == len(cols) else "–") if label != "Vanilla" else "100.0%"
        return "| " + label + " | " + " | ".join(_fmt(v) for v in vals) + f" | {avg} |"

    out.append(row("Vanilla", van))
    for r in TABLE1_RATIOS:
        out.append(f"| *Retain {r:g} ({(1 - r) * 100:g}% removed)* |" + " |" * (len(cols) + 1))
        for m in TABLE1_METHODS:
            out.append(row(m, results.get((m, r))))
    return "\n".join(out)


def _cost(res: Optional[Dict], key: str) -> Optional[float]:
    if res is None:
        return None
    return res["throughput"].get(f"avg_ipcv_{key}")


def table4(results: Dict[Tuple[str, float], Optional[Dict]]) -> str:
    van = results.get(("vanilla", 1.0))
    van_lat = _cost(van, "prefill_s_per_sample")
    out = ["**Table 4** — Qwen2-VL-7B on MMBench-EN, batch 1: per-sample means of the ipcv model's records "
           "(TFLOPs = ViT blocks + LLM prefill + decode, cost model; KV after the prefill)", "",
           "| Method | Retain | TFLOPs | KV cache (MB) | Visual tokens in the LLM (kept) | Prefill latency | MMB |",
           "|---|---|---|---|---|---|---|"]

    def row(label, r, res):
        parts = [_cost(res, k) for k in ("vit_flops", "llm_prefill_flops", "llm_decode_flops")]
        tf = sum(parts) / 1e12 if None not in parts else None
        kv = _cost(res, "kv_cache_bytes")
        kept, vis = _cost(res, "llm_visual_tokens_kept"), _cost(res, "llm_visual_tokens")
        lat = _cost(res, "prefill_s_per_sample")
        lat_s = f"{lat / van_lat * 100:.1f}%" if lat is not None and van_lat else "–"
        tok = f"{kept:.0f} / {vis:.0f}" if kept is not None and vis is not None else "–"
        return (f"| {label} | {r:g} | {_fmt(tf, '{:.2f}')} | {_fmt(None if kv is None else kv / 1e6)} | {tok} | "
                f"{lat_s} | {_fmt(score(res, TABLE4_TASK))} |")

    out.append(row("Vanilla", 1.0, van))
    for r in TABLE4_RATIOS:
        for m in TABLE4_METHODS:
            out.append(row(m, r, results.get((m, r))))
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pretrained", default="Qwen/Qwen2-VL-7B-Instruct", help="checkpoint (hub id or folder)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the runs and the tables")
    ap.add_argument("--tables", type=int, nargs="+", default=[1, 4], choices=[1, 4])
    ap.add_argument("--model", default="ipcv_qwen2_vl", help="the ipcv lmms-eval model (ipcv_qwen2_vl, ...)")
    ap.add_argument("--python", default=sys.executable, help="the Python that has lmms-eval and ipcv[eval]")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="samples per task (lmms-eval --limit)")
    ap.add_argument("--llm-layer", type=int, default=2, help="K of DART / FastV (the paper: 2)")
    ap.add_argument("--model-args", default="", help="appended to every --model_args (e.g. attn_implementation=sdpa)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--collect-only", action="store_true", help="write the tables from the runs already there")
    ap.add_argument("--rerun", action="store_true", help="run again even where results exist")
    ap.add_argument("lmms_eval_args", nargs="*", help="after --: passed to every lmms_eval command")
    a = ap.parse_args(argv)
    runs = plan(a.tables)
    a.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        cmd = command(run, a.out, a.pretrained, a.model, a.python, a.batch_size, a.limit, a.llm_layer, a.model_args,
                      a.lmms_eval_args)
        if a.dry_run:
            print(shlex.join(cmd))
            continue
        if a.collect_only or (collect(a.out / run.name) is not None and not a.rerun):
            continue
        print(f"[paper_tables] {run.name}: {shlex.join(cmd)}", flush=True)
        p = subprocess.run(cmd)
        if p.returncode != 0 or collect(a.out / run.name) is None:  # lmms-eval may exit 0 after an error
            print(f"[paper_tables] {run.name} failed (exit {p.returncode}, no results JSON): see its log", file=sys.stderr)
    if a.dry_run:
        return 0
    results = {(r.label, r.retain): collect(a.out / r.name) for r in runs}
    written = []
    if 1 in a.tables:
        (a.out / "table1.md").write_text(table1(results) + "\n")
        written.append(str(a.out / "table1.md"))
    if 4 in a.tables:
        (a.out / "table4.md").write_text(table4(results) + "\n")
        written.append(str(a.out / "table4.md"))
    print("[paper_tables] wrote " + ", ".join(written))
    missing = [r.name for r in runs if results[(r.label, r.retain)] is None]
    if missing:
        print(f"[paper_tables] no results yet for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
