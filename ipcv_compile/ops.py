"""The ops the rewrite inserts, registered with ``torch.library`` in the ``ipcv`` namespace:
``torch.ops.ipcv.prune``, ``.reconstruct``, ``.ngr``, ``.segment_concat``, ``.segment_prefix``,
``.segment_attention``,
``.gather_tokens``, ``.attention_bias``, ``.key_metric``.

Each is a CompositeImplicitAutograd op whose implementation is the ``ipcv_core`` function the
eager driver runs, so

* the rewritten graph (and ``torch.export`` of it) shows named IPCV nodes — a backend kernel or a
  TensorRT plugin can target ``ipcv::prune``;
* ``ExportedProgram.run_decompositions()`` lowers them to ATen (ONNX / pt2 / TensorRT artifacts are
  saved after decomposition and load without ipcv installed);
* ``torch.utils.flop_counter`` sees the FLOPs inside (it counts the ATen ops they dispatch to).

Schemas take no dicts or nested tuples: the segment layout and the IPCV config are flattened into
typed scalars and lists (:func:`layout_args`, :func:`config_args`), so a printed graph reads like
``ipcv.prune(..., stage=0, retain=0.35, selection='score', ...)``; the op decodes its config once
per distinct config (:func:`decode_config`, cached), not on every call.

The Python handles carry the op's own name: ``ops.prune`` is ``torch.ops.ipcv.prune.default``,
``ops.ngr`` is ``torch.ops.ipcv.ngr.default``, ... (the ``ipcv_core`` functions they run are
imported under ``_core_*`` aliases).  Hidden states come in the
model's own layout (``(B, N, D)``, or packed ``(N, D)`` with ``token_dim=0``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Tuple

import torch

from ipcv_core.attention import segment_attention as _core_segment_attention
from ipcv_core.attention import segment_concat as _core_segment_concat
from ipcv_core.attention import segment_prefix as _core_segment_prefix
from ipcv_core.config import IPCVConfig
from ipcv_core.prune import PruneOutputs, prune_stage, reconstruct_nested
from ipcv_core.reconstruct import ngr as _core_ngr
from ipcv_core.segments import SegmentLayout
from ipcv_core.selection import is_tracing

__all__ = ["prune", "reconstruct", "ngr", "segment_concat", "segment_prefix", "segment_attention", "gather_tokens",
           "attention_bias", "key_metric", "layout_args", "config_args", "decode_config", "RECONSTRUCT_FIELDS",
           "IPCV_OPS", "decompositions", "has_ipcv_ops"]

_LIB = torch.library.Library("ipcv", "DEF")

_CONFIG_SCHEMA = (
    "float retain, int prune_layer, int as_depth, int k, str weighting, float similarity_temperature, "
    "int min_keep, bool reintegrate, str selection, str reconstruction, str merge, int seed, "
    "int[] stage_layers, float[] stage_retains, str placement"
)
_LAYOUT_SCHEMA = "int token_dim, int[]? segment_lengths, int protected, int[]? grids, int grid_merge"

#: the fields of each stage that ``ipcv::reconstruct`` takes (flattened, stage after stage)
RECONSTRUCT_FIELDS = ("x_keep", "x_rem", "keep_idx", "rem_idx", "nbr_idx", "nbr_w")


# --------------------------------------------------------------------------------------------- flattening
def layout_args(layout: SegmentLayout, token_dim: int) -> Dict[str, Any]:
    """A :class:`SegmentLayout` as the ops' layout keywords."""
    return dict(
        token_dim=int(token_dim),
        segment_lengths=None if layout.lengths is None else list(layout.lengths),
        protected=int(layout.protected),
        grids=None if layout.grids is None else [v for hw in layout.grids for v in hw],
        grid_merge=int(layout.merge),
    )


def _layout(segment_lengths, protected, grids, grid_merge) -> SegmentLayout:
    g = None if grids is None else tuple(zip(grids[0::2], grids[1::2]))
    return SegmentLayout(None if segment_lengths is None else tuple(segment_lengths), protected, g, grid_merge)


