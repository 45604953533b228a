"""kdbench:mobilenetv2_tinyimagenet, mdistiller's Tiny-ImageNet MobileNetV2 student: architecture (parameter
count, shapes), its mdistiller state-dict names, the tap contract of the kdbench CIFAR nets, a distillation step.

The architecture is written out here from mdistiller's ``mdistiller/models/cifar/mv2_tinyimagenet.py`` (read, not
imported): stem 1×1 conv 3->32 with padding 1 + BN + ReLU6; groups (t, c, n, s) below of inverted residuals whose
convs all have a bias (an expand conv even for t = 1); head 1×1 conv 320->1280 + BN + ReLU6; average pooling; a
1×1-conv classifier ``conv2``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.models.cifar import CIFAR_MODELS, MobileNetV2TinyImageNet

NAME = "mobilenetv2_tinyimagenet"
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1),
           (6, 320, 1, 1)]
STAGE_GROUPS = (2, 3, 4)  # mdistiller's f1, f2, f3 are the outputs of stage2..4; f4 is the head


def build(num_classes: int = 200, in_chans: int = 3, seed: int = 0) -> MobileNetV2TinyImageNet:
    torch.manual_seed(seed)
    return CIFAR_MODELS[NAME](num_classes=num_classes, in_chans=in_chans)


def blocks(cin: int = 32):
    """``(group, index or None, cin, cout, stride, expand)`` of every block; index None: a one-block group, which
    mdistiller stores as the block itself (``stage1.residual...``), not as a Sequential (``stage2.0.residual...``)."""
    out = []
    for g, (t, c, n, s) in enumerate(SETTING, start=1):
        for i in range(n):
            out.append((g, i if n > 1 else None, cin, c, s if i == 0 else 1, t))
            cin = c
    return out


# ---------------------------------------------------------------------------------------------- mdistiller names
def mdistiller_shapes(k: int, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of mdistiller's ``mobilenetv2_tinyimagenet(num_classes=k)`` and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin_per_group, ksize):
        shapes[f"{name}.weight"] = (cout, cin_per_group, ksize, ksize)
        shapes[f"{name}.bias"] = (cout,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("pre.0", 32, in_chans, 1)
    bn("pre.1", 32)
    for g, i, cin, cout, _stride, t in blocks():
        base = f"stage{g}.residual" if i is None else f"stage{g}.{i}.residual"
        mid = cin * t
        conv(f"{base}.0", mid, cin, 1)
        bn(f"{base}.1", mid)
        conv(f"{base}.3", mid, 1, 3)  # depthwise
        bn(f"{base}.4", mid)
        conv(f"{base}.6", cout, mid, 1)
        bn(f"{base}.7", cout)
    conv("conv1.0", 1280, 320, 1)
    bn("conv1.1", 1280)
    conv("conv2", k, 1280, 1)
    return shapes


def n_params_from_layers(k: int, in_chans: int = 3) -> int:
    """Closed form from the layer list: conv ``cout·cin/groups·k² + cout`` (bias), BN ``2c``."""
    total = 32 * in_chans + 32 + 2 * 32  # stem
    for _g, _i, cin, cout, _s, t in blocks():
        mid = cin * t
        total += (cin * mid + mid) + 2 * mid  # expand 1×1 + BN
        total += (9 * mid + mid) + 2 * mid  # depthwise 3×3 + BN
        total += (mid * cout + cout) + 2 * cout  # project 1×1 + BN
    total += 320 * 1280 + 1280 + 2 * 1280  # head
    return total + 1280 * k + k  # classifier


def test_registered_and_listed():
    from kdbench.models import catalog
    from kdbench.models.sources import KdbenchSource, check_model, model_taps

    assert NAME in CIFAR_MODELS and NAME in catalog.KDBENCH_NAMES and NAME in KdbenchSource().names()
    check_model(f"kdbench:{NAME}")
    assert "stages_preact" in model_taps(f"kdbench:{NAME}")
    with pytest.raises(ValueError, match="mobilenetv2_tinyimagenet"):
        check_model("kdbench:mobilenetv2_tinyimagenett")  # the close match is suggested


def test_param_count():
    # By hand (mid = cin·t; a block has mid·(cin + cout + 15) + 3·cout parameters):
    #   stem 3·32 + 32 + 64 = 192
    #   stage1 (32->16, t=1)  2,064         stage2  5,352 + 9,144            = 14,496
    #   stage3 10,320 + 2·15,264 = 40,848   stage4 21,504 + 3·55,104         = 186,816
    #   stage5 67,488 + 2·119,520 = 306,528 stage6 156,576 + 2·322,080       = 800,736
    #   stage7 (160->320) 476,160           head 320·1280 + 1280 + 2560      = 413,440
    #   classifier 1280·200 + 200 = 256,200                          total   = 2,497,480
    assert n_params_from_layers(200) == 2_497_480
    net = build(200)
    assert sum(p.numel() for p in net.parameters()) == 2_497_480
    assert sum(p.numel() for p in build(10, in_chans=1).parameters()) == n_params_from_layers(10, in_chans=1)
    # full width: ~2.2M without the classifier, far more than CRD's half-width kdbench:mobilenetv2
    assert sum(p.numel() for p in CIFAR_MODELS["mobilenetv2"](num_classes=200).parameters()) < 1_000_000


@pytest.mark.parametrize("size,stem,spatial", [(64, 66, (33, 17, 9, 9)), (32, 34, (17, 9, 5, 5))])
def test_output_shapes(size, stem, spatial):
    """The padded 1×1 stem adds 2 px; stride-2 3×3 convs with padding 1 give ceil(h / 2): 66 -> 33 -> 17 -> 9."""
    net = build(200).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert tuple(net.pre(x).shape) == (2, 32, stem, stem)
        out = net.forward_taps(x)
    assert tuple(out["logits"].shape) == (2, 200)
    channels = (24, 32, 64, 1280)
    assert [tuple(s.shape) for s in out["stages"]] == [(2, c, h, h) for c, h in zip(channels, spatial)]
    assert [tuple(s.shape) for s in out["stages_preact"]] == [(2, c, h, h) for c, h in zip(channels, spatial)]
    assert tuple(out["final"].shape) == (2, 1280, spatial[-1], spatial[-1])
    assert tuple(out["pooled"].shape) == (2, 1280)


def test_stem_is_a_padded_1x1_conv_with_biases():
    net = build(10)
    stem = net.pre[0]
    assert stem.kernel_size == (1, 1) and stem.padding == (1, 1) and stem.bias is not None
    assert all(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert sum(isinstance(m, torch.nn.ReLU6) for m in net.modules()) == 1 + 2 * len(blocks())
    # PyTorch's default initialisation, as the reference (which defines none): conv biases are not zeroed
    assert net.pre[0].bias.abs().sum() > 0 and net.conv1[0].bias.abs().sum() > 0 and net.fc.bias.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- checkpoints
def _mdistiller_state(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under mdistiller's names (BN statistics positive variances, weights small enough for a
    finite forward)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in mdistiller_shapes(k).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # BN scale
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return state


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """mdistiller's eval-mode forward written with functional ops on its own state-dict names:
    ``(logits, [f1, f2, f3, f4])``."""

    def conv(h, name, stride=1, padding=0, groups=1):
        return F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], stride, padding, 1, groups)

    def bn(h, name):
        return F.batch_norm(h, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], False, 0.1, 1e-5)

    h = F.relu6(bn(conv(x, "pre.0", padding=1), "pre.1"))
    feats = []
    for g, i, cin, cout, stride, t in blocks():
        base = f"stage{g}.residual" if i is None else f"stage{g}.{i}.residual"
        out = F.relu6(bn(conv(h, f"{base}.0"), f"{base}.1"))
        out = F.relu6(bn(conv(out, f"{base}.3", stride, 1, groups=cin * t), f"{base}.4"))
        out = bn(conv(out, f"{base}.6"), f"{base}.7")
        h = out + h if (stride == 1 and cin == cout) else out
        last_of_group = i is None or i == SETTING[g - 1][2] - 1
        if last_of_group and g in STAGE_GROUPS:
            feats.append(h)
    h = F.relu6(bn(conv(h, "conv1.0"), "conv1.1"))
    feats.append(h)
    logits = conv(F.adaptive_avg_pool2d(h, 1), "conv2").flatten(1)
    return logits, feats


def test_mdistiller_state_dict_loads_and_computes_the_reference(tmp_path):
    """A state dict under mdistiller's names (its trainer saves ``{"model": student.state_dict()}``) loads through
    ``load_weights``: every name but the classifier is kdbench's own, ``conv2.*`` becomes ``fc.*`` (the 1×1-conv
    weight reshaped), and the loaded net computes mdistiller's forward."""
    from kdbench.models.sources import build_model, load_weights

    state = _mdistiller_state(200)
    own = build_model(f"kdbench:{NAME}", 200, 3).net.state_dict()
    ref_names = {k for k in state if not k.startswith("conv2.")}
    assert set(own) == ref_names | {"fc.weight", "fc.bias"}
    assert all(tuple(own[k].shape) == tuple(state[k].shape) for k in ref_names)

    for layout in ("mdistiller", "plain"):
        path = tmp_path / f"{layout}.pth"
        torch.save({"model": state, "epoch": 200} if layout == "mdistiller" else state, path)
        model = build_model(f"kdbench:{NAME}", 200, 3)
        load_weights(model, path)
        net = model.net
        got = net.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in ref_names), layout
        assert torch.equal(net.fc.weight, state["conv2.weight"].flatten(1))
        assert torch.equal(net.fc.bias, state["conv2.bias"])

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    net.eval()
    with torch.no_grad():
        out = net.forward_taps(x)
        ref_logits, ref_feats = _reference_forward(state, x)
    torch.testing.assert_close(out["logits"], ref_logits, rtol=1e-4, atol=1e-4)
    for got, ref in zip(out["stages"], ref_feats, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert out["stages_raw"] is out["stages"]  # mdistiller's feats[1:]

    # kdbench's own names load too; a checkpoint for another class count is one error line naming the file
    net2 = build(200, seed=1)
    net2.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(net2.fc.weight, net.fc.weight)
    with pytest.raises(ValueError) as e:
        load_weights(build_model(f"kdbench:{NAME}", 100, 3), tmp_path / "mdistiller.pth")
    assert str(tmp_path / "mdistiller.pth") in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- taps
def test_tap_contract_at_8x8_gray():
    """The quickstart input (1-channel 8×8): tap keys and shapes, pooled = mean(final), logits = fc(pooled),
    forward == forward_taps; linear-bottleneck stages are their own pre-activation (and have negatives), the head
    stage is relu(its pre-activation) exactly."""
    net = build(10, in_chans=1)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = net.train().forward_taps(x)  # batch statistics: pre-activations have both signs
        pres, posts = out["stages_preact"], out["stages"]
        for pre, post in zip(pres[:3], posts[:3], strict=True):
            assert pre is post and (post < 0).any()
        assert (pres[3] < 0).any() and torch.equal(F.relu(pres[3]), posts[3])
        assert out["final"] is posts[3]
        net.eval()
        out = net.forward_taps(x)
        assert torch.equal(net(x), out["logits"])
    assert set(out) == {"logits", "stages", "stages_preact", "stages_raw", "final", "pooled"}
    assert out["stages_raw"] is out["stages"]
    assert tuple(out["logits"].shape) == (3, 10)
    torch.testing.assert_close(out["pooled"], out["final"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["logits"], out["pooled"] @ net.fc.weight.T + net.fc.bias)
    sizes = [s.shape[-1] for s in out["stages"]]
    assert sizes == [5, 3, 2, 2]  # 8 -> stem 10 -> 5 -> 3 -> 2


def test_head_relu6_is_capped_preact_plus_relu():
    """Head outputs above 6 are cut at 6 (ReLU6): stages_preact[3] = min(BN output, 6)."""
    net = build(10).train()  # batch statistics: the head's BN output is standardised, then scaled by 50
    with torch.no_grad():
        net.conv1[1].weight.fill_(50.0)  # far above 6 and below 0
        x = torch.randn(2, 3, 16, 16)
        out = net.forward_taps(x)
        bn_out = net.conv1(net.stage7(net.stage6(net.stage5(out["stages"][2]))))
    assert (bn_out > 6).any() and (bn_out < 0).any()
    torch.testing.assert_close(out["stages_preact"][3], bn_out.clamp(max=6.0))
    torch.testing.assert_close(out["stages"][3], F.relu6(bn_out))
    assert out["stages"][3].max() == 6.0


def test_stage_modules_output_exactly_the_stages_and_edits_propagate():
    net = build(10).eval()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, o: seen.append(o)) for m in net.stage_modules()]
    with torch.no_grad():
        out = net.forward_taps(x)
    for h in handles:
        h.remove()
    assert len(seen) == 4 and all(a is b for a, b in zip(seen, out["stages"], strict=True))
    with torch.no_grad():
        h = net.stage_modules()[1].register_forward_hook(lambda _m, _i, o: torch.zeros_like(o))
        edited = net.forward_taps(x)
        h.remove()
    assert torch.count_nonzero(edited["stages"][1]) == 0
    assert not torch.equal(edited["final"], out["final"]) and not torch.equal(edited["logits"], out["logits"])


