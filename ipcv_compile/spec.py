"""Declarative description of a ViT's structure, supplied by the caller or an adapter.

The compiler never names a model: it finds blocks, attention and FFN through
``node.meta["nn_module_stack"]`` using the module paths given here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class LocateSpec:
    """Where things are, as module paths relative to the captured module.

    Attributes:
        blocks: path of the block list (``"blocks"``, ``"encoder.layer"``); block ``i`` is
            ``f"{blocks}.{i}"``.
        attention: path of the attention module inside a block (``"attn"``, ``"attention"``).
        ffn: path of the FFN module inside a block (``"mlp"``, ``"feed_forward"``).
        hidden_input: name of the graph input that carries the token embeddings entering block 0
            (a placeholder name as in the captured graph), or None to use the value consumed by
            block 0 whose shape equals block 0's output.
        token_dim: dimension of the hidden states that indexes tokens (1 for ``(B, N, D)``,
            0 for packed ``(N, D)`` towers such as Qwen2-VL).
        side_inputs: optional override ``{placeholder name: token dims}`` for per-token side inputs;
            by default they are detected as values used by the blocks whose shape contains the
            token-count symbol.
        windowed_blocks: blocks whose attention stays within the attention windows of a packed
            layout (``SegmentLayout.windows``; Qwen2.5-VL's non-full-attention blocks).
    """

    blocks: str
    attention: str
    ffn: str
    hidden_input: Optional[str] = None
    token_dim: int = 1
    side_inputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    windowed_blocks: Tuple[int, ...] = ()

    def block_path(self, i: int) -> str:
        return f"{self.blocks}.{i}"
