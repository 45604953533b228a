"""Orthonormal 2-D Haar DWT/IDWT and FFT helpers shared by the frequency-domain methods. docs/methods.md §6.

Every transform works per channel on ``(N, C, H, W)`` tensors, runs in float32 with autocast disabled
(the input is cast to float32; the outputs are float32 even under ``torch.autocast``) and is differentiable.
An odd ``H`` or ``W`` is zero-padded at the bottom/right before a level is taken, so the bands of a level
have shape ``N×C×⌈H/2⌉×⌈W/2⌉``. For each 2×2 block ``[[a, b], [c, d]]``::

    LL = (a + b + c + d)/2      LH = (a + b − c − d)/2      (high-pass along height)
    HL = (a − b + c − d)/2      HH = (a − b − c + d)/2      (high-pass along width / both)

Bands and signs are exactly those of ``pytorch_wavelets.DWTForward(J, wave='haar', mode='zero')``:
``yl == LL_J`` and ``yh[j-1][:, :, 0], [:, :, 1], [:, :, 2] == LH_j, HL_j, HH_j`` (level 1 finest).
Implemented with strided slicing and adds (no conv): it is exact, cheap and needs no filter buffers.

A *band set* (the frequency prompts of FreeKD and AFP, §7) is a ``N×C×O×h×w`` tensor: set 0 is ``LL_J``
(``O=1``), set ``j`` (1..J) stacks the ``(LH_j, HL_j, HH_j)`` bands of level ``j`` (``O=3``, level 1 finest):
:func:`band_sets` and its inverse :func:`reconstruct_from_sets`.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "haar_dwt2d",
    "haar_idwt2d",
    "haar_wavedec2d",
    "haar_waverec2d",
    "haar_high_bands",
    "check_levels",
    "clamp_levels",
    "band_sets",
    "reconstruct_from_sets",
    "fft_amplitude",
    "autocast_disabled",
]

Bands = tuple[Tensor, Tensor, Tensor]


def autocast_disabled(device: torch.device):
    """A context in which autocast is off for ``device``'s device type (a no-op for device types that have
    no autocast, e.g. ``meta``). Used by the transforms here and by the losses built on them."""
    dtype = device.type
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dtype, enabled=False)


def _check_4d(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")


def haar_dwt2d(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level of the orthonormal Haar DWT: ``(N,C,H,W) -> (LL, LH, HL, HH)``, each ``N×C×⌈H/2⌉×⌈W/2⌉``.

    Odd ``H``/``W`` are zero-padded bottom/right. Output is float32 (autocast disabled).
    """
    _check_4d(x, "haar_dwt2d")
    with autocast_disabled(x.device):
        x = x.float()
        ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        a = x[..., 0::2, 0::2]
        b = x[..., 0::2, 1::2]
        c = x[..., 1::2, 0::2]
        d = x[..., 1::2, 1::2]
        top_sum, bot_sum = a + b, c + d
        top_dif, bot_dif = a - b, c - d
        ll = (top_sum + bot_sum) * 0.5
        lh = (top_sum - bot_sum) * 0.5
        hl = (top_dif + bot_dif) * 0.5
        hh = (top_dif - bot_dif) * 0.5
    return ll, lh, hl, hh


