"""Method metadata without torch: what the suite loader, ``kdbench validate`` and ``kdbench ls methods`` need to
know about a method (tasks, version, citation, needs_teacher, stage_params, required taps, hyperparameters with
their annotations and defaults), and the hyperparameter type checks.

A method's metadata comes from :meth:`kdbench.registry.Registry.info`, which reads the method's file with
``ast`` instead of importing it (the method modules import torch), whether the file is kdbench's own, a
module of an installed package's ``kdbench.methods`` entry point or a file of a plugin folder; a method whose
metadata is not all literal (or that overrides ``check_pair``/``check_params``) is imported and read from its
class instead. Both paths end in a :class:`MethodInfo`, and :class:`kdbench.method.Distiller`'s classmethods use
the same functions, so the checks and their messages are the same either way. Annotation strings are evaluated
in a small torch-free namespace (:data:`ANNOTATION_NAMESPACE`).
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from typing import Any

#: The names an annotation read from a method file may use (``from __future__ import annotations`` keeps them
#: as strings). An annotation that needs anything else makes the registry import the method instead.
ANNOTATION_NAMESPACE: dict[str, Any] = {
    "float": float, "int": int, "bool": bool, "str": str, "tuple": tuple, "list": list, "dict": dict,
    "None": None, "Any": Any, "Literal": typing.Literal, "Optional": typing.Optional, "Union": typing.Union,
    "Sequence": collections.abc.Sequence, "Mapping": collections.abc.Mapping, "Tuple": typing.Tuple,
    "List": typing.List, "Dict": typing.Dict, "typing": typing, "collections": collections,
}


def eval_annotation(text: str) -> Any:
    """An annotation string evaluated in :data:`ANNOTATION_NAMESPACE` (NameError etc. when it needs more)."""
    return eval(text, {"__builtins__": {}}, dict(ANNOTATION_NAMESPACE))  # noqa: S307  (names limited above)


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


# -- the checks shared by Distiller and MethodInfo ----------------------------------------------------------
def resolve_params(method: str, defaults: dict[str, Any], hints: dict[str, Any], params: dict[str, Any]) -> dict:
    """``params`` checked against the hyperparameters ``defaults`` (name -> default) and their annotations
    ``hints``, resolved over the defaults (``Distiller.check_params`` documents the rules)."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method "
            f"{method!r}; valid: {valid}"
        )
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


def check_required_taps(method: str, requires_taps: dict[str, tuple[str, str]], defaults: dict[str, Any],
                        params: dict[str, Any], teacher_model: str, student_model: str) -> None:
    """The declarative pair check: ``requires_taps`` maps a (boolean) parameter to ``(side, tap)``, the tap the
    model on that side must provide when the parameter is true; a key that is not one of the method's parameters
    is a label of a tap the method always needs (``{"student stages": ("student", "stages")}``). The models' taps
    come from :func:`kdbench.models.catalog.model_taps` (torch-free for every source kdbench lists itself)."""
    if not requires_taps:
        return
    from kdbench.models.catalog import model_taps, tap_providers

    models = {"teacher": teacher_model, "student": student_model}
    for param, (side, tap) in requires_taps.items():
        if side not in models:
            raise ValueError(f"{method}: requires_taps[{param!r}] names side {side!r}; valid: teacher, student")
        always = param not in defaults
        if not always and not params.get(param, defaults.get(param)):
            continue
        model = models[side]
        if tap not in model_taps(model):
            if always:
                raise ValueError(f"{method} needs the {side}'s {tap!r} tap, which only {tap_providers(tap)} provide, "
                                 f"not {model!r}")
            raise ValueError(f"{method}: {param}=true needs the {tap!r} tap, which only {tap_providers(tap)} "
                             f"provide, not the {side} {model!r}; set {param}: false")


class MethodInfo:
    """What the harness knows of a method before building it (see the module docstring). Built from the
    registry's ``ast`` reading (:meth:`from_plugin`) or from the imported class (:meth:`from_class`)."""

    ATTRS = ("tasks", "version", "needs_teacher", "heterogeneous", "citation", "stage_params", "requires_taps")

    def __init__(self, name: str, attrs: dict[str, Any], doc: str, defaults: dict[str, Any],
                 annotations: dict[str, Any], cls: Any = None):
        self.name = name
        self.tasks = frozenset(attrs.get("tasks", ("classification",)))
        self.version = attrs.get("version", 1)
        self.needs_teacher = attrs.get("needs_teacher", True)
        self.heterogeneous = attrs.get("heterogeneous", False)
        self.citation = attrs.get("citation", "")
        self.stage_params = tuple(attrs.get("stage_params", ()) or ())
        self.requires_taps = dict(attrs.get("requires_taps") or {})
        self.doc = doc or ""
        self._defaults, self._annotations, self._cls = defaults, annotations, cls

    def __repr__(self) -> str:
        return f"MethodInfo({self.name!r}, {'imported' if self._cls is not None else 'read from its file'})"

    @classmethod
    def from_plugin(cls, plugin) -> "MethodInfo | None":
        """From a :class:`kdbench.registry.PluginInfo`; None when an annotation cannot be evaluated here."""
        defaults = {n: (None if d is plugin.REQUIRED else d) for n, (_, d) in plugin.params.items()}
        annotations = {}
        for n, (ann, _) in plugin.params.items():
            if ann is None:
                continue
            try:
                annotations[n] = eval_annotation(ann)
            except Exception:
                return None
        return cls(plugin.name, plugin.attrs, plugin.doc, defaults, annotations)

    @classmethod
    def from_class(cls, klass: Any, name: str | None = None) -> "MethodInfo":
        attrs = {a: getattr(klass, a) for a in cls.ATTRS if hasattr(klass, a)}
        return cls(name or getattr(klass, "registry_name", klass.__name__), attrs, klass.__doc__ or "",
                   klass.param_defaults(), klass.param_annotations(), cls=klass)

    def param_defaults(self) -> dict[str, Any]:
        return dict(self._defaults)

    def param_annotations(self) -> dict[str, Any]:
        return dict(self._annotations)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        if self._cls is not None:
            return self._cls.check_params(params)
        return resolve_params(self.name, self._defaults, self._annotations, params)

    def check_pair(self, params: dict[str, Any], teacher_model: str, student_model: str) -> None:
        if self._cls is not None:
            return self._cls.check_pair(params, teacher_model, student_model)
        check_required_taps(self.name, self.requires_taps, self._defaults, params, teacher_model, student_model)


def method_info(name: str) -> MethodInfo:
    """The metadata of the registered method ``name``: from its class when it is already imported (the class is
    the authority; e.g. a test patched it), else read from its file when that is literal, else from the class
    imported now. An unknown name is a :class:`kdbench.registry.RegistryError` with close matches."""
    from kdbench.registry import METHODS

    loaded = METHODS.loaded(name)
    if loaded is not None:
        return MethodInfo.from_class(loaded, name)
    plugin = METHODS.info(name)
    if plugin is not None:
        info = MethodInfo.from_plugin(plugin)
        if info is not None:
            return info
    return MethodInfo.from_class(METHODS.get(name), name)
