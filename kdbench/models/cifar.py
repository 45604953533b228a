"""CIFAR-style classifiers of the CRD / mdistiller benchmark (``kdbench:<name>`` models).

The architectures are those of megvii-research/mdistiller ``mdistiller/models/cifar`` (inherited from CRD,
Tian et al. 2020), re-implemented here: CIFAR ResNets (3 stages of BasicBlocks, widths 16-16-32-64 or
32-64-128-256 for the ``x4`` nets), ResNet18/50 of ``resnetv2.py``, pre-activation Wide ResNets, VGG-BN with
5 conv blocks, MobileNetV2 at width 0.5 (``mobile_half``), ShuffleNetV1 and ShuffleNetV2; and the full-width
MobileNetV2 that mdistiller trains as its Tiny-ImageNet student (``mv2_tinyimagenet.py``,
``mobilenetv2_tinyimagenet``). Parameter names match mdistiller's, so its published CIFAR-100 teacher checkpoints
(and state dicts of the Tiny-ImageNet MobileNetV2) load as they are (a classifier stored as ``classifier.*`` /
``classifier.0.*`` / ``linear.*`` / ``conv2.*`` is renamed to ``fc.*`` on load; the last is a 1×1 conv, whose
``K×C×1×1`` weight becomes the ``K×C`` weight of ``fc``).

Differences from the reference, all deliberate:

* Global average pooling is adaptive (the CIFAR references hard-code ``AvgPool2d(8)`` /
  ``avg_pool2d(out, 4)``), so any input of at least 8×8 pixels works; at 32×32 the result is identical. VGG's
  fourth max-pool runs for inputs of at least 64 px (the reference: exactly 64), as in the reference it is
  skipped at 32 px.
* Every network takes ``in_chans`` (the reference is fixed to RGB) and names its classifier ``fc``, an
  ``nn.Linear`` (the Tiny-ImageNet MobileNetV2's reference applies a 1×1 conv to the pooled map: the same map).
* The last block of each stage returns its pre-activation; the stage's final ReLU is a separate module
  (see ``stage_modules``), so pre- and post-ReLU stage outputs come out of one pass with no extra work.
  Consequently ``module:layerK`` taps of ResNets/ShuffleNets hold the *pre*-ReLU stage output. Likewise the
  Tiny-ImageNet MobileNetV2 computes its head's ReLU6 as ``relu(min(x, 6))`` (the same values) with that ReLU a
  module of its own, and ``module:conv1`` there holds the head's BatchNorm output.

Every model has ``forward(x) -> logits`` and ``forward_taps(x) -> dict`` with

* ``"logits"`` ``N×K``;
* ``"stages"``: the stage outputs, shallow to deep, after their final ReLU (the stem, mdistiller's ``f0``,
  is never a stage: 3 stages for ResNets/WRNs/ShuffleNets, 4 for VGG/both MobileNetV2s/ResNet18/50);
* ``"stages_preact"``: the same tensors before that ReLU (mdistiller's ``preact_feats``), so that
  ``relu(stages_preact[i]) == stages[i]`` exactly. Two families need a convention, documented on their classes:
  pre-activation WRNs (the pre-activation is the next BatchNorm's output, as in mdistiller) and the MobileNetV2s
  (linear bottlenecks have no ReLU: for stages that end in one both lists hold the same tensors; the
  Tiny-ImageNet net's last stage is its ReLU6 head, whose pre-activation is the BatchNorm output capped at 6);
* ``"stages_raw"``: the stage outputs as the reference implementation returns them (mdistiller's ``feats``,
  ReviewKD's student tap): the same tensors as ``"stages"`` except for the pre-activation WRNs, whose stages
  end in a raw residual sum that only the next block normalises and activates; there ``stages_raw`` are those
  raw sums;
* ``"final"``: the map fed to global pooling; ``"pooled"``: the pooled ``N×C`` feature (input of ``fc``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIFAR_MODELS",
    "CifarNet",
    "CifarResNet",
    "ResNetV2",
    "WideResNet",
    "VGG",
    "MobileNetV2",
    "MobileNetV2TinyImageNet",
    "ShuffleNetV1",
    "ShuffleNetV2",
]


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, groups=groups, bias=False)


def _init_reference(net: nn.Module, linear: str) -> None:
    """He-normal convs (``fan_out``, i.e. std = sqrt(2 / (k·k·C_out)), as the references), conv biases 0,
    BatchNorm weight 1 / bias 0. ``linear``: ``"default"`` keeps PyTorch's init of the classifier,
    ``"zero_bias"`` zeroes its bias (WRN), ``"normal"`` draws N(0, 0.01²) weights with zero bias (VGG,
    MobileNetV2)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if linear in ("normal", "zero_bias") and m.bias is not None:
                nn.init.zeros_(m.bias)


