"""Tune the shipped DINOv2-S configs (``benchmarks/tuned/dinov2-small_r{R}.json``), as ``ipcv tune``
does, with the options of :func:`ipcv_adapters.tune.tune_tower` the CLI does not expose yet
(``--families``, ``--max-cost``, ``--threads``).

    python -m benchmarks.tune_dinov2 --retain 0.5 [--budget latency] [--families merge]
        [--offset 100 --num-images 100 --batch 2 --screen-batches 4] [--max-cost 1.0] [--threads 1]

Tuning images: ImageNet samples ``offset .. offset+num_images-1`` (default 100..199 — disjoint from
the harness's fidelity images 0..23 and from every other image the reports use); candidates are
screened on the first ``screen-batches`` batches and the best few confirmed on all of them.  The
budget (``--budget``) is the paper's IPCV at the same retain ratio: its analytic FLOPs (``tokens``)
or the measured latency of its rewritten graph (``latency``: interleaved timing of the first batch,
3 % tolerance), times ``--max-cost``.  Writes the JSON config and prints the search log.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, TUNED_DIR


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--retain", type=float, required=True)
    ap.add_argument("--budget", choices=("tokens", "latency"), default="latency")
    ap.add_argument("--max-cost", dest="max_cost", type=float, default=1.0)
    ap.add_argument("--families", nargs="+", default=["prune", "merge"], choices=["prune", "merge"])
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--num-images", dest="num_images", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--screen-batches", dest="screen", type=int, default=4)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per candidate (--budget latency)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help=f"default: {TUNED_DIR}/dinov2-small_r<RETAIN>.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ipcv_adapters.app.images import list_images, load_images
    from ipcv_adapters.dinov2 import load_dinov2
    from ipcv_adapters.tune import tune_tower
    from ipcv_core.search import short_description

    tower = load_dinov2(args.model)
    files = list_images(args.images)[args.offset: args.offset + args.num_images]
    batches = [dict(pixel_values=load_images(files[i: i + args.batch], args.size))
               for i in range(0, len(files), args.batch)]
    print(f"tune: DINOv2 {args.model}, images {args.offset}..{args.offset + len(files) - 1} at {args.size} px, "
          f"retain {args.retain}, budget {args.budget} x {args.max_cost}, families {args.families}, "
          f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.time()
    res = tune_tower(tower, batches, args.retain, args.budget, passes=args.passes,
                     progress=lambda m: print("  " + m, flush=True), screen=args.screen, repeats=args.repeats,
                     max_cost=args.max_cost, families=tuple(args.families))
    print(res.format_table(20))
    print(f"\nbest: {short_description(res.best)}\nreference (paper): {short_description(res.reference)}\n"
          f"({time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f})")
    out = args.out or os.path.join(TUNED_DIR, f"dinov2-small_r{args.retain}.json")
    res.best.to_json(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
