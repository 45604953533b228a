"""Methods on feature maps: tap resolution, level pairing, student adapters, resizing, the spatial or Haar-DWT
domain of a map loss (docs/methods.md §6, §8), detector regression KD, and :class:`FeatureMapDistiller`, the
base of the losses computed level by level on (adapted student, teacher) map pairs (CWD, PKD).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.freq import autocast_disabled, haar_high_bands
from kdbench.method import Batch, Context, Distiller, Outputs, Taps

DOMAINS = ("spatial", "dwt")


def resolve_tap(ctx: Context, tap: str, defaults: dict[str, str], who: str) -> str:
    """``tap`` itself, or for ``"auto"`` the method's default tap for the context's task."""
    if tap != "auto":
        return tap
    if ctx.task not in defaults:
        raise ValueError(f"{who}: no default tap for task {ctx.task!r}; pass tap=")
    return defaults[ctx.task]


def map_shapes(ctx: Context, side: str, tap: str, who: str) -> list[tuple[int, int, int]]:
    """The ``(C, H, W)`` shapes of a tap's maps on one side; an error naming ``who`` if any is not ``C×H×W``."""
    shapes = ctx.shapes(side, tap)
    bad = [s for s in shapes if len(s) != 3]
    if not shapes or bad:
        raise ValueError(f"{who}: tap {tap!r} of the {side} gives shapes {bad or shapes}; {who} needs C×H×W maps")
    return [tuple(int(v) for v in s) for s in shapes]


def pair_levels(ctx: Context, tap: str, who: str, *, max_levels: int | None = None, deepest: bool = False
                ) -> tuple[list[int], list[int]]:
    """Which student and which teacher maps of ``tap`` are paired: two index lists of equal length.

    * ``deepest=False`` (CWD, PKD on FPN levels): level by level from the shallowest, the first ``max_levels``
      (None = all); both networks must give as many.
    * ``deepest=True`` (FreeKD, AFP on stages): the last ``min(n_s, n_t)`` of each, deepest aligned.
    """
    if max_levels is not None and (int(max_levels) != max_levels or max_levels < 1):
        raise ValueError(f"{who}: max_levels must be a positive integer or None, got {max_levels!r}")
    n_s, n_t = len(map_shapes(ctx, "student", tap, who)), len(map_shapes(ctx, "teacher", tap, who))
    if deepest:
        k = min(n_s, n_t)
        return list(range(n_s - k, n_s)), list(range(n_t - k, n_t))
    if max_levels is not None:
        n_s, n_t = min(n_s, int(max_levels)), min(n_t, int(max_levels))
    if n_s != n_t:
        raise ValueError(f"{who}: tap {tap!r} has {n_s} student and {n_t} teacher levels; they must be equal "
                         "(set max_levels?)")
    return list(range(n_s)), list(range(n_t))


def channel_adapters(shapes_s, shapes_t, bias: bool = True) -> nn.ModuleList:
    """One student-side 1×1 conv ``C_s → C_t`` per level (identity where the channels already match)."""
    return nn.ModuleList(nn.Conv2d(ss[0], st[0], kernel_size=1, bias=bias) if ss[0] != st[0] else nn.Identity()
                         for ss, st in zip(shapes_s, shapes_t))


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of an ``N×C×H×W`` map to ``size``; identity when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def domain_pairs(feat_s: Tensor, feat_t: Tensor, domain: str = "spatial", levels: int = 3, who: str = "loss"
                 ) -> list[tuple[Tensor, Tensor]]:
    """The (student, teacher) pairs a map loss is summed over, fp32 (call under autocast off): the student is
    resized bilinearly to the teacher's size, then ``"spatial"``: the maps themselves; ``"dwt"``: the
    ``3·levels`` Haar high bands ``LH_j, HL_j, HH_j`` of levels 1..J, finest first, the low band excluded (§8)."""
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[:2] != feat_t.shape[:2]:
        raise ValueError(f"{who}: need N×C×H×W maps with equal N and C; got {tuple(feat_s.shape)}, "
                         f"{tuple(feat_t.shape)}")
    s, t = resize_to(feat_s.float(), feat_t.shape[-2:]), feat_t.float()
    if domain == "spatial":
        return [(s, t)]
    if domain == "dwt":
        return list(zip(haar_high_bands(s, levels), haar_high_bands(t, levels)))
    raise ValueError(f"{who}: domain must be one of {DOMAINS}, got {domain!r}")


