"""What a suite's ``recipe:`` means to the training loop: steps per epoch, the per-epoch seed, the optimiser,
the LR schedule, AMP and the teacher's autocast, DataLoader options. The suite checks the recipe's keys and
types (``kdbench/suite.py``: ``RECIPE_KEYS``, ``RECIPE_DEFAULTS``); this module is where their values become
numbers, for :func:`kdbench.train.fit`, the method's :class:`kdbench.method.Context` (``runner.build_context``)
and ``kdbench bench`` alike.

Torch-free at import (``steps_per_epoch`` is asked before any network is built); the functions that return
torch objects import it.

Keys that count in a recipe's identity only when the suite sets them (the run_ids of recipes without them are
unchanged): ``compile``, ``teacher_bf16``, ``label_smoothing`` (the classification training loss),
``mixup`` (mixup/cutmix of every training batch, :func:`build_mixup`); and, inside ``optimizer:`` and
``schedule:``, ``decay_filter`` (:func:`build_optimizer`) and the ``timm_cosine`` schedule (:func:`lr_factor`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AMP_MODES = ("bf16", "fp16")
#: the recipe's keys and the types of their values (the suite checks them, naming the file and key)
RECIPE_KEYS = {
    "epochs": int, "batch_size": int, "optimizer": dict, "schedule": dict, "grad_clip": (int, float, type(None)),
    "amp": (bool, str), "eval_every": int, "eval_batch_size": int, "num_workers": (int, str),
    "max_steps_per_epoch": (int, type(None)), "compile": bool, "teacher_bf16": bool,
    "label_smoothing": (int, float), "mixup": dict,
}
#: string values a recipe key takes besides its typed ones (:func:`amp_dtype`, :func:`loader_options`)
RECIPE_CHOICES = {"amp": ("bf16", "fp16"), "num_workers": ("auto",)}
#: the defaults every recipe carries (they are part of its identity, hence of every run_id that hashes it)
RECIPE_DEFAULTS = {"grad_clip": None, "amp": True, "eval_every": 1, "eval_batch_size": 256, "num_workers": 0,
                   "max_steps_per_epoch": None}
OPTIMIZERS = {"sgd": {"lr", "momentum", "weight_decay", "nesterov", "decay_filter"},
              "adamw": {"lr", "weight_decay", "betas", "decay_filter"},
              "adam": {"lr", "weight_decay", "betas", "decay_filter"}}
SCHEDULES = {"multistep": {"milestones", "gamma", "warmup_epochs"}, "cosine": {"warmup_epochs", "min_lr"},
             "constant": {"warmup_epochs"}, "timm_cosine": {"warmup_epochs", "warmup_lr", "min_lr"}}
#: the values of an optimiser's ``decay_filter`` (:func:`decay_groups`)
DECAY_FILTERS = {"1d": "no weight decay on parameters with at most one dimension or named *.bias (timm's optimiser "
                       "factory on a module without no_weight_decay(), e.g. OFAKD's distiller)",
                 "timm": "1d, and none on the names the models' no_weight_decay() return (timm's train.py on a timm "
                         "model: ViT pos_embed, cls_token)"}
#: the keys of a recipe's ``mixup:`` and their defaults (those of ``timm.data.Mixup``)
MIXUP_DEFAULTS = {"mixup_alpha": 1.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"}
MIXUP_MODES = ("batch", "pair", "elem")


@dataclass(frozen=True)
class Recipe:
    """A run's training recipe, typed: built once from the suite's ``recipe:`` (checked by the suite) with
    :data:`RECIPE_DEFAULTS` filled in, read by attribute everywhere it is used. :meth:`identity` is the plain
    mapping a RunSpec keeps and its run_id hashes: the keys the suite gave plus the defaults, in that order, with
    their values; ``compile``, ``teacher_bf16``, ``label_smoothing`` and ``mixup`` count only when the suite sets
    them. :meth:`of` checks the values of ``label_smoothing``, ``mixup``, ``optimizer.decay_filter`` and a
    ``timm_cosine`` schedule (:func:`check_values`)."""

    epochs: int
    batch_size: int
    optimizer: Mapping[str, Any]
    schedule: Mapping[str, Any]
    grad_clip: float | None = None
    amp: bool | str = True
    eval_every: int = 1
    eval_batch_size: int = 256
    num_workers: int | str = 0
    max_steps_per_epoch: int | None = None
    compile: bool = False
    teacher_bf16: bool = True
    label_smoothing: float = 0.0
    mixup: Mapping[str, Any] | None = None
    keys: tuple[str, ...] = field(default=(), repr=False)  # the keys of :meth:`identity`, in order

    @classmethod
    def of(cls, recipe: Recipe | Mapping[str, Any]) -> Recipe:
        """``recipe`` as a :class:`Recipe` (a mapping: a RunSpec's ``recipe``, or a suite's checked one)."""
        if isinstance(recipe, Recipe):
            return recipe
        unknown = sorted(set(recipe) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(RECIPE_KEYS)}")
        merged = {**RECIPE_DEFAULTS, **recipe}
        missing = [k for k in ("epochs", "batch_size", "optimizer", "schedule") if k not in merged]
        if missing:
            raise ValueError(f"recipe lacks {', '.join(missing)}")
        check_values(merged)
        return cls(**merged, keys=tuple(merged))

    def identity(self) -> dict[str, Any]:
        """The plain mapping a RunSpec keeps and its run_id hashes (see the class docstring)."""
        return {k: getattr(self, k) for k in self.keys}


_FIELD_DEFAULTS = {"compile": False, "teacher_bf16": True, "label_smoothing": 0.0, "mixup": None, **RECIPE_DEFAULTS}


class RecipeError(ValueError):
    """A recipe value is out of its range: ``key`` is its dotted path inside the recipe (``mixup.mode``),
    ``reason`` says what is wrong and what is valid. The message is ``recipe.KEY: REASON``."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"recipe.{key}: {reason}")
        self.key, self.reason = key, reason


