"""CWD: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.

Spec: docs/methods.md §2 (spatial CWD) and §8 (DWT-CWD, FreeKD supplementary Table 10).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdbench.featuremap import FeatureMapDistiller, map_loss
from kdbench.freq import autocast_disabled
from kdbench.method import register_method

# Default loss weight per task (docs/methods.md §2): mmrazor's FPN (per level) and segmentation-logits settings.
# Classification has no reference setting; kdbench uses the feature-map (FPN) weight on the "final" map.
DEFAULT_WEIGHT = {"detection": 10.0, "segmentation": 5.0, "classification": 10.0}


def cwd_loss(feat_s: Tensor, feat_t: Tensor, tau: float) -> Tensor:
    """Channel-wise distillation loss (docs/methods.md §2), in fp32 with autocast off.

    Each (n, c) map of ``N×C×H×W`` becomes a softmax over its ``H·W`` positions at temperature ``tau``;
    ``L = τ² / (N·C) · Σ_{n,c,i} φ(T)·(log φ(T) − log φ(S))``: KL summed over positions, averaged over
    samples and channels. Shapes must match exactly (adapt/resize the student first).
    """
    if feat_s.shape != feat_t.shape:
        raise ValueError(f"cwd_loss: student {tuple(feat_s.shape)} != teacher {tuple(feat_t.shape)}")
    if feat_s.dim() < 3:
        raise ValueError(f"cwd_loss: needs N×C×(spatial...) maps, got shape {tuple(feat_s.shape)}")
    if not tau > 0:
        raise ValueError(f"cwd_loss: tau must be > 0, got {tau!r}")
    n, c = feat_s.shape[:2]
    with autocast_disabled(feat_s.device):
        s = feat_s.float().flatten(2) / tau
        t = feat_t.float().flatten(2) / tau
        log_ps = F.log_softmax(s, dim=-1)
        log_pt = F.log_softmax(t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        return kl * (tau * tau) / (n * c)


def dwt_cwd_loss(feat_s: Tensor, feat_t: Tensor, tau: float, levels: int) -> Tensor:
    """DWT-CWD (docs/methods.md §8): :func:`cwd_loss` summed over the ``3·levels`` Haar high bands
    (LH, HL, HH of levels 1..J; the low band is excluded). The student is resized bilinearly to the
    teacher's spatial size first when they differ; channels must match."""
    return map_loss(feat_s, feat_t, lambda s, t: cwd_loss(s, t, tau), "dwt", levels, "dwt_cwd_loss")


@register_method("cwd")
class CWD(FeatureMapDistiller):
    """Channel-wise distillation, Shu et al. ICCV 2021. docs/methods.md §2, §8.

    For every tapped level, a spatial softmax per channel (temperature ``tau``) of the teacher map is
    matched by the student's via KL; one loss per level, summed, times ``weight``.

    * ``tap="auto"``: ``"fpn"`` (detection, all levels), ``"logits"`` (segmentation, N×K×H×W),
      ``"final"`` (classification). Any tap whose tensors are ``N×C×H×W`` works.
    * ``weight=None`` means the task default: 10 (detection, per FPN level), 5 (segmentation logits),
      10 (classification, ``final`` map: no reference setting exists; the feature-map weight is used).
    * ``domain="dwt"``: DWT-CWD over the 3·``dwt_levels`` Haar high bands of each level (§8).
    * ``max_levels``: distil only the first (shallowest) ``max_levels`` levels of the tap; None = all.
    * A student 1×1 conv adapter (with bias) per level where channels differ. A student map whose
      spatial size differs from the teacher's is resized bilinearly to it (after the adapter).
    """

    tasks = frozenset({"classification", "detection", "segmentation"})
    version = 1
    heterogeneous = True
    citation = "Shu et al., Channel-wise Knowledge Distillation for Dense Prediction, ICCV 2021 (docs/methods.md §2, §8)"
    loss_name = "loss_cwd"
    default_taps = {"detection": "fpn", "segmentation": "logits", "classification": "final"}
    adapter_bias = True

    def __init__(
        self,
        ctx,
        *,
        tau: float = 1.0,
        weight: float | None = None,
        domain: Literal["spatial", "dwt"] = "spatial",
        dwt_levels: int = 3,
        tap: str = "auto",
        max_levels: int | None = None,
    ):
        if not tau > 0:
            raise ValueError(f"cwd: tau must be > 0, got {tau!r}")
        if weight is None:
            if ctx.task not in DEFAULT_WEIGHT:
                raise ValueError(f"cwd: no default weight for task {ctx.task!r}; pass weight=")
            weight = DEFAULT_WEIGHT[ctx.task]
        super().__init__(ctx, weight=weight, domain=domain, dwt_levels=dwt_levels, tap=tap, max_levels=max_levels)
        self.tau = float(tau)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return cwd_loss(s, t, self.tau)
