"""IPCVTower is an ordinary nn.Module (issue 23, item 3): the original tower is its registered child
(no aliasing of the original's registries through ``__dict__``), yet every name it reports is the
original's; ``.train()`` / ``.to()`` / deepcopy reach the original through nn.Module's own
recursion; the capture cache is typed (nothing stashed in other objects' ``__dict__``); an export
never patches torch."""

import copy

import pytest
import torch
from torch import nn

import ipcv_compile
from ipcv_adapters.export import TowerForExport
from ipcv_adapters.testing import TINY_IPCV, tiny_tower, tower_inputs
from ipcv_adapters.tower import CaptureCache, CaptureEntry, GraphCache, GraphEntry, IPCVTower
from ipcv_compile import lower

pytest.importorskip("transformers")

CFG = TINY_IPCV


@pytest.fixture(scope="module")
def dinov2():
    t = tiny_tower("dinov2")
    return t, ipcv_compile.rewrite(t, CFG)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_the_original_is_a_registered_child_not_aliased(dinov2):
    t, rt = dinov2
    assert dict(rt.named_children()) == {"tower": t} and rt.tower is t
    for reg in ("_parameters", "_buffers", "_modules"):
        assert getattr(rt, reg) is not getattr(t, reg)
    # nn.Module's own machinery: none of the old overrides is left
    for name in ("_apply", "train", "__deepcopy__", "__getstate__", "__setstate__"):
        assert name not in vars(IPCVTower), name


def test_names_are_the_originals_also_inside_a_parent(dinov2):
    t, rt = dinov2
    assert [n for n, _ in rt.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in rt.named_buffers()] == [n for n, _ in t.named_buffers()]
    sd, want = rt.state_dict(), t.state_dict()
    assert list(sd) == list(want) and all(sd[k] is want[k] or torch.equal(sd[k], want[k]) for k in want)
    assert sorted(sd._metadata) == sorted(want._metadata)
    parent = nn.Module()
    parent.pre = nn.Linear(2, 2)
    parent.visual = rt
    parent.post = nn.Linear(2, 2)
    keys = list(parent.state_dict())
    assert keys == ["pre.weight", "pre.bias", *(f"visual.{k}" for k in want), "post.weight", "post.bias"]
    assert [n for n, _ in parent.named_parameters()] == keys[:2] + [f"visual.{n}" for n, _ in t.named_parameters()] \
        + keys[-2:]
    name = next(iter(want))
    assert parent.get_parameter(f"visual.{name}") is t.get_parameter(name)


def test_load_state_dict_by_the_original_keys_into_the_same_tensors():
    t = tiny_tower("dinov2")
    rt = ipcv_compile.rewrite(t, CFG)
    parent = nn.Module()
    parent.visual = rt
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    name = next(k for k in sd if k.endswith("weight"))
    sd[name] += 1.0
    before = t.get_parameter(name)
    parent.load_state_dict({f"visual.{k}": v for k, v in sd.items()})
    assert t.get_parameter(name) is before and torch.equal(before, sd[name])
    rt.load_state_dict(t.state_dict())  # as a root module too
    with pytest.raises(RuntimeError, match="Missing key"):
        rt.load_state_dict({k: v for k, v in sd.items() if k != name})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        rt.load_state_dict({**sd, "nonexistent.weight": torch.zeros(1)})


def test_train_and_eval_reach_the_original():
    t = tiny_tower("clip")
    rt = ipcv_compile.rewrite(t, CFG)
    rt.train()
    assert rt.training and all(m.training for m in t.modules())
    rt.eval()
    assert not rt.training and not any(m.training for m in t.modules())


