"""ReviewKD: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. Spec: docs/methods.md §4.

Public API (reused by AFP for its hierarchical feature fusion):

* :class:`ABF`: one attention-based fusion block (§4.2).
* :class:`ReviewFusion`: the ABF cascade built from per-tap channels and resolutions; it takes student
  features shallow→deep and returns the fused outputs shallow→deep, processing deep→shallow.
* :func:`hcl_loss`: the hierarchical context loss (§4.3).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import Batch, Distiller, Outputs, Taps, register_method

Size2 = tuple[int, int]


def _size2(v: int | Sequence[int]) -> Size2:
    """``8 -> (8, 8)``; ``(8, 6) -> (8, 6)``."""
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def _spatial(shape: Sequence[int]) -> Size2:
    """Spatial size of a per-sample tap shape: ``(C, H, W) -> (H, W)``; ``(C,) -> (1, 1)`` (pooled feature)."""
    if len(shape) == 1:
        return (1, 1)
    if len(shape) != 3:
        raise ValueError(f"expected a per-sample shape (C,) or (C, H, W), got {tuple(shape)}")
    return (int(shape[1]), int(shape[2]))


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


class ABF(nn.Module):
    """Attention-based fusion block (docs/methods.md §4.2).

    ``x' = BN(Conv1×1_{in→mid, no bias}(x))``; when ``fuse`` (every tap but the deepest), the residual ``y``
    of the deeper ABF is nearest-resized to ``x'``'s resolution and the two are mixed by two sigmoid spatial
    maps ``z = σ(Conv1×1_{2·mid→2, bias}([x', y']))``: ``x'' = z₁⊙x' + z₂⊙y'``. ``x''`` is nearest-resized
    to ``out_shape`` if needed, and ``out = BN(Conv3×3_{mid→out, pad 1, no bias}(x''))``. Returns
    ``(out, x'')``; ``x''`` is the residual handed to the next (shallower) ABF. Both conv weights are
    initialised with ``kaiming_uniform_(a=1)``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.fuse = bool(fuse)
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if self.fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        shape: int | Sequence[int] | None = None,
        out_shape: int | Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``x``: this tap's student feature ``N×C_in×h×w``; ``y``: the deeper ABF's residual (needed iff
        ``fuse``); ``shape``: the fusion resolution (must be ``x``'s, defaults to it); ``out_shape``: the
        output resolution (defaults to ``x``'s). Returns ``(out N×C_out×out_shape, residual N×mid×out_shape)``."""
        n, _, h, w = x.shape
        if shape is not None and _size2(shape) != (h, w):
            raise ValueError(f"ABF: fusion shape {_size2(shape)} does not match the input's spatial size {(h, w)}")
        x = self.conv1(x)
        if self.att_conv is not None:
            if y is None:
                raise ValueError("ABF: a fusing block needs the residual y of the deeper block")
            x = self._fuse(x, y)
        out_hw = (h, w) if out_shape is None else _size2(out_shape)
        if tuple(x.shape[-2:]) != out_hw:
            x = F.interpolate(x, size=out_hw, mode="nearest")
        return self.conv2(x), x


    def _fuse(self, x: Tensor, y: Tensor) -> Tensor:
        """``z = σ(Conv1×1([x, up(y)]))``, ``z₁⊙x + z₂⊙up(y)`` with ``up`` the nearest resize of ``y`` to ``x``'s size.

        The same numbers (up to float summation order) computed cheaper: the attention conv is split into its
        ``x`` and ``y`` halves (no concatenation), and when ``x``'s size is an integer multiple of ``y``'s (nearest
        resize = each ``y`` pixel repeated over a ``k_h×k_w`` block, the case of every stage pyramid) ``y`` and its
        half of the conv stay at ``y``'s resolution and are broadcast over the blocks, never materialised."""
        n, mid, h, w = x.shape
        hy, wy = y.shape[-2:]
        conv = self.att_conv[0]
        zx = F.conv2d(x, conv.weight[:, :mid], conv.bias)
        zy = F.conv2d(y, conv.weight[:, mid:])
        if h % hy or w % wy:  # not a block repeat: resize as the definition says
            y = F.interpolate(y, size=(h, w), mode="nearest")
            z = torch.sigmoid(zx + F.interpolate(zy, size=(h, w), mode="nearest"))
            return x * z[:, 0:1] + y * z[:, 1:2]
        kh, kw = h // hy, w // wy
        z = torch.sigmoid(zx.reshape(n, 2, hy, kh, wy, kw) + zy.reshape(n, 2, hy, 1, wy, 1))
        out = x.reshape(n, mid, hy, kh, wy, kw) * z[:, 0:1] + y.reshape(n, mid, hy, 1, wy, 1) * z[:, 1:2]
        return out.reshape(n, mid, h, w)


class ReviewFusion(nn.Module):
    """The ABF cascade of docs/methods.md §4.2, one ABF per tap.

    Args (all lists shallow→deep, one entry per tap):
      in_channels: student channels ``C_i``.
      out_channels: target (teacher) channels ``C^t_i``.
      shapes: fusion resolutions (the student's spatial sizes), ``int`` or ``(h, w)``.
      out_shapes: output resolutions (the teacher's spatial sizes), ``int`` or ``(h, w)``.
      mid: the shared mid width; ``None`` -> ``min(512, in_channels[-1])`` (as the reference code, which
        ignores ``MAX_MID_CHANNEL``).

    ``forward(feats)`` takes the student features shallow→deep, runs the deepest ABF first (no fusion), then
    each shallower one with the residual of the previous, and returns the outputs shallow→deep.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        shapes: Sequence[int | Sequence[int]],
        out_shapes: Sequence[int | Sequence[int]],
        mid: int | None = None,
    ):
        super().__init__()
        n = len(in_channels)
        if n == 0 or not (len(out_channels) == len(shapes) == len(out_shapes) == n):
            raise ValueError(
                f"ReviewFusion: need equal non-empty lists, got in_channels={len(in_channels)}, "
                f"out_channels={len(out_channels)}, shapes={len(shapes)}, out_shapes={len(out_shapes)}"
            )
        self.mid = int(mid) if mid is not None else min(512, int(in_channels[-1]))
        self.shapes = [_size2(s) for s in shapes]
        self.out_shapes = [_size2(s) for s in out_shapes]
        # stored shallow→deep; the deepest (last) one does not fuse
        self.abfs = nn.ModuleList(
            ABF(int(c_in), self.mid, int(c_out), fuse=i < n - 1)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
        )

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.abfs):
            raise ValueError(f"ReviewFusion: expected {len(self.abfs)} features, got {len(feats)}")
        outs: list[Tensor] = [None] * len(feats)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(feats))):
            outs[i], residual = self.abfs[i](feats[i], residual, self.shapes[i], self.out_shapes[i])
        return outs


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
    ``"stages"``, for models without pre-activation taps) + pooled. Only kdbench CIFAR nets provide
    ``"stages_preact"``: ``requires_taps`` makes validate refuse ``teacher_preact``/``student_preact`` on timm/torchvision
    models at validate time. Channels and resolutions come from ``ctx.shapes``: fusion shapes are
    the student's spatial sizes, output shapes the teacher's, ``mid = min(512, C_pooled_student)``.
    If the two networks have different numbers of stages, the deepest ``min(n_s, n_t)`` of each are paired.

    Defaults: ``weight=1`` (mdistiller's default; 5 for res32x4→res8x4/wrn pairs, 8 for →ShuffleV2 and
    R50→MV1; the suite sets it per pair), ``warmup_epochs=20`` (CIFAR; 1 for ImageNet), ``ce_weight=1``.
    """

    tasks = frozenset({"classification"})
    heterogeneous = False
    citation = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021 (docs/methods.md §4)"
    version = 2  # 2: student taps "stages_raw" (WRN students: raw residual sums, as mdistiller)
    # pre-ReLU stage taps exist only where the model has them (kdbench: CIFAR nets); checked at validate time
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
            shapes=[_spatial(sh) for sh in s_all],
            out_shapes=[_spatial(sh) for sh in t_all],
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
