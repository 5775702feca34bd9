"""Cost measurements of the harness: FLOPs counted from the shapes each block branch really sees,
and peak resident memory.  The cost model itself (every FLOP formula, :class:`~ipcv_core.cost.ModelDims`)
and the interleaved timer are :mod:`ipcv_core.cost`'s, the project's one cost model.

FLOPs per image (multiply-add = 2 FLOPs): a :class:`CountingBlock` records ``(kind, batch, Lq, Lkv)``
for every branch call; :func:`count_flops` prices each record with :func:`~ipcv_core.cost.attention_flops`
(``Lq`` query rows, ``Lkv`` key/value rows), :func:`~ipcv_core.cost.ffn_flops` or
:func:`~ipcv_core.cost.key_flops` (``key_features``: the ToMe/ToFu/DART metric, one k projection)
(an ``attention_with_keys`` call — ToMe, post-attention stages — is one attention: the keys the
attention computed cost nothing extra) and adds the method's own work outside the blocks (``MethodOutput.overhead_flops``: matching,
neighbour search, NGR, priced with the same module's functions) and the patch embedding
(:func:`~ipcv_core.cost.patch_embed_flops`, the same for every method).

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
from typing import Callable, List, Sequence, Tuple

from ipcv_core.cost import ModelDims, attention_flops, ffn_flops, key_flops, patch_embed_flops

__all__ = ["CountingBlock", "count_flops", "peak_rss_delta", "stable_malloc"]


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

    def attention_with_keys(self, x_q, x_kv, ctx):
        """The attention and the keys it computed: one attention record; a key projection only when
        the wrapped block computes the keys separately (no ``attention_keys`` of its own)."""
        if getattr(self._blk, "attention_keys", None) is None:
            upd = self.attention_branch(x_q, x_kv, ctx)
            return upd, self.key_features(x_kv, ctx.kv_pos)
        self._log.append(("attn", x_q.shape[0], x_q.shape[1], x_kv.shape[1]))
        return self._blk.attention_with_keys(x_q, x_kv, ctx)


# what each CountingBlock record costs: (rows, kv rows, dims) -> FLOPs, from the one cost model
_PRICE = {
    "attn": attention_flops,
    "ffn": lambda rows, _lkv, d: ffn_flops(rows, d),
    "keys": lambda rows, _lkv, d: key_flops(rows, d),
}


def count_flops(log: Sequence[Tuple[str, int, int, int]], dims: ModelDims, n_patches: int, overhead_per_image: float) -> float:
    """FLOPs per image from a :class:`CountingBlock` log of one batched call."""
    if not log:
        return float("nan")
    batch = log[0][1]
    blocks = sum(_PRICE[k](lq, lkv, dims) * b for k, b, lq, lkv in log) / batch
    return blocks + patch_embed_flops(n_patches, dims) + overhead_per_image


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
