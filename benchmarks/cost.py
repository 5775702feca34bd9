"""Cost measurements: analytic FLOPs counted from the shapes each block branch sees, wall-clock
latency (interleaved with vanilla, median of repeats) and peak resident memory.

FLOPs (multiply-add = 2 FLOPs), per block branch call with ``Lq`` query rows, ``Lkv`` key/value
rows, model width ``D``, MLP width ``M``:

* attention: q/out projections ``2·Lq·D²`` each, k/v projections ``2·Lkv·D²`` each,
  ``QKᵀ`` and ``AV`` ``2·Lq·Lkv·D`` each (softmax, norms, biases and LayerScale not counted);
* FFN: ``4·L·D·M``;  ``key_features`` (ToMe/ToFu/DART metric): one k projection, ``2·L·D²``;
* plus the method's own work outside the blocks (``MethodOutput.overhead_flops``: matching,
  neighbour search, NGR) and the patch embedding ``2·n·(3·p²)·D`` (the same for every method).

The FLOP ratio to vanilla is the latency a method would reach if time were proportional to FLOPs:
the "FLOP bound" its measured latency ratio is compared with.

Peak memory: the process's resident-set high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` (Linux), free heap is returned to the OS (``malloc_trim``), and the peak
above the resident size at the start of the call is reported; :func:`stable_malloc` (called at
start-up) fixes glibc's mmap threshold so that large tensors are returned to the OS when freed.  It counts everything the call
allocates (activations, temporaries) but not memory malloc reuses without returning it; NaN where
the kernel interface is not available.
"""

from __future__ import annotations

import ctypes
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

__all__ = ["ModelDims", "CountingBlock", "Timing", "stable_malloc", "count_flops", "branch_flops", "peak_rss_delta", "interleaved_latency"]


@dataclass(frozen=True)
class ModelDims:
    dim: int
    mlp: int
    patch: int
    channels: int = 3


class CountingBlock:
    """Wraps a :class:`ipcv_core.Block` and records ``(kind, batch, Lq, Lkv)`` for every call."""

    def __init__(self, blk, log: List[Tuple[str, int, int, int]]):
        self._blk, self._log = blk, log

    def attention_branch(self, x_q, x_kv, ctx):
        self._log.append(("attn", x_q.shape[0], x_q.shape[1], x_kv.shape[1]))
        return self._blk.attention_branch(x_q, x_kv, ctx)

    def ffn_branch(self, x):
        self._log.append(("ffn", x.shape[0], x.shape[1], 0))
        return self._blk.ffn_branch(x)

    def key_features(self, x, pos=None):
        self._log.append(("keys", x.shape[0], x.shape[1], 0))
        return self._blk.key_features(x) if pos is None else self._blk.key_features(x, pos)


def branch_flops(kind: str, lq: int, lkv: int, d: ModelDims) -> float:
    D = d.dim
    if kind == "attn":
        return 4.0 * lq * D * D + 4.0 * lkv * D * D + 4.0 * lq * lkv * D
    if kind == "ffn":
        return 4.0 * lq * D * d.mlp
    if kind == "keys":
        return 2.0 * lq * D * D
    raise ValueError(kind)


def count_flops(log: Sequence[Tuple[str, int, int, int]], dims: ModelDims, n_patches: int, overhead_per_image: float) -> float:
    """FLOPs per image from a :class:`CountingBlock` log of one batched call."""
    if not log:
        return float("nan")
    batch = log[0][1]
    blocks = sum(branch_flops(k, lq, lkv, dims) * b for k, b, lq, lkv in log) / batch
    embed = 2.0 * n_patches * dims.channels * dims.patch * dims.patch * dims.dim
    return blocks + embed + overhead_per_image


_LIBC = None


def _trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def stable_malloc(threshold: int = 64 * 1024) -> bool:
    """Fix glibc's mmap threshold (it otherwise grows after large frees, after which big tensors come
    from the heap and freed memory stays resident, so peaks drift upward over a long run): every
    allocation above ``threshold`` bytes is then mmapped and returned on free.  False if unsupported."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_rss_delta(fn: Callable[[], object]) -> Tuple[object, float]:
    """Run ``fn``; return its result and the peak resident memory it added, in MiB (NaN if the
    high-water mark cannot be reset here)."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        return fn(), math.nan
    out = fn()
    return out, (_status_kb("VmHWM") - base) / 1024.0


@dataclass(frozen=True)
class Timing:
    """Interleaved timing of a reference and a candidate.  ``ratio`` / ``cpu_ratio``: median over the
    repeats of the per-pair ratios (each candidate run divided by the reference run just before it)
    of wall-clock and of process CPU time; per-pair ratios follow load changes on a shared machine
    better than a ratio of medians, and CPU time barely depends on other processes' load."""

    ref_s: float  # median wall seconds of the reference
    s: float  # median wall seconds of the candidate
    ratio: float
    cpu_ratio: float


def interleaved_latency(fn_ref: Callable[[], object], fn: Callable[[], object], repeats: int) -> Timing:
    """Time ``fn_ref`` and ``fn`` alternately, ``repeats`` times each."""
    wall, cpu = [], []
    for _ in range(repeats):
        pair = []
        for f in (fn_ref, fn):
            w, c = time.perf_counter(), time.process_time()
            f()
            pair.append((time.perf_counter() - w, time.process_time() - c))
        wall.append((pair[0][0], pair[1][0]))
        cpu.append((pair[0][1], pair[1][1]))
    med = statistics.median
    return Timing(
        med(a for a, _ in wall),
        med(b for _, b in wall),
        med(b / a for a, b in wall),
        med(b / a if a > 0 else math.nan for a, b in cpu),
    )
