"""DIST: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
Spec: docs/methods.md §13.

:func:`dist_loss` is the relation loss as the official code (hunto/image_classification_sota
``lib/models/losses/dist_kd.py``, identical in Hao840/OFAKD ``distillers/dist.py``) computes it: one minus the
Pearson correlation of the student's and the teacher's class probabilities, across classes per sample
(inter-class) and across the batch per class (intra-class).
"""

from __future__ import annotations

from torch import Tensor

from kdbench.method import Distiller, fp32, no_autocast, register_method

#: Added to the product of the two norms in the Pearson correlation's denominator (official code).
PEARSON_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (``M×D`` -> ``M``): the cosine of the
    row-centred vectors, ``Σ â·b̂ / (‖â‖·‖b̂‖ + eps)``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(logits_s: Tensor, logits_t: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    """``T² · (β·inter + γ·intra)`` (docs/methods.md §13), a 0-dim float32 tensor, computed with autocast off.

    With ``p = softmax(z / T)`` over the ``K`` classes (``N×K``):
    ``inter = 1 − (1/N)·Σ_n ρ(p_s[n, :], p_t[n, :])`` and ``intra = 1 − (1/K)·Σ_k ρ(p_s[:, k], p_t[:, k])``,
    ``ρ`` as :func:`pearson_rows`.
    """
    if logits_s.shape != logits_t.shape or logits_s.dim() != 2:
        raise ValueError(f"dist_loss: need N×K logits of equal shape, got {tuple(logits_s.shape)} and "
                         f"{tuple(logits_t.shape)}")
    if not temperature > 0:
        raise ValueError(f"dist_loss: temperature must be > 0, got {temperature!r}")
    T = float(temperature)
    with no_autocast():
        s, t = fp32(logits_s, logits_t)
        ps, pt = (s / T).softmax(dim=1), (t / T).softmax(dim=1)
        inter = 1.0 - pearson_rows(ps, pt).mean()
        intra = 1.0 - pearson_rows(ps.t(), pt.t()).mean()
        return (T * T) * (beta * inter + gamma * intra)


@register_method("dist")
class DIST(Distiller):
    """Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022. docs/methods.md §13.

    ``L = ce_weight·CE + weight·T²·(beta·inter + gamma·intra)``. Defaults are the official CIFAR-100 setting
    (hunto/DIST_KD, ``configs/strategies/distill/dist_cifar.yaml`` of its classification code: ``kd: dist_t4``,
    ``kd_loss_weight: 2``, ``ori_loss_weight: 1``): β = γ = 1, T = 4, weight 2, CE 1. The official ImageNet
    setting is T = 1 with the same weights; OFAKD's defaults are T = 1, weight 1. Logits only, so any pair of
    architectures works.
    """

    tasks = frozenset({"classification"})
    heterogeneous = True
    citation = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022 (docs/methods.md §13)"
    version = 1

    def __init__(self, ctx, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0,
                 weight: float = 2.0, ce_weight: float = 1.0):
        super().__init__(ctx)
        if not temperature > 0:
            raise ValueError(f"dist: temperature must be > 0, got {temperature!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.task_loss_weight = ce_weight

    def forward(self, s, t, batch):
        return {"loss_dist": self.weight * dist_loss(s.logits, t.logits, self.beta, self.gamma, self.temperature)}