def _run_stages(h: Tensor, layers, acts) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Run each stage (``layers``) on ``h`` followed by its own ReLU module (``acts``):
    ``(pre-ReLU outputs, outputs, last output)``."""
    preacts, stages = [], []
    for layer, act in zip(layers, acts):
        preacts.append(layer(h))
        h = act(preacts[-1])
        stages.append(h)
    return preacts, stages, h


class CifarNet(nn.Module):
    """Base class: subclasses build ``self.fc`` and implement ``_trunk(x) -> (preacts, stages, final)``.

    ``forward`` and ``forward_taps`` run the very same computation; ``forward_taps`` only also returns the
    intermediate tensors. ``stage_modules()`` lists the modules whose outputs are exactly ``stages`` (a forward
    hook on them that returns a new tensor changes what the rest of the network sees).
    """

    fc: nn.Linear
    #: state-dict prefix under which the reference implementation stores the classifier (renamed to ``fc.``)
    legacy_fc_prefix: str | None = None

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_fc_prefix is not None:
            self.register_load_state_dict_pre_hook(_rename_legacy_fc)

    def _trunk(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        raise NotImplementedError

    def stage_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _trunk_taps(self, x: Tensor) -> dict:
        """The trunk's taps: ``stages_preact``, ``stages``, ``final`` and ``stages_raw`` (the stages themselves
        unless a subclass keeps raw stage outputs of its own: WRNs)."""
        preacts, stages, final = self._trunk(x)
        return {"stages": stages, "stages_preact": preacts, "final": final, "stages_raw": stages}

    def forward_taps(self, x: Tensor) -> dict:
        out = self._trunk_taps(x)
        out["pooled"] = torch.flatten(F.adaptive_avg_pool2d(out["final"], 1), 1)
        out["logits"] = self.fc(out["pooled"])
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x)["logits"]


def _rename_legacy_fc(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    """Load-state-dict pre-hook: ``<prefix><legacy_fc_prefix>weight`` -> ``<prefix>fc.weight`` (same for bias),
    so mdistiller checkpoints load into kdbench nets; a 1×1-conv classifier's ``K×C×1×1`` weight is reshaped to
    ``K×C``. Keys already named ``fc.`` are left alone."""
    old = prefix + module.legacy_fc_prefix
    for key in [k for k in state_dict if k.startswith(old)]:
        new = prefix + "fc." + key[len(old):]
        if new not in state_dict:
            value = state_dict.pop(key)
            if isinstance(value, Tensor) and value.dim() == 4 and tuple(value.shape[2:]) == (1, 1):
                value = value.flatten(1)
            state_dict[new] = value


# ---------------------------------------------------------------------------------------------------------
# CIFAR ResNets (mdistiller resnet.py): resnet8 ... resnet110, resnet8x4, resnet32x4
# ---------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """3×3-3×3 residual block (post-activation). With ``emit_preact`` the final ReLU is left to the caller."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, emit_preact: bool = False):
        super().__init__()
        cout = planes * self.expansion
        self.emit_preact = emit_preact
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + (x if self.downsample is None else self.downsample(x))
        return out if self.emit_preact else F.relu(out)


