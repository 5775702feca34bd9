"""What the benchmark writes: the one row type (:class:`Row`), ``bench.csv`` / ``bench.json`` /
``bench.partial.json``, the markdown table, the results section of BENCHMARKS.md and the figures.

A :class:`Row` is one configuration's results.  Its fields, in order, are the CSV columns and the
keys of every JSON record (``bench.json``'s ``rows``, ``bench.partial.json``); the fields with a
markdown header are the columns of the markdown table, in the same order; ``--resume`` and
``--latency-only`` read rows back with :meth:`Row.from_dict`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
from dataclasses import MISSING, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import figures
from .grid import GRID, ROOT
from .methods import METHODS

MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"
NAN = math.nan


def _md(header: str, digits: int = 3, default=NAN):
    """A field shown in the markdown table under ``header`` (floats with ``digits`` decimals);
    ``default=MISSING``: a required field."""
    return field(default=default, metadata={"md": header, "digits": digits})


@dataclass
class Row:
    """One configuration's results (see the module docstring for what the fields define)."""

    method: str
    variant: str  # "" for the grid rows
    label: str = _md("method", default=MISSING)
    retain: float = _md("retain", 2, default=MISSING)
    params: str  # the runner's options, JSON with sorted keys (with method and retain: the row's key)
    kept_patches: int = _md("kept / img", default=MISSING)
    cos_all: float = _md("cos all")
    cos_removed: float = _md("cos removed")
    cos_kept: float = _md("cos kept")
    cos_cls: float = NAN
    rel_l2_all: float = _md("rel L2 all")
    rel_l2_removed: float = NAN
    probe_acc: float = _md("probe acc")
    latency_ms: float = NAN  # per image
    vanilla_latency_ms: float = NAN  # per image, the vanilla runs interleaved with this row's
    latency_ratio: float = _md("latency ratio", 2)  # median of the per-pair ratios
    cpu_ratio: float = _md("CPU-time ratio", 2)
    latency_ratio_first_run: float = NAN  # --latency-only: the ratio measured by the full run
    gflops: float = NAN  # per image
    flop_ratio: float = _md("FLOP ratio", 2)
    peak_mem_mib: float = _md("peak MiB", 0)
    seconds: float = NAN  # wall time spent measuring the row

    @property
    def key(self) -> Tuple[str, float, str]:
        return self.method, self.retain, self.params

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "Row":
        """A row read back from a JSON record (fields it lacks take their defaults)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


COLUMNS = [f.name for f in dataclasses.fields(Row)]
MD_COLUMNS = [(f.metadata["md"], f.name, f.metadata["digits"]) for f in dataclasses.fields(Row) if "md" in f.metadata]


# ----------------------------------------------------------------------------- markdown
def _f(v, nd=3):
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: List[Row], vanilla: Row) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]

    def line(r: Row) -> str:
        return "| " + " | ".join(_f(getattr(r, name), nd) for _, name, nd in MD_COLUMNS) + " |"

    lines.append(line(vanilla))
    order = {m: i for i, m in enumerate(GRID)}
    for r in sorted(rows, key=lambda r: (-r.retain, r.variant != "", order.get(r.method, 99), r.variant)):
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


# ----------------------------------------------------------------------------- run metadata
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


def command_line(argv, module: str = "benchmarks.run") -> str:
    return f"python -m {module}" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- files
def write_rows(path: str, rows: List[Row]) -> None:
    """``bench.partial.json``: the rows measured so far (``--resume`` reads them back)."""
    with open(path, "w") as f:
        json.dump([r.to_dict() for r in rows], f, indent=1)


def read_rows(path: str) -> List[Row]:
    with open(path) as f:
        return [Row.from_dict(d) for d in json.load(f)]


def read_results(out_dir: str) -> Tuple[dict, Row, List[Row]]:
    """``<out>/bench.json``: its meta, the vanilla row and the others (``--latency-only``)."""
    with open(os.path.join(out_dir, "bench.json")) as f:
        saved = json.load(f)
    vanilla, *rows = (Row.from_dict(d) for d in saved["rows"])
    return saved["meta"], vanilla, rows


def write_outputs(args, meta: dict, vanilla: Row, rows: List[Row]) -> None:
    """bench.csv, bench.json (``meta`` and the rows), pareto.png and the markdown table (printed;
    into --markdown unless --no-markdown)."""
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    records = [r.to_dict() for r in [vanilla] + rows]
    figures.pareto(records[1:], records[0], os.path.join(args.figures, "pareto.png"),
                   f"DINOv2-S on {meta['machine']['cores']}-core CPU — grid methods, retain "
                   + "/".join(f"{r:g}" for r in meta["settings"]["ratios"]),
                   meta["settings"]["fid_size"], meta["settings"]["probe_size"])
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(records)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": records}, f, indent=1, default=str)
    table = markdown_table(rows, vanilla)
    if not args.no_markdown:
        write_markdown(args.markdown, meta, table, args.section, args.out, args.figures)
    print(table)
    print(f"\nwrote {args.out}/bench.csv, bench.json; figures in {args.figures}")


# ----------------------------------------------------------------------------- pruning map
def to_uint8(x: torch.Tensor) -> np.ndarray:
    from ipcv_adapters.app.images import IMAGENET_MEAN, IMAGENET_STD

    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def make_pruning_map(enc, x: torch.Tensor, retain: float, path: str, depth_hint: str) -> None:
    """``enc``: a :class:`benchmarks.metrics.Encoder`; the first image of ``x`` under IPCV, random
    keep, DART and ToMe."""
    panels = {}
    for method in ("ipcv", "random_ipcv", "dart", "tome"):
        _, res = enc(x[:1], METHODS[method], retain)
        panels[figures.STYLE[method][0]] = res.removed[0, 1:].numpy()
    n = x.shape[-1] // enc.dims.patch
    figures.pruning_map(to_uint8(x[0]), n, panels, path,
                        f"DINOv2-S, retain {retain}: removed / merged-away patches tinted ({depth_hint})")
