"""Held-out fidelity of the variants beyond the paper and the tuned configs, DINOv2-S.

    python -m benchmarks.variants_heldout [--images DIR] [--lo 0] [--hi 24] [--set issue6|issue16]

Fidelity = mean cosine of the final patch tokens to the unpruned model at 448 px on ImageNet samples
``lo..hi-1`` (default 0..23, the harness's fidelity images; ``ipcv tune`` tuned on 100..131 in issue 6
and on 100..199 in issue 16, so every sample below 100 is held out).  FLOPs relative to the paper's
IPCV at the same retain ratio and to vanilla (analytic, :func:`ipcv_core.cost.config_flops`, the
bipartite matching at the width of the head-averaged keys).  ``--set issue16`` adds ToMe (the
harness's implementation, FLOPs from the same cost model: ToMe's even schedule merging between
attention and FFN on the attention's own keys) and the issue-16 rows.
"""

from __future__ import annotations

import argparse

import torch

from ipcv_adapters.app.images import list_images, load_images
from ipcv_adapters.dinov2 import dinov2_branches, dinov2_layout, load_dinov2
from ipcv_core import IPCVConfig, SegmentLayout, run_ipcv
from ipcv_core.config import num_keep
from ipcv_core.cost import ModelDims, attention_flops, config_flops, ffn_flops, knn_flops

from .baselines.schedule import even_schedule
from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, POST, _merge_fields, tuned_fields

ROWS = {
    "issue6": [
        ("paper (reference)", {}),
        ("random keep set", dict(selection="random")),
        ("stratified + spatial sim-NGR k=6", dict(selection="stratified", reconstruction="spatial", weighting="similarity", k=6)),
        ("gradual merge + NGR k=1", lambda r: _merge_fields(r, front=1.0)),
        ("gradual merge + NGR k=1, front-loaded 0.8", lambda r: _merge_fields(r, front=0.8)),
    ],
    "issue16": [
        ("paper (reference)", {}),
        ("ToMe", "tome"),
        ("merge at block input (issue 6)", lambda r: _merge_fields(r, front=1.0)),
        ("ToMe as a rewrite (post-attention, copy unmerge)", lambda r: _merge_fields(r, front=1.0, reconstruction="copy", **POST)),
        ("post-attention merge + NGR", lambda r: _merge_fields(r, front=1.0, **POST)),
    ],
}


def tome_flops(n_tokens: int, protected: int, retain: float, depth: int, dims: ModelDims) -> float:
    """ToMe (with unmerge) under the project's cost model: in every block attention on the current
    rows, matching on the attention's keys (set A against set B at the key width), FFN on the rows
    left after the block's merges."""
    n = n_tokens - protected
    sched = even_schedule(n, num_keep(n, retain), depth)
    rows, total = n_tokens, 0.0
    for r in sched:
        total += attention_flops(rows, rows, dims)
        p = rows - protected
        total += knn_flops((p + 1) // 2, p // 2, dims.metric) if r else 0.0
        rows -= r
        total += ffn_flops(rows, dims)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--lo", type=int, default=0)
    ap.add_argument("--hi", type=int, default=24)
    ap.add_argument("--num-images", dest="num_images", type=int, help="(old spelling of --hi with --lo 0)")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--set", dest="row_set", choices=sorted(ROWS), default="issue6")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hi = args.num_images if args.num_images else args.hi
    m = load_dinov2(args.model)
    side = args.size // 14
    layout = SegmentLayout.batched(1, (side, side))
    files = list_images(args.images)[args.lo: hi]
    xs = [load_images(files[i: i + 8], args.size) for i in range(0, len(files), 8)]
    c = m.config
    dims = ModelDims(c.hidden_size, ffn_params=sum(p.numel() for p in m.encoder.layer[0].mlp.parameters()),
                     key_dim=c.hidden_size // c.num_attention_heads)
    kw = dict(n_tokens=1 + side * side, protected=1, depth=len(m.encoder.layer), dims=dims)
    van = config_flops(None, **kw)
    with torch.no_grad():
        embs = [m.embeddings(x) for x in xs]
        refs = [m(pixel_values=x).last_hidden_state for x in xs]

    def fidelity(cfg):
        from .methods import METHODS

        cos = []
        with torch.no_grad():
            for e, r in zip(embs, refs):
                if isinstance(cfg, tuple):  # a harness method
                    h = METHODS[cfg[0]](e, dinov2_branches(m), cfg[1], dinov2_layout(m)).hidden_states
                else:
                    h = run_ipcv(e, dinov2_branches(m), cfg, layout).hidden_states
                out = m.layernorm(h)
                cos.append(torch.nn.functional.cosine_similarity(out[:, 1:], r[:, 1:], dim=-1).mean(1))
        return torch.cat(cos).mean().item()

    print(f"images {args.lo}..{args.lo + len(files) - 1} at {args.size} px\n")
    print("| retain | row | FLOPs vs paper | FLOPs vs vanilla | cos, all patches (held out) |\n|---|---|---|---|---|")
    for r in args.ratios:
        rows = list(ROWS[args.row_set])
        t = tuned_fields(r)
        if t is not None:
            rows.append(("tuned (`benchmarks/tuned/`)", t))
        ref_flops = config_flops(IPCVConfig.paper(r), **kw)
        for name, fields in rows:
            if fields == "tome":
                f, cos = tome_flops(kw["n_tokens"], 1, r, kw["depth"], dims), fidelity(("tome", r))
            else:
                cfg = IPCVConfig(retain=r, **(fields(r) if callable(fields) else fields))
                f, cos = config_flops(cfg, **kw), fidelity(cfg)
            print(f"| {r} | {name} | {f / ref_flops:.2f} | {f / van:.3f} | {cos:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
