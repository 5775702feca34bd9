"""Baselines vs IPCV on real DINOv2-S weights: fidelity, probe accuracy, latency, FLOPs, memory.

    python -m benchmarks.run            # the full grid (about 35 min on an idle 2-core CPU; ~50 with the variant rows)
    python -m benchmarks.run --quick    # CI smoke run (< 2 min): fewer images, 2 ratios, no extras

Per configuration (method x retain ratio, plus a few IPCV ablation rows):

* fidelity at ``--fid-size`` (448 px: 1 CLS + 1024 patches) on ``--fid-images`` ImageNet samples:
  cosine similarity and relative L2 of the final patch tokens (after the final layernorm) to the
  vanilla model, over all patches and over the removed / merged-away patches alone (and the kept);
* accuracy at ``--probe-size`` (224 px): a logistic-regression probe fit once on vanilla features of
  the CIFAR-10 train subset (features: CLS token concatenated with the mean patch token, after the
  final layernorm; weight decay by 5-fold CV on the train split), evaluated on features of
  ``--test`` test images computed with each method;
* cost: latency ratio to vanilla (interleaved, median of ``--repeats``, same batch of
  ``--latency-batch`` images at ``--fid-size``), analytic FLOPs per image and their ratio to vanilla
  (the FLOP bound), peak resident memory of one fidelity batch (see :mod:`benchmarks.cost`).

Writes ``<out>/bench.csv``, ``<out>/bench.json``, the figures ``pareto.png`` and
``pruning_map.png`` (into ``benchmarks/figures/`` for the full run), and — full run only, unless
``--no-markdown`` — the results section of BENCHMARKS.md.
"""

# The harness: benchmarks.grid (what is run, the options), benchmarks.metrics (measuring one
# configuration), benchmarks.report (the Row type and every output); this module runs them.
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import List, Optional

import torch

from . import grid
from .cost import peak_rss_delta, stable_malloc
# the names importers (tests, benchmarks/lowering.py, variants_heldout.py) have used from here
from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, GRID, Config, _merge_fields, build_configs, settings_of, tuned_fields
from .metrics import VANILLA, Encoder, latency_fields, load_inputs, measure, measure_vanilla, progress, time_against_vanilla
from .report import (
    MARK_BEGIN, MARK_END, command_line, machine_info, make_pruning_map, now, read_results, read_rows, write_markdown,
    write_outputs, write_rows,
)

__all__ = ["main", "parse_args", "remeasure_latency", "GRID", "DEFAULT_IMAGES", "DEFAULT_MODEL", "MARK_BEGIN", "MARK_END",
           "build_configs", "tuned_fields", "_merge_fields", "write_markdown", "machine_info"]


def parse_args(argv):
    return grid.parse_args(argv, description=__doc__)


def remeasure_latency(args, argv) -> int:
    """``--latency-only``: re-time every row of ``<out>/bench.json`` (same settings otherwise) and
    rewrite the outputs; for a machine that was busier during the full run than it is now."""
    from ipcv_adapters.app.images import list_images, load_images

    meta, vanilla, rows = read_results(args.out)
    load_start = list(os.getloadavg())
    enc = Encoder(args.model)
    imgs = load_images(list_images(args.images, max(args.latency_batch, args.mem_batch)), meta["settings"]["fid_size"])
    lat_x, mem_x = imgs[: args.latency_batch], imgs[: args.mem_batch]
    enc(lat_x, VANILLA, 1.0)  # warm-up
    vanilla.peak_mem_mib = peak_rss_delta(lambda: enc(mem_x, VANILLA, 1.0))[1]
    ref_times = []
    for row in progress(rows, args.no_progress, desc="latency", unit="cfg"):
        runner = Config(row.method, row.retain, json.loads(row.params), row.variant).runner()
        tm = time_against_vanilla(enc, lat_x, runner, row.retain, args.repeats)
        ref_times.append(tm.ref_s)
        if math.isnan(row.latency_ratio_first_run):
            row.latency_ratio_first_run = row.latency_ratio
        for k, v in latency_fields(tm, len(lat_x)).items():
            setattr(row, k, v)
        row.peak_mem_mib = peak_rss_delta(lambda: enc(mem_x, runner, row.retain))[1]
    vanilla.latency_ms = vanilla.vanilla_latency_ms = 1000 * statistics.median(ref_times) / len(lat_x)
    vanilla.cpu_ratio = 1.0
    meta["vanilla"] = vanilla.to_dict()
    meta["latency"] = {"command": command_line(argv), "date": now(), "latency_batch": args.latency_batch,
                       "mem_batch": args.mem_batch,
                       "repeats": args.repeats, "threads": torch.get_num_threads(), "load_start": load_start,
                       "load_end": list(os.getloadavg())}
    write_outputs(args, meta, vanilla, rows)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    stable_malloc()
    if args.latency_only:
        return remeasure_latency(args, argv)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())

    enc = Encoder(args.model)
    data = load_inputs(enc, args)
    vanilla = measure_vanilla(enc, data, args)

    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "bench.partial.json")
    done = {r.key: r for r in read_rows(partial)} if args.resume and os.path.exists(partial) else {}
    rows = []
    configs = build_configs(args)
    bar = progress(configs, args.no_progress, desc="benchmark", unit="cfg")
    for cfg in bar:
        if cfg.key in done:
            rows.append(done[cfg.key])
            continue
        bar.set_postfix_str(f"{cfg.label} r={cfg.retain}")
        rows.append(measure(cfg, enc, data, args))
        write_rows(partial, rows)

    meta = {
        "command": command_line(argv),
        "date": now(),
        "machine": machine_info(),
        "model": args.model,
        "settings": settings_of(args),
        "n_patches_fid": int(vanilla.kept_patches),
        "vanilla": vanilla.to_dict(),
        **data.probe_meta,
    }
    os.makedirs(args.figures, exist_ok=True)
    make_pruning_map(enc, data.fid_x, args.map_retain, os.path.join(args.figures, "pruning_map.png"),
                     "IPCV / random / DART at l_p = 3; ToMe: tokens merged into others")
    meta["total_seconds"] = time.perf_counter() - t_start
    meta["load_start"], meta["load_end"] = load_start, list(os.getloadavg())
    write_outputs(args, meta, vanilla, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
