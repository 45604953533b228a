"""DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. Spec: docs/methods.md §12.

:func:`dkd_loss` is the loss (target-class + non-target-class KD) as mdistiller's ``distillers/DKD.py`` defines
it; :class:`DKD` adds the linear warm-up of its weight over the first ``warmup`` epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Batch, Distiller, Outputs, fp32, no_autocast, register_method

#: The shift that removes the target class from the non-target softmax (mdistiller's constant).
GT_SHIFT = 1000.0


def _binary_log_probs(log_p: Tensor, gt: Tensor) -> Tensor:
    """``log b = (log p_y, log(1 − p_y))`` per sample, ``N×2``, from log-probabilities ``N×K``: the second entry
    as a log-sum-exp over the non-target classes, finite even where every non-target probability underflows to 0
    in float32."""
    log_target = log_p.masked_select(gt).view(-1, 1)
    log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=1)


def dkd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """``α·TCKD + β·NCKD`` (docs/methods.md §12), a 0-dim float32 tensor, computed with autocast off.

    * ``TCKD = T²/N · Σ_n KL(b_t ‖ b_s)`` with ``b = (p_y, 1 − p_y)``, ``p = softmax(z/T)``: the target class
      against all the others together.
    * ``NCKD = T²/N · Σ_n KL(q_t ‖ q_s)`` with ``q = softmax(z/T − 1000·onehot(y))``: the distribution over the
      non-target classes, renormalised among them (the target's share is ``exp(−1000) = 0`` in float32).

    KL summed over its entries, averaged over the batch, times ``T²``. ``b_s`` is taken in log space (the
    same value as ``log`` of the summed softmax, without its ``log 0`` when a saturated student's
    non-target probabilities underflow).
    ``target``: class indices ``N`` (a soft ``N×K`` label is reduced to its argmax, as OFAKD does).
    """
    if logits_s.shape != logits_t.shape or logits_s.dim() != 2:
        raise ValueError(f"dkd_loss: need N×K logits of equal shape, got {tuple(logits_s.shape)} and "
                         f"{tuple(logits_t.shape)}")
    n, k = logits_s.shape
    if k < 2:
        raise ValueError(f"dkd_loss: needs at least 2 classes, got {k}")
    if target.dim() == 2:
        target = target.argmax(dim=1)
    if target.shape != (n,):
        raise ValueError(f"dkd_loss: target must be N={n} class indices, got shape {tuple(target.shape)}")
    if not temperature > 0:
        raise ValueError(f"dkd_loss: temperature must be > 0, got {temperature!r}")
    T = float(temperature)
    with no_autocast():
        s, t = fp32(logits_s, logits_t)
        gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, target.long().view(-1, 1), True)
        # TCKD: binary (target, rest) distributions
        log_bs = _binary_log_probs(F.log_softmax(s / T, dim=1), gt)
        log_bt = _binary_log_probs(F.log_softmax(t / T, dim=1), gt)
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum() * (T * T) / n
        # NCKD: the non-target classes only, through the −1000 shift of the target logit
        shift = GT_SHIFT * gt.float()
        log_qs = F.log_softmax(s / T - shift, dim=1)
        qt = F.softmax(t / T - shift, dim=1)
        nckd = F.kl_div(log_qs, qt, reduction="sum") * (T * T) / n
        return alpha * tckd + beta * nckd


@register_method("dkd")
class DKD(Distiller):
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. docs/methods.md §12.

    ``L = ce_weight·CE + min(epoch / warmup, 1) · (alpha·TCKD + beta·NCKD)`` (epoch counted from 1). Defaults
    are mdistiller's CIFAR-100 ones (α 1, β 8, T 4, warm-up 20, CE 1); its configs set β 2 for res56→res20
    and res110→res32 and 6 for wrn40_2→wrn16_2/wrn40_1 and vgg13→vgg8/MobileNetV2; ImageNet uses β 0.5, T 1,
    warm-up 1. Logits only, so any pair of architectures works.
    """

    tasks = frozenset({"classification"})
    heterogeneous = True
    citation = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022 (docs/methods.md §12)"
    version = 1

    def __init__(self, ctx, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: float = 20, ce_weight: float = 1.0):
        super().__init__(ctx)
        if not temperature > 0:
            raise ValueError(f"dkd: temperature must be > 0, got {temperature!r}")
        if warmup < 0:
            raise ValueError(f"dkd: warmup must be >= 0 (epochs), got {warmup!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.warmup = warmup
        self.task_loss_weight = ce_weight

    def warmup_factor(self, epoch: float) -> float:
        """``min(epoch / warmup, 1)`` with the epoch counted from 1; 1 when ``warmup`` is 0."""
        if self.warmup <= 0:
            return 1.0
        return min(float(epoch) / float(self.warmup), 1.0)

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        loss = dkd_loss(s.logits, t.logits, batch.targets, self.alpha, self.beta, self.temperature)
        return {"loss_dkd": self.warmup_factor(batch.epoch) * loss}
