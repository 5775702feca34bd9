"""What the benchmark runs: the grid of methods x retain ratios, the extra IPCV rows, the variants
beyond the paper and the tuned configs (:func:`build_configs`), and the run's settings
(:func:`parse_args`: the options of ``python -m benchmarks.run``, with the full and ``--quick``
defaults)."""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import figures
from .methods import METHODS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
DEFAULT_MODEL = os.path.join(SHARED, "weights", "dinov2-small")
DEFAULT_IMAGES = os.path.join(SHARED, "data", "imagenet-samples")
DEFAULT_CIFAR = os.path.join(SHARED, "data", "cifar10-subset.npz")
TUNED_DIR = os.path.join(HERE, "tuned")

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
# issue 16: stages between attention and FFN on the attention's own keys (ToMe's placement, with
# IPCV's NGR at reintegration), ToMe itself as a rewrite (copy unmerge), and one row per idea, at
# --variant-ratios with --variant-set issue16 (DINOv2-S: 12 blocks; merges at blocks 0..11)
POST = dict(placement="post_attention", first=0)
VARIANTS_16 = [
    (lambda r: _merge_fields(r, front=1.0), "merge at block input (issue 6)"),
    (lambda r: _merge_fields(r, front=1.0, reconstruction="copy", **POST), "ToMe as a rewrite (post-attention, copy unmerge)"),
    (lambda r: _merge_fields(r, front=1.0, **POST), "post-attention merge + NGR"),
    (lambda r: _merge_fields(r, front=1.0, k=3, **POST), "post-attention merge + NGR k=3"),
    (lambda r: _merge_fields(r, front=1.0, merge="size_bias", **POST), "post-attention prune + mass bias"),
    (lambda r: _merge_fields(r, front=1.0, merge="none", **POST), "post-attention prune, no bias"),
    (lambda r: _merge_fields(r, front=1.0, every=2, **POST), "post-attention merge, every 2nd block"),
    (lambda r: _merge_fields(r, front=0.7, **POST), "post-attention merge, front 0.7"),
    (lambda r: _merge_fields(r, front=1.5, **POST), "post-attention merge, front 1.5"),
]
VARIANT_SETS = {"issue6": VARIANTS, "issue16": VARIANTS_16, "all": VARIANTS + VARIANTS_16}
# the settings recorded in bench.json's meta (and read back by the report)
SETTINGS = ("ratios", "extra_ratios", "methods", "fid_images", "fid_size", "fid_batch", "probe_size", "train", "test",
            "latency_batch", "repeats", "quick", "variant_set", "method_ratios")


def _merge_fields(retain: float, front: float, **kw) -> Dict:
    from ipcv_core.search import merge_family_config

    d = merge_family_config(retain, 12, front=front, **kw).to_dict()  # DINOv2-S: 12 blocks
    d.pop("retain")
    d.pop("extras")
    return d


@dataclass
class Config:
    """One configuration: a runner of :data:`benchmarks.methods.METHODS` with its options at one ratio."""

    method: str
    retain: float
    params: Dict = field(default_factory=dict)
    variant: str = ""

    @property
    def label(self) -> str:
        base = figures.STYLE.get(self.method, (self.method,))[0]
        return f"{base} ({self.variant})" if self.variant else base

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def key(self) -> Tuple[str, float, str]:
        """What identifies the configuration's row (``--resume``): method, retain, options."""
        return self.method, self.retain, self.params_json

    def runner(self):
        return functools.partial(METHODS[self.method], **self.params)


# ----------------------------------------------------------------------------- settings
def parse_args(argv, description: Optional[str] = None):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke settings (< 2 min on 2 cores)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--cifar", default=DEFAULT_CIFAR)
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--methods", nargs="+", choices=GRID, help="grid methods (default: all)")
    ap.add_argument("--variant-ratios", dest="variant_ratios", type=float, nargs="*", default=None,
                    help="ratios for the rows of variants beyond the paper and the tuned configs "
                         "(default: 0.5 0.35 0.2; --quick: none)")
    ap.add_argument("--variant-set", dest="variant_set", choices=sorted(VARIANT_SETS), default="issue6",
                    help="which variant rows run at --variant-ratios (issue6: the variants of issue 6; issue16: the "
                         "post-attention family, its ablations and ToMe at the tuned configs' schedule (tome_twin); all)")
    ap.add_argument("--extra-ratios", type=float, nargs="*", help="ratios for the extra IPCV rows ([] = none)")
    ap.add_argument("--method-ratios", dest="method_ratios", nargs="*", default=[], metavar="METHOD=R,R",
                    help="more ratios for some grid methods, e.g. tome=0.42,0.27,0.1 (frontier points)")
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


