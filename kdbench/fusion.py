"""Attention-based feature fusion (ABF) and its review cascade: the fusion ReviewKD distils through
(docs/methods.md §4.2) and AFP reuses as its hierarchical feature-fusion aligner (§9). Library code shared by
method files, so that no method file imports another.

* :class:`ABF`: one attention-based fusion block.
* :class:`ReviewFusion`: the ABF cascade built from per-tap channels and resolutions; it takes student
  features shallow→deep and returns the fused outputs shallow→deep, processing deep→shallow.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Size2 = tuple[int, int]


def _size2(v: int | Sequence[int]) -> Size2:
    """``8 -> (8, 8)``; ``(8, 6) -> (8, 6)``."""
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def spatial_size(shape: Sequence[int]) -> Size2:
    """Spatial size of a per-sample tap shape: ``(C, H, W) -> (H, W)``; ``(C,) -> (1, 1)`` (pooled feature)."""
    if len(shape) == 1:
        return (1, 1)
    if len(shape) != 3:
        raise ValueError(f"expected a per-sample shape (C,) or (C, H, W), got {tuple(shape)}")
    return (int(shape[1]), int(shape[2]))


def _to_channels_last(g: Tensor) -> Tensor:
    return g.contiguous(memory_format=torch.channels_last)  # g itself when it already is


def same_layout_grad(t: Tensor) -> Tensor:
    """``t`` itself; when it is a ``channels_last`` map that autograd tracks, its gradient is handed back in
    ``channels_last`` too. A loss that reshapes the map (a DWT, a flatten over space) returns an NCHW gradient,
    and a batch norm's backward with mixed layouts runs ~3× slower than with one (AFP's fused maps)."""
    if t.requires_grad and t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        t.register_hook(_to_channels_last)
    return t


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
        return same_layout_grad(self.conv2(x)), x

    def _fuse(self, x: Tensor, y: Tensor) -> Tensor:
        """``z = σ(Conv1×1([x, up(y)]))``, ``z₁⊙x + z₂⊙up(y)`` with ``up`` the nearest resize of ``y`` to ``x``'s size.

        The same numbers (up to float summation order) computed cheaper: the attention conv is split into its
        ``x`` and ``y`` halves (no concatenation), and when ``x``'s size is an integer multiple of ``y``'s (nearest
        resize = each ``y`` pixel repeated over a ``k_h×k_w`` block, the case of every stage pyramid) ``y``'s half
        of the conv runs at ``y``'s resolution and the mix is :class:`_BlockMix` (two passes forward, one scratch
        buffer backward, ``up(y)`` recomputed rather than kept)."""
        n, mid, h, w = x.shape
        hy, wy = y.shape[-2:]
        conv = self.att_conv[0]
        zx = F.conv2d(x, conv.weight[:, :mid], conv.bias)
        zy = F.conv2d(y, conv.weight[:, mid:])
        z = torch.sigmoid(zx + F.interpolate(zy, size=(h, w), mode="nearest"))
        if h % hy or w % wy:  # not a block repeat: resize as the definition says
            return x * z[:, 0:1] + F.interpolate(y, size=(h, w), mode="nearest") * z[:, 1:2]
        return _BlockMix.apply(x, y, z)


class _BlockMix(torch.autograd.Function):
    """``z[:, 0:1]⊙x + z[:, 1:2]⊙up(y)`` for ``up`` a nearest resize by integer factors (a block repeat), with a
    hand-written backward: ``∂x = g⊙z₁``; ``∂z₁ = Σ_c g⊙x``, ``∂z₂ = Σ_c g⊙up(y)``; ``∂y`` = the block sums of
    ``g⊙z₂`` (``avg_pool2d`` with divisor 1, the adjoint of the repeat), the three products written into one
    scratch buffer in turn. Autograd's version of the same expression allocates and passes over a full-size
    tensor per product and reduces over strided block axes, which cost ~2× as much at ReviewKD's sizes."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        up = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        out = torch.mul(x, z[:, 0:1])
        out.addcmul_(up, z[:, 1:2])
        ctx.save_for_backward(x, y, z)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, z = ctx.saved_tensors
        need_x, need_y, need_z = ctx.needs_input_grad
        (h, w), (hy, wy) = x.shape[-2:], y.shape[-2:]
        gx = g * z[:, 0:1] if need_x else None
        gy = gz = None
        if need_z or need_y:
            scratch = torch.empty_like(g)
        if need_z:
            up = F.interpolate(y, size=(h, w), mode="nearest")
            gz = torch.empty_like(z)
            gz[:, 0:1] = torch.mul(g, x, out=scratch).sum(1, keepdim=True)
            gz[:, 1:2] = torch.mul(g, up, out=scratch).sum(1, keepdim=True)
            del up
        if need_y:
            gy = F.avg_pool2d(torch.mul(g, z[:, 1:2], out=scratch), (h // hy, w // wy), divisor_override=1)
        return gx, gy, gz


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
    ``forward(feats, out_shapes)`` runs the same cascade at the sizes of this call (AFP's detectors, whose
    maps change size with the image): each map is fused at its own size and output at ``out_shapes[i]``.
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

    def forward(self, feats: Sequence[Tensor], out_shapes: Sequence[int | Sequence[int]] | None = None
                ) -> list[Tensor]:
        """The cascade over ``feats`` (shallow→deep). Without ``out_shapes``: at the built ``shapes`` (each
        input checked against its own) and ``out_shapes``; with them: at the inputs' own sizes, outputs at
        ``out_shapes[i]``."""
        if len(feats) != len(self.abfs):
            raise ValueError(f"ReviewFusion: expected {len(self.abfs)} features, got {len(feats)}")
        if out_shapes is None:
            shapes, out_sizes = self.shapes, self.out_shapes
        elif len(out_shapes) != len(self.abfs):
            raise ValueError(f"ReviewFusion: expected {len(self.abfs)} output sizes, got {len(out_shapes)}")
        else:
            shapes, out_sizes = [None] * len(feats), [_size2(s) for s in out_shapes]
        outs: list[Tensor] = [None] * len(feats)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(feats))):
            outs[i], residual = self.abfs[i](feats[i], residual, shapes[i], out_sizes[i])
        return outs
