"""DINOv2-S with real weights at 448 px through the rewritten graph (skipped if ../shared is absent).

Prints the mean cosine of the final patch tokens to the unpruned model at r = 0.5 / 0.35 / 0.2
(run with ``-s`` to see them) and asserts sane floors, not exact numbers."""

import os

import pytest
import torch

from ipcv_core import IPCVConfig

HERE = os.path.dirname(__file__)
WEIGHTS = os.path.join(HERE, "..", "..", "shared", "weights", "dinov2-small")
IMAGES = os.path.join(HERE, "..", "..", "shared", "data", "imagenet-samples")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.isdir(WEIGHTS) and os.path.isdir(IMAGES)),
                       reason="real DINOv2-S weights / images not found under ../shared"),
]

FLOORS = {0.5: 0.85, 0.35: 0.65, 0.2: 0.50}  # measured: 0.904 / 0.723 / 0.663 (these 2 images)


@pytest.fixture(scope="module")
def results():
    """One capture, one rewrite per retain ratio, one forward each (2 images, 448 px)."""
    import ipcv_compile
    from ipcv_adapters.dinov2 import load_dinov2
    from ipcv_adapters.app.images import list_images, load_images

    model = load_dinov2(WEIGHTS)
    x = load_images(list_images(IMAGES, 2), 448)
    outs = {}
    with torch.no_grad():
        ref = model(pixel_values=x)
        rt = ipcv_compile.rewrite(model, IPCVConfig(retain=0.35))  # paper defaults l_p=3, Δ=7, k=10
        for r in FLOORS:
            outs[r] = (rt if r == 0.35 else rt.with_config(retain=r))(pixel_values=x)
    return model, x, ref, rt, outs


def test_cosine_to_vanilla_through_rewritten_graph(results):
    model, x, ref, rt, outs = results
    cos = {}
    for r, out in outs.items():
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 1 + 32 * 32, 384)
        c = torch.nn.functional.cosine_similarity(out.last_hidden_state[:, 1:], ref.last_hidden_state[:, 1:], dim=-1)
        cos[r] = c.mean().item()
    print("\nDINOv2-S 448px, rewritten graph, mean cosine of final patch tokens to vanilla: "
          + ", ".join(f"r={r}: {c:.4f}" for r, c in cos.items()))
    for r, floor in FLOORS.items():
        assert floor < cos[r] < 0.9999, (r, cos[r])
    assert cos[0.5] > cos[0.35] > cos[0.2]


def test_rewritten_equals_eager_driver_on_real_weights(results):
    import ipcv_adapters

    model, x, ref, rt, outs = results
    out = outs[0.35]
    with torch.no_grad():
        eager, res = ipcv_adapters.run_eager(model, rt.ipcv_config, pixel_values=x)
    assert res.keep_idx.shape[1] == 1 + 359  # ceil(0.35 * 1024) + CLS
    rel = (out.last_hidden_state - eager.last_hidden_state).abs().max() / eager.last_hidden_state.abs().max()
    assert rel.item() <= 1e-5
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
