"""Frequency prompts (FreeKD, docs/methods.md §7; AFP, §9): the learned mask tokens and the masks they make.

* :func:`prompt_masks`: ``σ(P·R)``, one mask per token, from tokens ``P`` and a band guide ``R``;
* :func:`mixed_mask`: a band set's token masks as one map (``Σ_τ M_τ``, or ``Σ_τ π_τ·M_τ`` with per-sample
  token weights π);
* :func:`prompted_reconstruction`: the prompted feature ``F̂`` of stage 1 (§7.2-7);
* :class:`PromptSet`: the tokens of one distilled map, ``J+1`` sets of ``T`` tokens (§7.2-3), with the hook
  :meth:`PromptSet.token_mix` for per-sample token weights (AFP's adaptive prompts).

A set's *guide* is the sum of its band set (:func:`kdbench.freq.band_sets`) over the orientations: ``R_j =
LH_j+HL_j+HH_j`` (§7.2-4), ``LL_J`` itself for set 0. Everything here computes in fp32 with autocast off.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from kdbench.freq import autocast_disabled, band_sets, reconstruct_from_sets
from kdbench.prompt_losses import DISSIMILARITIES

#: ``token_mix(k, R_k)``: per-sample token weights ``N×T`` for band set ``k`` with guide ``R_k``, or None
TokenMix = Callable[[int, Tensor], "Tensor | None"]


def prompt_masks(prompt: Tensor, guide: Tensor) -> Tensor:
    """``M[n,τ,y,x] = sigmoid(Σ_c P[τ,c]·R[n,c,y,x])`` for tokens ``P (T,C)`` and a band ``R (N,C,h,w)``
    (§7.2-4: no scaling, no softmax). Returns ``N×T×h×w`` in fp32."""
    if prompt.dim() != 2 or guide.dim() != 4 or prompt.shape[1] != guide.shape[1]:
        raise ValueError(f"prompt_masks: tokens {tuple(prompt.shape)} do not fit band {tuple(guide.shape)}")
    with autocast_disabled(guide.device):
        return torch.sigmoid(torch.einsum("tc,nchw->nthw", prompt.float(), guide.float()))


def mixed_mask(masks: Tensor, mix: Tensor | None, keepdim: bool = False) -> Tensor:
    """The token masks ``N×T×h×w`` of a band set as one map: ``Σ_τ π_τ·M_τ`` with per-sample weights ``mix``
    (``N×T``), ``Σ_τ M_τ`` without; ``N×h×w`` (``N×1×h×w`` with ``keepdim``)."""
    if mix is not None:
        masks = masks * mix[:, :, None, None]
    return masks.sum(dim=1, keepdim=keepdim)


def prompted_reconstruction(feat: Tensor, prompts: Sequence[Tensor], levels: int, token_mix: TokenMix | None = None
                            ) -> tuple[Tensor, list[Tensor]]:
    """FreeKD's prompted teacher feature (§7.2-7)::

        F̂ = IDWT( LL_J·Σ_τ σ(P_0·LL_J)_τ , {band_{j,o}·Σ_τ σ(P_j·R_j)_τ} )

    ``prompts``: ``levels + 1`` token tensors ``(T, C)``, set 0 for ``LL_J``; with ``token_mix`` (AFP) each
    ``Σ_τ`` is weighted by ``π_τ`` per sample. Returns ``(F̂ (N×C×H×W, fp32), [the N×T×h×w masks of sets
    0..J])``; the masks feed the dissimilarity loss.
    """
    if len(prompts) != levels + 1:
        raise ValueError(f"prompted_reconstruction: need {levels + 1} prompt sets (LL + {levels} levels), "
                         f"got {len(prompts)}")
    with autocast_disabled(feat.device):
        sets = band_sets(feat, levels)
        guides = [s.sum(dim=2) for s in sets]
        masks = [prompt_masks(p, g) for p, g in zip(prompts, guides)]
        scales = [mixed_mask(m, token_mix(k, g) if token_mix is not None else None)
                  for k, (m, g) in enumerate(zip(masks, guides))]
        return reconstruct_from_sets(sets, scales, feat.shape[-2:]), masks


class PromptSet(nn.Module):
    """The mask tokens of one distilled feature map (§7.2-3): ``tokens`` is ``(J+1)×T×C``, init N(0, 0.01²);
    set 0 is for ``LL_J``, set ``j`` for the high bands of level ``j``.

    Subclasses may weight the tokens per sample (AFP) by overriding :meth:`token_mix`; the base class
    mixes them uniformly (sum in the reconstruction; FreeKD's loss takes their mean).
    """

    def __init__(self, channels: int, num_tokens: int = 2, levels: int = 3, init_std: float = 0.01):
        super().__init__()
        if num_tokens < 1 or levels < 1 or channels < 1:
            raise ValueError(f"PromptSet: need channels, num_tokens, levels ≥ 1, got "
                             f"{channels}, {num_tokens}, {levels}")
        self.channels, self.num_tokens, self.levels = int(channels), int(num_tokens), int(levels)
        self.tokens = nn.Parameter(torch.randn(self.levels + 1, self.num_tokens, self.channels) * init_std)

    @property
    def low_prompt(self) -> Tensor:
        """The ``LL_J`` tokens (set 0), ``T×C``."""
        return self.tokens[0]

    def level_prompts(self) -> list[Tensor]:
        """The high-band tokens of levels 1..J, each ``T×C``."""
        return [self.tokens[j] for j in range(1, self.levels + 1)]

    def token_mix(self, k: int, guide: Tensor) -> Tensor | None:
        """Per-sample token weights ``N×T`` for set ``k`` (summing to 1), or None for the uniform mix."""
        return None

    def reconstruct(self, feat: Tensor, dissimilarity: str = "dice") -> tuple[Tensor, Tensor]:
        """Stage 1 (§7.4): ``(F̂, L_dis)``: :func:`prompted_reconstruction` with these tokens (and mix), and the
        dissimilarity (:data:`kdbench.prompt_losses.DISSIMILARITIES`) of each set's token masks summed over the
        J+1 sets."""
        f_hat, masks = prompted_reconstruction(feat.float(), list(self.tokens), self.levels, self.token_mix)
        return f_hat, sum(DISSIMILARITIES[dissimilarity](m) for m in masks)
