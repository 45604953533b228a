"""The method contract: one Distiller subclass per file in ``methods/``.

A method declares its hyperparameters as keyword-only ``__init__`` arguments with defaults; the suite's
``params:`` are checked against that signature before anything runs. It asks the harness for feature taps
through its Context, may own learnable modules (adapters, fusion blocks, prompts: optimised with the
student, counted as extra parameters, never used at test time), and returns distillation terms only:
``{"loss_<name>": scalar}``. The harness adds ``task_loss_weight * task_loss``.

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

import collections.abc
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdbench.registry import register_method  # noqa: F401  (re-exported for method files)


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
    """

    tasks: frozenset[str] | set[str] = frozenset({"classification"})
    version: int = 1
    needs_teacher: bool = True
    heterogeneous: bool = False
    citation: str = ""
    task_loss_weight: float = 1.0
    stage_params: tuple[str, ...] = ()

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
        defaults = cls.param_defaults()
        method = getattr(cls, "registry_name", cls.__name__)
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for method "
                f"{method!r}; valid: {valid}"
            )
        hints = cls.param_annotations()
        resolved = {**defaults, **params}
        for name, value in resolved.items():
            if name not in hints:
                continue
            try:  # defaults are converted too: `weight: 2` and the default 2.0 are the same run
                resolved[name] = check_param_value(value, hints[name])
            except _ParamTypeError:
                if name not in params:  # a default the annotation does not describe (e.g. a required param)
                    continue
                raise ValueError(f"parameter {name!r} of method {method!r} must be {describe_type(hints[name])}, "
                                 f"got {value!r} ({_type_word(value)})") from None
        return resolved

    @classmethod
    def check_pair(cls, params: dict[str, Any], teacher_model: str, student_model: str) -> None:
        """Raise ``ValueError`` with a one-line reason when the method, with ``params`` (as in the suite, not yet
        resolved over the defaults), cannot work on this teacher/student pair (``SOURCE:NAME`` model names).
        Called at validate time, before anything is built; the default accepts every pair."""

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- hyperparameter type checks (Distiller.check_params) ------------------------------------------------
# A numeric string as YAML 1.1 leaves one (``1e1``, ``5e-4``, ``1.0e4``); also plain decimals written in quotes.
_NUMERIC_STRING = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$")
_NONE_TYPE = type(None)


class _ParamTypeError(Exception):
    pass


def _type_word(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping", _NONE_TYPE: "null"}.get(type(value), type(value).__name__)


def describe_type(ann: Any) -> str:
    """How a parameter annotation reads in an error message."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is _NONE_TYPE or ann is None:
        return "null"
    if ann is float:
        return "a number (float)"
    if ann is int:
        return "an integer"
    if ann is bool:
        return "true or false"
    if ann is str:
        return "a string"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence) or ann in (tuple, list, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items (" + ", ".join(describe_type(a) for a in args) + ")"
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or ann in (dict, collections.abc.Mapping):
        return f"a mapping of {describe_type(args[0])} to {describe_type(args[1])}" if args else "a mapping"
    return getattr(ann, "__name__", str(ann))


def check_param_value(value: Any, ann: Any, convert: bool = True) -> Any:
    """``value`` checked against the annotation ``ann`` (raises _ParamTypeError), converted where the annotation
    asks (float parameters get floats). Annotations this does not know (``Any``, other generics) accept anything.
    With ``convert=False`` a numeric string is not taken for a float (used to try union members exactly first).
    """
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is Any or ann is inspect.Parameter.empty:
        return value
    if ann is None or ann is _NONE_TYPE:
        if value is None:
            return None
        raise _ParamTypeError
    if ann is bool:
        if isinstance(value, bool):
            return value
        raise _ParamTypeError
    if ann is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _ParamTypeError
    if ann is float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if convert and isinstance(value, str) and _NUMERIC_STRING.match(value.strip()):
                return float(value.strip().replace("_", ""))
        except OverflowError:
            pass
        raise _ParamTypeError
    if ann is str:
        if isinstance(value, str):
            return value
        raise _ParamTypeError
    if origin is typing.Literal:
        for choice in args:  # exact type too: Literal[1] does not take True
            if type(value) is type(choice) and value == choice:
                return value
        raise _ParamTypeError
    if origin in (typing.Union, types.UnionType):
        for exact in (False, True) if convert else (False,):  # a member that fits as is wins over a conversion
            for member in args:
                try:
                    return check_param_value(value, member, convert=exact)
                except _ParamTypeError:
                    pass
        raise _ParamTypeError
    seq = origin in (tuple, list, collections.abc.Sequence) or ann in (tuple, list, collections.abc.Sequence)
    if seq:
        if not isinstance(value, (list, tuple)):
            raise _ParamTypeError
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _ParamTypeError
            items = [check_param_value(v, a, convert) for v, a in zip(value, args)]
        elif args:
            items = [check_param_value(v, args[0], convert) for v in value]
        else:
            items = list(value)
        return tuple(items) if (origin or ann) is tuple else items
    if origin in (dict, collections.abc.Mapping) or ann in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _ParamTypeError
        if not args:
            return dict(value)
        return {check_param_value(k, args[0], convert): check_param_value(v, args[1], convert)
                for k, v in value.items()}
    if isinstance(ann, type):
        if isinstance(value, ann):
            return value
        raise _ParamTypeError
    return value  # an annotation this check does not understand: accepted as is


def fp32(*tensors: Tensor) -> Sequence[Tensor] | Tensor:
    """Cast to float32 (losses are computed in fp32 even under autocast)."""
    out = tuple(t.float() for t in tensors)
    return out[0] if len(out) == 1 else out


def no_autocast():
    """Context manager that disables autocast on every device type in use."""
    return torch.autocast(device_type="cuda", enabled=False) if torch.cuda.is_available() else torch.autocast(
        device_type="cpu", enabled=False
    )
