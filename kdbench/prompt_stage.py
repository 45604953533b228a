"""Stage 1 of the frequency-prompt methods (docs/methods.md §7.4): tuning the prompt sets on the frozen teacher.

:func:`run_prompt_stage` inserts each :class:`~kdbench.prompts.PromptSet`'s prompted reconstruction into the
teacher's forward at a tap and trains the tokens with the teacher's task loss plus the dissimilarity of their
masks, one :func:`kdbench.train.train_step` per batch. The two small classes here are what ``train_step`` is
given as its task (the teacher's own forward, the Context's task loss) and as its method (the dissimilarity
term the insertions of the forward collected).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdbench.method import Batch, Taps
from kdbench.prompt_losses import DISSIMILARITIES
from kdbench.prompts import PromptSet


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class _StageTask:
    """The task as stage 1 gives it to :func:`kdbench.train.train_step`: the (prompted) teacher's own forward,
    and the task loss of the Context."""

    def __init__(self, loss: Callable[[Any, Any], Tensor]):
        self.loss = loss

    @staticmethod
    def forward(model: nn.Module, x: Any, y: Any, taps: Sequence[str]) -> Any:
        return model(x)


class _StageTerms:
    """Stage 1's "method" for :func:`kdbench.train.train_step`: its one term is ``dis_weight·Σ L_dis`` of the
    prompt insertions that the teacher's forward has just made (collected in ``terms``)."""

    task_loss_weight = 1.0

    def __init__(self, n_sets: int, dis_weight: float, terms: list[Tensor]):
        self.n_sets, self.dis_weight, self.terms = n_sets, dis_weight, terms

    def taps(self) -> Taps:
        return Taps()

    def __call__(self, s: Any, t: Any, batch: Batch) -> dict[str, Tensor]:
        if len(self.terms) != self.n_sets:
            raise RuntimeError(f"stage 1: {len(self.terms)} of {self.n_sets} prompt insertion hooks fired; the "
                               "tap modules are not on the teacher's forward path")
        return {"loss_dis": self.dis_weight * sum(self.terms)}


def run_prompt_stage(
    teacher: nn.Module,
    loader,
    device: torch.device,
    tap: str,
    targets: Sequence[tuple[int, PromptSet]],
    *,
    task_loss: Callable[[Any, Any], Tensor],
    iters: int,
    lr: float,
    optimizer: str = "adam",
    dissimilarity: str = "dice",
    dis_weight: float = 1.0,
) -> list[float]:
    """Stage 1 (§7.4): train the prompt sets in place on a frozen teacher; returns the objective per step.

    For every ``(i, prompt_set)`` the i-th map ``F`` of the teacher's ``tap`` is replaced in its forward by
    ``prompt_set.reconstruct(F)[0]`` (through :func:`kdbench.models.tap.edit_tap`, so token and channels-last
    networks work too). Each step is a :func:`kdbench.train.train_step` of
    ``L = task_loss(teacher(x), y) + dis_weight·Σ L_dis`` on the loader cycled for ``iters`` steps; only the
    prompt sets' parameters are optimised (Adam, or SGD with momentum 0.9). The teacher runs in eval mode with
    its parameters frozen; its mode, ``requires_grad`` flags and weights are restored/untouched, and the hooks
    are removed, whatever happens.
    """
    from kdbench.models.tap import edit_tap
    from kdbench.step import train_step

    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"stage optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if dissimilarity not in DISSIMILARITIES:
        raise ValueError(f"dissimilarity must be one of {sorted(DISSIMILARITIES)}, got {dissimilarity!r}")
    if task_loss is None:
        raise RuntimeError("stage 1 needs the teacher's task loss (Context.task_loss) and none was given")
    params = [p for _, ps in targets for p in ps.parameters() if p.requires_grad]
    history: list[float] = []
    if iters <= 0 or not params:
        return history
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9))
    dis_terms: list[Tensor] = []
    by_index = dict(targets)

    def insert(i: int, out: Tensor) -> Tensor:
        ps = by_index.get(i)
        if ps is None:
            return out
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise TypeError(f"prompt insertion needs an N×C×H×W tensor, got {type(out).__name__}")
        f_hat, dis = ps.reconstruct(out, dissimilarity)
        dis_terms.append(dis)
        return f_hat.to(out.dtype)

    task, terms = _StageTask(task_loss), _StageTerms(len(targets), dis_weight, dis_terms)
    was_training = teacher.training
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    try:
        teacher.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with edit_tap(teacher, tap, insert):
            batches = iter(loader)
            for step in range(int(iters)):
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        raise ValueError("stage 1: the loader yields no batches") from None
                x, y = _to_device(x, device), _to_device(y, device)
                dis_terms.clear()
                out = train_step(teacher, None, terms, task, Batch(inputs=x, targets=y, epoch=1, step=step, epochs=1,
                                                                   steps_per_epoch=int(iters)),
                                 optimizer=opt, params=params, device=device)
                history.append(float(out.loss.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return history
