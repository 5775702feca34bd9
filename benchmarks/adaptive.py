"""Per-image adaptive budgets that stay shape-static (issue 16, idea 2): a static menu of three
retain ratios ``(0.8 r, r, 1.2 r)`` per image, chosen by a training-free redundancy measure — the
bipartite similarity mass of block 0's attention keys (:func:`ipcv_core.variants.bipartite_redundancy`)
— against the fixed ratio ``r`` for every image.  Every bucket is its own static-shape rewrite;
images of one bucket run that bucket's graph.

    python -m benchmarks.adaptive [--ratios 0.5 0.35 0.2] [--tune 100 200] [--eval 0 100]

The bucket thresholds are the terciles of the measure on the tuning images (``--tune``, default
ImageNet samples 100..199); the comparison runs on images they were not fit on (``--eval``, default
0..99).  Per ratio: mean all-patch cosine to vanilla (448 px) with the fixed ratio and with the
menu, the mean retain and the mean analytic FLOP ratio of both (the menu's mean retain is close to,
not exactly, ``r``: the thresholds come from other images).  The configurations are the shipped
tuned ones' family (``benchmarks/tuned/``) at each menu ratio (``merge_family_config`` with the tuned
structure), or ToMe's schedule with NGR when no tuned config exists.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .grid import DEFAULT_IMAGES, DEFAULT_MODEL, HERE, TUNED_DIR


def family_of(retain: float) -> dict:
    """The structure (merge_family_config keywords) of the shipped tuned config at ``retain``."""
    from ipcv_core import IPCVConfig

    path = os.path.join(TUNED_DIR, f"dinov2-small_r{retain}.json")
    if not os.path.exists(path):
        return dict(first=0, front=1.0, placement="post_attention")
    c = IPCVConfig.from_json(path)
    if c.selection != "bipartite" or not c.stages:
        raise ValueError(f"{path} is not a merge-family config")
    return dict(first=c.stages[0][0], front=c.extras.get("front", 1.0), every=c.extras.get("every", 1), k=c.k,
                merge=c.merge, placement=c.placement, reconstruction=c.reconstruction)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--tune", type=int, nargs=2, default=[100, 200], metavar=("LO", "HI"))
    ap.add_argument("--eval", type=int, nargs=2, default=[0, 100], metavar=("LO", "HI"))
    ap.add_argument("--menu", type=float, nargs=3, default=[0.8, 1.0, 1.2], help="retain factors, most redundant first")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "issue16", "adaptive.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from ipcv_adapters.app.images import list_images, load_images
    from ipcv_adapters.dinov2 import dinov2_branches, dinov2_layout, load_dinov2
    from ipcv_core import run_ipcv
    from ipcv_core.cost import ModelDims, config_flops
    from ipcv_core.search import merge_family_config
    from ipcv_core.variants import bipartite_redundancy, budget_bucket, normalise_metric

    m = load_dinov2(args.model)
    blocks, layout = dinov2_branches(m), dinov2_layout(m)
    files = list_images(args.images)
    n_tok = 1 + (args.size // 14) ** 2
    c = m.config
    dims = ModelDims(c.hidden_size, int(round(c.hidden_size * c.mlp_ratio)), key_dim=c.hidden_size // c.num_attention_heads)
    van = config_flops(None, n_tok, 1, len(blocks), dims)

    def batches(lo, hi):
        for i in range(lo, hi, 8):
            yield load_images(files[i: min(hi, i + 8)], args.size)

    def redundancy(x):
        e = m.embeddings(x)
        return bipartite_redundancy(normalise_metric(blocks[0].key_features(e)), layout.protected)

    red_tune = torch.cat([redundancy(x) for x in batches(*args.tune)])
    thresholds = [torch.quantile(red_tune, 2 / 3).item(), torch.quantile(red_tune, 1 / 3).item()]
    xs = list(batches(*args.eval))
    embs = [m.embeddings(x) for x in xs]
    refs = [m(pixel_values=x).last_hidden_state for x in xs]
    red_eval = torch.cat([bipartite_redundancy(normalise_metric(blocks[0].key_features(e)), layout.protected)
                          for e in embs])
    bucket = budget_bucket(red_eval, thresholds)
    out = {"thresholds": thresholds, "tune": args.tune, "eval": args.eval, "menu": args.menu,
           "bucket_counts": torch.bincount(bucket, minlength=3).tolist(), "ratios": {}}
    for r in args.ratios:
        fam = family_of(r)
        menu = [round(r * f, 4) for f in args.menu]
        per = {}
        for rr in menu:
            cfg = merge_family_config(rr, len(blocks), **fam)
            cos = []
            for e, ref in zip(embs, refs):
                o = m.layernorm(run_ipcv(e, blocks, cfg, layout).hidden_states)
                cos.append(torch.nn.functional.cosine_similarity(o[:, 1:], ref[:, 1:], dim=-1).mean(1))
            per[rr] = (torch.cat(cos), config_flops(cfg, n_tok, 1, len(blocks), dims) / van)
        fixed = per[menu[1]][0]
        chosen = torch.stack([per[menu[int(b)]][0][i] for i, b in enumerate(bucket)])
        res = {"family": fam, "menu": menu,
               "fixed": {"cos_all": fixed.mean().item(), "retain": r, "flop_ratio": per[menu[1]][1]},
               "adaptive": {"cos_all": chosen.mean().item(),
                            "retain": sum(menu[int(b)] for b in bucket) / len(bucket),
                            "flop_ratio": sum(per[menu[int(b)]][1] for b in bucket) / len(bucket)},
               "per_menu_cos": {str(k): v[0].mean().item() for k, v in per.items()}}
        out["ratios"][str(r)] = res
        print(f"r={r}: fixed cos {res['fixed']['cos_all']:.5f} (FLOPs {res['fixed']['flop_ratio']:.3f}); adaptive "
              f"{res['adaptive']['cos_all']:.5f} (mean retain {res['adaptive']['retain']:.3f}, FLOPs "
              f"{res['adaptive']['flop_ratio']:.3f}); buckets {out['bucket_counts']}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
