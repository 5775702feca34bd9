"""The ``--model_args`` of the ipcv lmms-eval models, parsed and validated before any weight is loaded
(no lmms-eval import: tested in the main suite).

    pretrained=PATH,retain=0.35,method=ipcv,llm=dart,llm_retain=0.35,llm_layer=2,k=10,...

* ``retain``: the vision tower's retain ratio, in (0, 1] (default 0.35; 1.0: the tower is left as it is).
* ``method``: what runs in the vision tower —
  ``ipcv`` (the paper; any :class:`~ipcv_core.IPCVConfig` field may be given too: ``k=8``,
  ``prune_layer=3``, ``selection=stratified``, ...), ``random`` (IPCV with a seeded random keep set),
  ``tome`` (ToMe as a graph rewrite: bipartite soft matching on the attention keys between attention
  and FFN of every block, size-weighted merge with proportional attention, ToMe's copy-unmerge at the
  end — :func:`ipcv_core.search.merge_family_config` with ``placement="post_attention"``,
  ``reconstruction="copy"``), ``dart_vit`` (DART(ViT) at ``prune_layer``: pivots by the block's key L1
  norm, then the tokens least similar to them — the selection rule ``"dart"`` of :mod:`ipcv_core.rules` —
  later blocks on the kept rows only (``as_depth=0``), every removed token a copy of its nearest kept
  token's final value, nearest by cosine of the block's keys (``reconstruction="copy"``, ``k=1``)),
  ``tofu`` (ToFu as a graph rewrite: ToMe's matching and schedule, the stages in the first third of the
  blocks drop their matched tokens, later ones merge with MLERP — ``merge="tofu"``), ``none`` (the tower
  unchanged: the LLM-only rows such as DART), or the path of a config JSON written by ``ipcv tune`` (its own
  ``retain``).
* ``llm``: ``none`` | ``dart`` | ``fastv`` (LLM-side pruning, :func:`ipcv_adapters.compress`);
  ``llm_retain`` (default: ``retain``) and ``llm_layer`` (default 2, the paper's K).
* ``ipcv_stats``: a path; when given, every generated sample's cost record is appended there (JSON lines).

Every bad value raises ``ValueError`` naming the argument and what it accepts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ipcv_core.config import IPCVConfig

__all__ = ["EvalOptions", "parse_options", "OUR_ARGS", "VIT_METHODS", "LLM_METHODS", "DART_VIT"]

VIT_METHODS = ("ipcv", "tome", "tofu", "dart_vit", "random", "none")
LLM_METHODS = ("none", "dart", "fastv")
#: the gradual-merging baselines: method -> the merge rule of their every-block schedule
MERGE_METHODS = {"tome": "average", "tofu": "tofu"}
OUR_ARGS = ("retain", "method", "llm", "llm_retain", "llm_layer", "ipcv_stats")
#: DART(ViT) in the library's variant rules (``prune_layer`` etc. may be given beside ``method=dart_vit``)
DART_VIT = dict(selection="dart", reconstruction="copy", as_depth=0, k=1)
# IPCVConfig fields that a comma-separated --model_args cannot carry (use a config JSON path)
_STRUCTURED = ("stages", "extras")


def _bad(name: str, allowed: str, got: Any) -> ValueError:
    return ValueError(f"ipcv lmms-eval model: --model_args {name} must be {allowed}, got {got!r}")


def _ratio(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or not 0.0 < float(v) <= 1.0:
        raise _bad(name, "a number in (0, 1]", v)
    return float(v)


@dataclass(frozen=True)
class EvalOptions:
    """Validated options; :meth:`vit_config` builds the tower's configuration once its depth is known."""

    method: str = "ipcv"                    # one of VIT_METHODS, or "config" (config_path set)
    retain: float = 1.0
    llm: Optional[str] = None               # None | "dart" | "fastv"
    llm_retain: float = 1.0
    llm_layer: int = 2
    fields: Tuple[Tuple[str, Any], ...] = ()  # IPCVConfig fields given on the command line
    config_path: Optional[str] = None
    config: Optional[IPCVConfig] = None     # the tuned config read from config_path
    stats_path: Optional[str] = None

    @property
    def compresses_vit(self) -> bool:
        return self.method != "none" and self.retain < 1.0

    def vit_config(self, depth: int) -> Optional[IPCVConfig]:
        """The tower's IPCVConfig (None: leave the tower as it is)."""
        if not self.compresses_vit:
            return None
        f = dict(self.fields)
        if self.method == "config":
            return self.config.replace(**f) if f else self.config
        if self.method == "ipcv":
            return IPCVConfig(retain=self.retain, **f)
        if self.method == "random":
            return IPCVConfig(retain=self.retain, **{"selection": "random", **f})
        if self.method == "dart_vit":
            return IPCVConfig(retain=self.retain, **{**DART_VIT, **f})
        # tome / tofu: gradual merging from block 0, as a graph rewrite
        from ipcv_core.search import merge_family_config

        cfg = merge_family_config(self.retain, depth, first=0, k=1, merge=MERGE_METHODS[self.method],
                                  placement="post_attention", reconstruction="copy")
        return cfg.replace(**f) if f else cfg

    def describe(self) -> Dict[str, Any]:
        return {"method": self.method if self.method != "config" else self.config_path, "retain": self.retain,
                "llm": self.llm or "none", "llm_retain": self.llm_retain if self.llm else None,
                "llm_layer": self.llm_layer if self.llm else None, **dict(self.fields)}


