"""Image loading and preprocessing without torchvision (PIL + numpy)."""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str, limit: int | None = None) -> List[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(_EXTS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(_EXTS)}) in {folder}")
    return files[:limit] if limit else files


def to_tensor(images: Sequence[np.ndarray], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 HWC arrays -> normalised float ``(B, 3, size, size)``: resize the short side to ``size``
    (bicubic), centre-crop to ``size x size``."""
    from PIL import Image

    out = []
    for arr in images:
        im = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    sd = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / sd).contiguous()


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    from PIL import Image

    return to_tensor([np.asarray(Image.open(p).convert("RGB")) for p in paths], size)