def _real(v: Any) -> float | None:
    """``v`` as the training loop reads a number (``float(v)``: an int, a float or a numeric string such as
    ``"5e-4"``, which YAML reads as a string), or None when it is not one (booleans are not numbers here)."""
    if isinstance(v, bool):
        return None
    try:
        return float(v) if isinstance(v, (int, float, str)) else None
    except ValueError:
        return None


def _check_number(key: str, v: Any, lo: float, hi: float | None = None, hi_open: bool = False) -> None:
    x = _real(v)
    bound = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
    if x is None or not (x >= lo and (hi is None or (x < hi if hi_open else x <= hi))):
        raise RecipeError(key, f"expected a number >= {lo}{bound}, got {v!r}")


def check_values(recipe: Mapping[str, Any]) -> None:
    """Raise :class:`RecipeError` for a value of ``label_smoothing``, ``mixup``, ``optimizer.decay_filter`` or a
    ``timm_cosine`` schedule that the training loop cannot use (the suite checks the other keys' types):
    ``label_smoothing`` in [0, 1); ``mixup`` only the keys of :data:`MIXUP_DEFAULTS`, alphas >= 0 and not both 0,
    probabilities in [0, 1], a mode of :data:`MIXUP_MODES`, and an even ``batch_size`` (mixup pairs each image of
    a batch with the one at the mirrored position); ``decay_filter`` one of :data:`DECAY_FILTERS`; ``warmup_epochs``,
    ``warmup_lr`` and ``min_lr`` of ``timm_cosine`` numbers >= 0."""
    if "label_smoothing" in recipe:
        _check_number("label_smoothing", recipe["label_smoothing"], 0.0, 1.0, hi_open=True)
    mix = recipe.get("mixup")
    if mix is not None:
        if not isinstance(mix, Mapping):
            raise RecipeError("mixup", f"expected a mapping of {', '.join(MIXUP_DEFAULTS)}, got {mix!r}")
        unknown = sorted(set(mix) - set(MIXUP_DEFAULTS))
        if unknown:
            raise RecipeError(f"mixup.{unknown[0]}", f"unknown key; valid keys here: {', '.join(MIXUP_DEFAULTS)}")
        for k in ("mixup_alpha", "cutmix_alpha"):
            if k in mix:
                _check_number(f"mixup.{k}", mix[k], 0.0)
        for k in ("prob", "switch_prob"):
            if k in mix:
                _check_number(f"mixup.{k}", mix[k], 0.0, 1.0)
        if mix.get("mode", "batch") not in MIXUP_MODES:
            raise RecipeError("mixup.mode", f"unknown mode {mix['mode']!r}; valid: {', '.join(MIXUP_MODES)}")
        cfg = mixup_config(recipe)
        if not (cfg["mixup_alpha"] > 0 or cfg["cutmix_alpha"] > 0):
            raise RecipeError("mixup", "mixup_alpha or cutmix_alpha must be > 0 (both are 0: nothing to mix)")
        bs = recipe.get("batch_size")
        if isinstance(bs, int) and bs % 2:
            raise RecipeError("batch_size", f"mixup needs an even batch size (it pairs each image of a batch "
                                            f"with the one at the mirrored position), got {bs}")
    opt = recipe.get("optimizer")
    if isinstance(opt, Mapping) and "decay_filter" in opt and opt["decay_filter"] not in DECAY_FILTERS:
        raise RecipeError("optimizer.decay_filter", f"unknown filter {opt['decay_filter']!r}; valid: "
                                                    f"{', '.join(DECAY_FILTERS)}")
    sch = recipe.get("schedule")
    if isinstance(sch, Mapping) and sch.get("name") == "timm_cosine":
        for k in ("warmup_epochs", "warmup_lr", "min_lr"):
            if k in sch:
                _check_number(f"schedule.{k}", sch[k], 0.0)


