"""What a network's forward gives and what a training step is: the types the model layer, the tasks and the
method contract share (``kdbench.method`` re-exports them for method files). Imports torch only for annotations.

Tap names (resolved by the task for each model; each value is a *list* of tensors, shallow to deep):

* ``"stages"``: the output of every stage (CNN stages, ViT/Swin/MLP blocks grouped into stages,
  reshaped to ``N×C×h×w``); ``"stages_preact"``: the same before the stage's last ReLU, where the model
  has one (kdbench CIFAR nets); ``"stages_raw"``: the stages as the reference implementation returns them
  (the raw residual sums of pre-activation WRNs, else the same as ``"stages"``); ``"final"``: the last feature map, the input of global pooling;
  ``"pooled"``: the pooled feature ``N×C``; ``"cam"``: class activation maps ``N×K×h×w`` from the
  classifier weights without bias (CAT-KD); ``"fpn"``: FPN levels (detection);
  ``"module:<path>"``: the output of any submodule by its dotted path.
* ``Outputs.logits`` is always there: ``N×K`` (classification), ``N×K×H×W`` (segmentation) or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Taps:
    """Feature taps a method needs from each network. Logits are always computed."""

    student: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()


@dataclass
class Outputs:
    """One network's forward: logits plus the requested taps (each a list of tensors)."""

    logits: Tensor | None
    feats: dict[str, list[Tensor]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. a detector's own losses)

    def __getitem__(self, tap: str) -> list[Tensor]:
        try:
            return self.feats[tap]
        except KeyError:
            raise KeyError(f"tap {tap!r} was not requested; requested: {sorted(self.feats)}") from None


@dataclass
class Batch:
    """What a method sees of the current step."""

    inputs: Any
    targets: Any
    epoch: int  # 1-based epoch being trained
    step: int  # 0-based global step
    epochs: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """Fraction of training done at the start of this step, in [0, 1)."""
        return self.step / max(1, self.epochs * self.steps_per_epoch)
