"""AFP: Zhang, Mao, Chi, Wang, Zhang, Liu, Jin, Rao, "Knowledge distillation with adaptive frequency
prompting", The Computer Journal 68(11):1785–1797, 2025. Spec: docs/methods.md §9 (abstract only: [INTERP]).

AFP = FreeKD-P (§7.3, §7.5) with

* a hierarchical feature fusion (HFF) aligner: the ReviewKD ABF cascade (§4.2, :class:`ReviewFusion`) over
  the student's multi-level features, producing teacher-shaped maps in place of ``φ(F^s)``;
* adaptive prompts: per-sample token weights ``π = softmax_τ(Conv1×1_{C→T}(GAP(Conv3×3_{C→C}(R))))`` mix the
  token masks, ``m = Σ_τ π_τ σ(M_τ)`` (FreeKD's unused ``MaskModule.prob`` branch, switched on);
* ``LL_J`` distilled too, ``J = min(levels, ⌊log2(min(H,W))⌋)`` per map.

The loss, :func:`afp_loss`, is here; the machinery shared with FreeKD is in kdbench: the Haar DWT and band
sets (:mod:`kdbench.freq`), the prompts (:mod:`kdbench.prompts`), the masked band L1 and the stage-1
dissimilarities (:mod:`kdbench.prompt_losses`), the gates (:mod:`kdbench.channel_gates`), the base class with
the stage (:mod:`kdbench.prompt_distiller`, :mod:`kdbench.prompt_stage`) and the ABF cascade
(:mod:`kdbench.fusion`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from kdbench.channel_gates import next_level_context
from kdbench.freq import autocast_disabled, band_sets
from kdbench.fusion import ReviewFusion
from kdbench.method import Batch, Outputs, register_method
from kdbench.prompt_distiller import PromptDistiller
from kdbench.prompt_losses import masked_band_l1
from kdbench.prompts import PromptSet, TokenMix, mixed_mask, prompt_masks

__all__ = ["afp_loss", "AdaptivePromptSet", "AFP"]


def afp_loss(feat_s: Tensor, feat_t: Tensor, prompts: Sequence[Tensor], levels: int, token_mix: TokenMix, *,
             channel_weights: Tensor | None = None) -> Tensor:
    """AFP's adaptively masked frequency L1 for one feature map (§9), in fp32.

    ``feat_s`` = ``HFF(F^s)`` and ``feat_t`` = ``F^t`` (same ``N×C×H×W``); ``prompts``: ``levels + 1`` token
    tensors ``(T, C)``, set 0 for ``LL_J``. For every band set ``k = 0..J`` (``LL_J``, then the high bands of
    each level) with teacher guide ``R_k``, the mask is ``m_k = Σ_τ π_τ σ(P_k·R_k)_τ`` with ``π =
    token_mix(k, R_k)`` (``N×T``), and::

        L = Σ_k mean_{n,c,o,y,x} ω[n,c]·m_k·|S_{k,o} − T_{k,o}|

    ``channel_weights`` ω (``N×C``) are the §7.5 gates ω^(r) (1 when None).
    """
    if feat_s.shape != feat_t.shape or feat_s.dim() != 4:
        raise ValueError(f"afp_loss: student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} must be "
                         "equal N×C×H×W")
    if len(prompts) != levels + 1:
        raise ValueError(f"afp_loss: {len(prompts)} prompt sets for {levels} levels (need LL + {levels})")
    with autocast_disabled(feat_t.device):
        sets_s, sets_t = band_sets(feat_s, levels), band_sets(feat_t, levels)
        total = feat_s.new_zeros((), dtype=torch.float32)
        for k, prompt in enumerate(prompts):
            guide = sets_t[k].sum(dim=2)
            mask = mixed_mask(prompt_masks(prompt, guide), token_mix(k, guide), keepdim=True)
            total = total + masked_band_l1(sets_s[k], sets_t[k], mask, channel_weights)
    return total


class AdaptivePromptSet(PromptSet):
    """A :class:`PromptSet` whose tokens are mixed per sample (§9 "adaptive prompt").

    ``π(R) = softmax_τ(Conv1×1_{C→T}(GAP(Conv3×3_{C→C, pad 1}(R))))`` from the set's teacher guide ``R``
    (``LL_J`` or ``LH_j+HL_j+HH_j``); the mask is ``Σ_τ π_τ σ(M_τ)``, in the stage-1 reconstruction and in the
    distillation loss. One π branch per map, shared by its J+1 band sets (FreeKD's ``MaskModule`` has one
    ``prob`` per map), convs initialised ``N(0, 2/fan_out)`` with zero bias as that code.
    """

    def __init__(self, channels: int, num_tokens: int = 2, levels: int = 3, init_std: float = 0.01):
        super().__init__(channels, num_tokens, levels, init_std)
        self.prob = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, num_tokens, kernel_size=1),
        )
        for m in self.prob.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def token_mix(self, k: int, guide: Tensor) -> Tensor:
        """``π`` for band set ``k``: ``N×T``, rows summing to 1."""
        with autocast_disabled(guide.device):
            return torch.softmax(self.prob(guide.float()).flatten(1), dim=1)


_AFP_MU = {"classification": 1.0, "detection": 10.0}


@register_method("afp")
class AFP(PromptDistiller):
    """Zhang et al., "Knowledge distillation with adaptive frequency prompting", Computer Journal 2025.
    docs/methods.md §9 ([INTERP]: FreeKD-P + ABF hierarchical fusion + adaptive token weights).

    ``L = ce_weight·CE + mu·Σ_l Σ_{k=0..J_l} mean(ω^(r)_l · m_{l,k} · |HFF(F^s)_{l,k} − F^t_{l,k}|)``

    * HFF: :class:`ReviewFusion` over the student maps (processed deep→shallow), outputs at the teacher's
      channels and (run-time) resolution; ``mid = min(512, C_deepest)``.
    * ``m_{l,k}``: adaptive masks of the frozen stage-1 :class:`AdaptivePromptSet` of map ``l`` on the teacher
      band set ``k`` (``LL_J`` included); ``ω^(r)_l``: the §7.5 relational gates (mean 1 per sample).
    * Detection with a ``"reg"`` tap on both networks: ``loss_reg = reg_weight·reg_kd_loss`` (else skipped).

    Taps (``tap="auto"``): classification ``"stages"`` of both networks (post-ReLU, so the teacher's stage
    modules can host the stage-1 prompts), paired deepest-aligned; detection ``"fpn"``. Maps too small for a
    DWT level (``J_l = 0``) get no loss. ``mu=None``: 1 for classification, 10 for detection (FCOS, §9).
    ``num_tokens=2`` (FreeKD paper's T). Stage 1 as FreeKD's (§7.4): tokens and π trained on the frozen teacher
    for ``stage_iters`` steps with ``L_task + dis_weight·L_dis``.
    """

    tasks = frozenset({"classification", "detection"})
    heterogeneous = True
    citation = ("Zhang et al., Knowledge distillation with adaptive frequency prompting, Computer Journal 2025 "
                "(docs/methods.md §9)")
    version = 2
    default_taps = {"classification": "stages", "detection": "fpn"}
    prompt_set = AdaptivePromptSet
    cap_levels = True  # J_l = min(levels, ⌊log2(min(H, W))⌋): classifier maps are small (§9)

    def __init__(
        self,
        ctx,
        *,
        mu: float | None = None,
        ce_weight: float = 1.0,
        reg_weight: float = 1.0,
        num_tokens: int = 2,
        levels: int = 3,
        tap: str = "auto",
        stage_iters: int = 2000,
        stage_lr: float = 1e-3,
        stage_optimizer: str = "adam",
        stage_seed: int = 0,
        dissimilarity: str = "dice",
        dis_weight: float = 1.0,
    ):
        super().__init__(ctx, num_tokens=num_tokens, levels=levels, tap=tap, reg_weight=reg_weight,
                         stage_iters=stage_iters, stage_lr=stage_lr, stage_optimizer=stage_optimizer,
                         stage_seed=stage_seed, dissimilarity=dissimilarity, dis_weight=dis_weight)
        self.mu = float(_AFP_MU.get(ctx.task, 1.0) if mu is None else mu)
        self.task_loss_weight = float(ce_weight)
        self.hff = ReviewFusion(
            in_channels=[sh[0] for sh in self.s_shapes],
            out_channels=self.t_channels,
            shapes=[sh[1:] for sh in self.s_shapes],
            out_shapes=[sh[1:] for sh in self.t_shapes],
        )
        self.gates = self.relational_gates()

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        self.check_stage()
        feats_s, ft = s[self.tap], self.teacher_maps(t)
        outs = [o.float() for o in self.hff([feats_s[i] for i in self.s_index], [f.shape[-2:] for f in ft])]
        ctx_s, ctx_t = next_level_context(outs), next_level_context(ft)
        total = outs[0].new_zeros((), dtype=torch.float32)
        for i, k in self.prompted:
            w = self.gates[k](outs[i], ft[i], ctx_s[i], ctx_t[i])
            ps = self.prompts[k]
            total = total + afp_loss(outs[i], ft[i], list(ps.tokens), ps.levels, ps.token_mix, channel_weights=w)
        return {"loss_afp": self.mu * total, **self.reg_terms(s, t)}
