"""The ``ipcv`` command line on tiny config-only towers: export -> reload -> run (pt2 and onnx),
inspect, clear errors with exit codes."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from ipcv_adapters.app.cli import main

pytest.importorskip("transformers")

HAS_TRT = importlib.util.find_spec("torch_tensorrt") is not None


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _tower(name, retain):
    import ipcv_compile
    from ipcv_adapters.testing import TINY_IPCV, tiny_tower

    return ipcv_compile.rewrite(tiny_tower(name), TINY_IPCV.replace(retain=retain))


def test_export_pt2_reload_runs_other_sizes(tmp_path, capsys):
    out = tmp_path / "dinov2.pt2"
    assert main(["export", "tiny:dinov2", "--retain", "0.5", "--format", "pt2", "--out", str(out), "--quiet"]) == 0
    side = json.loads((tmp_path / "dinov2.pt2.json").read_text())["ipcv_export"]
    assert side["adapter"] == "dinov2" and side["ipcv_config"]["retain"] == 0.5
    assert side["verify_max_rel_error"] <= 1e-4
    assert {int(d) for d in side["dynamic_dims"]["pixel_values"]} == {0, 2, 3}  # batch and image size
    from ipcv_adapters.testing import tower_inputs

    m = torch.export.load(str(out)).module()
    rt = _tower("dinov2", 0.5)
    for batch, size in [(3, 70), (1, 84)]:
        _, kw = tower_inputs("dinov2", batch=batch, seed=batch, size=size)
        with torch.no_grad():
            last, pooled = m(kw["pixel_values"])
            ref = rt(**kw)
        assert last.shape == ref.last_hidden_state.shape
        assert _rel(last, ref.last_hidden_state) <= 1e-4 and _rel(pooled, ref.pooler_output) <= 1e-4
    assert "wrote" in capsys.readouterr().out


def test_export_onnx_qwen2vl_reload_runs(tmp_path):
    import onnxruntime as ort

    from ipcv_adapters.testing import qwen2vl_inputs

    out = tmp_path / "qwen.onnx"
    rc = main(["export", "tiny:qwen2-vl", "--retain", "0.35", "--format", "onnx", "--out", str(out),
               "--grid", "1,4,6", "--grid", "1,4,4", "--quiet"])
    assert rc == 0
    side = json.loads((tmp_path / "qwen.onnx.json").read_text())["ipcv_export"]
    assert side["example_inputs"]["grid_thw (baked in)"] == [[1, 4, 6], [1, 4, 4]]
    assert side["dynamic_dims"] == {}  # one file per packed layout
    sess = ort.InferenceSession(str(out))
    pv, thw = qwen2vl_inputs([[1, 4, 6], [1, 4, 4]], seed=7)  # new pixels, same layout
    feeds = {sess.get_inputs()[0].name: pv.numpy(), "grid_thw": thw.numpy().astype("int64")}  # the file checks its layout
    last, pooled = sess.run(None, feeds)
    with torch.no_grad():
        ref = _tower("qwen2_vl", 0.35)(pv, grid_thw=thw)
    assert _rel(torch.from_numpy(last), ref.last_hidden_state) <= 1e-4
    assert _rel(torch.from_numpy(pooled), ref.pooler_output) <= 1e-4


def test_inspect_prints_the_rewrite_summary(capsys):
    assert main(["inspect", "tiny:internvl", "--retain", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "IPCV rewrite: retain=0.5" in out and "prune + AS" in out and "internvl_vision" in out


def test_unknown_format_exits_2_naming_allowed(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export", "tiny:dinov2", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "tflite" in err and "onnx" in err and "pt2" in err and "trt" in err


def test_unknown_model_exits_2_naming_allowed(capsys, tmp_path):
    assert main(["export", "tiny:llama", "--format", "onnx", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tiny:llama" in err and "tiny:qwen2-vl" in err and "tiny:internvl" in err and "tiny:dinov2" in err
    assert main(["inspect", str(tmp_path / "no-such-checkpoint")]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_bad_retain_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "tiny:dinov2", "--retain", "1.5"])
    assert e.value.code == 2 and "--retain" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TRT, reason="torch-tensorrt installed")
def test_trt_without_torch_tensorrt_checks_then_exits_3(capsys, tmp_path):
    rc = main(["export", "tiny:internvl", "--format", "trt", "--out", str(tmp_path / "t.ep"), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 3
    assert "TensorRT check: OK" in cap.out  # the graph-level check runs without a GPU
    assert "torch-tensorrt" in cap.err


def test_console_entry_point_and_demo_alias():
    r = subprocess.run([sys.executable, "-m", "ipcv_adapters.app.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "export" in r.stdout and "trt-check" in r.stdout
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
