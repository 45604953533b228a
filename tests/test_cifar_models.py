"""kdbench.models.cifar: architectures (parameter counts, shapes), the tap dictionary, checkpoint key layout."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.cifar import CIFAR_MODELS, WideResNet, channel_shuffle

ALL = sorted(CIFAR_MODELS)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return CIFAR_MODELS[name](**kw)


# ---------------------------------------------------------------------------------------------- registry
def test_names_and_signatures():
    expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
                "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflev1", "shufflev2"}
    assert expected <= set(CIFAR_MODELS)
    for name, fn in CIFAR_MODELS.items():
        sig = inspect.signature(fn)
        assert sig.parameters["num_classes"].default == 100, name
        assert sig.parameters["in_chans"].default == 3, name
        assert fn.__doc__, name


# ---------------------------------------------------------------------------------------------- parameter counts
# Sizes of the mdistiller/CRD CIFAR-100 models in millions, as usually quoted for the CRD protocol. Source: the
# mdistiller code (megvii-research/mdistiller, mdistiller/models/cifar); kdbench's state dicts were checked, while
# these models were written, to load strictly into a transcription of it and to give the same outputs.
PUBLISHED_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet56": 0.86, "resnet20": 0.28, "resnet110": 1.74,
    "resnet32": 0.47, "wrn_40_2": 2.25, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "vgg13": 9.46, "vgg8": 3.96,
    "mobilenetv2": 0.81, "shufflev1": 0.95, "shufflev2": 1.35, "resnet50": 23.71,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count_matches_published(name):
    got = n_params(CIFAR_MODELS[name](num_classes=100)) / 1e6
    assert abs(got - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, (name, got)


def _cifar_resnet_count(depth: int, w: tuple[int, int, int, int], k: int, cin: int = 3) -> int:
    """Closed form: stem conv+BN, 2 conv3×3+2 BN per block, 1×1 conv+BN where the shape changes, fc."""
    n = (depth - 2) // 6
    total = 9 * cin * w[0] + 2 * w[0]
    c = w[0]
    for s, width in enumerate(w[1:]):
        for i in range(n):
            total += 9 * c * width + 9 * width * width + 4 * width
            if i == 0 and (s > 0 or c != width):
                total += c * width + 2 * width
            c = width
    return total + w[3] * k + k


def _wrn_count(depth: int, widen: int, k: int, cin: int = 3) -> int:
    """Closed form for the pre-activation WRN: BN(c_in) + conv3×3 + BN + conv3×3 (+ 1×1 shortcut)."""
    n = (depth - 4) // 6
    w = (16, 16 * widen, 32 * widen, 64 * widen)
    total = 9 * cin * 16
    c = 16
    for width in w[1:]:
        for i in range(n):
            total += 2 * c + 9 * c * width + 2 * width + 9 * width * width
            if c != width:
                total += c * width
            c = width
    return total + 2 * w[3] + w[3] * k + k


@pytest.mark.parametrize("name,depth,widths", [
    ("resnet8", 8, (16, 16, 32, 64)), ("resnet20", 20, (16, 16, 32, 64)), ("resnet56", 56, (16, 16, 32, 64)),
    ("resnet8x4", 8, (32, 64, 128, 256)), ("resnet32x4", 32, (32, 64, 128, 256)),
])
def test_resnet_param_count_exact(name, depth, widths):
    assert n_params(CIFAR_MODELS[name](num_classes=100)) == _cifar_resnet_count(depth, widths, 100)
    assert n_params(CIFAR_MODELS[name](num_classes=10, in_chans=1)) == _cifar_resnet_count(depth, widths, 10, 1)


@pytest.mark.parametrize("depth,widen", [(16, 1), (16, 2), (40, 1), (40, 2)])
def test_wrn_param_count_exact(depth, widen):
    assert n_params(CIFAR_MODELS[f"wrn_{depth}_{widen}"](num_classes=100)) == _wrn_count(depth, widen, 100)


def test_vgg13_param_count_exact():
    cfg = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
    total, c = 0, 3
    for block in cfg:
        for width in block:  # conv3×3 with bias + BN
            total += 9 * c * width + width + 2 * width
            c = width
    assert n_params(CIFAR_MODELS["vgg13"](num_classes=100)) == total + 512 * 100 + 100


# ---------------------------------------------------------------------------------------------- shapes
STAGES_32 = {  # per-sample stage shapes at 32×32 (architecture: strides/pools, widths)
    "resnet8": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "resnet8x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "resnet32x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "wrn_16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "wrn_40_1": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "vgg8": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "vgg13": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "mobilenetv2": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "shufflev1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "shufflev2": [(116, 16, 16), (232, 8, 8), (464, 4, 4)],
}
FINAL_32 = {"resnet8x4": (256, 8, 8), "wrn_16_2": (128, 8, 8), "vgg13": (512, 4, 4),
            "mobilenetv2": (1280, 2, 2), "shufflev1": (960, 4, 4), "shufflev2": (1024, 4, 4)}


@pytest.mark.parametrize("name", sorted(STAGES_32))
def test_stage_shapes_32(name):
    net = build(name).eval()
    with torch.no_grad():
        out = _check_taps(net, torch.randn(2, 3, 32, 32), 100)
    assert [tuple(s.shape) for s in out["stages"]] == [(2, *s) for s in STAGES_32[name]]
    assert [tuple(s.shape) for s in out["stages_preact"]] == [(2, *s) for s in STAGES_32[name]]
    if name in FINAL_32:
        assert tuple(out["final"].shape) == (2, *FINAL_32[name])


def _check_taps(net: nn.Module, x: torch.Tensor, k: int) -> dict:
    out = net.forward_taps(x)
    n = x.shape[0]
    assert set(out) == {"logits", "stages", "stages_preact", "stages_raw", "final", "pooled"}
    if not isinstance(net, WideResNet):
        assert out["stages_raw"] is out["stages"]  # only pre-activation WRNs have raw stage outputs of their own
    assert tuple(out["logits"].shape) == (n, k)
    assert len(out["stages"]) == len(out["stages_preact"]) >= 3
    c = net.fc.in_features
    assert out["final"].dim() == 4 and out["final"].shape[:2] == (n, c)
    assert tuple(out["pooled"].shape) == (n, c)
    # pooled is the global mean of final, and logits are fc(pooled) (bias included)
    torch.testing.assert_close(out["pooled"], out["final"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["logits"], out["pooled"] @ net.fc.weight.T + net.fc.bias)
    return out


@pytest.mark.parametrize("name", ALL)
def test_every_model_at_8x8_gray(name):
    """The quickstart's input: 1-channel 8×8. Taps are consistent, forward == forward_taps, preact + ReLU."""
    net = build(name, num_classes=10, in_chans=1)
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = net.train().forward_taps(x)  # batch statistics: pre-activations have both signs
        for i, (pre, post) in enumerate(zip(out["stages_preact"], out["stages"])):
            if name == "mobilenetv2" or (name == "mobilenetv2_tinyimagenet" and i < 3):
                assert pre is post  # linear bottlenecks (the Tiny-ImageNet net's 4th stage is its ReLU6 head)
            else:
                assert (pre < 0).any()
                assert torch.equal(F.relu(pre), post)
        net.eval()
        out = _check_taps(net, x, 10)
        assert torch.equal(net(x), out["logits"])
    sizes = [s.shape[-1] for s in out["stages"]]  # shallow -> deep: resolution never grows
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


