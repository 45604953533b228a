"""The training loop (:func:`fit`): epochs of :func:`kdbench.step.train_step` with the recipe's optimiser and
per-step LR schedule (``kdbench/recipe.py``), AMP on GPU, a checkpoint every epoch and exact resume from it
(``kdbench/checkpoint.py``), a progress bar, per-epoch metrics in ``log.jsonl``, a ``progress.json`` for the
scheduler's live display (``kdbench/progress.py``: at most one small write a second), and the final and
best-epoch metrics. The networks are laid out as ``kdbench/perf.py`` says.

Reproducibility: every epoch reseeds the global RNG and the data order from ``(seed, epoch)``, so a run resumed
from its last checkpoint continues exactly as an uninterrupted one would.

Distributed runs (``dist`` with world > 1, see ``kdbench/ddp.py``): each rank trains on its slice of every
global batch with synchronised batch norm and averaged gradients; only rank 0 evaluates (metrics broadcast)
and writes the checkpoint and the log. With world 1 the loop is exactly the single-process one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench import ddp
from kdbench.checkpoint import read_checkpoint, restore_checkpoint, write_checkpoint, write_log
from kdbench.method import Batch, Distiller
from kdbench.perf import channels_last_enabled, prepare_models, to_channels_last
from kdbench.recipe import (Recipe, amp_dtype, build_optimizer, epoch_seed, loader_options, lr_factor, steps_per_epoch,
                            teacher_dtype)
from kdbench.results import CHECKPOINT_FILE, LOG_FILE
from kdbench.step import Diverged, StepSetup, train_step

__all__ = ["Diverged", "FitResult", "RunPlace", "fit", "train_step"]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    step_time_s: float = 0.0
    wall_time_s: float = 0.0
    resumes: int = 0
    peak_mem_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunPlace:
    """Where a training run happens: its folder (checkpoint, log, progress), its ``run_id`` (written into every
    checkpoint; a checkpoint of another run is refused), the device, the ranks of a distributed run, the
    suite's resources (``num_workers: auto``) and the progress bar's label."""

    run_dir: Path
    device: torch.device
    run_id: str | None = None
    dist: ddp.Dist = ddp.SINGLE
    resources: dict | None = None
    desc: str = ""


@dataclass
class _Loop:
    """What :func:`fit` sets up once and every epoch uses."""

    student: nn.Module
    teacher: nn.Module | None
    method: Distiller
    task: object
    data: object
    recipe: Recipe
    seed: int
    epochs: int
    steps: int  # per epoch
    device: torch.device
    dist: ddp.Dist
    setup: StepSetup
    scaler: torch.amp.GradScaler  # (disabled unless fp16 AMP) always checkpointed
    base_lrs: list[float]
    channels_last: bool
    loader_options: dict


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


def fit(student: nn.Module, teacher: nn.Module | None, method: Distiller, task, data,
        recipe: Recipe | Mapping[str, Any], *, seed: int, place: RunPlace) -> FitResult:
    """Train ``student`` (with ``method`` and the frozen ``teacher``) on ``data`` as the recipe says, resuming
    from the run folder's checkpoint; the task's primary metric picks the best epoch."""
    run_dir, device, dist = Path(place.run_dir), place.device, place.dist
    run_dir.mkdir(parents=True, exist_ok=True)
    primary, higher_is_better = task.primary_metric, task.metrics.get(task.primary_metric, True)
    recipe = Recipe.of(recipe)
    loop = _set_up(student, teacher, method, task, data, recipe, seed, place)
    epochs = loop.epochs
    res, start_epoch, step_times = _resume(loop, run_dir / CHECKPOINT_FILE, place)
    # built once: its workers persist across the evaluations (no randomness in evaluation)
    eval_loader = task.loader(data.val, recipe.eval_batch_size, persistent_workers=True,
                              **loop.loader_options)
    t_start = time.perf_counter()
    wall_before = res.wall_time_s

    from tqdm.auto import tqdm

    from kdbench.progress import ProgressFile

    # the scheduler reads it to show this run's epoch across processes (kdbench/progress.py)
    progress = ProgressFile(run_dir, "train", epochs, loop.steps, metric=primary, enabled=dist.is_main)
    progress.update(epoch=start_epoch, step=0, force=True)
    bar = tqdm(range(start_epoch, epochs + 1), desc=place.desc or "train", initial=start_epoch - 1, total=epochs,
               disable=None if dist.is_main else True, leave=False, dynamic_ncols=True)
    for epoch in bar:
        entry = _train_epoch(loop, epoch, progress, step_times)
        if epoch % recipe.eval_every == 0 or epoch == epochs:
            metrics = task.evaluate(student, eval_loader, device) if dist.is_main else None
            metrics = ddp.broadcast_object(metrics, dist)
            entry.update({f"val_{k}": v for k, v in metrics.items()})
            better = (not res.best or (metrics[primary] > res.best[primary] if higher_is_better
                                       else metrics[primary] < res.best[primary]))
            if better:
                res.best, res.best_epoch = dict(metrics), epoch
            bar.set_postfix({primary: f"{metrics[primary]:.2f}", "loss": f"{entry.get('train_loss', 0):.3f}"})
        res.history.append(entry)
        progress.update(value=entry.get(f"val_{primary}"), loss=entry.get("train_loss"), force=epoch == epochs)
        res.wall_time_s = wall_before + time.perf_counter() - t_start
        if not dist.is_main:
            continue
        write_checkpoint(run_dir / CHECKPOINT_FILE, run_id=place.run_id, epoch=epoch, student=student,
                         method=method, optimizer=loop.setup.optimizer, scaler=loop.scaler,
                         loop={"history": res.history, "best": res.best, "best_epoch": res.best_epoch,
                               "wall_time_s": res.wall_time_s, "resumes": res.resumes, "step_times": step_times})
        write_log(run_dir / LOG_FILE, res.history)
    bar.close()
    last_eval = [h for h in res.history if any(k.startswith("val_") for k in h)][-1]
    res.final = {k[4:]: v for k, v in last_eval.items() if k.startswith("val_")}
    res.step_time_s = step_times[0] / max(1, step_times[1])
    res.peak_mem_mb = _peak_mem_mb(device)
    return res


def _set_up(student, teacher, method, task, data, recipe: Recipe, seed: int, place: RunPlace) -> _Loop:
    """The networks laid out and (distributed) synchronised; the optimiser, AMP and the rest of the step's
    setup, as the recipe says."""
    device, dist = place.device, place.dist
    taps = method.taps()
    prepare_models(student, teacher, method, device, task=task,
                   example=task.example_input(data) if teacher is not None else None)
    channels_last = channels_last_enabled(student, teacher)
    if dist.enabled:  # synchronised BN, identical starting weights on every rank
        ddp.sync_batchnorm(student, dist, device)
        ddp.sync_batchnorm(method, dist, device)
        ddp.broadcast_module(student, dist)
        ddp.broadcast_module(method, dist)
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = build_optimizer(params, recipe.optimizer)
    use_amp = amp_dtype(recipe.amp, device)  # None: off (always on CPU)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp == torch.float16)  # bf16 needs no loss scaling
    setup = StepSetup(optimizer=opt, params=params, scaler=scaler if scaler.is_enabled() else None,
                      amp=use_amp or False, grad_clip=recipe.grad_clip, dist=dist, device=device, taps=taps,
                      teacher_amp=teacher_dtype(recipe, device) if teacher is not None else None,
                      student_forward=torch.compile(student) if recipe.compile else None)  # opt-in
    return _Loop(student, teacher, method, task, data, recipe, seed, recipe.epochs,
                 steps_per_epoch(recipe, len(data.train)), device, dist, setup, scaler,
                 [g["lr"] for g in opt.param_groups], channels_last, loader_options(recipe, place.resources, device))


def _resume(loop: _Loop, path: Path, place: RunPlace) -> tuple[FitResult, int, list]:
    """The result so far, the first epoch to train and the step-time sums: from the run's checkpoint when there
    is one (``kdbench.checkpoint.read_checkpoint``), else from nothing."""
    res = FitResult()
    ck = read_checkpoint(path, place.run_id, place.device, res.warnings, place.dist.is_main)
    if ck is None:
        return res, 1, [0.0, 0]
    state = restore_checkpoint(ck, student=loop.student, method=loop.method, optimizer=loop.setup.optimizer,
                               scaler=loop.scaler)
    res.history, res.best, res.best_epoch = state["history"], state["best"], state["best_epoch"]
    res.wall_time_s, res.resumes = state["wall_time_s"], state["resumes"] + 1
    return res, state["epoch"] + 1, state["step_times"]


def _train_epoch(loop: _Loop, epoch: int, progress, step_times: list) -> dict:
    """Train one epoch (its RNG and data order seeded from ``(seed, epoch)``); return its log entry: the LR, the
    steps and the global batch's mean losses. ``step_times`` accumulates [seconds, steps]; ``progress`` (a
    ``kdbench.progress.ProgressFile``) hears of every finished step."""
    task, data, device, dist, opt = loop.task, loop.data, loop.device, loop.dist, loop.setup.optimizer
    bs, n_train = loop.recipe.batch_size, len(data.train)
    torch.manual_seed(epoch_seed(loop.seed, epoch))
    g = torch.Generator().manual_seed(epoch_seed(loop.seed, epoch))
    scale = 1.0
    if dist.enabled:  # this rank's slice of each global batch, in the order one process would draw
        idx, local_bs, global_bs = ddp.shard_indices(n_train, bs, loop.steps, g, dist)
        scale = ddp.loss_scale(local_bs, global_bs, dist)
        loader = task.loader(torch.utils.data.Subset(data.train, idx), local_bs, **loop.loader_options)
    else:  # one loader per epoch, seeded from (seed, epoch): exact resume (its workers do not persist)
        loader = task.loader(data.train, bs, shuffle=True, drop_last=n_train >= bs, generator=g,
                             **loop.loader_options)
    sums: dict[str, float] = {}
    n_steps = 0
    progress.update(epoch=epoch, step=0)
    digest = hashlib.sha256() if epoch == 1 else None  # the first epoch's batches, as the loader gives them
    for i, (x, y) in enumerate(loader):
        if i >= loop.steps:
            break
        if digest is not None:
            feed_digest(digest, x)
            feed_digest(digest, y)
        step = (epoch - 1) * loop.steps + i
        for grp, lr0 in zip(opt.param_groups, loop.base_lrs):
            grp["lr"] = lr0 * lr_factor(loop.recipe.schedule, step, loop.steps, loop.epochs)
        t0 = time.perf_counter()
        x, y = task.to_device(x, y, device)
        if loop.channels_last:
            x = to_channels_last(x)
        out = train_step(loop.student, loop.teacher, loop.method, task,
                         Batch(inputs=x, targets=y, epoch=epoch, step=step, epochs=loop.epochs,
                               steps_per_epoch=loop.steps),
                         loop.setup, loss_scale=scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times[0] += time.perf_counter() - t0
        step_times[1] += 1
        n_steps += 1
        for k, v in {"loss": out.loss, "loss_task": out.task_loss, **out.terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * (scale / dist.world)
        progress.update(step=i + 1)
    sums = ddp.sum_over_ranks(sums, dist, device)  # the global batch's mean losses
    return {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "steps": n_steps,
            **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
            **({"data_digest": digest.hexdigest()[:16]} if digest is not None else {})}


def feed_digest(h, obj) -> None:
    """Feed a batch part (tensors, nested lists/tuples/dicts of them, numbers, strings) into the hash ``h``: its
    values, shapes and dtypes, in order (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update((t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            feed_digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            feed_digest(h, v)
    else:
        h.update(repr(obj).encode())


def weights_digest(net: nn.Module) -> str:
    """sha256 (16 hex digits) of a network's parameters and buffers, by name: the student's initial weights
    (``init_digest``: the runs of one seed start from the same student)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(name.encode())
        feed_digest(h, t)
    return h.hexdigest()[:16]
