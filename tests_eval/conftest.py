"""Fixtures of the lmms-eval tests (run in .venv-eval: `make test-eval`): tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL /
InternVL3 / LLaVA-OneVision checkpoints saved offline (random weights, a BPE tokenizer trained on a few sentences:
ipcv_adapters.eval.testing.save_tiny_eval_vlm)
and a local lmms-eval task (`--include_path`) over a handful of images of ../shared/data, scored by exact match."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "imagenet-samples"
TASK = "ipcv_tiny_vqa"

TASK_YAML = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = results[0].strip().lower()
    return {"exact_match": float(pred == doc["answer"].strip().lower())}
'''

QUESTIONS = ["what is shown in this picture", "describe the image in one sentence please",
             "what colour is it", "is there a cat", "what is on the table"]


def _docs():
    files = sorted(IMAGES.glob("*.jpg"))
    if len(files) < 6:
        pytest.fail(f"the local task needs >= 6 images under {IMAGES} (../shared/data)")
    docs = []
    for i in range(5):
        # samples 1 and 3 hold two images (multi-image prompts)
        imgs = [str(files[i])] + ([str(files[i + 5])] if i in (1, 3) else [])
        name = files[i].stem.split("_", 2)[-1].replace("_", " ")
        docs.append({"id": i, "images": imgs, "question": QUESTIONS[i], "answer": name})
    return docs


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in _docs()))
    (d / f"{TASK}.yaml").write_text(TASK_YAML.format(data=data, task=TASK))
    (d / "utils.py").write_text(TASK_UTILS)
    return d


class _Checkpoints(dict):
    """family -> path of a tiny checkpoint, saved on first use (ipcv_adapters.eval.testing.save_tiny_eval_vlm:
    3 decoder layers, so llm_layer 1 or 2 fits; Qwen images at most 112x112 px, InternVL3 / LLaVA-OneVision
    tiles of 56 px)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family):
        from ipcv_adapters.eval.testing import save_tiny_eval_vlm

        extra = {"max_pixels": 112 * 112} if family.startswith("qwen") else {}
        self[family] = save_tiny_eval_vlm(family, str(self.root / family), text_layers=3, **extra)
        return self[family]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return _Checkpoints(tmp_path_factory.mktemp("ckpt"))


def run_lmms_eval(model, model_args, task_dir, out, batch_size=1, extra=(), check=True, timeout=600):
    """`python -m lmms_eval ...` on the local task, offline; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(pathlib.Path(out) / "hf"), TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", str(batch_size), "--device", "cpu",
           "--output_path", str(out), "--log_samples", *extra]
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(out))
    if check and p.returncode != 0:
        raise AssertionError(f"lmms_eval failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def read_results(out):
    """(results JSON, {doc_id: prediction}) of the one run written under ``out``."""
    res = sorted(pathlib.Path(out).rglob("*_results.json"))
    assert len(res) == 1, f"expected one results file under {out}, got {res}"
    samples = sorted(pathlib.Path(out).rglob(f"*_samples_{TASK}.jsonl"))
    assert len(samples) == 1, f"expected one samples file under {out}, got {samples}"
    preds = {}
    for line in samples[0].read_text().splitlines():
        s = json.loads(line)
        r = s.get("filtered_resps", s.get("resps"))
        while isinstance(r, list):
            r = r[0]
        preds[s["doc_id"]] = r
    return json.loads(res[0].read_text()), preds
