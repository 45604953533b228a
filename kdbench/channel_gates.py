"""The relational channel gates of FreeKD-P and AFP (docs/methods.md §7.5): per-sample channel weights
``ω^(r)`` of the masked frequency loss, learned with the student.

* :func:`relational_attention`: ``A = softmax_rowwise(ψ(F)·Fᵀ)``, ``N×C×C``;
* :func:`next_level_context`: ``ψ(F_l)``, the next (coarser) map of the pyramid resized to ``F_l``;
* :func:`renormalise_gates`: gates rescaled to mean 1 over channels per sample;
* :class:`ChannelGate`: the MLP gate on the rows of A; :class:`RelationalGates`: the teacher's and the
  student's gates and their renormalised product.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.freq import autocast_disabled


def relational_attention(feat: Tensor, context: Tensor) -> Tensor:
    """``A_n = softmax_rowwise(ψ(F)_n F_nᵀ)`` (contraction over HW, no 1/√d): ``N×C×C`` in fp32.
    ``feat`` = F and ``context`` = ψ(F), both ``N×C×H×W``."""
    if feat.shape != context.shape:
        raise ValueError(f"relational_attention: F {tuple(feat.shape)} and ψ(F) {tuple(context.shape)} differ")
    with autocast_disabled(feat.device):
        f, p = feat.float().flatten(2), context.float().flatten(2)
        return torch.softmax(p @ f.transpose(1, 2), dim=-1)


def renormalise_gates(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """Rescale ``N×C`` gates to mean 1 over channels per sample (§7.5, against collapse to 0)."""
    return weights / (weights.mean(dim=1, keepdim=True) + eps)


def next_level_context(feats: Sequence[Tensor]) -> list[Tensor]:
    """ψ(F_l) for each map of a shallow→deep list (§7.5): the next (coarser) map bilinearly resized to F_l's
    size when it has the same channels (FPN); otherwise, and for the last map, F_l itself."""
    out = []
    for i, f in enumerate(feats):
        nxt = feats[i + 1] if i + 1 < len(feats) else None
        if nxt is not None and nxt.shape[1] == f.shape[1]:
            out.append(F.interpolate(nxt.float(), size=f.shape[-2:], mode="bilinear", align_corners=False))
        else:
            out.append(f)
    return out


class ChannelGate(nn.Module):
    """The MLP gate G of §7.5 on every row of A: ``ω_i = σ(w2·ReLU(W1·A_i + b1) + b2)``, hidden
    ``D = max(C/16, 8)``. ``N×C×C -> N×C``."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(int(channels) // 16, 8)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, attn: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(attn)).squeeze(-1)


class RelationalGates(nn.Module):
    """``ω^(r) = renorm(G_t(A(F^t)) ⊙ G_s(A(φ(F^s))))`` (§7.5): separate teacher and student gates,
    trained with the student; the product is renormalised to mean 1 over channels per sample."""

    def __init__(self, channels: int):
        super().__init__()
        self.teacher_gate = ChannelGate(channels)
        self.student_gate = ChannelGate(channels)

    def forward(self, feat_s: Tensor, feat_t: Tensor, context_s: Tensor, context_t: Tensor) -> Tensor:
        with autocast_disabled(feat_s.device):
            w_t = self.teacher_gate(relational_attention(feat_t, context_t))
            w_s = self.student_gate(relational_attention(feat_s, context_s))
            return renormalise_gates(w_t * w_s)
