"""FitNet: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
Spec: docs/methods.md §14.

:func:`fitnet_loss` is the hint loss (an element-wise MSE); :class:`ConvReg` is the learned regressor that maps the
student's hint feature to the teacher's shape, as mdistiller's ``distillers/_common.py`` chooses it from the two
spatial sizes; :class:`FitNet` wires one stage of each network through them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.featuremap import map_shapes, resize_to
from kdbench.method import Batch, Distiller, Outputs, Taps, fp32, no_autocast, register_method

#: mdistiller's ``feats`` (stem excluded: kdbench never exposes it as a stage); the token maps of ViT/MLP models
#: come reshaped to ``N×C×h×w`` on their patch grid by the model layer.
TAP = "stages_raw"


def fitnet_loss(f_s_regressed: Tensor, f_t: Tensor) -> Tensor:
    """``mean((reg(f_s) − f_t)²)`` over every element (docs/methods.md §14), a 0-dim float32 tensor, autocast off.
    The two maps must have the same shape (regress the student first)."""
    if f_s_regressed.shape != f_t.shape:
        raise ValueError(f"fitnet_loss: regressed student {tuple(f_s_regressed.shape)} != teacher "
                         f"{tuple(f_t.shape)}")
    with no_autocast():
        s, t = fp32(f_s_regressed, f_t)
        return F.mse_loss(s, t, reduction="mean")


class ConvReg(nn.Module):
    """Regressor ``C_s×H_s×W_s -> C_t×H_t×W_t`` (docs/methods.md §14): a convolution chosen from the heights,
    then BatchNorm and (``use_relu``) ReLU, as mdistiller's ``ConvReg``:

    * ``H_s = 2·H_t``: 3×3 conv, stride 2, padding 1 (``kind = "conv3x3_s2"``);
    * ``2·H_s = H_t``: 4×4 transposed conv, stride 2, padding 1 (``"deconv4x4_s2"``);
    * ``H_s ≥ H_t``: a ``(1+H_s−H_t)×(1+W_s−W_t)`` conv, no padding, 1×1 when the sizes are equal (``"conv"``);
    * otherwise (a smaller student map, not half the teacher's; mdistiller refuses it) a 1×1 conv
      (``"conv1x1"``) **[interpretation]**.

    Every conv has a bias (PyTorch's default, as mdistiller). Where the conv's output size still differs from the
    teacher's (the last case, or widths that do not follow the heights), it is resized bilinearly
    (``align_corners=False``) to it before the BatchNorm.
    """

    def __init__(self, s_shape, t_shape, use_relu: bool = True):
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = (tuple(int(v) for v in s_shape), tuple(int(v) for v in t_shape))
        if h_s == 2 * h_t:
            self.kind, self.conv = "conv3x3_s2", nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.kind, self.conv = "deconv4x4_s2", nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t:
            kernel = (1 + h_s - h_t, max(1, 1 + w_s - w_t))
            self.kind, self.conv = "conv", nn.Conv2d(c_s, c_t, kernel_size=kernel)
        else:
            self.kind, self.conv = "conv1x1", nn.Conv2d(c_s, c_t, kernel_size=1)
        self.out_size = (h_t, w_t)
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(resize_to(self.conv(x), self.out_size)))


@register_method("fitnet")
class FitNet(Distiller):
    """Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. docs/methods.md §14.

    ``L = ce_weight·CE + weight · mean((ConvReg(f_s) − f_t)²)`` on stage ``hint_layer`` (counted from 1, the
    shallowest, on each network: mdistiller's ``HINT_LAYER``, whose 0 is the stem) of the ``"stages_raw"`` tap of
    both networks (mdistiller's ``feats``; token maps of ViT/MLP networks come as ``N×C×h×w`` maps). Defaults are
    mdistiller's CIFAR-100 ones: hint layer 2 (the middle stage of the 3-stage CIFAR nets), weight 100, CE 1.
    """

    tasks = frozenset({"classification"})
    heterogeneous = True
    citation = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015 (docs/methods.md §14)"
    version = 1

    def __init__(self, ctx, *, hint_layer: int = 2, weight: float = 100.0, ce_weight: float = 1.0,
                 use_relu: bool = True):
        super().__init__(ctx)
        shapes_s, shapes_t = map_shapes(ctx, "student", TAP, "fitnet"), map_shapes(ctx, "teacher", TAP, "fitnet")
        most = min(len(shapes_s), len(shapes_t))
        if int(hint_layer) != hint_layer or not 1 <= hint_layer <= most:
            raise ValueError(f"fitnet: hint_layer must be a stage number in 1..{most} (the student has "
                             f"{len(shapes_s)} stages, the teacher {len(shapes_t)}), got {hint_layer!r}")
        self.hint_layer = int(hint_layer)
        self.weight = float(weight)
        self.use_relu = bool(use_relu)
        self.task_loss_weight = ce_weight
        i = self.hint_layer - 1
        self.regressor = ConvReg(shapes_s[i], shapes_t[i], use_relu=self.use_relu)

    def taps(self) -> Taps:
        return Taps(student=(TAP,), teacher=(TAP,))

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        i = self.hint_layer - 1
        return {"loss_fitnet": self.weight * fitnet_loss(self.regressor(s[TAP][i]), t[TAP][i])}
