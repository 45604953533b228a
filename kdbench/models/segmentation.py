"""Segmenters: the ``smp:`` model source (segmentation-models-pytorch) and torchvision's segmentation models,
wrapped as :class:`SegmentationTapModel` so one forward gives dense logits plus the taps a method asks for.

Names: ``smp:<arch>_<encoder>`` with ``arch`` in :data:`SMP_ARCHS` (``pspnet``, ``deeplabv3``) and ``encoder``
an smp ResNet-family encoder (:data:`SMP_ENCODERS`), e.g. ``smp:pspnet_resnet101``, ``smp:deeplabv3_resnet18``;
``torchvision:deeplabv3_resnet101``, ``torchvision:fcn_resnet50`` etc. (built by the ``torchvision`` source, which
hands segmentation names to :func:`build_torchvision_segmenter`).

Architecture defaults follow the mmsegmentation ``-D8`` models that the CWD/FreeKD Cityscapes results use
(PSPNet-R101-D8 → PSPNet-R18-D8 / DeepLabV3-R18-D8): a dilated ResNet with output stride 8 (layer3 and layer4
dilated), the head on layer4:

* ``pspnet``: ``encoder_depth=5``, ``output_stride=8`` (smp's own PSPNet default is a 3-stage encoder without
  layer3/layer4, which would have no ``backbone.layer4`` to distil), ``psp_out_channels=512``, dropout 0.1
  (mmseg ``dropout_ratio``);
* ``deeplabv3``: ``encoder_output_stride=8``, smp's ASPP (256 channels, rates 12/24/36).

Suite ``kwargs`` override these (``output_stride`` is accepted for both archs). Differences from mmseg, by
construction of smp: torchvision-style ResNet stem (mmseg uses ResNetV1c's 3-conv stem), no auxiliary FCN head
on layer3 (mmseg adds one with loss weight 0.4; kdbench's loss is the CE of the main head only), PSP bottleneck
is smp's 1×1 conv (mmseg: 3×3).

Encoder weights are never downloaded: ``kwargs: {encoder_weights: PATH}`` loads a local torchvision-format
ResNet checkpoint (``conv1.weight``, ``layer1...``; ``fc.*`` ignored; a dict with ``state_dict``/``model`` is
unwrapped) into the encoder, strictly; anything else than ``None`` or an existing file is an error.

Forward (ours, not smp's ``forward``): encoder → decoder → the head's conv gives the coarse logits at stride 8;
``Outputs.logits`` is those logits upsampled bilinearly (``align_corners=False``, as mmseg; smp's head would
use ``align_corners=True``) to the input size. Taps:

* ``"stages"``: the encoder stages that exist (ResNet ``layer1..layer4``, i.e. ``backbone.layer1..4``);
* ``"final"``: the last stage (``layer4``: FreeKD's and PKD's segmentation tap, docs/methods.md §7.3, §11 #11);
* ``"logits"``: the coarse logits ``N×K×h×w`` of the head's last conv, *before* upsampling: mmrazor's CWD
  records ``decode_head.conv_seg`` outputs, i.e. at 1/8 resolution (docs/methods.md §2);
* ``"module:<path>"``: any submodule of the network.

``tap_modules`` serves the same taps for edits in the forward (FreeKD/AFP stage 1 on a teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.outputs import Outputs
from kdbench.models.catalog import Source
from kdbench.models.catalog import unknown_model as _unknown
from kdbench.models.tap import TapModel, capture_module_taps
from kdbench.registry import MODELS

SMP_ARCHS = {"pspnet": "PSPNet", "deeplabv3": "DeepLabV3"}
SMP_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d")
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "pspnet": {"encoder_depth": 5, "output_stride": 8, "psp_out_channels": 512, "psp_dropout": 0.1},
    "deeplabv3": {"encoder_output_stride": 8},
}
SEGMENTATION_TAPS = ("logits", "stages", "final")


def smp_names() -> list[str]:
    return [f"{a}_{e}" for a in SMP_ARCHS for e in SMP_ENCODERS]


def _load_encoder_weights(encoder: nn.Module, path: Any, model_name: str) -> None:
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise ValueError(f"{model_name}: encoder_weights must be None or the path of a local torchvision-format "
                         f"ResNet checkpoint (kdbench downloads nothing), got {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = nn.Module.load_state_dict(encoder, state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: not a checkpoint of {model_name}'s encoder: {str(e).splitlines()[1:2]}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: not a checkpoint of {model_name}'s encoder: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


class SegmentationTapModel(TapModel):
    """A segmenter; subclasses provide ``_parts(x) -> (stage maps, coarse logits)`` and ``stage_modules()``."""

    supported = SEGMENTATION_TAPS

    def stage_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def head_module(self) -> nn.Module:
        """The module whose output is the coarse logits (the ``"logits"`` tap)."""
        raise NotImplementedError

    def _parts(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> Outputs:
        wanted = set(taps)
        with capture_module_taps(self.net, wanted) as captured:
            stages, coarse = self._parts(x)
        logits = coarse if coarse.shape[-2:] == x.shape[-2:] else F.interpolate(
            coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
        feats: dict[str, list[Tensor]] = {}
        if "stages" in wanted:
            feats["stages"] = list(stages)
        if "final" in wanted:
            feats["final"] = [stages[-1]]
        if "logits" in wanted:
            feats["logits"] = [coarse]
        feats.update(captured)
        return Outputs(logits=logits, feats=feats)

    def tap_modules(self, tap: str) -> list[nn.Module]:
        if tap == "stages":
            return self.stage_modules()
        if tap == "final":
            return self.stage_modules()[-1:]
        if tap == "logits":
            return [self.head_module()]
        return super().tap_modules(tap)


class SmpSegmenter(SegmentationTapModel):
    """An smp ``PSPNet``/``DeepLabV3`` with a ResNet-family encoder."""

    def stage_modules(self):
        enc = self.net.encoder
        n = len(enc.out_channels) - 2  # out_channels: input, stem, then one per layer
        return [getattr(enc, f"layer{i}") for i in range(1, n + 1)]

    def head_module(self):
        return self.net.segmentation_head[0]

    def _parts(self, x):
        feats = self.net.encoder(x)  # [x, stem, layer1, ..., layerN]
        dec = self.net.decoder(feats)
        return feats[2:], self.head_module()(dec)


class TorchvisionSegmenter(SegmentationTapModel):
    """torchvision ``deeplabv3_*`` / ``fcn_*`` / ``lraspp_*`` models. ResNet backbones give ``layer1..4`` as
    stages; MobileNetV3 backbones give their deepest returned map (``"out"``, LR-ASPP's ``"high"``) as the
    only stage."""

    def __init__(self, net, name):
        super().__init__(net, name)
        from torchvision.models.segmentation import LRASPP

        self._resnet = all(n in net.backbone for n in ("layer1", "layer2", "layer3", "layer4"))
        self._lraspp = isinstance(net, LRASPP)

    def stage_modules(self):
        if self._resnet:
            return [self.net.backbone[f"layer{i}"] for i in range(1, 5)]
        raise ValueError(f"model {self.name!r}: only ResNet backbones can edit 'stages'/'final' in the forward")

    def head_module(self):
        return self.net.classifier

    def _parts(self, x):
        bb = self.net.backbone
        if self._resnet:
            stages, h = [], x
            for name, mod in bb.items():
                h = mod(h)
                if name.startswith("layer"):
                    stages.append(h)
            return stages, self.net.classifier(h)
        feats = bb(x)
        if self._lraspp:
            return [feats["high"]], self.net.classifier(feats)
        return [feats["out"]], self.net.classifier(feats["out"])


def torchvision_segmentation_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models.segmentation))


def build_torchvision_segmenter(name: str, num_classes: int, in_chans: int, **kwargs: Any) -> TorchvisionSegmenter:
    """A torchvision segmentation model, randomly initialised (``weights=None, weights_backbone=None``: nothing
    is downloaded), without the auxiliary head unless ``aux_loss=True`` is passed (its output is unused)."""
    from torchvision import models

    if name not in torchvision_segmentation_names():
        raise ValueError(f"torchvision:{name} is not a torchvision segmentation model; valid: "
                         f"{', '.join(torchvision_segmentation_names())}")
    kwargs = {"aux_loss": False, **kwargs}
    net = models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        conv = net.backbone["conv1"] if "conv1" in net.backbone else None
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"torchvision:{name}: in_chans={in_chans} is only supported for ResNet backbones")
        net.backbone["conv1"] = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                          bias=conv.bias is not None)
    return TorchvisionSegmenter(net, f"torchvision:{name}")


@MODELS.register("smp")
class SmpSource(Source):
    """``smp:<arch>_<encoder>`` segmenters from segmentation-models-pytorch (see the module docstring)."""

    prefix = "smp"

    def names(self) -> list[str]:
        return smp_names()

    def semantic_taps(self, name: str) -> tuple[str, ...]:
        return SEGMENTATION_TAPS

    def check(self, name: str) -> None:
        if name not in smp_names():
            raise _unknown(self.prefix, name, smp_names())

    def build(self, name: str, num_classes: int, in_chans: int, **kwargs: Any) -> SmpSegmenter:
        self.check(name)
        try:
            import segmentation_models_pytorch as smp
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("smp: models need segmentation-models-pytorch (pip install "
                              "segmentation-models-pytorch)") from e
        arch, encoder = name.split("_", 1)
        kw = {**ARCH_DEFAULTS[arch], **kwargs}
        enc_weights = kw.pop("encoder_weights", None)
        if arch == "deeplabv3" and "output_stride" in kw:
            kw["encoder_output_stride"] = kw.pop("output_stride")
        net = getattr(smp, SMP_ARCHS[arch])(encoder_name=encoder, encoder_weights=None, in_channels=in_chans,
                                            classes=num_classes, **kw)
        if enc_weights is not None:
            _load_encoder_weights(net.encoder, enc_weights, f"smp:{name}")
        return SmpSegmenter(net, f"smp:{name}")