def value(recipe: Recipe | Mapping[str, Any], key: str) -> Any:
    """One value of a recipe, typed or a mapping (a RunSpec's), its default where the mapping lacks it."""
    if isinstance(recipe, Recipe):
        return getattr(recipe, key)
    return recipe[key] if key in recipe or key not in _FIELD_DEFAULTS else _FIELD_DEFAULTS[key]


def steps_per_epoch(recipe: Recipe | Mapping[str, Any], n_train: int) -> int:
    """Optimiser steps in one epoch: the full batches of ``n_train`` examples (the loader drops the last
    partial one), at least 1 (a training set smaller than a batch is one partial batch), at most the recipe's
    ``max_steps_per_epoch`` when it sets one."""
    steps = max(1, int(n_train) // int(value(recipe, "batch_size")))
    if value(recipe, "max_steps_per_epoch"):
        steps = min(steps, int(value(recipe, "max_steps_per_epoch")))
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global RNG and of the data order in ``epoch`` of a run seeded ``seed`` (so that a run
    resumed from a checkpoint draws what an uninterrupted one would)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random draws that make batch ``index`` of ``epoch`` (augmentation in the training process):
    its own stream, so the batches do not depend on what the student or the method draws between them."""
    return (epoch_seed(seed, epoch) * 1_000_033 + int(index) * 104_729 + 1) % (2**31 - 1)


def mixup_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of numpy's global RNG while batch ``index`` of ``epoch`` is mixed (:func:`mix_batch`): derived from
    :func:`batch_seed`, not equal to it, since numpy's and torch's CPU generators are both MT19937 and one seed
    would give both the same stream."""
    return (batch_seed(seed, epoch, index) * 1_000_037 + 7_907) % (2**31 - 1)


def base_lr(cfg: Mapping[str, Any]) -> float:
    """The learning rate of a recipe's ``optimizer:``: its ``lr``, else 0.1 for sgd and 1e-3 for adam/adamw."""
    return float(cfg.get("lr", 0.1 if cfg["name"] == "sgd" else 1e-3))


def decay_groups(params, modules, weight_decay: float, mode: str = "timm") -> list[dict]:
    """``params`` in two parameter groups, as timm's optimiser factory makes them (``create_optimizer_v2`` with
    ``filter_bias_and_bn``): weight decay 0 for the parameters with at most one dimension (biases, norm weights)
    and those whose name ends in ``.bias``; with ``mode="timm"`` also those a module's ``no_weight_decay()`` names
    (timm models have it: ViT's ``pos_embed``, ``cls_token``; the names are relative to that module and may be
    glob patterns), as when timm's factory is given the timm model itself. ``mode="1d"`` leaves those decayed, as
    when it is given a wrapper without ``no_weight_decay()`` (OFAKD passes its distiller). Weight decay
    ``weight_decay`` for the others. The names come from ``modules`` (the networks the parameters belong to,
    searched down to every submodule: a timm model wrapped in a kdbench TapModel is found). Groups keep the order
    of ``params``; an empty group is left out; the zero-decay group comes first."""
    if mode not in DECAY_FILTERS:
        raise ValueError(f"unknown decay_filter {mode!r}; valid: {', '.join(DECAY_FILTERS)}")
    skip = {id(p) for net in modules for n, p in net.named_parameters() if n.endswith(".bias")}
    if mode == "timm":
        for net in modules:
            for m in net.modules():
                names = getattr(m, "no_weight_decay", None)
                if callable(names):
                    patterns = set(names())
                    skip.update(id(p) for n, p in m.named_parameters()
                                if any(fnmatch.fnmatchcase(n, pat) for pat in patterns))
    no_decay = [p for p in params if p.ndim <= 1 or id(p) in skip]
    decay = [p for p in params if not (p.ndim <= 1 or id(p) in skip)]
    return [g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
            if g["params"]]


def build_optimizer(params, cfg: dict, modules=()):
    """The ``torch.optim`` optimiser of a recipe's ``optimizer:`` (sgd, adamw, adam) over ``params``. With
    ``decay_filter`` (``1d`` or ``timm``) the parameters are split into a zero-decay and a decay group (:func:`decay_groups`,
    whose names come from ``modules``: the student and the method, whose own parameters count alike); without it,
    one group of ``params``."""
    import torch

    name = cfg["name"]
    lr = base_lr(cfg)
    wd = float(cfg.get("weight_decay", 0.0))
    if cfg.get("decay_filter"):
        params = decay_groups(list(params), modules, wd, cfg["decay_filter"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd,
                               nesterov=bool(cfg.get("nesterov", False)))
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}")


def timm_cosine_lr(cfg: Mapping[str, Any], epoch: int, epochs: int, lr: float) -> float:
    """The learning rate of the ``timm_cosine`` schedule in the (0-based) ``epoch`` of ``epochs``, for the
    optimiser's ``lr``: what timm's ``CosineLRScheduler`` gives per epoch as timm's ``create_scheduler`` builds it
    for ``sched: cosine`` (``t_initial = epochs``, ``t_in_epochs``, one cycle, no cooldown, no noise). For
    ``epoch < warmup_epochs``: ``warmup_lr + epoch·(lr - warmup_lr)/warmup_epochs``; after:
    ``min_lr + ½(lr - min_lr)(1 + cos(π·epoch/epochs))``, where ``epoch`` counts from 0, not from the end of the
    warm-up; ``min_lr`` from ``epochs`` on. ``warmup_lr`` and ``min_lr`` are learning rates (default 0, as timm's),
    not factors of ``lr``."""
    warm = float(cfg.get("warmup_epochs", 0))
    w_lr, lo = float(cfg.get("warmup_lr", 0.0)), float(cfg.get("min_lr", 0.0))
    if epoch < warm:
        return w_lr + epoch * ((lr - w_lr) / warm)
    if epoch >= epochs:
        return lo
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * epoch / epochs))


