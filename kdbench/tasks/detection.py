"""Object detection: COCO-format data (``kdbench.data.coco``), torchvision detectors (``kdbench.models.detection``),
the detector's own losses, COCO box AP through pycocotools' COCOeval.

* Batches: ``x`` is an ``ImageList`` (padded tensor + each image's size), ``y`` a list of target dicts (boxes in
  the resized image). Teacher and student get the same ``x``.
* ``forward``: the student (``y`` given) returns its detector losses in ``Outputs.extras["losses"]``; the teacher
  (``y=None``) computes only its taps (backbone + FPN alone for ``"fpn"``).
* ``loss``: the sum of the detector's loss terms (each as torchvision weights them). An ``Outputs`` without
  losses but with a ``loss_fn`` (a plain ``model(x)``, as FreeKD/AFP stage 1 calls the teacher in eval mode) has
  its losses computed from that forward for the given targets (see ``kdbench.models.detection``).
* ``evaluate``: detections mapped back to the original image sizes, COCOeval ``bbox`` over the evaluated images;
  metrics AP, AP50, AP75, APs, APm, APl in % (COCOeval's stats[0:6]), primary AP. A metric COCOeval leaves
  undefined (-1: no ground truth in that area range) is recorded as NaN; no detection at all gives 0.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torch import Tensor

from kdbench.outputs import Outputs
from kdbench.registry import TASKS
from kdbench.tasks import TASK_FACTS
from kdbench.tasks.base import Task

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _collate(batch):
    from kdbench.data.coco import collate_detection

    return collate_detection(batch)


def targets_to(targets: list[dict], device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
            for t in targets]


def coco_results(detections: list[dict], targets: list[dict], label_to_cat: dict[int, int]) -> list[dict]:
    """COCO result entries (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``) from
    detections in resized-image coordinates and the targets that carry ``image_id``/``scale``/``orig_size``."""
    out = []
    for det, tgt in zip(detections, targets):
        sy, sx = tgt["scale"]
        h, w = tgt["orig_size"]
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel():
            boxes = boxes / torch.tensor([sx, sy, sx, sy])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1) if boxes.numel() else boxes
        for b, s, l in zip(xywh.tolist(), det["scores"].detach().cpu().tolist(), det["labels"].detach().cpu().tolist()):
            if int(l) not in label_to_cat:  # background or an id the dataset does not have
                continue
            out.append({"image_id": int(tgt["image_id"]), "category_id": int(label_to_cat[int(l)]),
                        "bbox": [round(float(v), 3) for v in b], "score": float(s)})
    return out


def coco_eval(coco_gt, results: list[dict], img_ids: list[int]) -> dict[str, float]:
    """COCOeval ``bbox`` of ``results`` against ``coco_gt`` on ``img_ids``: the six summary APs in %.
    No result at all gives 0 everywhere; a metric without ground truth (COCOeval's -1) is NaN."""
    from pycocotools.cocoeval import COCOeval, Params

    if not results:  # pycocotools' loadRes refuses an empty list: decide from the ground truth as COCOeval would
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids, iscrowd=False)) if img_ids else []
        every, small, medium, large = Params(iouType="bbox").areaRng  # both bounds inclusive, as COCOeval's
        ranges = dict(zip(METRIC_NAMES, (every, every, every, small, medium, large)))
        return {m: (0.0 if any(lo <= a["area"] <= hi for a in anns) else math.nan) for m, (lo, hi) in ranges.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: (100.0 * float(v) if v >= 0 else math.nan) for m, v in zip(METRIC_NAMES, ev.stats[:6])}


@TASKS.register("detection")
class DetectionTask(Task):
    name = "detection"
    evals = TASK_FACTS["detection"]["evals"]
    primary_metric = TASK_FACTS["detection"]["primary_metric"]
    metrics = TASK_FACTS["detection"]["metrics"]
    collate = staticmethod(_collate)

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any], data):
        from kdbench.models.detection import DetectorModel
        from kdbench.models.sources import build_model

        model = build_model(spec["model"], data.model_num_classes, 3, **spec.get("kwargs", {}))
        if not isinstance(model, DetectorModel) and not getattr(model, "is_detector", False):
            from kdbench.models.detection import DETECTOR_NAMES

            raise ValueError(f"{spec['model']!r} is not a detector; detection models: "
                             f"{', '.join('torchvision:' + n for n in DETECTOR_NAMES)}, mmdet:<config>")
        return model

    def example_input(self, data, n: int = 2):
        return _collate([data.val[i] for i in range(min(n, len(data.val)))])[0]

    # -- training --------------------------------------------------------------------------------
    def to_device(self, x, y, device):
        return x.to(device), targets_to(y, device)

    def forward(self, model, x, y, taps):
        return model(x, taps, targets=y)

    def loss(self, out: Outputs, targets) -> Tensor:
        losses = out.extras.get("losses")
        if losses is None:
            fn = out.extras.get("loss_fn")
            if fn is None:
                raise ValueError("detection loss: these outputs carry neither the detector's losses nor a loss_fn; "
                                 "call the model with targets=... or without taps")
            losses = fn(targets)
        if not losses:
            raise ValueError("detection loss: the detector returned no loss terms")
        return sum(v.float() for v in losses.values())

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, loader, device) -> dict[str, float]:
        ds, ids = loader.dataset, None
        if isinstance(ds, torch.utils.data.Subset):  # evaluate the subset's images only
            ids = [ds.dataset.ids[i] for i in ds.indices]
            ds = ds.dataset
        ids = list(ds.ids) if ids is None else ids
        was_training = model.training
        model.eval()
        results: list[dict] = []
        try:
            for x, y in loader:
                out = model(x.to(device), detect=True)
                results += coco_results(out.extras["detections"], y, ds.label_to_cat)
        finally:
            model.train(was_training)
        return coco_eval(ds.coco, results, ids)
