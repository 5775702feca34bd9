"""Segment layouts: which tokens form one image / video frame / tile.

Every function in :mod:`ipcv_core` works on hidden states of shape ``(B, N, D)``.  A
:class:`SegmentLayout` says how the ``N`` tokens of *each batch row* split into segments:

* ``lengths=None`` (the *batched* layout): each row is one segment (InternVL tiles, a batch of
  DINOv2 images).  ``N`` may be symbolic (dynamic) under ``torch.export``.
* ``lengths=(n_0, n_1, ...)`` (the *packed* layout): each row holds several segments back to back,
  with these static lengths summing to ``N`` (Qwen2-VL: one segment per image / video frame).

``protected`` is the number of leading tokens of every segment that are never removed and never
scored (a CLS token, register tokens).  They stay in place and are not used as NGR neighbours.

``grids`` (optional) gives each segment's patch grid ``(h, w)`` (row-major, after the protected
tokens): one entry per segment for packed layouts, a single entry for the batched layout (every
row then has that grid, so the token count is fixed).  Spatial variants need it.  ``merge``: the
patches come in ``merge x merge`` windows (windows row-major, patches row-major inside a window),
as Qwen2-VL orders them for its PatchMerger; 1 = plain row-major.

:func:`plan_segments` turns a layout, a token count and a retain ratio into a static
:class:`SegmentPlan`: for each segment where it starts, how many tokens it keeps and removes, and
where its kept / removed rows lie in the concatenated kept / removed lists (each list is in
ascending original order, segments one after the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .counts import num_keep

__all__ = ["SegmentLayout", "SegmentSpec", "SegmentPlan", "plan_segments", "segment_ids", "segment_mask"]


@dataclass(frozen=True)
class SegmentLayout:
    lengths: Optional[Tuple[int, ...]] = None
    protected: int = 0
    grids: Optional[Tuple[Tuple[int, int], ...]] = None
    merge: int = 1
    #: packed layouts only: per segment the lengths of its attention windows (consecutive rows; Qwen2.5-VL's
    #: window attention), or None.  Blocks named in LocateSpec.windowed_blocks attend within windows.
    windows: Optional[Tuple[Tuple[int, ...], ...]] = None

    def __post_init__(self) -> None:
        if self.grids is not None:
            grids = tuple((int(h), int(w)) for h, w in self.grids)
            object.__setattr__(self, "grids", grids)
            want = 1 if self.lengths is None else len(self.lengths)
            if len(grids) != want:
                raise ValueError(f"SegmentLayout.grids must have {want} entries (one per segment), got {len(grids)}")
            if self.lengths is not None:
                for (h, w), n in zip(grids, self.lengths):
                    if h * w + self.protected != n:
                        raise ValueError(
                            f"SegmentLayout.grids: grid {h}x{w} + {self.protected} protected != segment length {n}"
                        )
        if self.lengths is not None:
            lengths = tuple(self.lengths)
            if not lengths or any((not isinstance(n, int)) or isinstance(n, bool) or n < 1 for n in lengths):
                raise ValueError(f"SegmentLayout.lengths must be a non-empty tuple of ints >= 1, got {self.lengths!r}")
            object.__setattr__(self, "lengths", lengths)
            if any(n <= self.protected for n in lengths):
                raise ValueError(
                    f"SegmentLayout.protected ({self.protected}) must be < every segment length {lengths}"
                )
        if not isinstance(self.merge, int) or self.merge < 1 or (
            self.grids is not None and any(h % self.merge or w % self.merge for h, w in self.grids)
        ):
            raise ValueError(f"SegmentLayout.merge must be an int >= 1 dividing every grid side, got {self.merge!r}")
        if not isinstance(self.protected, int) or isinstance(self.protected, bool) or self.protected < 0:
            raise ValueError(f"SegmentLayout.protected must be an int >= 0, got {self.protected!r}")
        if self.windows is not None:
            windows = tuple(tuple(int(w) for w in ws) for ws in self.windows)
            object.__setattr__(self, "windows", windows)
            if self.lengths is None or len(windows) != len(self.lengths) or any(
                    sum(ws) != n or min(ws) < 1 for ws, n in zip(windows, self.lengths)):
                raise ValueError(f"SegmentLayout.windows must give, per segment of a packed layout, window lengths "
                                 f">= 1 summing to the segment's length {self.lengths}; got {self.windows!r}")

    @classmethod
    def batched(cls, protected: int = 0, grid: Optional[Tuple[int, int]] = None) -> "SegmentLayout":
        return cls(None, protected, None if grid is None else (tuple(grid),))

    @classmethod
    def packed(cls, lengths: Sequence[int], protected: int = 0, grids=None, merge: int = 1, windows=None) -> "SegmentLayout":
        return cls(tuple(int(n) for n in lengths), protected, None if grids is None else tuple(map(tuple, grids)), merge,
                   None if windows is None else tuple(map(tuple, windows)))

    def without_grid(self) -> "SegmentLayout":
        return SegmentLayout(self.lengths, self.protected, windows=self.windows)

    def window_ids(self, device=None) -> torch.Tensor:
        """``(N,)`` int64: the window of every token (windows numbered across segments)."""
        if self.windows is None:
            raise ValueError("this layout has no windows")
        sizes = torch.tensor([w for ws in self.windows for w in ws], dtype=torch.long)
        ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        return ids.to(device) if device is not None else ids

    @property
    def static_tokens(self) -> Optional[int]:
        """Tokens per row fixed by this layout (packed lengths or a batched grid), else None."""
        if self.lengths is not None:
            return sum(self.lengths)
        if self.grids is not None:
            h, w = self.grids[0]
            return h * w + self.protected
        return None

    def segment_grid(self, i: int) -> Tuple[int, int]:
        if self.grids is None:
            raise ValueError("this IPCV variant needs the patch grid: give SegmentLayout(grids=...) "
                             "(adapters supply it)")
        return self.grids[i]

    @property
    def num_segments(self) -> int:
        return 1 if self.lengths is None else len(self.lengths)

    def check_tokens(self, n_tokens) -> None:
        if self.lengths is not None and isinstance(n_tokens, int) and sum(self.lengths) != n_tokens:
            raise ValueError(
                f"segment lengths {self.lengths} sum to {sum(self.lengths)} but the input has {n_tokens} tokens"
            )
        if self.lengths is None and isinstance(n_tokens, int) and n_tokens <= self.protected:
            raise ValueError(f"input has {n_tokens} tokens, not more than the {self.protected} protected ones")
        if self.lengths is None and self.grids is not None and isinstance(n_tokens, int):
            h, w = self.grids[0]
            if h * w + self.protected != n_tokens:
                raise ValueError(f"input has {n_tokens} tokens but SegmentLayout.grids says {h}x{w} + {self.protected}")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a row.  Counts may be SymInts for a dynamic single-segment layout."""

    start: object  # first token (original position)
    length: object  # tokens in the segment (protected included)
    protected: int  # leading protected tokens
    keep: object  # prunable tokens kept  (K')
    remove: object  # tokens removed          (R = length - protected - K')
    keep_offset: object  # first row of this segment in the kept list (its protected rows come first)
    rem_offset: object  # first row of this segment in the removed list


