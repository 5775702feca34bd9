"""Issue 22, items 1-2: the user paths of compiling and exporting a rewritten tower.

1. ``torch.compile`` of a rewritten tower (and of a VLM holding one) on layouts / sizes never run
   eagerly: no crash (the segfault: the rewrite pass's fake-tensor shape probe ran inside compiled
   frames, and torch called inductor kernels on fake tensors), outputs equal to the eager rewrite,
   one documented graph break for packed towers, none beyond vanilla's for batched ones.
2. Packed (Qwen-family) files take ``grid_thw`` as an input and check it inside the graph: a bare
   onnxruntime session / ``torch.export.load(...).module()`` fails on another layout of the same
   patch count instead of returning wrong numbers.
"""

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

import ipcv_compile
from ipcv_adapters.export import LAYOUT_CHECK_SCOPE, TowerForExport
from ipcv_adapters.testing import (PACKED, TINY_IPCV, patch_dim, qwen2vl_inputs, tiny_tower, tiny_vlm, tower_inputs,
                                   vlm_generate_inputs)
from ipcv_compile import lower
from ipcv_compile.backends.artifacts import load_artifact

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHED = ("dinov2", "siglip", "clip", "internvl")
TOL = 1e-4
# three layouts never run eagerly before the compiled call (tiny towers: spatial_merge_size 2)
NEW_LAYOUTS = ([[1, 4, 8]], [[1, 6, 4], [1, 4, 4]], [[2, 4, 4]])


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _tensors(o):
    """The tensors of a tower / VLM output, flattened (deepstack lists included)."""
    if isinstance(o, torch.Tensor):
        return [o]
    if hasattr(o, "to_tuple"):
        o = o.to_tuple()
    out = []
    for x in o:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _tensors(x)
    return out


def _close(got, want):
    g, w = _tensors(got), _tensors(want)
    assert len(g) == len(w) and g
    return max(_rel(a, b) for a, b in zip(g, w))


class Counting:
    """A torch.compile backend that counts the graphs it compiles (and runs them as traced)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 1. torch.compile
def test_compile_packed_tower_with_inductor_in_a_fresh_process():
    """The issue's reproduction: a fresh rewritten Qwen2.5-VL tower, ``torch.compile`` (inductor),
    three layouts never run eagerly.  Before: the process died (rc 139, SIGSEGV) on the first call.
    A child process, so a crash fails this test instead of killing the run."""
    script = textwrap.dedent(f"""
        import warnings, torch
        warnings.filterwarnings("ignore")
        import ipcv_compile
        from ipcv_adapters.testing import TINY_IPCV, patch_dim, qwen2vl_inputs, tiny_tower
        torch.set_num_threads(1)
        rt = ipcv_compile.rewrite(tiny_tower("qwen2_5_vl"), TINY_IPCV)
        c = torch.compile(rt)
        worst = 0.0
        for grids in {list(NEW_LAYOUTS)!r}:
            pv, thw = qwen2vl_inputs(grids, seed=len(grids), in_dim=patch_dim("qwen2_5_vl"))
            with torch.no_grad():
                got = c(pv, grid_thw=thw)
                want = rt(pv, grid_thw=thw)
            for a, b in ((got.last_hidden_state, want.last_hidden_state), (got.pooler_output, want.pooler_output)):
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        print("WORST", worst)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"rc {p.returncode}: {p.stderr[-3000:]}"
    worst = float(p.stdout.split("WORST")[-1])
    assert worst <= TOL


@pytest.mark.parametrize("name", PACKED)
def test_compile_packed_tower_new_layouts_one_graph_break(name):
    """Every packed family: compiled before any eager call, on three new layouts (and one repeated),
    equals the eager rewrite; the tower's frame has exactly one graph break (prepare + layout
    dispatch run eagerly); a layout seen before compiles nothing new."""
    rt = ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV)
    backend = Counting()
    c = torch.compile(rt, backend=backend)
    for i, grids in enumerate(NEW_LAYOUTS):
        pv, thw = qwen2vl_inputs(grids, seed=i, in_dim=patch_dim(name))
        with torch.no_grad():
            got = c(pv, grid_thw=thw)
            want = rt(pv, grid_thw=thw)
        assert _close(got, want) <= TOL, (name, grids)
    assert backend.graphs >= len(NEW_LAYOUTS)  # the per-layout block stacks were compiled, not run eagerly
    seen = backend.graphs
    pv, thw = qwen2vl_inputs(NEW_LAYOUTS[0], seed=9, in_dim=patch_dim(name))
    with torch.no_grad():
        assert _close(c(pv, grid_thw=thw), rt(pv, grid_thw=thw)) <= TOL
    assert backend.graphs == seen, "a layout seen before was compiled again"

    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(rt)(pv, grid_thw=thw)
    assert ex.graph_break_count == 1, [str(b.reason)[:200] for b in ex.break_reasons]