def map_loss(feat_s: Tensor, feat_t: Tensor, pair_loss: Callable[[Tensor, Tensor], Tensor], domain: str = "spatial",
             levels: int = 3, who: str = "loss") -> Tensor:
    """``Σ pair_loss(s, t)`` over :func:`domain_pairs`, in fp32 with autocast off."""
    with autocast_disabled(feat_s.device):
        return sum(pair_loss(s, t) for s, t in domain_pairs(feat_s, feat_t, domain, levels, who))


def has_regression_taps(ctx: Context, use: bool) -> bool:
    """True when ``use`` and both detectors expose a ``"reg"`` tap (their heads' regression outputs)."""
    if not use or ctx.task != "detection":
        return False
    try:
        return bool(ctx.shapes("student", "reg")) and bool(ctx.shapes("teacher", "reg"))
    except (KeyError, ValueError, RuntimeError, NotImplementedError, TypeError):
        return False


def reg_kd_loss(regs_s: Sequence[Tensor], regs_t: Sequence[Tensor]) -> Tensor:
    """Detector regression KD (docs/methods.md §7.1, §7.2-6): SmoothL1 (β=1, mean) per head output, summed over
    the outputs (one per FPN level), fp32."""
    if len(regs_s) != len(regs_t) or not regs_s:
        raise ValueError(f"reg_kd_loss: {len(regs_s)} student vs {len(regs_t)} teacher regression outputs")
    return sum(F.smooth_l1_loss(s.float(), t.float(), beta=1.0) for s, t in zip(regs_s, regs_t))


class FeatureMapDistiller(Distiller):
    """A loss summed over the paired levels of one tap, on (adapted student, teacher) maps, times ``weight``:

        L = weight · Σ_levels Σ_(s,t) pair_loss(s, t)

    over the :func:`domain_pairs` of each level (the map, or its Haar high bands with ``domain="dwt"``). A
    student 1×1 conv adapter (``adapter_bias``) per level where the channels differ; the student is resized to
    the teacher's size. Levels are paired from the shallowest, the first ``max_levels`` (None = all).

    A subclass sets ``loss_name``, ``default_taps`` (task -> tap for ``tap="auto"``) and ``adapter_bias``,
    implements :meth:`pair_loss` and calls ``super().__init__`` with its resolved parameters.
    """

    loss_name: str = "loss"
    default_taps: dict[str, str] = {}
    adapter_bias: bool = True

    def __init__(self, ctx: Context, *, weight: float, domain: Literal["spatial", "dwt"] = "spatial",
                 dwt_levels: int = 3, tap: str = "auto", max_levels: int | None = None):
        super().__init__(ctx)
        who = getattr(type(self), "registry_name", type(self).__name__)
        if domain not in DOMAINS:
            raise ValueError(f"{who}: domain must be 'spatial' or 'dwt', got {domain!r}")
        if int(dwt_levels) != dwt_levels or dwt_levels < 1:
            raise ValueError(f"{who}: dwt_levels must be a positive integer, got {dwt_levels!r}")
        self.who = who
        self.weight = float(weight)
        self.domain = domain
        self.dwt_levels = int(dwt_levels)
        self.tap = resolve_tap(ctx, tap, self.default_taps, who)
        s_index, t_index = pair_levels(ctx, self.tap, who, max_levels=max_levels)
        shapes_s, shapes_t = ctx.shapes("student", self.tap), ctx.shapes("teacher", self.tap)
        self.num_levels = len(s_index)
        self.adapters = channel_adapters([shapes_s[i] for i in s_index], [shapes_t[i] for i in t_index],
                                         bias=self.adapter_bias)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """The loss of one pair of same-shaped fp32 ``N×C×h×w`` maps."""
        raise NotImplementedError

    def taps(self) -> Taps:
        return Taps(student=(self.tap,), teacher=(self.tap,))

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        total = sum(map_loss(adapter(fs), ft, self.pair_loss, self.domain, self.dwt_levels, self.who)
                    for adapter, fs, ft in zip(self.adapters, s[self.tap], t[self.tap]))
        return {self.loss_name: self.weight * total}
