"""Token merging as pure tensor functions: ToMe's bipartite soft matching and the merge operators
used by ToMe and ToFu, with size and source tracking so merged sequences can be unmerged.

Sources (methods, not code): ToMe — Bolya et al., *Token Merging: Your ViT but Faster*, ICLR 2023;
ToFu — Kim et al., *Token Fusion: Bridging the Gap between Token Pruning and Token Merging*, WACV 2024.

Shapes: hidden states ``(B, L, D)`` (``L`` = current number of tokens), all rows of a batch hold the
same number of tokens (every row merges the same count ``r``), but each row picks its own pairs.
The first ``protected`` tokens of every row (CLS, registers) never take part in matching: they are
neither merged away nor merged into.

Matching (one step, ``r`` merges): the prunable tokens are split alternately into sets A (even
positions) and B (odd positions); each A token is linked to its most similar B token (cosine of the
metric, ToMe uses the attention keys averaged over heads); the ``r`` A tokens with the most similar
partner are merged into that partner.  Hence ``r <= |A| = ceil(n/2)``; following ToMe we cap
``r`` at ``n // 2`` (at most half of the prunable tokens per step).  Ties go to the lower A index.

After a step the token list is ``[protected, unmerged A (ascending), B]`` (ToMe keeps the unmerged
A tokens in similarity order; ascending order is used here so the layout is easy to reason about —
attention is permutation-equivariant, so this changes nothing but the A/B split of later steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "merge_rows",
    "merge_wavg",
    "merge_mlerp",
    "merge_prune",
    "mlerp",
    "new_positions",
    "MergeTracker",
]


@dataclass(frozen=True)
class Matching:
    """One merge step.  Local indices: ``src``/``unm`` index set A, ``dst`` index set B.

    Attributes:
        src: ``(B, r)`` A tokens merged away, in order of decreasing similarity.
        dst: ``(B, r)`` the B token each of them is merged into.
        unm: ``(B, |A| - r)`` A tokens kept, ascending.
        protected: leading tokens excluded from matching.
        n_a, n_b: sizes of sets A and B.
    """

    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor
    protected: int
    n_a: int
    n_b: int

    @property
    def r(self) -> int:
        return self.src.shape[1]

    @property
    def out_len(self) -> int:
        return self.protected + self.n_a - self.r + self.n_b


def _split(x: torch.Tensor, protected: int):
    p = x[:, protected:]
    return x[:, :protected], p[:, 0::2], p[:, 1::2]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Matching:
    """ToMe's bipartite soft matching on ``metric (B, L, C)``; ``r`` is capped at ``n // 2``.

    Returns the :class:`Matching` (no tensors are merged here)."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, L, C), got shape {tuple(metric.shape)}")
    B, L, _ = metric.shape
    n = L - protected
    if n < 0:
        raise ValueError(f"{L} tokens, fewer than the {protected} protected ones")
    r = max(0, min(int(r), n // 2))
    _, a, b = _split(metric.float(), protected)
    n_a, n_b = a.shape[1], b.shape[1]
    dev = metric.device
    if r == 0:
        empty = torch.zeros(B, 0, dtype=torch.long, device=dev)
        return Matching(empty, empty, torch.arange(n_a, device=dev).expand(B, n_a), protected, n_a, n_b)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = a @ b.transpose(1, 2)  # (B, nA, nB)
    node_max, node_idx = scores.max(dim=-1)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    unm = torch.sort(order[:, r:], dim=-1).values
    dst = torch.gather(node_idx, 1, src)
    return Matching(src, dst, unm, protected, n_a, n_b)


def merge_rows(x: torch.Tensor, m: Matching, reduce: str = "sum") -> torch.Tensor:
    """Apply a matching to rows ``x (B, L, E)``: ``reduce`` = ``"sum"``, ``"amax"``, ``"mean"``
    (sources combined into their destination) or ``"drop"`` (sources discarded).
    Returns ``(B, L - r, E)`` ordered ``[protected, unmerged A, B]``."""
    prot, a, b = _split(x, m.protected)
    unm = _take(a, m.unm)
    if m.r and reduce != "drop":
        src = _take(a, m.src)
        idx = m.dst.unsqueeze(-1).expand(*m.dst.shape, x.shape[-1])
        b = b.scatter_reduce(1, idx, src, reduce=reduce, include_self=True)
    return torch.cat([prot, unm, b], dim=1)


def _received(m: Matching, like: torch.Tensor) -> torch.Tensor:
    """``(B, n_b, 1)`` bool: B tokens that receive at least one source in this step."""
    rec = torch.zeros(like.shape[0], m.n_b, dtype=torch.bool, device=like.device)
    if m.r:
        rec = rec.scatter(1, m.dst, True)
    return rec.unsqueeze(-1)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, m: Matching):
    """Size-weighted average merge (ToMe): ``x' = sum(s_i x_i) / sum(s_i)``, sizes add.

    ``x (B, L, D)``, ``size (B, L, 1)`` -> ``(x', size')``.  Preserves ``sum_i s_i x_i`` over the row."""
    s = size.to(x.dtype)
    xs = merge_rows(x * s, m, "sum")
    s2 = merge_rows(s, m, "sum")
    return xs / s2, merge_rows(size, m, "sum")


def mlerp(avg: torch.Tensor, max_norm: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """MLERP (ToFu): the direction of the (size-weighted) average, rescaled to ``max_norm``."""
    return avg / avg.norm(dim=-1, keepdim=True).clamp_min(eps) * max_norm


def merge_mlerp(x: torch.Tensor, size: torch.Tensor, m: Matching):
    """ToFu's norm-preserving merge: each merged group gets the direction of its size-weighted
    average and the largest norm among the merged tokens (our reading of the paper's MLERP: plain
    averaging shrinks the norm of non-parallel tokens, MLERP restores it).  Tokens that receive
    nothing in this step are returned unchanged.  Sizes add, as in ToMe."""
    avg, new_size = merge_wavg(x, size, m)
    max_norm = merge_rows(x.norm(dim=-1, keepdim=True), m, "amax")
    out = merge_rows(x, m, "drop")  # untouched rows stay bit-identical
    head = m.protected + m.n_a - m.r
    tail = torch.where(_received(m, x), mlerp(avg[:, head:], max_norm[:, head:]), out[:, head:])
    return torch.cat([out[:, :head], tail], dim=1), new_size


def merge_prune(x: torch.Tensor, size: torch.Tensor, m: Matching):
    """ToFu's pruning step: the matched source tokens are dropped (their destination is kept as it
    is, size unchanged); for unmerging, a dropped token maps to its destination."""
    return merge_rows(x, m, "drop"), merge_rows(size, m, "drop")


def new_positions(m: Matching, batch: int, device=None) -> torch.Tensor:
    """``(B, L)``: the index, after the step, of the token each current token ends up in."""
    P, n_a, n_b, r = m.protected, m.n_a, m.n_b, m.r
    keep_a = n_a - r
    pos_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
    pos_a.scatter_(1, m.unm, torch.arange(P, P + keep_a, device=device).expand(batch, keep_a))
    if r:
        pos_a.scatter_(1, m.src, m.dst + P + keep_a)
    pos_b = torch.arange(P + keep_a, P + keep_a + n_b, device=device).expand(batch, n_b)
    out = torch.empty(batch, P + n_a + n_b, dtype=torch.long, device=device)
    out[:, :P] = torch.arange(P, device=device)
    out[:, P::2] = pos_a
    out[:, P + 1 :: 2] = pos_b
    return out


class MergeTracker:
    """Sizes, source assignment and representatives of a row set being merged step by step.

    * ``size (B, L, 1)``: original tokens each current token stands for (dropped ones excluded).
    * ``assign (B, N)``: for each *original* token, the current token it is in (unmerge map).
    * ``rep (B, L)``: the original position each current token started from (the token that was
      never merged away); original tokens that are no one's representative were merged away or
      dropped.
    """

    def __init__(self, batch: int, n_tokens: int, device=None, dtype=torch.float32):
        self.size = torch.ones(batch, n_tokens, 1, device=device, dtype=dtype)
        self.assign = torch.arange(n_tokens, device=device).expand(batch, n_tokens).clone()
        self.rep = self.assign.clone()
        self.n_tokens = n_tokens
        self.merged_any = False

    def step(self, x: torch.Tensor, m: Matching, mode: str = "wavg") -> torch.Tensor:
        """Apply ``m`` to ``x`` with ``mode`` in ``wavg`` (ToMe), ``mlerp`` (ToFu merge), ``prune``
        (ToFu prune); update the tracking state and return the merged rows."""
        if m.r == 0:
            return x
        B = x.shape[0]
        if mode == "wavg":
            x, self.size = merge_wavg(x, self.size, m)
        elif mode == "mlerp":
            x, self.size = merge_mlerp(x, self.size, m)
        elif mode == "prune":
            x, self.size = merge_prune(x, self.size, m)
        else:
            raise ValueError(f"merge mode must be 'wavg', 'mlerp' or 'prune', got {mode!r}")
        self.assign = torch.gather(new_positions(m, B, x.device), 1, self.assign)
        self.rep = merge_rows(self.rep.unsqueeze(-1), m, "drop").squeeze(-1)
        self.merged_any = True
        return x

    def attention_bias(self, dtype) -> torch.Tensor | None:
        """Proportional attention: ``log(size)`` added to the logits of every key, ``(B,1,1,L)``;
        None while nothing has been merged (all sizes are 1)."""
        if not self.merged_any:
            return None
        return self.size.to(dtype).log().transpose(1, 2).unsqueeze(1)

    def removed_mask(self) -> torch.Tensor:
        """``(B, N)`` bool: original tokens that are no current token's representative."""
        B = self.rep.shape[0]
        keep = torch.zeros(B, self.n_tokens, dtype=torch.bool, device=self.rep.device)
        return ~keep.scatter(1, self.rep, True)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, D) -> (B, N, D)``: every original token gets the value of the token it is in."""
        return _take(x, self.assign)
