"""Model sources, registered in MODELS by prefix: ``kdbench:``, ``timm:``, ``torchvision:``.

A source validates a name without building it (``check``, with close-match suggestions) and builds a TapModel
for a number of classes and input channels. Checkpoints are loaded by ``load_weights``.

Importing this module is torch-free: names and taps come from ``kdbench.models.catalog``; torch, timm and
torchvision are imported when a model is built, or to check a name only their library knows.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench.models import catalog
from kdbench.models.catalog import unknown_model as _unknown  # noqa: F401  (also used by the smp source)
from kdbench.registry import MODELS

if TYPE_CHECKING:
    from kdbench.models.tap import TapModel


class Source:
    prefix = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def check(self, name: str) -> None:
        if name not in self.names():
            raise _unknown(self.prefix, name, self.names())

    def build(self, name: str, num_classes: int, in_chans: int, **kwargs: Any) -> TapModel:
        raise NotImplementedError

    def semantic_taps(self, name: str) -> tuple[str, ...]:
        """The semantic taps (``kdbench.method``) the model ``name`` provides, known without building it;
        ``module:<path>`` taps come on top."""
        return ("logits",)


@MODELS.register("kdbench")
class KdbenchSource(Source):
    prefix = "kdbench"

    def semantic_taps(self, name):
        return catalog.KDBENCH_TAPS

    def names(self):
        return sorted(catalog.KDBENCH_NAMES)

    def build(self, name, num_classes, in_chans, **kwargs):
        from kdbench.models.cifar import CIFAR_MODELS
        from kdbench.models.tap import KdbenchCifar

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

    def semantic_taps(self, name):
        return catalog.CLASSIFIER_TAPS

    def build(self, name, num_classes, in_chans, **kwargs):
        import timm

        from kdbench.models.tap import TimmModel

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

    def check(self, name):
        if not catalog.check_listed(self.prefix, name):  # detectors, segmenters: listed; classifiers: ask torchvision
            super().check(name)

    def semantic_taps(self, name):
        return catalog.source_taps(self.prefix, name)

    def build(self, name, num_classes, in_chans, **kwargs):
        import torch
        from torchvision import models

        from kdbench.models.tap import TorchvisionModel

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
    """Raise ValueError for an unknown model; torch-free for the names ``kdbench.models.catalog`` lists."""
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    if source not in MODELS:
        MODELS.get(source)  # the unknown-source error
    if not catalog.check_listed(source, name):
        MODELS.get(source)().check(name)


model_taps = catalog.model_taps  # the semantic taps of ``SOURCE:NAME``, without building it


def build_model(spec: str, num_classes: int, in_chans: int, **kwargs: Any) -> TapModel:
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    return MODELS.get(source)().build(name, num_classes, in_chans, **kwargs)


def load_tensor_file(path: Path, sha256: str | None, what: str, remedy: str, reader=None) -> tuple[object, str]:
    """``(content, sha256)`` of a torch file a user could have placed on disk: read with ``weights_only=True``
    (tensors and plain containers only: a pickled object, which could run code, is refused naming the file);
    with ``sha256`` (the hash a finished run recorded for it) a file whose hash differs is refused before it is
    read at all (``remedy`` says what to do then). ``reader(path)`` replaces ``torch.load`` for a model that reads
    its own checkpoint layout (it must load with ``weights_only=True`` too: mmdet's runner checkpoints)."""
    from kdbench.results import file_sha256

    got = file_sha256(path)
    if sha256 is not None and got != sha256:
        raise ValueError(f"{path}: the file changed after its run recorded it (sha256 {sha256[:12]}... recorded, "
                         f"{got[:12]}... now): {remedy}")
    import torch

    try:
        if reader is not None:
            return reader(path), got
        with _safe_checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True), got
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {_load_error(e)}") from None


def _safe_checkpoint_globals():
    """The plain objects that training scripts store beside the weights and ``weights_only`` may rebuild:
    ``argparse.Namespace`` (timm's ``CheckpointSaver`` saves its ``args``; timm's own loader allows it too)."""
    import argparse
    import contextlib

    import torch

    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe is not None:
        return safe([argparse.Namespace])
    add = getattr(torch.serialization, "add_safe_globals", None)  # torch 2.4: process-wide
    if add is not None:
        add([argparse.Namespace])
    return contextlib.nullcontext()  # torch < 2.4: such files are refused, naming the file


#: wrappers around a state dict, tried in this order: timm's EMA weights first, as timm's own loader does
STATE_DICT_KEYS = ("state_dict_ema", "model", "state_dict")
#: key prefixes that wrappers add to every key: DistributedDataParallel / DataParallel, ``torch.compile``
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(state, own_keys=()):
    """The state dict inside a checkpoint: the first of :data:`STATE_DICT_KEYS` that holds a non-empty dict
    (repeatedly: ``{"model": {"state_dict": ...}}``), then without the :data:`WRAPPER_PREFIXES` prefixes that
    *every* key has (repeatedly: ``_orig_mod.module.``), unless the model's own keys (``own_keys``) have it too.
    The state dict's ``_metadata`` (module versions) is kept, re-keyed."""
    while isinstance(state, dict):
        inner = next((state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), dict) and state[k]), None)
        if inner is None:
            break
        state = inner
    own_keys = list(own_keys)
    stripped = True
    while stripped and isinstance(state, dict) and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state) and not (
                    own_keys and all(k.startswith(prefix) for k in own_keys)):
                meta = getattr(state, "_metadata", None)
                state = OrderedDict((k[len(prefix):], v) for k, v in state.items())
                if meta is not None:
                    state._metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v)
                                                  for k, v in meta.items())
                stripped = True
    return state


def load_weights(model: "TapModel", path: str | Path, sha256: str | None = None) -> str:
    """Load a checkpoint into ``model.net`` (a plain state dict, or one wrapped as :func:`unwrap_state_dict`
    reads: ``model``/``state_dict`` (mdistiller, torchvision), ``state_dict_ema`` preferred when present (timm's
    trainer, as timm loads it), DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefixes removed);
    returns its sha256. Missing or unexpected keys, or a tensor of another shape, are an error naming the file.

    Only tensors and plain containers are read (``weights_only=True``): a file holding anything else (a
    pickled object, which could run code) is refused, naming the file. With ``sha256`` (the hash a finished run
    recorded for it), a file whose hash differs is refused before it is read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}; the suites in suites/ read checkpoints under "
                                "${KDBENCH_CKPT:-download_ckpts}: point KDBENCH_CKPT at the folder that holds them "
                                "(export KDBENCH_CKPT=/path/to/checkpoints)")
    state, got = load_tensor_file(path, sha256, "checkpoint",
                                  f"put the original back, or delete {path.parent} to retrain it",
                                  reader=getattr(model, "read_checkpoint", None))  # a model's own layout (mmdet:)
    own = model.net.state_dict()
    state = unwrap_state_dict(state, own)
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a state dict")
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and hasattr(v, "shape") and hasattr(own[k], "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: {len(wrong)} tensor(s) of another shape, "
                         f"e.g. {', '.join(wrong[:3])} (another architecture or number of classes?)")
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    return got


def _load_error(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: refused content, or a damaged file."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return ("it holds objects other than tensors and plain containers, which kdbench does not unpickle "
                "(they could run code); save a state dict")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable torch file ({type(e).__name__}: {first[:200]})"