# ---------------------------------------------------------------------------------------------- tap semantics
@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_16_2", "wrn_40_1"])
def test_wrn_stages_raw_are_the_raw_residual_sums(name):
    """mdistiller's WRN ``feats`` (ReviewKD's student taps) are each stage's raw residual sum, before the next
    block's BN-ReLU: exactly what the stage modules return when run on their own."""
    net = build(name, num_classes=10).train()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = net.forward_taps(x)
        r1 = net.block1(net.conv1(x))
        r2 = net.block2(r1)
        r3 = net.block3(r2)
    for got, raw in zip(out["stages_raw"], (r1, r2, r3)):
        torch.testing.assert_close(got, raw)
    # and they are not the activated stages: stages = relu(stages_preact) = relu(bn(raw)) (train mode: batch stats)
    bns = (net.block2.layer[0].bn1, net.block3.layer[0].bn1, net.bn1)
    for raw, pre, post, bn in zip(out["stages_raw"], out["stages_preact"], out["stages"], bns):
        mean, var = raw.mean(dim=(0, 2, 3), keepdim=True), raw.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(pre, (raw - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-4)
        assert torch.equal(post, F.relu(pre)) and not torch.allclose(raw, post)


def test_mobilenetv2_stages_are_linear_bottlenecks():
    net = build("mobilenetv2").train()
    out = net.forward_taps(torch.randn(3, 3, 8, 8))
    for pre, post in zip(out["stages_preact"], out["stages"]):
        assert pre is post
        assert (post < 0).any()  # no ReLU at the end of a linear bottleneck
    assert (out["final"] >= 0).all()


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "shufflev1", "shufflev2"])
def test_final_is_last_stage_or_head(name):
    net = build(name).eval()
    with torch.no_grad():
        out = net.forward_taps(torch.randn(2, 3, 8, 8))
    if name == "shufflev2":  # 1×1 conv head to 1024 channels after the last stage
        assert out["final"].shape[1] == 1024 and out["stages"][-1].shape[1] == 464
    else:
        assert out["final"] is out["stages"][-1]


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1",
                                  "shufflev2"])
