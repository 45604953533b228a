"""ReviewKD: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. Spec: docs/methods.md §4.

The ABF fusion cascade (§4.2) is library code shared with AFP: :mod:`kdbench.fusion` (re-exported here).
:func:`hcl_loss` is the hierarchical context loss (§4.3).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdbench.fusion import ABF, ReviewFusion, spatial_size  # noqa: F401  (ABF re-exported)
from kdbench.method import Batch, Distiller, Outputs, Taps, register_method

def hcl_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss (docs/methods.md §4.3), summed over the pairs ``(o_i, t_i)``.

    For a pair of height ``h``: ``MSE`` at full resolution with weight 1, then ``MSE`` of the
    ``adaptive_avg_pool2d`` to 4×4, 2×2, 1×1 (in that order) for the levels strictly smaller than ``h``,
    the weight halving at each level actually used; the pair's loss is the weighted sum divided by the sum
    of the weights (``h=8``: 1, ½, ¼, ⅛, den 1.875; ``h=4``: 1, ½ (2×2), ¼ (1×1), den 1.75; ``h=1``: MSE).
    Computed in fp32.
    """
    if len(feats_s) != len(feats_t):
        raise ValueError(f"hcl_loss: {len(feats_s)} student features but {len(feats_t)} teacher features")
    if len(feats_s) == 0:
        raise ValueError("hcl_loss: no features given")
    total = None
    for i, (fs, ft) in enumerate(zip(feats_s, feats_t)):
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss: pair {i} has student shape {tuple(fs.shape)} != teacher {tuple(ft.shape)}")
        fs, ft = fs.float(), ft.float()
        h = fs.shape[2]
        num = F.mse_loss(fs, ft, reduction="mean")
        den = 1.0
        w = 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            w /= 2.0
            num = num + w * F.mse_loss(
                F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level)), reduction="mean"
            )
            den += w
        term = num / den
        total = term if total is None else total + term
    return total


def _as_map(x: Tensor) -> Tensor:
    """``N×C`` -> ``N×C×1×1``; feature maps pass through."""
    return x[:, :, None, None] if x.dim() == 2 else x


@register_method("reviewkd")
class ReviewKD(Distiller):
    """Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021. docs/methods.md §4.

    ``L = ce_weight·CE + weight · min(epoch / warmup_epochs, 1) · HCL(ReviewFusion(s), t)`` with
    student taps = stage outputs as mdistiller's ``feats`` (the ``"stages_raw"`` tap: post-ReLU stage outputs,
    and for pre-activation WRNs the raw residual sums, before the next block's BN-ReLU), or pre-ReLU with
    ``student_preact`` (``"stages_preact"``), + the pooled feature as ``N×C×1×1``; teacher taps = pre-ReLU
    stage outputs (``teacher_preact``, ``"stages_preact"``; ``teacher_preact=False`` takes post-ReLU
    ``"stages"``, for models without pre-activation taps) + pooled. ``"stages_preact"`` exists on kdbench's CIFAR
    nets, torchvision's ResNet family and timm's MobileNet-V1 built with ReLU (kdbench/models/tap.py);
    ``requires_taps`` makes validate refuse ``teacher_preact``/``student_preact`` on a model whose tap metadata
    (``kdbench.models.catalog``) lacks it. Channels and resolutions come from ``ctx.shapes``: fusion shapes are
    the student's spatial sizes, output shapes the teacher's, ``mid = min(512, C_pooled_student)``.
    If the two networks have different numbers of stages, the deepest ``min(n_s, n_t)`` of each are paired.

    Defaults: ``weight=1`` (mdistiller's default; 5 for res32x4→res8x4/wrn pairs, 8 for →ShuffleV2 and
    R50→MV1; the suite sets it per pair), ``warmup_epochs=20`` (CIFAR; 1 for ImageNet), ``ce_weight=1``.
    """

    tasks = frozenset({"classification"})
    heterogeneous = False
    citation = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021 (docs/methods.md §4)"
    version = 2
    # pre-ReLU stage taps exist only where the model has them (see the docstring); checked at validate time
    requires_taps = {"teacher_preact": ("teacher", "stages_preact"), "student_preact": ("student", "stages_preact")}

    def __init__(
        self,
        ctx,
        *,
        weight: float = 1.0,
        warmup_epochs: float = 20,
        ce_weight: float = 1.0,
        student_preact: bool = False,
        teacher_preact: bool = True,
    ):
        super().__init__(ctx)
        if warmup_epochs < 0:
            raise ValueError(f"reviewkd: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.weight = float(weight)
        self.warmup_epochs = warmup_epochs
        self.task_loss_weight = ce_weight
        self.student_tap = "stages_preact" if student_preact else "stages_raw"
        self.teacher_tap = "stages_preact" if teacher_preact else "stages"

        s_stages = ctx.shapes("student", self.student_tap)
        t_stages = ctx.shapes("teacher", self.teacher_tap)
        self.n_stages = min(len(s_stages), len(t_stages))
        if self.n_stages == 0:
            raise ValueError("reviewkd: the student or the teacher exposes no stage features")
        s_stages, t_stages = s_stages[-self.n_stages:], t_stages[-self.n_stages:]
        s_pooled = ctx.shapes("student", "pooled")[0]
        t_pooled = ctx.shapes("teacher", "pooled")[0]
        s_all, t_all = list(s_stages) + [s_pooled], list(t_stages) + [t_pooled]

        self.fusion = ReviewFusion(
            in_channels=[sh[0] for sh in s_all],
            out_channels=[sh[0] for sh in t_all],
            shapes=[spatial_size(sh) for sh in s_all],
            out_shapes=[spatial_size(sh) for sh in t_all],
            mid=min(512, int(s_pooled[0])),
        )

    def taps(self) -> Taps:
        return Taps(student=(self.student_tap, "pooled"), teacher=(self.teacher_tap, "pooled"))

    def warmup_factor(self, epoch: float) -> float:
        """``min(epoch / warmup_epochs, 1)`` (epoch counted from 1); 1 when there is no warm-up."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min(float(epoch) / float(self.warmup_epochs), 1.0)

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        k = self.n_stages
        feats_s = list(s[self.student_tap][-k:]) + [_as_map(s["pooled"][0])]
        feats_t = list(t[self.teacher_tap][-k:]) + [_as_map(t["pooled"][0])]
        outs = self.fusion(feats_s)
        loss = hcl_loss(outs, [f.detach() for f in feats_t])
        return {"loss_reviewkd": self.weight * self.warmup_factor(batch.epoch) * loss}