@pytest.mark.parametrize("name", BATCHED)
def test_compile_batched_tower_no_graph_breaks_beyond_vanilla(name):
    """Batched towers compile whole: as many graph breaks as the vanilla tower (before: +2 for the
    compile cache's lock), fullgraph=True works, and the compiled tower equals the eager rewrite on
    a new batch size (and, where the tower interpolates positions, a new image size)."""
    # graph-break counts in a fresh interpreter: dynamo's caches and recompile limits are per process,
    # and frames shared with earlier tests (the towers' layers, attention functions) would count there
    script = textwrap.dedent(f"""
        import warnings, torch
        warnings.filterwarnings("ignore")
        import ipcv_compile
        from ipcv_adapters.testing import TINY_IPCV, tiny_tower, tower_inputs
        t = tiny_tower({name!r})
        rt = ipcv_compile.rewrite(t, TINY_IPCV)
        _, kw = tower_inputs({name!r}, batch=2)
        with torch.no_grad():
            vanilla = torch._dynamo.explain(t)(**kw).graph_break_count
            torch._dynamo.reset()
            ours = torch._dynamo.explain(rt)(**kw).graph_break_count
        print("BREAKS", vanilla, ours)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    vanilla, ours = (int(v) for v in p.stdout.split("BREAKS")[-1].split())
    assert ours == vanilla == 0
    rt = ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV)
    torch._dynamo.reset()
    c = torch.compile(rt, backend="aot_eager", fullgraph=True)
    cases = [tower_inputs(name, batch=2, seed=1)[1], tower_inputs(name, batch=3, seed=2)[1]]
    if name in ("dinov2", "internvl"):  # position tables interpolated: any size
        cases.append(tower_inputs(name, batch=1, seed=3, size=70)[1])
    for kw in cases:
        with torch.no_grad():
            assert _close(c(**kw), rt(**kw)) <= TOL, (name, kw["pixel_values"].shape)


def test_compile_grid_aware_variant_on_a_batched_tower():
    """A grid-aware variant (stratified selection) on a batched tower has a graph per image size, so
    it takes the packed towers' path (one break, per-size graphs): right at two sizes."""
    rt = ipcv_compile.rewrite(tiny_tower("dinov2"), TINY_IPCV.replace(selection="stratified"))
    c = torch.compile(rt, backend="aot_eager")
    for size in (56, 70):
        _, kw = tower_inputs("dinov2", batch=2, seed=size, size=size)
        with torch.no_grad():
            assert _close(c(**kw), rt(**kw)) <= TOL, size


def test_compiled_batched_tower_is_thread_safe():
    """The compiled path reads the compile cache without the lock (a dict read); several threads
    calling the compiled tower get each their own correct result."""
    rt = ipcv_compile.rewrite(tiny_tower("dinov2"), TINY_IPCV)
    c = torch.compile(rt, backend="aot_eager")
    inputs = [tower_inputs("dinov2", batch=2, seed=s)[1] for s in range(4)]
    with torch.no_grad():
        want = [rt(**kw).last_hidden_state for kw in inputs]
        c(**inputs[0])  # compile once
    got, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                got[i] = c(**inputs[i]).last_hidden_state
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert all(_rel(got[i], want[i]) <= TOL for i in range(len(inputs)))


def test_compiled_tower_follows_a_replaced_submodule():
    """A block submodule replaced after compiling: the compiled tower notices it (the binding is
    traced, so its guards fail), captures again eagerly with the usual warning, and is right."""
    rt = ipcv_compile.rewrite(tiny_tower("dinov2"), TINY_IPCV)
    c = torch.compile(rt, backend="aot_eager")
    _, kw = tower_inputs("dinov2", batch=2)
    with torch.no_grad():
        c(**kw)
    old = rt.tower.encoder.layer[1].mlp.fc1
    new = torch.nn.Linear(old.in_features, old.out_features)
    rt.tower.encoder.layer[1].mlp.fc1 = new
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        got = c(**kw)
    assert any("was replaced" in str(x.message) for x in w)
    with torch.no_grad():
        assert _close(got, rt(**kw)) <= TOL


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_compile_whole_vlm_on_new_image_sizes(family):
    """``torch.compile`` of a whole VLM holding a rewritten tower: two image layouts never run
    eagerly; the logits equal those of the eager VLM with the same rewritten tower."""
    m = tiny_vlm(family)
    attr = "visual" if family in PACKED else "vision_tower"
    setattr(m.model, attr, ipcv_compile.rewrite(getattr(m.model, attr), TINY_IPCV))
    c = torch.compile(m, backend="aot_eager")
    layouts = ([[[1, 4, 8]], [[1, 6, 4], [1, 4, 4]]] if family in PACKED else [[1], [2]])
    for i, images in enumerate(layouts):
        kw = vlm_generate_inputs(m, family, images, seed=i)
        kw = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
        with torch.no_grad():
            got = c(**kw).logits
            want = m(**kw).logits
        assert _rel(got, want) <= TOL, (family, images)


# ----------------------------------------------------------------------------- 2. packed files check their layout
@pytest.fixture(scope="module")
def packed_files(tmp_path_factory):
    """Files of one layout per packed family: ONNX for three, pt2 for Qwen2.5-VL."""
    d = tmp_path_factory.mktemp("packed")
    out = {}
    grids = [[1, 4, 8], [1, 8, 4]]  # same patch count in the other order: a layout of the same size
    for name, fmts in (("qwen2_vl", ("onnx",)), ("qwen2_5_vl", ("onnx", "pt2")), ("qwen3_vl", ("onnx",))):
        rt = ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV)
        pv, thw = qwen2vl_inputs(grids, seed=0, in_dim=patch_dim(name))
        mod = TowerForExport(rt, (pv,), {"grid_thw": thw})
        for fmt in fmts:
            path = str(d / f"{name}.{fmt}")
            lower(mod, fmt, (pv,), path=path, dynamic=False)
            out[name, fmt] = (rt, path)
    return out


