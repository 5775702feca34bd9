"""``compress``: IPCV in the vision tower plus DART or FastV in the language model, installed in place on a
loaded ``...ForConditionalGeneration``; ``generate()`` and ``forward()`` are then called as before.

Mechanism (transformers 5.x; no modeling file is forked, only forward pre-hooks and public extension
points are used):

* a forward pre-hook (with kwargs) on the VLM's inner model (``model.model``) starts every call: at a
  prefill (empty cache) it finds the visual spans of every row (:mod:`.families`), adopts the call's
  ``DynamicCache`` as an :class:`~.cache.LLMPruneCache` and stores the call's :class:`~.cache.PruneState`
  in it (a call without a cache gets a fresh one, dropped from the output again if ``use_cache=False``);
  a prompt without visual tokens, or a call that gives ``inputs_embeds`` but no ``input_ids``, is not
  pruned;
* FastV: a pre-hook on decoder layer K-1 adds the state to that layer's kwargs; the registered attention
  function (:mod:`.attention`) computes the last prompt token's attention row there;
* a pre-hook on decoder layer K selects the kept tokens (DART from layer K-1's cached keys and the
  final-norm'd input of layer K; FastV from the recorded row) and slices the hidden states, the rotary
  ``position_embeddings`` (M-RoPE included), the text ``position_ids`` and the attention mask (both
  token dimensions) to them; the pre-hooks of layers > K pass the same sliced tensors on.  Layers >= K
  therefore store only the kept tokens in their KV cache;
* during decoding the hooks of layers >= K gather the key columns of the model's mask to the entries of
  the shorter cache (filler columns of short rows masked); the new tokens' rotary positions are the
  unpruned ones (the cache's ``get_seq_length`` reads layer 0), and the kept keys already carry their
  original positions.

Nothing is stored on a module between calls: the hooks are closures over the immutable installation
settings; per-call state lives in the call's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import DynamicCache

from ipcv_core.config import IPCVConfig
from ipcv_core.llm_prune import (
    LLM_METHODS, dart_keep, decode_mask, fastv_keep, gather_tokens, keep_index, prefill_mask, span_budget,
)

from . import attention as _attention
from .cache import LLMPruneCache, PruneState
from .families import LLMFamily, UnsupportedVLMError, find_family, supported_models

__all__ = ["compress", "uninstall", "installed", "Installation"]

_ATTR = "_ipcv_compress"


@dataclass(frozen=True)
class Settings:
    method: Optional[str]
    retain: float
    layer: int
    options: Tuple[Tuple[str, Any], ...] = ()


@dataclass
class Installation:
    """What ``compress`` changed on a model (so that it can be undone); not per-call state.
    ``family`` is ``None`` when only the vision tower was compressed (``llm=None``) on a VLM whose
    language model LLM-side pruning does not know."""

    family: Optional[LLMFamily]
    settings: Settings
    vit_config: Optional[IPCVConfig]
    original_tower: Optional[nn.Module] = None
    original_attn: Optional[str] = None
    handles: List[Any] = field(default_factory=list)
    tower_path: Optional[str] = None


def installed(model: nn.Module) -> Optional[Installation]:
    return getattr(model, _ATTR, None)


def uninstall(model: nn.Module) -> nn.Module:
    """Undo :func:`compress`: remove the hooks, restore the tower and the attention implementation."""
    inst = installed(model)
    if inst is None:
        return model
    for h in inst.handles:
        h.remove()
    if inst.original_tower is not None:
        _set_path(model, inst.tower_path, inst.original_tower)
    if inst.original_attn is not None:
        model.set_attn_implementation({_text_config_key(model): inst.original_attn})
    delattr(model, _ATTR)
    return model


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


# where ...ForConditionalGeneration models keep their vision tower (transformers 5), for VLMs that no
# LLM family describes
_TOWER_PATHS = ("model.visual", "model.vision_tower", "model.vision_model", "visual", "vision_tower", "vision_model")


def find_tower_path(model: nn.Module, family: Optional[LLMFamily] = None) -> str:
    """The attribute path of ``model``'s vision tower: the family's, else the first of the usual
    places that holds a tower an ipcv adapter supports (an ``UnsupportedVLMError`` naming the
    supported towers when none does)."""
    from ..registry import adapters, supported_towers
    from ..tower import IPCVTower

    if family is not None and family.tower_path:
        return family.tower_path
    for path in _TOWER_PATHS:
        sub = _get_path(model, path)
        if isinstance(sub, IPCVTower) or (isinstance(sub, nn.Module) and any(a.matches(sub) for a in adapters())):
            return path
    raise UnsupportedVLMError(
        f"compress: no vision tower ipcv supports in {type(model).__name__} (looked at .{', .'.join(_TOWER_PATHS)}); "
        f"supported towers: {[c.rpartition('.')[2] for c in supported_towers()]}")


def _text_config_key(model: nn.Module) -> str:
    cfg = model.config
    for key in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, key, None) is cfg.get_text_config(decoder=True):
            return key
    return "text_config"


def _check_retain(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"compress: {name} must be a number in (0, 1], got {value!r}")
    return float(value)


def compress(model: nn.Module, vit_retain: Optional[float] = 0.35, llm: Optional[str] = "dart",
             llm_retain: float = 0.35, llm_layer: int = 2, *, vit_config: Optional[IPCVConfig] = None,
             dart_image_pivots: int = 4, dart_text_pivots: int = 4, dart_pivot_norm: float = 1.0) -> nn.Module:
    """Install IPCV in the vision tower and DART / FastV in the language model of ``model``, in place;
    returns ``model``.

    Args:
        vit_retain: IPCV's retain ratio in the vision tower; ``None`` or ``1.0`` leave the tower as it is.
            The tower becomes ``ipcv_compile.rewrite(tower, vit_config.replace(retain=vit_retain))``, with
            ``vit_config`` defaulting to ``IPCVConfig()`` (the tower's defaults — the paper's ``l_p=3, Δ=7,
            k=10`` for the Qwen family — clipped to its depth).  IPCV
            restores the full token sequence, so the LLM sees as many image tokens as without it.
        llm: ``"dart"``, ``"fastv"`` or ``None`` (no LLM-side pruning).
        llm_retain: per image span / video frame of ``n`` visual tokens, ``ceil(r·n)`` stay from decoder
            layer ``llm_layer`` on (text tokens are never removed).  ``1.0`` keeps every token through the
            same mechanism (generation equals the unpruned model's).
        llm_layer: K, the first decoder layer that sees only the kept tokens, ``1 <= K < num_layers``
            (layer 0 keeps the full length: positions and masks of later tokens are derived from it).
            DART and FastV read layer K-1 (its keys / its attention).
        vit_config: the IPCV configuration of the tower (``retain`` is replaced by ``vit_retain``).
        dart_image_pivots / dart_text_pivots: DART's pivots per span (paper: 4 + 4);
        dart_pivot_norm: the p of the key norm that picks pivots (DART's code: 1).

    The tower is found where the family keeps it, else at ``model.visual`` / ``model.vision_tower`` /
    ... (any VLM holding a supported tower: ``llm=None`` always works there); the VLM's
    ``vision_feature_layer`` is passed to the rewrite (``feature_layers``), so LLaVA's -2 is captured
    once.  ``llm="dart"`` / ``"fastv"`` need a family (:func:`~.families.supported_models`: Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL, LLaVA, LLaVA-OneVision); another VLM raises
    :class:`~.families.UnsupportedVLMError` naming it and the supported ones.

    Calling ``compress`` again replaces the previous installation; :func:`uninstall` removes it.
    """
    if llm not in (None,) + LLM_METHODS:
        raise ValueError(f"compress: llm must be one of (None, 'dart', 'fastv'), got {llm!r}")
    llm_retain = _check_retain("llm_retain", llm_retain)
    if vit_retain is not None:
        vit_retain = _check_retain("vit_retain", vit_retain)
    if vit_config is not None and not isinstance(vit_config, IPCVConfig):
        raise TypeError(f"compress: vit_config must be an IPCVConfig or None, got {type(vit_config).__name__}")
    family = None
    if llm is not None:
        try:
            family = find_family(model)
        except UnsupportedVLMError as e:
            raise UnsupportedVLMError(
                f"compress(llm={llm!r}): LLM-side pruning does not support {type(model).__name__} (its language model's "
                f"visual-token spans / layers are not described); supported: {supported_models()}. "
                f"compress(model, llm=None) compresses its vision tower only.") from e
    else:
        try:
            family = find_family(model)
        except UnsupportedVLMError:
            family = None
    if llm is not None:
        n_layers = len(family.layers)
        if isinstance(llm_layer, bool) or not isinstance(llm_layer, int) or not 1 <= llm_layer < n_layers:
            raise ValueError(
                f"compress: llm_layer must be an int in [1, num_layers - 1] = [1, {n_layers - 1}] for this model "
                f"({n_layers} decoder layers), got {llm_layer!r}")
        for name, v in (("dart_image_pivots", dart_image_pivots), ("dart_text_pivots", dart_text_pivots)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"compress: {name} must be an int >= 0, got {v!r}")
        if not (dart_pivot_norm > 0):
            raise ValueError(f"compress: dart_pivot_norm must be > 0, got {dart_pivot_norm!r}")
        _check_llm_supported(family, llm, llm_layer)
        family.check(llm, llm_layer)
    compress_vit = vit_retain is not None and vit_retain < 1.0
    tower_path = find_tower_path(model, family) if compress_vit else None

    uninstall(model)
    settings = Settings(llm, llm_retain, llm_layer, (("image_pivots", dart_image_pivots),
                                                      ("text_pivots", dart_text_pivots), ("norm_p", dart_pivot_norm)))
    inst = Installation(family, settings, vit_config, tower_path=tower_path)
    try:
        if compress_vit:
            import ipcv_compile

            tower = _get_path(model, tower_path)
            cfg = (vit_config.replace(retain=vit_retain) if vit_config is not None else IPCVConfig(retain=vit_retain))
            # the feature layer the VLM reads from the tower on every call (LLaVA: -2), captured now
            feature = getattr(model.config, "vision_feature_layer", None)
            opts = {"feature_layers": feature} if feature is not None else {}
            inst.original_tower = tower
            _set_path(model, tower_path, ipcv_compile.rewrite(tower, cfg, **opts))
        if llm is not None:
            if llm == "fastv":
                base = family.text_config._attn_implementation
                name = _attention.register(base)
                inst.original_attn = base
                model.set_attn_implementation({_text_config_key(model): name})
            _install_hooks(inst)
    except BaseException:
        setattr(model, _ATTR, inst)
        uninstall(model)
        raise
    setattr(model, _ATTR, inst)
    return model


def _check_llm_supported(family: LLMFamily, llm: str, layer: int) -> None:
    cfg = family.text_config
    impl = cfg._attn_implementation
    if impl not in _attention.BASES and not str(impl).startswith("ipcv_fastv_"):
        raise NotImplementedError(
            f"LLM-side pruning supports the attention implementations {_attention.BASES} (masks it can slice); "
            f"this model uses {impl!r}")
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(family.layers)
    bad = [i for i, t in enumerate(types) if i >= layer - 1 and t != "full_attention"]
    if bad:
        raise NotImplementedError(f"LLM-side pruning needs full-attention decoder layers from K-1 on; layers {bad} are "
                                  f"{sorted({types[i] for i in bad})}")


# --------------------------------------------------------------------------------------------- hooks
def _cache_of(kwargs: Dict[str, Any]):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _state(kwargs: Dict[str, Any]) -> Optional[PruneState]:
    cache = _cache_of(kwargs)
    return cache.prune_state if isinstance(cache, LLMPruneCache) else None


def _install_hooks(inst: Installation) -> None:
    fam, st_cfg = inst.family, inst.settings
    K = st_cfg.layer
    layers = fam.layers
    inst.handles.append(fam.inner.register_forward_pre_hook(_setup_hook(fam, st_cfg), with_kwargs=True))
    inst.handles.append(fam.inner.register_forward_hook(_finish_hook, with_kwargs=True))
    if st_cfg.method == "fastv":
        inst.handles.append(layers[K - 1].register_forward_pre_hook(_fastv_sink_hook, with_kwargs=True))
    inst.handles.append(layers[K].register_forward_pre_hook(_prune_hook(fam, st_cfg), with_kwargs=True))
    for i in range(K + 1, len(layers)):
        inst.handles.append(layers[i].register_forward_pre_hook(_follow_hook, with_kwargs=True))


def _setup_hook(fam: LLMFamily, s: Settings):
    def hook(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a later forward of the same call: the state is already in the cache
        if isinstance(cache, LLMPruneCache):
            cache.prune_state = None  # an emptied / reused cache starts a new call
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.dim() != 2:
            return None
        mask2d = kwargs.get("attention_mask")
        mask2d = mask2d if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None
        spans = fam.spans({**kwargs, "input_ids": ids, "attention_mask": mask2d})
        B, L = ids.shape
        last = torch.full((B,), L - 1, dtype=torch.long, device=ids.device)
        if mask2d is not None:  # the last prompt token of every row (left padding: L - 1)
            ar = torch.arange(L, device=ids.device).expand(B, L)
            last = torch.where(mask2d.bool().to(ids.device), ar, -1).amax(dim=1).clamp_min(0)
        # the last prompt token is always kept (the next-token logits come from it)
        spans = [[(st, n - 1) if st + n - 1 == int(last[r]) else (st, n) for st, n in row] for r, row in enumerate(spans)]
        spans = [[(st, n) for st, n in row if n > 0] for row in spans]
        if not any(spans):
            return None
        if cache is not None and not isinstance(cache, LLMPruneCache) and type(cache) is not DynamicCache:
            raise NotImplementedError(
                f"LLM-side pruning needs a DynamicCache (generate's default; cache_implementation None or 'dynamic'), "
                f"got {type(cache).__name__}")
        ephemeral = False
        if cache is None:
            cache = LLMPruneCache(config=fam.text_config)
            ephemeral = kwargs.get("use_cache") is False
            kwargs = {**kwargs, "cache": cache}
            kwargs.pop("past_key_values", None)
        else:
            LLMPruneCache.adopt(cache)
        cache.prune_state = PruneState(method=s.method, retain=s.retain, layer=s.layer, spans=spans,
                                       prefill_length=L, last_index=last, options=dict(s.options),
                                       ephemeral=ephemeral)
        return args, kwargs

    return hook


def _finish_hook(module, args, kwargs, output):
    st = _state(kwargs)
    if st is not None:
        st.current = {}
        st.fastv_scores = None
        if st.ephemeral and "cache" in output:
            output["cache"] = None
    return output


def _fastv_sink_hook(module, args, kwargs):
    st = _state(kwargs)
    if st is None or st.pruned:
        return None
    return args, {**kwargs, _attention.SINK_KWARG: st}


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _select(fam: LLMFamily, st: PruneState, hidden: torch.Tensor, cache: LLMPruneCache) -> None:
    B, L = hidden.shape[:2]
    opts = st.options
    if st.method == "dart":
        keys = cache.layers[st.layer - 1].keys            # (B, Hkv, L, d), after RoPE
        keys = keys.permute(0, 2, 1, 3).reshape(B, L, -1)
        with torch.no_grad():
            states = fam.final_norm(hidden)
    else:
        if st.fastv_scores is None:
            raise RuntimeError("FastV: layer K-1 recorded no attention row (was the attention implementation "
                               "changed after compress()?)")
        scores = st.fastv_scores
    keeps = []
    for r in range(B):
        visual = torch.zeros(L, dtype=torch.bool, device=hidden.device)
        for s0, n in st.spans[r]:
            visual[s0:s0 + n] = True
        parts = [(~visual).nonzero().flatten()]
        for s0, n in st.spans[r]:
            k = span_budget(n, st.retain)
            if st.method == "dart":
                after = (~visual).clone()
                after[: s0 + n] = False
                text = after.nonzero().flatten()
                if text.numel() == 0:
                    text = (~visual).nonzero().flatten()
                parts.append(dart_keep(keys[r], states[r], (s0, n), text, k, opts["image_pivots"],
                                       opts["text_pivots"], opts["norm_p"]))
            else:
                parts.append(fastv_keep(scores[r], (s0, n), k))
        keeps.append(torch.cat(parts).sort().values)
    st.keep_index, st.keep_valid = keep_index(keeps, device=hidden.device)
    st.fastv_scores = None


def _slice_positions(kwargs: Dict[str, Any], index: torch.Tensor, L: int) -> Dict[str, Any]:
    out = {}
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(gather_tokens(t, index, dim=1) for t in pe)
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.shape[-1] == L:
        if pid.dim() == 2:
            out["position_ids"] = gather_tokens(pid, index, dim=1)
        elif pid.dim() == 3:  # (3, B, L) M-RoPE ids
            out["position_ids"] = torch.stack([gather_tokens(p, index, dim=1) for p in pid])
    return out


def _prune_hook(fam: LLMFamily, s: Settings):
    def hook(module, args, kwargs):
        st = _state(kwargs)
        if st is None:
            return None
        cache = _cache_of(kwargs)
        hidden = _hidden(args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise NotImplementedError(f"LLM-side pruning slices 4-D attention masks; got {type(mask).__name__} "
                                      f"{getattr(mask, 'shape', '')}")
        if not st.pruned:  # the prefill: select, then slice everything token-shaped
            if hidden.shape[1] != st.prefill_length:
                raise RuntimeError(f"prefill of {hidden.shape[1]} tokens, expected {st.prefill_length}")
            _select(fam, st, hidden, cache)
            cur = _slice_positions(kwargs, st.keep_index, st.prefill_length)
            cur["attention_mask"] = prefill_mask(mask, st.keep_index, st.keep_valid)
            hidden = gather_tokens(hidden, st.keep_index, dim=1)
        else:  # a later forward: new tokens are all kept; only the mask's key columns change
            q = hidden.shape[1]
            total = cache.get_seq_length(0)  # layer 0 already holds this forward's tokens
            entries = cache.layers[st.layer].get_seq_length() + q
            expected = st.keep_index.shape[1] + total - st.prefill_length
            if entries != expected:
                raise RuntimeError(f"pruned layer {st.layer} would hold {entries} entries, expected {expected}")
            cur = {"attention_mask": decode_mask(mask, st.keep_index, st.keep_valid, st.prefill_length, q, total)}
        st.current = cur
        args, kwargs = _with_hidden(args, kwargs, hidden)
        return args, {**kwargs, **cur}

    return hook


def _follow_hook(module, args, kwargs):
    st = _state(kwargs)
    if st is None or not st.current:
        return None
    return args, {**kwargs, **st.current}
