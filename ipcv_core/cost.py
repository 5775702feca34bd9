"""The one cost model and the one timer of the project.

FLOPs (a multiply-add counts 2), for a pre-norm ViT block of width ``D`` with ``Lq`` query rows,
``Lkv`` key/value rows and an FFN over ``L`` rows:

* attention: q and out projections ``2·Lq·D²`` each, k and v projections ``2·Lkv·D²`` each,
  ``QKᵀ`` and ``AV`` ``2·Lq·Lkv·D`` each (softmax, norms, biases and LayerScale not counted);
* FFN: ``2·L·W`` with ``W`` the FFN's weight entries (``2·D·M`` for fc1/fc2 of width ``M``);
* one key projection (DART's metric, a block-input bipartite stage's keys): ``2·L·D²`` — a
  post-attention stage (and ToMe) reuses the keys its attention computed: none;
* neighbour search of ``R`` removed rows among ``K`` kept: ``2·R·K·C``; one NGR evaluation with
  ``k`` neighbours: ``2·R·min(k, K)·D``; bipartite similarities of ``n`` rows (set A against set
  B): ``2·⌈n/2⌉·⌊n/2⌋·C`` — ``C`` the width of the metric the search runs on (``D`` for hidden
  states, ``ModelDims.key_dim`` — the head dim — for head-averaged keys);
* patch embedding of ``n`` patches: ``2·n·C·p²·D``.

:func:`config_flops` applies these to an :class:`~ipcv_core.IPCVConfig`'s schedule (the rows every
block sees); the benchmark harness applies them to the rows each block branch really saw; ``ipcv
tune`` compares configurations with them.  The FLOP ratio to vanilla is the *FLOP bound* a
measured latency ratio is compared with.

:func:`interleaved_latency` times a reference and a candidate alternately (``A, B, A, B, …``), and
:func:`round_robin` any number of rows once per round — the way every latency of the project is
measured on a shared machine.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Union

from .config import IPCVConfig
from .schedule import Schedule

__all__ = [
    "ModelDims", "attention_flops", "ffn_flops", "key_flops", "knn_flops", "ngr_flops", "matching_flops",
    "patch_embed_flops", "block_flops", "config_flops", "Timing", "Rounds", "interleaved_latency", "round_robin",
]


@dataclass(frozen=True)
class ModelDims:
    """Sizes the cost model needs.  ``ffn_params``: FFN weight entries when they are not ``2·D·M``
    (gated FFNs, or a count read off a module); ``patch`` = 0 leaves the patch embedding out."""

    dim: int
    mlp: int = 0
    patch: int = 0
    channels: int = 3
    ffn_params: Optional[int] = None
    # width of the matching metric (head-averaged attention keys: the head dim); None = ``dim``,
    # an upper bound
    key_dim: Optional[int] = None

    @property
    def ffn_weights(self) -> int:
        return self.ffn_params if self.ffn_params is not None else 2 * self.dim * self.mlp

    @property
    def metric(self) -> "ModelDims":
        """Dims whose width is the matching metric's (for similarities computed on the keys)."""
        return ModelDims(self.key_dim or self.dim)


def attention_flops(lq: int, lkv: int, d: ModelDims) -> float:
    D = d.dim
    return 4.0 * lq * D * D + 4.0 * lkv * D * D + 4.0 * lq * lkv * D


def ffn_flops(rows: int, d: ModelDims) -> float:
    return 2.0 * rows * d.ffn_weights


def key_flops(rows: int, d: ModelDims) -> float:
    return 2.0 * rows * d.dim * d.dim


def knn_flops(removed: int, kept: int, d: ModelDims) -> float:
    return 2.0 * removed * kept * d.dim


def ngr_flops(removed: int, kept: int, k: int, d: ModelDims, evaluations: int = 1) -> float:
    """``evaluations`` NGR evaluations (one per AS block plus the reintegration)."""
    return evaluations * 2.0 * removed * min(k, max(kept, 1)) * d.dim


