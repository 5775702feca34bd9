"""The parts of the vLLM plug-in that need no vLLM (the engine tests are in tests_vllm/, run by
`make test-vllm` in .venv-vllm): ipcv never imports vllm; the ``ipcv`` entry of a model config is
parsed, resolved with the family's defaults and checked once; the start-up guard; the entry point;
the driver's one-call-for-all-segments attention hook the plug-in's blocks use."""

import functools
import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ipcv_core import IPCVConfig, SegmentLayout
from ipcv_core.driver import Branches, run_ipcv


def test_importing_ipcv_and_the_plugin_package_never_imports_vllm():
    code = ("import sys, ipcv_core, ipcv_compile, ipcv_adapters, ipcv_adapters.vllm, ipcv_adapters.vllm.config, "
            "ipcv_adapters.vllm.tower, ipcv_adapters.vllm.testing, ipcv_adapters.app.cli; "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; print(bad); assert not bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_plugin_is_declared_as_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("ipcv") == "ipcv_adapters.vllm:register"
    mod, fn = eps["ipcv"].split(":")
    assert callable(getattr(importlib.import_module(mod), fn))


def _hf_config(depth, ipcv):
    return SimpleNamespace(vision_config=SimpleNamespace(depth=depth), ipcv=ipcv)


def test_config_entry_is_resolved_with_the_family_defaults():
    from ipcv_adapters.qwen2_vl import Qwen2VLAdapter
    from ipcv_adapters.vllm.config import ipcv_config_of

    arch = "Qwen2VLForConditionalGeneration"
    assert ipcv_config_of(SimpleNamespace(vision_config=SimpleNamespace(depth=32)), arch) is None
    cfg = ipcv_config_of(_hf_config(32, {"retain": 0.35}), arch)
    assert (cfg.retain, cfg.prune_layer, cfg.as_depth, cfg.k) == (0.35, 3, 7, 10)
    assert cfg == IPCVConfig(retain=0.35).resolve(32, Qwen2VLAdapter.default_config)
    shallow = ipcv_config_of(_hf_config(4, {"retain": 0.5}), "Qwen3VLForConditionalGeneration")
    assert (shallow.prune_layer, shallow.as_depth) == (3, 1)  # clipped to the depth, as the transformers adapters
    explicit = ipcv_config_of(_hf_config(12, {"retain": 0.2, "prune_layer": 2, "as_depth": 4, "k": 3}), arch)
    assert (explicit.prune_layer, explicit.as_depth, explicit.k) == (2, 4, 3)


@pytest.mark.parametrize("entry, words", [
    ({"retain": 0}, ["IPCVConfig.retain", "(0, 1]"]),
    ({"retain": 0.35, "prune_layer": 40}, ["IPCVConfig.prune_layer", "[1, 31]"]),
    ({"retain": 0.35, "reatin": 1}, ["unknown IPCVConfig field", "reatin"]),
    ({"retain": 0.5, "selection": "bipartite"}, ["selection='bipartite'", "attention keys"]),
    ({"retain": 0.35, "merge": "size_bias"}, ["merge='size_bias'", "logits"]),
    ([0.35], ["'ipcv' entry must be a dict"]),
])
def test_bad_config_entries_raise_naming_the_field(entry, words):
    from ipcv_adapters.vllm.config import ipcv_config_of

    with pytest.raises(ValueError) as e:
        ipcv_config_of(_hf_config(32, entry), "Qwen2VLForConditionalGeneration")
    for w in words:
        assert w in str(e.value)


class _FakeRegistry:
    def __init__(self, arch):
        self.arch, self.calls = arch, 0

    def inspect_model_cls(self, architectures, model_config):
        self.calls += 1
        return "info", self.arch


def test_startup_guard_names_the_supported_architectures_and_checks_the_config():
    from ipcv_adapters.vllm import ARCHITECTURES
    from ipcv_adapters.vllm.config import guard_unsupported_architectures

    other = _FakeRegistry("LlavaForConditionalGeneration")
    guard_unsupported_architectures(other)
    guard_unsupported_architectures(other)  # idempotent: plug-ins load once per process, maybe more
    cfg = SimpleNamespace(hf_config=_hf_config(24, {"retain": 0.35}))
    with pytest.raises(ValueError) as e:
        other.inspect_model_cls(["LlavaForConditionalGeneration"], cfg)
    assert "LlavaForConditionalGeneration" in str(e.value)
    assert all(a in str(e.value) for a in ARCHITECTURES)
    assert other.calls == 1  # wrapped once
    assert other.inspect_model_cls(["X"], SimpleNamespace(hf_config=SimpleNamespace())) == ("info", "LlavaForConditionalGeneration")

    qwen = _FakeRegistry("Qwen2VLForConditionalGeneration")
    guard_unsupported_architectures(qwen)
    assert qwen.inspect_model_cls(["Qwen2VLForConditionalGeneration"], cfg) == ("info", "Qwen2VLForConditionalGeneration")
    with pytest.raises(ValueError, match="IPCVConfig.retain"):
        qwen.inspect_model_cls([], SimpleNamespace(hf_config=_hf_config(24, {"retain": 2.0})))


def _toy_blocks(depth, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(D, D, generator=g) / D ** 0.5, torch.randn(D, D, generator=g) / D ** 0.5) for _ in range(depth)]

    def attention(w, x_q, x_kv, ctx):  # plain softmax attention over the given rows
        a = torch.softmax(x_q @ w[0] @ x_kv.transpose(1, 2) / D ** 0.5, dim=-1)
        return a @ x_kv @ w[1]

    def ffn(w, x):
        return torch.tanh(x @ w[0]) * 0.1

    return ws, attention, ffn