def lr_factor(cfg: dict, step: int, steps_per_epoch: int, epochs: int, lr: float | None = None) -> float:
    """Multiplier of the base LR at a (0-based) global step of a recipe's ``schedule:``; the loop sets each
    parameter group's LR to its base LR times it. Warm-up is linear over ``warmup_epochs``, per step.

    ``timm_cosine`` sets the LR per epoch (constant within one) and needs ``lr``, the recipe's optimiser LR
    (:func:`base_lr`): the factor is :func:`timm_cosine_lr` / ``lr``, so a group whose base LR is ``lr`` gets
    exactly timm's LR, and a group with another base LR gets ``warmup_lr`` and ``min_lr`` scaled by its base LR
    over ``lr`` (timm would give every group the same absolute ``min_lr``; the optimisers of
    :func:`build_optimizer` give all their groups the same base LR)."""
    name = cfg["name"]
    if name == "timm_cosine":
        if lr is None or not lr > 0:
            raise ValueError(f"the timm_cosine schedule needs the optimiser's lr (> 0), got {lr!r}: its warmup_lr "
                             f"and min_lr are learning rates, not factors")
        return timm_cosine_lr(cfg, step // steps_per_epoch, epochs, lr) / lr
    total = max(1, epochs * steps_per_epoch)
    warm = int(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)
    f_warm = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
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


def mixup_config(recipe: Recipe | Mapping[str, Any]) -> dict[str, Any] | None:
    """A recipe's ``mixup:`` over :data:`MIXUP_DEFAULTS`, numbers as floats; None when the recipe has none."""
    mix = value(recipe, "mixup")
    if mix is None:
        return None
    cfg = {**MIXUP_DEFAULTS, **mix}
    return {k: (v if k == "mode" else float(v)) for k, v in cfg.items()}


def build_mixup(recipe: Recipe | Mapping[str, Any], num_classes: int):
    """The ``timm.data.Mixup`` of a recipe's ``mixup:`` (None without one): its alphas, probabilities and mode,
    the recipe's ``label_smoothing`` folded into the mixed targets, ``num_classes`` classes. It turns a batch of
    images and class indices into mixed images and soft targets (N×K, rows summing to 1); its draws come from
    numpy's global RNG (see :func:`mix_batch`)."""
    cfg = mixup_config(recipe)
    if cfg is None:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg["mixup_alpha"], cutmix_alpha=cfg["cutmix_alpha"], prob=cfg["prob"],
                 switch_prob=cfg["switch_prob"], mode=cfg["mode"],
                 label_smoothing=float(value(recipe, "label_smoothing")), num_classes=int(num_classes))


