"""The training step and loop. :func:`train_step` is the one step (forwards, task loss, method terms in fp32,
non-finite guard, backward, gradient averaging and clipping, optimiser step) that :func:`fit`, stage 1 of the
prompt methods (``kdbench/prompts.py``), ``benchmarks/bench_detection.py`` and the tests run.

:func:`fit` is the loop around it: optimiser, per-step LR schedule with warm-up, AMP on GPU, gradient clipping, a checkpoint
every epoch and exact resume from it, a non-finite-loss guard, a progress bar, per-epoch metrics in
``log.jsonl``, a ``progress.json`` for the scheduler's live display (``kdbench/progress.py``: at most one small
write a second), and the final and best-epoch metrics.

Reproducibility: every epoch reseeds the global RNG and the data order from ``(seed, epoch)``, so a run resumed
from its last checkpoint continues exactly as an uninterrupted one would.

Distributed runs (``dist`` with world > 1, see ``kdbench/ddp.py``): each rank trains on its slice of every
global batch with synchronised batch norm and averaged gradients; only rank 0 evaluates (metrics broadcast)
and writes the checkpoint and the log. With world 1 the loop is exactly the single-process one.

``KDBENCH_STEP_SLEEP_S`` (environment, testing only): seconds to sleep after every training step, to make
a tiny run slow enough to hit a scheduler time limit; it changes no number (not even the step time).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdbench import ddp
from kdbench.method import Batch, Distiller, Outputs, Taps


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    name = cfg["name"]
    lr = float(cfg.get("lr", 0.1 if name == "sgd" else 1e-3))
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd,
                               nesterov=bool(cfg.get("nesterov", False)))
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(cfg: dict, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at a (0-based) global step. Warm-up is linear over ``warmup_epochs``."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)
    f_warm = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    name = cfg["name"]
    if name == "multistep":
        epoch = step // steps_per_epoch  # 0-based: milestone m lowers the LR from epoch m+1 (1-based) on
        n = sum(epoch >= int(m) for m in cfg["milestones"])
        f = float(cfg.get("gamma", 0.1)) ** n
    elif name == "cosine":
        t = min(1.0, step / total)
        lo = float(cfg.get("min_lr", 0.0))
        f = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    elif name == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {name!r}")
    return f * f_warm


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


def _replace_via_tmp(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``; the temporary file (named after this process, so that two
    processes never share one) is removed when anything fails, a full disk included."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as the ``OSError`` it is (torch's own
    writer reports it as a RuntimeError from its C++ stream)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e


def _atomic_save(obj: Any, path: Path) -> None:
    _replace_via_tmp(path, lambda tmp: _torch_save(obj, tmp))


def _write_log(history: list[dict], path: Path) -> None:
    _replace_via_tmp(path, lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in history)))


#: What a checkpoint written by :func:`fit` holds (besides ``run_id``).
CHECKPOINT_KEYS = ("epoch", "student", "method", "optimizer", "scaler", "history", "best", "best_epoch",
                   "wall_time_s", "resumes", "step_times")


def _plain(x: Any) -> Any:
    """Numbers as Python numbers, containers as lists/dicts: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, int, float, str, type(None), Tensor)):
        return x
    item = getattr(x, "item", None)  # numpy scalars
    return item() if callable(item) else x


def _read_checkpoint(path: Path, run_id: str | None, device: torch.device, res: FitResult,
                     main: bool = True) -> dict | None:
    """The checkpoint to resume from, or None (start from epoch 1).

    Read with ``weights_only=True``: tensors and plain containers only, nothing in the file can run code. A
    file that cannot be read that way (truncated, damaged, foreign content) is set aside under a new name,
    never deleted, with a warning, and the run restarts. A readable checkpoint of another run (its ``run_id``
    differs: copied from another run folder) is refused: resuming it would record that run's numbers here.
    """
    from kdbench.models.sources import torch_file_problem

    try:
        problem = torch_file_problem(path)  # a damaged byte in a tensor would load silently: CRCs first
        if problem is not None:
            raise ValueError(f"not a kdbench training checkpoint: {problem}")
        ck = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
            raise ValueError("not a kdbench training checkpoint")
    except Exception as e:
        from kdbench.models.sources import _load_error

        if not main:  # rank 0 sets it aside; every rank restarts alike
            return None
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        why = str(e) if isinstance(e, ValueError) and "kdbench" in str(e) else _load_error(e)
        msg = f"warning: {path}: unreadable checkpoint ({why}); set aside as {aside.name}, the run restarts"
        print(msg, file=sys.stderr, flush=True)
        res.warnings.append(msg)
        return None
    if run_id is not None and ck.get("run_id") != run_id:
        other = ck.get("run_id")
        where = f"of run {other}" if other else "without a run_id (an older kdbench's, or copied)"
        raise ValueError(f"{path}: checkpoint {where}, not of this run {run_id}: it was copied here; delete it "
                         f"(or move it back to its run folder) and run again")
    return ck


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


