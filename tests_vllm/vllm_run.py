"""One vLLM engine, one process: serve a checkpoint, run a fixed set of requests and tower calls, and
save what the tests compare (``torch.save`` of a dict). Run by tests_vllm/ in a subprocess, because
vLLM loads its plug-ins once per process: ``python vllm_run.py SPEC_JSON OUT_PATH``.

SPEC: {"model": path, "ipcv": null | {...IPCVConfig fields}, "plugins": true|false, "tp": 1,
       "prompts": true|false, "tower": true|false, "grids": [[[t, h, w], ...], ...]}
Functions sent to the workers (``apply_model``) are this module's, importable there by name: run it
with this folder on PYTHONPATH (tests_vllm/conftest.py does).
"""

import functools
import json
import os
import sys

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def images_and_videos(seed: int = 0):
    """Two images of different sizes and one 4-frame video (2 temporal patches), uint8."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = Image.fromarray(rng.integers(0, 256, (112, 84, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (56, 140, 3), dtype=np.uint8))
    video = rng.integers(0, 256, (4, 84, 112, 3), dtype=np.uint8)
    return a, b, video


def tower_inputs(patch_in: int, grids, seed: int = 1):
    """Raw (un-normalised, 0..255) flattened patches for ``grids`` ([t, h, w] rows), as vLLM feeds its tower."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randint(0, 256, (n, patch_in), generator=g).float()


def classes(m):
    return type(m).__name__, type(m.visual).__name__


def run_tower(m, grids):
    """In the worker: the tower on raw patches of each layout in ``grids``, the rows every block's FFN
    saw, and the isolation calls (the first image alone; a video with its later frames replaced)."""
    vis = m.visual
    patch_in = vis.patch_embed.proj.weight[0].numel()
    rows = {}
    hooks = [blk.mlp.register_forward_hook(lambda mod, inp, out, i=i: rows.setdefault(i, []).append(inp[0].shape[0]))
             for i, blk in enumerate(vis.blocks)]
    outs = []
    try:
        with torch.inference_mode():
            for gi, grid in enumerate(grids):
                x = tower_inputs(patch_in, grid, seed=gi)
                x_norm = vis.input_norm(x.to(vis.device), vis.dtype)
                outs.append({"grid": grid, "x": x, "x_norm": x_norm.float().cpu(),
                             "out": vis(x, grid_thw=grid).float().cpu()})
            isolation = {}
            for gi, grid in enumerate(grids):
                t0, h0, w0 = grid[0]
                x = tower_inputs(patch_in, grid, seed=gi)
                if len(grid) > 1:  # everything after the first image alone
                    isolation[gi] = ("first image alone", vis(x[:h0 * w0], grid_thw=grid[:1]).float().cpu())
                elif t0 > 1:  # a video with its later frames replaced
                    x = x.clone()
                    x[h0 * w0:] = tower_inputs(patch_in, [[t0 - 1, h0, w0]], seed=99)
                    isolation[gi] = ("later frames replaced", vis(x, grid_thw=grid).float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return {"outs": outs, "isolation": isolation, "rows": rows,
            "config": str(getattr(vis, "ipcv_config", None))}


def main():
    spec = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    if not spec.get("plugins", True):
        os.environ["VLLM_PLUGINS"] = "none-of-the-installed"  # an allow-list that matches no plug-in
    from vllm import LLM, SamplingParams

    from ipcv_adapters.vllm.testing import chat_prompt

    overrides = {} if spec.get("ipcv") is None else {"ipcv": spec["ipcv"]}
    llm = LLM(model=spec["model"], hf_overrides=overrides, enforce_eager=True, max_model_len=2048, dtype="float32",
              limit_mm_per_prompt={"image": 2, "video": 1}, max_num_seqs=4, seed=0,
              tensor_parallel_size=spec.get("tp", 1), **spec.get("engine", {}))
    import vllm_run as me  # functions sent to the workers must be importable there (PYTHONPATH has this folder)

    res = {"classes": llm.apply_model(me.classes)[0]}
    if spec.get("prompts", True):
        a, b, video = images_and_videos()
        sp = SamplingParams(max_tokens=6, temperature=0.0)
        reqs = [
            {"prompt": chat_prompt("describe the image", images=1), "multi_modal_data": {"image": a}},
            {"prompt": chat_prompt("what is in these pictures", images=2), "multi_modal_data": {"image": [a, b]}},
            {"prompt": chat_prompt("describe the video", videos=1), "multi_modal_data": {"video": (video, {
                "fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3],
                "video_backend": "opencv", "do_sample_frames": False})}},
        ]
        res["ids"] = [list(o.outputs[0].token_ids) for o in llm.generate(reqs, sp)]
    if spec.get("tower", True):
        grids = spec.get("grids", [[[1, 8, 6]], [[1, 8, 6], [1, 4, 10]], [[2, 6, 8]]])
        ranks = llm.apply_model(functools.partial(me.run_tower, grids=grids))  # one result per worker (TP rank)
        res["tower"] = ranks[0]
        res["tower_ranks"] = [[o["out"] for o in r["outs"]] for r in ranks]
    torch.save(res, out_path)


if __name__ == "__main__":
    main()
