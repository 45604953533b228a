"""UHKD (docs/methods.md §10, [INTERP]): spectral pipeline, FTM invariance, FAM learnability, multi-level wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, Context, Outputs
from kdbench.methods.kd import kd_loss
from kdbench.methods.uhkd import FAM, FTM, UHKD, spectral_tokens


def _ctx(shapes: dict, k: int = 10) -> Context:
    return Context(task="classification", num_classes=k, epochs=10, steps_per_epoch=5, dataset_size=100,
                   probe=lambda side, tap: shapes[(side, tap)])


def _batch(n: int = 2, k: int = 10) -> Batch:
    return Batch(inputs=None, targets=torch.arange(n) % k, epoch=1, step=0, epochs=10, steps_per_epoch=5)


def _outputs(stages, n=2, k=10, grad=False):
    feats = [torch.randn(n, *sh).requires_grad_(grad) for sh in stages]
    logits = torch.randn(n, k).requires_grad_(grad)
    return Outputs(logits=logits, feats={"stages": feats})


def test_spectral_tokens_constant_map_hand_value():
    c = 0.75
    x = torch.full((1, 3, 8, 8), c)
    tok = spectral_tokens(x, grid=8)  # no pooling: 8×8 grid
    assert tok.shape == (1, 64, 3)
    # ortho FFT of a constant: DC = c·sqrt(64), everything else 0; fftshift puts DC at (4, 4) -> token 36
    expected = torch.zeros(1, 64, 3)
    expected[0, 36] = math.log1p(c * 8)
    assert torch.allclose(tok, expected, atol=1e-6)
    cplx = spectral_tokens(x, grid=8, spectrum="complex")
    assert cplx.shape == (1, 64, 6)
    assert torch.allclose(cplx[0, 36, :3], torch.full((3,), math.log1p(c * 8)), atol=1e-6)
    assert cplx[..., 3:].abs().max() < 1e-6  # imaginary part of a real constant's spectrum
    assert spectral_tokens(-x, grid=8, spectrum="complex")[0, 36, 0].item() == pytest.approx(-math.log1p(c * 8))


def test_spectral_tokens_pool_and_upsample_to_grid():
    x = torch.randn(2, 5, 14, 14)
    full = spectral_tokens(x, grid=14)
    pooled = spectral_tokens(x, grid=7)
    ref = F.adaptive_avg_pool2d(full.transpose(1, 2).reshape(2, 5, 14, 14), 7).flatten(2).transpose(1, 2)
    assert pooled.shape == (2, 49, 5) and torch.allclose(pooled, ref, atol=1e-6)
    small = spectral_tokens(torch.randn(2, 5, 4, 4), grid=7)  # smaller than the grid: brought up to 7×7
    assert small.shape == (2, 49, 5) and torch.isfinite(small).all()
    with pytest.raises(ValueError):
        spectral_tokens(x, grid=7, spectrum="phase")


def _tokens_by_definition(feat, grid, spectrum):
    """The pipeline as §10 states it: full FFT2, spectrum, fftshift, adaptive average pool, tokens."""
    X = torch.fft.fft2(feat.double(), norm="ortho")
    if spectrum == "amplitude":
        spec = torch.log1p(X.abs())
    else:
        ri = torch.cat([X.real, X.imag], dim=1)
        spec = torch.sign(ri) * torch.log1p(ri.abs())
    spec = F.adaptive_avg_pool2d(torch.fft.fftshift(spec, dim=(-2, -1)), (grid, grid))
    return spec.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("spectrum", ["amplitude", "complex"])
@pytest.mark.parametrize("hw", [(8, 8), (14, 14), (7, 9), (5, 6), (3, 3), (32, 32), (1, 4)])
def test_spectral_tokens_equal_the_definition_values_and_gradients(hw, spectrum):
    # the one-sided FFT + pooling matrices give the full-spectrum, fftshift, adaptive-pool numbers (odd and even
    # sizes, maps smaller than the grid) and the same gradients
    g = torch.Generator().manual_seed(hash(hw) % 1000)
    x = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(2, 49, 3 * (2 if spectrum == "complex" else 1), generator=g, dtype=torch.float64)
    a = x.clone().float().requires_grad_(True)
    got = spectral_tokens(a, 7, spectrum)
    (got.double() * w).sum().backward()
    b = x.clone().requires_grad_(True)
    ref = _tokens_by_definition(b, 7, spectrum)
    (ref * w).sum().backward()
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=2e-6, rtol=1e-5)
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)
    cl = spectral_tokens(x.float().contiguous(memory_format=torch.channels_last), 7, spectrum)
    assert torch.allclose(cl, got, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spectral_tokens_gradient_comes_back_in_the_feature_layout(channels_last):
    # the gradient reaching a (non-leaf) feature has its memory format and the definition's values
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = x.float().requires_grad_(True)
    feat = (leaf * 1.0).contiguous(memory_format=fmt)
    seen = []
    feat.register_hook(seen.append)
    w = torch.randn(2, 49, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (spectral_tokens(feat, 7).double() * w).sum().backward()
    b = x.clone().requires_grad_(True)
    (_tokens_by_definition(b, 7, "amplitude") * w).sum().backward()
    assert seen[0].is_contiguous(memory_format=fmt)
    assert torch.allclose(seen[0].double(), b.grad, atol=1e-5, rtol=1e-4)


def test_spectral_tokens_gradient_of_a_dead_channel_is_zero_not_nan():
    # post-ReLU maps have all-zero channels: every spectral bin is 0 there, and |·|'s gradient at 0 is 0
    x = torch.randn(2, 3, 8, 8)
    x[:, 1] = 0.0
    x[:, 2] = 0.5  # constant: only the DC bin is non-zero
    a = x.clone().requires_grad_(True)
    spectral_tokens(a, 7).sum().backward()
    b = x.clone().double().requires_grad_(True)
    _tokens_by_definition(b, 7, "amplitude").sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad[:, 1].abs().max() == 0
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_ftm_translation_invariance_and_layernorm():
    torch.manual_seed(0)
    ftm = FTM(grid=7)
    assert sum(p.numel() for p in ftm.parameters()) == 0
    x = torch.randn(2, 6, 14, 14)
    shifted = torch.roll(x, shifts=(3, -5), dims=(2, 3))
    a, b = ftm(x), ftm(shifted)
    assert a.shape == (2, 49, 6)
    assert torch.allclose(a, b, atol=1e-5)
    # LayerNorm over channels (eps 1e-5), no affine: per token zero mean and variance v/(v + eps)
    v = spectral_tokens(x, 7).var(-1, unbiased=False)
    assert torch.allclose(a.mean(-1), torch.zeros(2, 49), atol=1e-5)
    assert torch.allclose(a.var(-1, unbiased=False), v / (v + 1e-5), atol=1e-4)
    # the complex spectrum keeps the phase, so it is not shift-invariant
    ftm_c = FTM(grid=7, spectrum="complex")
    assert not torch.allclose(ftm_c(x), ftm_c(shifted), atol=1e-3)


def test_fam_shapes_and_grads():
    torch.manual_seed(0)
    fam = FAM(8, 24, grid=7)
    assert fam.sca.in_features == 8 and fam.sca.out_features == 24 and fam.pos.shape == (1, 49, 24)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    out = fam(x)
    assert out.shape == (2, 49, 24)
    F.mse_loss(out, FTM(7)(torch.randn(2, 24, 7, 7))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in fam.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    fc = FAM(8, 24, grid=5, spectrum="complex")
    assert (fc.sca.in_features, fc.sca.out_features) == (16, 48) and fc(torch.randn(2, 8, 6, 6)).shape == (2, 25, 48)


def test_fam_sra_is_a_plain_mlp_by_default():
    """docs/methods.md §10: SRA = a 2-layer MLP (no skip); ``residual=True`` is the h + MLP(h) variant."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for residual in (False, True):
        fam = FAM(3, 2, grid=2, residual=residual)
        with torch.no_grad():  # the MLP's last layer outputs the constant (1, -1) whatever h
            fam.sra[2].weight.zero_()
            fam.sra[2].bias.copy_(torch.tensor([1.0, -1.0]))
        out = fam(x)
        h = fam.sca(spectral_tokens(x, 2)) + fam.pos
        if residual:
            expected = F.layer_norm(h + torch.tensor([1.0, -1.0]), (2,))
        else:  # LayerNorm of (1, -1): mean 0, variance 1 -> (1, -1)/sqrt(1 + 1e-5)
            expected = torch.tensor([1.0, -1.0]).expand(2, 4, 2) / math.sqrt(1 + 1e-5)
        assert torch.allclose(out, expected, atol=1e-6), residual
    assert FAM(3, 2).residual is False
    ctx = _ctx({("student", "stages"): S_CNN, ("teacher", "stages"): T_CNN4})
    assert all(not f.residual for f in UHKD(ctx).fams)
    assert all(f.residual for f in UHKD(ctx, sra_residual=True).fams)
    assert UHKD.check_params({})["sra_residual"] is False