@dataclass(frozen=True)
class SegmentPlan:
    segments: Tuple[SegmentSpec, ...]
    n_tokens: object
    n_keep: object  # rows in the kept list (protected included)
    n_remove: object

    @property
    def keeps_all(self) -> bool:
        """True when nothing is removed (statically known, also for a symbolic token count)."""
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return all(s.remove == 0 if isinstance(s.remove, int) else statically_known_true(s.remove == 0)
                   for s in self.segments)


def plan_segments(layout: SegmentLayout, n_tokens, retain: float, min_keep: int = 1, keep_counts=None) -> SegmentPlan:
    """``keep_counts``: explicit prunable tokens kept per segment (later stages of a multi-stage
    schedule, whose counts come from the original lengths), instead of ``num_keep(n, retain)``."""
    layout.check_tokens(n_tokens)
    lengths = (n_tokens,) if layout.lengths is None else layout.lengths
    P = layout.protected
    segs = []
    start = 0
    k_off = 0
    r_off = 0
    for i, n in enumerate(lengths):
        prunable = n - P
        kp = num_keep(prunable, retain, min_keep) if keep_counts is None else keep_counts[i]
        rem = prunable - kp
        segs.append(SegmentSpec(start, n, P, kp, rem, k_off, r_off))
        start = start + n
        k_off = k_off + P + kp
        r_off = r_off + rem
    return SegmentPlan(tuple(segs), n_tokens, k_off, r_off)


def segment_ids(layout: SegmentLayout, n_tokens, device=None) -> torch.Tensor:
    """``(N,)`` int64 segment index of every token (all zeros for the batched layout)."""
    if layout.lengths is None:
        return torch.zeros(n_tokens, dtype=torch.long, device=device)
    lengths = torch.tensor(layout.lengths, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(layout.lengths), device=device), lengths, output_size=sum(layout.lengths))


def segment_mask(seg_q: torch.Tensor, seg_kv: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, Lq, Lkv)`` (True = may attend) from segment ids ``(B, L)``."""
    return (seg_q.unsqueeze(-1) == seg_kv.unsqueeze(-2)).unsqueeze(1)
