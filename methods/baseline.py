"""The student trained alone with its task loss: the reference every distillation method is compared to."""

from __future__ import annotations

from kdbench.method import Distiller, register_method


@register_method("baseline")
class Baseline(Distiller):
    """Student baseline: task loss only, no teacher."""

    tasks = frozenset({"classification", "detection", "segmentation"})
    needs_teacher = False
    heterogeneous = True
    citation = "Student trained alone (no distillation)."
    version = 1

    def __init__(self, ctx):
        super().__init__(ctx)

    def forward(self, s, t, batch):
        return {}
