"""What kdbench knows about model names without importing torch: the names of the sources kdbench lists itself
and the semantic taps (``kdbench.method``) every model provides.

``kdbench validate`` and ``kdbench ls`` read this module; the sources (``kdbench.models.sources``,
``kdbench.models.segmentation``) import torch only to build a model, or to check a name that only the
library knows (``timm:`` names and torchvision classifiers: ``timm``/``torchvision`` are imported for those).
``tests/test_cli_fast.py`` checks every list here against the modules that build the models.
"""

from __future__ import annotations

import difflib
from typing import Any

#: ``kdbench:`` CIFAR nets (``kdbench.models.cifar.CIFAR_MODELS``).
KDBENCH_NAMES = ("mobilenetv2", "mobilenetv2_tinyimagenet", "resnet110", "resnet14", "resnet18", "resnet20",
                 "resnet32", "resnet32x4", "resnet44", "resnet50", "resnet56", "resnet8", "resnet8x4", "shufflev1",
                 "shufflev2", "vgg11", "vgg13", "vgg16", "vgg19", "vgg8", "wrn_16_1", "wrn_16_2", "wrn_40_1",
                 "wrn_40_2")
#: Taps of the kdbench CIFAR nets (``KdbenchCifar.supported``).
KDBENCH_TAPS = ("logits", "stages", "stages_preact", "stages_raw", "final", "pooled", "cam")
#: Taps of timm models and torchvision ResNet-family classifiers (``TimmModel.supported``, ``RESNET_TAPS``).
CLASSIFIER_TAPS = ("logits", "stages", "stages_raw", "final", "pooled", "cam")
#: The same plus pre-ReLU stages (``stages_preact``, kdbench/models/tap.py): torchvision's ResNet-family
#: classifiers and the timm models in ``TIMM_PREACT_NAMES`` (built with ``act_layer: relu``; the build refuses
#: the tap otherwise, naming the kwarg).
PREACT_CLASSIFIER_TAPS = ("logits", "stages", "stages_preact", "stages_raw", "final", "pooled", "cam")
TIMM_PREACT_NAMES = ("mobilenetv1_100", "mobilenetv1_100h", "mobilenetv1_125")
#: torchvision detectors on FPN (``kdbench.models.detection``): ``<detector>_<backbone>_fpn``.
DETECTORS = ("fasterrcnn", "retinanet", "fcos")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
DETECTOR_NAMES = tuple(f"{d}_{b}_fpn" for d in DETECTORS for b in BACKBONES)
DETECTOR_TAPS = ("fpn", "reg")
#: torchvision segmenters kdbench builds (``torchvision.models.segmentation``).
TORCHVISION_SEGMENTERS = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50",
                          "fcn_resnet101", "fcn_resnet50", "lraspp_mobilenet_v3_large")
#: ``smp:<arch>_<encoder>`` (``kdbench.models.segmentation``).
SMP_ARCHS = ("pspnet", "deeplabv3")
SMP_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d")
SMP_NAMES = tuple(f"{a}_{e}" for a in SMP_ARCHS for e in SMP_ENCODERS)
SEGMENTATION_TAPS = ("logits", "stages", "final")

#: Sources whose every name is listed here (a name not listed is unknown, said without importing anything).
LISTED = {"kdbench": KDBENCH_NAMES, "smp": SMP_NAMES}
#: Names listed here for sources whose library knows more (the rest is checked by importing the library).
PARTLY_LISTED = {"torchvision": DETECTOR_NAMES + TORCHVISION_SEGMENTERS}
#: How an error names the models that provide a tap.
_SOURCE_WORDS = {"kdbench": "kdbench: CIFAR models", "timm": "timm: models",
                 "torchvision": "torchvision: ResNet-family classifiers", "smp": "smp: segmenters"}


def unknown_model(source: str, name: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    """The error for an unknown ``source:name``, with close matches and (up to 30 of) the valid names."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    shown = valid if len(valid) <= 30 else valid[:30] + [f"... ({len(valid)} in all; `kdbench ls models`)"]
    return ValueError(f"unknown model '{source}:{name}'.{hint} Valid {source} models: {', '.join(shown)}")


def check_listed(source: str, name: str) -> bool:
    """True when ``source:name`` is known valid from the lists here; raises the unknown-model ValueError when
    ``source`` is fully listed and ``name`` is not in it; False when only the source's library can tell."""
    if source in LISTED:
        if name not in LISTED[source]:
            raise unknown_model(source, name, LISTED[source])
        return True
    return name in PARTLY_LISTED.get(source, ())


def source_taps(source: str, name: str) -> tuple[str, ...] | None:
    """The semantic taps of ``source:name`` (without ``module:<path>``), or None for a source not known here."""
    if source == "kdbench":
        return KDBENCH_TAPS
    if source == "timm":
        return PREACT_CLASSIFIER_TAPS if name in TIMM_PREACT_NAMES else CLASSIFIER_TAPS
    if source == "smp":
        return SEGMENTATION_TAPS
    if source == "torchvision":
        if name in DETECTOR_NAMES:
            return DETECTOR_TAPS
        if name in TORCHVISION_SEGMENTERS:
            return SEGMENTATION_TAPS
        return PREACT_CLASSIFIER_TAPS if name.startswith(("resnet", "resnext", "wide_resnet")) else ("logits",)
    return None


def model_taps(spec: str) -> tuple[str, ...]:
    """The semantic taps the model ``spec`` (``SOURCE:NAME``) provides, without building it (a source not known
    here is asked: its module is imported)."""
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    taps = source_taps(source, name)
    if taps is None:
        from kdbench.registry import MODELS

        taps = tuple(MODELS.get(source)().semantic_taps(name))
    return taps


def tap_providers(tap: str) -> str:
    """Which models provide ``tap``, in words (for errors)."""
    who = [w for s, w in _SOURCE_WORDS.items() if tap in (source_taps(s, "resnet50") or ())]
    if tap in DETECTOR_TAPS:
        who.append("torchvision: detectors")
    if tap == "stages_preact":
        who.append(f"timm: {', '.join(TIMM_PREACT_NAMES)} (with act_layer: relu)")
    return ", ".join(who) or "no kdbench model"


class Source:
    """A model source (``<prefix>:<name>``): its names, a check of a name, the semantic taps a model provides
    (known without building it) and the build (the subclasses in ``kdbench.models`` import torch there)."""

    prefix = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def check(self, name: str) -> None:
        if name not in self.names():
            raise unknown_model(self.prefix, name, self.names())

    def build(self, name: str, num_classes: int, in_chans: int, **kwargs: Any) -> Any:
        raise NotImplementedError

    def semantic_taps(self, name: str) -> tuple[str, ...]:
        """The semantic taps (``kdbench.method``) the model ``name`` provides, known without building it;
        ``module:<path>`` taps come on top."""
        return ("logits",)
