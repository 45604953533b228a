"""What a suite's ``recipe:`` means to the training loop: steps per epoch, the per-epoch seed, the optimiser,
the LR schedule, AMP and the teacher's autocast, DataLoader options. The suite checks the recipe's keys and
types (``kdbench/suite.py``: ``RECIPE_KEYS``, ``RECIPE_DEFAULTS``); this module is where their values become
numbers, for :func:`kdbench.train.fit`, the method's :class:`kdbench.method.Context` (``runner.build_context``)
and ``kdbench bench`` alike.

Torch-free at import (``steps_per_epoch`` is asked before any network is built); the functions that return
torch objects import it.
"""

from __future__ import annotations

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
}
#: string values a recipe key takes besides its typed ones (:func:`amp_dtype`, :func:`loader_options`)
RECIPE_CHOICES = {"amp": ("bf16", "fp16"), "num_workers": ("auto",)}
#: the defaults every recipe carries (they are part of its identity, hence of every run_id that hashes it)
RECIPE_DEFAULTS = {"grad_clip": None, "amp": True, "eval_every": 1, "eval_batch_size": 256, "num_workers": 0,
                   "max_steps_per_epoch": None}
OPTIMIZERS = {"sgd": {"lr", "momentum", "weight_decay", "nesterov"}, "adamw": {"lr", "weight_decay", "betas"},
              "adam": {"lr", "weight_decay", "betas"}}
SCHEDULES = {"multistep": {"milestones", "gamma", "warmup_epochs"}, "cosine": {"warmup_epochs", "min_lr"},
             "constant": {"warmup_epochs"}}


@dataclass(frozen=True)
class Recipe:
    """A run's training recipe, typed: built once from the suite's ``recipe:`` (checked by the suite) with
    :data:`RECIPE_DEFAULTS` filled in, read by attribute everywhere it is used. :meth:`identity` is the plain
    mapping a RunSpec keeps and its run_id hashes: the keys the suite gave plus the defaults, in that order, with
    their values; ``compile`` and ``teacher_bf16`` count only when the suite sets them."""

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
        return cls(**merged, keys=tuple(merged))

    def identity(self) -> dict[str, Any]:
        """The plain mapping a RunSpec keeps and its run_id hashes (see the class docstring)."""
        return {k: getattr(self, k) for k in self.keys}


_FIELD_DEFAULTS = {"compile": False, "teacher_bf16": True, **RECIPE_DEFAULTS}


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


def build_optimizer(params, cfg: dict):
    """The ``torch.optim`` optimiser of a recipe's ``optimizer:`` (sgd, adamw, adam) over ``params``."""
    import torch

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
    """Multiplier of the base LR at a (0-based) global step of a recipe's ``schedule:``. Warm-up is linear over
    ``warmup_epochs``."""
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