S_CNN = [(8, 16, 16), (16, 8, 8), (32, 4, 4)]
T_CNN4 = [(12, 32, 32), (24, 16, 16), (48, 8, 8), (96, 4, 4)]


def test_uhkd_stage_pairing_and_loss_decomposition():
    torch.manual_seed(0)
    m = UHKD(_ctx({("student", "stages"): S_CNN, ("teacher", "stages"): T_CNN4}), alpha=0.5, beta=2.0)
    assert m.taps().student == ("stages",) and m.taps().teacher == ("stages",) and m.heterogeneous
    # 3 student stages vs 4 teacher stages: the deepest 3 of each, deepest aligned
    assert m.n_levels == 3
    assert [(f.sca.in_features, f.sca.out_features) for f in m.fams] == [(8, 24), (16, 48), (32, 96)]
    s, t = _outputs(S_CNN, grad=True), _outputs(T_CNN4)
    out = m(s, t, _batch())
    assert set(out) == {"loss_kd", "loss_freq"}
    assert out["loss_kd"].item() == pytest.approx(0.5 * kd_loss(s.logits, t.logits, 4.0).item(), rel=1e-6)
    manual = sum(F.mse_loss(fam(fs), m.ftm(ft)) for fam, fs, ft in zip(m.fams, s["stages"], t["stages"][1:]))
    assert out["loss_freq"].item() == pytest.approx(2.0 * manual.item(), rel=1e-5)
    (out["loss_kd"] + out["loss_freq"]).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s["stages"])
    assert s.logits.grad is not None
    assert all(p.grad is not None for p in m.parameters())