def parse_options(kwargs: Dict[str, Any]) -> EvalOptions:
    """Take our arguments (and IPCVConfig fields) out of ``kwargs`` (modified in place: what is left belongs to
    the lmms-eval wrapper) and validate them."""
    names = set(IPCVConfig.field_names()) - {"retain"}
    method = kwargs.pop("method", "ipcv")
    retain_given = "retain" in kwargs
    retain = kwargs.pop("retain", 0.35)
    llm = kwargs.pop("llm", "none")
    llm_retain = kwargs.pop("llm_retain", None)
    llm_layer = kwargs.pop("llm_layer", 2)
    stats = kwargs.pop("ipcv_stats", None)
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in names}

    for k in _STRUCTURED:
        if k in fields:
            raise _bad(k, "given in a config JSON (method=PATH): a comma-separated --model_args cannot carry it",
                       fields[k])
    if not isinstance(method, str):
        raise _bad("method", f"one of {VIT_METHODS} or the path of an IPCVConfig JSON", method)
    config = None
    path = None
    m = method.strip().lower()
    if m in VIT_METHODS:
        method = m
    elif method.endswith(".json") or os.path.exists(method):
        if not os.path.isfile(method):
            raise _bad("method", f"one of {VIT_METHODS} or the path of an existing IPCVConfig JSON", method)
        try:
            config = IPCVConfig.from_json(method)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"ipcv lmms-eval model: --model_args method={method!r}: not a valid IPCVConfig JSON: {e}") from e
        path, method = method, "config"
        if retain_given and _ratio("retain", retain) != config.retain:
            raise _bad("retain", f"left out or equal to the config's own retain {config.retain} (method={path})", retain)
        retain = config.retain
    else:
        raise _bad("method", f"one of {VIT_METHODS} or the path of an IPCVConfig JSON", method)
    retain = _ratio("retain", retain)

    if llm is None or (isinstance(llm, str) and llm.strip().lower() == "none"):
        llm = None
    elif isinstance(llm, str) and llm.strip().lower() in LLM_METHODS:
        llm = llm.strip().lower()
    else:
        raise _bad("llm", f"one of {LLM_METHODS}", llm)
    if llm_retain is None:
        llm_retain = retain
    else:
        llm_retain = _ratio("llm_retain", llm_retain)
        if llm is None and llm_retain != 1.0:
            raise _bad("llm_retain", "left out when llm=none (nothing is pruned in the language model)", llm_retain)
    if isinstance(llm_layer, bool) or not isinstance(llm_layer, int) or llm_layer < 1:
        raise _bad("llm_layer", "an int >= 1 (and < the number of decoder layers)", llm_layer)
    if stats is not None and not isinstance(stats, str):
        raise _bad("ipcv_stats", "a file path", stats)
    if method == "dart_vit":
        for k in sorted(set(fields) & {"selection", "reconstruction"}):
            if fields[k] != DART_VIT[k]:
                raise _bad(k, f"left out with method=dart_vit (DART(ViT) is {k}={DART_VIT[k]!r})", fields[k])
    # the fields themselves: IPCVConfig validates them (its message names the field)
    try:
        probe = IPCVConfig(retain=retain, **{**(DART_VIT if method == "dart_vit" else {}), **fields})
    except TypeError as e:
        raise ValueError(f"ipcv lmms-eval model: --model_args: {e}") from e
    except ValueError as e:
        raise ValueError(f"ipcv lmms-eval model: --model_args {e}") from e
    del probe
    if fields and method == "none":
        raise _bad(sorted(fields)[0], "left out with method=none (the tower is not compressed)", fields[sorted(fields)[0]])
    return EvalOptions(method=method, retain=retain, llm=llm, llm_retain=llm_retain, llm_layer=llm_layer,
                       fields=tuple(sorted(fields.items())), config_path=path, config=config, stats_path=stats)

