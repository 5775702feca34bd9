"""Fixtures of the vLLM plug-in tests (run in .venv-vllm by `make test-vllm`): tiny checkpoints built
offline once per session, and vLLM engines run in subprocesses (vLLM loads its plug-ins once per
process, so "with" and "without the plug-in" need separate processes), results cached per spec."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
#: the IPCV config of the tests' 4-block towers (the paper's l_p=3, Δ=7 need >= 10 blocks)
TINY = {"retain": 0.35, "prune_layer": 1, "as_depth": 2, "k": 4}
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def vllm_env(**extra):
    """One process (engine core in the caller), 1 GiB KV cache, this folder importable (vllm_run's
    functions are sent to vLLM's workers by name), no plug-in allow-list from the caller."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=path, **extra)
    env.pop("VLLM_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> a saved tiny VLM directory (built on first use)."""
    from ipcv_adapters.vllm.testing import save_tiny_vlm

    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = save_tiny_vlm(family, str(root / f"{family}-{len(made)}"), **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """``engine(spec) -> results dict`` of tests_vllm/vllm_run.py for ``spec`` (cached per spec)."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def run(spec):
        key = json.dumps(spec, sort_keys=True)
        if key not in cache:
            out = root / f"run{len(cache)}.pt"
            env = vllm_env(**spec.get("env", {}))
            p = subprocess.run([sys.executable, str(HERE / "vllm_run.py"), key, str(out)], env=env,
                               capture_output=True, text=True, timeout=600, cwd=str(root))
            if p.returncode != 0:
                raise AssertionError(f"vLLM run failed (rc {p.returncode}) for {key}:\n{p.stderr[-6000:]}")
            cache[key] = torch.load(out, weights_only=False)
        return cache[key]

    return run
