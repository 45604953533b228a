"""Semantic segmentation: dataset plugins with ``task = "segmentation"`` (Cityscapes), segmenters from the ``smp:``
and ``torchvision:`` sources (:mod:`kdbench.models.segmentation`), pixel cross-entropy with ignore index 255,
mIoU from a confusion matrix.

Loss: ``CE(logits, labels, ignore_index=255)`` on the logits upsampled to the crop (mmseg's ``CrossEntropyLoss``
with ``avg_non_ignore``: mean over labelled pixels); a batch without a labelled pixel gives 0, not NaN.

Evaluation (mmseg's ``IoUMetric``): one ``K×K`` confusion matrix (rows ground truth, columns prediction) over
every labelled pixel of the validation set, predictions taken at the label's resolution (logits upsampled
bilinearly when needed). Metrics, in %:

* ``mIoU``: mean over classes of ``TP / (TP + FP + FN)``; a class with an empty union (absent from ground
  truth and predictions) is left out of the mean (NaN-mean, as mmseg);
* ``aAcc``: labelled pixels predicted right; ``mAcc``: mean over classes present in the ground truth of the
  per-class accuracy; ``loss``: mean CE over labelled pixels;
* ``IoU/<class>``: one metric per class (``IoU/road``, ``IoU/traffic sign``, ...), so per-class IoU stays in
  the record as ordinary metric rows and ``kdbench table --metric IoU/car`` works. Classes with an empty union
  are omitted (records hold strict JSON, no NaN).

``evaluate`` returns ``mIoU`` first, so tables default to it. The model is run on whole validation images at
their size (Cityscapes: 1024×2048); images of different sizes are padded to the batch's largest (labels 255).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.outputs import Outputs
from kdbench.registry import TASKS
from kdbench.tasks import TASK_FACTS
from kdbench.tasks.base import Task

IGNORE_INDEX = 255


def pad_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image C×H×W, label H×W)`` pairs, padding bottom/right to the largest size in the batch (image 0,
    label 255)."""
    h = max(x.shape[-2] for x, _ in batch)
    w = max(x.shape[-1] for x, _ in batch)
    xs, ys = [], []
    for x, y in batch:
        ph, pw = h - x.shape[-2], w - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
    return torch.stack(xs), torch.stack(ys)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``K×K`` int64 counts, ``[ground truth, prediction]``, over the pixels whose label is not ``ignore_index``."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}; got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """mIoU, aAcc, mAcc and ``IoU/<class>`` (in %) from a confusion matrix ``[gt, pred]`` (see the module doc)."""
    conf = conf.double()
    k = conf.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}×{k} confusion matrix")
    tp = conf.diag()
    gt = conf.sum(dim=1)
    pred = conf.sum(dim=0)
    union = gt + pred - tp
    total = conf.sum()
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    out = {
        "mIoU": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
        "aAcc": 100.0 * float(tp.sum() / total) if total > 0 else 0.0,
        "mAcc": 100.0 * float(acc[gt > 0].mean()) if bool((gt > 0).any()) else 0.0,
    }
    for i, name in enumerate(names):
        if bool(present[i]):
            out[f"IoU/{name}"] = 100.0 * float(iou[i])
    return out


@TASKS.register("segmentation")
class SegmentationTask(Task):
    name = "segmentation"
    evals = TASK_FACTS["segmentation"]["evals"]
    primary_metric = TASK_FACTS["segmentation"]["primary_metric"]
    metrics = TASK_FACTS["segmentation"]["metrics"]  # plus "IoU/<class>" (higher is better)
    collate = staticmethod(pad_collate)

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any], data):
        from kdbench.models.segmentation import SegmentationTapModel, smp_names, torchvision_segmentation_names
        from kdbench.models.sources import build_model

        model = build_model(spec["model"], data.num_classes, data.in_chans, **spec.get("kwargs", {}))
        if not isinstance(model, SegmentationTapModel):
            raise ValueError(f"{spec['model']} is not a segmentation model; use smp:<arch>_<encoder> "
                             f"({', '.join(smp_names()[:4])}, ...) or torchvision:"
                             f"{{{','.join(torchvision_segmentation_names())}}}")
        return model

    def example_input(self, data, n: int = 2) -> Tensor:
        """Training crops (the shapes methods see in training), drawn without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.stack([data.train[i][0] for i in range(min(n, len(data.train)))])

    # -- loss and evaluation ---------------------------------------------------------------------
    def loss(self, out: Outputs, targets: Tensor) -> Tensor:
        logits = out.logits.float()
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        names = list(getattr(loader.dataset, "classes", None) or [])
        k = None
        conf = None
        loss_sum, n_valid = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).logits.float()
            if logits.shape[-2:] != y.shape[-2:]:
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            if conf is None:
                k = logits.shape[1]
                conf = torch.zeros(k, k, dtype=torch.long, device=device)
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
            n_valid += int((y != IGNORE_INDEX).sum())
            conf += confusion_matrix(logits.argmax(dim=1), y, k)
        model.train(was_training)
        if conf is None:
            raise ValueError("segmentation evaluation: the validation loader yields no batches")
        if len(names) != k:
            names = [str(i) for i in range(k)]
        out = segmentation_metrics(conf.cpu(), names)
        return {"mIoU": out.pop("mIoU"), "aAcc": out.pop("aAcc"), "mAcc": out.pop("mAcc"),
                "loss": loss_sum / max(1, n_valid), **out}
