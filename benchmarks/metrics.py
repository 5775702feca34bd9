"""How one configuration is measured: the DINOv2-S encoder the runners plug into, the inputs every
configuration sees (:class:`Inputs`: fidelity images and their vanilla outputs, the latency batch,
the CIFAR probe), fidelity to vanilla, probe features, and :func:`measure`, which turns a
:class:`~benchmarks.grid.Config` into a :class:`~benchmarks.report.Row`.

Costs: FLOPs from the shapes every block branch sees (:mod:`benchmarks.cost`, priced by
:mod:`ipcv_core.cost`), latency with :func:`ipcv_core.cost.interleaved_latency` (the row's
``latency_ratio`` / ``cpu_ratio`` are the medians of the per-pair ratios, ``Timing.pair_ratio`` /
``Timing.cpu_ratio``), peak resident memory of the first fidelity batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ipcv_core.cost import ModelDims, Timing, interleaved_latency

from .cost import CountingBlock, count_flops, peak_rss_delta
from .grid import Config
from .methods import METHODS
from .probe import Probe, fit_probe
from .report import Row

VANILLA = METHODS["vanilla"]


# ----------------------------------------------------------------------------- model plumbing
class Encoder:
    def __init__(self, model_path: str):
        from ipcv_adapters.dinov2 import dinov2_branches, dinov2_layout, load_dinov2

        self.model = load_dinov2(model_path)
        self.blocks = dinov2_branches(self.model)
        self.layout = dinov2_layout(self.model)
        c = self.model.config
        self.dims = ModelDims(c.hidden_size, int(round(c.hidden_size * c.mlp_ratio)), c.patch_size, c.num_channels)
        self.depth = len(self.blocks)

    def __call__(self, x: torch.Tensor, runner, retain: float, blocks=None):
        emb = self.model.embeddings(x)
        res = runner(emb, blocks or self.blocks, retain, self.layout)
        return self.model.layernorm(res.hidden_states), res

    @staticmethod
    def features(tokens: torch.Tensor) -> torch.Tensor:
        """Probe features: CLS concatenated with the mean patch token."""
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


def progress(it, disable, **kw):
    from tqdm import tqdm

    return tqdm(it, disable=disable, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- fidelity
def fidelity(out: torch.Tensor, ref: torch.Tensor, removed: torch.Tensor) -> Dict[str, List[float]]:
    """Per-image metrics on the patch tokens (CLS excluded; ``cos_cls`` separately)."""
    o, r, rem = out[:, 1:].double(), ref[:, 1:].double(), removed[:, 1:]
    cos = F.cosine_similarity(o, r, dim=-1)
    err2, ref2 = (o - r).pow(2).sum(-1), r.pow(2).sum(-1)
    nan = torch.full((o.shape[0],), math.nan, dtype=torch.float64)

    def on(mask):
        cnt = mask.sum(1)
        c = torch.where(cnt > 0, (cos * mask).sum(1) / cnt.clamp_min(1), nan)
        e = torch.where(cnt > 0, ((err2 * mask).sum(1) / (ref2 * mask).sum(1).clamp_min(1e-30)).sqrt(), nan)
        return c, e

    c_rem, e_rem = on(rem)
    c_kept, _ = on(~rem)
    return {
        "cos_all": cos.mean(1).tolist(),
        "rel_l2_all": (err2.sum(1) / ref2.sum(1)).sqrt().tolist(),
        "cos_removed": c_rem.tolist(),
        "rel_l2_removed": e_rem.tolist(),
        "cos_kept": c_kept.tolist(),
        "cos_cls": F.cosine_similarity(out[:, 0].double(), ref[:, 0].double(), dim=-1).tolist(),
    }


def _mean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


# ----------------------------------------------------------------------------- probe
def balanced(labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n / classes`` indices of each class (classes interleaved)."""
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    idx = [np.nonzero(labels == c)[0][:per] for c in classes]
    return np.stack(idx, 1).reshape(-1)


def probe_features(enc: Encoder, images: np.ndarray, size: int, runner, retain: float, batch: int, bar=None) -> torch.Tensor:
    from ipcv_adapters.app.images import to_tensor

    feats = []
    for i in range(0, len(images), batch):
        tok, _ = enc(to_tensor(images[i : i + batch], size), runner, retain)
        feats.append(Encoder.features(tok))
        if bar is not None:
            bar.update(len(images[i : i + batch]))
    return torch.cat(feats)


def cached_vanilla_features(enc, images, size, batch, cache, key, disable):
    path = os.path.join(cache, f"{key}.pt") if cache else None
    if path and os.path.exists(path):
        return torch.load(path)
    bar = progress(None, disable, total=len(images), desc=f"vanilla features {key}", leave=False)
    f = probe_features(enc, images, size, VANILLA, 1.0, batch, bar)
    bar.close()
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(f, path)
    return f


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """What every configuration is measured on."""

    fid_x: torch.Tensor  # fidelity images
    refs: torch.Tensor  # vanilla's final tokens of fid_x
    lat_x: torch.Tensor  # the latency batch
    probe: Optional[Probe] = None  # fit on vanilla features of the CIFAR train subset
    test_images: Optional[np.ndarray] = None
    test_y: Optional[torch.Tensor] = None
    vanilla_test_features: Optional[torch.Tensor] = None
    vanilla_flops: float = math.nan  # per image; set by measure_vanilla

    @property
    def probe_meta(self) -> Dict[str, float]:
        if self.probe is None:
            return {"probe_weight_decay": math.nan, "probe_cv_acc": math.nan}
        return {"probe_weight_decay": self.probe.weight_decay, "probe_cv_acc": self.probe.cv_accuracy}