def _make_stage(block: Callable[..., nn.Module], cin: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """``n`` blocks, the first with ``stride``; the last returns its pre-activation."""
    layers = []
    for i in range(n):
        layers.append(block(cin, planes, stride if i == 0 else 1, emit_preact=(i == n - 1)))
        cin = planes * block.expansion
    return nn.Sequential(*layers)


class CifarResNet(CifarNet):
    """CIFAR ResNet (He et al. 2016, §4.2) as in CRD/mdistiller: 3×3 stem, three stages of ``(depth-2)/6``
    BasicBlocks with strides 1/2/2, global average pooling, ``fc``. ``widths`` = (stem, stage1, stage2,
    stage3). Stages: the three stage outputs (stem excluded); ``final`` is the third one."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(BasicBlock, widths[0], widths[1], n, 1)
        self.layer2 = _make_stage(BasicBlock, widths[1], widths[2], n, 2)
        self.layer3 = _make_stage(BasicBlock, widths[2], widths[3], n, 2)
        self.stage_relus = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.fc = nn.Linear(widths[3], num_classes)
        _init_reference(self, linear="default")

    def stage_modules(self):
        return list(self.stage_relus)

    def _trunk(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return _run_stages(h, (self.layer1, self.layer2, self.layer3), self.stage_relus)


# ---------------------------------------------------------------------------------------------------------
# ResNet18/50 for CIFAR (mdistiller resnetv2.py; ResNet50 is a CRD teacher)
# ---------------------------------------------------------------------------------------------------------


class _V2Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, emit_preact: bool = False):
        super().__init__()
        self.emit_preact = emit_preact
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(_conv1x1(cin, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = out + self.shortcut(x)
        return out if self.emit_preact else F.relu(out)


class _V2Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, emit_preact: bool = False):
        super().__init__()
        cout = planes * self.expansion
        self.emit_preact = emit_preact
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return out if self.emit_preact else F.relu(out)


class ResNetV2(CifarNet):
    """ImageNet-shaped ResNet adapted to 32×32 inputs (mdistiller ``resnetv2.py``): 3×3 stride-1 stem with 64
    channels, no max-pool, four stages (64/128/256/512 planes, strides 1/2/2/2). Stages: the four stage outputs."""

    legacy_fc_prefix = "linear."

    def __init__(self, block: type, blocks: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = _conv3x3(in_chans, 64)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2))):
            self.add_module(f"layer{i + 1}", _make_stage(block, cin, planes, n, stride))
            cin = planes * block.expansion
        self.stage_relus = nn.ModuleList(nn.ReLU() for _ in range(4))
        self.fc = nn.Linear(cin, num_classes)
        _init_reference(self, linear="default")

    def stage_modules(self):
        return list(self.stage_relus)

    def _trunk(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return _run_stages(h, (self.layer1, self.layer2, self.layer3, self.layer4), self.stage_relus)


# ---------------------------------------------------------------------------------------------------------
# Wide ResNets (Zagoruyko & Komodakis 2016; CRD/mdistiller wrn.py): pre-activation blocks
# ---------------------------------------------------------------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3×3-BN-ReLU-conv3×3`` plus the shortcut. When the shape changes the
    shortcut is a 1×1 conv applied to the *activated* input (as in the reference), otherwise the identity."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.convShortcut = _conv1x1(cin, cout, stride) if (cin != cout or stride != 1) else None

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_activated(self.relu1(self.bn1(x)), x)

    def forward_activated(self, act: Tensor, x: Tensor) -> Tensor:
        """The block given its input ``x`` and ``act = relu1(bn1(x))`` already computed."""
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """``n`` WideBlocks in ``self.layer`` (the reference's ``NetworkBlock``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def forward_activated(self, act: Tensor, x: Tensor) -> Tensor:
        """The stage when its first block's ``relu1(bn1(x))`` is already known."""
        h = self.layer[0].forward_activated(act, x)
        for blk in self.layer[1:]:
            h = blk(h)
        return h


class WideResNet(CifarNet):
    """WRN-depth-k (pre-activation), widths 16, 16k, 32k, 64k, ``(depth-4)/6`` blocks per stage, strides 1/2/2,
    a final BN-ReLU before pooling.

    A pre-activation stage ends in a raw residual sum that is normalised and activated by the *next* block.
    Convention (mdistiller's ``preact_feats``, also used by OFD/ReviewKD): the pre-activation of stage ``i`` is
    that sum after the BatchNorm that consumes it (``block{i+1}.layer[0].bn1``, or the final ``bn1`` for the
    last stage), and the stage output is its ReLU, i.e. exactly the activation the next convolution sees.
    ``final`` = ``stages[-1]`` = ``relu(bn1(block3 output))``. mdistiller's ``feats`` (what its ReviewKD
    distils from a student) are the raw sums themselves, the ``"stages_raw"`` tap. This relies on the first
    block of stages 2 and 3 having a conv shortcut on the activated input, which holds because the width
    doubles there.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(in_chans, w[0])
        self.block1 = WideStage(n, w[0], w[1], 1)
        self.block2 = WideStage(n, w[1], w[2], 2)
        self.block3 = WideStage(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)
        _init_reference(self, linear="zero_bias")

    def _stage_norms(self) -> list[tuple[nn.Module, nn.Module]]:
        """(BatchNorm, ReLU) that turn each stage's raw sum into its pre-activation / output."""
        return [(self.block2.layer[0].bn1, self.block2.layer[0].relu1),
                (self.block3.layer[0].bn1, self.block3.layer[0].relu1),
                (self.bn1, self.relu)]

    def stage_modules(self):
        return [act for _, act in self._stage_norms()]

    def _trunk(self, x):
        taps = self._trunk_taps(x)
        return taps["stages_preact"], taps["stages"], taps["final"]

    def _trunk_taps(self, x):
        raw = self.block1(self.conv1(x))
        preacts, stages, raws = [], [], []
        nexts = (self.block2, self.block3, None)
        for (bn, act), nxt in zip(self._stage_norms(), nexts):
            pre = bn(raw)
            h = act(pre)
            raws.append(raw)
            preacts.append(pre)
            stages.append(h)
            if nxt is not None:
                raw = nxt.forward_activated(h, raw)
        return {"stages": stages, "stages_preact": preacts, "final": stages[-1], "stages_raw": raws}


# ---------------------------------------------------------------------------------------------------------
# VGG with BatchNorm (CRD/mdistiller vgg.py)
# ---------------------------------------------------------------------------------------------------------

_VGG_CFG: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _vgg_block(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    """``[conv3×3(bias), BN, ReLU] × len(widths)`` without the last ReLU (the caller applies it)."""
    layers: list[nn.Module] = []
    for c in widths:
        layers += [nn.Conv2d(cin, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        cin = c
    return nn.Sequential(*layers[:-1])


class VGG(CifarNet):
    """CIFAR VGG-BN: five conv blocks; 2×2 max-pools after blocks 0, 1, 2 (and after block 3 for inputs of
    64 px or more), global average pooling, ``fc`` (512 → K). At 32×32 the blocks run at 32, 16, 8, 4, 4 px.

    Stages: blocks 1-4 (block 0 plays the stem, like mdistiller's ``f0``, which its feature methods skip), so a
    VGG has 4 stages: 128, 256, 512, 512 channels. ``final`` = ``stages[-1]``."""

    legacy_fc_prefix = "classifier."

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _vgg_block(cin, widths))
            cin = widths[-1]
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.block_relus = nn.ModuleList(nn.ReLU() for _ in range(5))
        self.fc = nn.Linear(cin, num_classes)
        _init_reference(self, linear="normal")

    def stage_modules(self):
        return list(self.block_relus[1:])

    def _trunk(self, x):
        big = x.shape[-2] >= 64
        h = self.pool0(self.block_relus[0](self.block0(x)))
        preacts, stages = [], []
        blocks = (self.block1, self.block2, self.block3, self.block4)
        pools = (self.pool1, self.pool2, self.pool3 if big else None, None)
        for blk, act, pool in zip(blocks, self.block_relus[1:], pools):
            pre = blk(h)
            h = act(pre)
            preacts.append(pre)
            stages.append(h)
            if pool is not None:
                h = pool(h)
        return preacts, stages, stages[-1]


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), CRD's ``mobile_half``: expansion 6, width 0.5
# ---------------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1×1 expand - BN - ReLU - 3×3 depthwise - BN - ReLU - 1×1 project - BN (linear), residual when the
    shape is kept. ``self.conv`` keeps the reference's 8-module layout."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            _conv1x1(cin, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            _conv1x1(mid, cout), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(CifarNet):
    """MobileNetV2 for 32×32 inputs as in CRD: stride-2 3×3 stem, the seven bottleneck groups
    (t, c, n, s) = (1,16,1,1), (T,24,2,1), (T,32,3,2), (T,64,4,2), (T,96,3,1), (T,160,3,2), (T,320,1,1) with
    channels scaled by ``width`` (truncated), a 1×1 conv to 1280 channels (``int(1280·width)`` if width > 1),
    global average pooling, ``fc``.

    Stages: the outputs of groups 2, 3, 5 and 7 (mdistiller's ``f1..f4``; 12, 16, 48, 160 channels at 16, 8,
    4, 2 px for ``mobilenetv2``). They are linear-bottleneck outputs with no ReLU, so ``stages_preact`` holds
    the same tensors as ``stages``. ``final`` is the 1280-channel map after the last 1×1 conv (post-ReLU)."""

    legacy_fc_prefix = "classifier.0."
    _SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1))
    _STAGE_GROUPS = (1, 2, 4, 6)

    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin),
                                   nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        for t, c, n, s in self._SETTING:
            cout = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(_conv1x1(cin, last), nn.BatchNorm2d(last), nn.ReLU())
        self.fc = nn.Linear(last, num_classes)
        _init_reference(self, linear="normal")

    def stage_modules(self):
        return [self.blocks[i] for i in self._STAGE_GROUPS]

    def _trunk(self, x):
        h = self.conv1(x)
        stages = []
        for i, group in enumerate(self.blocks):
            h = group(h)
            if i in self._STAGE_GROUPS:
                stages.append(h)
        return list(stages), stages, self.conv2(h)


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 at full width, mdistiller's Tiny-ImageNet student (mv2_tinyimagenet.py)
# ---------------------------------------------------------------------------------------------------------


