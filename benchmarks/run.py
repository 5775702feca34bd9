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

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ipcv_core import num_keep
from ipcv_core.methods import METHODS

from . import figures
from .cost import CountingBlock, ModelDims, count_flops, interleaved_latency, peak_rss_delta, stable_malloc
from .probe import fit_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
DEFAULT_MODEL = os.path.join(SHARED, "weights", "dinov2-small")
DEFAULT_IMAGES = os.path.join(SHARED, "data", "imagenet-samples")
DEFAULT_CIFAR = os.path.join(SHARED, "data", "cifar10-subset.npz")
HERE = os.path.dirname(os.path.abspath(__file__))

# run order = priority (a run cut short still has the main comparisons); tables follow this order too
GRID = ["ipcv", "tome", "tofu", "dart", "random_ipcv", "prune_copy", "ipcv_no_as", "ipcv_no_reint", "ipcv_sim", "prune_lp"]
# extra IPCV rows (issue evidence: smaller k, later l_p), at --extra-ratios
EXTRAS = [
    ("ipcv", {"k": 1}, "k=1"),
    ("ipcv", {"k": 3}, "k=3"),
    ("ipcv", {"prune_layer": 6, "as_depth": 6}, "l_p=6, Δ=6"),
]
# variants beyond the paper (issue 6) and the configs `ipcv tune` picked on ImageNet samples
# 100-131 (disjoint from the fidelity images 0-23 and from CIFAR), at --variant-ratios
VARIANTS = [
    ({"selection": "stratified"}, "stratified"),
    ({"selection": "stratified", "reconstruction": "spatial", "weighting": "similarity", "k": 6}, "stratified + spatial sim-NGR k=6"),
    ({"selection": "stratified", "reconstruction": "spatial", "weighting": "similarity", "k": 6, "merge": "size_bias"},
     "+ size-weighted attention"),
    ({"selection": "stratified", "reconstruction": "spatial", "weighting": "similarity", "k": 6, "prune_layer": 4,
      "as_depth": 2}, "+ l_p=4, Δ=2"),
    ({"selection": "random", "stages": [[2, 0.75]], "prune_layer": 4, "as_depth": 2}, "two-stage random"),
    # gradual bipartite merging (ToMe-style stage at every block 1..11 of DINOv2-S's 12, keys as the
    # metric, sizes + proportional attention) with IPCV's NGR (k=1) at reintegration; per ratio
    (lambda r: _merge_fields(r, front=1.0), "gradual merge + NGR k=1"),
    (lambda r: _merge_fields(r, front=0.8), "gradual merge + NGR k=1, front-loaded 0.8"),
]


def _merge_fields(retain: float, front: float) -> Dict:
    from ipcv_compile.tune import merge_family_config

    d = merge_family_config(retain, 12, front=front).to_dict()  # DINOv2-S: 12 blocks
    d.pop("retain")
    d.pop("extras")
    return d
TUNED_DIR = os.path.join(HERE, "tuned")
MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass
class Config:
    method: str
    retain: float
    params: Dict = field(default_factory=dict)
    variant: str = ""

    @property
    def label(self) -> str:
        base = figures.STYLE.get(self.method, (self.method,))[0]
        return f"{base} ({self.variant})" if self.variant else base

    def runner(self):
        return functools.partial(METHODS[self.method], **self.params)


