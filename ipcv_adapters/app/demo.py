"""Demo: real DINOv2-S weights, real images at 448 px, vanilla vs IPCV (eager driver).

    python -m ipcv_adapters.app.demo [--model PATH_OR_HUB_ID] [--images DIR] [--num-images 4] [--size 448]

Prints, per retain ratio: tokens kept per image, wall-time ratio vs vanilla (same run, interleaved,
median of repeats), mean cosine similarity of the final patch tokens to vanilla (all patches, and
the removed patches alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from ipcv_core import IPCVConfig
from ipcv_core.cost import interleaved_latency

from ..dinov2 import dinov2_forward, load_dinov2
from .images import list_images, load_images

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.normpath(os.path.join(_HERE, "..", "..", "..", "shared"))
DEFAULT_MODEL = os.path.join(_SHARED, "weights", "dinov2-small")
DEFAULT_IMAGES = os.path.join(_SHARED, "data", "imagenet-samples")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="local Dinov2Model folder or hub id")
    ap.add_argument("--images", default=DEFAULT_IMAGES, help="folder of images")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=448, help="square input size in pixels (multiple of 14)")
    ap.add_argument("--retain", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.size % 14:
        ap.error(f"--size must be a multiple of the patch size 14, got {args.size}")

    missing = []
    if args.model == DEFAULT_MODEL and not os.path.isdir(args.model):
        missing.append(f"DINOv2-S weights at {args.model}")
    if not os.path.isdir(args.images):
        missing.append(f"images at {args.images}")
    if missing:
        print(f"ipcv demo: cannot find {' and '.join(missing)}.\n"
              "The demo runs real DINOv2-S weights on real images. In the repository they come from the "
              "../shared folder beside the checkout (weights/dinov2-small, data/imagenet-samples); installed as a "
              "library, point the demo at your own:\n"
              "    ipcv demo --model PATH_OR_HUB_ID_OF_A_DINOV2_CHECKPOINT --images DIR_OF_IMAGES\n"
              "(e.g. --model facebook/dinov2-small downloads it from the Hugging Face hub). To try ipcv without "
              "weights: ipcv inspect tiny:dinov2", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = load_dinov2(args.model)
    x = load_images(list_images(args.images, args.num_images), args.size)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    n_patch = ref.shape[1] - 1
    print(f"DINOv2 {args.model}\n{x.shape[0]} images at {args.size}px -> 1 CLS + {n_patch} patch tokens; "
          f"IPCV l_p=3, Δ=7, k=10 (paper defaults); torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'retain':>6} | {'kept/img':>8} | {'time ratio':>10} | {'cos all patches':>15} | {'cos removed':>11}")
    print("-" * 63)
    for r in args.retain:
        cfg = IPCVConfig.paper(r)
        with torch.no_grad():
            tm = interleaved_latency(lambda: model(pixel_values=x), lambda: dinov2_forward(model, x, cfg), args.repeats)
        out, res = dinov2_forward(model, x, cfg)
        cos = torch.nn.functional.cosine_similarity(out[:, 1:], ref[:, 1:], dim=-1)  # (B, N)
        rem = res.rem_idx - 1  # rem positions are patch positions + 1 (CLS at 0)
        cos_rem = torch.gather(cos, 1, rem).mean().item() if rem.numel() else float("nan")
        ratio = tm.ratio
        print(f"{r:>6.2f} | {res.keep_idx.shape[1] - 1:>8d} | {ratio:>10.3f} | {cos.mean().item():>15.4f} | {cos_rem:>11.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