def config_args(cfg: IPCVConfig) -> Dict[str, Any]:
    """An :class:`IPCVConfig` as the ops' config keywords (``extras`` are not the ops' business)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in ("extras", "stages"):
            continue
        out[f.name] = getattr(cfg, f.name)
    out["stage_layers"] = [int(sl) for sl, _ in cfg.stages]
    out["stage_retains"] = [float(sr) for _, sr in cfg.stages]
    return out


def decode_config(**fields) -> IPCVConfig:
    """The :class:`IPCVConfig` of the ops' config keywords (:func:`config_args`), built and validated
    once per distinct config: a graph called many times decodes its static config on the first call
    only (lists become tuples to form the cache key)."""
    return _decode_config(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items())))


@functools.lru_cache(maxsize=64)
def _decode_config(items: Tuple[Tuple[str, Any], ...]) -> IPCVConfig:
    fields = dict(items)
    stages = tuple(zip(fields.pop("stage_layers"), fields.pop("stage_retains")))
    return IPCVConfig(stages=stages, **fields)


def _bnd(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    if token_dim == 0 and x.dim() == 2:
        return x.unsqueeze(0)
    if token_dim == 1 and x.dim() == 3:
        return x
    raise ValueError(f"hidden states of shape {tuple(x.shape)} with token_dim={token_dim} are not supported "
                     "(expected (B, N, D) with token_dim=1 or (N, D) with token_dim=0)")


def _model_layout(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    return x.squeeze(0) if token_dim == 0 else x


# --------------------------------------------------------------------------------------------- ops
_LIB.define(
    "prune(Tensor x, Tensor x_prev, Tensor x0, Tensor? positions, Tensor? metric, Tensor? log_size, *, "
    f"int stage, {_LAYOUT_SCHEMA}, {_CONFIG_SCHEMA}) -> "
    "(Tensor x_keep, Tensor x_rem, Tensor keep_idx, Tensor rem_idx, Tensor nbr_idx, Tensor nbr_w, "
    "Tensor log_size, Tensor positions, Tensor scores)"
)


def _prune(x, x_prev, x0, positions=None, metric=None, log_size=None, *, stage, token_dim, segment_lengths,
           protected, grids, grid_merge, **config):
    """Stage ``stage`` of the config's schedule: :func:`ipcv_core.prune.prune_stage` (returns a
    :class:`~ipcv_core.prune.PruneOutputs`, ``x_keep`` in the model's layout)."""
    layout = _layout(segment_lengths, protected, grids, grid_merge)
    cfg = decode_config(**config)
    xb = _bnd(x, token_dim)
    if stage == 0 and not is_tracing() and isinstance(xb.shape[1], int):
        layout.check_tokens(xb.shape[1])
    st = prune_stage(xb, _bnd(x_prev, token_dim), _bnd(x0, token_dim), layout, cfg, stage,
                     positions=positions, metric=metric, log_size=log_size)
    return tuple(st._replace(x_keep=_model_layout(st.x_keep, token_dim)))


_LIB.define("reconstruct(Tensor x_keep, Tensor[] stages, *, int token_dim) -> Tensor")


def _reconstruct(x_keep, stages, *, token_dim):
    """NGR + restore through every stage (:func:`ipcv_core.prune.reconstruct_nested`): the full
    sequence in original order, in the model's layout.  ``stages``: per stage the
    :data:`RECONSTRUCT_FIELDS` tensors, one stage after the other."""
    n = len(RECONSTRUCT_FIELDS)
    if len(stages) % n:
        raise ValueError(f"ipcv::reconstruct takes {n} tensors per stage ({RECONSTRUCT_FIELDS}), got {len(stages)}")
    sts: List[PruneOutputs] = []
    pad = (None,) * (len(PruneOutputs._fields) - n)
    for i in range(0, len(stages), n):
        st = PruneOutputs._make(tuple(stages[i:i + n]) + pad)
        sts.append(st._replace(x_keep=_bnd(st.x_keep, token_dim)))
    return _model_layout(reconstruct_nested(_bnd(x_keep, token_dim), sts), token_dim)


_LIB.define("gather_tokens(Tensor t, Tensor keep_idx, *, int[] dims, str batch) -> Tensor")


def _gather_tokens(t, keep_idx, *, dims, batch):
    """Keep the rows of ``keep_idx (B, K)`` along each token dim in ``dims`` of a per-token value.

    ``batch``: ``"full"`` — ``t``'s dim 0 is the batch (size B), each row uses its own keep list;
    ``"broadcast"`` — dim 0 has size 1 and broadcasts over the batch (expanded to B first);
    ``"none"`` — ``t`` has no batch dim, and the batch must have one row (checked eagerly).
    """
    if batch not in ("full", "broadcast", "none"):
        raise ValueError(f"batch must be 'full', 'broadcast' or 'none', got {batch!r}")
    if not dims:
        raise ValueError("ipcv::gather_tokens needs at least one token dim")
    if batch == "none":
        if not is_tracing() and keep_idx.shape[0] != 1:
            raise ValueError(
                f"a per-token side input of shape {tuple(t.shape)} has no batch dimension, but the batch has "
                f"{keep_idx.shape[0]} rows with different keep sets; run one image per call or give the side "
                "input a batch dimension"
            )
        idx = keep_idx[0]
        for d in dims:
            t = t.index_select(d, idx)
        return t
    B, K = keep_idx.shape
    if batch == "broadcast":
        t = t.expand(B, *t.shape[1:])
    for d in dims:
        d = d % t.dim()
        view = [B] + [1] * (t.dim() - 1)
        view[d] = K
        size = list(t.shape)
        size[d] = K
        t = torch.gather(t, d, keep_idx.view(view).expand(size))
    return t


_LIB.define("attention_bias(Tensor? mask, Tensor log_size, *, ScalarType dtype) -> Tensor")


