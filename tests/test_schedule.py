"""The block schedule (ipcv_core.schedule): one place decides what every block does; the driver, the
rewrite, the cost model and the summaries read it."""

import pathlib
import re

import pytest

from ipcv_core import IPCVConfig, SegmentLayout
from ipcv_core.config import num_keep
from ipcv_core.schedule import BLOCK_KINDS, Schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_paper_schedule_on_qwen2_vl_depth():
    s = Schedule.build(IPCVConfig(retain=0.35), 32, taps=(31,))
    assert s.config.prune_layer == 3 and s.config.as_depth == 7  # the tower default (paper) filled in
    kinds = [p.kind for p in s]
    assert kinds[:3] == ["vanilla"] * 3 and kinds[3] == "prune + AS"
    assert kinds[4:10] == ["AS"] * 6 and kinds[10:] == ["kept"] * 22
    assert s.as_blocks == tuple(range(3, 10)) and s.first_stage == 3 and s.taps == (31,)
    assert [p.stage for p in s if p.stage is not None] == [0]
    assert all(k in BLOCK_KINDS for k in kinds)


def test_defaults_are_clipped_and_explicit_fields_are_not():
    s = Schedule.build(IPCVConfig(retain=0.5), 6, defaults={"prune_layer": 7, "as_depth": 3})
    assert (s.config.prune_layer, s.config.as_depth) == (5, 1)  # InternVL's 7 / 3 on a 6-block tower
    with pytest.raises(ValueError, match="prune_layer"):
        Schedule.build(IPCVConfig(retain=0.5, prune_layer=6, as_depth=0), 6)
    with pytest.raises(ValueError, match="taps"):
        Schedule.build(IPCVConfig(retain=0.5), 12, taps=(12,))
    built = Schedule.build(IPCVConfig(retain=0.5), 12)
    assert Schedule.build(built, 12) is built
    with pytest.raises(ValueError, match="depth 12"):
        Schedule.build(built, 8)


def _reference_rows(stage_retains, layer_of, as_blocks, post, depth, n, protected, min_keep=1):
    """Rows per block written out directly from the method's description."""
    rows, out = n, []
    for b in range(depth):
        before = rows
        if b in layer_of:
            rows = protected + num_keep(n - protected, stage_retains[layer_of[b]], min_keep)
        if post:
            out.append({"queries": before, "keys": before, "ffn": rows})
        else:
            out.append({"queries": rows, "keys": n if b in as_blocks else rows, "ffn": rows})
    return out


@pytest.mark.parametrize("fields,depth", [
    (dict(retain=0.35), 12),
    (dict(retain=0.2, prune_layer=4, as_depth=2, stages=((1, 0.8), (2, 0.5))), 8),
    (dict(retain=0.5, prune_layer=2, as_depth=0), 5),
    (dict(retain=0.3, prune_layer=2, stages=((0, 0.9), (1, 0.6)), placement="post_attention"), 6),
])
def test_rows_follow_the_method(fields, depth):
    s = Schedule.build(IPCVConfig(**fields), depth)
    cfg = s.config
    layer_of = {layer: i for i, (layer, _) in enumerate(cfg.schedule)}
    retains = [r for _, r in cfg.schedule]
    as_blocks = set(range(cfg.prune_layer, cfg.prune_layer + cfg.as_depth))
    for n, protected in ((50, 1), (37, 0)):
        want = _reference_rows(retains, layer_of, as_blocks, cfg.post_attention, depth, n, protected)
        assert s.segment_rows(n, protected) == want
        assert s.rows(SegmentLayout.batched(protected), n) == want
    packed = SegmentLayout(lengths=(30, 20))
    per = [_reference_rows(retains, layer_of, as_blocks, cfg.post_attention, depth, m, 0) for m in (30, 20)]
    assert s.rows(packed, 50) == [{k: a[k] + b[k] for k in a} for a, b in zip(*per)]
    assert not s.keeps_all(packed, 50)
    assert all(r == {"queries": 50, "keys": 50, "ffn": 50} for r in s.rows(packed, 50, keeps_all=True))


def test_keeps_all_at_retain_one_and_the_table():
    s = Schedule.build(IPCVConfig(retain=1.0), 12)
    assert s.keeps_all(SegmentLayout(lengths=(16, 9)), 25)
    lines = s.table(s.segment_rows(16))
    assert lines[0].startswith("block | mode") and len(lines) == 13
    assert "prune + AS" in lines[4] and "AS (kv: all rows)" in lines[5] and "kept rows only" in lines[-1]


def test_the_block_decision_lives_in_the_schedule_only():
    """The AS-range test and the stage / AS / plain decision are spelled out in ipcv_core/schedule.py
    only: the driver, the rewrite, the cost model, the summaries and the serving integrations read it."""
    pattern = re.compile(r"\bas_end\b|prune_layer\s*<=|prune_layer\s*\+\s*\w*as_depth")
    offenders = []
    for pkg in ("ipcv_core", "ipcv_compile", "ipcv_adapters"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ("ipcv_core/schedule.py", "ipcv_core/config.py"):  # the decision; the field's definition
                continue
            offenders += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert not offenders, offenders
    for rel in ("ipcv_core/driver.py", "ipcv_core/cost.py", "ipcv_compile/api.py"):
        assert "Schedule" in (ROOT / rel).read_text(), rel
