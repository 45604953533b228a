"""The training loop (:func:`fit`): epochs of :func:`kdbench.step.train_step` with the recipe's optimiser and
per-step LR schedule (``kdbench/recipe.py``), AMP on GPU, a checkpoint every epoch and exact resume from it
(``kdbench/checkpoint.py``), a progress bar, per-epoch metrics in ``log.jsonl``, a ``progress.json`` for the
scheduler's live display (``kdbench/progress.py``: at most one small write a second), and the final and
best-epoch metrics. The networks are laid out as ``kdbench/perf.py`` says.

Reproducibility: every epoch reseeds the global RNG and the data order from ``(seed, epoch)``, so a run resumed
from its last checkpoint continues exactly as an uninterrupted one would. A batch made in the training process
(no loader workers) draws its augmentation from its own stream, seeded from ``(seed, epoch, batch)``
(:func:`batches`): the runs of one seed see the same batches whatever their methods draw (common random numbers).
A recipe's ``mixup`` mixes each training batch once, on the device, before the teacher's forward (the teacher
sees the mixed images too, and so does every member of a cohort), with numpy's global RNG seeded from ``(seed,
epoch, batch)`` and put back afterwards (``kdbench.recipe.mix_batch``): the same mixed batches in every run of a
seed and after a resume. The targets are then soft (N×K) for the task loss and the method's ``Batch``. The
recipe's ``label_smoothing`` goes to the task's training loss (``task.configure_training``).

Distributed runs (``dist`` with world > 1, see ``kdbench/ddp.py``): each rank trains on its slice of every
global batch with synchronised batch norm and averaged gradients; only rank 0 evaluates (metrics broadcast)
and writes the checkpoint and the log. With world 1 the loop is exactly the single-process one. Under mixup each
rank mixes its own slice, with the same draws on every rank (one mixing weight per global batch); the pairs of
mixed images are then those within a slice, not those of the single-process batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench import ddp
from kdbench.checkpoint import read_checkpoint, restore_checkpoint, write_checkpoint, write_log
from kdbench.method import Batch, Distiller, Outputs
from kdbench.perf import channels_last_enabled, prepare_models, to_channels_last
from kdbench.recipe import (Recipe, amp_dtype, base_lr, batch_seed, build_mixup, build_optimizer, epoch_seed,
                            loader_options, lr_factor, mix_batch, mixup_seed, steps_per_epoch, teacher_dtype)
from kdbench.results import CHECKPOINT_FILE, LOG_FILE
from kdbench.step import Diverged, StepSetup, teacher_forward, train_step

__all__ = ["Diverged", "FitResult", "Member", "RunPlace", "fit", "fit_cohort", "train_step"]


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
    mixup: Any = None  # timm.data.Mixup of the recipe's mixup, or None


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


@dataclass(eq=False)
class Member:
    """One run of a cohort (:func:`fit_cohort`): its student, method and place; after the fit, its result or the
    exception that ended it (it left the cohort there; the others went on)."""

    student: nn.Module
    method: Distiller
    place: RunPlace
    result: FitResult | None = None
    error: BaseException | None = None
    error_text: str = ""
    # set up by fit_cohort
    loop: _Loop | None = None
    next_epoch: int = 1
    step_times: list = field(default_factory=lambda: [0.0, 0])
    progress: Any = None
    rng: Any = None
    wall_before: float = 0.0
    t_start: float = 0.0


def fit(student: nn.Module, teacher: nn.Module | None, method: Distiller, task, data,
        recipe: Recipe | Mapping[str, Any], *, seed: int, place: RunPlace) -> FitResult:
    """Train ``student`` (with ``method`` and the frozen ``teacher``) on ``data`` as the recipe says, resuming
    from the run folder's checkpoint; the task's primary metric picks the best epoch. A cohort of one: the
    numbers are those of the same run in any cohort."""
    m = Member(student, method, place)
    fit_cohort([m], teacher, task, data, recipe, seed=seed)
    if m.error is not None:
        raise m.error
    return m.result


def fit_cohort(members: list[Member], teacher: nn.Module | None, task, data, recipe: Recipe | Mapping[str, Any], *,
               seed: int, desc: str = "") -> list[Member]:
    """Train the members together: each batch is loaded (and augmented) once and the teacher's forward is taken once
    with the union of the members' taps; every member then takes its own step (student forward, method terms,
    backward, optimiser) in its own random stream, so that its numbers are those it would get alone. Members keep
    their own optimiser, schedule, checkpoint, log, progress and result. A member whose step raises (divergence,
    any error) leaves the cohort with its ``error``; the others go on. Each member resumes from its own checkpoint:
    a member behind the others trains alone until it reaches their epoch. Ctrl-C stops them all (checkpoints at
    their last finished epoch)."""
    import traceback

    from tqdm.auto import tqdm

    from kdbench.progress import ProgressFile

    recipe = Recipe.of(recipe)
    task.configure_training(recipe)
    primary = task.primary_metric
    ready = []
    for m in members:
        try:
            Path(m.place.run_dir).mkdir(parents=True, exist_ok=True)
            m.loop = _set_up(m.student, teacher, m.method, task, data, recipe, seed, m.place)
            m.result, m.next_epoch, m.step_times = _resume(m.loop, Path(m.place.run_dir) / CHECKPOINT_FILE, m.place)
            m.progress = ProgressFile(Path(m.place.run_dir), "train", recipe.epochs, m.loop.steps, metric=primary,
                                      enabled=m.place.dist.is_main)
            m.progress.update(epoch=m.next_epoch, step=0, force=True)
            m.wall_before, m.t_start = m.result.wall_time_s, time.perf_counter()
            ready.append(m)
        except Exception as e:  # this member cannot start (a bad checkpoint, a method error): the others go on
            _leave(m, e, traceback.format_exc())
    if not ready:
        return members
    lead = ready[0].loop
    dist, device, epochs = lead.dist, lead.device, recipe.epochs
    # built once: its workers persist across the evaluations (no randomness in evaluation)
    eval_loader = task.loader(data.val, recipe.eval_batch_size, persistent_workers=True, **lead.loader_options)
    first = min(m.next_epoch for m in ready)
    label = desc or (ready[0].place.desc if len(ready) == 1 else f"cohort of {len(ready)}")
    bar = tqdm(range(first, epochs + 1), desc=label or "train", initial=first - 1, total=epochs,
               disable=None if dist.is_main else True, leave=False, dynamic_ncols=True)
    for epoch in bar:
        active = [m for m in ready if m.error is None and m.next_epoch == epoch]
        if not active:
            continue
        entries = _train_epoch(active, teacher, task, data, recipe, seed, epoch)
        for m in active:
            if m.error is not None:
                continue
            try:
                _end_epoch(m, entries[id(m)], task, eval_loader, epoch, bar)
            except Exception as e:
                _leave(m, e, traceback.format_exc())
    bar.close()
    for m in ready:
        if m.error is None:
            res = m.result
            last_eval = [h for h in res.history if any(k.startswith("val_") for k in h)][-1]
            res.final = {k[4:]: v for k, v in last_eval.items() if k.startswith("val_")}
            res.step_time_s = m.step_times[0] / max(1, m.step_times[1])
            res.peak_mem_mb = _peak_mem_mb(device)
    return members


def _leave(m: Member, e: BaseException, text: str) -> None:
    m.error, m.error_text = e, text
    if m.progress is not None:
        m.progress.update(force=True)


def _end_epoch(m: Member, entry: dict, task, eval_loader, epoch: int, bar) -> None:
    """A member's epoch ends: evaluate when the recipe says, keep the best, checkpoint, log."""
    loop, res = m.loop, m.result
    recipe, dist, device = loop.recipe, loop.dist, loop.device
    primary, higher_is_better = task.primary_metric, task.metrics.get(task.primary_metric, True)
    if epoch % recipe.eval_every == 0 or epoch == loop.epochs:
        metrics = task.evaluate(m.student, eval_loader, device) if dist.is_main else None
        metrics = ddp.broadcast_object(metrics, dist)
        entry.update({f"val_{k}": v for k, v in metrics.items()})
        better = (not res.best or (metrics[primary] > res.best[primary] if higher_is_better
                                   else metrics[primary] < res.best[primary]))
        if better:
            res.best, res.best_epoch = dict(metrics), epoch
        bar.set_postfix({primary: f"{metrics[primary]:.2f}", "loss": f"{entry.get('train_loss', 0):.3f}"})
    res.history.append(entry)
    m.progress.update(value=entry.get(f"val_{primary}"), loss=entry.get("train_loss"), force=epoch == loop.epochs)
    res.wall_time_s = m.wall_before + time.perf_counter() - m.t_start
    m.next_epoch = epoch + 1
    if not dist.is_main:
        return
    write_checkpoint(Path(m.place.run_dir) / CHECKPOINT_FILE, run_id=m.place.run_id, epoch=epoch, student=m.student,
                     method=m.method, optimizer=loop.setup.optimizer, scaler=loop.scaler,
                     loop={"history": res.history, "best": res.best, "best_epoch": res.best_epoch,
                           "wall_time_s": res.wall_time_s, "resumes": res.resumes, "step_times": m.step_times})
    write_log(Path(m.place.run_dir) / LOG_FILE, res.history)


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
    opt = build_optimizer(params, recipe.optimizer, modules=(student, method))
    use_amp = amp_dtype(recipe.amp, device)  # None: off (always on CPU)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp == torch.float16)  # bf16 needs no loss scaling
    setup = StepSetup(optimizer=opt, params=params, scaler=scaler if scaler.is_enabled() else None,
                      amp=use_amp or False, grad_clip=recipe.grad_clip, dist=dist, device=device, taps=taps,
                      teacher_amp=teacher_dtype(recipe, device) if teacher is not None else None,
                      student_forward=torch.compile(student) if recipe.compile else None)  # opt-in
    return _Loop(student, teacher, method, task, data, recipe, seed, recipe.epochs,
                 steps_per_epoch(recipe, len(data.train)), device, dist, setup, scaler,
                 [g["lr"] for g in opt.param_groups], channels_last, loader_options(recipe, place.resources, device),
                 build_mixup(recipe, data.num_classes))


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


