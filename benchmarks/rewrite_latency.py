"""Latency of rewritten graphs, and of the rewrite itself, for a before / after comparison of a
refactor of the compiler (issue 23): run it alternately on two source trees,

    PYTHONPATH=<tree> python benchmarks/rewrite_latency.py 15

(A, B, A, B ...), and compare the medians.  Prints one JSON line: per case the median seconds of
a call of the rewritten tower (``reps`` calls after 2 warm-ups) and ``rewrite+first:`` the seconds
of ``ipcv_compile.rewrite`` plus the first call (the first packed layout's rewrite).  Random
weights, so ``torch.set_flush_denormal(True)``."""
import json
import statistics
import sys
import time

import torch
torch.set_flush_denormal(True)
torch.manual_seed(0)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers import Dinov2Config, Dinov2Model
import ipcv_compile
from ipcv_core import IPCVConfig
from ipcv_adapters.testing import qwen2vl_inputs

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
out = {}
q = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(
    depth=12, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=256, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2), attn_implementation="sdpa").eval()
pv, thw = qwen2vl_inputs([(1, 32, 32), (1, 16, 24)])
d = Dinov2Model._from_config(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                          intermediate_size=1536, image_size=224), attn_implementation="sdpa").eval()
x = torch.randn(2, 3, 224, 224)
cases = {"qwen2vl_packed": (q, (pv,), {"grid_thw": thw}), "dinov2_batched": (d, (x,), {})}
with torch.no_grad():
    for name, (m, a, kw) in cases.items():
        for r in (1.0, 0.35):
            t0 = time.perf_counter()
            t = ipcv_compile.rewrite(m, IPCVConfig(retain=r, k=10, prune_layer=3, as_depth=7))
            t(*a, **kw)
            out[f"rewrite+first:{name}@{r}"] = time.perf_counter() - t0
            for _ in range(2):
                t(*a, **kw)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter(); t(*a, **kw); ts.append(time.perf_counter() - t0)
            out[f"{name}@{r}"] = statistics.median(ts)
print(json.dumps(out))