def test_driver_calls_attention_segments_once_per_block_with_every_segment():
    """A block with ``Branches.segments`` gets all segments of a packed layout in one call (the
    plug-in's blocks run vLLM's varlen attention that way); results equal the per-segment loop."""
    D, lengths = 16, (12, 7, 9)
    ws, attention, ffn = _toy_blocks(4, D)
    seen = []

    def segments(w, x_q, x_kv, ctx, q_lengths, kv_lengths):
        seen.append((x_q.shape[1], x_kv.shape[1], q_lengths, kv_lengths))
        outs, qo, ko = [], 0, 0
        for ql, kl in zip(q_lengths, kv_lengths):
            outs.append(attention(w, x_q[:, qo:qo + ql], x_kv[:, ko:ko + kl], None))
            qo, ko = qo + ql, ko + kl
        return torch.cat(outs, 1)

    looped = [Branches(functools.partial(attention, w), functools.partial(ffn, w)) for w in ws]
    hooked = [Branches(functools.partial(attention, w), functools.partial(ffn, w),
                       segments=functools.partial(segments, w)) for w in ws]
    h = torch.randn(1, sum(lengths), D, generator=torch.Generator().manual_seed(1))
    cfg, layout = IPCVConfig(retain=0.5, prune_layer=1, as_depth=2, k=2), SegmentLayout.packed(lengths)
    a, b = run_ipcv(h, looped, cfg, layout), run_ipcv(h, hooked, cfg, layout)
    torch.testing.assert_close(b.hidden_states, a.hidden_states, rtol=1e-6, atol=1e-6)
    assert len(seen) == 4  # one call per block
    kept = (6, 4, 5)
    assert seen[0] == (28, 28, lengths, lengths)  # before l_p: every row
    assert seen[1] == (15, 28, kept, lengths) and seen[2] == (15, 28, kept, lengths)  # AS: kept queries, all keys
    assert seen[3] == (15, 15, kept, kept)  # after the AS range: kept rows only
    assert Branches(looped[0].attention, looped[0].ffn).attention_segments is None
