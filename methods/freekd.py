"""FreeKD: Zhang et al., "FreeKD: Knowledge Distillation via Semantic Frequency Prompt", CVPR 2024.

Spec: docs/methods.md §7. The loss, :func:`freekd_loss`, is here; the machinery it shares with AFP is in
kdbench: the Haar DWT and band sets of §6 (:mod:`kdbench.freq`), the prompts and their masks
(:mod:`kdbench.prompts`), the masked band L1 and the stage-1 dissimilarities (:mod:`kdbench.prompt_losses`),
the §7.5 gates (:mod:`kdbench.channel_gates`), and the base class with the stage (:mod:`kdbench.prompt_distiller`,
:mod:`kdbench.prompt_stage`). Two variants (§7.3):

* ``variant="code"`` (FreeKD-C, default): the released code: prompt-masked L1 on the high DWT bands of
  ``φ(F^s)`` vs ``F^t`` (LL not distilled) + ``μ``·MSE(``φ(F^s)``, ``F^t``) (+ RegKD for detectors).
* ``variant="paper"`` (FreeKD-P): ``μ``·masked L1 weighted by the relational channel gates of §7.5.

Both need a stage 1 (§7.4): the mask tokens are tuned on the frozen teacher (prompted reconstruction
inserted into its forward, teacher task loss + dissimilarity) and then frozen for distillation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.channel_gates import next_level_context
from kdbench.featuremap import resize_to
from kdbench.freq import autocast_disabled, band_sets
from kdbench.method import Batch, Outputs, register_method
from kdbench.prompt_distiller import PromptDistiller
from kdbench.prompt_losses import masked_band_l1
from kdbench.prompts import prompt_masks


def freekd_loss(feat_s: Tensor, feat_t: Tensor, prompts: Sequence[Tensor], levels: int, *,
                channel_weights: Tensor | None = None, low_prompt: Tensor | None = None) -> Tensor:
    """FreeKD's masked frequency L1 for one feature map (§7.2-5), in fp32.

    ``feat_s`` = ``φ(F^s)`` and ``feat_t`` = ``F^t`` (same ``N×C×H×W``); ``prompts``: one ``(T, C)`` token
    tensor per DWT level ``j = 1..levels``. With ``R_j = LH_j+HL_j+HH_j`` of the teacher and
    ``M_j = sigmoid(P_j·R_j)`` (shared by the three orientations)::

        L = Σ_j mean_{n,τ,c,o,y,x} |M_j·(S_{j,o} − T_{j,o})|

    ``LL_J`` is not distilled unless ``low_prompt`` (the set-0 tokens) is given, which adds the same term
    for ``LL_J`` with ``M_0 = sigmoid(P_0·LL_J)`` (FreeKD-P ``include_low``). ``channel_weights`` (``N×C``) are
    the §7.5 gates ω^(r).
    """
    if feat_s.shape != feat_t.shape or feat_s.dim() != 4:
        raise ValueError(f"freekd_loss: student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} must be "
                         "equal N×C×H×W")
    if len(prompts) != levels:
        raise ValueError(f"freekd_loss: {len(prompts)} prompt sets for {levels} levels")
    with autocast_disabled(feat_t.device):
        sets_s, sets_t = band_sets(feat_s, levels), band_sets(feat_t, levels)
        tokens = [(0, low_prompt)] if low_prompt is not None else []
        total = feat_s.new_zeros((), dtype=torch.float32)
        for k, prompt in tokens + list(enumerate(prompts, start=1)):
            mask = prompt_masks(prompt, sets_t[k].sum(dim=2))
            total = total + masked_band_l1(sets_s[k], sets_t[k], mask, channel_weights)
    return total


_FREEKD_MU = {"detection": 5.0, "segmentation": 5.0, "classification": 1.0}


@register_method("freekd")
class FreeKD(PromptDistiller):
    """Zhang et al., "FreeKD: Knowledge Distillation via Semantic Frequency Prompt", CVPR 2024. docs/methods.md §7.

    Per distilled map ``l``: ``S_l = φ_l(F^s_l)`` (1×1 conv with bias, bilinearly resized to the teacher's
    size if needed), masks from frozen stage-1 prompts on the teacher's bands (one ``PromptSet`` of
    ``levels + 1`` token sets per map; ``J = levels`` on every map whatever its size, the zero-padded Haar DWT
    taking any size, as the release's ``DWTForward(J=3, mode='zero')`` on all FPN levels).

    * ``variant="code"`` (§7.3 FreeKD-C): ``loss_freekd = mask_weight·Σ_l freekd_loss`` and
      ``loss_mse = mse_weight·Σ_l MSE(S_l, F^t_l)``.
    * ``variant="paper"`` (§7.3 FreeKD-P): ``loss_freekd = mse_weight·Σ_l freekd_loss(..., ω^(r)_l)`` with the
      §7.5 gates (μ is the paper's weight of the masked loss; ``mask_weight`` is not used), ``LL_J`` added with
      ``include_low``.
    * Detection with a ``"reg"`` tap on both networks: ``loss_reg = reg_weight·reg_kd_loss`` (else skipped).

    Taps (``tap="auto"``): detection ``"fpn"`` (all levels); classification ``"final"``; segmentation
    ``"final"``, the backbone's last stage (``backbone.layer4``, §7.3 [INTERP]). An explicit tap distils all its
    maps, paired deepest-aligned. ``mse_weight=None`` means μ per task: detection 5 (RetinaNet), segmentation 5,
    classification 1 (suites set the detector's value: Faster R-CNN 1, FCOS/RepPoints 10). ``num_tokens=2``
    is the paper's T (the release uses 6).

    Stage 1 (§7.4): ``stage_iters`` steps of Adam (``stage_optimizer="sgd"``: momentum 0.9) at ``stage_lr`` on
    the tokens only, objective ``L_task(teacher with F̂) + dis_weight·L_dis`` (``dissimilarity`` "dice" as the
    code or "jaccard" as the paper), tokens initialised from ``stage_seed``.
    """

    tasks = frozenset({"classification", "detection", "segmentation"})
    heterogeneous = False
    citation = "Zhang et al., FreeKD: Knowledge Distillation via Semantic Frequency Prompt, CVPR 2024 (docs/methods.md §7)"
    # 2: dissimilarity='jaccard' is (1/T²)·Σ_i Σ_j, the diagonal included (§7.1)
    # 3: J = levels on every map, as the release (maps under 2^levels pixels a side were given fewer levels)
    version = 3
    default_taps = {"detection": "fpn", "segmentation": "final", "classification": "final"}

    def __init__(
        self,
        ctx,
        *,
        variant: str = "code",
        mask_weight: float = 1.0,
        mse_weight: float | None = None,
        reg_weight: float = 1.0,
        num_tokens: int = 2,
        levels: int = 3,
        tap: str = "auto",
        include_low: bool = False,
        stage_iters: int = 2000,
        stage_lr: float = 1e-3,
        stage_optimizer: str = "adam",
        stage_seed: int = 0,
        dissimilarity: str = "dice",
        dis_weight: float = 1.0,
    ):
        if variant not in ("code", "paper"):
            raise ValueError(f"freekd: variant must be 'code' or 'paper', got {variant!r}")
        if include_low and variant != "paper":
            raise ValueError("freekd: include_low is an option of variant='paper' (the code never distils LL)")
        super().__init__(ctx, num_tokens=num_tokens, levels=levels, tap=tap, reg_weight=reg_weight,
                         stage_iters=stage_iters, stage_lr=stage_lr, stage_optimizer=stage_optimizer,
                         stage_seed=stage_seed, dissimilarity=dissimilarity, dis_weight=dis_weight)
        self.variant = variant
        self.mask_weight = float(mask_weight)
        self.mu = float(_FREEKD_MU.get(ctx.task, 1.0) if mse_weight is None else mse_weight)
        self.mse_weight = self.mu  # the resolved value, under the parameter's own name (recorded)
        self.include_low = bool(include_low)
        self.phi = nn.ModuleList(nn.Conv2d(s[0], t[0], kernel_size=1, bias=True)
                                 for s, t in zip(self.s_shapes, self.t_shapes))
        self.gates = self.relational_gates() if variant == "paper" else None

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        self.check_stage()
        feats_s, ft = s[self.tap], self.teacher_maps(t)
        proj = [resize_to(phi(feats_s[i]).float(), f.shape[-2:]) for phi, i, f in zip(self.phi, self.s_index, ft)]
        out: dict[str, Tensor] = {}
        if self.variant == "code":
            mask = sum(freekd_loss(proj[i], ft[i], self.prompts[k].level_prompts(), self.prompts[k].levels)
                       for i, k in self.prompted)
            out["loss_freekd"] = self.mask_weight * mask
            out["loss_mse"] = self.mu * sum(F.mse_loss(p, f) for p, f in zip(proj, ft))
        else:
            ctx_s, ctx_t = next_level_context(proj), next_level_context(ft)
            total = proj[0].new_zeros((), dtype=torch.float32)
            for i, k in self.prompted:
                w = self.gates[k](proj[i], ft[i], ctx_s[i], ctx_t[i])
                ps = self.prompts[k]
                total = total + freekd_loss(proj[i], ft[i], ps.level_prompts(), ps.levels, channel_weights=w,
                                            low_prompt=ps.low_prompt if self.include_low else None)
            out["loss_freekd"] = self.mu * total
        return {**out, **self.reg_terms(s, t)}
