"""End to end: tiny Qwen2-VL / InternVL VLMs (random weights, from configs) with the vision tower
replaced by its IPCV rewrite — one line — and ``generate()`` unchanged.  At r = 1.0 the generated
token ids equal the original model's; at r < 1 generation runs and the image features change."""

import pytest
import torch

import ipcv_compile
from ipcv_adapters.testing import (
    TINY_IPCV,
    internvl_generate_inputs,
    qwen2vl_generate_inputs,
    tiny_internvl_vlm,
    tiny_qwen2vl_vlm,
)

QWEN_CASES = {
    "one image": [("image", (1, 8, 6))],
    "two images": [("image", (1, 8, 6)), ("image", (1, 4, 4))],
    "video": [("video", (2, 4, 6))],  # 4 frames -> t = 2 temporal patches, 2 segments
}


def _prefill_logits(model, kw):
    fwd = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    return model(**fwd).logits


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen2vl_vlm()
    original = model.model.visual
    with torch.no_grad():
        refs = {name: (model.generate(**qwen2vl_generate_inputs(e)),
                       _prefill_logits(model, qwen2vl_generate_inputs(e))) for name, e in QWEN_CASES.items()}
    exact = ipcv_compile.rewrite(original, TINY_IPCV.replace(retain=1.0))
    pruned = exact.with_config(retain=0.35)
    return model, original, exact, pruned, refs


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen2vl_generate_unchanged_at_retain_one(qwen, case):
    model, original, exact, pruned, refs = qwen
    kw = qwen2vl_generate_inputs(QWEN_CASES[case])
    model.model.visual = exact  # the one-line integration
    try:
        with torch.no_grad():
            out = model.generate(**kw)
            logits = _prefill_logits(model, kw)
    finally:
        model.model.visual = original
    assert torch.equal(out, refs[case][0])
    assert (logits - refs[case][1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen2vl_generate_runs_pruned(qwen, case):
    model, original, exact, pruned, refs = qwen
    kw = qwen2vl_generate_inputs(QWEN_CASES[case])
    model.model.visual = pruned
    try:
        with torch.no_grad():
            out = model.generate(**kw)
            logits = _prefill_logits(model, kw)
    finally:
        model.model.visual = original
    assert out.shape == refs[case][0].shape
    assert (logits - refs[case][1]).abs().max().item() > 1e-6  # the pruned features reached the LM


@pytest.fixture(scope="module")
def internvl():
    model = tiny_internvl_vlm()
    original = model.model.vision_tower
    with torch.no_grad():
        refs = {n: (model.generate(**internvl_generate_inputs(n)), _prefill_logits(model, internvl_generate_inputs(n)))
                for n in (1, 2)}
    exact = ipcv_compile.rewrite(original, TINY_IPCV.replace(retain=1.0))
    pruned = exact.with_config(retain=0.35)
    return model, original, exact, pruned, refs


@pytest.mark.parametrize("tiles", [1, 2])
def test_internvl_generate(internvl, tiles):
    model, original, exact, pruned, refs = internvl
    kw = internvl_generate_inputs(tiles)
    try:
        model.model.vision_tower = exact  # the one-line integration
        with torch.no_grad():
            out = model.generate(**kw)
            logits = _prefill_logits(model, kw)
        assert torch.equal(out, refs[tiles][0])
        assert (logits - refs[tiles][1]).abs().max().item() <= 1e-5
        model.model.vision_tower = pruned
        with torch.no_grad():
            out_p = model.generate(**kw)
            logits_p = _prefill_logits(model, kw)
        assert out_p.shape == out.shape
        assert (logits_p - refs[tiles][1]).abs().max().item() > 1e-6
    finally:
        model.model.vision_tower = original
