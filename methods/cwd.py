"""CWD: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.

Spec: METHODS.md §2 (spatial CWD) and §8 (DWT-CWD, FreeKD supplementary Table 10).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.freq import autocast_disabled, haar_high_bands
from kdbench.method import channel_adapters, Distiller, paired_map_shapes, register_method, resolve_tap, Taps

# Default loss weight per task (METHODS.md §2): mmrazor's FPN (per level) and segmentation-logits settings.
# Classification has no reference setting; kdbench uses the feature-map (FPN) weight on the "final" map.
DEFAULT_WEIGHT = {"detection": 10.0, "segmentation": 5.0, "classification": 10.0}
DEFAULT_TAP = {"detection": "fpn", "segmentation": "logits", "classification": "final"}


def cwd_loss(feat_s: Tensor, feat_t: Tensor, tau: float) -> Tensor:
    """Channel-wise distillation loss (METHODS.md §2), in fp32 with autocast off.

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


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of an ``N×C×H×W`` map to ``size``; identity when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def dwt_cwd_loss(feat_s: Tensor, feat_t: Tensor, tau: float, levels: int) -> Tensor:
    """DWT-CWD (METHODS.md §8): :func:`cwd_loss` summed over the ``3·levels`` Haar high bands
    (LH, HL, HH of levels 1..J; the low band is excluded). The student is resized bilinearly to the
    teacher's spatial size first when they differ; channels must match."""
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[:2] != feat_t.shape[:2]:
        raise ValueError(f"dwt_cwd_loss: need N×C×H×W maps with equal N, C; got {tuple(feat_s.shape)}, "
                         f"{tuple(feat_t.shape)}")
    with autocast_disabled(feat_s.device):
        s = resize_to(feat_s.float(), feat_t.shape[-2:])
        bands_s = haar_high_bands(s, levels)
        bands_t = haar_high_bands(feat_t.float(), levels)
        return sum(cwd_loss(bs, bt, tau) for bs, bt in zip(bands_s, bands_t))


@register_method("cwd")
class CWD(Distiller):
    """Channel-wise distillation, Shu et al. ICCV 2021. METHODS.md §2, §8.

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
    citation = "Shu et al., Channel-wise Knowledge Distillation for Dense Prediction, ICCV 2021 (METHODS.md §2, §8)"

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
        super().__init__(ctx)
        if not tau > 0:
            raise ValueError(f"cwd: tau must be > 0, got {tau!r}")
        if domain not in ("spatial", "dwt"):
            raise ValueError(f"cwd: domain must be 'spatial' or 'dwt', got {domain!r}")
        if int(dwt_levels) != dwt_levels or dwt_levels < 1:
            raise ValueError(f"cwd: dwt_levels must be a positive integer, got {dwt_levels!r}")
        tap = resolve_tap(ctx, tap, DEFAULT_TAP, "cwd")
        if weight is None:
            if ctx.task not in DEFAULT_WEIGHT:
                raise ValueError(f"cwd: no default weight for task {ctx.task!r}; pass weight=")
            weight = DEFAULT_WEIGHT[ctx.task]
        self.tau = float(tau)
        self.weight = float(weight)
        self.domain = domain
        self.dwt_levels = int(dwt_levels)
        self.tap = tap

        shapes_s, shapes_t = paired_map_shapes(ctx, tap, "cwd", max_levels)
        self.num_levels = len(shapes_s)
        self.adapters = channel_adapters(shapes_s, shapes_t, bias=True)

    def taps(self) -> Taps:
        return Taps(student=(self.tap,), teacher=(self.tap,))

    def forward(self, s, t, batch):
        feats_s, feats_t = s[self.tap], t[self.tap]
        total = 0.0
        for level in range(self.num_levels):
            fs = self.adapters[level](feats_s[level])
            ft = feats_t[level]
            if self.domain == "dwt":
                total = total + dwt_cwd_loss(fs, ft, self.tau, self.dwt_levels)
            else:
                with autocast_disabled(fs.device):
                    fs = resize_to(fs.float(), ft.shape[-2:])
                total = total + cwd_loss(fs, ft, self.tau)
        return {"loss_cwd": self.weight * total}
