"""Losses of the frequency-prompt methods (FreeKD, docs/methods.md §7; AFP, §9): pure functions over tensors.

* :func:`masked_band_l1`: the masked L1 between a student and a teacher band set (§7.2-5), the term that
  FreeKD's and AFP's losses sum over band sets;
* the stage-1 dissimilarities of the token masks (§7.4): :func:`dice_dissimilarity` (the released code) and
  :func:`jaccard_dissimilarity` (the paper), by name in :data:`DISSIMILARITIES`.

Band sets are those of :func:`kdbench.freq.band_sets` (``N×C×O×h×w``); masks are ``N×T×h×w``, one per token.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kdbench.freq import autocast_disabled


def masked_band_l1(band_s: Tensor, band_t: Tensor, mask: Tensor, channel_weights: Tensor | None = None) -> Tensor:
    """``mean_{n,τ,c,o,y,x} ω[n,c]·|M[n,τ,y,x]·(S−T)[n,c,o,y,x]|`` (§7.2-5; ω of §7.5, 1 when None), in fp32.

    ``band_s``/``band_t``: band sets ``N×C×O×h×w``; ``mask``: ``N×T×h×w`` (``T=1`` for an already combined
    mask), non-negative, so the token mean can be taken first: ``mean(M̄·|S−T|)`` with ``M̄ = mean_τ M``.
    """
    if band_s.shape != band_t.shape:
        raise ValueError(f"masked_band_l1: student band {tuple(band_s.shape)} != teacher {tuple(band_t.shape)}")
    if band_s.dim() == 4:
        band_s, band_t = band_s.unsqueeze(2), band_t.unsqueeze(2)
    n, c, _, h, w = band_s.shape
    if mask.dim() != 4 or mask.shape[0] != n or tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"masked_band_l1: mask {tuple(mask.shape)} does not fit band {tuple(band_s.shape)}")
    with autocast_disabled(band_s.device):
        diff = (band_s.float() - band_t.float()).abs()
        if channel_weights is not None:
            if tuple(channel_weights.shape) != (n, c):
                raise ValueError(f"masked_band_l1: channel weights {tuple(channel_weights.shape)} != {(n, c)}")
            diff = diff * channel_weights.float()[:, :, None, None, None]
        return (diff * mask.float().mean(dim=1)[:, None, None]).mean()


def _pairwise_offdiag_mean(values: Tensor) -> Tensor:
    """Mean of an ``N×T×T`` tensor over n and the ordered pairs i≠j (0 when T=1)."""
    t = values.shape[1]
    if t < 2:
        return values.new_zeros(())
    off = ~torch.eye(t, dtype=torch.bool, device=values.device)
    return values[:, off].mean()


def dice_dissimilarity(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Soft-Dice overlap of the token masks (§7.2-7, the code's ``dice_coeff``): for masks ``N×T×h×w``,
    ``mean_{n, i≠j} 2⟨m_i,m_j⟩ / (‖m_i‖²+‖m_j‖²)`` (``eps`` added to each squared norm). 0 when T=1."""
    m = masks.float().flatten(2)
    inner = m @ m.transpose(1, 2)  # N×T×T
    sq = (m * m).sum(-1) + eps
    return _pairwise_offdiag_mean(2.0 * inner / (sq[:, :, None] + sq[:, None, :]))


def jaccard_dissimilarity(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Soft-Jaccard overlap of the token masks (paper, §7.1/§7.4; soft form ``Σmin/Σmax`` [INTERP]): for masks
    ``N×T×h×w``, ``mean_n (1/T²) Σ_i Σ_j Σ min(m_i,m_j) / Σ max(m_i,m_j)`` over **all** ordered pairs, the
    diagonal included as the definition writes it (``eps`` added to the denominator). 1 for a single token."""
    m = masks.float().flatten(2)
    a, b = m[:, :, None], m[:, None, :]
    return (torch.minimum(a, b).sum(-1) / (torch.maximum(a, b).sum(-1) + eps)).mean()


#: the stage-1 dissimilarities by the name of the methods' ``dissimilarity`` parameter
DISSIMILARITIES: dict[str, Callable[[Tensor], Tensor]] = {"dice": dice_dissimilarity, "jaccard": jaccard_dissimilarity}
