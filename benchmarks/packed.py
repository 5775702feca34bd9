"""Packed layouts (images, multi-image, video) on Qwen2-VL-style towers: HF's vanilla tower vs the
IPCV rewrite at retain 1.0 / 0.5 / 0.35 / 0.2, eager and inductor, with the FLOPs each row executes
and the FLOP bound beside every latency ratio.

    python -m benchmarks.packed                          # 12-block width-256 tower, layouts a-d + mixed
    python -m benchmarks.packed --tower 7b --layouts a c --repeats 2 --backends eager
    python -m benchmarks.packed --tower small-2.5 --layouts a c   # Qwen2.5-VL-style window attention
    python -m benchmarks.packed --device cuda --dtype bf16   # on a GPU

Layouts (``grid_thw`` rows ``t, h, w`` in patches): (a) one image of 1024 tokens, (b) four images of
different sizes, (c) an 8-frame video of 1024-token frames, (d) a 16-frame video of 256-token frames,
(mixed) five small images of 64-484 tokens.

Rows: ``vanilla`` = the HF tower itself (``attn_implementation="sdpa"``: it attends frame by frame);
``r=...`` = ``ipcv_compile.rewrite(tower, retain=r)`` with the paper's l_p=3, Δ=7, k=10 (clipped to
the depth), exported for the layout (``ipcv_adapters.export.TowerForExport``).  Inductor: the HF tower
through ``torch.compile`` (graph breaks allowed, as a user would), the rewrite through
``ipcv_compile.lower(..., "inductor")``.  Timing: every row once per round, ``--repeats`` rounds after a
warm-up (``ipcv_core.cost.round_robin``), ratio of medians to vanilla on the same backend.  FLOPs:
``torch.utils.flop_counter`` on the eager call, with a formula for CPU SDPA (which it does not count
otherwise); the FLOP bound: the analytic block FLOPs of the schedule (``ipcv_core.cost.config_flops``,
queries of kept rows only, per-segment attention) plus what is outside the blocks (patch embedding,
merger: counted vanilla FLOPs minus analytic vanilla blocks), over vanilla's counted FLOPs.  Peak
memory: resident-set peak added by one call (CPU) or ``max_memory_allocated`` (CUDA).  Random
weights: CPU runs flush denormals (``torch.set_flush_denormal(True)``), else random-init towers run
several times slower on denormal floats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

LAYOUTS = {
    "a": [[1, 32, 32]],
    "b": [[1, 16, 16], [1, 20, 24], [1, 32, 32], [1, 12, 28]],
    "c": [[8, 32, 32]],
    "d": [[16, 16, 16]],
    "mixed": [[1, 8, 8], [1, 10, 12], [1, 14, 20], [1, 22, 22], [1, 8, 30]],
}
LAYOUT_NAMES = {"a": "1 image, 1024 tokens", "b": "4 images, 256-1024 tokens", "c": "8 frames x 1024",
                "d": "16 frames x 256", "mixed": "5 small images, 64-484 tokens"}
TOWERS = {
    "small": dict(depth=12, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=256),
    "7b": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584),
    # Qwen2.5-VL-style: windows of 112 px (8 x 8 patches), full attention in every 4th block, SwiGLU
    "small-2.5": dict(depth=12, hidden_size=256, num_heads=4, intermediate_size=1024, out_hidden_size=256,
                      window_size=112, fullatt_block_indexes=[3, 7, 11]),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_tower(name: str, dtype, device):
    if name.endswith("2.5"):
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as Tower
    else:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower

    cfg = Config(**TOWERS[name], in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    torch.manual_seed(0)
    return Tower._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def count_flops(fn) -> float:
    """FLOPs ``fn()`` executes (``torch.utils.flop_counter``; CPU SDPA counted by its formula)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kw):
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def flop_bound(cfg, grids, tower_cfg, counted_vanilla: float, windows=None) -> float:
    """Analytic block FLOPs of the rewrite's schedule (queries of kept rows only, attention within
    each frame — within each window for windowed blocks before pruning, the frame's kept rows under
    a window mask after it) plus what lies outside the blocks (counted vanilla FLOPs minus analytic
    vanilla blocks), over vanilla's counted FLOPs.  ``windows``: per frame the window lengths."""
    from ipcv_core.config import num_keep
    from ipcv_core.cost import ModelDims, ffn_flops, ngr_flops, knn_flops
    from ipcv_core.schedule import Schedule

    width = tower_cfg.get("embed_dim", tower_cfg.get("hidden_size"))
    mlp = tower_cfg.get("intermediate_size")
    d = ModelDims(width, width * tower_cfg["mlp_ratio"]) if mlp is None else ModelDims(width, ffn_params=3 * width * mlp)
    depth = tower_cfg["depth"]
    full_att = set(tower_cfg.get("fullatt_block_indexes", range(depth)))
    frames = [h * w for t, h, w in grids for _ in range(t)]
    wins = windows or [[n] for n in frames]

    def blocks(pruned: bool) -> float:
        total = 0.0
        for n, ws in zip(frames, wins):
            k = num_keep(n, cfg.retain) if pruned else n
            if pruned:
                total += knn_flops(n - k, k, d) + ngr_flops(n - k, k, cfg.k, d, evaluations=cfg.as_depth + 1)
            for plan in Schedule.build(cfg, depth):
                after = pruned and plan.pruned
                q = k if after else n
                kv = n if (after and plan.as_block) else q
                total += 4.0 * q * d.dim ** 2 + 4.0 * kv * d.dim ** 2 + ffn_flops(q, d)
                pairs = q * kv if (after or plan.index in full_att) else sum(w * w for w in ws)
                total += 4.0 * pairs * d.dim
        return total

    van = blocks(False)
    ours = blocks(True) if cfg.retain < 1.0 else van
    return (ours + counted_vanilla - van) / counted_vanilla