def matching_flops(rows: int, d: ModelDims) -> float:
    """Bipartite similarities of ``rows`` rows (set A against set B, ``⌈rows/2⌉ x ⌊rows/2⌋``) at
    the metric's width (``d.key_dim``; ``D`` when unset, an upper bound)."""
    return 2.0 * ((rows + 1) // 2) * (rows // 2) * (d.key_dim or d.dim)


def patch_embed_flops(patches: int, d: ModelDims) -> float:
    return 2.0 * patches * d.channels * d.patch * d.patch * d.dim


def block_flops(q_rows: int, kv_rows: int, ffn_rows: int, d: ModelDims) -> float:
    """One pre-norm block: attention of ``q_rows`` queries over ``kv_rows`` keys, FFN on ``ffn_rows``."""
    return attention_flops(q_rows, kv_rows, d) + ffn_flops(ffn_rows, d)


def config_flops(cfg: Union[IPCVConfig, Schedule, None], n_tokens: int, protected: int, depth: int,
                 dims: ModelDims) -> float:
    """FLOPs of a block stack of ``depth`` blocks for one segment of ``n_tokens`` (protected
    included) under ``cfg`` (None: vanilla): the rows each block sees (:meth:`Schedule.segment_rows`),
    every prune stage (neighbour search, the bipartite keys + similarities), one NGR per AS block
    (the keys / values of the removed rows) and the reintegration's NGR."""
    if cfg is None:
        return depth * block_flops(n_tokens, n_tokens, n_tokens, dims)
    sched = Schedule.build(cfg, depth)
    cfg = sched.config
    total, prev = 0.0, n_tokens
    for plan, rows in zip(sched, sched.segment_rows(n_tokens, protected)):
        q, kv, f = rows["queries"], rows["keys"], rows["ffn"]
        total += attention_flops(q, kv, dims) + ffn_flops(f, dims)
        if plan.stage is not None:  # K = f kept of the `prev` rows entering the stage
            R = prev - f
            # neighbour search (on the keys for key-metric selections) + the reintegration's NGR
            total += knn_flops(R, f, dims.metric if cfg.needs_key_metric else dims) + ngr_flops(R, f, cfg.k, dims)
            if cfg.needs_key_metric:  # post-attention stages reuse the attention's keys: no projection
                total += matching_flops(prev, dims) + (0.0 if plan.stage_after_attention else key_flops(prev, dims))
        if plan.as_block:  # the removed rows' keys / values: one NGR per AS block
            total += ngr_flops(n_tokens - f, f, cfg.k, dims)
        prev = f
    return total


# --------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Interleaved timing of a reference and a candidate.

    ``ratio``: median candidate time over median reference time (ratio of medians, the figure the
    project reports); ``pair_ratio``: median of the per-pair ratios (each candidate run over the
    reference run just before it; follows load changes); ``cpu_ratio``: the same per-pair median
    with process CPU time (depends far less on other processes' load)."""

    ref_s: float
    s: float
    pair_ratio: float
    cpu_ratio: float

    @property
    def ratio(self) -> float:
        return self.s / self.ref_s if self.ref_s > 0 else math.nan


@dataclass(frozen=True)
class Rounds:
    """Per-call wall-clock and process CPU seconds of every row, round by round."""

    wall: Dict[Hashable, List[float]]
    cpu: Dict[Hashable, List[float]]

    def median(self, key: Hashable) -> float:
        return statistics.median(self.wall[key])


def round_robin(fns: Mapping[Hashable, Callable[[], object]], repeats: int, warmup: int = 0,
                sync: Optional[Callable[[], object]] = None) -> Rounds:
    """Time every function of ``fns`` once per round, in order, for ``repeats`` rounds (after
    ``warmup`` untimed rounds).  ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after
    each timed call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: Dict[Hashable, List[float]] = {k: [] for k in fns}
    cpu: Dict[Hashable, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            if sync is not None:
                sync()
            w, c = time.perf_counter(), time.process_time()
            f()
            if sync is not None:
                sync()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    return Rounds(wall, cpu)


def interleaved_latency(fn_ref: Callable[[], object], fn: Callable[[], object], repeats: int,
                        warmup: int = 0) -> Timing:
    """Run ``fn_ref`` and ``fn`` alternately ``repeats`` times each (after ``warmup`` untimed
    rounds) and summarise with medians (wall and process CPU time of the same runs)."""
    r = round_robin({"ref": fn_ref, "fn": fn}, repeats, warmup)
    med = statistics.median
    return Timing(
        r.median("ref"),
        r.median("fn"),
        med(b / a for a, b in zip(r.wall["ref"], r.wall["fn"])),
        med(b / a if a > 0 else math.nan for a, b in zip(r.cpu["ref"], r.cpu["fn"])),
    )


# ---- LLM ------------------------------------------------------------------------------------------
# The language-model half of an MLLM (decoder layers with grouped-query attention and a gated FFN, as in
# Qwen2 / Qwen2-VL), with the same conventions as above: a multiply-add counts 2; per decoder layer with
# ``q`` new rows attending over ``kv`` cached + new rows: q and o projections ``2·q·D·(H·hd)`` each, k and v
# projections ``2·q·D·(Hkv·hd)`` each, ``QKᵀ`` and ``AV`` ``2·q·kv·(H·hd)`` each (the full rectangle, as
# a masked SDPA computes it; norms, rotary, softmax and biases not counted), FFN ``2·q·(3·D·I)``
# (gate, up, down).  The LM head costs ``2·D·V`` per row it is applied to.  KV-cache bytes: every entry of
# every layer stores ``2·Hkv·hd`` values.

@dataclass(frozen=True)
class LLMDims:
    """Sizes of a decoder-only LM (``gated``: SwiGLU FFN with 3 matrices, else 2)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def llm_layer_flops(q_rows: int, kv_rows: int, d: LLMDims) -> float:
    """One decoder layer: ``q_rows`` new rows attending over ``kv_rows`` rows (cache + new)."""
    D = d.hidden
    proj = 2.0 * q_rows * D * (2 * d.q_dim + 2 * d.kv_dim)
    att = 4.0 * q_rows * kv_rows * d.q_dim
    ffn = 2.0 * q_rows * (3 if d.gated else 2) * D * d.intermediate
    return proj + att + ffn


def lm_head_flops(rows: int, d: LLMDims) -> float:
    return 2.0 * rows * d.hidden * d.vocab


def llm_prefill_flops(rows_per_layer, d: LLMDims, head_rows: int = 1) -> float:
    """Prefill with ``rows_per_layer[i]`` tokens in layer ``i`` (self-attention among them) and the LM head
    on ``head_rows`` rows (``generate`` computes the last row's logits only)."""
    if len(rows_per_layer) != d.layers:
        raise ValueError(f"rows_per_layer has {len(rows_per_layer)} entries for {d.layers} layers")
    return sum(llm_layer_flops(r, r, d) for r in rows_per_layer) + lm_head_flops(head_rows, d)


def llm_decode_flops(cached_per_layer, steps: int, d: LLMDims) -> float:
    """``steps`` decoding forwards of one token each after a prefill that left ``cached_per_layer[i]``
    entries in layer ``i`` (step ``s`` attends over ``cached + s + 1`` entries), LM head included."""
    return sum(llm_layer_flops(1, c + s + 1, d) for s in range(steps) for c in cached_per_layer) \
        + steps * lm_head_flops(1, d)


def kv_cache_bytes(entries_per_layer, d: LLMDims, bytes_per_value: int = 2) -> float:
    """KV-cache size for ``entries_per_layer[i]`` cached tokens in layer ``i`` (bf16: 2 bytes)."""
    return float(sum(entries_per_layer)) * 2 * d.kv_dim * bytes_per_value


__all__ += ["LLMDims", "llm_layer_flops", "lm_head_flops", "llm_prefill_flops", "llm_decode_flops", "kv_cache_bytes"]
