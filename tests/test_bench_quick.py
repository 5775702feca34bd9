"""The benchmark harness end to end in its smallest setting (real DINOv2-S weights; skipped with a
reason if ../shared/weights is absent), and its report writer."""

import csv
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WEIGHTS = os.path.join(ROOT, "..", "shared", "weights", "dinov2-small")
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset.npz")


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.isdir(WEIGHTS) and os.path.exists(CIFAR)),
                    reason="real DINOv2-S weights / CIFAR subset not found in ../shared")
def test_quick_benchmark_writes_csv_with_all_methods(tmp_path):
    from benchmarks.run import GRID, main

    md = tmp_path / "BENCH.md"
    rc = main(["--quick", "--out", str(tmp_path), "--cache", "", "--no-progress", "--markdown", str(md),
               "--fid-images", "1", "--fid-size", "112", "--probe-size", "56", "--train", "50", "--test", "20"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert {r["method"] for r in rows} == set(GRID) | {"vanilla"}
    n_patches = (112 // 14) ** 2
    kept = {int(r["kept_patches"]) for r in rows if r["method"] != "vanilla"}
    assert kept == {math.ceil(0.35 * n_patches)}  # every method at equal tokens retained
    for r in rows:
        assert -1.0 <= float(r["cos_all"]) <= 1.0 + 1e-9
        assert 0.0 <= float(r["probe_acc"]) <= 1.0
        assert float(r["latency_ratio"]) > 0
        assert 0 < float(r["flop_ratio"]) <= 1.0 + 1e-9
    tome = next(r for r in rows if r["method"] == "tome")
    assert float(tome["cos_all"]) > 0.9  # merging + unmerge stays close to vanilla
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert (tmp_path / "pruning_map.png").stat().st_size > 0
    meta = json.load(open(tmp_path / "bench.json"))["meta"]
    assert meta["command"].startswith("python -m benchmarks.run --quick")
    assert not md.exists()  # --quick never rewrites BENCHMARKS.md


def test_write_markdown_replaces_only_the_results_section(tmp_path):
    from benchmarks.run import MARK_BEGIN, MARK_END, write_markdown

    md = tmp_path / "B.md"
    md.write_text(f"# Title\n\nintro\n\n{MARK_BEGIN}\nold table\n{MARK_END}\n\n## Findings\n\nkept text\n")
    vanilla = {"probe_acc": 0.7, "latency_ms": 100.0, "gflops": 10.0, "peak_mem_mib": 50.0}
    meta = {"command": "python -m benchmarks.run", "date": "2026-01-01 00:00 UTC", "total_seconds": 60.0,
            "machine": {"cpu": "cpu", "cores": "2", "torch": "2.x", "torch_threads": "2", "os": "linux"},
            "settings": {"fid_images": 32, "fid_size": 448, "train": 2000, "test": 500, "probe_size": 224,
                         "latency_batch": 4, "repeats": 3, "fid_batch": 8},
            "n_patches_fid": 1024, "vanilla": vanilla, "probe_weight_decay": 0.1, "probe_cv_acc": 0.69,
            "load_start": [1.0, 1.0, 1.0], "load_end": [1.0, 1.0, 1.0]}
    write_markdown(str(md), meta, "| new | table |")
    text = md.read_text()
    assert "old table" not in text and "| new | table |" in text
    assert text.startswith("# Title\n\nintro") and text.rstrip().endswith("kept text")
    assert "`python -m benchmarks.run`" in text and "2026-01-01" in text
    # a named section has its own markers: the main section is untouched, links point at its folder
    write_markdown(str(md), meta, "| variant | rows |", section="issue6", out_dir=str(tmp_path / "res6"),
                   fig_dir=str(tmp_path / "res6"))
    text2 = md.read_text()
    assert "| new | table |" in text2 and "| variant | rows |" in text2
    assert "<!-- results:issue6:begin -->" in text2 and "(res6/bench.csv)" in text2
    write_markdown(str(md), meta, "| variant | rows v2 |", section="issue6")
    text3 = md.read_text()
    assert "| variant | rows v2 |" in text3 and "| variant | rows |" not in text3 and "| new | table |" in text3


def test_frontier_reads_the_harness_run_it_names():
    """The frontier step records the harness run's command and vanilla row from bench.json (``meta``
    and the ``vanilla`` row, where benchmarks.run writes them) and its own command as
    ``python -m benchmarks.frontier``."""
    from benchmarks.frontier import vanilla_of
    from benchmarks.report import command_line

    bench = {"meta": {"command": "python -m benchmarks.run --quick"},
             "rows": [{"method": "ipcv", "cos_all": 0.9, "probe_acc": 0.5, "gflops": 1.0},
                      {"method": "vanilla", "cos_all": 1.0, "probe_acc": 0.71, "gflops": 63.4}]}
    assert vanilla_of(bench) == {"cos_all": 1.0, "probe_acc": 0.71, "gflops": 63.4}
    assert command_line(["--bench", "a b"], "benchmarks.frontier") == "python -m benchmarks.frontier --bench 'a b'"
    assert command_line([]) == "python -m benchmarks.run"
