"""How the networks of a training step are laid out for speed: the one setup :func:`kdbench.train.fit` and
``kdbench bench`` share (:func:`prepare_models`). Each choice changes float rounding only, never what is
computed: ``channels_last`` for conv nets, the frozen teacher's batch norms folded into its convolutions
(``models/fold.py``), and on CPU the allocator tuning (``allocator.py``) and the teacher's frozen inference
graph (``models/frozen.py``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn


def _has_conv(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, nn.Conv2d) for m in module.modules())


def channels_last_enabled(*modules: nn.Module | None) -> bool:
    """Whether :func:`prepare_models` puts these networks in ``channels_last``: when any has a 2-D convolution
    (conv nets: same numbers up to float rounding, a faster forward), unless ``KDBENCH_CHANNELS_LAST=0``."""
    if os.environ.get("KDBENCH_CHANNELS_LAST", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(not getattr(m, "supports_channels_last", True) for m in modules if m is not None):
        return False  # a model whose compiled ops need contiguous NCHW inputs (mmcv's deformable convs: mmdet:)
    return any(_has_conv(m) for m in modules)


def to_channels_last(x: Any) -> Any:
    """A 4-D tensor in ``channels_last`` memory format (same values); anything else as it is."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_models(student: nn.Module | None, teacher: nn.Module | None, method: nn.Module | None,
                   device: torch.device, x: Any = None, y: Any = None, *, task=None,
                   example: Any = None) -> tuple[Any, Any]:
    """Put the networks on ``device`` in the layout a training step runs them in (the one setup
    :func:`kdbench.train.fit` and ``kdbench bench`` share): student and method in train mode, the teacher in
    eval mode and frozen, and conv nets in ``channels_last`` (:func:`channels_last_enabled`; a method's adapters
    follow the student). With a ``task``, the frozen teacher's batch norms are folded into the convolutions that
    alone feed them (:func:`kdbench.models.fold.fold_frozen_bn`, checked on one forward of ``example``, default
    ``x``, with the method's teacher taps; float rounding only). On a CPU the process' allocator keeps large
    blocks for reuse (:func:`kdbench.allocator.tune_cpu_allocator`: no page faults per step; no number changes),
    and a conv teacher's forward runs as a frozen inference graph where it computes what the eager one does
    (:func:`kdbench.models.frozen.install`; float rounding only).
    Returns the batch ``(x, y)`` on the device, in that layout."""
    if torch.device(device).type == "cpu":
        from kdbench.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    cl = channels_last_enabled(student, teacher)
    for m in (student, method):
        if m is not None:
            m.to(device).train()
            if cl:
                m.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
        teacher.requires_grad_(False)
        if cl:
            teacher.to(memory_format=torch.channels_last)
    if x is not None:
        x = x.to(device)
        if cl:
            x = to_channels_last(x)
    if teacher is not None and task is not None and (example is not None or x is not None):
        from kdbench.models.fold import fold_frozen_bn

        probe = x
        if example is not None:
            probe = example.to(device)
            if cl:
                probe = to_channels_last(probe)
        taps = method.taps().teacher if method is not None else ()
        fold_frozen_bn(teacher, lambda: task.forward(teacher, probe, None, taps))
    if teacher is not None and cl and torch.device(device).type == "cpu":
        from kdbench.models import frozen

        frozen.install(teacher)
    if y is not None and isinstance(y, Tensor):
        y = y.to(device)
    return x, y
