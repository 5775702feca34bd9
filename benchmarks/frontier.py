"""The frontier of issue 16: fidelity and probe accuracy vs analytic FLOPs and vs measured compiled
latency, every method in one run, DINOv2-S.

    python -m benchmarks.frontier --bench benchmarks/results/issue16 [--backends eager inductor onnx]
                                  [--repeats 5] [--batch 2] [--only LABEL ...] [--section issue16]

Step 1 is a harness run (``python -m benchmarks.run ... --variant-set issue16 --out DIR``): fidelity
on the held-out ImageNet samples, the CIFAR probe, analytic FLOPs and the eager-driver latency of
every row.  This step adds, per row that is a graph rewrite (the paper's IPCV, the random keep set —
timed with the hashed ``selection="random"`` rule, the same computation as the per-image draw —,
every ``IPCVConfig`` row, ToMe as a rewrite), the measured latency of its rewritten whole tower
(``TowerForExport``: embeddings -> rewritten blocks -> final norm) on each backend, relative to the
vanilla tower on the same backend: ``eager`` (the rewritten GraphModule), ``inductor``
(``torch.compile`` of the exported ATen program, static shapes: one image size) and ``onnx``
(onnxruntime, as many intra-op threads as torch).  The harness-only baselines (ToMe with its own
matching code, ToFu, DART(ViT)) are compiled from their eager runners where ``torch.compile`` /
``torch.onnx`` take them (``--harness-compiled``), else reported without a compiled latency.

Per ratio, every (backend, row) pair and the vanilla towers are timed round-robin (``--repeats``
rounds after one warm-up, median), so machine load affects all of them alike.  Writes
``DIR/frontier.json``, ``DIR/frontier.png`` (four panels: fidelity and probe accuracy vs FLOPs,
fidelity vs inductor and onnxruntime latency) and, with ``--section``, the table between the
``<!-- frontier:SECTION:begin/end -->`` markers of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, ROOT
from .report import command_line, machine_info, now

BACKENDS = ("eager", "inductor", "onnx")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def graph_config(row: Dict):
    """The ``IPCVConfig`` whose rewrite a harness row times, or None (harness-only methods)."""
    from ipcv_core import IPCVConfig

    m, r, p = row["method"], row["retain"], json.loads(row["params"])
    paper = dict(prune_layer=3, as_depth=7, k=10)
    if m == "ipcv":
        return IPCVConfig(retain=r, **{**paper, **p})
    if m == "random_ipcv":  # the per-image draw is eager-only; the hashed rule is the same computation
        return IPCVConfig(retain=r, **{**paper, **{k: v for k, v in p.items() if k != "selection"}}, selection="random")
    if m == "ipcv_no_as":
        return IPCVConfig(retain=r, **{**paper, **p, "as_depth": 0})
    if m == "ipcv_config":
        return IPCVConfig(retain=r, **p)
    return None


class HarnessTower(torch.nn.Module):
    """A harness runner (ToMe / ToFu / DART(ViT)) as a module: embeddings -> runner over the DINOv2
    branches -> final norm, for compiling the baselines' own eager code."""

    def __init__(self, model, method: str, retain: float, params: Dict):
        super().__init__()
        from ipcv_adapters.dinov2 import dinov2_branches, dinov2_layout

        from .methods import METHODS

        self.model = model
        self.fn = METHODS[method]
        self.retain, self.params = retain, dict(params)
        self.blocks = dinov2_branches(model)
        self.layout = dinov2_layout(model)

    def forward(self, x):
        emb = self.model.embeddings(x)
        return self.model.layernorm(self.fn(emb, self.blocks, self.retain, self.layout, **self.params).hidden_states)


