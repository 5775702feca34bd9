"""Model knowledge for LLM-side pruning: where a VLM keeps its vision tower, language model, decoder
layers and final norm, and where the visual tokens of every image / video frame sit in a prompt.

A family is found from the model's class (:func:`find_family`); add one by subclassing
:class:`LLMFamily` and decorating it with :func:`register_family`.  Spans are never found from
hard-coded token ids: they come from the model config (``image_token_id`` / ``video_token_id``) and,
for video frames, from ``video_grid_thw`` or the M-RoPE temporal positions.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

__all__ = ["LLMFamily", "register_family", "find_family", "families", "supported_models", "UnsupportedVLMError",
           "token_runs"]

Span = Tuple[int, int]


class UnsupportedVLMError(TypeError):
    """No registered family recognises the model."""


def token_runs(hit: torch.Tensor) -> List[Span]:
    """Maximal runs of True in a 1-D bool tensor as ``(start, length)``."""
    if hit.numel() == 0 or not bool(hit.any()):
        return []
    x = torch.nn.functional.pad(hit.to(torch.int8), (1, 1))
    d = x[1:] - x[:-1]
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class LLMFamily:
    """What ``compress`` needs to know about one family of ``...ForConditionalGeneration`` models.

    Subclasses set ``model_classes`` (class names, matched on the MRO) and ``tower_path`` (dotted
    attribute of the vision tower), and implement :meth:`spans`.  The defaults fit HF's layout
    ``model.model.language_model.{layers,norm}`` with the setup hook on ``model.model`` (the module whose
    forward sees ``input_ids``, ``attention_mask``, ``position_ids`` and the cache)."""

    model_classes: Tuple[str, ...] = ()
    tower_path: str = ""
    inner_path: str = "model"
    language_model_path: str = "model.language_model"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        names = {k.__name__ for k in type(model).__mro__}
        return any(c in names for c in cls.model_classes)

    # ------------------------------------------------------------------ modules
    @staticmethod
    def _get(obj: Any, path: str) -> Any:
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    @staticmethod
    def _set(obj: Any, path: str, value: Any) -> None:
        *head, last = path.split(".")
        for part in head:
            obj = getattr(obj, part)
        setattr(obj, last, value)

    @property
    def inner(self) -> nn.Module:
        return self._get(self.model, self.inner_path)

    @property
    def language_model(self) -> nn.Module:
        return self._get(self.model, self.language_model_path)

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def text_config(self):
        return self.model.config.get_text_config(decoder=True)

    def get_tower(self) -> nn.Module:
        return self._get(self.model, self.tower_path)

    def set_tower(self, tower: nn.Module) -> None:
        self._set(self.model, self.tower_path, tower)

    def check(self, llm: str, layer: int) -> None:
        """Raise, saying why, when ``llm`` pruning from decoder layer ``layer`` cannot be installed on
        this model (beyond what :func:`~.install.compress` checks for every family)."""

    # ------------------------------------------------------------------ spans
    def spans(self, inputs: Dict[str, Any]) -> List[List[Span]]:
        """Per batch row, the ``(start, n)`` spans of visual tokens (one per image / video frame), in
        positions of the padded prompt.  ``inputs`` are the keyword arguments of the setup module's forward
        (``input_ids``, ``attention_mask``, ``position_ids``, grids, ...)."""
        raise NotImplementedError


_FAMILIES: List[Type[LLMFamily]] = []


def register_family(cls: Type[LLMFamily]) -> Type[LLMFamily]:
    if not (isinstance(cls, type) and issubclass(cls, LLMFamily)) or not cls.model_classes:
        raise TypeError(f"register_family expects an LLMFamily subclass with model_classes, got {cls!r}")
    if cls in _FAMILIES:
        _FAMILIES.remove(cls)
    _FAMILIES.insert(0, cls)
    return cls


def families() -> Tuple[Type[LLMFamily], ...]:
    return tuple(_FAMILIES)


def supported_models() -> List[str]:
    """The ``...ForConditionalGeneration`` class names LLM-side pruning supports."""
    return sorted(c for f in _FAMILIES for c in f.model_classes)


def find_family(model: nn.Module) -> LLMFamily:
    for cls in _FAMILIES:
        if cls.matches(model):
            return cls(model)
    raise UnsupportedVLMError(
        f"LLM-side pruning does not know {_class_name(model)}; supported: {supported_models()}. Add a family: subclass "
        "ipcv_adapters.llm.LLMFamily (tower_path, spans) and decorate it with @ipcv_adapters.llm.register_family."
    )


def _valid_rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(device=input_ids.device).bool()


def _split_by_counts(runs: List[Tuple[int, Span]], counts: List[List[int]], what: str) -> List[Tuple[int, Span]]:
    """Cut the runs (row, (start, n)), in row-major order, into consecutive pieces: entry ``i`` of
    ``counts`` (one list of piece lengths per image / video) consumes its total from the runs."""
    out: List[Tuple[int, Span]] = []
    queue = list(runs)
    for pieces in counts:
        need = sum(pieces)
        if not queue:
            raise ValueError(f"more {what} grids than {what} token runs in input_ids")
        row, (start, n) = queue.pop(0)
        if n < need:
            raise ValueError(f"a run of {n} {what} tokens is shorter than its grid ({need} tokens)")
        if n > need:  # several entries back to back in one run
            queue.insert(0, (row, (start + need, n - need)))
        s = start
        for p in pieces:
            out.append((row, (s, p)))
            s += p
    if queue:
        raise ValueError(f"{what} token runs left over after consuming every {what} grid")
    return out


@register_family
class Qwen2VLFamily(LLMFamily):
    """Qwen2-VL and Qwen2.5-VL: images are runs of ``image_token_id`` (one image = one span), videos runs
    of ``video_token_id`` cut into frames of ``h·w / merge²`` tokens per temporal patch, from
    ``video_grid_thw`` when the forward gets it, else from the M-RoPE temporal positions (``generate``
    encodes the visual inputs before the prefill and passes 3-D ``position_ids`` instead)."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    tower_path = "model.visual"

    def spans(self, inputs: Dict[str, Any]) -> List[List[Span]]:
        ids = inputs["input_ids"]
        cfg = self.model.config
        valid = _valid_rows(ids, inputs.get("attention_mask"))
        merge = int(cfg.vision_config.spatial_merge_size)
        out: List[List[Span]] = [[] for _ in range(ids.shape[0])]
        # images: every run is one image (Qwen2VLModel.get_rope_index consumes one grid per run too)
        img_runs = [(r, s) for r in range(ids.shape[0]) for s in token_runs((ids[r] == cfg.image_token_id) & valid[r])]
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            img_runs = _split_by_counts(img_runs, [[int(t * h * w) // merge ** 2] for t, h, w in grid.tolist()], "image")
        for r, s in img_runs:
            out[r].append(s)
        # videos: cut every run into frames
        vid_runs = [(r, s) for r in range(ids.shape[0]) for s in token_runs((ids[r] == cfg.video_token_id) & valid[r])]
        vgrid = inputs.get("video_grid_thw")
        pos = inputs.get("position_ids")
        if vgrid is not None:
            frames = _split_by_counts(vid_runs, self.video_pieces(vgrid, merge), "video")
        elif pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4):
            temporal = pos[-3]  # (B, L): rows 1.. of the 4-row generate positions / row 0 of 3-row ones
            frames = []
            for r, (start, n) in vid_runs:
                t = temporal[min(r, temporal.shape[0] - 1), start:start + n]
                cuts = [0] + ((t[1:] != t[:-1]).nonzero().flatten() + 1).tolist() + [n]
                frames += [(r, (start + a, b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
        else:  # no grid, no 3-D positions: one span per video
            frames = vid_runs
        for r, s in frames:
            out[r].append(s)
        for row in out:
            row.sort()
        return out

    def video_pieces(self, vgrid: torch.Tensor, merge: int) -> List[List[int]]:
        """Per video token run (in order), the frame lengths it holds: Qwen2-VL / Qwen2.5-VL put a
        whole video in one run."""
        return [[int(h * w) // merge ** 2] * int(t) for t, h, w in vgrid.tolist()]


@register_family
class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL and Qwen3.5: as Qwen2-VL, except that every temporal patch of a video is its own run
    of ``video_token_id`` (the processor puts a timestamp between frames), and Qwen3-VL's *deepstack*
    adds the tower's intermediate features to the visual positions of the hidden states after
    decoder layers ``0 .. len(deepstack_visual_indexes) - 1``: those layers must see every visual
    token, so ``llm_layer`` must be at least that count.  Qwen3.5's linear-attention (Gated
    DeltaNet) decoder layers cannot skip tokens: pruning needs full attention from layer K-1 on."""

    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration")

    def video_pieces(self, vgrid: torch.Tensor, merge: int) -> List[List[int]]:
        return [[int(h * w) // merge ** 2] for t, h, w in vgrid.tolist() for _ in range(int(t))]

    def check(self, llm: str, layer: int) -> None:
        deepstack = getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ()
        if layer < len(deepstack):
            raise ValueError(
                f"compress: llm_layer must be >= {len(deepstack)} for {type(self.model).__name__}: its deepstack adds "
                f"visual features to the hidden states of every visual token after decoder layers 0..{len(deepstack) - 1} "
                f"(vision_config.deepstack_visual_indexes = {list(deepstack)}), so {llm} may prune from layer "
                f"{len(deepstack)} on; got {layer}")


@register_family
class InternVLFamily(LLMFamily):
    """InternVL (HF-native ``InternVLForConditionalGeneration``): every run of ``image_token_id`` is one
    image (all its tiles; the chat template wraps each image in ``<img> … </img>``), one span."""

    model_classes = ("InternVLForConditionalGeneration",)
    tower_path = "model.vision_tower"

    def spans(self, inputs: Dict[str, Any]) -> List[List[Span]]:
        ids = inputs["input_ids"]
        valid = _valid_rows(ids, inputs.get("attention_mask"))
        tok = self.model.config.image_token_id
        return [token_runs((ids[r] == tok) & valid[r]) for r in range(ids.shape[0])]


@register_family
class LlavaFamily(LLMFamily):
    """LLaVA (``LlavaForConditionalGeneration``, LLaVA-1.5) and LLaVA-OneVision: every run of
    ``image_token_id`` is one image (OneVision: all its AnyRes tiles and newline tokens), and every
    run of ``video_token_id`` one video (OneVision), one span each."""

    model_classes = ("LlavaForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
    tower_path = "model.vision_tower"

    def spans(self, inputs: Dict[str, Any]) -> List[List[Span]]:
        ids = inputs["input_ids"]
        valid = _valid_rows(ids, inputs.get("attention_mask"))
        cfg = self.model.config
        toks = [t for t in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if t is not None]
        out = []
        for r in range(ids.shape[0]):
            row = []
            for tok in toks:
                row += token_runs((ids[r] == tok) & valid[r])
            out.append(sorted(row))
        return out
