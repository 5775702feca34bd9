"""Start-up behaviour of the plug-in in vLLM: bad ``ipcv`` configs and an ``ipcv`` key on an
unsupported architecture fail when the engine starts, naming the field / the supported
architectures; the OpenAI server takes the config through --hf-overrides and answers a chat
completion with an image."""

import base64
import io
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from conftest import TINY, vllm_env

_BAD = textwrap.dedent('''
    import json, sys
    from vllm import LLM
    res = {}
    for name, model, ipcv in json.loads(sys.argv[1]):
        try:
            LLM(model=model, hf_overrides={"ipcv": ipcv}, enforce_eager=True, max_model_len=1024, dtype="float32")
            res[name] = "started"
        except Exception as e:  # the start-up error, as the user sees it
            res[name] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(res))
''')


def _text_only_checkpoint(path):
    """A tiny Qwen2ForCausalLM (an architecture vLLM serves that the plug-in does not cover)."""
    import transformers as tf

    from ipcv_adapters.vllm.testing import _tokenizer

    cfg = tf.Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    tf.Qwen2ForCausalLM._from_config(cfg).save_pretrained(path)
    _tokenizer(path, 320).save_pretrained(path)
    return str(path)


def test_bad_configs_fail_at_startup_naming_the_field(checkpoints, tmp_path):
    q2 = checkpoints("qwen2_vl")
    cases = [
        ("retain", q2, {"retain": 1.5}),
        ("prune_layer", q2, {"retain": 0.35, "prune_layer": 9}),
        ("unknown", q2, {"retain": 0.35, "retian": 0.5}),
        ("selection", q2, {"retain": 0.5, "selection": "bipartite"}),
        ("arch", _text_only_checkpoint(tmp_path / "text"), {"retain": 0.35}),
    ]
    p = subprocess.run([sys.executable, "-c", _BAD, json.dumps(cases)], env=vllm_env(), capture_output=True,
                       text=True, timeout=600)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, p.stderr[-4000:]
    res = json.loads(line[-1][len("RESULT "):])
    assert "IPCVConfig.retain must be a number in (0, 1], got 1.5" in res["retain"], res["retain"]
    assert "IPCVConfig.prune_layer must be in [1, depth-1] = [1, 3]" in res["prune_layer"], res["prune_layer"]
    assert "retian" in res["unknown"] and "retain" in res["unknown"], res["unknown"]
    assert "selection" in res["selection"] and "bipartite" in res["selection"], res["selection"]
    assert "Qwen2ForCausalLM" in res["arch"] and "Qwen2VLForConditionalGeneration" in res["arch"], res["arch"]
    assert all(v != "started" for v in res.values()), res


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_data_url():
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_server_with_hf_overrides_answers_an_image_chat(checkpoints, tmp_path):
    path = checkpoints("qwen2_vl")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--hf-overrides", json.dumps({"ipcv": TINY}), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "2048", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("server not ready in 420 s:\n" + (tmp_path / "server.log").read_text()[-4000:])
        body = {"model": "tiny", "max_tokens": 5, "temperature": 0.0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url()}}, {"type": "text", "text": "describe"}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            ans = json.loads(r.read())
        assert ans["choices"][0]["message"]["role"] == "assistant"
        assert ans["usage"]["completion_tokens"] == 5
        assert ans["usage"]["prompt_tokens"] > 12  # the image's placeholder tokens are in the prompt
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "ipcv: Qwen2VLForConditionalGeneration vision tower compressed" in text