def _lower(module, backend: str, x: torch.Tensor, path: Optional[str], harness: bool):
    import ipcv_compile

    if backend == "eager":
        return module
    if harness and backend == "inductor":  # the baselines' python: graph breaks allowed
        fn = torch.compile(module, backend="inductor", dynamic=False)
        with torch.no_grad():
            fn(x)
        return fn
    opts = {"threads": torch.get_num_threads()} if backend == "onnx" else {}
    return ipcv_compile.lower(module, backend, (x,), path=path, dynamic=False, **opts)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="results folder of the harness run (bench.json)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=2, help="images per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--ratios", type=float, nargs="*", help="only these ratios (default: all of the run)")
    ap.add_argument("--only", nargs="*", help="only rows whose label contains one of these strings (+ vanilla)")
    ap.add_argument("--harness-compiled", action="store_true",
                    help="also compile the harness-only baselines (ToMe's own code, ToFu, DART(ViT)) where possible")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="frontier.json path (default: BENCH/frontier.json)")
    ap.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--section", default="", help="write the table between <!-- frontier:SECTION:begin/end -->")
    ap.add_argument("--figure", help="figure path (default: BENCH/frontier.png)")
    ap.add_argument("--plot-only", action="store_true", help="re-draw the figure and table from frontier.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(args.bench, "frontier.json")
    fig_path = args.figure or os.path.join(args.bench, "frontier.png")
    if args.plot_only:
        with open(out) as f:
            res = json.load(f)
        _outputs(res, fig_path, args)
        return 0
    with open(os.path.join(args.bench, "bench.json")) as f:
        bench = json.load(f)
    rows = bench["rows"]
    if args.ratios:
        rows = [r for r in rows if any(abs(r["retain"] - q) < 1e-9 for q in args.ratios)]
    if args.only:
        rows = [r for r in rows if any(s in r["label"] for s in args.only)]

    import ipcv_compile
    from ipcv_adapters.app.images import list_images, load_images
    from ipcv_adapters.dinov2 import load_dinov2
    from ipcv_adapters.export import TowerForExport
    from ipcv_core import IPCVConfig
    from ipcv_core.cost import round_robin

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_dinov2(args.model)
    x = load_images(list_images(args.images, args.batch), args.size)
    base = ipcv_compile.rewrite(model, IPCVConfig(retain=1.0))
    work = os.path.join(os.path.dirname(out) or ".", "onnx")
    os.makedirs(work, exist_ok=True)
    res = {"command": command_line(argv, "benchmarks.frontier"), "date": now(), "machine": machine_info(), "bench": args.bench,
           "bench_command": bench["meta"]["command"], "size": args.size, "batch": args.batch, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "backends": args.backends, "vanilla": vanilla_of(bench), "rows": [],
           "per_ratio": {}}
    t_all = time.perf_counter()
    for r in sorted({row["retain"] for row in rows}, reverse=True):
        mods = {"vanilla": (TowerForExport(base, vanilla=True), False)}
        labels = {"vanilla": "vanilla"}
        for row in (q for q in rows if q["retain"] == r):
            key = f"{row['label']}|{row['params']}"
            cfg = graph_config(row)
            if cfg is not None:
                mods[key] = (TowerForExport(base.with_config(cfg)), False)
            elif args.harness_compiled or "eager" in args.backends:
                mods[key] = (HarnessTower(model, row["method"], r, json.loads(row["params"])), True)
            labels[key] = row["label"]
        lowered, build, errors = {}, {}, {}
        for b in args.backends:
            for key, (mod, harness) in mods.items():
                if harness and b != "eager" and not args.harness_compiled:
                    continue
                t0 = time.perf_counter()
                _log(f"r={r}: lowering {labels[key]} -> {b} ...")
                try:
                    path = os.path.join(work, f"r{r}_{len(build)}.onnx") if b == "onnx" else None
                    lowered[(b, key)] = _lower(mod, b, x, path, harness)
                    build[(b, key)] = time.perf_counter() - t0
                    _log(f"   {build[(b, key)]:.0f} s")
                except Exception as e:  # a harness baseline the backend does not take: no compiled latency
                    errors[(b, key)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    _log(f"   failed: {errors[(b, key)]}")
        with torch.no_grad():
            eager_ref = {k: m(x) for k, (m, _) in mods.items()}
            err = {}
            for (b, key), fn in lowered.items():
                o = fn(x)
                o = o[0] if isinstance(o, (tuple, list)) else o
                ref = eager_ref[key][0] if isinstance(eager_ref[key], (tuple, list)) else eager_ref[key]
                err[(b, key)] = float((o - ref).abs().max() / ref.abs().max())
        calls = {k: (lambda fn=fn: fn(x)) for k, fn in lowered.items()}
        load0 = os.getloadavg()
        with torch.no_grad():
            rounds = round_robin(calls, args.repeats, warmup=1)
        load1 = os.getloadavg()
        for key in mods:
            if key == "vanilla":
                continue
            row = next(q for q in rows if q["retain"] == r and f"{q['label']}|{q['params']}" == key)
            rec = {k: row[k] for k in ("method", "variant", "label", "retain", "params", "kept_patches", "cos_all",
                                       "cos_removed", "cos_kept", "probe_acc", "flop_ratio", "latency_ratio")}
            rec["driver_latency_ratio"] = rec.pop("latency_ratio")
            for b in args.backends:
                if (b, key) in lowered and (b, "vanilla") in lowered:
                    rec[f"{b}_ratio"] = rounds.median((b, key)) / rounds.median((b, "vanilla"))
                    rec[f"{b}_ms"] = 1000 * rounds.median((b, key)) / args.batch
                    rec[f"{b}_build_s"] = build[(b, key)]
                    rec[f"{b}_max_rel_err"] = err[(b, key)]
                else:
                    rec[f"{b}_ratio"] = math.nan
                    if (b, key) in errors:
                        rec[f"{b}_error"] = errors[(b, key)]
            rec["graph"] = graph_config(row) is not None
            res["rows"].append(rec)
        res["per_ratio"][str(r)] = {
            "vanilla_ms": {b: 1000 * rounds.median((b, "vanilla")) / args.batch for b in args.backends
                           if (b, "vanilla") in lowered},
            "load_before_after": [load0, load1]}
        _log(f"r={r}: " + ", ".join(f"{labels[k]} {b} {rounds.median((b, k)) / rounds.median((b, 'vanilla')):.3f}"
                                   for (b, k) in lowered if k != "vanilla"))
        with open(out, "w") as f:  # after every ratio: a run cut short keeps what it measured
            json.dump(res, f, indent=1)
    res["total_s"] = time.perf_counter() - t_all
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    _outputs(res, fig_path, args)
    return 0


def vanilla_of(bench: Dict) -> Dict:
    """The harness run's vanilla row (fidelity 1, probe accuracy, GFLOPs per image)."""
    row = next(r for r in bench["rows"] if r["method"] == "vanilla")
    return {k: row[k] for k in ("cos_all", "probe_acc", "gflops")}


# ----------------------------------------------------------------------------- outputs
def _fmt(v, nd=3):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def table(res: Dict) -> str:
    bk = res["backends"]
    head = ("| retain | method | FLOP ratio | cos all | cos removed | probe acc | driver latency | "
            + " | ".join(f"{b} latency" for b in bk) + " |")
    lines = [head, "|" + "---|" * (7 + len(bk))]
    for r in sorted(res["rows"], key=lambda q: (-q["retain"], q["flop_ratio"])):
        lines.append(f"| {r['retain']:.2f} | {r['label']} | {_fmt(r['flop_ratio'])} | {_fmt(r['cos_all'], 4)} | "
                     f"{_fmt(r['cos_removed'], 4)} | {_fmt(r['probe_acc'])} | {_fmt(r['driver_latency_ratio'], 2)} | "
                     + " | ".join(_fmt(r.get(f"{b}_ratio"), 3) for b in bk) + " |")
    return "\n".join(lines)


def figure(res: Dict, path: str) -> None:
    from .figures import _plt

    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = [(axes[0, 0], "flop_ratio", "cos_all", "analytic FLOPs vs vanilla"),
              (axes[0, 1], "flop_ratio", "probe_acc", "analytic FLOPs vs vanilla"),
              (axes[1, 0], "inductor_ratio", "cos_all", "inductor latency vs vanilla inductor"),
              (axes[1, 1], "onnx_ratio", "cos_all", "onnxruntime latency vs vanilla onnxruntime")]
    fams = {}
    for r in res["rows"]:
        fams.setdefault(r["label"], []).append(r)
    cmap = plt.get_cmap("tab20")
    for ax, xk, yk, xl in panels:
        for i, (label, pts) in enumerate(sorted(fams.items())):
            pts = sorted((p for p in pts if not math.isnan(p.get(xk, math.nan)) and not math.isnan(p.get(yk, math.nan))),
                         key=lambda p: p["retain"])
            if not pts:
                continue
            bold = "paper" in label or "ToMe" == label or "tuned" in label
            ax.plot([p[xk] for p in pts], [p[yk] for p in pts], marker="os^vD*ph<>Xd"[i % 12], color=cmap(i % 20),
                    lw=2.0 if bold else 1.0, ms=7 if bold else 5, label=label)
        ax.set_xlabel(xl)
        ax.set_ylabel({"cos_all": "cosine to vanilla, all patches (held out, 448 px)",
                       "probe_acc": "CIFAR-10 frozen-probe accuracy (224 px)"}[yk])
        ax.grid(alpha=0.3)
        if yk == "cos_all":
            ax.set_ylim(max(0.95, min([p[yk] for p in res["rows"]] + [1.0]) - 0.002), 1.0005)
    axes[0, 0].legend(fontsize=7, loc="lower right", ncol=1)
    fig.suptitle(f"DINOv2-S frontier (retain 0.5 / 0.35 / 0.2 per line); {res['date']}; "
                 f"{res['machine'].get('cpu', '')}, {res['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _outputs(res: Dict, fig_path: str, args) -> None:
    figure(res, fig_path)
    md = table(res)
    print(md)
    if args.section:
        begin, end = f"<!-- frontier:{args.section}:begin -->", f"<!-- frontier:{args.section}:end -->"
        with open(args.markdown) as f:
            text = f.read()
        if begin not in text or end not in text:
            raise SystemExit(f"{args.markdown} has no {begin} ... {end} markers")
        loads = "; ".join(f"r={k}: {v['load_before_after'][0][0]:.1f} -> {v['load_before_after'][1][0]:.1f}"
                          for k, v in res["per_ratio"].items())
        m = res["machine"]
        body = (f"Generated by `{res['command']}` on {res['date']} — {m.get('cpu')}, {m.get('cores')} cores, torch "
                f"{m.get('torch')} with {res['threads']} threads; {res['batch']} images per call at {res['size']} px, "
                f"median of {res['repeats']} round-robin rounds per ratio (load average before -> after timing: {loads}). "
                f"Fidelity, probe, FLOPs and the eager-driver latency from the harness run `{res['bench_command']}`.\n\n"
                + md + f"\n\n![frontier]({os.path.relpath(fig_path, os.path.dirname(os.path.abspath(args.markdown)))})\n")
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        with open(args.markdown, "w") as f:
            f.write(pre + begin + "\n" + body + end + post)


if __name__ == "__main__":
    raise SystemExit(main())
