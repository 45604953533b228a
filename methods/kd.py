"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015. Spec: docs/methods.md §1."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Distiller, register_method


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """T² · KL(p_t ‖ p_s), summed over classes and averaged over the batch (docs/methods.md §1).

    Works for ``N×K`` logits; dense ``N×K×H×W`` logits are treated as N·H·W samples.
    """
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"kd_loss: student logits {tuple(logits_s.shape)} != teacher {tuple(logits_t.shape)}")
    s, t = logits_s.float(), logits_t.float()
    if s.dim() > 2:  # N×K×H×W -> (N·H·W)×K
        k = s.shape[1]
        s = s.movedim(1, -1).reshape(-1, k)
        t = t.movedim(1, -1).reshape(-1, k)
    T = float(temperature)
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return kl * T * T


@register_method("kd")
class KD(Distiller):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". docs/methods.md §1.

    ``L = ce_weight·CE + weight·T²·KL(p_t‖p_s)``. Defaults are mdistiller's CIFAR-100 ones
    (T=4, w_ce=0.1, w_kd=0.9); ImageNet uses T=1, 0.5/0.5.
    """

    tasks = frozenset({"classification", "segmentation"})
    heterogeneous = True
    citation = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015 (docs/methods.md §1)"
    version = 1

    def __init__(self, ctx, *, temperature: float = 4.0, weight: float = 0.9, ce_weight: float = 0.1):
        super().__init__(ctx)
        self.temperature = temperature
        self.weight = weight
        self.task_loss_weight = ce_weight

    def forward(self, s, t, batch):
        return {"loss_kd": self.weight * kd_loss(s.logits, t.logits, self.temperature)}
