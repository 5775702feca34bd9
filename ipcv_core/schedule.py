"""The block schedule: what IPCV does in each block of a tower, decided once.

:meth:`Schedule.build` resolves a config against a tower (its depth and default ``l_p`` / ``Δ``; fields
left ``None`` take them, see :meth:`IPCVConfig.resolve`) — the one place a config is resolved — and
lays the stack out as one :class:`BlockPlan` per block:

=================  ==============================================================================
``kind``           what the block does
=================  ==============================================================================
``vanilla``        before the first prune stage: every row, attention within each segment
``prune + AS``     a stage at the block input, then attention stabilisation (the final stage, l_p)
``AS``             attention stabilisation: queries and FFN on the kept rows, keys / values on all
                   rows (the removed ones NGR-reconstructed), blocks ``[l_p, l_p + Δ)``
``prune``          a stage (at the block input, or between attention and FFN with
                   ``placement="post_attention"``), then the kept rows only
``kept``           the kept rows only
=================  ==============================================================================

The eager driver, the graph rewrite (its passes and ``expected_rows``), the cost model and the
summaries read these plans; none re-derives them.  Row counts are functions of the layout
(:meth:`Schedule.rows`) or of one segment's size (:meth:`Schedule.segment_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .config import IPCVConfig
from .counts import num_keep

__all__ = ["BlockPlan", "Schedule", "BLOCK_KINDS"]

BLOCK_KINDS = ("vanilla", "prune + AS", "AS", "prune", "kept")


@dataclass(frozen=True)
class BlockPlan:
    """One block of a :class:`Schedule`.

    ``stage``: index into ``Schedule.stages`` of the prune stage this block holds (None: none);
    ``stage_after_attention``: that stage sits between the attention's residual add and the FFN
    (``placement="post_attention"``), else at the block input; ``as_block``: attention stabilisation
    (queries on the kept rows, keys / values on all rows); ``pruned``: the block runs on kept rows
    (at or after the first stage); ``tap``: the block's output is returned too (restored to full
    length)."""

    index: int
    kind: str
    stage: Optional[int] = None
    stage_after_attention: bool = False
    as_block: bool = False
    pruned: bool = False
    tap: bool = False

    @property
    def stage_at_input(self) -> bool:
        return self.stage is not None and not self.stage_after_attention

    @property
    def mode(self) -> str:
        """The summaries' ``mode`` column."""
        return {"vanilla": "vanilla", "prune + AS": "prune + AS", "AS": "AS (kv: all rows)",
                "prune": "prune, kept only", "kept": "kept rows only"}[self.kind]


