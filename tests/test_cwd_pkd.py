"""Tests of CWD and PKD, spatial and DWT domains (docs/methods.md §2, §3, §8)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdbench.freq import haar_high_bands, haar_wavedec2d, haar_waverec2d
from kdbench.method import Batch, Context, Outputs
from kdbench.methods.cwd import CWD, cwd_loss, dwt_cwd_loss
from kdbench.methods.pkd import PKD, dwt_pkd_loss, pkd_loss
from kdbench.registry import METHODS


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _ctx(task, shapes_s, shapes_t, tap):
    def probe(side, name):
        assert name == tap, f"unexpected tap probed: {name}"
        return shapes_s if side == "student" else shapes_t

    return Context(task=task, num_classes=5, epochs=10, steps_per_epoch=5, dataset_size=100, probe=probe)


BATCH = Batch(inputs=None, targets=torch.tensor([0, 1]), epoch=1, step=0, epochs=10, steps_per_epoch=5)


# ---------------------------------------------------------------------------------------------- CWD loss
def _cwd_loop(s, t, tau):
    """Explicit-loop reference: Σ_{n,c} Σ_i p_t (log p_t − log p_s) · τ² / (N·C)."""
    n_, c_, h_, w_ = s.shape
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            zs = [s[n, c, i, j].item() / tau for i in range(h_) for j in range(w_)]
            zt = [t[n, c, i, j].item() / tau for i in range(h_) for j in range(w_)]
            ls = math.log(sum(math.exp(v) for v in zs))
            lt = math.log(sum(math.exp(v) for v in zt))
            for a, b in zip(zs, zt):
                pt = math.exp(b - lt)
                total += pt * ((b - lt) - (a - ls))
    return total * tau * tau / (n_ * c_)


def test_cwd_hand_value():
    s, t = _rand(2, 3, 2, 3, seed=1), _rand(2, 3, 2, 3, seed=2)
    for tau in (1.0, 2.5):
        assert cwd_loss(s, t, tau).item() == pytest.approx(_cwd_loop(s, t, tau), rel=1e-5)


def test_cwd_tiny_closed_form():
    # one sample, one channel, two positions: student [0, 0] (uniform), teacher [0, log 3] -> p_t = [1/4, 3/4]
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([[[[0.0, math.log(3.0)]]]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert cwd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_cwd_zero_for_identical_and_positive_otherwise():
    t = _rand(2, 4, 5, 5)
    assert cwd_loss(t.clone(), t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss(_rand(2, 4, 5, 5, seed=3), t, 1.0).item() > 1e-3


def test_cwd_invariant_to_per_channel_constant():
    s, t = _rand(2, 3, 4, 4, seed=4), _rand(2, 3, 4, 4, seed=5)
    ref = cwd_loss(s, t, 2.0)
    off = _rand(2, 3, 1, 1, seed=6) * 5
    torch.testing.assert_close(cwd_loss(s + off, t, 2.0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cwd_loss(s, t - off, 2.0), ref, atol=1e-5, rtol=1e-5)


def test_cwd_not_sign_invariant():
    s, t = _rand(2, 3, 4, 4, seed=7), _rand(2, 3, 4, 4, seed=8)
    assert abs(cwd_loss(-s, -t, 1.0).item() - cwd_loss(s, t, 1.0).item()) > 1e-3
    assert cwd_loss(-t, t, 1.0).item() > 1e-2


def test_cwd_reduction_is_sum_over_positions_mean_over_n_and_c():
    s, t = _rand(2, 3, 4, 4, seed=9), _rand(2, 3, 4, 4, seed=10)
    ref = cwd_loss(s, t, 1.0).item()
    # duplicating samples or channels leaves a per-(N·C) mean unchanged (catches dividing by N or C only)
    assert cwd_loss(torch.cat([s, s]), torch.cat([t, t]), 1.0).item() == pytest.approx(ref, rel=1e-5)
    assert cwd_loss(torch.cat([s, s], 1), torch.cat([t, t], 1), 1.0).item() == pytest.approx(ref, rel=1e-5)
    # tiling positions leaves a KL over positions unchanged (catches dividing by H·W or averaging positions)
    tile = lambda x: x.repeat(1, 1, 2, 3)  # noqa: E731
    assert cwd_loss(tile(s), tile(t), 1.0).item() == pytest.approx(ref, rel=1e-5)
    # and the value is the per-(n, c) KL sum averaged over N·C
    per_nc = [_cwd_loop(s[n:n + 1, c:c + 1], t[n:n + 1, c:c + 1], 1.0) for n in range(2) for c in range(3)]
    assert ref == pytest.approx(sum(per_nc) / 6, rel=1e-5)


def test_cwd_tau_squared_scaling():
    s, t = _rand(2, 3, 3, 3, seed=11), _rand(2, 3, 3, 3, seed=12)
    for tau in (0.5, 2.0, 4.0):
        assert cwd_loss(s, t, tau).item() == pytest.approx(tau**2 * cwd_loss(s / tau, t / tau, 1.0).item(), rel=1e-5)


def test_cwd_shape_checks():
    with pytest.raises(ValueError):
        cwd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4), 1.0)
    with pytest.raises(ValueError):
        cwd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), 0.0)


# ------------------------------------------------------------------------------------------ DWT-CWD loss
def test_dwt_cwd_is_sum_over_high_bands():
    s, t = _rand(2, 3, 8, 8, seed=13), _rand(2, 3, 8, 8, seed=14)
    for J in (1, 3):
        bands = zip(haar_high_bands(s, J), haar_high_bands(t, J))
        expected = sum(_cwd_loop(bs, bt, 2.0) for bs, bt in bands)
        assert dwt_cwd_loss(s, t, 2.0, J).item() == pytest.approx(expected, rel=1e-5)


def test_dwt_cwd_ignores_student_constant_offset_and_low_band():
    s, t = _rand(2, 3, 8, 8, seed=15), _rand(2, 3, 8, 8, seed=16)
    ref = dwt_cwd_loss(s, t, 1.0, 3)
    off = _rand(2, 3, 1, 1, seed=17) * 3
    torch.testing.assert_close(dwt_cwd_loss(s + off, t, 1.0, 3), ref, atol=1e-5, rtol=1e-5)
    # a student differing from the teacher only in LL_J scores 0, though its spatial CWD does not
    ll, highs = haar_wavedec2d(t, 2)
    s2 = haar_waverec2d(ll + _rand(*ll.shape, seed=18), highs)
    assert dwt_cwd_loss(s2, t, 1.0, 2).item() == pytest.approx(0.0, abs=1e-5)
    assert cwd_loss(s2, t, 1.0).item() > 1e-3


def test_dwt_cwd_resizes_student():
    s, t = _rand(2, 3, 4, 4, seed=19), _rand(2, 3, 8, 8, seed=20)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dwt_cwd_loss(s, t, 1.0, 2), dwt_cwd_loss(up, t, 1.0, 2))


# ---------------------------------------------------------------------------------------------- PKD loss
def test_pkd_hand_value():
    s = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)  # mean 2, unbiased std 1
    t = torch.tensor([0.0, 0.0, 3.0]).view(1, 1, 1, 3)  # mean 1, unbiased var (1+1+4)/2 = 3
    sh = [v / (1 + 1e-6) for v in (-1.0, 0.0, 1.0)]
    th = [v / (math.sqrt(3) + 1e-6) for v in (-1.0, -1.0, 2.0)]
    expected = 0.5 * sum((a - b) ** 2 for a, b in zip(sh, th)) / 3
    assert pkd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_pkd_zero_for_identical():
    t = _rand(2, 4, 5, 5)
    assert pkd_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


def test_pkd_pearson_identity():
    n, c, h, w = 3, 4, 5, 6
    s, t = _rand(n, c, h, w, seed=21), _rand(n, c, h, w, seed=22) + 0.5 * _rand(n, c, h, w, seed=21)
    m = n * h * w
    fs, ft = s.transpose(0, 1).reshape(c, -1), t.transpose(0, 1).reshape(c, -1)
    r = torch.stack([torch.corrcoef(torch.stack([fs[k], ft[k]]))[0, 1] for k in range(c)])
    expected = ((m - 1) / m * (1 - r)).mean().item()
    assert pkd_loss(s, t).item() == pytest.approx(expected, rel=1e-4)


def test_pkd_invariant_to_per_channel_positive_affine_student():
    s, t = _rand(2, 3, 4, 4, seed=23), _rand(2, 3, 4, 4, seed=24)
    a = torch.tensor([0.5, 3.0, 10.0]).view(1, 3, 1, 1)
    b = torch.tensor([-2.0, 0.0, 7.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(pkd_loss(a * s + b, t), pkd_loss(s, t), atol=1e-5, rtol=1e-4)
    # a negative scale flips the correlation: not invariant
    assert abs(pkd_loss(-s, t).item() - pkd_loss(s, t).item()) > 1e-2


def test_pkd_normalises_per_channel_not_per_sample_or_position():
    t = _rand(2, 3, 4, 4, seed=25)
    per_sample = torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    # a per-sample or per-(sample, channel) standardisation would score these 0
    assert pkd_loss(t * per_sample, t).item() > 1e-2
    assert pkd_loss(t + 3.0 * per_sample, t).item() > 1e-2
    # a per-position standardisation (over C) would score this 0
    per_pos = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(26)) * 4 + 0.5
    assert pkd_loss(t * per_pos, t).item() > 1e-2


def test_pkd_uses_unbiased_std():
    # M = 2, r = −1: unbiased σ = √2 gives (M−1)/M · (1 − r) = 1; a biased σ (= 1) would give 2
    s = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    t = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2)
    assert pkd_loss(s, t).item() == pytest.approx(1.0, rel=1e-5)


def test_pkd_resizes_student_when_width_differs():
    s, t = _rand(2, 3, 4, 3, seed=27), _rand(2, 3, 4, 6, seed=28)
    up = F.interpolate(s, size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pkd_loss(s, t), pkd_loss(up, t))


def test_pkd_constant_student_channel_has_finite_gradient():
    s = _rand(2, 3, 4, 4, seed=29)
    s[:, 1] = 0.0  # a dead channel
    s.requires_grad_()
    loss = pkd_loss(s, _rand(2, 3, 4, 4, seed=30))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_pkd_degenerate_sizes():
    x = torch.randn(1, 2, 1, 1, requires_grad=True)
    loss = pkd_loss(x, torch.randn(1, 2, 1, 1))
    assert loss.item() == 0.0 and loss.requires_grad


# ------------------------------------------------------------------------------------------ DWT-PKD loss
def test_dwt_pkd_is_sum_over_standardised_bands():
    s, t = _rand(2, 3, 8, 8, seed=31), _rand(2, 3, 8, 8, seed=32)
    expected = sum(pkd_loss(bs, bt) for bs, bt in zip(haar_high_bands(s, 2), haar_high_bands(t, 2)))
    torch.testing.assert_close(dwt_pkd_loss(s, t, 2), expected)


def test_dwt_pkd_invariant_to_positive_channel_scale_shift():
    s, t = _rand(2, 3, 8, 8, seed=33), _rand(2, 3, 8, 8, seed=34)
    a = torch.tensor([0.2, 2.0, 5.0]).view(1, 3, 1, 1)
    b = torch.tensor([4.0, -1.0, 0.3]).view(1, 3, 1, 1)
    ref = dwt_pkd_loss(s, t, 3)
    torch.testing.assert_close(dwt_pkd_loss(a * s + b, t, 3), ref, atol=1e-5, rtol=1e-4)
    # per-(n, c) offsets live in LL only (even sizes)
    torch.testing.assert_close(dwt_pkd_loss(s + _rand(2, 3, 1, 1, seed=35), t, 3), ref, atol=1e-5, rtol=1e-4)
    assert ref.item() > 0.1


def test_dwt_pkd_skips_single_value_bands():
    s, t = _rand(1, 2, 2, 2, seed=36), _rand(1, 2, 2, 2, seed=37)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a std over one value would warn (degrees of freedom <= 0)
        assert dwt_pkd_loss(s, t, 1).item() == 0.0  # every band is 1×1 with N = 1
    s8, t8 = _rand(1, 2, 8, 8, seed=38), _rand(1, 2, 8, 8, seed=39)
    full = dwt_pkd_loss(s8, t8, 3)
    two = dwt_pkd_loss(s8, t8, 2)
    torch.testing.assert_close(full, two)  # level-3 bands are 1×1 with N = 1: skipped
    assert torch.isfinite(full)


# ------------------------------------------------------------------------------------------------ methods
def test_registered_and_params():
    assert METHODS.get("cwd") is CWD and METHODS.get("pkd") is PKD
    for cls in (CWD, PKD):
        with pytest.raises(ValueError, match="unknown parameter"):
            cls.check_params({"temperature": 2})
        assert cls.check_params({"domain": "dwt"})["domain"] == "dwt"
    assert CWD.param_defaults()["tau"] == 1.0 and PKD.param_defaults()["weight"] == 10.0
    assert PKD.param_defaults()["max_levels"] == 4
    assert "detection" in CWD.tasks and "segmentation" in CWD.tasks and "classification" in PKD.tasks


@pytest.mark.parametrize("domain", ["spatial", "dwt"])
def test_cwd_method_classification_adapter_and_grads(domain):
    ctx = _ctx("classification", [(4, 8, 8)], [(6, 8, 8)], "final")
    m = CWD(ctx, domain=domain)
    assert m.taps().student == ("final",) and m.taps().teacher == ("final",) and m.weight == 10.0
    fs = _rand(2, 4, 8, 8, seed=40).requires_grad_()
    ft = _rand(2, 6, 8, 8, seed=41)
    out = m(Outputs(None, {"final": [fs]}), Outputs(None, {"final": [ft]}), BATCH)
    assert set(out) == {"loss_cwd"}
    loss = out["loss_cwd"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    fn = cwd_loss if domain == "spatial" else (lambda a, b, tau: dwt_cwd_loss(a, b, tau, 3))
    torch.testing.assert_close(loss, 10.0 * fn(m.adapters[0](fs), ft, 1.0))
    loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    conv = m.adapters[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # a per-channel bias only shifts each spatial softmax: CWD gives it no gradient
    assert conv.bias.grad.abs().max() < 1e-6


def test_cwd_method_detection_all_levels_and_resize():
    shapes = [(8, 8, 8), (8, 4, 4), (8, 2, 2)]
    m = CWD(_ctx("detection", shapes, shapes, "fpn"))
    assert m.taps().student == ("fpn",) and m.weight == 10.0 and m.num_levels == 3
    assert all(isinstance(a, torch.nn.Identity) for a in m.adapters)
    fs = [_rand(2, *s, seed=50 + i) for i, s in enumerate(shapes)]
    ft = [_rand(2, *s, seed=60 + i) for i, s in enumerate(shapes)]
    loss = m(Outputs(None, {"fpn": fs}), Outputs(None, {"fpn": ft}), BATCH)["loss_cwd"]
    torch.testing.assert_close(loss, 10.0 * sum(cwd_loss(a, b, 1.0) for a, b in zip(fs, ft)))
    # a student of another spatial size is resized bilinearly to the teacher's
    m2 = CWD(_ctx("classification", [(3, 4, 4)], [(3, 8, 8)], "final"), weight=2.0, tau=2.0)
    a, b = _rand(2, 3, 4, 4, seed=70), _rand(2, 3, 8, 8, seed=71)
    got = m2(Outputs(None, {"final": [a]}), Outputs(None, {"final": [b]}), BATCH)["loss_cwd"]
    up = F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, 2.0 * cwd_loss(up, b, 2.0))


def test_cwd_method_segmentation_logits_default():
    ctx = _ctx("segmentation", [(5, 6, 6)], [(5, 6, 6)], "logits")
    m = CWD(ctx)
    assert m.taps().teacher == ("logits",) and m.weight == 5.0
    ls, lt = _rand(2, 5, 6, 6, seed=72), _rand(2, 5, 6, 6, seed=73)
    out = m(Outputs(ls, {"logits": [ls]}), Outputs(lt, {"logits": [lt]}), BATCH)
    torch.testing.assert_close(out["loss_cwd"], 5.0 * cwd_loss(ls, lt, 1.0))


def test_methods_reject_bad_config():
    ctx = _ctx("classification", [(4,)], [(4,)], "pooled")
    for cls in (CWD, PKD):
        with pytest.raises(ValueError, match="C×H×W"):
            cls(ctx, tap="pooled")
        with pytest.raises(ValueError, match="domain"):
            cls(_ctx("classification", [(4, 2, 2)], [(4, 2, 2)], "final"), domain="fft")
    with pytest.raises(ValueError, match="levels"):
        PKD(_ctx("classification", [(4, 2, 2)] * 2, [(4, 2, 2)] * 3, "stages"), tap="stages")


@pytest.mark.parametrize("domain", ["spatial", "dwt"])
def test_pkd_method_detection_first_four_levels(domain):
    shapes = [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2), (8, 1, 1)]
    m = PKD(_ctx("detection", shapes, shapes, "fpn"), domain=domain)
    assert m.num_levels == 4 and m.weight == 10.0 and m.taps().student == ("fpn",)
    fs = [_rand(2, *s, seed=80 + i).requires_grad_() for i, s in enumerate(shapes)]
    ft = [_rand(2, *s, seed=90 + i) for i, s in enumerate(shapes)]
    loss = m(Outputs(None, {"fpn": fs}), Outputs(None, {"fpn": ft}), BATCH)["loss_pkd"]
    fn = pkd_loss if domain == "spatial" else (lambda a, b: dwt_pkd_loss(a, b, 3))
    torch.testing.assert_close(loss, 10.0 * sum(fn(a, b) for a, b in zip(fs[:4], ft[:4])))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs[:4]) and fs[4].grad is None


def test_pkd_method_classification_adapter_grads_and_autocast():
    m = PKD(_ctx("classification", [(4, 4, 4)], [(6, 4, 4)], "final"))
    conv = m.adapters[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is None
    assert m.extra_parameters() == 4 * 6
    fs = _rand(2, 4, 4, 4, seed=100).requires_grad_()
    ft = _rand(2, 6, 4, 4, seed=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(Outputs(None, {"final": [fs]}), Outputs(None, {"final": [ft]}), BATCH)["loss_pkd"]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert fs.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0


def test_cwd_method_autocast_fp32():
    m = CWD(_ctx("classification", [(4, 4, 4)], [(4, 4, 4)], "final"), domain="dwt", dwt_levels=1)
    fs, ft = _rand(2, 4, 4, 4, seed=102), _rand(2, 4, 4, 4, seed=103)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(Outputs(None, {"final": [fs.bfloat16()]}), Outputs(None, {"final": [ft.bfloat16()]}), BATCH)
    assert loss["loss_cwd"].dtype == torch.float32 and torch.isfinite(loss["loss_cwd"])