def test_backward_reaches_every_parameter(name):
    net = build(name, num_classes=5).train()
    out = net.forward_taps(torch.randn(2, 3, 8, 8))
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 3])) + sum(s.float().pow(2).mean() for s in out["stages"])
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert net.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflev1", "shufflev2"])
def test_stage_modules_output_exactly_the_stages(name):
    net = build(name).eval()
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, o: seen.append(o)) for m in net.stage_modules()]
    with torch.no_grad():
        out = net.forward_taps(torch.randn(2, 3, 8, 8))
    for h in handles:
        h.remove()
    assert len(seen) == len(out["stages"])
    assert all(a is b for a, b in zip(seen, out["stages"]))


def test_stage_module_hook_edits_propagate():
    """A hook that replaces a stage output changes the rest of the network (no stale copy is used)."""
    net = build("resnet8").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        h = net.stage_modules()[1].register_forward_hook(lambda _m, _i, o: torch.zeros_like(o))
        out = net.forward_taps(x)
        h.remove()
    assert torch.count_nonzero(out["stages"][1]) == 0
    assert not torch.allclose(out["logits"], ref)


def test_channel_shuffle_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert channel_shuffle(x, 1) is x


# ---------------------------------------------------------------------------------------------- init, checkpoints
def test_reference_initialisation():
    net = build("resnet32x4")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = net.layer3[1].conv1.weight  # 256 -> 256, 3×3: He normal with fan_out = 256·9
    assert abs(w.std().item() - math.sqrt(2 / (256 * 9))) < 0.02 * math.sqrt(2 / (256 * 9))
    assert abs(w.mean().item()) < 1e-3
    vgg = build("vgg8")
    assert abs(vgg.fc.weight.std().item() - 0.01) < 1e-3 and torch.all(vgg.fc.bias == 0)
    assert torch.all(build("wrn_16_1").fc.bias == 0)


@pytest.mark.parametrize("name,legacy", [("vgg8", "classifier."), ("mobilenetv2", "classifier.0."),
                                         ("shufflev1", "linear."), ("shufflev2", "linear.")])
def test_reference_checkpoint_classifier_names_load(name, legacy):
    src, dst = build(name), CIFAR_MODELS[name]()
    state = {(legacy + k[3:] if k.startswith("fc.") else k): v for k, v in src.state_dict().items()}
    assert not any(k.startswith("fc.") for k in state)
    dst.load_state_dict(state, strict=True)
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.fc.bias, src.fc.bias)
    dst.load_state_dict(src.state_dict(), strict=True)  # kdbench's own names load too


def test_reference_parameter_names():
    """Parameter names follow mdistiller, so its CIFAR-100 teacher checkpoints load unchanged."""
    keys = set(build("resnet8x4").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.0.conv2.weight",
            "fc.weight", "fc.bias"} <= keys
    keys = set(build("wrn_16_2").state_dict())
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block2.layer.1.bn2.weight",
            "bn1.weight", "fc.weight"} <= keys
    assert "block1.layer.1.convShortcut.weight" not in keys
    keys = set(build("vgg8").state_dict())
    assert {"block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block4.1.weight"} <= keys
    assert "block4.3.weight" not in keys  # a one-conv block is [conv, bn] (trailing ReLU dropped)
    keys = set(build("mobilenetv2").state_dict())
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight"} <= keys


