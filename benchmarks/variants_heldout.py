"""Held-out fidelity of the variants beyond the paper and the tuned configs (issue 6), DINOv2-S.

    python -m benchmarks.variants_heldout [--images DIR] [--num-images 24]

Fidelity = mean cosine of the final patch tokens to the unpruned model at 448 px on ImageNet
samples 0..23 (the harness's fidelity images), which `ipcv tune` never saw (it tuned on 100..131).
FLOPs relative to the paper's IPCV at the same retain ratio (analytic, ipcv_core.cost).
"""

from __future__ import annotations

import argparse
import os

import torch

from ipcv_adapters.dinov2 import dinov2_branches, load_dinov2
from ipcv_adapters.app.images import list_images, load_images
from ipcv_core.cost import ModelDims, config_flops
from ipcv_core import IPCVConfig, SegmentLayout, run_ipcv

from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, _merge_fields, tuned_fields

ROWS = [
    ("paper (reference)", {}),
    ("random keep set", dict(selection="random")),
    ("stratified + spatial sim-NGR k=6", dict(selection="stratified", reconstruction="spatial", weighting="similarity", k=6)),
    ("gradual merge + NGR k=1", lambda r: _merge_fields(r, front=1.0)),
    ("gradual merge + NGR k=1, front-loaded 0.8", lambda r: _merge_fields(r, front=0.8)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--num-images", dest="num_images", type=int, default=24)
    ap.add_argument("--size", type=int, default=448)
    args = ap.parse_args(argv)
    m = load_dinov2(args.model)
    side = args.size // 14
    layout = SegmentLayout.batched(1, (side, side))
    files = list_images(args.images)[: args.num_images]
    xs = [load_images(files[i : i + 8], args.size) for i in range(0, len(files), 8)]
    kw = dict(n_tokens=1 + side * side, protected=1, depth=len(m.encoder.layer),
              dims=ModelDims(m.config.hidden_size, ffn_params=sum(p.numel() for p in m.encoder.layer[0].mlp.parameters())))
    with torch.no_grad():
        embs = [m.embeddings(x) for x in xs]
        refs = [m(pixel_values=x).last_hidden_state for x in xs]

    def fidelity(cfg):
        cos = []
        with torch.no_grad():
            for e, r in zip(embs, refs):
                out = m.layernorm(run_ipcv(e, dinov2_branches(m), cfg, layout).hidden_states)
                cos.append(torch.nn.functional.cosine_similarity(out[:, 1:], r[:, 1:], dim=-1).mean(1))
        return torch.cat(cos).mean().item()

    print(f"| retain | row | FLOPs vs paper | cos, all patches (held out) |\n|---|---|---|---|")
    for r in (0.5, 0.35, 0.2):
        rows = list(ROWS)
        t = tuned_fields(r)
        if t is not None:
            rows.append(("tuned (`benchmarks/tuned/`)", t))
        ref_flops = config_flops(IPCVConfig.paper(r), **kw)
        for name, fields in rows:
            cfg = IPCVConfig(retain=r, **(fields(r) if callable(fields) else fields))
            print(f"| {r} | {name} | {config_flops(cfg, **kw) / ref_flops:.2f} | {fidelity(cfg):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