def _attention_bias(mask, log_size, *, dtype):
    """SDPA ``attn_mask`` adding ``log(size)`` of every key (proportional attention, ``(B, K)``) to
    an existing bool / float mask (or none)."""
    bias = log_size[:, None, None, :].to(dtype, copy=True)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask.to(dtype) + bias


_LIB.define("key_metric(Tensor key) -> Tensor")


def _key_metric(key):
    """The bipartite matching metric from an SDPA key input: ``(B, H, L, E)`` -> ``(B, L, E)``
    (mean over heads), or ``(H, L, E)`` -> ``(1, L, E)``."""
    if key.dim() == 4:
        return key.mean(1)
    if key.dim() == 3:
        return key.mean(0).unsqueeze(0)
    raise ValueError(f"attention keys of shape {tuple(key.shape)}: expected (B, H, L, E) or (H, L, E)")


_LIB.define("ngr(Tensor x_keep, Tensor x_rem, Tensor x_keep_lp, Tensor nbr_idx, Tensor nbr_w, *, int token_dim) -> Tensor")


def _ngr(x_keep, x_rem, x_keep_lp, nbr_idx, nbr_w, *, token_dim):
    """Eq. 5 for the removed rows only (:func:`ipcv_core.reconstruct.ngr`): their values at the
    current layer from the kept rows' ``x_keep`` (model layout), without restoring the order."""
    rec = _core_ngr(x_rem, _bnd(x_keep_lp, token_dim), _bnd(x_keep, token_dim), nbr_idx, nbr_w)
    return _model_layout(rec, token_dim)


_LIB.define("segment_concat(Tensor a, Tensor b, *, SymInt[] a_lengths, SymInt[] b_lengths, int dim) -> Tensor")


def _segment_concat(a, b, *, a_lengths, b_lengths, dim):
    """Rows of ``a`` and ``b`` interleaved per segment, ``[a_0; b_0; a_1; b_1; ...]``
    (:func:`ipcv_core.attention.segment_concat`)."""
    return _core_segment_concat(a, b, a_lengths, b_lengths, dim)


_LIB.define("segment_prefix(Tensor x, *, SymInt[] lengths, SymInt[] take, int dim) -> Tensor")


def _segment_prefix(x, *, lengths, take, dim):
    """The first ``take[i]`` rows of each segment (:func:`ipcv_core.attention.segment_prefix`)."""
    return _core_segment_prefix(x, lengths, take, dim)


_LIB.define("segment_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? q_groups=None, "
            "Tensor? kv_groups=None, *, SymInt[] q_lengths, SymInt[] kv_lengths, bool q_prefix, float? scale, "
            "bool enable_gqa) -> Tensor")


def _segment_attention(q, k, v, attn_mask=None, q_groups=None, kv_groups=None, *, q_lengths, kv_lengths, q_prefix,
                       scale, enable_gqa):
    """SDPA within each segment (:func:`ipcv_core.attention.segment_attention`): equal runs of
    segments as one batched SDPA, no mask across segments; ``q_groups`` / ``kv_groups`` restrict
    each segment's attention to rows of the same group (attention windows)."""
    return _core_segment_attention(q, k, v, attn_mask, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                   q_prefix=q_prefix, scale=scale, enable_gqa=enable_gqa, q_groups=q_groups,
                                   kv_groups=kv_groups)


_IMPLS = {"prune": _prune, "ngr": _ngr, "segment_concat": _segment_concat,
          "segment_prefix": _segment_prefix, "segment_attention": _segment_attention, "reconstruct": _reconstruct, "gather_tokens": _gather_tokens,
          "attention_bias": _attention_bias, "key_metric": _key_metric}
for _name, _fn in _IMPLS.items():
    _LIB.impl(_name, _fn, "CompositeImplicitAutograd")

# the handles: each named as its op (``ops.ngr`` is ``torch.ops.ipcv.ngr.default``)
prune = torch.ops.ipcv.prune.default
reconstruct = torch.ops.ipcv.reconstruct.default
ngr = torch.ops.ipcv.ngr.default
segment_concat = torch.ops.ipcv.segment_concat.default
segment_prefix = torch.ops.ipcv.segment_prefix.default
segment_attention = torch.ops.ipcv.segment_attention.default
gather_tokens = torch.ops.ipcv.gather_tokens.default
attention_bias = torch.ops.ipcv.attention_bias.default
key_metric = torch.ops.ipcv.key_metric.default
#: every op the rewrite may insert
IPCV_OPS = (prune, reconstruct, ngr, segment_concat, segment_prefix, segment_attention, gather_tokens, attention_bias,
            key_metric)


def decompositions() -> Dict[Any, Any]:
    """``{ipcv op: its implementation}`` — for ``ExportedProgram.run_decompositions``: lowers the
    IPCV nodes to the ATen ops they run and leaves every other op of the program as exported."""
    return {getattr(torch.ops.ipcv, name).default: fn for name, fn in _IMPLS.items()}


def has_ipcv_ops(graph: torch.fx.Graph) -> bool:
    return any(n.op == "call_function" and n.target in IPCV_OPS for n in graph.nodes)

