"""The method contract: one Distiller subclass per file in ``methods/``.

A method declares its hyperparameters as keyword-only ``__init__`` arguments with defaults; the suite's
``params:`` are checked against that signature before anything runs. It asks the harness for feature taps
through its Context, may own learnable modules (adapters, fusion blocks, prompts: optimised with the
student, counted as extra parameters, never used at test time), and returns distillation terms only:
``{"loss_<name>": scalar}``. The harness adds ``task_loss_weight * task_loss``.

Tap names and what a forward returns: :mod:`kdbench.outputs` (``Taps``, ``Outputs``, ``Batch``, re-exported
here for method files).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdbench.methodinfo import (  # noqa: F401  (torch-free; re-exported: the checks live there)
    _NUMERIC_STRING, _ParamTypeError, _type_word, check_param_value, check_required_taps, describe_type, resolve_params)
from kdbench.outputs import Batch, Outputs, Taps  # noqa: F401  (re-exported for method files)
from kdbench.registry import register_method  # noqa: F401  (re-exported for method files)


@dataclass
class Context:
    """What the harness knows when a method is built.

    ``shapes(side, tap)`` returns the per-sample shapes (``(C, H, W)`` or ``(C,)``) of a tap's tensors for
    ``side`` in {"student", "teacher"}, from one dry forward (cached), so adapters are derived from real
    shapes, never hard-coded per pair.
    """

    task: str
    num_classes: int
    epochs: int
    steps_per_epoch: int
    dataset_size: int
    student_model: str = ""
    teacher_model: str = ""
    probe: Callable[[str, str], list[tuple[int, ...]]] | None = None
    task_loss: Callable[[Any, Any], Tensor] | None = None  # task_loss(outputs: Outputs, targets) -> scalar
    _cache: dict = field(default_factory=dict, repr=False)

    def shapes(self, side: str, tap: str) -> list[tuple[int, ...]]:
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        key = (side, tap)
        if key not in self._cache:
            if self.probe is None:
                raise RuntimeError("this Context has no probe: feature shapes are unknown")
            self._cache[key] = [tuple(s) for s in self.probe(side, tap)]
        return self._cache[key]


class Distiller(nn.Module):
    """Base class of every method. Subclasses set the class attributes and implement the hooks.

    Class attributes:
      * ``tasks``: the tasks the method applies to.
      * ``version``: bump when the method's numbers can change; stored in every record.
      * ``needs_teacher``: False only for the student baseline.
      * ``heterogeneous``: True when the method works across architectures (CNN↔ViT/Swin/MLP).
      * ``citation``: one line, shown by ``kdbench ls methods``.
      * ``stage_params``: the names of the constructor parameters that determine the method's stage (run once
        before distillation, e.g. FreeKD's prompt tuning); empty = no stage. The harness runs the stage as its
        own run per value of these (and teacher, student, data, batch size) and hands its artifact to every
        distillation run that uses it.
      * ``requires_taps``: ``{param: (side, tap)}``: when the boolean parameter ``param`` is true, the model on
        ``side`` ("teacher"/"student") must provide the semantic tap ``tap``; ``check_pair`` checks it against the
        models' tap metadata at validate time (e.g. ReviewKD's ``teacher_preact`` needs ``stages_preact``). A key
        that is not a parameter labels a tap the method always needs (OFA: ``{"student stages": ("student",
        "stages"), ...}``).

    The class attributes and the keyword-only ``__init__`` parameters (annotations, defaults) should be literals:
    ``kdbench ls``/``validate`` then read them from the file without importing it (``kdbench.methodinfo``).
    """

    tasks: frozenset[str] | set[str] = frozenset({"classification"})
    version: int = 1
    needs_teacher: bool = True
    heterogeneous: bool = False
    citation: str = ""
    task_loss_weight: float = 1.0
    stage_params: tuple[str, ...] = ()
    requires_taps: dict[str, tuple[str, str]] = {}

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx

    # -- hooks -----------------------------------------------------------------------------------
    def taps(self) -> Taps:
        return Taps()

    def forward(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    # The stage of a method with ``stage_params`` (FreeKD/AFP prompts): it overrides all three.
    def stage_config(self) -> dict | None:
        """Plain data describing the stage (recorded with its artifact), or None when the method has no stage."""
        return None

    def run_stage(self, teacher: nn.Module, loader, device: torch.device) -> dict[str, Tensor]:
        """Run the stage on the frozen ``teacher``; the artifact is tensors only (``torch.load(weights_only=True)``)."""
        raise NotImplementedError

    def load_stage(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`run_stage` returned, before distillation."""
        raise NotImplementedError

    # -- helpers for the harness -----------------------------------------------------------------
    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """The keyword-only hyperparameters and their defaults, from the signature."""
        out = {}
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out[name] = None if p.default is inspect.Parameter.empty else p.default
        return out

    @classmethod
    def param_annotations(cls) -> dict[str, Any]:
        """The keyword-only hyperparameters' annotations, evaluated (``from __future__ import annotations``
        makes them strings); a parameter without one, or whose annotation cannot be evaluated, is absent."""
        fn = cls.__init__
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # one unresolvable annotation: evaluate the others one by one
            hints = {}
            for name, ann in getattr(fn, "__annotations__", {}).items():
                try:
                    hints[name] = eval(ann, getattr(fn, "__globals__", {})) if isinstance(ann, str) else ann
                except Exception:
                    pass
        return {name: hints[name] for name, p in inspect.signature(fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name in hints}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Reject unknown keys (listing the valid ones) and values of the wrong type; return the params
        resolved over the defaults.

        Types come from the signature's annotations (``check_param_value``): a ``float`` parameter takes an
        int, a float or a numeric string such as ``"1e1"`` (how YAML 1.1 reads an exponent without a dot)
        and gets a float; ``int`` takes integers only, ``bool`` booleans only; ``Literal[...]`` one of its
        choices; ``X | None`` also null; ``tuple``/``list``/``Sequence`` a list with items of the given type.
        """
        method = getattr(cls, "registry_name", cls.__name__)
        return resolve_params(method, cls.param_defaults(), cls.param_annotations(), params)

    @classmethod
    def check_pair(cls, params: dict[str, Any], teacher_model: str, student_model: str) -> None:
        """Raise ``ValueError`` with a one-line reason when the method, with ``params`` (as in the suite, not yet
        resolved over the defaults), cannot work on this teacher/student pair (``SOURCE:NAME`` model names).
        Called at validate time, before anything is built. The default checks ``requires_taps`` against the
        models' tap metadata (torch-free); a method overriding it makes the registry import it to validate."""
        check_required_taps(getattr(cls, "registry_name", cls.__name__), dict(cls.requires_taps or {}),
                            cls.param_defaults(), params, teacher_model, student_model)

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def fp32(*tensors: Tensor) -> Sequence[Tensor] | Tensor:
    """Cast to float32 (losses are computed in fp32 even under autocast)."""
    out = tuple(t.float() for t in tensors)
    return out[0] if len(out) == 1 else out


def no_autocast():
    """Context manager that disables autocast on every device type in use."""
    return torch.autocast(device_type="cuda", enabled=False) if torch.cuda.is_available() else torch.autocast(
        device_type="cpu", enabled=False
    )