SAME_PATCH_COUNT = ([[1, 8, 4], [1, 4, 8]], [[1, 4, 4], [1, 8, 6]], [[2, 4, 4], [1, 8, 4]])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_bare_onnxruntime_session_checks_the_layout(packed_files, name):
    """A bare onnxruntime session (no ipcv loader): the file takes ``(pixel_values, grid_thw)``; the
    right layout equals the eager rewrite, another layout of the same patch count raises (the
    failing node names the file's layout), another number of images is refused by the input shape."""
    import onnxruntime as ort

    rt, path = packed_files[name, "onnx"]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in s.get_inputs()] == [("pixel_values", "tensor(float)"),
                                                          ("grid_thw", "tensor(int64)")]
    pv, thw = qwen2vl_inputs([[1, 4, 8], [1, 8, 4]], seed=5, in_dim=patch_dim(name))
    got = s.run(None, {"pixel_values": pv.numpy(), "grid_thw": thw.numpy()})
    with torch.no_grad():
        want = rt(pv, grid_thw=thw)
    assert _close([torch.from_numpy(g) for g in got], want) <= TOL
    for other in SAME_PATCH_COUNT:
        assert sum(t * h * w for t, h, w in other) == pv.shape[0]
        with pytest.raises(Exception, match=LAYOUT_CHECK_SCOPE + r".*\[\[1, 4, 8\], \[1, 8, 4\]\]"):
            s.run(None, {"pixel_values": pv.numpy(), "grid_thw": np.array(other, dtype=np.int64)})
    with pytest.raises(Exception, match="grid_thw"):
        s.run(None, {"pixel_values": pv.numpy(), "grid_thw": np.array([[1, 4, 8], [1, 4, 4], [1, 4, 4]])})


