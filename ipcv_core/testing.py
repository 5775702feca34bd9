"""A small synthetic pre-norm ViT block stack, for tests, examples and the compiler's own checks.

Options: CLS token(s), LayerScale, 2-D rotary embeddings (cos/sin per token, as in Qwen2-VL),
fused or separate q/k/v, GELU or gated (SwiGLU) FFN, LayerNorm or RMSNorm, and packed multi-segment
input with a block-diagonal boolean mask.

``SyntheticViT.forward(hidden_states, cos=None, sin=None, attn_mask=None)`` is the plain stack
(+ an optional final norm); ``SyntheticViT.branches(cos, sin)`` gives the same blocks as
:class:`ipcv_core.driver.Block` objects for the eager driver (bound to this call's side inputs; the
module itself keeps no per-call state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .driver import AttnContext, Branches
from .segments import SegmentLayout, segment_ids, segment_mask

__all__ = ["ViTSpec", "SyntheticViT", "rope_tables", "make_inputs", "rotate_half"]


@dataclass(frozen=True)
class ViTSpec:
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    layerscale: bool = False
    rotary: bool = False
    fused_qkv: bool = True
    ffn: str = "gelu"  # or "gated"
    norm: str = "layer"  # or "rms"
    final_norm: bool = True


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    if kind == "rms":
        return RMSNorm(dim)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


def _rows(t: Optional[torch.Tensor], pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-token table ``(N, E)`` -> rows at ``pos (B, L)`` as ``(B, 1, L, E)`` (or ``(1, 1, N, E)``)."""
    if t is None:
        return None
    if pos is None:
        return t.unsqueeze(0).unsqueeze(0) if t.dim() == 2 else t.unsqueeze(1)
    if t.dim() == 2:
        return t[pos].unsqueeze(1)
    return torch.gather(t, 1, pos.unsqueeze(-1).expand(*pos.shape, t.shape[-1])).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.heads = spec.heads
        self.head_dim = spec.dim // spec.heads
        self.fused = spec.fused_qkv
        if self.fused:
            self.qkv = nn.Linear(spec.dim, 3 * spec.dim)
        else:
            self.q_proj = nn.Linear(spec.dim, spec.dim)
            self.k_proj = nn.Linear(spec.dim, spec.dim)
            self.v_proj = nn.Linear(spec.dim, spec.dim)
        self.proj = nn.Linear(spec.dim, spec.dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos=None, sin=None, mask=None):
        return self.rows(x, x, AttnContext(mask=mask), cos, sin)

    def rows(self, x_q, x_kv, ctx: AttnContext, cos=None, sin=None):
        B, Lq, D = x_q.shape
        if self.fused:
            Lkv = x_kv.shape[1]
            qkv = self.qkv(x_kv).view(B, Lkv, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if ctx.q_in_kv is not None:
                idx = ctx.q_in_kv[:, None, :, None].expand(B, self.heads, Lq, self.head_dim)
                q = torch.gather(q, 2, idx)
        else:
            q = self._split_heads(self.q_proj(x_q))
            k = self._split_heads(self.k_proj(x_kv))
            v = self._split_heads(self.v_proj(x_kv))
        if cos is not None:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            cq, sq = _rows(cos, ctx.q_pos), _rows(sin, ctx.q_pos)
            ck, sk = _rows(cos, ctx.kv_pos), _rows(sin, ctx.kv_pos)
            q = q * cq + rotate_half(q) * sq
            k = k * ck + rotate_half(k) * sk
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.sdpa_mask(q.dtype))
        o = o.transpose(1, 2).reshape(B, Lq, D)
        return self.proj(o)


