"""GPU latency of a Qwen2-VL-7B-sized vision tower: vanilla vs IPCV, eager vs inductor (CUDA only).

    python -m benchmarks.gpu_tower [--tokens 1024 4096] [--retain 0.5 0.35 0.2] [--repeats 20]
                                   [--dtype bf16] [--backends eager inductor] [--depth 32]
                                   [--out benchmarks/results/lowering/gpu_tower.json]

The tower is ``Qwen2VisionTransformerPretrainedModel`` with Qwen2-VL-7B's vision config (32 blocks,
width 1280, 16 heads, MLP ratio 4, patch 14, 2x2 merger into 3584) and **random weights** (no
checkpoint download; latency does not depend on the values), in bf16 on the GPU.  One image per call:
``--tokens 1024`` is a 32 x 32 patch grid (448 x 448 px), ``4096`` a 64 x 64 grid (896 x 896 px).

Rows, all built as ``ipcv_adapters.export.TowerForExport`` over the Qwen2-VL adapter for that grid
(patch embedding -> blocks -> merger; rotary tables and mask precomputed for the layout):
``vanilla`` = the adapter's plain block stack, ``IPCV r`` = the rewritten graph (paper defaults
l_p=3, Δ=7, k=10).  ``hf eager`` is the unmodified HF tower called with ``grid_thw`` (its own
attention path) for reference.  Backends: ``eager``; ``inductor`` =
``ipcv_compile.lower(..., "inductor")`` (export, then ``torch.compile(fullgraph=True)``, static
shapes here).  Timing: CUDA-synchronised wall time, rows interleaved round-robin, median of
``--repeats`` after 3 warm-up calls; peak memory per row from ``torch.cuda.max_memory_allocated``.

Without CUDA it says so and exits with status 3 (nothing is measured on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

QWEN2VL_7B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584, in_channels=3,
                         patch_size=14, temporal_patch_size=2, spatial_merge_size=2)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_tower(depth: int, dtype: torch.dtype, device: str = "cuda"):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLVisionConfig(**{**QWEN2VL_7B_VISION, "depth": depth})
    torch.manual_seed(0)
    with torch.device(device):
        m = Qwen2VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return m.eval()


def grid_for(tokens: int):
    side = int(round(tokens ** 0.5))
    if side * side != tokens or side % 2:
        raise SystemExit(f"--tokens {tokens}: need a square grid with an even side (e.g. 1024, 4096)")
    return [[1, side, side]]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--retain", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--backends", nargs="+", choices=["eager", "inductor"], default=["eager", "inductor"])
    ap.add_argument("--depth", type=int, default=32, help="blocks (32 = Qwen2-VL-7B; fewer for a quick try)")
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "lowering", "gpu_tower.json"))
    ap.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)  # code-path check only
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_smoke_test else "cuda"

    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu_tower: no CUDA device available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}{' CPU build' if torch.version.cuda is None else ''}). This benchmark measures the "
              "Qwen2-VL-7B-sized tower on a GPU only; nothing was measured. Run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch.", file=sys.stderr)
        return 3

    import ipcv_compile
    from ipcv_adapters.export import TowerForExport
    from ipcv_core import IPCVConfig
    from ipcv_core.cost import round_robin

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke test, not a GPU measurement)"
    _log(f"{dev}; building a Qwen2-VL-7B-sized vision tower ({args.depth} blocks, random {args.dtype} weights)")
    tower = build_tower(args.depth, dtype, device)
    cfg0 = IPCVConfig.paper()
    if args.depth < cfg0.as_end:
        cfg0 = cfg0.replace(prune_layer=1, as_depth=max(0, min(cfg0.as_depth, args.depth - 2)))
    base = ipcv_compile.rewrite(tower, cfg0.replace(retain=1.0))
    in_dim = tower.config.in_channels * tower.config.temporal_patch_size * tower.config.patch_size ** 2

    results = []
    for n in args.tokens:
        grid = grid_for(n)
        thw = torch.tensor(grid, device=device)
        g = torch.Generator(device=device).manual_seed(n)
        pv = torch.randn(n, in_dim, device=device, generator=g).to(dtype)
        rows = {"vanilla": TowerForExport(base, (pv,), {"grid_thw": thw}, vanilla=True)}
        for r in args.retain:
            rows[f"IPCV r={r}"] = TowerForExport(base.with_config(retain=r), (pv,), {"grid_thw": thw})
        runners = {("eager", "hf eager"): lambda: tower(pv, grid_thw=thw)}
        build_s = {}
        for b in args.backends:
            for name, m in rows.items():
                t0 = time.perf_counter()
                if b == "eager":
                    runners[(b, name)] = (lambda m_=m: m_(pv))
                else:
                    _log(f"[{n} tokens] compiling {name} with inductor ...")
                    lw = ipcv_compile.lower(m, "inductor", (pv,), dynamic=False)
                    runners[(b, name)] = (lambda lw_=lw: lw_(pv))
                build_s[(b, name)] = time.perf_counter() - t0
        peak = {}
        with torch.no_grad():
            for k, fn in runners.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(3):
                    fn()
                _sync()
                peak[k] = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
            times = round_robin(runners, args.repeats, sync=_sync).wall
        for k, v in times.items():
            b, name = k
            med = statistics.median(v)
            van = statistics.median(times[(b, "vanilla")]) if (b, "vanilla") in times else float("nan")
            results.append({"tokens": n, "backend": b, "row": name, "median_ms": med * 1e3,
                            "vs_vanilla_same_backend": med / van, "peak_GiB": peak[k],
                            "build_s": build_s.get(k), "all_ms": [t * 1e3 for t in v]})
        _log(f"[{n} tokens] done")

    when = datetime.datetime.now().isoformat(timespec="minutes")
    lines = [f"Qwen2-VL-7B-sized vision tower ({args.depth} blocks, random {args.dtype}), one image; {dev}; torch "
             f"{torch.__version__}; {when}; median of {args.repeats} interleaved rounds", "",
             "| tokens | row | backend | ms | vs vanilla (same backend) | peak GiB |", "|---|---|---|---|---|---|"]
    for r_ in results:
        lines.append(f"| {r_['tokens']} | {r_['row']} | {r_['backend']} | {r_['median_ms']:.2f} | "
                     f"{r_['vs_vanilla_same_backend']:.2f} | {r_['peak_GiB']:.2f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": dev, "date": when, "machine": platform.platform(), "torch": torch.__version__,
                   "config": {**QWEN2VL_7B_VISION, "depth": args.depth}, "dtype": args.dtype, "results": results,
                   "table_md": table}, f, indent=2)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
