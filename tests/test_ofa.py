"""OFA (docs/methods.md §15; official code Hao840/OFAKD distillers/ofa.py): the loss against hand and explicit
values, the projector branches of CNN and token students, the objective's wiring and a few training steps on
tiny heterogeneous timm pairs through the harness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import Batch, Context, Outputs
from kdbench.methods.ofa import OFA, PatchMerge, SepConv, TokenProject, TokenProjector, merge_count, ofa_loss, \
    student_kind_of

K = 10


# -- the loss ------------------------------------------------------------------------------------------------
def _explicit(zs, zt, y, eps, T):
    """The OFA loss written out element by element in float64 Python (independent of the implementation)."""
    total = 0.0
    for n in range(len(zs)):
        es = [math.exp(v / T) for v in zs[n]]
        et = [math.exp(v / T) for v in zt[n]]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        for k in range(len(ps)):
            w = (1.0 + pt[k]) ** eps - 1.0 if k == y[n] else pt[k] ** eps
            total += -w * math.log(ps[k])
    return total / len(zs)


def test_ofa_loss_hand_values():
    # uniform student and teacher over K=2, target 0: w = ((1 + 1/2)^ε − 1, (1/2)^ε), −log p_s = log 2
    z = torch.zeros(1, 2)
    y = torch.tensor([0])
    assert ofa_loss(z, z, y, eps=1.0).item() == pytest.approx(math.log(2), rel=1e-6)  # (0.5 + 0.5)·log 2
    assert ofa_loss(z, z, y, eps=2.0).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)  # (1.25 + 0.25)·log 2
    # a confident teacher: z_t = (log 3, 0) -> p_t = (3/4, 1/4); student uniform over 2; target 1
    zt = torch.tensor([[math.log(3.0), 0.0]])
    w = (0.75 ** 2) + ((1.25 ** 2) - 1.0)  # class 0 (not the target): p^ε; class 1 (target): (1 + p)^ε − 1
    assert ofa_loss(z, zt, torch.tensor([1]), eps=2.0).item() == pytest.approx(w * math.log(2), rel=1e-6)
    # the temperature divides the logits only: T=2 on (2·log 3, 0) gives the same p_t, and no T² factor
    zt2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert ofa_loss(z, zt2, torch.tensor([1]), eps=2.0, temperature=2.0).item() == pytest.approx(
        w * math.log(2), rel=1e-6)


@pytest.mark.parametrize("eps, T", [(1.0, 1.0), (1.5, 1.0), (0.7, 1.0), (1.5, 3.0), (2.0, 0.5)])
def test_ofa_loss_equals_the_explicit_formula(eps, T):
    g = torch.Generator().manual_seed(int(eps * 10 + T))
    zs, zt = torch.randn(3, 5, generator=g) * 2, torch.randn(3, 5, generator=g) * 2
    y = torch.tensor([4, 0, 2])
    got = ofa_loss(zs, zt, y, eps, T)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_explicit(zs.tolist(), zt.tolist(), y.tolist(), eps, T), rel=1e-5)
    # the target enters for ε ≠ 1 (at ε = 1, (p_t + m)^1 − m = p_t: the label drops out exactly)
    other = ofa_loss(zs, zt, torch.tensor([0, 1, 3]), eps, T).item()
    if eps == 1.0:
        assert other == pytest.approx(got.item(), rel=1e-6)
    else:
        assert other != pytest.approx(got.item(), rel=1e-3)


def test_ofa_loss_reductions_and_special_cases():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.tensor([1, 5, 0, 3])
    # batch mean: the mean of the per-sample losses (not a sum, not a mean over classes too)
    per = torch.stack([ofa_loss(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], 1.5) for i in range(4)])
    assert ofa_loss(zs, zt, y, 1.5).item() == pytest.approx(per.mean().item(), rel=1e-6)
    # ε = 1: exactly the cross-entropy against the teacher's probabilities (the label term is the harness's CE)
    ce_t = -(F.softmax(zt, 1) * F.log_softmax(zs, 1)).sum(1).mean()
    assert ofa_loss(zs, zt, y, 1.0).item() == pytest.approx(ce_t.item(), rel=1e-6)
    # ε ≠ 1 is not that plus a constant: the target weight is (1 + p_t,y)^ε − 1, the others p_t,k^ε
    pt = F.softmax(zt, 1)
    m = F.one_hot(y, 6).float()
    w = (pt + m) ** 1.5 - m
    assert ofa_loss(zs, zt, y, 1.5).item() == pytest.approx(-(w * F.log_softmax(zs, 1)).sum(1).mean().item(),
                                                            rel=1e-6)
    for wrong in (pt ** 1.5 + m, (pt + m) ** 1.5, pt ** 1.5):  # the exponent or the mask misplaced
        assert ofa_loss(zs, zt, y, 1.5).item() != pytest.approx(
            -(wrong * F.log_softmax(zs, 1)).sum(1).mean().item(), rel=1e-3)
    # one-hot or soft labels: their argmax is the target (the official code under label smoothing)
    soft = F.one_hot(y, 6).float() * 0.9 + 0.1 / 6
    assert ofa_loss(zs, zt, soft, 1.5).item() == pytest.approx(ofa_loss(zs, zt, y, 1.5).item(), rel=1e-7)
    # half-precision logits: computed in fp32, also under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo = ofa_loss(zs.bfloat16(), zt.bfloat16(), y, 1.5)
    assert lo.dtype == torch.float32
    # a gradient for the student only; a very confident student stays finite (log_softmax, not log(softmax))
    a = (zs * 50).requires_grad_(True)
    loss = ofa_loss(a, zt, y, 1.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError):
        ofa_loss(zs, zt[:, :5], y, 1.0)


# -- projectors ----------------------------------------------------------------------------------------------
def _ctx(stages, d_s, d_t, student_model="", k=K) -> Context:
    shapes = {("student", "stages"): stages, ("student", "pooled"): [(d_s,)], ("teacher", "pooled"): [(d_t,)]}
    return Context(task="classification", num_classes=k, epochs=2, steps_per_epoch=2, dataset_size=8,
                   student_model=student_model, probe=lambda side, tap: shapes[(side, tap)])


RESNET18_224 = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_cnn_projectors_resnet18_student():
    torch.manual_seed(0)
    m = OFA(_ctx(RESNET18_224, 512, 768, "timm:resnet18"))  # swin_t teacher: d_t = 768 > d_s
    assert m.student_kind == "cnn" and m.stages == (1, 2, 3, 4) and m.eps == (1.0,) * 5
    assert m.taps().student == ("stages",) and m.taps().teacher == ()
    for i, (proj, (c, h, w)) in enumerate(zip(m.projectors, RESNET18_224), start=1):
        seps = [b for b in proj if isinstance(b, SepConv)]
        assert len(seps) == 4 - i
        chans = [(b.op[0].in_channels, b.op[5].out_channels) for b in seps]
        if i == 1:
            assert chans == [(64, 128), (128, 256), (256, 768)]
        if i == 4:
            assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].bias is not None
            assert (proj[0].in_channels, proj[0].out_channels) == (512, 768)
        assert proj[-1].in_features == 768 and proj[-1].out_features == K
        x = torch.randn(2, c, h, w)
        pre = proj[:-3](x)
        assert pre.shape == (2, 768, 7, 7)  # every branch reaches the last stage's 7×7 grid
        assert proj(x).shape == (2, K)


def test_cnn_projectors_cifar_students():
    # kdbench CIFAR nets: 3-stage ResNets get n − i = 2, 1, 0 blocks; width max(d_s, d_t)
    m = OFA(_ctx([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64, 256))
    assert [sum(isinstance(b, SepConv) for b in p) for p in m.projectors] == [2, 1, 0]
    for p, sh in zip(m.projectors, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]):
        assert p[:-3](torch.randn(2, *sh)).shape == (2, 256, 8, 8) and p(torch.randn(2, *sh)).shape == (2, K)
    # VGG8: 4 stages, the last two at the same grid; the 1×1 conv at stage 4 only
    vgg = [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
    m = OFA(_ctx(vgg, 512, 512), stages=[3, 4], eps=[1.0, 2.0, 1.5])
    assert m.stages == (3, 4) and m.eps == (1.0, 2.0, 1.5)
    assert isinstance(m.projectors[0][0], SepConv) and isinstance(m.projectors[1][0], nn.Conv2d)
    assert all(p(torch.randn(2, *vgg[i - 1])).shape == (2, K) for p, i in zip(m.projectors, m.stages))


def test_token_projectors_deit_tiny_student():
    torch.manual_seed(0)
    deit = [(192, 14, 14)] * 4  # deit_tiny at 224: 14×14 patch grid, class token dropped by the tap
    m = OFA(_ctx(deit, 192, 512, "timm:deit_tiny_patch16_224"))  # resnet18 teacher
    assert m.student_kind == "token"
    assert [len(p.blocks) for p in m.projectors] == [3, 2, 1, 1]  # max(4 − i, 1)
    for p in m.projectors:
        assert isinstance(p, TokenProjector) and len(p.merge) == 1 and isinstance(p.merge[0], PatchMerge)
        assert isinstance(p.merge[0].act, nn.GELU)  # a single merge (the first) has GELU, as official
        assert all(b.attn.num_heads == 4 and b.attn.qkv.in_features == 192 for b in p.blocks)
        x = torch.randn(2, 192, 14, 14)
        assert p.merge(x.permute(0, 2, 3, 1)).shape == (2, 7, 7, 192)  # 14×14 -> 7×7
        assert p(x).shape == (2, K)
        assert p.head.in_features == 192 and p.head.out_features == K  # d_s, never d_t


def test_token_projectors_swin_like_student_and_grids():
    assert [merge_count(g, g) for g in (56, 28, 14, 7, 16, 8, 4, 15, 13)] == [3, 2, 1, 0, 1, 0, 0, 1, 0]
    swin = [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    m = OFA(_ctx(swin, 128, 64, "timm:swin_tiny_patch4_window7_224"))
    assert m.student_kind == "token"
    kinds = [[type(b).__name__ for b in p.merge] for p in m.projectors]
    assert kinds == [["PatchMerge"], ["TokenProject"], ["TokenProject"], []]
    for p, sh in zip(m.projectors, swin):
        assert p(torch.randn(2, *sh)).shape == (2, K)
    # three merges (a 56×56 stage): GELU, GELU, none; widths c -> d_s -> d_s -> d_s
    p = TokenProjector(8, 56, 56, 16, 1, K)
    assert [type(b.act).__name__ for b in p.merge] == ["GELU", "GELU", "Identity"]
    assert [b.reduction.in_features for b in p.merge] == [32, 64, 64]
    assert p.merge(torch.randn(1, 56, 56, 8)).shape == (1, 7, 7, 16)
    # an odd grid is zero-padded before merging: 15×15 -> 8×8
    assert PatchMerge(8, 16, True)(torch.randn(2, 15, 15, 8)).shape == (2, 8, 8, 16)
    assert TokenProject(8, 16)(torch.randn(2, 5, 8)).shape == (2, 5, 16)


def test_patch_merge_neighbour_order():
    pm = PatchMerge(1, 4, act=False)
    pm.norm, pm.reduction = nn.Identity(), nn.Identity()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)  # rows (a b), (c d)
    assert pm(x).flatten().tolist() == [1.0, 3.0, 2.0, 4.0]  # (0,0), (1,0), (0,1), (1,1)


def test_projector_init_as_official():
    torch.manual_seed(0)
    m = OFA(_ctx(RESNET18_224, 512, 768))
    m2 = OFA(_ctx([(192, 14, 14)] * 4, 192, 512, "timm:deit_tiny_patch16_224"))
    for mod in list(m.modules()) + list(m2.modules()):
        if isinstance(mod, nn.Linear):
            assert mod.weight.std().item() == pytest.approx(0.02, rel=0.15) or mod.weight.numel() < 2000
            assert mod.bias is None or mod.bias.abs().max() == 0
        elif isinstance(mod, nn.BatchNorm2d):
            assert (mod.weight == 1).all() and (mod.bias == 0).all()
        elif isinstance(mod, nn.Conv2d):
            fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]  # as PyTorch: not / groups
            if mod.weight.numel() > 2000:
                assert mod.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.15)


def test_params_and_errors():
    d = OFA.check_params({})
    assert d == {"stages": None, "eps": 1.0, "temperature": 1.0, "ofa_weight": 1.0, "kd_weight": 1.0,
                 "ce_weight": 1.0, "student_kind": "auto"}
    assert OFA.check_params({"eps": [1.5, 1, 1, 1, 1.5]})["eps"] == (1.5, 1.0, 1.0, 1.0, 1.5)
    ctx = _ctx([(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)], 64, 32)
    assert OFA(ctx, eps=1.5).eps == (1.5,) * 5 and OFA(ctx, eps=(2.0,)).eps == (2.0,) * 5
    assert OFA(ctx, ce_weight=0.5).task_loss_weight == 0.5
    with pytest.raises(ValueError, match="eps must be one value or 5"):
        OFA(ctx, eps=(1.0, 1.0))
    with pytest.raises(ValueError, match="stages"):
        OFA(ctx, stages=(0, 2))
    with pytest.raises(ValueError, match="stages"):
        OFA(_ctx([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64, 64), stages=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        OFA(_ctx([(30, 4, 4)] * 4, 30, 64), student_kind="token")
    assert OFA(ctx, student_kind="token").student_kind == "token"
    assert [student_kind_of(n) for n in ("timm:deit_tiny_patch16_224", "timm:resmlp_12_224",
                                         "timm:swin_tiny_patch4_window7_224", "timm:vit_small_patch16_224",
                                         "timm:resnet18", "timm:convnext_tiny", "kdbench:resnet8", "")] == \
        ["token"] * 4 + ["cnn"] * 4


def test_check_pair():
    swin = "timm:swin_tiny_patch4_window7_224"
    for t, s in [(swin, "timm:resnet18"), ("timm:vit_small_patch16_224", "timm:resnet18"),
                 ("timm:convnext_tiny", "timm:deit_tiny_patch16_224"), (swin, "timm:resmlp_12_224"),
                 ("kdbench:resnet32x4", "kdbench:resnet8x4"), ("kdbench:resnet56", "kdbench:resnet20"),
                 ("kdbench:wrn_40_2", "kdbench:wrn_16_2"), ("kdbench:vgg13", "kdbench:vgg8")]:
        OFA.check_pair({}, t, s)
    with pytest.raises(ValueError, match="student's 'stages' tap"):
        OFA.check_pair({}, "timm:resnet18", "torchvision:mobilenet_v3_small")
    with pytest.raises(ValueError, match="teacher's 'pooled' tap"):
        OFA.check_pair({}, "torchvision:mobilenet_v3_small", "timm:resnet18")


def test_forward_is_the_objective_of_the_spec():
    torch.manual_seed(0)
    stages = [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    m = OFA(_ctx(stages, 64, 48), stages=(2, 4), eps=(1.5, 2.0, 1.2), temperature=2.0, ofa_weight=0.5,
            kd_weight=3.0)
    feats = [torch.randn(4, *sh, requires_grad=True) for sh in stages]
    s = Outputs(logits=torch.randn(4, K, requires_grad=True), feats={"stages": feats})
    t = Outputs(logits=torch.randn(4, K))
    y = torch.tensor([1, 2, 3, 9])
    out = m(s, t, Batch(inputs=None, targets=y, epoch=1, step=0, epochs=2, steps_per_epoch=2))
    assert set(out) == {"loss_kd", "loss_ofa"} and all(v.dim() == 0 for v in out.values())
    assert out["loss_kd"].item() == pytest.approx(3.0 * ofa_loss(s.logits, t.logits, y, 1.2, 2.0).item(), rel=1e-6)
    manual = ofa_loss(m.projectors[0](feats[1]), t.logits, y, 1.5, 2.0) + \
        ofa_loss(m.projectors[1](feats[3]), t.logits, y, 2.0, 2.0)
    assert out["loss_ofa"].item() == pytest.approx(0.5 * manual.item(), rel=1e-5)
    (out["loss_kd"] + out["loss_ofa"]).backward()
    assert feats[0].grad is None and feats[2].grad is None  # undistilled stages
    assert feats[1].grad.abs().sum() > 0 and feats[3].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_terms_are_fp32_under_autocast():
    torch.manual_seed(0)
    for stages, d_s, model in (([(8, 16, 16), (16, 8, 8), (32, 4, 4)], 32, ""),
                               ([(16, 16, 16)] * 4, 16, "timm:deit_tiny_patch16_224")):
        m = OFA(_ctx(stages, d_s, 24, model))
        s = Outputs(logits=torch.randn(2, K), feats={"stages": [torch.randn(2, *sh) for sh in stages]})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(s, Outputs(logits=torch.randn(2, K)), Batch(None, torch.tensor([0, 1]), 1, 0, 2, 2))
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


# -- a few training steps on tiny heterogeneous timm pairs through the harness -----------------------------------
VIT_TINY = ("timm:vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2))
DEIT_TINY = ("timm:deit_tiny_patch16_224", dict(img_size=64, patch_size=4, embed_dim=32, depth=4, num_heads=2))
SWIN_TINY = ("timm:swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                                                       num_heads=(1, 1, 1, 1), window_size=2))
RESNET18 = ("timm:resnet18", {})


@pytest.mark.parametrize("teacher, student, size, kind", [
    (VIT_TINY, RESNET18, 32, "cnn"),       # ViT -> CNN
    (RESNET18, DEIT_TINY, 64, "token"),    # CNN -> ViT (16×16 grid: one merge)
    (RESNET18, SWIN_TINY, 64, "token"),    # CNN -> Swin (pyramidal token stages)
], ids=["vit-resnet18", "resnet18-deit", "resnet18-swin"])
def test_trains_on_tiny_heterogeneous_pairs(teacher, student, size, kind):
    from kdbench.data.base import ClassificationData, TensorImages
    from kdbench.models.sources import build_model
    from kdbench.runner import build_context
    from kdbench.step import train_step
    from kdbench.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, size, size, generator=g), torch.arange(8) % K
    ds = TensorImages(x, y, mean=[0.0] * 3, std=[1.0] * 3)
    data = ClassificationData(ds, ds, num_classes=K, in_chans=3, image_size=size, classes=[str(i) for i in range(K)])
    task = ClassificationTask()
    t_net = build_model(teacher[0], K, 3, **teacher[1]).eval().requires_grad_(False)
    s_net = build_model(student[0], K, 3, **student[1])
    OFA.check_pair({}, teacher[0], student[0])
    ctx = build_context(task, data, {"epochs": 1, "batch_size": 4}, s_net, t_net, torch.device("cpu"),
                        student[0], teacher[0])
    method = OFA(ctx, **OFA.check_params({"eps": 1.5}))
    assert method.student_kind == kind and len(method.projectors) == 4
    s_net.check_taps(method.taps().student)
    s_net.train()
    method.train()
    params = list(s_net.parameters()) + list(method.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in method.projectors.parameters()]
    for step in range(3):
        idx = torch.arange(4) + 4 * (step % 2)
        batch = Batch(inputs=x[idx], targets=y[idx], epoch=1, step=step, epochs=1, steps_per_epoch=3)
        out = train_step(s_net, t_net, method, task, batch, optimizer=opt)
        assert set(out.terms) == {"loss_kd", "loss_ofa"}
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.terms.values())
        assert torch.isfinite(out.loss)
        for name, p in method.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert sum(p.grad.abs().sum() for p in method.parameters()) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, method.projectors.parameters()))
    assert all(p.grad is None for p in t_net.parameters()) and not t_net.training