def peak_memory(fn, device) -> float:
    """MiB added by one call at its peak."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from .cost import peak_rss_delta

    with torch.no_grad():
        return peak_rss_delta(fn)[1]


def run_layout(tower, tower_name, key, args, device, dtype) -> List[Dict]:
    import ipcv_compile
    from ipcv_adapters.export import TowerForExport
    from ipcv_adapters.testing import qwen2vl_inputs
    from ipcv_core.config import IPCVConfig
    from ipcv_core.cost import round_robin

    grids = LAYOUTS[key]
    pv, thw = qwen2vl_inputs(grids, dtype=dtype, in_dim=tower.config.in_channels * tower.config.temporal_patch_size
                             * tower.config.patch_size ** 2)
    pv, thw = pv.to(device), thw.to(device)
    n = int(sum(t * h * w for t, h, w in grids))
    depth = tower.config.depth
    paper = IPCVConfig.paper(1.0)
    if depth < paper.as_end:
        paper = paper.replace(as_depth=depth - paper.prune_layer)
    base = ipcv_compile.rewrite(tower, paper)
    windows = base.adapter.prepare(pv, grid_thw=thw).layout.windows
    towers = {f"r={r}": (base if r == 1.0 else base.with_config(retain=r)) for r in args.retain}
    calls: Dict = {}
    for b in args.backends:
        if b == "eager":
            calls[(b, "vanilla")] = lambda: tower(pv, grid_thw=thw)
            for name, t in towers.items():
                calls[(b, name)] = (lambda t=t: t(pv, grid_thw=thw))
        else:
            _log(f"[{tower_name} {key}] compiling vanilla with torch.compile ...")
            van_c = torch.compile(tower)
            calls[(b, "vanilla")] = lambda: van_c(pv, grid_thw=thw)
            for name, t in towers.items():
                _log(f"[{tower_name} {key}] lowering {name} to inductor ...")
                lw = ipcv_compile.lower(TowerForExport(t, (pv,), {"grid_thw": thw}), "inductor", (pv,), dynamic=False)
                calls[(b, name)] = (lambda lw=lw: lw(pv))
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.no_grad():
        ref = tower(pv, grid_thw=thw).last_hidden_state
        errs = {name: float((t(pv, grid_thw=thw).last_hidden_state - ref).abs().max() / ref.abs().max())
                for name, t in towers.items()}
        flops = {"vanilla": count_flops(lambda: tower(pv, grid_thw=thw))}
        for name, t in towers.items():
            flops[name] = count_flops(lambda t=t: t(pv, grid_thw=thw))
        mem = {"vanilla": peak_memory(lambda: tower(pv, grid_thw=thw), device)}
        for name, t in towers.items():
            mem[name] = peak_memory(lambda t=t: t(pv, grid_thw=thw), device)
        load0 = os.getloadavg()
        _log(f"[{tower_name} {key}] timing {len(calls)} rows x {args.repeats} rounds ...")
        rounds = round_robin(calls, args.repeats, warmup=1, sync=sync)
        load1 = os.getloadavg()
    rows = []
    for (b, name) in calls:
        r = 1.0 if name == "vanilla" else float(name.split("=")[1])
        cfg = paper.replace(retain=r)
        rows.append({
            "tower": tower_name, "layout": key, "grids": grids, "tokens": n, "backend": b, "row": name,
            "ms": 1e3 * rounds.median((b, name)), "ratio": rounds.median((b, name)) / rounds.median((b, "vanilla")),
            "flop_ratio": flops[name] / flops["vanilla"],
            "flop_bound": 1.0 if name == "vanilla" else flop_bound(cfg, grids, TOWERS[tower_name], flops["vanilla"],
                                                                   windows),
            "gflops": flops[name] / 1e9, "peak_mib": mem[name], "max_rel_err_vs_hf": errs.get(name, 0.0),
            "all_ms": [1e3 * v for v in rounds.wall[(b, name)]], "load": [load0[0], load1[0]],
        })
    return rows


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "", "| tower | layout | tokens | backend | row | ms | vs vanilla | FLOPs executed | FLOP bound "
             "| ratio / bound | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['layout']}: {LAYOUT_NAMES[r['layout']]} | {r['tokens']} | {r['backend']} | "
                     f"{r['row']} | {r['ms']:.0f} | {r['ratio']:.2f} | {r['flop_ratio']:.2f} | {r['flop_bound']:.2f} | "
                     f"{r['ratio'] / r['flop_bound']:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", choices=sorted(TOWERS), nargs="+", default=["small"])
    ap.add_argument("--layouts", choices=sorted(LAYOUTS), nargs="+", default=["a", "b", "c", "d", "mixed"])
    ap.add_argument("--retain", type=float, nargs="+", default=[1.0, 0.5, 0.35, 0.2])
    ap.add_argument("--backends", nargs="+", choices=["eager", "inductor"], default=["eager", "inductor"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "packed", "packed.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.packed: --device cuda but no CUDA device is available; nothing was measured", file=sys.stderr)
        return 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        torch.set_flush_denormal(True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows: List[Dict] = []
    for tname in args.tower:
        _log(f"building the {tname} tower ({TOWERS[tname]}) ...")
        tower = build_tower(tname, dtype, args.device)
        for key in args.layouts:
            rows += run_layout(tower, tname, key, args, args.device, dtype)
            _log(markdown([r for r in rows if r["layout"] == key and r["tower"] == tname], f"{tname} {key}"))
    from .report import machine_info

    mach = machine_info()
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{mach['cpu']}, {mach['cores']} cores"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m benchmarks.packed " + " ".join(argv if argv is not None else sys.argv[1:])
    loads = [x for r in rows for x in r["load"]]
    header = (f"Generated by `{cmd}` on {when} — {dev}, torch {torch.__version__} with {torch.get_num_threads()} "
              f"threads, {args.dtype}, {platform.platform()}; load average {min(loads):.1f}-{max(loads):.1f} while timing; "
              f"median of {args.repeats} interleaved rounds after a warm-up"
              + ("; denormals flushed (random weights)" if args.device == "cpu" else ""))
    table = markdown(rows, header)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"header": header, "rows": rows, "machine": mach}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
