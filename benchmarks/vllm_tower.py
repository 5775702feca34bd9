"""IPCV inside vLLM (the plug-in, ipcv_adapters.vllm): the vision encoder's time with and without IPCV,
and end-to-end time to first token, in vLLM's own engine. Run in .venv-vllm (`make setup-vllm`):

    .venv-vllm/bin/python -m benchmarks.vllm_tower                      # CPU, a mid-size tiny checkpoint
    .venv-vllm/bin/python -m benchmarks.vllm_tower --gpu                 # a lent GPU: bf16, Qwen2-VL-7B dims

One engine serves a Qwen2-VL checkpoint built offline (random weights: CPU timings flush denormals,
``torch.set_flush_denormal(True)`` in the worker) with ``hf_overrides={"ipcv": ...}``. Through
``LLM.apply_model`` the worker times, interleaved (A, B, C, ... per round), vLLM's own tower forward
(vanilla) and the plug-in's forward at each retain ratio, on one 1024-patch image (32 x 32 patches)
and an 8-frame video (8 x 1024 patches); ratios of medians. Time to first token: one request
(``max_tokens=1``, a fresh random image each time so no encoder cache is hit) per ratio per round,
the tower's ratio switched between requests through ``apply_model`` (a benchmark-only switch: the
plug-in reads the config set at model init). FLOP bounds beside the ratios: the method's (queries of
kept rows only in AS blocks, ``ipcv_core.cost.config_flops``) and the executed one (vLLM's fused qkv
projection also computes the removed rows' queries in AS blocks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model runs in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

RATIOS = (1.0, 0.5, 0.35, 0.2)


def flop_bounds(retain: float, frames: int, n: int, depth: int, width: int, mlp: int, lp: int, delta: int):
    """(method bound, executed bound) as fractions of vanilla's block-stack FLOPs."""
    from ipcv_core.config import IPCVConfig, num_keep
    from ipcv_core.cost import ModelDims, config_flops

    dims = ModelDims(width, mlp)
    cfg = IPCVConfig(retain=retain, prune_layer=lp, as_depth=delta, k=10)
    van = config_flops(None, n, 0, depth, dims)
    method = config_flops(cfg, n, 0, depth, dims)
    K = num_keep(n, retain, 1)
    extra = delta * 2 * (n - K) * width * width  # AS blocks: vLLM's fused qkv projects the removed rows' queries too
    return method / van, (method + extra) / van


def build_checkpoint(path: str, gpu: bool):
    from ipcv_adapters.vllm.testing import save_tiny_vlm

    if gpu:  # Qwen2-VL-7B's vision dims (32 blocks, width 1280, 16 heads, MLP 4x); a 2-layer LM of head 128
        return save_tiny_vlm("qwen2_vl", path, vision_depth=32, vision_width=1280, vision_heads=16, mlp_ratio=4,
                             text_layers=2, text_width=1024, text_heads=8, max_pixels=1024 * 28 * 28 * 4)
    return save_tiny_vlm("qwen2_vl", path, vision_depth=12, vision_width=256, vision_heads=4, mlp_ratio=4,
                         text_layers=4, text_width=256, text_heads=4, max_pixels=1024 * 14 * 14 * 4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, Qwen2-VL-7B vision dims")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ttft-rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/vllm/vllm_tower.json")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    from ipcv_adapters.vllm.testing import chat_prompt

    ckpt = build_checkpoint(tempfile.mkdtemp(prefix="ipcv-vllm-bench-"), args.gpu)
    lp, delta = 3, 7
    llm = LLM(model=ckpt, hf_overrides={"ipcv": {"retain": 0.35}}, enforce_eager=True, max_model_len=16384,
              dtype="bfloat16" if args.gpu else "float32", limit_mm_per_prompt={"image": 1, "video": 1},
              max_num_seqs=1, seed=0, enable_prefix_caching=False, max_num_batched_tokens=16384)

    def tower_bench(model):
        from ipcv_adapters.vllm.tower import FAMILIES, ipcv_forward
        from ipcv_core.config import IPCVConfig
        from ipcv_core.cost import round_robin

        torch.set_flush_denormal(True)
        vis = model.visual
        base = type(vis).__mro__[1]
        patch_in = vis.patch_embed.proj.weight[0].numel()
        res = {}
        for name, grid in (("image 32x32", [[1, 32, 32]]), ("video 8x32x32", [[8, 32, 32]])):
            n = sum(t * h * w for t, h, w in grid)
            x = torch.randint(0, 256, (n, patch_in), generator=torch.Generator().manual_seed(0)).float().to(vis.device)
            fns = {"vanilla": lambda: base.forward(vis, x, grid)}
            for r in RATIOS:
                cfg = IPCVConfig(retain=r, prune_layer=lp, as_depth=delta, k=10).resolve(len(vis.blocks))
                fns[r] = (lambda c: lambda: ipcv_forward(vis, FAMILIES["qwen2_vl"], c, x, grid,
                                                         lambda x_, g: base.forward(vis, x_, g)))(cfg)

            with torch.inference_mode():
                rounds = round_robin(fns, repeats=args.rounds, warmup=1,
                                     sync=torch.cuda.synchronize if torch.cuda.is_available() else None)
            van = rounds.median("vanilla")
            res[name] = {"vanilla_s": van, "rows": {str(r): rounds.median(r) / van for r in RATIOS},
                         "medians_s": {str(k): rounds.median(k) for k in fns}}
        return res

    enc = llm.apply_model(tower_bench)[0]

    def set_ratio(r):
        from ipcv_core.config import IPCVConfig

        def fn(model):
            vis = model.visual
            vis.ipcv_config = IPCVConfig(retain=r, prune_layer=lp, as_depth=delta, k=10).resolve(len(vis.blocks))
        llm.apply_model(fn)

    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    ttft = {k: [] for k in ("vanilla",) + RATIOS}
    for _ in range(args.ttft_rounds + 1):  # the first round warms up
        for key in ttft:
            set_ratio(1.0 if key == "vanilla" else key)  # retain 1.0 runs vLLM's own tower forward
            img = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
            req = {"prompt": chat_prompt("describe", images=1), "multi_modal_data": {"image": img}}
            t0 = time.perf_counter()
            llm.generate([req], sp, use_tqdm=False)
            ttft[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in ttft.items()}
    width, depth = 1280 if args.gpu else 256, 32 if args.gpu else 12
    report = {
        "command": "python -m benchmarks.vllm_tower" + (" --gpu" if args.gpu else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if args.gpu else ""),
        "load": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "tower": f"Qwen2-VL {depth} blocks, width {width}, MLP 4x, l_p={lp}, delta={delta}, k=10",
        "encoder": enc,
        "ttft_s": med, "ttft_ratio": {str(k): med[k] / med["vanilla"] for k in RATIOS},
        "flop_bound": {str(r): flop_bounds(r, 1, 1024, depth, width, 4 * width, lp, delta) for r in RATIOS},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
