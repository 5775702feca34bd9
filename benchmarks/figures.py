"""The two pictures: accuracy/fidelity vs latency (like the IPCV paper's Fig. 4) and a pruning
map over an image (kept vs removed patches, like its Fig. 6)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

STYLE = {
    "ipcv": ("IPCV (paper)", "tab:red", "o"),
    "ipcv_no_as": ("IPCV w/o AS", "tab:orange", "v"),
    "ipcv_no_reint": ("IPCV w/o reint.", "tab:brown", "x"),
    "ipcv_sim": ("IPCV sim-NGR", "tab:pink", "^"),
    "random_ipcv": ("random keep + NGR/AS", "tab:purple", "D"),
    "prune_copy": ("prune + copy nbr", "tab:olive", "s"),
    "prune_lp": ("prune + l_p value", "tab:gray", "P"),
    "dart": ("DART(ViT)", "tab:green", "h"),
    "tome": ("ToMe", "tab:blue", "*"),
    "tofu": ("ToFu", "tab:cyan", "p"),
    "ipcv_config": ("IPCV variant", "black", "d"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(rows: List[dict], vanilla: dict, path: str, title: str, fid_size: int = 448, probe_size: int = 224) -> None:
    """Two panels: probe accuracy vs latency ratio, all-patch cosine vs latency ratio; one line per
    method (grid rows without extra parameters), points labelled by retain ratio."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, ylabel in ((axes[0], "probe_acc", f"CIFAR-10 linear-probe accuracy ({probe_size} px)"),
                            (axes[1], "cos_all", f"cosine to vanilla, all patches ({fid_size} px)")):
        for method, (label, color, marker) in STYLE.items():
            pts = sorted((r for r in rows if r["method"] == method and not r["variant"]), key=lambda r: r["retain"])
            pts = [r for r in pts if not math.isnan(r[key]) and not math.isnan(r["latency_ratio"])]
            if not pts:
                continue
            xs, ys = [r["latency_ratio"] for r in pts], [r[key] for r in pts]
            ax.plot(xs, ys, marker=marker, color=color, label=label, lw=1.2, ms=6)
            if method in ("ipcv", "tome"):
                for r in pts:
                    ax.annotate(f"{r['retain']:.2f}", (r["latency_ratio"], r[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=color)
        ax.scatter([1.0], [vanilla[key]], color="black", marker="*", s=120, zorder=5, label="vanilla")
        ax.set_xlabel(f"latency vs vanilla (same run, CPU, {fid_size} px)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pruning_map(image: np.ndarray, grid: int, panels: Dict[str, np.ndarray], path: str, title: str) -> None:
    """``image`` (H, W, 3) uint8 as fed to the model (square crop); ``panels``: label -> ``(grid*grid,)``
    bool of removed patches.  Removed patches are darkened and tinted."""
    plt = _plt()
    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    H = image.shape[0]
    cell = H / grid
    for ax, (label, removed) in zip(axes[1:], panels.items()):
        mask = removed.reshape(grid, grid)
        up = np.kron(mask, np.ones((int(math.ceil(cell)), int(math.ceil(cell))), dtype=bool))[:H, :H]
        shown = image.astype(np.float32).copy()
        shown[up] = shown[up] * 0.25 + np.array([40, 40, 120], dtype=np.float32) * 0.75
        ax.imshow(shown.astype(np.uint8))
        ax.set_title(f"{label}\nkept {int((~removed).sum())} / {removed.size}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)
