"""Folding the frozen teacher's batch norms into its convolutions (kdbench/models/fold.py, used by
kdbench.perf.prepare_models): the same outputs, taps, losses and gradients up to float rounding, and only the
pairs where it is exact are folded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdb_util import assert_same_step, one_classification_step
from kdbench.models.fold import FOLDED_ATTR, fold_frozen_bn
from kdbench.models.sources import build_model
from kdbench.registry import METHODS


def _randomise_norms(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats and affine parameters, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)


def _randomise_frozen(net: nn.Module, seed: int = 0) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def _n_norms(net):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


TAPS = ("stages", "stages_raw", "stages_preact", "pooled", "module:layer1.0.conv1", "module:layer2.1.bn2")


def test_fold_resnet_same_outputs_and_taps():
    torch.manual_seed(0)
    net = build_model("kdbench:resnet20", 10, 3).eval()
    _randomise_norms(net)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x, TAPS)
    folded = copy.deepcopy(net)
    n_before = _n_norms(folded)
    n = fold_frozen_bn(folded, lambda: folded(x, ()))
    assert n == n_before and _n_norms(folded) == 0  # every conv→BN pair of a CIFAR ResNet folds
    assert fold_frozen_bn(folded, lambda: folded(x, ())) == 0  # again: nothing left
    with torch.no_grad():
        out = folded(x, TAPS)  # taps asked for only after the fold, one of them on a folded conv
    assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for tap in TAPS:
        for a, b in zip(out[tap], ref[tap]):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), tap
    assert getattr(folded.get_submodule("net.layer1.0.conv1"), FOLDED_ATTR) is not None


class _Shared(nn.Module):
    """conv1's output feeds its BN and, through a skip, the output; conv2→bn2 is a plain pair; bn3 is fed by
    an addition, not a conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv1(x)
        h = torch.relu(self.bn1(a)) + a
        return self.bn3(self.bn2(self.conv2(h)) + h)


def test_fold_only_where_the_conv_output_has_no_other_reader():
    torch.manual_seed(0)
    net = _Shared().eval()
    _randomise_norms(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    assert fold_frozen_bn(net, lambda: net(x)) == 1
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn3, nn.BatchNorm2d)
    assert isinstance(net.bn2, nn.Identity) and net.conv2.bias is not None and not net.conv2.bias.requires_grad
    with torch.no_grad():
        assert torch.allclose(net(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_refuses_training_mode_and_keeps_zero_scale_norms():
    net = _Shared()
    with pytest.raises(ValueError, match="eval mode"):
        fold_frozen_bn(net, lambda: net(torch.randn(1, 3, 4, 4)))
    net.eval()
    with torch.no_grad():
        net.bn2.weight[1] = 0.0  # γ = 0: the pre-norm output could not be recovered from the folded conv
    assert fold_frozen_bn(net, lambda: net(torch.randn(1, 3, 4, 4))) == 0


def test_fold_torchvision_frozen_batchnorm():
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d).eval()
    _randomise_frozen(net, seed=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
    assert fold_frozen_bn(net, lambda: net(x)) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    with torch.no_grad():
        assert torch.allclose(net(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items()
                                        if "classification" in c.tasks and c.needs_teacher))
def test_fold_same_loss_and_grads_for_every_method(name):
    """Loss terms and student gradients of one step with the teacher prepared with or without the fold."""
    steps = []
    for fold in (False, True):
        steps.append(one_classification_step(name, fold=fold, teacher_setup=_randomise_norms))
        assert (_n_norms(steps[-1][2]) == 0) == fold
    assert_same_step(*steps)


# ------------------------------------------------------------------------------------------ detection teachers
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from kdbench.data.coco import CocoShapes

    return CocoShapes().build(tmp_path_factory.mktemp("shapes"), n_train=2, n_val=2, image_size=80, min_size=64,
                              max_size=96)


def _check_detector_fold(teacher, shapes, taps):
    from kdbench.tasks.detection import DetectionTask

    task = DetectionTask()
    x, _ = DetectionTask.collate([shapes.val[i] for i in range(2)])
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        ref = task.forward(teacher, x, None, taps)
    n_before = _n_norms(teacher)
    n = fold_frozen_bn(teacher, lambda: task.forward(teacher, x, None, taps))
    assert n > 0
    with torch.no_grad():
        out = task.forward(teacher, x, None, taps)
    for tap in taps:
        assert len(out[tap]) == len(ref[tap])
        for a, b in zip(out[tap], ref[tap]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), tap
    return n, n_before


def test_fold_torchvision_detector_teacher_fpn_and_regression_taps(shapes):
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    teacher = build_model("torchvision:retinanet_resnet18_fpn", shapes.model_num_classes, 3, fpn_channels=32,
                          frozen_bn=True)
    _randomise_frozen(teacher)
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in teacher.modules())
    n, _ = _check_detector_fold(teacher, shapes, ("fpn", "reg"))
    assert n == n_frozen == 20  # every backbone norm of a ResNet-18 follows its conv


def test_fold_mmdet_teacher(shapes):
    from kdbench.models import mmdet as M

    if M.missing_backend() is not None:
        pytest.skip(f"mmdet backend not installed ({M.missing_backend()}): {M.INSTALL}")
    torch.manual_seed(0)
    teacher = build_model("mmdet:retinanet_r18_fpn_1x_coco", shapes.model_num_classes, 3, cfg_options={
        "model.neck.in_channels": [64, 128, 256, 512], "model.neck.out_channels": 32,
        "model.bbox_head.in_channels": 32, "model.bbox_head.feat_channels": 32, "model.bbox_head.stacked_convs": 1})
    _randomise_norms(teacher)
    n, n_before = _check_detector_fold(teacher, shapes, ("fpn", "reg"))
    assert n == n_before == 20 and _n_norms(teacher) == 0


@pytest.mark.parametrize("model, kwargs", [("timm:mobilenetv1_100", {"act_layer": "relu"}), ("timm:resnet18", {})])
def test_fold_timm_norm_act_layers_keep_their_activation(model, kwargs):
    """timm applies a BN-based CNN's activation inside its norm module (BatchNormAct2d): the fold keeps it."""
    torch.manual_seed(0)
    net = build_model(model, 10, 3, **kwargs).eval()
    _randomise_norms(net)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x, ("stages",))
    folded = copy.deepcopy(net)
    assert fold_frozen_bn(folded, lambda: folded(x, ())) > 0
    with torch.no_grad():
        out = folded(x, ("stages",))
    assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-3)
    for a, b in zip(out["stages"], ref["stages"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_an_unknown_batch_norm_subclass_is_not_folded():
    class NormPlus(nn.BatchNorm2d):  # does more than the affine map: folding it would drop the +1
        def forward(self, x):
            return super().forward(x) + 1

    net = nn.Sequential(nn.Conv2d(3, 4, 3), NormPlus(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    assert fold_frozen_bn(net, lambda: net(x)) == 0
    with torch.no_grad():
        assert torch.equal(net(x), ref)