AMP_MODES = ("bf16", "fp16")


def amp_dtype(amp: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``amp`` on ``device``: None (off) on CPU (bf16 autocast on a CPU without
    bf16 instructions is many times slower) and for ``false``; ``"bf16"`` -> bfloat16 (no loss scaling needed);
    ``"fp16"`` and ``true`` (the old meaning) -> float16 with a GradScaler."""
    if device.type != "cuda" or amp in (False, None, "false", "off"):
        return None
    if amp in (True, "fp16"):
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"recipe.amp must be one of false, true, {', '.join(AMP_MODES)}; got {amp!r}")


def teacher_dtype(recipe: dict, device: torch.device) -> torch.dtype | None:
    """The teacher's forward runs under bf16 autocast on a GPU that supports it, unless the recipe sets
    ``teacher_bf16: false``; never on CPU. Its outputs are handed to the method in fp32."""
    if device.type != "cuda" or not recipe.get("teacher_bf16", True):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def _outputs_fp32(out: Outputs) -> Outputs:
    def f(v):
        return v.float() if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float32 else v

    return Outputs(logits=f(out.logits), feats={k: [f(t) for t in v] for k, v in out.feats.items()},
                   extras=out.extras)


def loader_options(recipe: dict, resources: dict | None, device: torch.device) -> dict:
    """DataLoader options of a run: ``num_workers`` as the recipe says (it is part of the run's identity: worker
    seeding changes the augmentation draws), where ``num_workers: "auto"`` means ``cpus_per_task - 1`` of the
    suite's resources on a GPU (0 on CPU, where the workers would take the training threads' cores);
    ``pin_memory`` on a GPU."""
    nw = recipe.get("num_workers", 0)
    if nw == "auto":
        cpus = int((resources or {}).get("cpus_per_task") or 1)
        nw = max(0, cpus - 1) if device.type == "cuda" else 0
    return {"num_workers": int(nw or 0), "pin_memory": device.type == "cuda"}


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
    """Put the networks on ``device`` in the layout a training step runs them in (the one setup :func:`fit` and
    ``kdbench bench`` share): student and method in train mode, the teacher in eval mode and frozen, and
    conv nets in ``channels_last`` (:func:`channels_last_enabled`; a method's adapters follow the student).
    With a ``task``, the frozen teacher's batch norms are folded into the convolutions that alone feed them
    (:func:`kdbench.models.fold.fold_frozen_bn`, checked on one forward of ``example``, default ``x``, with the
    method's teacher taps; float rounding only). On a CPU the process' allocator keeps large blocks for reuse
    (:func:`kdbench.allocator.tune_cpu_allocator`: no page faults per step; no number changes), and a conv
    teacher's forward runs as a frozen inference graph where it computes what the eager one does
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


@dataclass
class StepOutput:
    """What one :func:`train_step` computed: the total objective, the task loss, the method's terms (fp32) and
    the two networks' outputs (``teacher`` is None without a teacher)."""

    loss: Tensor
    task_loss: Tensor
    terms: dict[str, Tensor]
    student: Outputs
    teacher: Outputs | None


def train_step(student: nn.Module, teacher: nn.Module | None, method: nn.Module, task, batch: Batch, *,
               optimizer: torch.optim.Optimizer | None = None, params: list | None = None,
               scaler: torch.amp.GradScaler | None = None, amp: bool | torch.dtype = False,
               grad_clip: float | None = None, dist: ddp.Dist = ddp.SINGLE, loss_scale: float = 1.0,
               device: torch.device | None = None, taps: Taps | None = None,
               teacher_amp: torch.dtype | None = None, student_forward: nn.Module | None = None) -> StepOutput:
    """One training step of distillation, the one that :func:`fit`, stage 1 of the prompt methods, the cost
    benchmark and the tests all run.

    Under autocast when ``amp``: the student's forward with its taps (``task.forward(student, x, y, ...)``),
    the teacher's under ``no_grad`` (skipped when ``teacher`` is None), the task loss and the method's terms
    ``method(s, t, batch)``. Then, in fp32, ``loss = method.task_loss_weight·task_loss + Σ terms``; a non-finite
    ``loss`` (on any rank) raises :class:`Diverged`. With an ``optimizer``: zero the gradients, backward
    (through ``scaler`` when given; times ``loss_scale`` in a distributed run), average the gradients over
    ranks, clip their norm to ``grad_clip``, step. Without one, only the backward (for checks that inspect the
    gradients). ``task`` needs ``forward(model, x, y, taps)`` and ``loss(outputs, y)``; ``batch`` carries the
    inputs and targets, already on the device. ``params`` default to the optimizer's.

    ``amp``: False, True (autocast's default dtype) or the autocast dtype. ``teacher_amp``: a dtype the teacher's
    forward runs under autocast in (bf16 on GPU, see :func:`teacher_dtype`); its outputs are cast back to fp32.
    ``student_forward``: what runs the student's forward (a ``torch.compile`` of ``student``; same parameters).
    """
    x, y = batch.inputs, batch.targets
    taps = method.taps() if taps is None else taps
    if device is None:
        device = next(student.parameters()).device
    dtype = amp if isinstance(amp, torch.dtype) else None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(amp)):
        s_out = task.forward(student if student_forward is None else student_forward, x, y, taps.student)
        t_out = None
        if teacher is not None:
            with torch.no_grad():
                if teacher_amp is None:
                    t_out = task.forward(teacher, x, None, taps.teacher)
                else:
                    with torch.autocast(device_type=device.type, dtype=teacher_amp):
                        t_out = _outputs_fp32(task.forward(teacher, x, None, taps.teacher))
        task_loss = task.loss(s_out, y)
        terms = method(s_out, t_out, batch)
    loss = method.task_loss_weight * task_loss.float() + sum((v.float() for v in terms.values()),
                                                             torch.zeros((), device=device))
    if not ddp.all_finite(loss, dist):
        vals = {k: float(v.detach()) for k, v in {"loss_task": task_loss, **terms}.items()}
        i = batch.step - (batch.epoch - 1) * batch.steps_per_epoch
        raise Diverged(f"non-finite loss at epoch {batch.epoch}, step {i}: {vals}")
    if optimizer is None:
        loss.backward()
        return StepOutput(loss, task_loss, terms, s_out, t_out)
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale if dist.enabled else loss
    (scaled if scaler is None else scaler.scale(scaled)).backward()
    ddp.average_gradients(params, dist)
    if grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return StepOutput(loss, task_loss, terms, s_out, t_out)


def fit(*, student: nn.Module, teacher: nn.Module | None, method: Distiller, task, data, recipe: dict,
        run_dir: Path, seed: int, device: torch.device, desc: str = "", primary: str = "top1",
        higher_is_better: bool = True, dist: ddp.Dist = ddp.SINGLE, run_id: str | None = None,
        resources: dict | None = None) -> FitResult:
    """Train ``student`` (with ``method`` and the frozen ``teacher``) as the recipe says, resuming from
    ``run_dir/checkpoint.pt``; ``run_id`` is written into every checkpoint and a checkpoint of another run is
    refused (see :func:`_read_checkpoint`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    epochs, bs = int(recipe["epochs"]), int(recipe["batch_size"])
    n_train = len(data.train)
    steps_per_epoch = n_train // bs if n_train >= bs else 1
    if recipe.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, int(recipe["max_steps_per_epoch"]))
    taps = method.taps()
    prepare_models(student, teacher, method, device, task=task,
                   example=task.example_input(data) if teacher is not None else None)
    channels_last = channels_last_enabled(student, teacher)
    if dist.enabled:  # synchronised BN, identical starting weights on every rank
        ddp.sync_batchnorm(student, dist, device)
        ddp.sync_batchnorm(method, dist, device)
        ddp.broadcast_module(student, dist)
        ddp.broadcast_module(method, dist)
    sleep_s = float(os.environ.get("KDBENCH_STEP_SLEEP_S") or 0)
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = build_optimizer(params, recipe["optimizer"])
    base_lrs = [g["lr"] for g in opt.param_groups]
    use_amp = amp_dtype(recipe.get("amp"), device)  # None: off (always on CPU)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp == torch.float16)  # bf16 needs no loss scaling
    t_amp = teacher_dtype(recipe, device) if teacher is not None else None
    student_fwd = torch.compile(student) if recipe.get("compile") else None  # opt-in; same parameters
    res = FitResult()
    start_epoch = 1
    ck = _read_checkpoint(ckpt_path, run_id, device, res, dist.is_main) if ckpt_path.is_file() else None
    if ck is not None:
        student.load_state_dict(ck["student"])
        method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        res.history, res.best, res.best_epoch = ck["history"], ck["best"], ck["best_epoch"]
        res.wall_time_s, res.resumes = ck["wall_time_s"], ck["resumes"] + 1
        step_times = ck["step_times"]
        start_epoch = ck["epoch"] + 1
    else:
        step_times = [0.0, 0]
    lopts = loader_options(recipe, resources, device)
    # built once: its workers persist across the evaluations (no randomness in evaluation)
    eval_loader = task.loader(data.val, int(recipe.get("eval_batch_size", 256)), persistent_workers=True, **lopts)
    t_start = time.perf_counter()
    wall_before = res.wall_time_s

    from tqdm.auto import tqdm

    from kdbench.progress import ProgressFile

    # the scheduler reads it to show this run's epoch across processes (kdbench/progress.py)
    progress = ProgressFile(run_dir, "train", epochs, steps_per_epoch, metric=primary, enabled=dist.is_main)
    progress.update(epoch=start_epoch, step=0, force=True)
    bar = tqdm(range(start_epoch, epochs + 1), desc=desc or "train", initial=start_epoch - 1, total=epochs,
               disable=None if dist.is_main else True, leave=False, dynamic_ncols=True)
    for epoch in bar:
        torch.manual_seed(epoch_seed(seed, epoch))
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        scale = 1.0
        if dist.enabled:  # this rank's slice of each global batch, in the order one process would draw
            idx, local_bs, global_bs = ddp.shard_indices(n_train, bs, steps_per_epoch, g, dist)
            scale = ddp.loss_scale(local_bs, global_bs, dist)
            loader = task.loader(torch.utils.data.Subset(data.train, idx), local_bs, **lopts)
        else:  # one loader per epoch, seeded from (seed, epoch): exact resume (its workers do not persist)
            loader = task.loader(data.train, bs, shuffle=True, drop_last=n_train >= bs, generator=g, **lopts)
        sums: dict[str, float] = {}
        n_steps = 0
        progress.update(epoch=epoch, step=0)
        for i, (x, y) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            step = (epoch - 1) * steps_per_epoch + i
            for grp, lr0 in zip(opt.param_groups, base_lrs):
                grp["lr"] = lr0 * lr_factor(recipe["schedule"], step, steps_per_epoch, epochs)
            t0 = time.perf_counter()
            x, y = task.to_device(x, y, device)
            if channels_last:
                x = to_channels_last(x)
            out = train_step(student, teacher, method, task,
                             Batch(inputs=x, targets=y, epoch=epoch, step=step, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch),
                             optimizer=opt, params=params, scaler=scaler if scaler.is_enabled() else None,
                             amp=use_amp or False, grad_clip=recipe.get("grad_clip"), dist=dist, loss_scale=scale,
                             device=device, taps=taps, teacher_amp=t_amp, student_forward=student_fwd)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times[0] += time.perf_counter() - t0
            step_times[1] += 1
            n_steps += 1
            for k, v in {"loss": out.loss, "loss_task": out.task_loss, **out.terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * (scale / dist.world)
            progress.update(step=i + 1)
            if sleep_s:
                time.sleep(sleep_s)
        sums = ddp.sum_over_ranks(sums, dist, device)  # the global batch's mean losses
        entry = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "steps": n_steps,
                 **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()}}
        if epoch % int(recipe.get("eval_every", 1)) == 0 or epoch == epochs:
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
        _atomic_save({"run_id": run_id, "epoch": epoch, "student": student.state_dict(),
                      "method": method.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                      **_plain({"history": res.history, "best": res.best, "best_epoch": res.best_epoch,
                                "wall_time_s": res.wall_time_s, "resumes": res.resumes,
                                "step_times": step_times})}, ckpt_path)
        _write_log(res.history, log_path)
    bar.close()
    last_eval = [h for h in res.history if any(k.startswith("val_") for k in h)][-1]
    res.final = {k[4:]: v for k, v in last_eval.items() if k.startswith("val_")}
    res.step_time_s = step_times[0] / max(1, step_times[1])
    res.peak_mem_mb = _peak_mem_mb(device)
    return res