def test_capture_cache_is_typed_and_nothing_is_stashed_on_other_objects(dinov2):
    t, rt = dinov2
    assert isinstance(rt._captured, CaptureCache) and isinstance(rt._cache, GraphCache)
    capture = rt._captured.entries[tuple(rt.adapter.default_taps)]
    assert isinstance(capture, CaptureEntry) and capture.binding.blocks is rt.adapter.blocks
    entry = rt.graph_entry(rt._batched_layout)
    assert isinstance(entry, GraphEntry) and entry.capture is capture and rt.graph_for(rt._batched_layout) is entry.graph
    for obj in (capture.module, entry.graph, rt):
        assert not [k for k in vars(obj) if k.startswith("_ipcv") or k == "_rows_checked"], type(obj)
    # with_config shares the captures, not the compile cache
    other = rt.with_config(retain=0.5)
    assert other._captured is rt._captured and other._cache is not rt._cache
    with pytest.raises(TypeError, match="captured"):
        IPCVTower(t, rt.adapter, CFG, captured={})


def test_deepcopy_is_bound_to_the_copy(dinov2):
    t, rt = dinov2
    cp = copy.deepcopy(rt)
    assert cp.tower is not t and cp.adapter.tower is cp.tower
    taps = tuple(rt.adapter.default_taps)
    assert cp._captured.entries[taps].binding.blocks is cp.adapter.blocks
    assert cp._cache.lock is not rt._cache.lock
    _, kw = tower_inputs("dinov2", batch=2, seed=1)
    with torch.no_grad():
        ref = rt(**kw).last_hidden_state
        assert torch.equal(cp(**kw).last_hidden_state, ref)
        next(cp.tower.encoder.layer[2].mlp.parameters()).mul_(2.0)  # the copy's own tensors
        assert torch.equal(rt(**kw).last_hidden_state, ref)
        assert not torch.equal(cp(**kw).last_hidden_state, ref)


def test_export_never_patches_torch(dinov2, tmp_path):
    """The native-size export takes HF's interpolation path (the file serves another size) while
    ``torch.jit.is_tracing`` stays torch's own and the user's embedding module is not modified."""
    t, rt = dinov2
    orig = torch.jit.is_tracing
    seen = []

    def hook(module, args):
        if torch.compiler.is_exporting():
            seen.append((torch.jit.is_tracing is orig, torch.jit.is_tracing(),
                         "interpolate_pos_encoding" in vars(t.embeddings)))

    h = t.embeddings.patch_embeddings.register_forward_pre_hook(hook)
    try:
        x = torch.randn(2, 3, 56, 56)  # the native size
        lw = lower(TowerForExport(rt, (x,)), "pt2", (x,), path=str(tmp_path / "d.pt2"))
    finally:
        h.remove()
    assert seen and all(s == (True, False, False) for s in seen), seen
    assert torch.jit.is_tracing is orig and "interpolate_pos_encoding" not in vars(t.embeddings)
    y = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        want, got = rt(pixel_values=y).last_hidden_state, lw(y)[0]
    assert _rel(got, want) <= 1e-4


def test_the_config_is_resolved_once_into_the_towers_schedule(dinov2, monkeypatch):
    """The rewrite resolves the config (``None`` = the tower's default ``l_p`` / ``Δ``) once, into the
    IPCVTower's Schedule; a new layout's rewrite and the rows / summaries read that Schedule."""
    from ipcv_core import schedule as schedule_mod

    t, _ = dinov2
    calls = []
    build = schedule_mod.Schedule.build.__func__

    def counting(cls, config, *a, **kw):
        calls.append(type(config).__name__)
        return build(cls, config, *a, **kw)

    monkeypatch.setattr(schedule_mod.Schedule, "build", classmethod(counting))
    rt = ipcv_compile.rewrite(t, retain=0.5, prune_layer=1)  # as_depth: the tower's default, clipped
    assert calls.count("IPCVConfig") == 1, calls  # later builds only re-lay a Schedule (taps)
    assert rt.ipcv_schedule.config is rt.ipcv_config and rt.ipcv_config.as_depth == 3
    with pytest.raises(AttributeError):  # derived from the schedule: another config is another tower
        rt.ipcv_config = rt.ipcv_config.replace(retain=0.2)
    args, kwargs = tower_inputs("dinov2", batch=1)
    rt(*args, **kwargs)
    assert calls.count("IPCVConfig") == 1, calls
    prep = rt.adapter.prepare(*args, **kwargs)
    assert rt.rows(*args, **kwargs) == rt.ipcv_schedule.rows(prep.layout, int(prep.hidden.shape[1]))