@dataclass(frozen=True)
class Schedule:
    """A resolved config laid out over ``depth`` blocks (build with :meth:`build`)."""

    config: IPCVConfig
    depth: int
    blocks: Tuple[BlockPlan, ...]

    @classmethod
    def build(cls, config: Union[IPCVConfig, "Schedule"], depth: int,
              defaults: Optional[Mapping[str, int]] = None, taps: Sequence[int] = ()) -> "Schedule":
        """The schedule of ``config`` on a tower of ``depth`` blocks whose defaults are ``defaults``
        (``prune_layer`` / ``as_depth``; None: the paper's).  A Schedule given as ``config`` is
        returned as it is when its depth matches (and re-tapped when ``taps`` differ)."""
        if isinstance(config, Schedule):
            if config.depth != depth:
                raise ValueError(f"this Schedule was built for depth {config.depth}, the model has depth {depth}")
            return config if tuple(sorted(set(taps))) == config.taps or not taps else config.with_taps(taps)
        cfg = config.resolve(depth, defaults)
        stage_of = {layer: i for i, (layer, _) in enumerate(cfg.schedule)}
        first = cfg.schedule[0][0]
        post = cfg.post_attention
        as_range = range(cfg.prune_layer, cfg.prune_layer + cfg.as_depth)  # the one AS-range test
        tapped = set(taps)
        for t in tapped:
            if not (isinstance(t, int) and 0 <= t < depth):
                raise ValueError(f"taps must be block indices in [0, {depth - 1}], got {sorted(tapped)}")
        plans = []
        for b in range(depth):
            stage = stage_of.get(b)
            as_block = b in as_range
            if b < first:
                kind = "vanilla"
            elif as_block:
                kind = "prune + AS" if stage is not None else "AS"
            else:
                kind = "prune" if stage is not None else "kept"
            plans.append(BlockPlan(b, kind, stage, stage is not None and post, as_block, b >= first, b in tapped))
        return cls(cfg, depth, tuple(plans))

    def with_taps(self, taps: Sequence[int]) -> "Schedule":
        return Schedule.build(self.config, self.depth, taps=taps)

    # ------------------------------------------------------------------ reading it
    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, b: int) -> BlockPlan:
        return self.blocks[b]

    def __len__(self) -> int:
        return self.depth

    @property
    def stages(self) -> Tuple[Tuple[int, float], ...]:
        """Every prune stage ``(layer, retain)``, the final one (``prune_layer``) last."""
        return self.config.schedule

    @property
    def first_stage(self) -> int:
        """The block holding the first prune stage."""
        return self.stages[0][0]

    @property
    def taps(self) -> Tuple[int, ...]:
        return tuple(p.index for p in self.blocks if p.tap)

    @property
    def as_blocks(self) -> Tuple[int, ...]:
        return tuple(p.index for p in self.blocks if p.as_block)

    def stage_of(self, b: int) -> Optional[int]:
        return self.blocks[b].stage

    # ------------------------------------------------------------------ row counts
    def rows(self, layout, n_tokens: int, keeps_all: bool = False) -> List[Dict[str, int]]:
        """Per block, the rows its attention queries / keys and its FFN see for a batch row of
        ``n_tokens`` tokens laid out as ``layout`` (a :class:`~ipcv_core.segments.SegmentLayout`).
        ``keeps_all``: no stage removes anything (every block sees every row)."""
        from .prune import stage_plan

        kept = [stage_plan(layout, self.config, i, n_tokens).n_keep for i in range(len(self.stages))]
        return self._rows(n_tokens, kept, keeps_all)

    def keeps_all(self, layout, n_tokens) -> bool:
        """True when no stage removes anything from ``n_tokens`` rows laid out as ``layout`` (retain
        1.0, or segments too small to lose a row): the rewrite is then per-segment attention only."""
        from .prune import stage_plan

        return all(stage_plan(layout, self.config, i, n_tokens).keeps_all for i in range(len(self.stages)))

    def segment_rows(self, n_tokens: int, protected: int = 0) -> List[Dict[str, int]]:
        """:meth:`rows` of one segment of ``n_tokens`` rows, ``protected`` of them never removed."""
        cfg = self.config
        kept = [protected + num_keep(n_tokens - protected, r, cfg.min_keep) for _, r in self.stages]
        return self._rows(n_tokens, kept, False)

    def _rows(self, n_tokens: int, kept: Sequence[int], keeps_all: bool) -> List[Dict[str, int]]:
        rows, out = n_tokens, []
        for p in self.blocks:
            before = rows
            if p.stage is not None and not keeps_all:
                rows = kept[p.stage]
            if p.stage_after_attention:
                out.append({"queries": before, "keys": before, "ffn": rows})
            else:
                kv = n_tokens if (p.as_block and not keeps_all) else rows
                out.append({"queries": rows, "keys": kv, "ffn": rows})
        return out

    def table(self, rows: Sequence[Mapping[str, object]]) -> List[str]:
        """The summaries' per-block table: header, then one line per block with its mode and the
        rows (``rows[b]``: ``queries`` / ``keys`` / ``ffn``, "?" where missing) it sees."""
        lines = ["block | mode              | queries | keys/values | FFN rows"]
        for p in self.blocks:
            r = rows[p.index] if p.index < len(rows) else {}
            lines.append(f"{p.index:>5} | {p.mode:<17} | {r.get('queries', '?'):>7} | {r.get('keys', '?'):>11} | "
                         f"{r.get('ffn', '?')}")
        return lines