def mix_batch(mixup, x, y, seed: int):
    """``mixup(x, y)`` (:func:`build_mixup`; it mixes ``x`` in place) with numpy's global RNG seeded ``seed``
    (:func:`mixup_seed`) and put back as it was afterwards: the draws depend on the batch alone, whatever else
    draws from numpy. Raises ValueError for a batch of an odd number of images."""
    import numpy as np

    n = len(x)
    if n % 2:
        raise ValueError(f"recipe.mixup: a training batch of {n} images; mixup needs an even number (it pairs each "
                         f"image with the one at the mirrored position): make batch_size even (in a distributed "
                         f"run, batch_size / world), and the training set at least one batch")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return mixup(x, y)
    finally:
        np.random.set_state(state)


def amp_dtype(amp: Any, device):
    """The autocast dtype of a recipe's ``amp`` on ``device``: None (off) on CPU (bf16 autocast on a CPU without
    bf16 instructions is many times slower) and for ``false``; ``"bf16"`` -> bfloat16 (no loss scaling needed);
    ``"fp16"`` and ``true`` (the old meaning) -> float16 with a GradScaler."""
    import torch

    if device.type != "cuda" or amp in (False, None, "false", "off"):
        return None
    if amp in (True, "fp16"):
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"recipe.amp must be one of false, true, {', '.join(AMP_MODES)}; got {amp!r}")


def teacher_dtype(recipe: Recipe | Mapping[str, Any], device):
    """The teacher's forward runs under bf16 autocast on a GPU that supports it, unless the recipe sets
    ``teacher_bf16: false``; never on CPU. Its outputs are handed to the method in fp32."""
    if device.type != "cuda" or not value(recipe, "teacher_bf16"):
        return None
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def loader_options(recipe: Recipe | Mapping[str, Any], resources: dict | None, device) -> dict:
    """DataLoader options of a run: ``num_workers`` as the recipe says (it is part of the run's identity: worker
    seeding changes the augmentation draws), where ``num_workers: "auto"`` means ``cpus_per_task - 1`` of the
    suite's resources on a GPU (0 on CPU, where the workers would take the training threads' cores);
    ``pin_memory`` on a GPU."""
    nw = value(recipe, "num_workers")
    if nw == "auto":
        cpus = int((resources or {}).get("cpus_per_task") or 1)
        nw = max(0, cpus - 1) if device.type == "cuda" else 0
    return {"num_workers": int(nw or 0), "pin_memory": device.type == "cuda"}