def test_uhkd_vit_teacher_cnn_student():
    torch.manual_seed(0)
    vit = [(48, 14, 14)] * 4  # ViT blocks 3/6/9/12, tokens reshaped on the 14×14 patch grid
    cnn = [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    for spectrum in ("amplitude", "complex"):
        m = UHKD(_ctx({("student", "stages"): cnn, ("teacher", "stages"): vit}), spectrum=spectrum)
        s, t = _outputs(cnn, grad=True), _outputs(vit)
        out = m(s, t, _batch())
        total = out["loss_kd"] + out["loss_freq"]
        assert total.dim() == 0 and torch.isfinite(total)
        total.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        assert all(torch.isfinite(f.grad).all() for f in s["stages"])


def test_uhkd_params():
    d = UHKD.check_params({"beta": 3.0})
    assert (d["temperature"], d["alpha"], d["beta"], d["grid"], d["spectrum"]) == (4.0, 1.0, 3.0, 7, "amplitude")
    with pytest.raises(ValueError, match="temperature"):
        UHKD.check_params({"tau": 1.0})
    ctx = _ctx({("student", "stages"): S_CNN, ("teacher", "stages"): T_CNN4})
    with pytest.raises(ValueError):
        UHKD(ctx, spectrum="phase")
    assert UHKD(ctx, ce_weight=0.3).task_loss_weight == 0.3
