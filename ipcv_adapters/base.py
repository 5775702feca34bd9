"""The adapter protocol: everything the compiler and the eager driver need to know about one tower.

An adapter (a :class:`TowerAdapter` subclass, registered with :func:`register_adapter`) says

* **which towers** it handles (``tower_classes``, dotted class names, matched along the MRO, so
  transformers is imported only when a tower is actually given);
* **where things are** (``spec``, a :class:`ipcv_compile.LocateSpec` relative to :meth:`block_stack`);
* **segments** (``packed``: one row holding several segments — Qwen2-VL, one per image / video
  frame — else one segment per batch row; and ``protected`` leading tokens, e.g. CLS);
* an **exportable block stack** (:meth:`block_stack`): a small ``nn.Module`` that runs the tower's own
  block modules on ``(hidden_states, *side_inputs)`` — per-token side inputs such as rotary
  ``cos``/``sin`` and a block-diagonal bool mask are plain tensor inputs;
* the **data-dependent preparation** outside the graph (:meth:`prepare`: patch embedding, rotary
  tables, ``cu_seqlens`` -> :class:`SegmentLayout` + mask), giving a :class:`Prepared`;
* the **finishing step** (:meth:`finish`: final norm / PatchMerger / pooler) producing the tower's
  original output type;
* **eager branches** (:meth:`branches`) implementing ipcv_core's ``Block`` protocol — the oracle the
  rewritten graph is tested against, and the path for serving engines that cannot export.

Adapters keep no per-call state: everything a call needs travels in its :class:`Prepared`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ipcv_compile.spec import LocateSpec
from ipcv_core.config import PAPER_DEFAULTS, IPCVConfig
from ipcv_core.driver import Block
from ipcv_core.schedule import Schedule
from ipcv_core.segments import SegmentLayout

__all__ = [
    "Prepared",
    "TowerAdapter",
    "OutputRequest",
    "pop_output_request",
    "attention_shell",
    "shells",
    "class_path",
]


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class OutputRequest:
    """What the caller asked for besides ``last_hidden_state`` (HF's ``return_dict`` /
    ``output_hidden_states`` / ``output_attentions`` conventions).

    ``hidden_states``: the entries of HF's ``hidden_states`` tuple requested, as indices into its
    ``depth + 1`` entries (0 = the blocks' input, ``i`` = the output of block ``i - 1``); empty = no
    tuple.  Entries of blocks after the prune point are IPCV's reconstruction at that block (the
    full sequence restored by NGR), one reconstruction per entry."""

    return_dict: bool = True
    hidden_states: Tuple[int, ...] = ()
    depth: int = 0

    @property
    def taps(self) -> Tuple[int, ...]:
        """The intermediate blocks whose outputs the block stack must return for the request."""
        return tuple(sorted({i - 1 for i in self.hidden_states if 1 <= i < self.depth}))


def pop_output_request(kwargs: Dict[str, Any], config, depth: int) -> OutputRequest:
    """Pop HF's output flags from ``kwargs``.

    ``output_hidden_states``: ``True`` (every entry: one NGR reconstruction per block at or after
    the prune point), or the index / list of indices a consumer reads — transformers 5 passes the
    VLM's ``vision_feature_layer`` (LLaVA's ``-2``, InternVL's ``-1``): one reconstruction each.
    Attention maps are not available.
    """
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    if kwargs.pop("output_attentions", None):
        raise NotImplementedError(
            "output_attentions is not available from an IPCV-rewritten tower (attention maps of pruned "
            "blocks do not cover all tokens); call the original tower for attention maps"
        )
    hs = kwargs.pop("output_hidden_states", None)
    if hs is None:
        hs = bool(getattr(config, "output_hidden_states", False))
    if hs is False:
        return OutputRequest(bool(return_dict), (), depth)
    if hs is True:
        sel = list(range(depth + 1))
    else:
        sel = [hs] if isinstance(hs, int) else list(hs)
    idx = []
    for i in sel:
        if not isinstance(i, int) or isinstance(i, bool) or not -(depth + 1) <= i <= depth:
            raise ValueError(f"output_hidden_states / feature layer {i!r}: must be an index into the {depth + 1} "
                             f"hidden states, in [-{depth + 1}, {depth}]")
        idx.append(i % (depth + 1))
    return OutputRequest(bool(return_dict), tuple(sorted(set(idx))), depth)


@dataclass
class Prepared:
    """One call's inputs to the block stack, and what :meth:`TowerAdapter.finish` needs.

    Attributes:
        hidden: the residual stream entering block 0, in the tower's layout (``(B, N, D)``, or packed
            ``(N, D)`` for Qwen2-VL).
        side: further positional inputs of the block stack (rotary cos/sin, mask), in order.
        layout: the segment layout of ``hidden`` (packed lengths, protected prefix).
        request: the caller's output flags.
        context: anything else ``finish`` needs (e.g. ``grid_thw``); per call, never stored.
    """

    hidden: torch.Tensor
    side: Tuple[torch.Tensor, ...]
    layout: SegmentLayout
    request: OutputRequest = field(default_factory=OutputRequest)
    context: Dict[str, Any] = field(default_factory=dict)

    @property
    def stack_inputs(self) -> Tuple[torch.Tensor, ...]:
        return (self.hidden, *self.side)


class TowerAdapter(ABC):
    """Base class of all adapters; see the module docstring.  One instance per tower."""

    #: short name (``"qwen2_vl"``)
    name: ClassVar[str] = ""
    #: dotted paths of the tower classes handled (subclasses match too)
    tower_classes: ClassVar[Tuple[str, ...]] = ()
    #: True: one row of several segments (per-layout graphs); False: one segment per batch row
    packed: ClassVar[bool] = False
    #: where blocks / attention / FFN are, relative to :meth:`block_stack`
    spec: ClassVar[LocateSpec]
    #: attention implementation used inside the block stack (must produce one SDPA per block)
    attn_implementation: ClassVar[str] = "sdpa"
    #: IPCV fields a config leaves ``None`` take these (clipped to the depth, :meth:`IPCVConfig.resolve`)
    default_config: ClassVar[Dict[str, int]] = dict(PAPER_DEFAULTS)

    def __init__(self, tower: nn.Module):
        self.tower = tower
        #: blocks whose outputs the model holding the tower reads on every call (a VLM's
        #: ``vision_feature_layer``, e.g. LLaVA's -2), set by ``rewrite(..., feature_layers=)`` /
        #: ``compress()`` so that the first capture already returns them
        self.feature_taps: Tuple[int, ...] = ()

    @property
    def tower_taps(self) -> Tuple[int, ...]:
        """Intermediate blocks whose outputs the tower itself needs on every call (e.g. Qwen3-VL's
        deepstack blocks)."""
        return ()

    @property
    def default_taps(self) -> Tuple[int, ...]:
        """Intermediate blocks whose outputs every call returns: :attr:`tower_taps` and the
        :attr:`feature_taps` of the model holding the tower."""
        return tuple(sorted(set(self.tower_taps) | set(self.__dict__.get("feature_taps", ()))))

    def set_feature_layers(self, layers) -> Tuple[int, ...]:
        """Record the entries of HF's ``hidden_states`` tuple (an index or a list; negative from the
        end, as a VLM's ``vision_feature_layer``) that the model holding the tower asks for on every
        call; returns the blocks tapped for them (the last block's output and the blocks' input need
        no tap)."""
        sel = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
        n = self.depth + 1
        taps = set()
        for i in sel:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"feature_layers: {i!r} is not an index into the {n} hidden states of this "
                                 f"{self.depth}-block tower; allowed: ints in [-{n}, {n - 1}]")
            j = i % n
            if 1 <= j < self.depth:
                taps.add(j - 1)
        self.feature_taps = tuple(sorted(taps))
        return self.feature_taps

    def output_request(self, kwargs: Dict[str, Any]) -> OutputRequest:
        """:func:`pop_output_request` with this tower's config and depth."""
        return pop_output_request(kwargs, self.tower.config, self.depth)

    def schedule(self, config: IPCVConfig, taps: Sequence[int] = ()) -> Schedule:
        """``config`` laid out over this tower's blocks: fields left ``None`` take
        :attr:`default_config` clipped to the depth; explicit fields that do not fit the depth raise,
        naming the field."""
        return Schedule.build(config, self.depth, self.default_config, taps)

    def resolve_config(self, config: IPCVConfig) -> IPCVConfig:
        """``config`` for this tower (:meth:`schedule`'s resolved config)."""
        return self.schedule(config).config

    # ------------------------------------------------------------------ recognition
    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        names = {class_path(c) for c in type(module).__mro__}
        return any(t in names for t in cls.tower_classes)

    # ------------------------------------------------------------------ structure
    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The tower's own block modules."""

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def protected(self) -> int:
        """Leading tokens of every segment that are never removed (CLS, registers)."""
        return 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.blocks.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.blocks.parameters()).device

    @abstractmethod
    def block_stack(self, taps: Sequence[int] = ()) -> nn.Module:
        """An exportable module ``forward(hidden_states, *side) -> hidden_states`` over the tower's
        own blocks (see :func:`attention_shell`); with ``taps`` it returns ``(hidden_states,
        *outputs of those blocks)``."""

    @abstractmethod
    def example_inputs(self) -> Tuple[Tuple[torch.Tensor, ...], Tuple[Optional[Dict[int, Any]], ...]]:
        """Example ``(hidden, *side)`` for capture, and their dynamic shapes (token dim dynamic;
        batch dim too for batched layouts)."""

    # ------------------------------------------------------------------ per call
    @abstractmethod
    def prepare(self, *args, **kwargs) -> Prepared:
        """The tower's own call signature -> block-stack inputs (data-dependent work, eager)."""

    def embed(self, pixel_values: torch.Tensor, context: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """Packed towers: the pixel-dependent part of :meth:`prepare` (the patch embedding), which a
        one-layout export (``TowerForExport``) runs in its graph while the layout-dependent side
        inputs are fixed; ``context``: a :class:`Prepared`'s context of the same layout."""
        raise NotImplementedError(f"{type(self).__name__} has no separate patch embedding")

    @abstractmethod
    def finish(self, hidden: torch.Tensor, prep: Prepared, taps: Optional[Dict[int, torch.Tensor]] = None) -> Any:
        """Block-stack output (full length, original order) -> the tower's original output type;
        ``taps``: the outputs of the tapped blocks (full length), for hidden states / deepstack."""

    @abstractmethod
    def branches(self, prep: Prepared) -> List[Block]:
        """Eager :class:`ipcv_core.Block` objects for this call (bound to its side inputs), working on
        ``(B, L, D)`` rows (a packed tower's sequence is one row)."""

    # ------------------------------------------------------------------ helpers for finish()
    def hidden_states_tuple(self, last: torch.Tensor, prep: Prepared,
                            taps: Optional[Dict[int, torch.Tensor]] = None) -> Optional[Tuple]:
        """``hidden_states`` as HF returns it: ``depth + 1`` entries (the blocks' input, then every
        block's output), the requested ones filled, the others ``None``."""
        req = prep.request.hidden_states
        if not req:
            return None
        taps = taps or {}
        entries = {0: prep.hidden, self.depth: last, **{b + 1: t for b, t in taps.items()}}
        return tuple(entries[i] if i in req else None for i in range(self.depth + 1))

    def taps_for(self, prep: Prepared) -> Tuple[int, ...]:
        """The blocks whose outputs the call needs (requested hidden states and :attr:`default_taps`)."""
        return tuple(sorted(set(prep.request.taps) | set(self.default_taps)))

    def describe(self) -> str:
        lay = "packed (one segment per image / frame)" if self.packed else "batched (one segment per row)"
        return f"{self.name}: {type(self.tower).__name__}, {self.depth} blocks, {lay}, protected={self.protected}"


# ---------------------------------------------------------------------------------------------
def module_view(module: nn.Module, children: Optional[Dict[str, nn.Module]] = None, **attrs: Any) -> nn.Module:
    """A structural copy of ``module``: a new module object whose registries (its own dicts) hold the
    same parameters, buffers and submodules, ``children`` replacing some submodules, with instance
    attributes ``attrs``.  ``module`` and its tensors are untouched; the view follows in-place
    changes of the tensors (``.data``, optimiser steps), not reassignments made after it was built."""
    c = copy.copy(module)
    object.__setattr__(c, "_parameters", dict(module._parameters))
    object.__setattr__(c, "_buffers", dict(module._buffers))
    object.__setattr__(c, "_modules", {**module._modules, **(children or {})})
    for k, v in attrs.items():
        object.__setattr__(c, k, v)
    return c


_HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def attention_shell(module: nn.Module, attn_implementation: str, memo: Optional[dict] = None) -> nn.Module:
    """A structural copy of ``module`` (:func:`module_view`, recursively) that shares every
    parameter and buffer with it, in which each submodule holding a transformers ``config`` sees a
    *copy* of that config with ``_attn_implementation = attn_implementation``.

    This selects the attention function used when the block stack is captured (SDPA, or the masked
    varlen function of :mod:`ipcv_adapters.attention`) without touching the user's tower: the
    original modules, their config and every other caller keep their attention implementation.
    Hooks are not carried over (the capture sees the bare blocks); the copy is in eval mode.
    """
    memo = {} if memo is None else memo
    children = {k: attention_shell(v, attn_implementation, memo) for k, v in module._modules.items() if v is not None}
    attrs: Dict[str, Any] = {h: OrderedDict() for h in _HOOK_REGISTRIES if h in module.__dict__}
    cfg = module.__dict__.get("config")
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
        if id(cfg) not in memo:
            cc = copy.deepcopy(cfg)
            cc._attn_implementation = attn_implementation
            memo[id(cfg)] = cc
        attrs["config"] = memo[id(cfg)]
    return module_view(module, children, training=False, **attrs)


def shells(blocks: Sequence[nn.Module], attn_implementation: str) -> nn.ModuleList:
    """:func:`attention_shell` of each block, sharing one config copy per original config."""
    memo: dict = {}
    return nn.ModuleList([attention_shell(b, attn_implementation, memo) for b in blocks])