def _train_epoch(active: list[Member], teacher, task, data, recipe: Recipe, seed: int, epoch: int) -> dict:
    """Train one epoch of the active members on the same batches (the data order and each member's random stream
    seeded from ``(seed, epoch)``); return each member's log entry (by ``id``): the LR, the steps and the global
    batch's mean losses. A member whose step raises leaves (:func:`_leave`) and the others finish the epoch."""
    import traceback

    lead = active[0].loop
    device, dist = lead.device, lead.dist
    bs, n_train, steps = recipe.batch_size, len(data.train), lead.steps
    mixup, lr0_recipe = lead.mixup, base_lr(recipe.optimizer)
    torch.manual_seed(epoch_seed(seed, epoch))
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    scale = 1.0
    if dist.enabled:  # this rank's slice of each global batch, in the order one process would draw
        idx, local_bs, global_bs = ddp.shard_indices(n_train, bs, steps, g, dist)
        scale = ddp.loss_scale(local_bs, global_bs, dist)
        loader = task.loader(torch.utils.data.Subset(data.train, idx), local_bs, **lead.loader_options)
    else:  # one loader per epoch, seeded from (seed, epoch): exact resume (its workers do not persist)
        loader = task.loader(data.train, bs, shuffle=True, drop_last=n_train >= bs, generator=g, **lead.loader_options)
    it = iter(loader)  # (a loader without a generator draws its workers' base seed from the global RNG here)
    for m in active:  # each member's stream starts where a run alone would start it
        m.rng = _rng_state(device)
    sums: dict[int, dict[str, float]] = {id(m): {} for m in active}
    n_steps = {id(m): 0 for m in active}
    for m in active:
        m.progress.update(epoch=epoch, step=0)
    digest = hashlib.sha256() if epoch == 1 else None  # the first epoch's batches, as the loader gives them
    for i, (x, y) in batches(it, steps, seed, epoch, seeded=lead.loader_options["num_workers"] == 0):
        live = [m for m in active if m.error is None]
        if not live:
            break
        if digest is not None and mixup is None:
            feed_digest(digest, x)
            feed_digest(digest, y)
        step = (epoch - 1) * steps + i
        batch = Batch(inputs=None, targets=None, epoch=epoch, step=step, epochs=recipe.epochs, steps_per_epoch=steps)
        t0 = time.perf_counter()
        x, y = task.to_device(x, y, device)
        if mixup is not None:  # once for the cohort: the teacher and every member see the same mixed batch
            x, y = mix_batch(mixup, x, y, mixup_seed(seed, epoch, i))
            if digest is not None:  # the batch as the networks see it (its copy to the host is not timed)
                t_digest = time.perf_counter()
                feed_digest(digest, x)
                feed_digest(digest, y)
                t0 += time.perf_counter() - t_digest
        xs = {False: x}
        t_all = None
        shared = [m for m in live if m.loop.teacher is not None and not _own_teacher_forward(m, teacher)]
        if shared:
            cl = lead.channels_last
            xs[cl] = to_channels_last(x) if cl else x
            union = tuple(dict.fromkeys(t for m in shared for t in m.loop.setup.taps.teacher))
            with torch.random.fork_rng(devices=_rng_devices(device)):  # the members' streams are left alone
                t_all = teacher_forward(teacher, task, xs[cl], union, lead.setup, device)
        t_teacher = time.perf_counter() - t0
        for m in live:
            loop = m.loop
            t1 = time.perf_counter()
            for grp, lr0 in zip(loop.setup.optimizer.param_groups, loop.base_lrs):
                grp["lr"] = lr0 * lr_factor(recipe.schedule, step, steps, recipe.epochs, lr=lr0_recipe)
            if loop.channels_last not in xs:
                xs[loop.channels_last] = to_channels_last(x) if loop.channels_last else x
            t_out = _only_taps(t_all, loop.setup.taps.teacher) if m in shared else None  # None: its own forward
            _set_rng_state(m.rng, device)
            try:
                out = train_step(loop.student, loop.teacher, m.method, task,
                                 replace(batch, inputs=xs[loop.channels_last], targets=y), loop.setup,
                                 loss_scale=scale, teacher_out=t_out)
            except Exception as e:  # diverged or failed: this member leaves the cohort
                _leave(m, e, traceback.format_exc())
                continue
            finally:
                m.rng = _rng_state(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # what the step costs a run alone: its own part and the teacher's forward
            m.step_times[0] += time.perf_counter() - t1 + (t_teacher if m in shared else 0.0)
            m.step_times[1] += 1
            n_steps[id(m)] += 1
            acc = sums[id(m)]
            for k, v in {"loss": out.loss, "loss_task": out.task_loss, **out.terms}.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach()) * (scale / dist.world)
            m.progress.update(step=i + 1)
    entries = {}
    for m in active:
        if m.error is not None:
            continue
        acc = ddp.sum_over_ranks(sums[id(m)], dist, device)  # the global batch's mean losses
        n = max(1, n_steps[id(m)])
        entries[id(m)] = {"epoch": epoch, "lr": m.loop.setup.optimizer.param_groups[0]["lr"],
                          "steps": n_steps[id(m)], **{f"train_{k}": v / n for k, v in acc.items()},
                          **({"data_digest": digest.hexdigest()[:16]} if digest is not None else {})}
    return entries


