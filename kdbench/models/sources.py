"""Model sources, registered in MODELS by prefix: ``kdbench:``, ``timm:``, ``torchvision:``.

A source validates a name without building it (``check``, with close-match suggestions) and builds a TapModel
for a number of classes and input channels. Checkpoints are loaded by ``load_weights``.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import torch

from kdbench.models.tap import KdbenchCifar, TapModel, TimmModel, TorchvisionModel
from kdbench.registry import MODELS


def _unknown(source: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    shown = valid if len(valid) <= 30 else valid[:30] + [f"... ({len(valid)} in all; `kdbench ls models`)"]
    return ValueError(f"unknown model '{source}:{name}'.{hint} Valid {source} models: {', '.join(shown)}")


class Source:
    prefix = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def check(self, name: str) -> None:
        if name not in self.names():
            raise _unknown(self.prefix, name, self.names())

    def build(self, name: str, num_classes: int, in_chans: int, **kwargs: Any) -> TapModel:
        raise NotImplementedError


@MODELS.register("kdbench")
class KdbenchSource(Source):
    prefix = "kdbench"

    def names(self):
        from kdbench.models.cifar import CIFAR_MODELS

        return sorted(CIFAR_MODELS)

    def build(self, name, num_classes, in_chans, **kwargs):
        from kdbench.models.cifar import CIFAR_MODELS

        self.check(name)
        return KdbenchCifar(CIFAR_MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs), f"kdbench:{name}")


@MODELS.register("timm")
class TimmSource(Source):
    prefix = "timm"

    def names(self):
        import timm

        return timm.list_models()

    def check(self, name):
        import timm

        if not timm.is_model(name):
            raise _unknown(self.prefix, name, timm.list_models())

    def build(self, name, num_classes, in_chans, **kwargs):
        import timm

        self.check(name)
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return TimmModel(net, f"timm:{name}")


@MODELS.register("torchvision")
class TorchvisionSource(Source):
    prefix = "torchvision"

    def names(self):
        from torchvision import models

        from kdbench.models.detection import DETECTOR_NAMES  # "detection": Faster R-CNN/RetinaNet/FCOS on FPN
        from kdbench.models.segmentation import torchvision_segmentation_names  # "segmentation": DeepLabV3/FCN/LR-ASPP

        return sorted(models.list_models(module=models)) + list(DETECTOR_NAMES) + torchvision_segmentation_names()

    def build(self, name, num_classes, in_chans, **kwargs):
        from torchvision import models

        from kdbench.models.detection import DETECTOR_NAMES, build_detector

        self.check(name)
        if name in DETECTOR_NAMES:  # "detection": num_classes includes the background
            return build_detector(name, num_classes, in_chans, **kwargs)
        from kdbench.models.segmentation import build_torchvision_segmenter, torchvision_segmentation_names

        if name in torchvision_segmentation_names():  # "segmentation": kdbench/models/segmentation.py
            return build_torchvision_segmenter(name, num_classes, in_chans, **kwargs)
        net = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            conv = getattr(net, "conv1", None)
            if not isinstance(conv, torch.nn.Conv2d):
                raise ValueError(f"torchvision:{name}: in_chans={in_chans} is only supported for ResNet-style models")
            net.conv1 = torch.nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        bias=conv.bias is not None)
        return TorchvisionModel(net, f"torchvision:{name}")


def check_model(spec: str) -> None:
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    MODELS.get(source)().check(name)


def build_model(spec: str, num_classes: int, in_chans: int, **kwargs: Any) -> TapModel:
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    return MODELS.get(source)().build(name, num_classes, in_chans, **kwargs)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights(model: TapModel, path: str | Path) -> str:
    """Load a checkpoint into ``model.net`` (a plain state dict, or a dict with ``model``/``state_dict``);
    returns its sha256. Missing or unexpected keys are an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}")
    try:  # a model may read its own checkpoint layout (mmdet: kdbench.models.mmdet)
        state = getattr(model, "read_checkpoint", lambda p: torch.load(p, map_location="cpu", weights_only=True))(path)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    return sha256_file(path)
