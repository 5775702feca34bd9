"""DINOv2 through the eager driver: real weights from ../shared/weights (skipped with a reason if absent)."""

import os

import pytest
import torch

from ipcv_core import IPCVConfig

WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights", "dinov2-small")
IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-samples")
pytestmark = pytest.mark.skipif(not os.path.isdir(WEIGHTS), reason="real DINOv2-S weights not found at ../shared/weights")


@pytest.fixture(scope="module")
def model_and_images():
    from ipcv_adapters.dinov2 import load_dinov2
    from ipcv_adapters.app.images import list_images, load_images

    return load_dinov2(WEIGHTS), load_images(list_images(IMAGES, 2), 224)


def test_retain_one_equals_hf_forward(model_and_images):
    from ipcv_adapters.dinov2 import dinov2_forward

    m, x = model_and_images
    with torch.no_grad():
        ref = m(pixel_values=x).last_hidden_state
    out, res = dinov2_forward(m, x, IPCVConfig(retain=1.0))
    assert torch.equal(out, ref)
    assert res.rem_idx.shape[1] == 0


def test_pruned_output_keeps_length_and_cls(model_and_images):
    from ipcv_adapters.dinov2 import dinov2_forward

    m, x = model_and_images
    with torch.no_grad():
        ref = m(pixel_values=x).last_hidden_state
    out, res = dinov2_forward(m, x, IPCVConfig(retain=0.35))
    assert out.shape == ref.shape
    assert (res.keep_idx[:, 0] == 0).all()  # CLS protected
    assert res.keep_idx.shape[1] == 1 + 90  # ceil(0.35 * 256)
    cos = torch.nn.functional.cosine_similarity(out[:, 1:], ref[:, 1:], dim=-1).mean()
    assert 0.3 < cos < 0.999  # pruned, yet still far from random features
