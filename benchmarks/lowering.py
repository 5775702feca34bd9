"""Latency of the lowering backends: eager vs inductor vs onnxruntime, vanilla vs IPCV, real DINOv2-S.

    python -m benchmarks.lowering [--model PATH] [--images DIR] [--num-images 4] [--size 448]
                                  [--retain 0.5 0.35 0.2] [--repeats 7] [--backends eager inductor onnx]
                                  [--out benchmarks/results/lowering/lowering.json]

Every row is the whole tower (embeddings -> blocks -> final norm), built as
``ipcv_adapters.export.TowerForExport`` over the DINOv2 adapter: ``vanilla`` runs the adapter's plain
block stack, ``IPCV r`` the rewritten graph (paper defaults l_p=3, Δ=7, k=10) — same prepare /
finish / attention implementation, so rows differ only by the IPCV rewrite.  Each backend lowers
every row once (inductor: ``torch.compile(fullgraph=True, dynamic=True)`` of the exported program;
onnx: one file run by onnxruntime with as many intra-op threads as torch uses); timings are
interleaved across rows (round-robin, median of ``--repeats``), so machine load affects all rows
alike.  Each lowered output is compared with its eager row (max relative error), and each IPCV row's
final patch tokens with vanilla's (mean cosine).  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from .report import machine_info

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "weights", "dinov2-small"))
DEFAULT_IMAGES = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data", "imagenet-samples"))


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), {m['os']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--retain", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", nargs="+", default=["eager", "inductor", "onnx"], choices=["eager", "inductor", "onnx"])
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "lowering", "lowering.json"))
    args = ap.parse_args(argv)

    import onnxruntime  # noqa: F401  (fail early if the onnx extra is missing)

    import ipcv_compile
    from ipcv_adapters.dinov2 import load_dinov2
    from ipcv_adapters.app.images import list_images, load_images
    from ipcv_adapters.export import TowerForExport
    from ipcv_core import IPCVConfig
    from ipcv_core.config import num_keep
    from ipcv_core.cost import round_robin

    torch.manual_seed(0)
    model = load_dinov2(args.model)
    x = load_images(list_images(args.images, args.num_images), args.size)
    n_tok = (args.size // 14) ** 2
    _log(f"DINOv2 {args.model}: {x.shape[0]} images at {args.size} px -> 1 CLS + {n_tok} patches")
    base = ipcv_compile.rewrite(model, IPCVConfig(retain=1.0))
    rows = {"vanilla": TowerForExport(base, vanilla=True)}
    for r in args.retain:
        rows[f"IPCV r={r}"] = TowerForExport(base.with_config(retain=r))
    with torch.no_grad():
        eager_out = {k: m(x) for k, m in rows.items()}

    lowered, build_s, errs = {}, {}, {}
    out_dir = os.path.dirname(args.out)
    os.makedirs(out_dir, exist_ok=True)
    for b in args.backends:
        for name, m in rows.items():
            t0 = time.perf_counter()
            _log(f"lowering {name} -> {b} ...")
            opts = {"threads": torch.get_num_threads()} if b == "onnx" else {}
            path = os.path.join(out_dir, f"{name.replace(' ', '_').replace('=', '')}.onnx") if b == "onnx" else None
            lw = ipcv_compile.lower(m, b, (x,), path=path, **opts)
            build_s[(b, name)] = time.perf_counter() - t0
            with torch.no_grad():
                got = lw(x)
            ref = eager_out[name]
            errs[(b, name)] = max(float((g - r_).abs().max() / r_.abs().max()) for g, r_ in zip(got, ref))
            lowered[(b, name)] = lw
            _log(f"   built in {build_s[(b, name)]:.1f} s, max rel err vs eager {errs[(b, name)]:.1e}")

    # the eager driver (ipcv_adapters.dinov2.dinov2_forward: ipcv_core.run_ipcv over the adapter's
    # branch functions, no graph) for reference, eager only
    from ipcv_adapters.dinov2 import dinov2_forward

    drivers = {}
    if "eager" in args.backends:
        for r in args.retain:
            cfg = IPCVConfig(retain=r)
            drivers[("eager", f"driver r={r}")] = (lambda c=cfg: dinov2_forward(model, x, c))
            with torch.no_grad():
                d_out, _ = drivers[("eager", f"driver r={r}")]()
            errs[("eager", f"driver r={r}")] = float((d_out - eager_out[f"IPCV r={r}"][0]).abs().max()
                                                      / eager_out[f"IPCV r={r}"][0].abs().max())
    runners = {**lowered, **drivers}

    # interleaved timing: every (backend, row) once per round
    load0 = os.getloadavg()
    calls = {k: ((lambda fn=fn: fn(x)) if k in lowered else fn) for k, fn in runners.items()}
    with torch.no_grad():
        rounds = round_robin(calls, args.repeats, warmup=1)
    load1 = os.getloadavg()
    med = {k: rounds.median(k) for k in runners}

    van = eager_out["vanilla"][0][:, 1:]
    cos = {name: float(torch.nn.functional.cosine_similarity(o[0][:, 1:], van, dim=-1).mean()) for name, o in eager_out.items()}
    when = datetime.datetime.now().isoformat(timespec="minutes")
    mach = machine()
    lines = [f"DINOv2-S ({os.path.basename(args.model)}), {x.shape[0]} images at {args.size} px (1 CLS + {n_tok} patches), "
             f"IPCV l_p=3, Δ=7, k=10; {mach}; {when}; median of {args.repeats} interleaved rounds; "
             f"load average {load0[0]:.1f} before / {load1[0]:.1f} after timing", ""]
    hdr = "| row | kept / image | cos vs vanilla | " + " | ".join(f"{b} ms | {b} vs vanilla" for b in args.backends) + " |"
    lines += [hdr, "|" + "---|" * (3 + 2 * len(args.backends))]
    for name in rows:
        kept = n_tok if name == "vanilla" else num_keep(n_tok, float(name.split("=")[1]))
        cells = []
        for b in args.backends:
            ms = med[(b, name)] * 1e3
            ratio = med[(b, name)] / med[(b, "vanilla")]
            cells.append(f"{ms:.0f} | {ratio:.2f}")
        lines.append(f"| {name} | {kept} | {cos[name]:.3f} | " + " | ".join(cells) + " |")
    for (b, name) in drivers:
        r = float(name.split("=")[1])
        cells = [f"{med[(b, name)] * 1e3:.0f} | {med[(b, name)] / med[(b, 'vanilla')]:.2f}" if bb == b else "– | –"
                 for bb in args.backends]
        lines.append(f"| IPCV r={r}, eager driver | {num_keep(n_tok, r)} | {cos[f'IPCV r={r}']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| backend | vs eager (vanilla) | vs eager (IPCV r=%s) | build s (vanilla / IPCV) | max rel err vs eager |" % args.retain[-1])
    lines.append("|---|---|---|---|---|")
    last = f"IPCV r={args.retain[-1]}"
    for b in args.backends:
        lines.append(f"| {b} | {med[(b, 'vanilla')] / med[('eager', 'vanilla')] if 'eager' in args.backends else float('nan'):.2f} | "
                     f"{med[(b, last)] / med[('eager', last)] if 'eager' in args.backends else float('nan'):.2f} | "
                     f"{build_s[(b, 'vanilla')]:.0f} / {build_s[(b, last)]:.0f} | "
                     f"{max(errs[(b, n)] for n in rows):.1e} |")
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as f:
        json.dump({"machine": mach, "date": when, "loadavg_before_after": [load0, load1], "size": args.size, "images": int(x.shape[0]), "repeats": args.repeats,
                   "median_s": {f"{b}|{n}": v for (b, n), v in med.items()},
                   "all_s": {f"{b}|{n}": v for (b, n), v in rounds.wall.items()},
                   "build_s": {f"{b}|{n}": v for (b, n), v in build_s.items()},
                   "max_rel_err_vs_eager": {f"{b}|{n}": v for (b, n), v in errs.items()},
                   "cos_vs_vanilla": cos, "table_md": table}, f, indent=2)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
