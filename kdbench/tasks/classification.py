"""Image classification: data from the dataset plugins, models from the model sources, cross-entropy (with the
recipe's label smoothing in training), top-1/top-5 accuracy (in %)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.outputs import Outputs
from kdbench.registry import TASKS
from kdbench.tasks import TASK_FACTS
from kdbench.tasks.base import Task


@TASKS.register("classification")
class ClassificationTask(Task):
    name = "classification"
    evals = TASK_FACTS["classification"]["evals"]
    primary_metric = TASK_FACTS["classification"]["primary_metric"]
    #: the label smoothing of the training loss (:meth:`loss`) on class-index targets; set by
    #: :meth:`configure_training` from the recipe, 0 until then
    label_smoothing: float = 0.0

    def configure_training(self, recipe) -> None:
        """Take what the recipe says about the training loss: its ``label_smoothing`` (0 when it sets none).
        ``kdbench.train.fit`` calls it before training, so the harness's task loss and the method's
        ``Context.task_loss`` (this task's :meth:`loss`) both use it. Evaluation is unaffected."""
        from kdbench.recipe import value

        self.label_smoothing = float(value(recipe, "label_smoothing"))

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any], data):
        from kdbench.models.sources import build_model

        return build_model(spec["model"], data.num_classes, data.in_chans, **spec.get("kwargs", {}))

    def example_input(self, data, n: int = 2) -> Tensor:
        x = torch.stack([data.val[i][0] for i in range(min(n, len(data.val)))])
        return x

    # -- loss and evaluation ---------------------------------------------------------------------
    def loss(self, out: Outputs, targets: Tensor) -> Tensor:
        """The training loss: cross-entropy of the logits with ``targets``, class indices ``(N,)`` (smoothed by
        :attr:`label_smoothing`, as timm's ``LabelSmoothingCrossEntropy``) or soft targets ``(N, K)``, class
        probabilities taken as they are (mixup's, with the label smoothing already in them: timm's
        ``SoftTargetCrossEntropy``)."""
        logits = out.logits.float()
        if targets.is_floating_point():
            return F.cross_entropy(logits, targets.float())
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct1 = correct5 = total = 0
        loss_sum = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hit = topk.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            total += y.numel()
        model.train(was_training)
        return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}

    # metric name -> higher is better
    metrics = TASK_FACTS["classification"]["metrics"]