# ----------------------------------------------------------------------------- settings
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke settings (< 2 min on 2 cores)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--cifar", default=DEFAULT_CIFAR)
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--methods", nargs="+", choices=GRID, help="grid methods (default: all)")
    ap.add_argument("--variant-ratios", dest="variant_ratios", type=float, nargs="*", default=None,
                    help="ratios for the rows of variants beyond the paper and the tuned configs "
                         "(default: 0.5 0.35 0.2; --quick: none)")
    ap.add_argument("--extra-ratios", type=float, nargs="*", help="ratios for the extra IPCV rows ([] = none)")
    ap.add_argument("--fid-images", type=int)
    ap.add_argument("--fid-size", type=int)
    ap.add_argument("--fid-batch", type=int, default=8)
    ap.add_argument("--probe-size", type=int)
    ap.add_argument("--train", type=int, help="CIFAR train images for the probe (balanced)")
    ap.add_argument("--test", type=int, help="CIFAR test images (balanced)")
    ap.add_argument("--probe-batch", type=int, default=100)
    ap.add_argument("--latency-batch", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--map-retain", type=float, default=0.35)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="results folder (default benchmarks/results, quick: benchmarks/results/quick)")
    ap.add_argument("--figures", help="figures folder (default benchmarks/figures, quick: the results folder)")
    ap.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--section", default="", help="write the results between <!-- results:SECTION:begin/end --> "
                    "markers of --markdown (default: the main results section)")
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"), help="vanilla feature cache ('' = off)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-time every row of <out>/bench.json (interleaved with vanilla), re-measure its peak memory "
                         "on --mem-batch images, and rewrite the outputs")
    ap.add_argument("--mem-batch", type=int, default=4, help="images per peak-memory measurement (--latency-only)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse rows of <out>/bench.partial.json (written after every configuration) and run the rest")
    args = ap.parse_args(argv)
    # full defaults: 46 grid + extra configurations, ~35 min on an idle 2-core CPU; the variant rows add ~17 (~15 min)
    full = dict(ratios=[0.65, 0.5, 0.35, 0.2], extra_ratios=[0.5, 0.2], variant_ratios=[0.5, 0.35, 0.2], fid_images=24, fid_size=448, probe_size=224,
                train=2000, test=400, latency_batch=2, repeats=3)
    quick = dict(ratios=[0.35], extra_ratios=[], variant_ratios=[], fid_images=2, fid_size=224, probe_size=112, train=100, test=50,
                 latency_batch=1, repeats=1)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = args.methods or GRID
    if args.out is None:
        args.out = os.path.join(HERE, "results", "quick") if args.quick else os.path.join(HERE, "results")
    if args.figures is None:
        args.figures = args.out if args.quick else os.path.join(HERE, "figures")
    if args.quick:
        args.no_markdown = True
    for s in (args.fid_size, args.probe_size):
        if s % 14:
            ap.error(f"image sizes must be multiples of the patch size 14, got {s}")
    return args


def tuned_fields(retain: float) -> Optional[Dict]:
    """The config `ipcv tune` wrote for DINOv2-S at ``retain`` (benchmarks/tuned/), minus retain."""
    path = os.path.join(TUNED_DIR, f"dinov2-small_r{retain}.json")
    if not os.path.exists(path):
        return None
    from ipcv_core import IPCVConfig

    d = IPCVConfig.from_json(path).to_dict()
    d.pop("retain")
    d.pop("extras")
    return d


def build_configs(args) -> List[Config]:
    cfgs = [Config(m, r) for m in GRID if m in args.methods for r in args.ratios]
    cfgs += [Config(m, r, dict(p), v) for r in args.extra_ratios for m, p, v in EXTRAS]
    for r in getattr(args, "variant_ratios", None) or []:
        cfgs += [Config("ipcv_config", r, p(r) if callable(p) else dict(p), v) for p, v in VARIANTS]
        t = tuned_fields(r)
        if t is not None:
            cfgs.append(Config("ipcv_config", r, t, "tuned"))
    return cfgs