def test_kdbench_source_wrapper():
    from kdbench.models.sources import build_model

    model = build_model("kdbench:resnet8x4", num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, 8, 8), taps=("stages", "stages_preact", "stages_raw", "pooled", "cam", "logits"))
    assert out["stages_raw"] == out["stages"]
    assert tuple(out.logits.shape) == (2, 10)
    assert [tuple(s.shape[1:]) for s in out["stages"]] == [(64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert tuple(out["cam"][0].shape) == (2, 10, 2, 2)
    assert model.tap_modules("stages") == model.net.stage_modules()


def test_capture_module_taps_is_the_one_hook_mechanism():
    """``module:<path>`` taps of every TapModel go through ``capture_module_taps``: the (last) output of the
    submodule in the forward, as a list; hooks are removed afterwards, also when the forward fails."""
    from kdbench.models.sources import build_model
    from kdbench.models.tap import capture_module_taps, tensor_list

    model = build_model("kdbench:resnet8", num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, taps=("module:layer2", "module:fc", "stages_preact"))
    assert torch.equal(out["module:layer2"][0], out["stages_preact"][1])  # layerK holds the pre-ReLU stage output
    torch.testing.assert_close(out["module:fc"][0], out.logits)
    layer = model.net.layer2
    assert not layer._forward_hooks
    with pytest.raises(RuntimeError):
        with capture_module_taps(model.net, ["module:layer2", "stages"]) as captured:
            assert len(layer._forward_hooks) == 1
            model.net(torch.randn(2, 5, 8, 8))  # wrong channel count: the forward fails
    assert not layer._forward_hooks and captured == {}
    with capture_module_taps(model.net, ["module:layer2"]) as captured:
        pass  # the submodule never ran: no entry
    assert captured == {}
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        model(x, taps=("module:layer9",))
    t = torch.zeros(1)
    assert tensor_list(t)[0] is t and tensor_list((t, t)) == [t, t] and tensor_list({"a": t, "b": t}) == [t, t]


def test_checkpoint_layouts_of_real_trainers_load(tmp_path):
    """The wrappers real trainers save a state dict in: mdistiller/RepDistiller ``{"model": ..., "epoch",
    "accuracy", "optimizer"}``; timm's ``CheckpointSaver`` (``state_dict`` + ``state_dict_ema`` + an
    ``argparse.Namespace`` of its args; the EMA weights are taken, as timm loads them); DDP's ``module.`` and
    ``torch.compile``'s ``_orig_mod.`` prefixes. A wrong architecture or class count is an error naming the file."""
    import argparse

    from kdbench.models.sources import build_model, load_weights

    src = build_model("kdbench:resnet8", 10, 3)
    sd = src.net.state_dict()
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()}
    layouts = {
        "mdistiller": ({"epoch": 240, "model": sd, "accuracy": torch.tensor(73.1), "optimizer": {"state": {}}}, sd),
        "timm": ({"epoch": 299, "arch": "resnet8", "state_dict": other, "state_dict_ema": sd, "version": 2,
                  "args": argparse.Namespace(lr=0.1, model="resnet8")}, sd),
        "timm_ema_only": ({"state_dict_ema": sd, "state_dict": {}}, sd),
        "ddp": ({"state_dict": {"module." + k: v for k, v in sd.items()}}, sd),
        "compiled_ddp": ({"_orig_mod.module." + k: v for k, v in other.items()}, other),
    }
    if not hasattr(torch.serialization, "add_safe_globals"):  # torch < 2.4 cannot allow timm's Namespace
        del layouts["timm"]
    for name, (content, expect) in layouts.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        dst = build_model("kdbench:resnet8", 10, 3)
        load_weights(dst, path)
        got = dst.net.state_dict()
        assert all(torch.equal(got[k], expect[k]) for k in expect), name
    for model, classes in (("kdbench:resnet8x4", 10), ("kdbench:resnet8", 100)):
        with pytest.raises(ValueError) as e:
            load_weights(build_model(model, classes, 3), tmp_path / "mdistiller.pth")
        msg = str(e.value)
        assert str(tmp_path / "mdistiller.pth") in msg and "of another shape" in msg and "\n" not in msg