def _own_teacher_forward(m: Member, teacher) -> bool:
    """The member's teacher taps depend on its student's forward (``TapModel.student_dependent_taps``): its step
    takes the teacher's forward itself, after its student's, as a run alone does."""
    return bool(set(m.loop.setup.taps.teacher) & set(getattr(teacher, "student_dependent_taps", ())))


def _only_taps(out: Outputs, taps: tuple[str, ...]) -> Outputs:
    """The part of the teacher's outputs (taken with a cohort's union of taps) that one member asked for."""
    return Outputs(logits=out.logits, feats={k: v for k, v in out.feats.items() if k in taps}, extras=out.extras)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def batches(loader, steps: int, seed: int, epoch: int, seeded: bool = True):
    """The first ``steps`` batches of ``loader`` (a DataLoader or its iterator). With ``seeded`` (a loader without workers, whose dataset draws its
    augmentation from the global torch RNG in this process), batch ``i`` is made under the seed
    ``batch_seed(seed, epoch, i)`` and the global RNG is left as it was: the batches do not depend on the draws
    between them."""
    it = iter(loader)
    for i in range(steps):
        if seeded:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(batch_seed(seed, epoch, i))
                b = next(it, None)
        else:
            b = next(it, None)
        if b is None:
            return
        yield i, b


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