# ----------------------------------------------------------------------------- data
def balanced(labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n / classes`` indices of each class (classes interleaved)."""
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    idx = [np.nonzero(labels == c)[0][:per] for c in classes]
    return np.stack(idx, 1).reshape(-1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    from ipcv_adapters.images import IMAGENET_MEAN, IMAGENET_STD

    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------- model plumbing
class Encoder:
    def __init__(self, model_path: str):
        from ipcv_adapters.dinov2 import dinov2_branches, dinov2_layout, load_dinov2

        self.model = load_dinov2(model_path)
        self.blocks = dinov2_branches(self.model)
        self.layout = dinov2_layout(self.model)
        c = self.model.config
        self.dims = ModelDims(c.hidden_size, int(round(c.hidden_size * c.mlp_ratio)), c.patch_size, c.num_channels)
        self.depth = len(self.blocks)

    def __call__(self, x: torch.Tensor, runner, retain: float, blocks=None):
        emb = self.model.embeddings(x)
        res = runner(emb, blocks or self.blocks, retain, self.layout)
        return self.model.layernorm(res.hidden_states), res

    @staticmethod
    def features(tokens: torch.Tensor) -> torch.Tensor:
        """Probe features: CLS concatenated with the mean patch token."""
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


def fidelity(out: torch.Tensor, ref: torch.Tensor, removed: torch.Tensor) -> Dict[str, List[float]]:
    """Per-image metrics on the patch tokens (CLS excluded; ``cos_cls`` separately)."""
    o, r, rem = out[:, 1:].double(), ref[:, 1:].double(), removed[:, 1:]
    cos = F.cosine_similarity(o, r, dim=-1)
    err2, ref2 = (o - r).pow(2).sum(-1), r.pow(2).sum(-1)
    nan = torch.full((o.shape[0],), math.nan, dtype=torch.float64)

    def on(mask):
        cnt = mask.sum(1)
        c = torch.where(cnt > 0, (cos * mask).sum(1) / cnt.clamp_min(1), nan)
        e = torch.where(cnt > 0, ((err2 * mask).sum(1) / (ref2 * mask).sum(1).clamp_min(1e-30)).sqrt(), nan)
        return c, e

    c_rem, e_rem = on(rem)
    c_kept, _ = on(~rem)
    return {
        "cos_all": cos.mean(1).tolist(),
        "rel_l2_all": (err2.sum(1) / ref2.sum(1)).sqrt().tolist(),
        "cos_removed": c_rem.tolist(),
        "rel_l2_removed": e_rem.tolist(),
        "cos_kept": c_kept.tolist(),
        "cos_cls": F.cosine_similarity(out[:, 0].double(), ref[:, 0].double(), dim=-1).tolist(),
    }


def _mean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _progress(it, disable, **kw):
    from tqdm import tqdm

    return tqdm(it, disable=disable, dynamic_ncols=True, **kw)


def probe_features(enc: Encoder, images: np.ndarray, size: int, runner, retain: float, batch: int, bar=None) -> torch.Tensor:
    from ipcv_adapters.images import to_tensor

    feats = []
    for i in range(0, len(images), batch):
        tok, _ = enc(to_tensor(images[i : i + batch], size), runner, retain)
        feats.append(Encoder.features(tok))
        if bar is not None:
            bar.update(len(images[i : i + batch]))
    return torch.cat(feats)


def cached_vanilla_features(enc, images, size, batch, cache, key, disable):
    path = os.path.join(cache, f"{key}.pt") if cache else None
    if path and os.path.exists(path):
        return torch.load(path)
    bar = _progress(None, disable, total=len(images), desc=f"vanilla features {key}", leave=False)
    f = probe_features(enc, images, size, METHODS["vanilla"], 1.0, batch, bar)
    bar.close()
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(f, path)
    return f


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


# ----------------------------------------------------------------------------- one configuration
def measure(cfg: Config, enc: Encoder, data, refs, vanilla_fn, args) -> dict:
    t0 = time.perf_counter()
    runner = cfg.runner()
    fid_x, lat_x = data["fid_x"], data["lat_x"]
    per_img: Dict[str, List[float]] = {}
    flops = mem = math.nan
    for ci, i in enumerate(range(0, len(fid_x), args.fid_batch)):
        x = fid_x[i : i + args.fid_batch]
        if ci == 0:  # counted and memory-measured batch
            log = []
            blocks = [CountingBlock(b, log) for b in enc.blocks]
            (out, res), mem = peak_rss_delta(lambda: enc(x, runner, cfg.retain, blocks))
            flops = count_flops(log, enc.dims, out.shape[1] - 1, res.overhead_flops)
            kept = int((~res.removed[0, 1:]).sum())
        else:
            out, res = enc(x, runner, cfg.retain)
        for k, v in fidelity(out, refs[i : i + args.fid_batch], res.removed).items():
            per_img.setdefault(k, []).extend(v)
    acc = math.nan
    if data["probe"] is not None:
        feats = probe_features(enc, data["test_images"], args.probe_size, runner, cfg.retain, args.probe_batch)
        acc = data["probe"].accuracy(feats, data["test_y"])
    tm = interleaved_latency(lambda: enc(lat_x, vanilla_fn, 1.0), lambda: enc(lat_x, runner, cfg.retain), args.repeats)
    row = {
        "method": cfg.method,
        "variant": cfg.variant,
        "label": cfg.label,
        "retain": cfg.retain,
        "params": json.dumps(cfg.params, sort_keys=True),
        "kept_patches": kept,
        **{k: _mean(v) for k, v in per_img.items()},
        "probe_acc": acc,
        "latency_ms": 1000 * tm.s / len(lat_x),
        "vanilla_latency_ms": 1000 * tm.ref_s / len(lat_x),
        "latency_ratio": tm.ratio,
        "cpu_ratio": tm.cpu_ratio,
        "gflops": flops / 1e9,
        "flop_ratio": flops / data["vanilla_flops"],
        "peak_mem_mib": mem,
        "seconds": time.perf_counter() - t0,
    }
    return row


# ----------------------------------------------------------------------------- outputs
COLUMNS = ["method", "variant", "label", "retain", "params", "kept_patches", "cos_all", "cos_removed", "cos_kept",
           "cos_cls", "rel_l2_all", "rel_l2_removed", "probe_acc", "latency_ms", "vanilla_latency_ms",
           "latency_ratio", "cpu_ratio", "latency_ratio_first_run", "gflops", "flop_ratio", "peak_mem_mib", "seconds"]


def _f(v, nd=3):
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: List[dict], vanilla: dict) -> str:
    head = ("| method | retain | kept / img | cos all | cos removed | cos kept | rel L2 all | probe acc | "
            "latency ratio | CPU-time ratio | FLOP ratio | peak MiB |")
    lines = [head, "|" + "---|" * 12]

    def line(r):
        return (f"| {r['label']} | {_f(r['retain'], 2)} | {r['kept_patches']} | {_f(r['cos_all'])} | "
                f"{_f(r['cos_removed'])} | {_f(r['cos_kept'])} | {_f(r['rel_l2_all'])} | {_f(r['probe_acc'])} | "
                f"{_f(r['latency_ratio'], 2)} | {_f(r.get('cpu_ratio', math.nan), 2)} | {_f(r['flop_ratio'], 2)} | "
                f"{_f(r['peak_mem_mib'], 0)} |")

    lines.append(line(vanilla))
    order = {m: i for i, m in enumerate(GRID)}
    for r in sorted(rows, key=lambda r: (-r["retain"], r["variant"] != "", order.get(r["method"], 99), r["variant"])):
        lines.append(line(r))
    return "\n".join(lines)


def _markers(section: str):
    if not section:
        return MARK_BEGIN, MARK_END
    return f"<!-- results:{section}:begin -->", f"<!-- results:{section}:end -->"


def write_markdown(path: str, meta: dict, table: str, section: str = "", out_dir: Optional[str] = None,
                   fig_dir: Optional[str] = None) -> None:
    """Rewrite the part of ``path`` between the section's markers (``--section NAME``: markers
    ``<!-- results:NAME:begin/end -->``, so several runs can live in one file)."""
    begin, end = _markers(section)
    rel = lambda d, default: os.path.relpath(d, os.path.dirname(os.path.abspath(path))) if d else default
    out_rel, fig_rel = rel(out_dir, "benchmarks/results"), rel(fig_dir, "benchmarks/figures")
    s = meta["settings"]
    lat = meta.get("latency") or {"latency_batch": s["latency_batch"], "repeats": s["repeats"]}
    latency = (f"Latency: a batch of {lat['latency_batch']} image(s) at {s['fid_size']} px, {lat['repeats']} runs "
               f"interleaved with vanilla, median of the per-pair ratios of wall-clock time (CPU-time ratio: the same "
               f"with process CPU time, which depends far less on other processes' load); vanilla "
               f"{meta['vanilla']['latency_ms']:.0f} ms / image. ")
    if "command" in lat:
        latency += (f"Latency columns re-measured by `{lat['command']}` on {lat['date']} with {lat['threads']} torch "
                    f"thread(s) (load average {lat['load_start'][0]:.1f} → {lat['load_end'][0]:.1f}); the first run's "
                    "ratios are kept in the CSV (`latency_ratio_first_run`). ")
    body = "\n".join([
        begin,
        f"Generated by `{meta['command']}` on {meta['date']} — {meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, torch {meta['machine']['torch']} with {meta['machine']['torch_threads']} "
        f"threads, {meta['machine']['os']}. "
        + (f"{meta['execution']} " if meta.get("execution") else "")
        + f"Total {meta['total_seconds'] / 60:.1f} min; load average "
        f"{meta['load_start'][0]:.1f} at the start, {meta['load_end'][0]:.1f} at the end (the machine is shared: "
        "a load above the core count means other processes competed for the CPU).",
        "",
        f"Fidelity: {s['fid_images']} ImageNet samples at {s['fid_size']} px "
        f"({meta['n_patches_fid']} patches + CLS). Probe: CIFAR-10, fit on vanilla features of {s['train']} train "
        f"images, evaluated on {s['test']} test images at {s['probe_size']} px (vanilla probe accuracy "
        f"{meta['vanilla']['probe_acc']:.3f}, weight decay {meta['probe_weight_decay']} by 5-fold CV, CV accuracy "
        f"{meta['probe_cv_acc']:.3f}). {latency}FLOP ratio = analytic FLOPs / vanilla's ({meta['vanilla']['gflops']:.1f} GFLOPs / image at "
        f"{s['fid_size']} px). Peak MiB: resident-memory peak added by one batch of "
        f"{lat.get('mem_batch', s['fid_batch'])} images at {s['fid_size']} px (vanilla "
        f"{meta['vanilla']['peak_mem_mib']:.0f}). Raw numbers: "
        f"[bench.csv]({out_rel}/bench.csv), [bench.json]({out_rel}/bench.json).",
        "",
        table,
        "",
        f"![accuracy and fidelity vs latency]({fig_rel}/pareto.png)",
        "",
        *([f"![pruning maps]({fig_rel}/pruning_map.png)"] if os.path.exists(os.path.join(fig_dir or os.path.join(ROOT, "benchmarks/figures"), "pruning_map.png")) else []),
        end,
    ])
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n## Results" + (f": {section}" if section else "") + "\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


def make_pruning_map(enc: Encoder, x: torch.Tensor, retain: float, path: str, depth_hint: str) -> None:
    panels = {}
    for method in ("ipcv", "random_ipcv", "dart", "tome"):
        _, res = enc(x[:1], METHODS[method], retain)
        panels[figures.STYLE[method][0]] = res.removed[0, 1:].numpy()
    n = x.shape[-1] // enc.dims.patch
    figures.pruning_map(to_uint8(x[0]), n, panels, path,
                        f"DINOv2-S, retain {retain}: removed / merged-away patches tinted ({depth_hint})")


# ----------------------------------------------------------------------------- main
def _command(argv) -> str:
    return "python -m benchmarks.run" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_outputs(args, meta: dict, vanilla: dict, rows: List[dict]) -> None:
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    figures.pareto(rows, vanilla, os.path.join(args.figures, "pareto.png"),
                   f"DINOv2-S on {meta['machine']['cores']}-core CPU — grid methods, retain "
                   + "/".join(f"{r:g}" for r in meta["settings"]["ratios"]),
                   meta["settings"]["fid_size"], meta["settings"]["probe_size"])
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in [vanilla] + rows:
            w.writerow({k: r.get(k, math.nan) for k in COLUMNS})
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": [vanilla] + rows}, f, indent=1, default=str)
    table = markdown_table(rows, vanilla)
    if not args.no_markdown:
        write_markdown(args.markdown, meta, table, args.section, args.out, args.figures)
    print(table)
    print(f"\nwrote {args.out}/bench.csv, bench.json; figures in {args.figures}")


def remeasure_latency(args, argv) -> int:
    """``--latency-only``: re-time every row of ``<out>/bench.json`` (same settings otherwise) and
    rewrite the outputs; for a machine that was busier during the full run than it is now."""
    from ipcv_adapters.images import list_images, load_images

    with open(os.path.join(args.out, "bench.json")) as f:
        saved = json.load(f)
    meta, (vanilla, *rows) = saved["meta"], saved["rows"]
    load_start = list(os.getloadavg())
    enc = Encoder(args.model)
    imgs = load_images(list_images(args.images, max(args.latency_batch, args.mem_batch)), meta["settings"]["fid_size"])
    lat_x, mem_x = imgs[: args.latency_batch], imgs[: args.mem_batch]
    vanilla_fn = METHODS["vanilla"]
    enc(lat_x, vanilla_fn, 1.0)  # warm-up
    vanilla["peak_mem_mib"] = peak_rss_delta(lambda: enc(mem_x, vanilla_fn, 1.0))[1]
    ref_times = []
    for row in _progress(rows, args.no_progress, desc="latency", unit="cfg"):
        cfg = Config(row["method"], row["retain"], json.loads(row["params"]), row["variant"])
        runner = cfg.runner()
        tm = interleaved_latency(lambda: enc(lat_x, vanilla_fn, 1.0), lambda: enc(lat_x, runner, cfg.retain), args.repeats)
        ref_times.append(tm.ref_s)
        row.setdefault("latency_ratio_first_run", row["latency_ratio"])
        row.update(latency_ms=1000 * tm.s / len(lat_x), vanilla_latency_ms=1000 * tm.ref_s / len(lat_x),
                   latency_ratio=tm.ratio, cpu_ratio=tm.cpu_ratio,
                   peak_mem_mib=peak_rss_delta(lambda: enc(mem_x, runner, cfg.retain))[1])
    vanilla.update(latency_ms=1000 * statistics.median(ref_times) / len(lat_x), cpu_ratio=1.0)
    vanilla["vanilla_latency_ms"] = vanilla["latency_ms"]
    meta["vanilla"] = vanilla
    meta["latency"] = {"command": _command(argv), "date": _now(), "latency_batch": args.latency_batch,
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
    from ipcv_adapters.images import list_images, load_images

    enc = Encoder(args.model)
    fid_x = load_images(list_images(args.images, args.fid_images), args.fid_size)
    lat_x = fid_x[: args.latency_batch]
    vanilla_fn = METHODS["vanilla"]
    refs = torch.cat([enc(fid_x[i : i + args.fid_batch], vanilla_fn, 1.0)[0] for i in range(0, len(fid_x), args.fid_batch)])

    data = {"fid_x": fid_x, "lat_x": lat_x, "probe": None}
    meta_probe = {"probe_weight_decay": math.nan, "probe_cv_acc": math.nan}
    if args.train and args.test:
        npz = np.load(args.cifar)
        tr = balanced(npz["train_labels"], args.train)
        te = balanced(npz["test_labels"], args.test)
        key = f"dinov2s_cifar_{args.probe_size}px"
        ftr = cached_vanilla_features(enc, npz["train_images"][tr], args.probe_size, args.probe_batch, args.cache,
                                      f"{key}_train{len(tr)}", args.no_progress)
        probe = fit_probe(ftr, torch.from_numpy(npz["train_labels"][tr]).long(), 10)
        data.update(probe=probe, test_images=npz["test_images"][te], test_y=torch.from_numpy(npz["test_labels"][te]).long())
        fte = cached_vanilla_features(enc, npz["test_images"][te], args.probe_size, args.probe_batch, args.cache,
                                      f"{key}_test{len(te)}", args.no_progress)
        meta_probe = {"probe_weight_decay": probe.weight_decay, "probe_cv_acc": probe.cv_accuracy}

    # vanilla row (its own latency ratio is 1 by definition; FLOPs / memory measured like the others)
    log = []
    (vout, _), vmem = peak_rss_delta(lambda: enc(fid_x[: args.fid_batch], vanilla_fn, 1.0,
                                                 [CountingBlock(b, log) for b in enc.blocks]))
    data["vanilla_flops"] = count_flops(log, enc.dims, vout.shape[1] - 1, 0.0)
    t_ref = interleaved_latency(lambda: enc(lat_x, vanilla_fn, 1.0), lambda: None, args.repeats).ref_s
    vanilla = {
        "method": "vanilla", "variant": "", "label": "vanilla", "retain": 1.0, "params": "{}",
        "kept_patches": vout.shape[1] - 1, "cos_all": 1.0, "cos_removed": math.nan, "cos_kept": 1.0, "cos_cls": 1.0,
        "rel_l2_all": 0.0, "rel_l2_removed": math.nan,
        "probe_acc": data["probe"].accuracy(fte, data["test_y"]) if data["probe"] is not None else math.nan,
        "latency_ms": 1000 * t_ref / len(lat_x), "vanilla_latency_ms": 1000 * t_ref / len(lat_x), "latency_ratio": 1.0,
        "cpu_ratio": 1.0, "gflops": data["vanilla_flops"] / 1e9, "flop_ratio": 1.0, "peak_mem_mib": vmem,
        "seconds": 0.0,
    }

    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "bench.partial.json")
    done = {}
    if args.resume and os.path.exists(partial):
        for r in json.load(open(partial)):
            done[(r["method"], r["retain"], r["params"])] = r
    rows = []
    configs = build_configs(args)
    bar = _progress(configs, args.no_progress, desc="benchmark", unit="cfg")
    for cfg in bar:
        key = (cfg.method, cfg.retain, json.dumps(cfg.params, sort_keys=True))
        if key in done:
            rows.append(done[key])
            continue
        bar.set_postfix_str(f"{cfg.label} r={cfg.retain}")
        rows.append(measure(cfg, enc, data, refs, vanilla_fn, args))
        with open(partial, "w") as f:
            json.dump(rows, f, indent=1)

    settings = {k: getattr(args, k) for k in ("ratios", "extra_ratios", "methods", "fid_images", "fid_size", "fid_batch",
                                              "probe_size", "train", "test", "latency_batch", "repeats", "quick")}
    meta = {
        "command": _command(argv),
        "date": _now(),
        "machine": machine_info(),
        "model": args.model,
        "settings": settings,
        "n_patches_fid": int(vout.shape[1] - 1),
        "vanilla": vanilla,
        **meta_probe,
    }
    os.makedirs(args.figures, exist_ok=True)
    make_pruning_map(enc, fid_x, args.map_retain, os.path.join(args.figures, "pruning_map.png"),
                     "IPCV / random / DART at l_p = 3; ToMe: tokens merged into others")
    meta["total_seconds"] = time.perf_counter() - t_start
    meta["load_start"], meta["load_end"] = load_start, list(os.getloadavg())
    write_outputs(args, meta, vanilla, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