def settings_of(args) -> Dict:
    return {k: getattr(args, k) for k in SETTINGS}


def tuned_alternates(retain: float) -> Dict[str, Dict]:
    """Other tuned configs at ``retain`` (``benchmarks/tuned/dinov2-small_r{retain}_{NAME}.json``,
    e.g. tuned under another budget): ``{NAME: fields minus retain}``."""
    out = {}
    prefix = f"dinov2-small_r{retain}_"
    for name in sorted(os.listdir(TUNED_DIR)) if os.path.isdir(TUNED_DIR) else []:
        if name.startswith(prefix) and name.endswith(".json"):
            out[name[len(prefix):-5]] = tuned_fields(retain, os.path.join(TUNED_DIR, name))
    return out


def tuned_fields(retain: float, path: Optional[str] = None) -> Optional[Dict]:
    """The config `ipcv tune` wrote for DINOv2-S at ``retain`` (benchmarks/tuned/), minus retain."""
    path = path or os.path.join(TUNED_DIR, f"dinov2-small_r{retain}.json")
    if not os.path.exists(path):
        return None
    from ipcv_core import IPCVConfig

    d = IPCVConfig.from_json(path).to_dict()
    d.pop("retain")
    d.pop("extras")
    return d


def tome_twin(fields: Dict) -> Optional[Dict]:
    """ToMe at exactly the FLOPs of a tuned merge config: the same bipartite schedule, placement and
    proportional attention, with ToMe's unmerge (``reconstruction="copy"``: every merged token takes
    its absorber's final value) instead of NGR.  None for a config that is not a k=1 merge with NGR
    (nothing to compare at equal FLOPs)."""
    if fields.get("selection") != "bipartite" or fields.get("merge") != "average" or fields.get("k") != 1 \
            or fields.get("reconstruction") != "feature":
        return None
    return {**fields, "reconstruction": "copy"}


def method_ratios(specs) -> Dict[str, List[float]]:
    """``["tome=0.42,0.27", ...]`` -> ``{"tome": [0.42, 0.27]}`` (methods of :data:`GRID`)."""
    out: Dict[str, List[float]] = {}
    for spec in specs or []:
        name, _, ratios = spec.partition("=")
        if name not in GRID or not ratios:
            raise ValueError(f"--method-ratios takes METHOD=R,R with METHOD in {GRID}, got {spec!r}")
        out.setdefault(name, []).extend(float(x) for x in ratios.split(","))
    return out


def build_configs(args) -> List[Config]:
    cfgs = [Config(m, r) for m in GRID if m in args.methods for r in args.ratios]
    for m, rs in method_ratios(getattr(args, "method_ratios", [])).items():
        cfgs += [Config(m, r) for r in rs if r not in args.ratios]
    cfgs += [Config(m, r, dict(p), v) for r in args.extra_ratios for m, p, v in EXTRAS]
    vset = getattr(args, "variant_set", "issue6")
    for r in getattr(args, "variant_ratios", None) or []:
        cfgs += [Config("ipcv_config", r, p(r) if callable(p) else dict(p), v) for p, v in VARIANT_SETS[vset]]
        t = tuned_fields(r)
        if t is not None:
            cfgs.append(Config("ipcv_config", r, t, "tuned"))
            same = tome_twin(t) if vset in ("issue16", "all") else None
            if same is not None:
                cfgs.append(Config("ipcv_config", r, same, "ToMe as a rewrite, tuned schedule"))
        for name, fields in tuned_alternates(r).items():
            cfgs.append(Config("ipcv_config", r, fields, f"tuned, {name}"))
    return cfgs
