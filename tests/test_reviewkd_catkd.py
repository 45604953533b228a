"""ReviewKD (docs/methods.md §4) and CAT-KD (docs/methods.md §5): losses by hand, ABF structure, method wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, Context, Outputs
from kdbench.methods.catkd import CATKD, binarize_cams, cat_loss
from kdbench.methods.reviewkd import ABF, ReviewFusion, ReviewKD, hcl_loss


def _ctx(shapes: dict, k: int = 10) -> Context:
    return Context(task="classification", num_classes=k, epochs=10, steps_per_epoch=5, dataset_size=100,
                   probe=lambda side, tap: shapes[(side, tap)])


def _batch(epoch: int = 1, n: int = 2, k: int = 10) -> Batch:
    return Batch(inputs=None, targets=torch.arange(n) % k, epoch=epoch, step=0, epochs=10, steps_per_epoch=5)


def _feats(shapes, n=2, grad=False):
    out = []
    for sh in shapes:
        x = torch.randn(n, *sh)
        out.append(x.requires_grad_(grad))
    return out


# -- HCL -------------------------------------------------------------------------------------------

def _patterns(h: int):
    """Orthogonal components over an h×h grid: checkerboard p (zero on every 2×2 block), column halves q,
    column pairs r (zero on 4-wide blocks)."""
    i = torch.arange(h).view(h, 1).expand(h, h)
    j = torch.arange(h).view(1, h).expand(h, h)
    p = ((i + j) % 2 * 2 - 1).float()
    q = torch.where(j < h // 2, 1.0, -1.0)
    r = torch.where((j // 2) % 2 == 0, 1.0, -1.0)
    return p, q, r


def test_hcl_h8_hand_value():
    p, q, r = _patterns(8)
    d = (1 + p + q + r).view(1, 1, 8, 8)
    ft = torch.randn(1, 1, 8, 8)
    # full: 1+1+1+1 = 4; 4×4 pool (2×2 bins): 1+q²+r² = 3; 2×2 pool: 1+q² = 2; 1×1: 1
    expected = (4 + 0.5 * 3 + 0.25 * 2 + 0.125 * 1) / 1.875
    got = hcl_loss([ft + d], [ft])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hcl_h4_skips_level_4():
    p, q, _ = _patterns(4)
    d = (1 + p + q).view(1, 1, 4, 4).repeat(2, 3, 1, 1)
    ft = torch.randn(2, 3, 4, 4)
    # full: 3; level 4 skipped (4 >= h); 2×2 pool: 1+q² = 2 with weight ½; 1×1: 1 with weight ¼
    expected = (3 + 0.5 * 2 + 0.25 * 1) / 1.75
    assert hcl_loss([ft + d], [ft]).item() == pytest.approx(expected, rel=1e-5)


def test_hcl_h1_is_plain_mse_and_pairs_sum():
    a, b = torch.randn(4, 5, 1, 1), torch.randn(4, 5, 1, 1)
    assert hcl_loss([a], [b]).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)
    c, d = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert hcl_loss([c, a[:2]], [d, b[:2]]).item() == pytest.approx(
        hcl_loss([c], [d]).item() + hcl_loss([a[:2]], [b[:2]]).item(), rel=1e-6)
    assert hcl_loss([c], [c]).item() == 0.0
    with pytest.raises(ValueError):
        hcl_loss([c], [d[:, :2]])


# -- ABF / ReviewFusion ----------------------------------------------------------------------------

def test_abf_structure_and_init():
    fused = ABF(16, 32, 24, fuse=True)
    conv1, bn1 = fused.conv1
    conv2, bn2 = fused.conv2
    assert conv1.weight.shape == (32, 16, 1, 1) and conv1.bias is None and bn1.num_features == 32
    assert conv2.weight.shape == (24, 32, 3, 3) and conv2.bias is None and conv2.padding == (1, 1)
    assert bn2.num_features == 24
    att, sig = fused.att_conv
    assert att.weight.shape == (2, 64, 1, 1) and att.bias is not None and isinstance(sig, torch.nn.Sigmoid)
    assert ABF(16, 32, 24, fuse=False).att_conv is None
    # kaiming_uniform_(a=1): U(-sqrt(3/fan_in), sqrt(3/fan_in)); PyTorch's default (a=√5) is √3 times narrower
    for w in (conv1.weight, conv2.weight):
        bound = math.sqrt(3.0 / (w[0].numel()))
        assert w.abs().max() <= bound + 1e-6
        assert w.abs().max() > 0.9 * bound


def test_abf_attention_gates_and_resizing():
    torch.manual_seed(0)
    abf = ABF(4, 6, 5, fuse=True)
    x, y = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    att = abf.att_conv[0]
    with torch.no_grad():
        att.weight.zero_()
        att.bias.copy_(torch.tensor([-60.0, 60.0]))  # z1 = 0, z2 = 1: pure residual
    _, res = abf(x, y, shape=4, out_shape=4)
    assert torch.allclose(res, F.interpolate(y, size=(4, 4), mode="nearest"), atol=1e-6)
    with torch.no_grad():
        att.bias.copy_(torch.tensor([60.0, -60.0]))  # z1 = 1, z2 = 0: the student's own projection
    out, res = abf(x, y, shape=4, out_shape=8)
    assert out.shape == (2, 5, 8, 8) and res.shape == (2, 6, 8, 8)
    assert torch.allclose(res, F.interpolate(abf.conv1(x), size=(8, 8), mode="nearest"), atol=1e-5)
    with pytest.raises(ValueError):
        abf(x, y, shape=3, out_shape=4)
    with pytest.raises(ValueError):
        abf(x, None, shape=4, out_shape=4)


def test_review_fusion_shapes_order_and_mid():
    torch.manual_seed(0)
    fusion = ReviewFusion([8, 16, 32, 32], [12, 24, 48, 48], shapes=[8, 4, 2, 1], out_shapes=[16, 8, 4, 1])
    assert fusion.mid == 32
    assert [a.att_conv is None for a in fusion.abfs] == [False, False, False, True]
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2), torch.randn(2, 32, 1, 1)]
    outs = fusion(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 12, 16, 16), (2, 24, 8, 8), (2, 48, 4, 4), (2, 48, 1, 1)]
    # the deepest output depends only on the deepest input; shallow outputs see the deeper ones
    feats2 = [f.clone() for f in feats]
    feats2[0] = torch.randn_like(feats[0])
    outs2 = fusion(feats2)
    assert torch.allclose(outs[-1], outs2[-1]) and torch.allclose(outs[1], outs2[1])
    assert not torch.allclose(outs[0], outs2[0])
    feats3 = [f.clone() for f in feats]
    feats3[-1] = torch.randn_like(feats[-1])
    assert not torch.allclose(fusion(feats3)[0], outs[0])
    assert ReviewFusion([8, 1024], [8, 8], [2, 1], [2, 1]).mid == 512


# -- ReviewKD method -------------------------------------------------------------------------------

S_STAGES = [(8, 8, 8), (16, 4, 4), (32, 2, 2)]
T_STAGES = [(12, 8, 8), (24, 4, 4), (48, 2, 2)]


def _rkd_shapes(t_stages=T_STAGES):
    return {("student", "stages"): S_STAGES, ("student", "stages_preact"): S_STAGES,
            ("student", "stages_raw"): S_STAGES, ("student", "pooled"): [(32,)],
            ("teacher", "stages"): t_stages, ("teacher", "stages_preact"): t_stages, ("teacher", "pooled"): [(48,)]}


def _outputs(stages, pooled_c, tap, grad=False, n=2, k=10):
    st = _feats(stages, n, grad)
    pooled = torch.randn(n, pooled_c).requires_grad_(grad)
    return Outputs(logits=torch.randn(n, k), feats={tap: st, "pooled": [pooled]})


def test_reviewkd_wiring_loss_and_grads():
    torch.manual_seed(0)
    m = ReviewKD(_ctx(_rkd_shapes()), weight=2.0, warmup_epochs=20)
    assert m.taps().student == ("stages_raw", "pooled") and m.taps().teacher == ("stages_preact", "pooled")
    assert m.fusion.mid == 32
    assert [a.conv2[0].out_channels for a in m.fusion.abfs] == [12, 24, 48, 48]
    assert m.task_loss_weight == 1.0
    s = _outputs(S_STAGES, 32, "stages_raw", grad=True)
    t = _outputs(T_STAGES, 48, "stages_preact")
    out = m(s, t, _batch(epoch=40))
    assert set(out) == {"loss_reviewkd"}
    loss = out["loss_reviewkd"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = 2.0 * hcl_loss(m.fusion(s["stages_raw"] + [s["pooled"][0][:, :, None, None]]),
                              t["stages_preact"] + [t["pooled"][0][:, :, None, None]])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s["stages_raw"] + s["pooled"])
    for abf in m.fusion.abfs:
        assert abf.conv1[0].weight.grad is not None and abf.conv2[0].weight.grad.abs().sum() > 0
        if abf.att_conv is not None:
            assert abf.att_conv[0].weight.grad.abs().sum() > 0


def test_reviewkd_warmup_factor():
    torch.manual_seed(0)
    m = ReviewKD(_ctx(_rkd_shapes()), warmup_epochs=20)
    assert [m.warmup_factor(e) for e in (1, 10, 20, 35)] == [0.05, 0.5, 1.0, 1.0]
    s, t = _outputs(S_STAGES, 32, "stages_raw"), _outputs(T_STAGES, 48, "stages_preact")
    full = m(s, t, _batch(epoch=20))["loss_reviewkd"].item()
    assert m(s, t, _batch(epoch=1))["loss_reviewkd"].item() == pytest.approx(full / 20, rel=1e-5)
    assert m(s, t, _batch(epoch=100))["loss_reviewkd"].item() == pytest.approx(full, rel=1e-5)
    assert ReviewKD(_ctx(_rkd_shapes()), warmup_epochs=0).warmup_factor(1) == 1.0


def test_reviewkd_tap_options_and_stage_count_mismatch():
    m = ReviewKD(_ctx(_rkd_shapes()), student_preact=True, teacher_preact=False)
    assert m.taps().student == ("stages_preact", "pooled") and m.taps().teacher == ("stages", "pooled")
    t4 = [(6, 16, 16)] + T_STAGES
    m = ReviewKD(_ctx(_rkd_shapes(t4)))
    assert m.n_stages == 3 and len(m.fusion.abfs) == 4
    loss = m(_outputs(S_STAGES, 32, "stages_raw"), _outputs(t4, 48, "stages_preact"),
             _batch(epoch=20))["loss_reviewkd"]
    assert torch.isfinite(loss)


def test_reviewkd_wrn_student_taps_are_the_raw_residual_sums():
    """As mdistiller's ReviewKD: a WRN student feeds the ABFs its raw residual sums (not relu(bn(sum))), the
    teacher gives bn(sum) (its pre-activations)."""
    from kdbench.models.sources import build_model

    torch.manual_seed(0)
    student = build_model("kdbench:wrn_16_1", num_classes=10, in_chans=3).train()
    teacher = build_model("kdbench:wrn_16_2", num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 16, 16)

    def probe(side, tap):
        return [tuple(f.shape[1:]) for f in {"student": student, "teacher": teacher}[side](x, (tap,))[tap]]

    ctx = Context(task="classification", num_classes=10, epochs=1, steps_per_epoch=1, dataset_size=2, probe=probe)
    m = ReviewKD(ctx)
    s_out = student(x, m.taps().student)
    with torch.no_grad():
        net = student.net
        r1 = net.block1(net.conv1(x))
        raws = [r1, net.block2(r1)]
        raws.append(net.block3(raws[-1]))
        t_out = teacher(x, m.taps().teacher)
        t1 = teacher.net.block1(teacher.net.conv1(x))
    for got, raw in zip(s_out[m.student_tap], raws):
        torch.testing.assert_close(got, raw)
    torch.testing.assert_close(t_out[m.teacher_tap][0], teacher.net.block2.layer[0].bn1(t1))
    assert torch.isfinite(m(s_out, t_out, _batch(epoch=1))["loss_reviewkd"])


def test_reviewkd_check_pair():
    """teacher_preact/student_preact need models with pre-ReLU stage taps (kdbench CIFAR nets, torchvision
    ResNets, timm MobileNet-V1); refused at validate time on other models."""
    ReviewKD.check_pair({}, "kdbench:wrn_40_2", "kdbench:wrn_16_2")
    ReviewKD.check_pair({"teacher_preact": False}, "timm:resnet18", "kdbench:resnet8x4")
    ReviewKD.check_pair({"teacher_preact": False}, "torchvision:resnet34", "torchvision:resnet18")
    with pytest.raises(ValueError, match=r"teacher_preact=true .*'timm:resnet18'.*set teacher_preact: false"):
        ReviewKD.check_pair({}, "timm:resnet18", "kdbench:resnet8x4")
    ReviewKD.check_pair({"teacher_preact": True, "student_preact": True}, "torchvision:resnet34",
                        "torchvision:resnet18")
    ReviewKD.check_pair({"student_preact": True}, "torchvision:resnet50", "timm:mobilenetv1_100")
    with pytest.raises(ValueError, match=r"teacher_preact.*'torchvision:vgg16'"):
        ReviewKD.check_pair({"teacher_preact": True}, "torchvision:vgg16", "torchvision:resnet18")
    with pytest.raises(ValueError, match=r"student_preact=true .*student 'timm:resnet18'"):
        ReviewKD.check_pair({"student_preact": True}, "kdbench:resnet32x4", "timm:resnet18")
    # the base contract: every other method accepts every pair
    CATKD.check_pair({}, "timm:resnet18", "torchvision:resnet18")


def test_reviewkd_check_params():
    assert ReviewKD.check_params({"weight": 5.0})["warmup_epochs"] == 20
    with pytest.raises(ValueError, match="warmup"):
        ReviewKD.check_params({"warmup": 1})


# -- CAT-KD ----------------------------------------------------------------------------------------

def test_cat_loss_hand_values():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    z = torch.zeros_like(s)
    assert cat_loss(s, z, 1, False).item() == pytest.approx(2.5 ** 2)
    assert cat_loss(s, z, 2, False).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    t = torch.ones_like(s)
    # normalised: s/√30 vs t/2
    exp = sum((v / math.sqrt(30) - 0.5) ** 2 for v in (1, 2, 3, 4)) / 4
    assert cat_loss(s, t, 2, True).item() == pytest.approx(exp, rel=1e-6)
    # 4×4 maps pooled to 2×2 by 2×2 block means
    big = torch.arange(16.0).view(1, 1, 4, 4)
    blocks = torch.tensor([2.5, 4.5, 10.5, 12.5])
    assert cat_loss(big, torch.zeros(1, 1, 4, 4), 2, False).item() == pytest.approx((blocks ** 2).mean().item())


def test_cat_loss_normalisation_axes_and_eps():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 8, 8), torch.randn(3, 5, 4, 4)  # spatial sizes may differ
    assert cat_loss(s, t, 2, True).item() != pytest.approx(cat_loss(s, t, 2, False).item())
    # normalised loss ignores a positive scale per (n, k) (it would not if normalised over k or n)
    scale = torch.rand(3, 5, 1, 1) + 0.5
    assert cat_loss(s * scale, t, 2, True).item() == pytest.approx(cat_loss(s, t, 2, True).item(), rel=1e-5)
    # each (n,k) map has unit L2 over its s·s grid: against zero teacher (eps clamp, no NaN) the loss is 1/s²
    for res in (2, 4):
        assert cat_loss(s, torch.zeros_like(t), res, True).item() == pytest.approx(1 / res ** 2, rel=1e-5)
    assert cat_loss(s, s, 4, False).item() == 0.0 and cat_loss(s, s, 2, True).item() == 0.0
    with pytest.raises(ValueError):
        cat_loss(s, torch.randn(3, 6, 4, 4), 2, False)


def test_binarize_cams():
    cam = torch.tensor([[-3.0, 1.0], [2.0, 2.0]]).view(1, 1, 2, 2)  # mean |A| = 2
    assert binarize_cams(cam).view(-1).tolist() == [0.0, 0.0, 0.0, 0.0]
    cam = torch.tensor([[0.0, 1.0], [2.0, 5.0]]).view(1, 1, 2, 2)  # mean |A| = 2
    assert binarize_cams(cam).view(-1).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_catkd_method():
    shapes = {("student", "cam"): [(10, 4, 4)], ("teacher", "cam"): [(10, 8, 8)]}
    m = CATKD(_ctx(shapes), beta=3.0, resolution=2, student_bias=True)
    assert m.taps().student == ("cam",) and m.taps().teacher == ("cam",) and m.heterogeneous
    assert m.task_loss_weight == 1.0
    cs = torch.randn(2, 10, 4, 4, requires_grad=True)
    ct = torch.randn(2, 10, 8, 8)
    out = m(Outputs(logits=cs.mean((2, 3)), feats={"cam": [cs]}), Outputs(logits=ct.mean((2, 3)), feats={"cam": [ct]}),
            _batch())
    assert set(out) == {"loss_cat"}
    assert out["loss_cat"].item() == pytest.approx(3.0 * cat_loss(cs, ct, 2, False).item(), rel=1e-6)
    out["loss_cat"].backward()
    assert cs.grad is not None and cs.grad.abs().sum() > 0
    assert CATKD(_ctx(shapes), only_cat=True).task_loss_weight == 0.0
    assert CATKD(_ctx(shapes), ce_weight=0.5, student_bias=True).task_loss_weight == 0.5
    defaults = CATKD.check_params({})
    assert (defaults["beta"], defaults["resolution"], defaults["normalize"]) == (15.0, 2, False)
    assert defaults["student_bias"] is False
    with pytest.raises(ValueError, match="beta"):
        CATKD.check_params({"cam_resolution": 4})


def test_catkd_default_student_ce_is_bias_free():
    """docs/methods.md §5: the student is trained in the bias-free CAM form, logits = GAP(CAM), no FC bias."""
    shapes = {("student", "cam"): [(2, 2, 2)], ("teacher", "cam"): [(2, 2, 2)]}
    m = CATKD(_ctx(shapes, k=2), beta=1.0, ce_weight=0.5)
    assert m.task_loss_weight == 0.0  # the harness's CE on the biased logits is off
    # class 0's CAM is 0 everywhere, class 1's averages ln 3 -> bias-free logits (0, ln 3), p = (1/4, 3/4)
    cam_s = torch.zeros(1, 2, 2, 2)
    cam_s[0, 1] = torch.tensor([[0.0, 2 * math.log(3)], [math.log(3), math.log(3)]])
    cam_s.requires_grad_(True)
    bias = torch.tensor([5.0, -5.0])  # the student's FC bias: must not enter the CE
    s = Outputs(logits=cam_s.mean((2, 3)) + bias, feats={"cam": [cam_s]})
    t = Outputs(logits=None, feats={"cam": [cam_s.detach().clone()]})
    y = torch.tensor([1])
    out = m(s, t, Batch(inputs=None, targets=y, epoch=1, step=0, epochs=1, steps_per_epoch=1))
    assert set(out) == {"loss_cat", "loss_ce"}
    assert out["loss_cat"].item() == 0.0
    assert out["loss_ce"].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    out["loss_ce"].backward()
    assert cam_s.grad.abs().sum() > 0
    # the task's own loss is used when the context has one
    seen = []
    ctx = _ctx(shapes, k=2)
    ctx.task_loss = lambda o, tg: seen.append(o.logits.detach()) or o.logits.sum() * 0 + 7.0
    out = CATKD(ctx, ce_weight=2.0)(s, t, Batch(inputs=None, targets=y, epoch=1, step=0, epochs=1, steps_per_epoch=1))
    assert out["loss_ce"].item() == pytest.approx(14.0)
    assert torch.allclose(seen[0], torch.tensor([[0.0, math.log(3)]]))
    # only_cat: no CE at all; student_bias: the harness's CE instead
    assert set(CATKD(_ctx(shapes, k=2), only_cat=True)(s, t, _batch(n=1, k=2))) == {"loss_cat"}
    assert set(CATKD(_ctx(shapes, k=2), student_bias=True)(s, t, _batch(n=1, k=2))) == {"loss_cat"}