def test_onnx_layout_check_falls_back_to_nan(packed_files, tmp_path):
    """The documented fallback: a runtime that does not bounds-check the failing index (simulated
    by clamping it into range in the file) returns NaN outputs for another layout, never numbers."""
    import onnx
    import onnxruntime as ort

    rt, path = packed_files["qwen2_vl", "onnx"]
    model = onnx.load(path)
    nodes = [n for n in model.graph.node if n.name.startswith(LAYOUT_CHECK_SCOPE)]
    assert len(nodes) == 1
    node = nodes[0]
    zero = onnx.helper.make_tensor("ipcv_test_zero", onnx.TensorProto.INT64, [], [0])
    model.graph.initializer.append(zero)
    clamp = onnx.helper.make_node("Min", [node.input[1], "ipcv_test_zero"], ["ipcv_test_clamped"])
    node.input[1] = "ipcv_test_clamped"
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx, clamp)
    p2 = str(tmp_path / "clamped.onnx")
    onnx.save(model, p2)
    s = ort.InferenceSession(p2, providers=["CPUExecutionProvider"])
    pv, thw = qwen2vl_inputs([[1, 4, 8], [1, 8, 4]], seed=5)
    ok = s.run(None, {"pixel_values": pv.numpy(), "grid_thw": thw.numpy()})
    with torch.no_grad():
        assert _close([torch.from_numpy(g) for g in ok], rt(pv, grid_thw=thw)) <= TOL
    bad = s.run(None, {"pixel_values": pv.numpy(), "grid_thw": np.array([[1, 8, 4], [1, 4, 8]])})
    assert all(np.isnan(b).all() for b in bad)


def test_bare_pt2_program_checks_the_layout(packed_files):
    """``torch.export.load(path).module()`` (no ipcv loader) takes ``grid_thw`` as the transformers
    tower does: right layout -> the eager rewrite; another of the same patch count -> RuntimeError
    naming the file's layout."""
    rt, path = packed_files["qwen2_5_vl", "pt2"]
    m = torch.export.load(path).module()
    pv, thw = qwen2vl_inputs([[1, 4, 8], [1, 8, 4]], seed=5, in_dim=patch_dim("qwen2_5_vl"))
    with torch.no_grad():
        assert _close(m(pv, grid_thw=thw), rt(pv, grid_thw=thw)) <= TOL
        for other in SAME_PATCH_COUNT:
            with pytest.raises(RuntimeError, match=r"grid_thw is not \[\[1, 4, 8\], \[1, 8, 4\]\]"):
                m(pv, grid_thw=torch.tensor(other))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_load_artifact_passes_grid_thw_to_the_file(packed_files, fmt):
    """The project's loader still refuses another layout itself (naming both), and feeds grid_thw to
    the file's own check on the right one."""
    rt, path = packed_files["qwen2_5_vl", fmt]
    m = load_artifact(path)
    pv, thw = qwen2vl_inputs([[1, 4, 8], [1, 8, 4]], seed=6, in_dim=patch_dim("qwen2_5_vl"))
    with torch.no_grad():
        assert _close(m(pv, grid_thw=thw), rt(pv, grid_thw=thw)) <= TOL
    with pytest.raises(ValueError, match="exported for grid_thw"):
        m(pv, grid_thw=torch.tensor([[1, 8, 4], [1, 4, 8]]))
    assert m.metadata["layout_input"] == "grid_thw"
    if fmt == "onnx":
        assert m.input_names == ["pixel_values", "grid_thw"]
    else:
        assert m.keyword_inputs == ("grid_thw",)


def test_tower_for_export_checks_grid_thw_eagerly():
    """The module itself (eager, before any export) runs the same check."""
    rt = ipcv_compile.rewrite(tiny_tower("qwen2_vl"), TINY_IPCV)
    pv, thw = qwen2vl_inputs([[1, 4, 8], [1, 8, 4]], seed=0)
    mod = TowerForExport(rt, (pv,), {"grid_thw": thw})
    with torch.no_grad():
        a, b = mod(pv), mod(pv, grid_thw=thw)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        with pytest.raises(RuntimeError, match="layout this file was exported for"):
            mod(pv, grid_thw=torch.tensor([[1, 8, 4], [1, 4, 8]]))
        with pytest.raises(ValueError, match=r"grid_thw of shape \[1, 3\]"):
            mod(pv, grid_thw=torch.tensor([[1, 8, 8]]))