def load_inputs(enc: Encoder, args) -> Inputs:
    from ipcv_adapters.app.images import list_images, load_images

    fid_x = load_images(list_images(args.images, args.fid_images), args.fid_size)
    refs = torch.cat([enc(fid_x[i : i + args.fid_batch], VANILLA, 1.0)[0] for i in range(0, len(fid_x), args.fid_batch)])
    data = Inputs(fid_x=fid_x, refs=refs, lat_x=fid_x[: args.latency_batch])
    if args.train and args.test:
        npz = np.load(args.cifar)
        tr = balanced(npz["train_labels"], args.train)
        te = balanced(npz["test_labels"], args.test)
        key = f"dinov2s_cifar_{args.probe_size}px"
        ftr = cached_vanilla_features(enc, npz["train_images"][tr], args.probe_size, args.probe_batch, args.cache,
                                      f"{key}_train{len(tr)}", args.no_progress)
        data.probe = fit_probe(ftr, torch.from_numpy(npz["train_labels"][tr]).long(), 10)
        data.test_images, data.test_y = npz["test_images"][te], torch.from_numpy(npz["test_labels"][te]).long()
        data.vanilla_test_features = cached_vanilla_features(enc, data.test_images, args.probe_size, args.probe_batch,
                                                             args.cache, f"{key}_test{len(te)}", args.no_progress)
    return data


# ----------------------------------------------------------------------------- latency
def time_against_vanilla(enc: Encoder, x: torch.Tensor, runner, retain: float, repeats: int) -> Timing:
    return interleaved_latency(lambda: enc(x, VANILLA, 1.0), lambda: enc(x, runner, retain), repeats)


def latency_fields(tm: Timing, images: int) -> Dict[str, float]:
    """A row's latency columns from its timing of ``images`` images (ratios: per-pair medians)."""
    return dict(latency_ms=1000 * tm.s / images, vanilla_latency_ms=1000 * tm.ref_s / images,
                latency_ratio=tm.pair_ratio, cpu_ratio=tm.cpu_ratio)


# ----------------------------------------------------------------------------- one configuration
def measure_vanilla(enc: Encoder, data: Inputs, args) -> Row:
    """The vanilla row (its latency ratio is 1 by definition; FLOPs / memory measured like the
    others); sets ``data.vanilla_flops``."""
    fid_x, lat_x = data.fid_x, data.lat_x
    log = []
    (vout, _), vmem = peak_rss_delta(lambda: enc(fid_x[: args.fid_batch], VANILLA, 1.0,
                                                 [CountingBlock(b, log) for b in enc.blocks]))
    data.vanilla_flops = count_flops(log, enc.dims, vout.shape[1] - 1, 0.0)
    t_ref = interleaved_latency(lambda: enc(lat_x, VANILLA, 1.0), lambda: None, args.repeats).ref_s
    return Row(
        method="vanilla", variant="", label="vanilla", retain=1.0, params="{}",
        kept_patches=vout.shape[1] - 1, cos_all=1.0, cos_removed=math.nan, cos_kept=1.0, cos_cls=1.0,
        rel_l2_all=0.0, rel_l2_removed=math.nan,
        probe_acc=data.probe.accuracy(data.vanilla_test_features, data.test_y) if data.probe is not None else math.nan,
        latency_ms=1000 * t_ref / len(lat_x), vanilla_latency_ms=1000 * t_ref / len(lat_x), latency_ratio=1.0,
        cpu_ratio=1.0, gflops=data.vanilla_flops / 1e9, flop_ratio=1.0, peak_mem_mib=vmem,
        seconds=0.0,
    )


def measure(cfg: Config, enc: Encoder, data: Inputs, args) -> Row:
    t0 = time.perf_counter()
    runner = cfg.runner()
    fid_x, lat_x = data.fid_x, data.lat_x
    per_img: Dict[str, List[float]] = {}
    flops = mem = math.nan
    for ci, i in enumerate(range(0, len(fid_x), args.fid_batch)):
        x = fid_x[i : i + args.fid_batch]
        if ci == 0:  # counted and memory-measured batch
            log = []
            blocks = [CountingBlock(b, log) for b in enc.blocks]
            (out, res), mem = peak_rss_delta(lambda: enc(x, runner, cfg.retain, blocks))
            flops = count_flops(log, enc.dims, out.shape[1] - 1, res.overhead_flops)
            kept = int((~res.removed[0, 1:]).sum())
        else:
            out, res = enc(x, runner, cfg.retain)
        for k, v in fidelity(out, data.refs[i : i + args.fid_batch], res.removed).items():
            per_img.setdefault(k, []).extend(v)
    acc = math.nan
    if data.probe is not None:
        feats = probe_features(enc, data.test_images, args.probe_size, runner, cfg.retain, args.probe_batch)
        acc = data.probe.accuracy(feats, data.test_y)
    tm = time_against_vanilla(enc, lat_x, runner, cfg.retain, args.repeats)
    return Row(
        method=cfg.method, variant=cfg.variant, label=cfg.label, retain=cfg.retain, params=cfg.params_json,
        kept_patches=kept,
        **{k: _mean(v) for k, v in per_img.items()},
        probe_acc=acc,
        **latency_fields(tm, len(lat_x)),
        gflops=flops / 1e9,
        flop_ratio=flops / data.vanilla_flops,
        peak_mem_mib=mem,
        seconds=time.perf_counter() - t0,
    )