def haar_idwt2d(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    """Inverse of :func:`haar_dwt2d`: four ``N×C×h×w`` bands -> ``N×C×2h×2w`` (float32, autocast off).

    Zero padding added by the forward transform is *not* removed here; crop the result (or use
    :func:`haar_waverec2d` with ``size=``) to recover an odd-sized input.
    """
    for name, band in (("ll", ll), ("lh", lh), ("hl", hl), ("hh", hh)):
        _check_4d(band, f"haar_idwt2d({name})")
    if not (ll.shape == lh.shape == hl.shape == hh.shape):
        raise ValueError(
            "haar_idwt2d: bands must share one shape, got "
            f"{tuple(ll.shape)}, {tuple(lh.shape)}, {tuple(hl.shape)}, {tuple(hh.shape)}"
        )
    with autocast_disabled(ll.device):
        ll, lh, hl, hh = ll.float(), lh.float(), hl.float(), hh.float()
        low_sum, low_dif = ll + lh, ll - lh
        high_sum, high_dif = hl + hh, hl - hh
        a = (low_sum + high_sum) * 0.5  # (LL+LH+HL+HH)/2
        b = (low_sum - high_sum) * 0.5  # (LL+LH-HL-HH)/2
        c = (low_dif + high_dif) * 0.5  # (LL-LH+HL-HH)/2
        d = (low_dif - high_dif) * 0.5  # (LL-LH-HL+HH)/2
        n, ch, h, w = ll.shape
        top = torch.stack((a, b), dim=-1).reshape(n, ch, h, 2 * w)  # a b a b ... along width
        bottom = torch.stack((c, d), dim=-1).reshape(n, ch, h, 2 * w)
        return torch.stack((top, bottom), dim=-2).reshape(n, ch, 2 * h, 2 * w)


def haar_wavedec2d(x: Tensor, levels: int) -> tuple[Tensor, list[Bands]]:
    """``J``-level Haar decomposition: ``(LL_J, [(LH_j, HL_j, HH_j) for j = 1..J])``, finest level first.

    Each level re-applies :func:`haar_dwt2d` to the previous LL (zero-padding it when odd).
    """
    if int(levels) != levels or levels < 1:
        raise ValueError(f"haar_wavedec2d: levels must be a positive integer, got {levels!r}")
    _check_4d(x, "haar_wavedec2d")
    highs: list[Bands] = []
    ll = x
    for _ in range(int(levels)):
        ll, lh, hl, hh = haar_dwt2d(ll)
        highs.append((lh, hl, hh))
    return ll, highs


def haar_waverec2d(ll: Tensor, highs: Sequence[Bands], size: Sequence[int] | None = None) -> Tensor:
    """Inverse of :func:`haar_wavedec2d`. ``highs`` is finest level first, as wavedec returns it.

    At each level the partial reconstruction is cropped (bottom/right) to the level's band size, undoing
    the zero padding of odd intermediate sizes. ``size=(H, W)`` crops the final output to the original
    input size; without it the output is ``2·h_1 × 2·w_1``.
    """
    if len(highs) == 0:
        raise ValueError("haar_waverec2d: need at least one level of high bands")
    _check_4d(ll, "haar_waverec2d(ll)")
    out = ll
    for j in range(len(highs) - 1, -1, -1):
        lh, hl, hh = highs[j]
        h, w = lh.shape[-2:]
        if out.shape[-2] - h not in (0, 1) or out.shape[-1] - w not in (0, 1):
            raise ValueError(
                f"haar_waverec2d: level {j + 1} bands are {h}×{w} but the coarser reconstruction is "
                f"{out.shape[-2]}×{out.shape[-1]}; bands are not from one decomposition"
            )
        out = haar_idwt2d(out[..., :h, :w], lh, hl, hh)
    if size is not None:
        H, W = int(size[0]), int(size[1])
        if H > out.shape[-2] or W > out.shape[-1] or out.shape[-2] - H > 1 or out.shape[-1] - W > 1:
            raise ValueError(f"haar_waverec2d: size {(H, W)} does not fit the reconstruction {tuple(out.shape[-2:])}")
        out = out[..., :H, :W]
    return out


def haar_high_bands(x: Tensor, levels: int) -> list[Tensor]:
    """The ``3·J`` high bands of a ``J``-level decomposition as a flat list, ordered
    ``[LH_1, HL_1, HH_1, LH_2, ..., HH_J]`` (finest first). The low band ``LL_J`` is dropped."""
    _, highs = haar_wavedec2d(x, levels)
    return [band for level in highs for band in level]


def check_levels(levels: int) -> int:
    """``levels`` as an int; a ValueError unless it is a positive integer."""
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    return int(levels)


def clamp_levels(levels: int, size: Sequence[int]) -> int:
    """``J = min(levels, ⌊log2(min(H, W))⌋)``: the DWT depth a ``H×W`` map allows (0 for a 1-pixel side)."""
    levels = check_levels(levels)
    m = int(min(size))
    if m < 1:
        raise ValueError(f"feature size must be positive, got {tuple(size)}")
    return min(int(levels), m.bit_length() - 1)


def band_sets(x: Tensor, levels: int) -> list[Tensor]:
    """``J``-level Haar decomposition as band sets: ``[LL_J (N,C,1,h,w), level 1 (N,C,3,h,w), ...]``."""
    ll, highs = haar_wavedec2d(x, levels)
    return [ll.unsqueeze(2)] + [torch.stack(level, dim=2) for level in highs]


def reconstruct_from_sets(sets: Sequence[Tensor], scales: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """IDWT of the band sets, each multiplied by its spatial scale map ``N×h×w`` (shared by the orientations)
    and cropped to ``size``: ``IDWT(LL·scale_0, {band_{j,o}·scale_j})`` (docs/methods.md §7.2-7)."""
    if len(sets) != len(scales) or len(sets) < 2:
        raise ValueError(f"reconstruct_from_sets: need ≥2 band sets and one scale each, got {len(sets)}/{len(scales)}")
    scaled = [s * m[:, None, None] for s, m in zip(sets, scales)]
    highs = [tuple(s.unbind(dim=2)) for s in scaled[1:]]
    return haar_waverec2d(scaled[0][:, :, 0], highs, size=size)


def fft_amplitude(x: Tensor, norm: str = "ortho") -> Tensor:
    """Amplitude ``|FFT2(x)|`` over the last two dimensions, float32 with autocast off.

    ``norm="ortho"`` makes the transform unitary (Parseval: ``Σ|X|² == Σ|x|²``). No fftshift is applied:
    the DC term is at index ``[..., 0, 0]``.
    """
    if x.dim() < 2:
        raise ValueError(f"fft_amplitude: expected at least 2 dimensions, got shape {tuple(x.shape)}")
    with autocast_disabled(x.device):
        return torch.fft.fft2(x.float(), norm=norm).abs()