class LinearBottleneck(nn.Module):
    """Inverted residual of the Tiny-ImageNet MobileNetV2: 1×1 expand - BN - ReLU6 - 3×3 depthwise (``stride``) -
    BN - ReLU6 - 1×1 project - BN (linear), every conv with a bias; ``+ x`` when the stride is 1 and the width is
    kept. The expand conv is there for ``expand = 1`` too. ``self.residual`` keeps the reference's 8-module layout
    (parameters ``residual.{0,1,3,4,6,7}.*``)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.residual = nn.Sequential(
            nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.residual(x)
        return out + x if self.use_res else out


class MobileNetV2TinyImageNet(CifarNet):
    """Full-width MobileNetV2 of mdistiller's Tiny-ImageNet benchmark (``mobilenetv2_tinyimagenet``, the student
    of its ResNet18 -> MobileNetV2 row): stem ``pre`` = 1×1 conv to 32 channels *with padding 1* (a 64 px input
    becomes 66 px; the border pixels see only the bias) - BN - ReLU6; seven groups ``stage1..stage7`` of
    LinearBottlenecks (t, c, n, s) = (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,1),
    (6,320,1,1) (a one-block group is the block itself, as in the reference); head ``conv1`` = 1×1 conv to 1280
    channels - BN - ReLU6; global average pooling; ``fc``. Every conv has a bias. Initialisation: PyTorch
    defaults, as the reference (it defines none).

    Stages: the outputs of ``stage2``, ``stage3``, ``stage4`` and the head (mdistiller's ``f1..f4``; 24, 32, 64,
    1280 channels at 33, 17, 9, 9 px for a 64 px input, 17, 9, 5, 5 px at 32 px). The first three are
    linear-bottleneck outputs with no ReLU, so ``stages_preact`` holds the same tensors there. The head's ReLU6 is
    computed as ``head_relu(min(x, 6))`` on its BatchNorm output ``x`` (the same values, and the same gradients
    away from the kinks at 0 and 6), so the fourth pre-activation is ``min(x, 6)`` and
    ``relu(stages_preact[3]) == stages[3]`` holds exactly. ``final`` = ``stages[-1]``, the head output.

    The reference's classifier ``conv2`` (1×1 conv on the pooled map) is ``fc`` here; its state-dict entries
    are renamed and reshaped on load."""

    legacy_fc_prefix = "conv2."
    _SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1),
                (6, 320, 1, 1))
    _STAGE_GROUPS = (2, 3, 4)  # stageK modules whose outputs are stages; the head gives the fourth

    def __init__(self, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(in_chans, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        cin = 32
        for g, (t, c, n, s) in enumerate(self._SETTING, start=1):
            blocks = [LinearBottleneck(cin if i == 0 else c, c, s if i == 0 else 1, t) for i in range(n)]
            self.add_module(f"stage{g}", blocks[0] if n == 1 else nn.Sequential(*blocks))
            cin = c
        self.conv1 = nn.Sequential(nn.Conv2d(cin, 1280, 1), nn.BatchNorm2d(1280))
        self.head_relu = nn.ReLU()
        self.fc = nn.Linear(1280, num_classes)

    def stage_modules(self):
        return [getattr(self, f"stage{g}") for g in self._STAGE_GROUPS] + [self.head_relu]

    def _trunk(self, x):
        h = self.pre(x)
        stages = []
        for g in range(1, len(self._SETTING) + 1):
            h = getattr(self, f"stage{g}")(h)
            if g in self._STAGE_GROUPS:
                stages.append(h)
        pre = torch.clamp(self.conv1(h), max=6.0)
        out = self.head_relu(pre)
        return stages + [pre], stages + [out], out


# ---------------------------------------------------------------------------------------------------------
# ShuffleNetV1 (Zhang et al. 2018), CRD's ShuffleV1: g = 3, 240/480/960 channels, 4/8/4 units
# ---------------------------------------------------------------------------------------------------------


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """``N×(g·c)×H×W`` -> interleave the ``g`` groups: channel ``i·c + j`` moves to ``j·g + i``."""
    if groups == 1:
        return x
    n, ch, h, w = x.shape
    return x.reshape(n, groups, ch // groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1×1 - BN - ReLU - shuffle - depthwise 3×3 - BN - ReLU - grouped 1×1 - BN, then ``+ x`` (stride 1)
    or ``concat(·, avgpool3×3/2(x))`` (stride 2; the branch then produces ``cout - cin`` channels), then ReLU.
    The ReLU after the depthwise conv and the 1-group first conv of the first unit follow the reference."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int,
                 emit_preact: bool = False):
        super().__init__()
        self.stride = stride
        self.emit_preact = emit_preact
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.g1 = first_groups
        self.conv1 = _conv1x1(cin, mid, groups=first_groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv1x1(mid, branch, groups=groups)
        self.bn3 = nn.BatchNorm2d(branch)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return pre if self.emit_preact else F.relu(pre)


class ShuffleNetV1(CifarNet):
    """ShuffleNetV1 for CIFAR as in CRD: 1×1 stem to 24 channels (stride 1), three stages whose first unit has
    stride 2, global average pooling, ``fc``. Stages: the three stage outputs; ``final`` = ``stages[-1]``.
    Initialisation: PyTorch defaults, as the reference (it defines none)."""

    legacy_fc_prefix = "linear."

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960), units: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = _conv1x1(in_chans, 24)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s, (cout, n) in enumerate(zip(widths, units)):
            layers = []
            for i in range(n):
                first_groups = 1 if (s == 0 and i == 0) else groups
                layers.append(ShuffleUnitV1(cin, cout, 2 if i == 0 else 1, groups, first_groups,
                                            emit_preact=(i == n - 1)))
                cin = cout
            self.add_module(f"layer{s + 1}", nn.Sequential(*layers))
        self.stage_relus = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.fc = nn.Linear(cin, num_classes)

    def stage_modules(self):
        return list(self.stage_relus)

    def _trunk(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return _run_stages(h, (self.layer1, self.layer2, self.layer3), self.stage_relus)


# ---------------------------------------------------------------------------------------------------------
# ShuffleNetV2 (Ma et al. 2018), CRD's ShuffleV2 (1×): 116/232/464 channels, 3/7/3 basic units, 1024 head
# ---------------------------------------------------------------------------------------------------------


class ShuffleUnitV2(nn.Module):
    """Basic unit: split channels in halves ``(x1, x2)``; ``x2`` goes through 1×1-BN-ReLU, depthwise 3×3-BN,
    1×1-BN-ReLU; concat with ``x1``; shuffle (2 groups).

    With ``emit_preact`` the branch's last ReLU is left out: the unit returns ``shuffle(concat(x1, pre))``.
    Since ``x1`` is part of a post-ReLU tensor (``>= 0``), ``relu`` of that equals the normal output exactly
    (mdistiller's preact is the same concat but unshuffled, i.e. in a different channel order than the stage)."""

    def __init__(self, ch: int, emit_preact: bool = False):
        super().__init__()
        self.emit_preact = emit_preact
        half = ch // 2
        self.conv1 = _conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        out = self.bn3(self.conv3(out))
        if not self.emit_preact:
            out = F.relu(out)
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleDownV2(nn.Module):
    """Down-sampling unit: left = depthwise 3×3/2-BN, 1×1-BN-ReLU; right = 1×1-BN-ReLU, depthwise 3×3/2-BN,
    1×1-BN-ReLU; concat (``cout/2`` each) and shuffle (2 groups)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = _conv1x1(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv1x1(cin, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarNet):
    """ShuffleNetV2 for CIFAR as in CRD: 1×1 stem to 24 channels (stride 1), three stages (a down-sampling unit
    then ``n`` basic units), 1×1 conv to 1024 channels with BN-ReLU, global average pooling, ``fc``.
    Stages: the three stage outputs; ``final`` is the 1024-channel map. Initialisation: PyTorch defaults, as the
    reference."""

    legacy_fc_prefix = "linear."

    def __init__(self, widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 units: tuple[int, int, int] = (3, 7, 3), num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = _conv1x1(in_chans, 24)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s in range(3):
            cout, n = widths[s], units[s]
            layers = [ShuffleDownV2(cin, cout)]
            layers += [ShuffleUnitV2(cout, emit_preact=(i == n - 1)) for i in range(n)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*layers))
            cin = cout
        self.stage_relus = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.conv2 = _conv1x1(cin, widths[3])
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def stage_modules(self):
        return list(self.stage_relus)

    def _trunk(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        preacts, stages, h = _run_stages(h, (self.layer1, self.layer2, self.layer3), self.stage_relus)
        return preacts, stages, F.relu(self.bn2(self.conv2(h)))


# ---------------------------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------------------------

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _resnet(depth: int, widths: tuple[int, int, int, int], doc: str) -> Callable[..., CifarNet]:
    def build(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
        return CifarResNet(depth, widths, num_classes=num_classes, in_chans=in_chans)

    build.__doc__ = doc
    return build


def _wrn(depth: int, widen: int) -> Callable[..., CifarNet]:
    def build(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
        return WideResNet(depth, widen, num_classes=num_classes, in_chans=in_chans)

    build.__doc__ = f"WRN-{depth}-{widen} (pre-activation, CRD/mdistiller ``wrn_{depth}_{widen}``)."
    return build


def _vgg(name: str) -> Callable[..., CifarNet]:
    def build(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
        return VGG(_VGG_CFG[name], num_classes=num_classes, in_chans=in_chans)

    build.__doc__ = f"{name.upper()} with BatchNorm, CIFAR variant (mdistiller ``{name}_bn``)."
    return build


def mobilenetv2(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """MobileNetV2, expansion 6, width 0.5 (CRD/mdistiller ``mobile_half``, "MobileNetV2" in the tables)."""
    return MobileNetV2(expand=6, width=0.5, num_classes=num_classes, in_chans=in_chans)


def mobilenetv2_tinyimagenet(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """MobileNetV2 at full width with a padded 1×1 stem, mdistiller's Tiny-ImageNet student
    (``mobilenetv2_tinyimagenet``; build it with ``num_classes=200`` for Tiny-ImageNet)."""
    return MobileNetV2TinyImageNet(num_classes=num_classes, in_chans=in_chans)


def shufflev1(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """ShuffleNetV1, 3 groups, 240/480/960 channels (CRD/mdistiller ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans)


def shufflev2(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """ShuffleNetV2 1× (CRD/mdistiller ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans)


def resnet18(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """ResNet-18 adapted to CIFAR (mdistiller ``resnetv2.ResNet18``)."""
    return ResNetV2(_V2Basic, (2, 2, 2, 2), num_classes=num_classes, in_chans=in_chans)


def resnet50(num_classes: int = 100, in_chans: int = 3) -> CifarNet:
    """ResNet-50 adapted to CIFAR (mdistiller ``resnetv2.ResNet50``, the CRD teacher "ResNet50")."""
    return ResNetV2(_V2Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_chans=in_chans)


CIFAR_MODELS: dict[str, Callable[..., CifarNet]] = {
    **{f"resnet{d}": _resnet(d, _NARROW, f"CIFAR ResNet-{d}, widths 16/16/32/64 (mdistiller ``resnet{d}``).")
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, _WIDE, "CIFAR ResNet-8, widths 32/64/128/256 (mdistiller ``resnet8x4``)."),
    "resnet32x4": _resnet(32, _WIDE, "CIFAR ResNet-32, widths 32/64/128/256 (mdistiller ``resnet32x4``)."),
    "resnet18": resnet18,
    "resnet50": resnet50,
    **{f"wrn_{d}_{k}": _wrn(d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: _vgg(name) for name in _VGG_CFG},
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_tinyimagenet": mobilenetv2_tinyimagenet,
    "shufflev1": shufflev1,
    "shufflev2": shufflev2,
}
