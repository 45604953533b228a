"""Tasks (classification, detection, segmentation), registered in ``kdbench.registry.TASKS``.

This package's own module is torch-free: :data:`TASK_FACTS` holds what the suite loader and the tables need to
know about each task (its primary metric, its metrics and whether higher is better, the model kinds it
accepts) without importing a task class (those import torch). Each Task class reads its facts from here, so
there is one list.
"""

from __future__ import annotations

import re

#: task name -> facts. ``metrics``: metric name -> higher is better; ``model_kinds``: what :func:`model_kind`
#: must say of a model for the task to use it; ``evals``: the names a suite's ``evals:`` may use
#: (``val`` is what training does; the others are ``eval`` runs, ``kdbench.evals``).
TASK_FACTS: dict[str, dict] = {
    "classification": {"primary_metric": "top1", "metrics": {"top1": True, "top5": True, "loss": False},
                       "model_kinds": ("classifier",), "evals": ("val", "corruptions")},
    "detection": {"primary_metric": "AP",
                  "metrics": {"AP": True, "AP50": True, "AP75": True, "APs": True, "APm": True, "APl": True},
                  "model_kinds": ("detector",), "evals": ("val", "corruptions")},
    "segmentation": {"primary_metric": "mIoU", "metrics": {"mIoU": True, "aAcc": True, "mAcc": True, "loss": False},
                     "model_kinds": ("segmenter",), "evals": ("val", "corruptions")},
}
TASK_NAMES = tuple(TASK_FACTS)

_DETECTOR = re.compile(r"^(fasterrcnn|retinanet|fcos|maskrcnn|keypointrcnn|ssd|ssdlite)\w*$")
_TV_SEGMENTER = re.compile(r"^(deeplabv3|fcn|lraspp)_\w+$")


def model_kind(model: str) -> str:
    """``"classifier"``, ``"detector"`` or ``"segmenter"`` for a model name ``source:name`` (torch-free, from
    the name: ``smp:`` models and torchvision's DeepLabV3/FCN/LR-ASPP segment, torchvision's Faster R-CNN /
    RetinaNet / FCOS and every ``mmdet:`` model (an OpenMMLab detector config) detect, everything else classifies)."""
    source, _, name = model.partition(":")
    if source == "mmdet":
        return "detector"
    if source == "smp":
        return "segmenter"
    if source == "torchvision" and _DETECTOR.match(name):
        return "detector"
    if source == "torchvision" and _TV_SEGMENTER.match(name):
        return "segmenter"
    return "classifier"


def task_facts(task: str) -> dict:
    """The facts of ``task``; an unknown name is a ValueError listing the valid ones."""
    if task not in TASK_FACTS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)}")
    return TASK_FACTS[task]


def check_model_for_task(task: str, model: str) -> None:
    """Raise ValueError when ``task`` cannot use ``model`` (e.g. a detector in a classification suite)."""
    kinds = task_facts(task)["model_kinds"]
    kind = model_kind(model)
    if kind not in kinds:
        raise ValueError(f"{model!r} is a {kind}; a {task} suite needs a {' or '.join(kinds)}")
