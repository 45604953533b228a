"""PKD: Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022.

Spec: docs/methods.md §3 (spatial PKD) and §8 (DWT-PKD, FreeKD supplementary Table 10).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.featuremap import FeatureMapDistiller, map_loss
from kdbench.method import register_method


def _standardize(x: Tensor, eps: float) -> Tensor:
    """``C×M`` view of an ``N×C×H×W`` map, standardised per channel over its ``M = N·H·W`` values:
    ``(x − μ_c) / (σ_c + eps)`` with the unbiased σ (docs/methods.md §3).

    σ is computed as ``sqrt(var)`` guarded so that a constant channel (σ = 0, e.g. a dead ReLU channel)
    gives σ = 0 and a finite gradient instead of the NaN that ``torch.std``'s backward produces there.
    """
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, keepdim=True)  # unbiased (divisor M − 1)
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return (flat - mean) / (std + eps)


def pearson_pair_loss(s: Tensor, t: Tensor, eps: float = 1e-6) -> Tensor:
    """``½·mean((Ŝ − T̂)²)`` of two same-shaped fp32 maps standardised per channel (docs/methods.md §3). With
    ``M = N·H·W < 2`` the statistics are undefined and the loss is 0 (still connected to the student's graph)."""
    if t.shape[0] * t.shape[2] * t.shape[3] < 2:
        return s.sum() * 0.0
    return 0.5 * F.mse_loss(_standardize(s, eps), _standardize(t, eps))


def pkd_loss(feat_s: Tensor, feat_t: Tensor, eps: float = 1e-6) -> Tensor:
    """Pearson-correlation distillation for one level (docs/methods.md §3), in fp32 with autocast off.

    Both maps are standardised per channel with statistics over ``(N, H, W)`` jointly (unbiased σ,
    ``eps`` added to σ), then ``L = ½·mean((Ŝ − T̂)²)``, which equals
    ``(1/C) Σ_c ((M−1)/M)(1 − r_c)`` as ``eps → 0``. The student is resized bilinearly
    (``align_corners=False``) to the teacher's size when H or W differ. With ``M = N·H·W < 2`` the
    statistics are undefined and the loss is 0 (still connected to the student's graph).
    """
    return map_loss(feat_s, feat_t, lambda s, t: pearson_pair_loss(s, t, eps), "spatial", 1, "pkd_loss")


def dwt_pkd_loss(feat_s: Tensor, feat_t: Tensor, levels: int, eps: float = 1e-6) -> Tensor:
    """DWT-PKD (docs/methods.md §8): the student is resized bilinearly to the teacher's size, both maps are
    decomposed into ``levels`` Haar levels, and each of the ``3·levels`` high bands is standardised on
    its own (per channel over ``(N, h_j, w_j)``) and scored as in :func:`pkd_loss`; band losses are
    summed. Bands with ``N·h_j·w_j == 1`` score 0 (undefined σ); the low band is excluded."""
    return map_loss(feat_s, feat_t, lambda s, t: pearson_pair_loss(s, t, eps), "dwt", levels, "dwt_pkd_loss")


@register_method("pkd")
class PKD(FeatureMapDistiller):
    """PKD, Cao et al. NeurIPS 2022. docs/methods.md §3, §8.

    Per level, student and teacher maps are standardised per channel over (N, H, W) and matched with
    ``½·MSE``; one loss per level, summed, times ``weight``.

    * ``weight=10``: mmrazor's RetinaNet/FCOS/RepPoints setting (the §8 RepPoints experiment); its Faster
      R-CNN and Swin→RetinaNet configs use 6. Used for every task (no reference for the others).
    * ``tap="auto"``: ``"fpn"`` (detection), ``"final"`` (classification, and segmentation: the backbone's
      last map, as FreeKD's segmentation baselines tap ``backbone.layer4``). Any ``N×C×H×W`` tap works.
    * ``max_levels=4``: only the first (shallowest) four levels of the tap are distilled, as mmrazor
      distils FPN outputs 0..3; None = all levels.
    * ``domain="dwt"``: DWT-PKD over the 3·``dwt_levels`` Haar high bands (§8).
    * Where channels differ, a student 1×1 conv adapter *without* bias (a bias is cancelled exactly by the
      per-channel mean subtraction); none when they match (PKD has none). A student map of another
      spatial size is resized bilinearly to the teacher's.
    """

    tasks = frozenset({"classification", "detection", "segmentation"})
    version = 1
    heterogeneous = True
    citation = (
        "Cao et al., PKD: General Distillation Framework for Object Detectors via Pearson Correlation "
        "Coefficient, NeurIPS 2022 (docs/methods.md §3, §8)"
    )
    loss_name = "loss_pkd"
    default_taps = {"detection": "fpn", "segmentation": "final", "classification": "final"}
    adapter_bias = False

    def __init__(
        self,
        ctx,
        *,
        weight: float = 10.0,
        domain: Literal["spatial", "dwt"] = "spatial",
        dwt_levels: int = 3,
        tap: str = "auto",
        max_levels: int | None = 4,
    ):
        super().__init__(ctx, weight=weight, domain=domain, dwt_levels=dwt_levels, tap=tap, max_levels=max_levels)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return pearson_pair_loss(s, t)
