"""Tests of the Haar DWT in kdbench/freq.py (docs/methods.md §6)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdbench.freq import (
    fft_amplitude,
    haar_dwt2d,
    haar_high_bands,
    haar_idwt2d,
    haar_wavedec2d,
    haar_waverec2d,
)

SIZES = [(8, 8), (6, 10), (7, 9), (5, 6), (9, 4), (1, 3)]


def _energy(t):
    return t.double().pow(2).sum()


def _all_energy(ll, highs):
    return _energy(ll) + sum(_energy(b) for level in highs for b in level)


@pytest.fixture(scope="module")
def dwt_forward():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorch_wavelets import DWTForward
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"pytorch_wavelets unavailable (needs PyWavelets and setuptools<81): {e!r}")
    return DWTForward


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("J", [1, 2, 3])
def test_matches_pytorch_wavelets(dwt_forward, size, J):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    yl, yh = dwt_forward(J=J, wave="haar", mode="zero").double()(x)
    ll, highs = haar_wavedec2d(x, J)
    assert ll.dtype == torch.float32
    assert len(highs) == J
    torch.testing.assert_close(ll, yl.float(), atol=1e-6, rtol=0)
    for j, (lh, hl, hh) in enumerate(highs):
        torch.testing.assert_close(lh, yh[j][:, :, 0].float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(hl, yh[j][:, :, 1].float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(hh, yh[j][:, :, 2].float(), atol=1e-6, rtol=0)


def test_hand_computed_2x2():
    # block [[a, b], [c, d]] = [[1, 2], [3, 5]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    ll, lh, hl, hh = haar_dwt2d(x)
    assert ll.item() == pytest.approx((1 + 2 + 3 + 5) / 2)
    assert lh.item() == pytest.approx((1 + 2 - 3 - 5) / 2)  # -2.5: top minus bottom
    assert hl.item() == pytest.approx((1 - 2 + 3 - 5) / 2)  # -1.5: left minus right
    assert hh.item() == pytest.approx((1 - 2 - 3 + 5) / 2)  # 0.5
    torch.testing.assert_close(haar_idwt2d(ll, lh, hl, hh), x)


def test_odd_size_is_zero_padded_bottom_right():
    x = torch.tensor([[[[1.0, 2.0, 4.0], [3.0, 5.0, 7.0], [6.0, 8.0, 9.0]]]])
    ll, lh, hl, hh = haar_dwt2d(x)
    assert ll.shape == (1, 1, 2, 2)
    # bottom-right block is [[9, 0], [0, 0]]
    assert ll[0, 0, 1, 1].item() == pytest.approx(4.5)
    assert hh[0, 0, 1, 1].item() == pytest.approx(4.5)
    # top-right block is [[4, 0], [7, 0]]
    assert lh[0, 0, 0, 1].item() == pytest.approx((4 - 7) / 2)
    assert hl[0, 0, 0, 1].item() == pytest.approx((4 + 7) / 2)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("J", [1, 3])
def test_perfect_reconstruction(size, J):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    ll, highs = haar_wavedec2d(x, J)
    torch.testing.assert_close(haar_waverec2d(ll, highs, size=size), x, atol=1e-5, rtol=0)
    if size[0] % 2 == 0 and size[1] % 2 == 0 and J == 1:
        torch.testing.assert_close(haar_waverec2d(ll, highs), x, atol=1e-5, rtol=0)


def test_waverec_without_size_keeps_padding():
    x = torch.randn(1, 2, 5, 7)
    ll, highs = haar_wavedec2d(x, 2)
    out = haar_waverec2d(ll, highs)
    assert out.shape == (1, 2, 6, 8)
    torch.testing.assert_close(out[..., :5, :7], x, atol=1e-5, rtol=0)
    assert out[..., 5, :].abs().max() < 1e-5 and out[..., :, 7].abs().max() < 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_parseval(size):
    torch.manual_seed(2)
    x = torch.randn(2, 3, *size)
    for J in (1, 2, 3):
        ll, highs = haar_wavedec2d(x, J)
        assert _all_energy(ll, highs).item() == pytest.approx(_energy(x).item(), rel=1e-5)


def test_constant_map_has_zero_high_bands():
    x = torch.full((2, 3, 8, 8), 3.7) + torch.arange(3.0).view(1, 3, 1, 1)
    for band in haar_high_bands(x, 3):
        assert band.abs().max().item() < 1e-5
    ll, _ = haar_wavedec2d(x, 3)
    # LL of a constant c after J orthonormal levels is c·2^J
    torch.testing.assert_close(ll[:, 1], torch.full_like(ll[:, 1], 4.7 * 8))


def test_all_band_mse_equals_spatial_mse():
    torch.manual_seed(3)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ll_a, ha = haar_wavedec2d(a, 3)
    ll_b, hb = haar_wavedec2d(b, 3)
    sq = F.mse_loss(ll_a, ll_b, reduction="sum") + sum(
        F.mse_loss(x, y, reduction="sum") for la, lb in zip(ha, hb) for x, y in zip(la, lb)
    )
    assert (sq / a.numel()).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-5)


def test_high_bands_order_and_count():
    x = torch.randn(1, 2, 8, 8)
    bands = haar_high_bands(x, 2)
    _, highs = haar_wavedec2d(x, 2)
    assert len(bands) == 6
    assert [tuple(b.shape[-2:]) for b in bands] == [(4, 4)] * 3 + [(2, 2)] * 3
    torch.testing.assert_close(bands[4], highs[1][1])


def test_autocast_bfloat16_returns_fp32():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)
    ref_ll, ref_highs = haar_wavedec2d(x, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ll, highs = haar_wavedec2d(x, 2)
        ll_b, _ = haar_wavedec2d(x.bfloat16(), 1)
        rec = haar_waverec2d(ll, highs)
        amp = fft_amplitude(x)
    assert ll.dtype == torch.float32 and rec.dtype == torch.float32 and amp.dtype == torch.float32
    assert ll_b.dtype == torch.float32
    assert all(b.dtype == torch.float32 for lv in highs for b in lv)
    torch.testing.assert_close(ll, ref_ll)  # bit-compatible with the fp32 path
    torch.testing.assert_close(rec, x, atol=1e-5, rtol=0)


def test_gradient_flows():
    x = torch.randn(1, 2, 7, 6, requires_grad=True)
    w = torch.randn(1, 2, 4, 3)
    ll, lh, hl, hh = haar_dwt2d(x)
    (w * hh).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the adjoint of an orthonormal transform is its inverse: grad = IDWT(0, 0, 0, w), cropped
    z = torch.zeros_like(w)
    torch.testing.assert_close(x.grad, haar_idwt2d(z, z, z, w)[..., :7, :6])
    bands = [b.detach().requires_grad_() for b in (ll, lh, hl, hh)]
    (haar_idwt2d(*bands) * torch.randn(1, 2, 8, 6)).sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in bands)


def test_fft_amplitude_parseval_and_shift():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 6, 5)
    amp = fft_amplitude(x)
    assert amp.shape == x.shape
    assert _energy(amp).item() == pytest.approx(_energy(x).item(), rel=1e-5)
    # amplitude is invariant to circular shifts; DC (ortho) is sum / sqrt(HW)
    torch.testing.assert_close(fft_amplitude(torch.roll(x, (1, 2), dims=(-2, -1))), amp, atol=1e-5, rtol=0)
    torch.testing.assert_close(amp[..., 0, 0], x.sum((-2, -1)).abs() / math.sqrt(30), atol=1e-5, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        haar_dwt2d(torch.randn(3, 4, 4))
    with pytest.raises(ValueError):
        haar_wavedec2d(torch.randn(1, 1, 4, 4), 0)
    with pytest.raises(ValueError):
        haar_idwt2d(*(torch.randn(1, 1, 2, 2),) * 3, torch.randn(1, 1, 2, 3))
