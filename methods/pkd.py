"""PKD: Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022.

Spec: METHODS.md §3 (spatial PKD) and §8 (DWT-PKD, FreeKD supplementary Table 10).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.freq import autocast_disabled, haar_high_bands
from kdbench.method import channel_adapters, Distiller, paired_map_shapes, register_method, resolve_tap, Taps

DEFAULT_TAP = {"detection": "fpn", "segmentation": "final", "classification": "final"}


def _resize_to(x: Tensor, size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _standardize(x: Tensor, eps: float) -> Tensor:
    """``C×M`` view of an ``N×C×H×W`` map, standardised per channel over its ``M = N·H·W`` values:
    ``(x − μ_c) / (σ_c + eps)`` with the unbiased σ (METHODS.md §3).

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


def _pkd_same_size(feat_s: Tensor, feat_t: Tensor, eps: float) -> Tensor:
    return 0.5 * F.mse_loss(_standardize(feat_s, eps), _standardize(feat_t, eps))


def _check(name: str, feat_s: Tensor, feat_t: Tensor) -> None:
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[:2] != feat_t.shape[:2]:
        raise ValueError(f"{name}: need N×C×H×W maps with equal N and C; got {tuple(feat_s.shape)}, "
                         f"{tuple(feat_t.shape)}")


def pkd_loss(feat_s: Tensor, feat_t: Tensor, eps: float = 1e-6) -> Tensor:
    """Pearson-correlation distillation for one level (METHODS.md §3), in fp32 with autocast off.

    Both maps are standardised per channel with statistics over ``(N, H, W)`` jointly (unbiased σ,
    ``eps`` added to σ), then ``L = ½·mean((Ŝ − T̂)²)``, which equals
    ``(1/C) Σ_c ((M−1)/M)(1 − r_c)`` as ``eps → 0``. The student is resized bilinearly
    (``align_corners=False``) to the teacher's size when H or W differ. With ``M = N·H·W < 2`` the
    statistics are undefined and the loss is 0 (still connected to the student's graph).
    """
    _check("pkd_loss", feat_s, feat_t)
    with autocast_disabled(feat_s.device):
        s = _resize_to(feat_s.float(), feat_t.shape[-2:])
        t = feat_t.float()
        if t.shape[0] * t.shape[2] * t.shape[3] < 2:
            return s.sum() * 0.0
        return _pkd_same_size(s, t, eps)


def dwt_pkd_loss(feat_s: Tensor, feat_t: Tensor, levels: int, eps: float = 1e-6) -> Tensor:
    """DWT-PKD (METHODS.md §8): the student is resized bilinearly to the teacher's size, both maps are
    decomposed into ``levels`` Haar levels, and each of the ``3·levels`` high bands is standardised on
    its own (per channel over ``(N, h_j, w_j)``) and scored as in :func:`pkd_loss`; band losses are
    summed. Bands with ``N·h_j·w_j == 1`` are skipped (undefined σ); the low band is excluded."""
    _check("dwt_pkd_loss", feat_s, feat_t)
    with autocast_disabled(feat_s.device):
        s = _resize_to(feat_s.float(), feat_t.shape[-2:])
        total = s.sum() * 0.0
        for bs, bt in zip(haar_high_bands(s, levels), haar_high_bands(feat_t.float(), levels)):
            if bt.shape[0] * bt.shape[2] * bt.shape[3] > 1:
                total = total + _pkd_same_size(bs, bt, eps)
        return total


@register_method("pkd")
class PKD(Distiller):
    """PKD, Cao et al. NeurIPS 2022. METHODS.md §3, §8.

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
        "Coefficient, NeurIPS 2022 (METHODS.md §3, §8)"
    )

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
        super().__init__(ctx)
        if domain not in ("spatial", "dwt"):
            raise ValueError(f"pkd: domain must be 'spatial' or 'dwt', got {domain!r}")
        if int(dwt_levels) != dwt_levels or dwt_levels < 1:
            raise ValueError(f"pkd: dwt_levels must be a positive integer, got {dwt_levels!r}")
        tap = resolve_tap(ctx, tap, DEFAULT_TAP, "pkd")
        self.weight = float(weight)
        self.domain = domain
        self.dwt_levels = int(dwt_levels)
        self.tap = tap

        shapes_s, shapes_t = paired_map_shapes(ctx, tap, "pkd", max_levels)
        self.num_levels = len(shapes_s)
        self.adapters = channel_adapters(shapes_s, shapes_t, bias=False)

    def taps(self) -> Taps:
        return Taps(student=(self.tap,), teacher=(self.tap,))

    def forward(self, s, t, batch):
        feats_s, feats_t = s[self.tap], t[self.tap]
        total = 0.0
        for level in range(self.num_levels):
            fs = self.adapters[level](feats_s[level])
            ft = feats_t[level]
            if self.domain == "dwt":
                total = total + dwt_pkd_loss(fs, ft, self.dwt_levels)
            else:
                total = total + pkd_loss(fs, ft)
        return {"loss_pkd": self.weight * total}