class FFN(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        hidden = int(spec.dim * spec.mlp_ratio)
        self.gated = spec.ffn == "gated"
        if spec.ffn not in ("gelu", "gated"):
            raise ValueError(f"ffn must be 'gelu' or 'gated', got {spec.ffn!r}")
        if self.gated:
            self.gate_proj = nn.Linear(spec.dim, hidden)
            self.up_proj = nn.Linear(spec.dim, hidden)
            self.down_proj = nn.Linear(hidden, spec.dim)
        else:
            self.fc1 = nn.Linear(spec.dim, hidden)
            self.fc2 = nn.Linear(hidden, spec.dim)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 0.5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class SyntheticBlock(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.norm1 = _norm(spec.norm, spec.dim)
        self.attn = Attention(spec)
        self.ls1 = LayerScale(spec.dim) if spec.layerscale else nn.Identity()
        self.norm2 = _norm(spec.norm, spec.dim)
        self.mlp = FFN(spec)
        self.ls2 = LayerScale(spec.dim) if spec.layerscale else nn.Identity()

    def forward(self, x, cos=None, sin=None, mask=None):
        x = x + self.ls1(self.attn(self.norm1(x), cos, sin, mask))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x

    # driver protocol pieces (bound to side inputs by SyntheticViT.branches)
    def attention_branch(self, x_q, x_kv, ctx: AttnContext, cos=None, sin=None):
        return self.ls1(self.attn.rows(self.norm1(x_q), self.norm1(x_kv), ctx, cos, sin))

    def ffn_branch(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def key_features(self, x, pos=None, cos=None, sin=None):
        """Attention keys of rows ``x`` as the attention core sees them (rotary at the rows'
        original positions ``pos (B, L)``, None = ``0..L-1``, when ``cos``/``sin`` are given),
        averaged over heads: ``(B, L, head_dim)``."""
        a, n = self.attn, self.norm1(x)
        B, L, D = n.shape
        k = a.qkv(n)[..., D : 2 * D] if a.fused else a.k_proj(n)
        k = k.view(B, L, a.heads, a.head_dim).transpose(1, 2)
        if cos is not None:
            ck, sk = _rows(cos.to(k.dtype), pos), _rows(sin.to(k.dtype), pos)
            k = k * ck + rotate_half(k) * sk
        return k.mean(1)


class SyntheticViT(nn.Module):
    """Block stack of a pre-norm ViT (input: token embeddings; output: final hidden states)."""

    def __init__(self, spec: ViTSpec = ViTSpec(), seed: int | None = 0):
        super().__init__()
        self.spec = spec
        if seed is not None:
            g = torch.random.get_rng_state()
            torch.manual_seed(seed)
        self.blocks = nn.ModuleList([SyntheticBlock(spec) for _ in range(spec.depth)])
        self.norm = _norm(spec.norm, spec.dim) if spec.final_norm else nn.Identity()
        if seed is not None:
            # non-trivial norm / bias parameters, so tests notice a missing one
            with torch.no_grad():
                for n, p in self.named_parameters():
                    if n.endswith("bias") or "norm" in n or "gamma" in n:
                        p.add_(0.1 * torch.randn_like(p))
            torch.random.set_rng_state(g)

    def forward(self, hidden_states, cos=None, sin=None, attn_mask=None):
        h = hidden_states
        for blk in self.blocks:
            h = blk(h, cos, sin, attn_mask)
        return self.norm(h)

    def branches(self, cos=None, sin=None) -> List[Branches]:
        """The blocks for :func:`ipcv_core.driver.run_ipcv`, bound to this call's rotary tables."""
        out = []
        for blk in self.blocks:
            def attn(x_q, x_kv, ctx, _b=blk):
                return _b.attention_branch(x_q, x_kv, ctx, cos, sin)

            def keys(x, pos=None, _b=blk):
                return _b.key_features(x, pos, cos, sin)

            out.append(Branches(attn, blk.ffn_branch, keys))
        return out


def rope_tables(grids: Sequence[Tuple[int, int]], head_dim: int, protected: int = 0, theta: float = 10000.0):
    """2-D rotary cos/sin ``(N, head_dim)`` for segments of ``h x w`` patches (row-major), each
    preceded by ``protected`` tokens at position (0, 0).  Half the rotary dims encode the row,
    half the column (Qwen2-VL's layout)."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D rotary, got {head_dim}")
    quarter = head_dim // 4
    inv = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = [], []
    for h, w in grids:
        rows += [0] * protected
        cols += [0] * protected
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows += r.flatten().tolist()
        cols += c.flatten().tolist()
    rf = torch.tensor(rows, dtype=torch.float32)[:, None] * inv
    cf = torch.tensor(cols, dtype=torch.float32)[:, None] * inv
    ang = torch.cat([rf, cf], dim=-1)  # (N, head_dim/2)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def make_inputs(
    spec: ViTSpec,
    grids: Sequence[Tuple[int, int]],
    protected: int = 0,
    batch: int = 1,
    packed: bool = True,
    seed: int = 0,
    dtype=torch.float32,
):
    """Random token embeddings with a given segment structure.

    ``packed=True``: one row holding ``len(grids)`` segments (block-diagonal mask when > 1).
    ``packed=False``: ``grids`` must hold one grid; ``batch`` rows, one segment each.
    Returns ``(hidden (B,N,D), cos, sin, attn_mask, layout)``; cos/sin are None without rotary.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [h * w + protected for h, w in grids]
    if not packed and len(grids) != 1:
        raise ValueError("packed=False takes exactly one grid")
    B = batch if not packed else 1
    N = sum(lengths)
    hidden = torch.randn(B, N, spec.dim, generator=g).to(dtype)
    cos = sin = None
    if spec.rotary:
        cos, sin = rope_tables(grids, spec.dim // spec.heads, protected)
    if packed:
        layout = SegmentLayout.packed(lengths, protected, grids)
    else:
        layout = SegmentLayout.batched(protected, grids[0])
    mask = None
    if layout.num_segments > 1:
        seg = segment_ids(layout, N).unsqueeze(0)
        mask = segment_mask(seg, seg)
    return hidden, cos, sin, mask, layout