def test_backward_reaches_every_parameter():
    net = build(5).train()
    out = net.forward_taps(torch.randn(2, 3, 16, 16))
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 3])) + sum(s.pow(2).mean() for s in out["stages"])
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_tap_model_wrapper():
    from kdbench.models.sources import build_model

    model = build_model(f"kdbench:{NAME}", num_classes=200, in_chans=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), taps=("stages", "stages_preact", "stages_raw", "final", "pooled",
                                                     "cam", "logits", "module:stage7"))
    assert [tuple(s.shape[1:]) for s in out["stages"]] == [(24, 33, 33), (32, 17, 17), (64, 9, 9), (1280, 9, 9)]
    assert tuple(out["cam"][0].shape) == (2, 200, 9, 9)
    assert tuple(out["module:stage7"][0].shape) == (2, 320, 9, 9)
    assert model.tap_modules("stages") == model.net.stage_modules()
    assert model.tap_modules("final") == [model.net.head_relu]


# ---------------------------------------------------------------------------------------------- a training step
@pytest.mark.parametrize("method,params,size", [("reviewkd", {}, 32), ("reviewkd", {"student_preact": True}, 32),
                                                ("catkd", {}, 64), ("fitnet", {}, 64)])
def test_distillation_step_with_this_student(method, params, size):
    """One step of a stage/CAM method, teacher kdbench:resnet18 (the teacher of mdistiller's Tiny-ImageNet row),
    on Tiny-ImageNet-sized inputs (64 px; 32 px for ReviewKD, whose 512-channel fusion is slow on a CPU at 64 px):
    finite loss terms, gradients reach the student's stages, none the teacher."""
    from kdbench.method import Batch
    from kdbench.models.sources import build_model
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.step import train_step
    from kdbench.tasks.classification import ClassificationTask

    from kdb_util import random_classification_data

    k = 20
    torch.manual_seed(0)
    task = ClassificationTask()
    data = random_classification_data(4, size, k)
    student = build_model(f"kdbench:{NAME}", k, 3)
    teacher = build_model("kdbench:resnet18", k, 3).eval().requires_grad_(False)
    ctx = build_context(task, data, {"epochs": 2, "batch_size": 4}, student, teacher, torch.device("cpu"))
    cls = METHODS.get(method)
    cls.check_pair(params, "kdbench:resnet18", f"kdbench:{NAME}")
    m = cls(ctx, **cls.check_params(params))
    student.check_taps(m.taps().student)
    teacher.check_taps(m.taps().teacher)
    student.train()
    m.train()
    x = torch.stack([data.train[i][0] for i in range(4)])
    y = torch.stack([data.train[i][1] for i in range(4)])
    batch = Batch(inputs=x, targets=y, epoch=2, step=2, epochs=2, steps_per_epoch=2)
    terms = train_step(student, teacher, m, task, batch).terms
    assert terms and all(math.isfinite(float(v.detach())) for v in terms.values())
    assert student.net.stage2[0].residual[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the distillation terms alone (no CE) reach the student's early stages through its taps
    s_out = student(x, m.taps().student)
    with torch.no_grad():
        t_out = teacher(x, m.taps().teacher)
    kd = [v for k_, v in m(s_out, t_out, batch).items() if k_ != "loss_ce"]
    assert kd
    grads = torch.autograd.grad(sum(kd), list(student.net.stage2.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
