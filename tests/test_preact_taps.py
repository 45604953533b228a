"""Pre-ReLU stage taps (``stages_preact``) of torchvision ResNets and timm's MobileNet-V1 with ReLU
(kdbench/models/tap.py): exact (``relu(stages_preact[i]) == stages[i]``), trained through, forward unchanged,
hooks only when asked for; ReviewKD's ``student_preact``/``teacher_preact`` on them (docs/methods.md §4.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.sources import build_model

from kdb_util import random_classification_data, tiny_suite

MODELS = [("torchvision:resnet18", {}), ("torchvision:resnet50", {}), ("timm:mobilenetv1_100", {"act_layer": "relu"})]


def _build(spec, kwargs, k=10):
    torch.manual_seed(0)
    return build_model(spec, k, 3, **kwargs)


def _first_conv(model) -> nn.Conv2d:
    return model.net.conv1 if model.name.startswith("torchvision:") else model.net.conv_stem


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec,kwargs", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_preact_is_exact_and_leaves_the_forward_alone(spec, kwargs, train):
    model = _build(spec, kwargs).train(train)
    assert "stages_preact" in model.supported
    x = _x()
    with torch.no_grad():
        plain = model(x, ("stages", "logits"))
        out = model(x, ("stages", "stages_preact", "logits"))
    pre, post = out["stages_preact"], out["stages"]
    assert [p.shape for p in pre] == [s.shape for s in post] and len(pre) == 4
    for p, s in zip(pre, post):
        assert torch.equal(F.relu(p), s)
        assert bool((p < 0).any())  # not the post-ReLU map
    assert torch.equal(out.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(plain["stages"], post))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())  # none left behind


def test_preact_is_the_last_blocks_residual_sum_and_the_pointwise_bn_output():
    """Against the blocks' own computation: torchvision BasicBlock ``bn2(conv2(·)) + identity``; timm
    MobileNet-V1's last DepthwiseSeparableConv: the batch norm of its pointwise conv before the ReLU."""
    rn = _build("torchvision:resnet18", {}).eval()
    x = _x()
    feats = {}
    blk = rn.net.layer4[-1]
    blk.register_forward_hook(lambda m, inp, out: feats.setdefault("in", inp[0]))
    with torch.no_grad():
        out = rn(x, ("stages_preact",))
        h = inp = feats["in"]
        h = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(h)))))
        assert torch.allclose(out["stages_preact"][3], h + inp, atol=1e-6)

    mv1 = _build("timm:mobilenetv1_100", {"act_layer": "relu"}).eval()
    blk = mv1.net.blocks[4][-1]
    blk.register_forward_hook(lambda m, inp, out: feats.__setitem__("mv1", inp[0]))
    with torch.no_grad():
        out = mv1(x, ("stages_preact",))
        bn = blk.bn2
        pw = blk.conv_pw(blk.bn1(blk.conv_dw(feats["mv1"])))
        ref = F.batch_norm(pw, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        assert torch.allclose(out["stages_preact"][3], ref, atol=1e-5)


@pytest.mark.parametrize("spec,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_gradient_reaches_the_network_through_the_preact_taps(spec, kwargs):
    model = _build(spec, kwargs).train()
    out = model(_x(), ("stages_preact",))
    loss = sum(p.square().mean() for p in out["stages_preact"])
    loss.backward()
    g = _first_conv(model).weight.grad
    assert g is not None and bool(g.abs().sum() > 0)


def test_no_hook_unless_stages_preact_is_asked_for(monkeypatch):
    model = _build("torchvision:resnet18", {})
    added = []
    real = nn.Module.register_forward_pre_hook

    def counting(self, *a, **k):
        added.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", counting)
    model(_x(), ("stages", "stages_raw", "final", "pooled", "logits"))
    assert added == []
    model(_x(), ("stages_preact",))
    assert len(added) == 4


@pytest.mark.parametrize("spec,kwargs,why", [
    ("timm:mobilenetv1_100", {}, r"ReLU6, not ReLU: build it with kwargs \{act_layer: relu\}"),
    ("timm:resnet18", {}, r"only timm's MobileNet-V1"),
    ("timm:vit_tiny_patch16_224", {"img_size": 32}, r"only timm's MobileNet-V1"),
])
def test_models_without_the_tap_refuse_it_naming_themselves(spec, kwargs, why):
    model = _build(spec, kwargs)
    assert "stages_preact" not in model.supported
    with pytest.raises(ValueError, match=rf"model '{spec}' does not provide tap 'stages_preact' \(.*{why}"):
        model.check_taps(["stages_preact"])
    with pytest.raises(ValueError, match=rf"model '{spec}' does not provide tap 'stages_preact'"):
        model(torch.randn(1, 3, 32, 32), ("stages_preact",))


def test_reviewkd_preact_validates_on_torchvision_and_refuses_a_vit(write_suite):
    from kdbench.suite import SuiteError, load_suite

    rkd = {"name": "reviewkd", "params": {"student_preact": True, "teacher_preact": True}}

    def suite(teacher, student):
        return tiny_suite(pairs=[{"teacher": {"model": teacher, "weights": "/nonexistent/t.pth"},
                                  "student": {"model": student}}], methods=[rkd])

    s = load_suite(write_suite(suite("torchvision:resnet34", "torchvision:resnet18")))
    assert [r.params["teacher_preact"] for r in s.specs if r.method == "reviewkd"] == [True]
    load_suite(write_suite(suite("torchvision:resnet50", "timm:mobilenetv1_100")))
    with pytest.raises(SuiteError, match=r"teacher_preact=true needs the 'stages_preact' tap, .*not the teacher "
                                         r"'timm:vit_tiny_patch16_224'; set teacher_preact: false"):
        load_suite(write_suite(suite("timm:vit_tiny_patch16_224", "torchvision:resnet18")))
    with pytest.raises(SuiteError, match=r"student_preact=true .*student 'timm:resnet18'; set student_preact: false"):
        load_suite(write_suite(suite("torchvision:resnet34", "timm:resnet18")))


def test_reviewkd_preact_training_step_resnet34_to_resnet18():
    """One step of ReviewKD with pre-ReLU taps on both sides, the teacher prepared as in a run (eval, frozen,
    batch norms folded): the student's taps get gradients, the teacher's are its pre-ReLU stages."""
    from kdbench.method import Batch
    from kdbench.perf import prepare_models
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.step import train_step
    from kdbench.tasks.classification import ClassificationTask

    data = random_classification_data(n=4, size=32)
    task, cpu = ClassificationTask(), torch.device("cpu")
    teacher, student = _build("torchvision:resnet34", {}), _build("torchvision:resnet18", {})
    ctx = build_context(task, data, {"epochs": 2, "batch_size": 4}, student, teacher, cpu,
                        "torchvision:resnet18", "torchvision:resnet34")
    cls = METHODS.get("reviewkd")
    method = cls(ctx, **cls.check_params({"student_preact": True, "teacher_preact": True, "warmup_epochs": 1}))
    assert method.taps().student == ("stages_preact", "pooled") and method.taps().teacher == ("stages_preact", "pooled")
    student.check_taps(method.taps().student)
    teacher.check_taps(method.taps().teacher)
    x = torch.stack([data.train[i][0] for i in range(4)])
    y = torch.tensor([int(data.train[i][1]) for i in range(4)])
    xb, yb = prepare_models(student, teacher, method, cpu, x, y, task=task)
    with torch.no_grad():
        t_out = teacher(xb, ("stages", "stages_preact"))
    assert all(bool((p < 0).any()) for p in t_out["stages_preact"])
    assert all(torch.allclose(F.relu(p), s) for p, s in zip(t_out["stages_preact"], t_out["stages"]))
    out = train_step(student, teacher, method, task, Batch(xb, yb, epoch=1, step=0, epochs=2, steps_per_epoch=1))
    assert torch.isfinite(out.loss) and float(out.terms["loss_reviewkd"].detach()) > 0
    assert bool(student.net.conv1.weight.grad.abs().sum() > 0)
    assert all(p.grad is not None for p in method.fusion.parameters() if p.requires_grad)


@pytest.mark.parametrize("spec,kwargs", [
    ("torchvision:resnet18", {}), ("torchvision:resnext50_32x4d", {}), ("torchvision:wide_resnet50_2", {}),
    ("torchvision:vgg11", {}), ("timm:mobilenetv1_100", {"act_layer": "relu"}),
    ("timm:mobilenetv1_100h", {"act_layer": "relu"}), ("timm:mobilenetv1_125", {"act_layer": "relu"}),
    ("timm:resnet18", {}), ("timm:vit_tiny_patch16_224", {"img_size": 32}),
])
def test_validate_time_taps_agree_with_the_built_model(spec, kwargs):
    """The torch-free tap metadata validate reads (kdbench.models.catalog) says ``stages_preact`` exactly where
    the built model (with the suite's kwargs) provides it."""
    from kdbench.models.catalog import model_taps

    assert ("stages_preact" in model_taps(spec)) == ("stages_preact" in _build(spec, kwargs).supported)


def test_timm_mobilenetv1_preact_survives_the_teacher_fold():
    """A frozen MobileNet-V1 teacher has its norms folded (kdbench.models.fold): the pre-ReLU taps stay exact."""
    import copy

    from kdbench.models.fold import fold_frozen_bn

    torch.manual_seed(0)
    net = build_model("timm:mobilenetv1_100", 10, 3, act_layer="relu").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x, ("stages", "stages_preact"))
    folded = copy.deepcopy(net)
    assert fold_frozen_bn(folded, lambda: folded(x, ("stages", "stages_preact"))) > 0
    with torch.no_grad():
        out = folded(x, ("stages", "stages_preact"))
    for a, b in zip(out["stages_preact"], ref["stages_preact"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for p, s in zip(out["stages_preact"], out["stages"]):
        assert torch.equal(torch.relu(p), s)
