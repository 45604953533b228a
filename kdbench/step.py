"""The one training step of distillation (:func:`train_step`): forwards, task loss, the method's terms in fp32,
the non-finite guard, backward, gradient averaging and clipping, the optimiser step. :func:`kdbench.train.fit`,
stage 1 of the prompt methods (``kdbench/prompts.py``), ``kdbench bench``, the benchmarks and the tests all run
this step. How a run's steps are taken (optimiser, AMP, clipping, ranks, ...) is one :class:`StepSetup`, built
once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from kdbench import ddp
from kdbench.method import Batch, Outputs, Taps


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class StepSetup:
    """How every step of a run is taken (the same for all its steps).

    ``optimizer``: None runs only the backward (for checks that inspect the gradients). ``params``: what is
    clipped and averaged over ranks, default the optimizer's. ``scaler``: a GradScaler (fp16 AMP).
    ``amp``: False, True (autocast's default dtype) or the autocast dtype. ``grad_clip``: the gradients' norm
    bound. ``dist``: the ranks of a distributed run. ``device``: default the student's. ``taps``: default the
    method's. ``teacher_amp``: a dtype the teacher's forward runs under autocast in (bf16 on GPU, see
    :func:`kdbench.recipe.teacher_dtype`); its outputs are cast back to fp32. ``student_forward``: what runs the
    student's forward (a ``torch.compile`` of the student; same parameters).
    """

    optimizer: torch.optim.Optimizer | None = None
    params: list | None = None
    scaler: torch.amp.GradScaler | None = None
    amp: bool | torch.dtype = False
    grad_clip: float | None = None
    dist: ddp.Dist = ddp.SINGLE
    device: torch.device | None = None
    taps: Taps | None = None
    teacher_amp: torch.dtype | None = None
    student_forward: nn.Module | None = None


_DEFAULT = StepSetup()


@dataclass
class StepOutput:
    """What one :func:`train_step` computed: the total objective, the task loss, the method's terms (fp32) and
    the two networks' outputs (``teacher`` is None without a teacher)."""

    loss: Tensor
    task_loss: Tensor
    terms: dict[str, Tensor]
    student: Outputs
    teacher: Outputs | None


def _outputs_fp32(out: Outputs) -> Outputs:
    def f(v):
        return v.float() if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float32 else v

    return Outputs(logits=f(out.logits), feats={k: [f(t) for t in v] for k, v in out.feats.items()},
                   extras=out.extras)


def teacher_forward(teacher: nn.Module, task, x, taps_teacher, setup: StepSetup, device: torch.device) -> Outputs:
    """The frozen teacher's forward as a step takes it: under ``no_grad``, autocast as the setup says (``amp``, and
    ``teacher_amp`` with its outputs cast back to fp32). A cohort (``kdbench.train.fit_cohort``) takes it once per
    batch with the union of its members' taps and hands each member its part."""
    amp = setup.amp
    dtype = amp if isinstance(amp, torch.dtype) else None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(amp)), torch.no_grad():
        if setup.teacher_amp is None:
            return task.forward(teacher, x, None, taps_teacher)
        with torch.autocast(device_type=device.type, dtype=setup.teacher_amp):
            return _outputs_fp32(task.forward(teacher, x, None, taps_teacher))


def train_step(student: nn.Module, teacher: nn.Module | None, method: nn.Module, task, batch: Batch,
               setup: StepSetup | None = None, *, loss_scale: float = 1.0, teacher_out: Outputs | None = None,
               **options) -> StepOutput:
    """One training step of distillation, taken as ``setup`` says; keyword ``options`` are fields of
    :class:`StepSetup` (for a caller that sets one or two: ``optimizer=opt, device=device``).

    Under autocast when ``amp``: the student's forward with its taps (``task.forward(student, x, y, ...)``),
    the teacher's under ``no_grad`` (skipped when ``teacher`` is None), the task loss and the method's terms
    ``method(s, t, batch)``. Then, in fp32, ``loss = method.task_loss_weight·task_loss + Σ terms``; a non-finite
    ``loss`` (on any rank) raises :class:`Diverged`. With an ``optimizer``: zero the gradients, backward
    (through ``scaler`` when given; times ``loss_scale``, this rank's share of the global batch, in a
    distributed run), average the gradients over ranks, clip their norm to ``grad_clip``, step. Without one,
    only the backward. ``task`` needs ``forward(model, x, y, taps)`` and ``loss(outputs, y)``; ``batch`` carries
    the inputs and targets, already on the device. ``teacher_out``: the teacher's outputs for this batch, already
    computed (:func:`teacher_forward`); the teacher's forward is then not taken again.
    """
    s = replace(setup or _DEFAULT, **options) if options else (setup or _DEFAULT)
    x, y = batch.inputs, batch.targets
    taps = method.taps() if s.taps is None else s.taps
    device = next(student.parameters()).device if s.device is None else s.device
    amp = s.amp
    dtype = amp if isinstance(amp, torch.dtype) else None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(amp)):
        s_out = task.forward(student if s.student_forward is None else s.student_forward, x, y, taps.student)
        t_out = teacher_out
        if teacher is not None and t_out is None:
            t_out = teacher_forward(teacher, task, x, taps.teacher, s, device)
        task_loss = task.loss(s_out, y)
        terms = method(s_out, t_out, batch)
    loss = method.task_loss_weight * task_loss.float() + sum((v.float() for v in terms.values()),
                                                             torch.zeros((), device=device))
    if not ddp.all_finite(loss, s.dist):
        vals = {k: float(v.detach()) for k, v in {"loss_task": task_loss, **terms}.items()}
        i = batch.step - (batch.epoch - 1) * batch.steps_per_epoch
        raise Diverged(f"non-finite loss at epoch {batch.epoch}, step {i}: {vals}")
    optimizer, scaler = s.optimizer, s.scaler
    if optimizer is None:
        loss.backward()
        return StepOutput(loss, task_loss, terms, s_out, t_out)
    params = s.params
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale if s.dist.enabled else loss
    (scaled if scaler is None else scaler.scale(scaled)).backward()
    ddp.average_gradients(params, s.dist)
    if s.grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, float(s.grad_clip))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return StepOutput(loss, task_loss, terms, s_out, t_out)
