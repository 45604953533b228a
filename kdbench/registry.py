"""One small registry class, used for methods, models, datasets and tasks.

A registry maps names to objects. Registering a name twice is an error; asking for an unknown name is
an error that names the registry, suggests close matches and lists what is valid. A registry may be given
packages to import on first use (plugin discovery): every module of such a package is imported, so a file
dropped into ``methods/`` registers itself without any other edit.

Plugin modules import torch; listing and validating must not. A registry given a :class:`Scan` therefore reads
its plugin files with ``ast`` first (:meth:`Registry.info`): the names registered by ``@<decorator>("name")``
classes, their docstring, the class attributes named by the scan when their values are literals, and the
keyword-only parameters of one method (``__init__`` for methods, ``build`` for datasets) with annotation
strings and literal defaults; base classes are followed through the module and its ``from X import Y`` imports
up to the scan's root class. Whatever is not literal makes that one plugin "opaque": ``info`` returns None and
the caller imports it (``get``). ``get(name)`` imports only the module that registers ``name``. Nothing is cached
between processes: reading the files takes milliseconds.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


class RegistryError(KeyError):
    """Unknown or duplicate registry name. The message is the whole explanation."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Scan:
    """How a registry reads its plugin files without importing them."""

    decorators: tuple[str, ...]  # "register_method", "METHODS.register": a call of one of them registers a class
    root: tuple[str, str]  # (module, class) where following base classes stops, e.g. kdbench.method.Distiller
    attrs: tuple[str, ...]  # class attributes to read (literal values only)
    params_of: str = "__init__"  # the method whose keyword-only parameters are the plugin's parameters
    opaque_if_defined: tuple[str, ...] = ()  # a plugin class defining one of these must be imported to be used


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


@dataclass
class PluginInfo:
    """A plugin as read from its file. ``params``: name -> (annotation source or None, literal default or
    ``REQUIRED``); ``attrs``: the scan's attributes found on the class or its bases (absent: not set)."""

    REQUIRED = _Required()

    name: str
    module: str
    qualname: str
    doc: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, tuple[str | None, Any]] = field(default_factory=dict)


class _Opaque(Exception):
    """This plugin's metadata is not literal: import it."""


_LITERAL_CALLS = {"frozenset": frozenset, "set": set, "tuple": tuple, "list": list, "dict": dict}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _LITERAL_CALLS \
            and not node.keywords and len(node.args) <= 1:
        return _LITERAL_CALLS[node.func.id](*(ast.literal_eval(a) for a in node.args))
    return ast.literal_eval(node)


_SAFE_CALLS = {"enumerate": enumerate, "len": len, "str": str, "sorted": sorted, "tuple": tuple, "list": list}
_SAFE_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Mod, ast.Constant, ast.Name, ast.Load, ast.Store, ast.Call,
               ast.Attribute, ast.JoinedStr, ast.FormattedValue, ast.GeneratorExp, ast.ListComp, ast.comprehension,
               ast.Tuple, ast.List)


def _constant_expression(node: ast.AST, constants: dict[str, Any]) -> Any:
    """A module constant built from literals and earlier constants by string joins, f-strings, ``+``/``%`` and
    comprehensions (e.g. a layout text assembled from a tuple): evaluated when it uses nothing else."""
    names = set(constants) | set(_SAFE_CALLS)
    for n in ast.walk(node):
        if not isinstance(n, _SAFE_NODES) or (isinstance(n, ast.Attribute) and n.attr not in ("join", "format")):
            raise ValueError("not a constant expression")
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Attribute) or
                                            (isinstance(n.func, ast.Name) and n.func.id in _SAFE_CALLS)):
            raise ValueError("not a constant expression")
        if isinstance(n, ast.comprehension):
            names |= {t.id for t in ast.walk(n.target) if isinstance(t, ast.Name)}
    if any(isinstance(n, ast.Name) and n.id not in names for n in ast.walk(node)):
        raise ValueError("not a constant expression")
    return eval(compile(ast.Expression(node), "<constant>", "eval"),  # noqa: S307  (checked just above)
                {"__builtins__": dict(_SAFE_CALLS)}, dict(constants))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


class _ModuleFile:
    """One parsed module: its classes and the names it imports (``from X import Y [as Z]``)."""

    _cache: dict[str, "_ModuleFile"] = {}

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.source = path.read_text(encoding="utf-8")
        self._tree: ast.Module | None = None
        self._constants: dict[str, Any] | None = None

    @property
    def tree(self) -> ast.Module:  # parsed on first use: most files are only searched for a decorator's name
        if self._tree is None:
            self._tree = ast.parse(self.source, filename=str(self.path))
            self.classes = {n.name: n for n in self._tree.body if isinstance(n, ast.ClassDef)}
            self.imports: dict[str, tuple[str, str]] = {}
            for n in self._tree.body:
                if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    for a in n.names:
                        self.imports[a.asname or a.name] = (n.module, a.name)
        return self._tree

    @property
    def constants(self) -> dict[str, Any]:
        """Module-level ``NAME = <literal or constant expression>``, for attributes such as ``layout = LAYOUT``."""
        if self._constants is None:
            self._constants = {}
            for n in self.tree.body:
                if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                    try:
                        self._constants[n.targets[0].id] = _literal(n.value)
                    except (ValueError, TypeError, SyntaxError):
                        try:
                            self._constants[n.targets[0].id] = _constant_expression(n.value, self._constants)
                        except Exception:
                            self._constants.pop(n.targets[0].id, None)
        return self._constants

    @classmethod
    def of_module(cls, module: str) -> "_ModuleFile":
        if module not in cls._cache:
            spec = importlib.util.find_spec(module)  # imports the parent packages only
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                raise _Opaque(module)
            cls._cache[module] = cls(module, Path(spec.origin))
        mod = cls._cache[module]
        mod.tree  # noqa: B018  (parse: callers read classes and imports)
        return mod


def _class_chain(mod: _ModuleFile, node: ast.ClassDef, root: tuple[str, str]) -> list[tuple[_ModuleFile, ast.ClassDef]]:
    """``node`` and its bases up to (and including) the root class, most derived first; single inheritance."""
    chain = [(mod, node)]
    while (mod.name, node.name) != root:
        if len(node.bases) != 1 or node.keywords:
            raise _Opaque(node.name)
        base = _dotted(node.bases[0])
        if base in mod.classes:
            node = mod.classes[base]
        elif base in mod.imports:
            module, name = mod.imports[base]
            mod = _ModuleFile.of_module(module)
            for _ in range(8):  # follow re-exports (``from X import Y`` in the module that was named)
                if name in mod.classes or name not in mod.imports:
                    break
                module, name = mod.imports[name]
                mod = _ModuleFile.of_module(module)
            if name not in mod.classes:
                raise _Opaque(name)
            node = mod.classes[name]
        else:
            raise _Opaque(base)
        chain.append((mod, node))
    return chain


def _read_plugin(scan: Scan, mod: _ModuleFile, node: ast.ClassDef, name: str) -> PluginInfo:
    chain = _class_chain(mod, node, scan.root)
    info = PluginInfo(name=name, module=mod.name, qualname=node.name, doc=ast.get_docstring(node) or "")
    params_fn = None
    for i, (cls_mod, cls_node) in enumerate(chain):
        for stmt in cls_node.body:
            target, value = None, None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target, value = stmt.targets[0].id, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                target, value = stmt.target.id, stmt.value
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if i < len(chain) - 1 and stmt.name in scan.opaque_if_defined:
                    raise _Opaque(stmt.name)
                if stmt.name == scan.params_of and params_fn is None:
                    params_fn = stmt
            if target in scan.attrs and target not in info.attrs:
                if isinstance(value, ast.Name) and value.id in cls_mod.constants:
                    info.attrs[target] = cls_mod.constants[value.id]
                    continue
                try:
                    info.attrs[target] = _literal(value)
                except (ValueError, TypeError, SyntaxError):
                    raise _Opaque(target) from None
    if params_fn is not None:
        args = params_fn.args
        for a, d in zip(args.kwonlyargs, args.kw_defaults):
            try:
                default = PluginInfo.REQUIRED if d is None else ast.literal_eval(d)
            except (ValueError, TypeError, SyntaxError):
                raise _Opaque(a.arg) from None
            info.params[a.arg] = (ast.unparse(a.annotation) if a.annotation is not None else None, default)
    return info


class Registry:
    def __init__(self, kind: str, discover: Iterable[str] = (), scan: Scan | None = None):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._discover = tuple(discover)
        self._discovered = False
        self._scan_spec = scan
        self._scanned: dict[str, tuple[str, PluginInfo | None]] | None = None  # name -> (module, info or None)

    # -- plugins ---------------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for pkg_name in self._discover:
            pkg = importlib.import_module(pkg_name)
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{info.name}")

    def _scan(self) -> dict[str, tuple[str, PluginInfo | None]]:
        """name -> (module, PluginInfo or None when opaque), for every plugin file, without importing them. A file
        whose registrations are not all ``@decorator("literal")`` classes is imported to learn its names."""
        if self._scanned is not None:
            return self._scanned
        if self._scan_spec is None:
            self._load_plugins()
            self._scanned = {}
            return self._scanned
        found: dict = {}
        for pkg_name in self._discover:
            pkg = importlib.import_module(pkg_name)  # the plugin packages' own modules are torch-free
            for mi in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if mi.name.startswith("_"):
                    continue
                module = f"{pkg_name}.{mi.name}"
                try:
                    path = Path(mi.module_finder.path) / (f"{mi.name}/__init__.py" if mi.ispkg else f"{mi.name}.py")
                    mod = _ModuleFile(module, path)
                    names = self._scan_module(mod)
                    if names:
                        _ModuleFile._cache.setdefault(module, mod)
                except (_Opaque, OSError, SyntaxError, UnicodeDecodeError, AttributeError):
                    names = None
                if names is None:  # not readable as literals: import it, it registers itself
                    before = set(self._items)
                    importlib.import_module(module)
                    names = {n: None for n in set(self._items) - before}
                for n, info in names.items():
                    if n in found and found[n][0] != module:  # let the import raise the duplicate error
                        importlib.import_module(found[n][0])
                        importlib.import_module(module)
                    found[n] = (module, info)
        self._scanned = found
        return found

    def _scan_module(self, mod: _ModuleFile) -> dict[str, PluginInfo | None] | None:
        scan = self._scan_spec
        # every call of a decorator name in the text, docstrings included (one the reading below does not
        # account for makes the module opaque, which only costs an import)
        calls = re.findall(r"(?<![\w.])(?:%s)\s*\(" % "|".join(re.escape(d) for d in scan.decorators), mod.source)
        if not calls:
            return {}
        mod.tree  # noqa: B018  (parse)
        out: dict[str, PluginInfo | None] = {}
        for node in mod.classes.values():
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and _dotted(deco.func) in scan.decorators):
                    continue
                if len(deco.args) != 1 or not isinstance(deco.args[0], ast.Constant) \
                        or not isinstance(deco.args[0].value, str):
                    return None
                name = deco.args[0].value
                try:
                    out[name] = _read_plugin(scan, mod, node, name)
                except (_Opaque, OSError, SyntaxError, UnicodeDecodeError):
                    out[name] = None
        if len(out) != len(calls):  # a registration this reading does not see (in a loop, a function...)
            return None
        return out

    def loaded(self, name: str) -> Any:
        """The object registered as ``name`` if its module is already imported, else None (imports nothing)."""
        return self._items.get(name)

    def info(self, name: str) -> PluginInfo | None:
        """``name``'s metadata read from its file without importing it; None when only importing it tells
        (opaque, or registered at run time). An unknown name is a RegistryError."""
        scanned = self._scan()
        if name in scanned:
            return scanned[name][1]
        if name in self._items:
            return None
        raise RegistryError(self.unknown_message(name))

    # -- API -------------------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[Any], Any]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                old = self._items[name]
                where = getattr(old, "__module__", "?")
                raise RegistryError(
                    f"duplicate {self.kind} name {name!r}: already registered by {where}.{getattr(old, '__qualname__', old)}"
                )
            self._items[name] = obj
            try:
                obj.registry_name = name
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name in self._items:
            return self._items[name]
        scanned = self._scan()
        if name in scanned:  # import only the module that registers it
            importlib.import_module(scanned[name][0])
        elif self._scan_spec is None:
            self._load_plugins()
        if name in self._items:
            return self._items[name]
        raise RegistryError(self.unknown_message(name))

    def _all_names(self) -> set[str]:
        scanned = self._scan()  # first: a registry without a scan imports its plugins here
        return set(self._items) | set(scanned)

    def unknown_message(self, name: str) -> str:
        names = sorted(self._all_names())
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(names) or '(none)'}"

    def __contains__(self, name: str) -> bool:
        scanned = self._scan()
        return name in self._items or name in scanned

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._all_names() if fnmatch.fnmatch(n, pattern))

    def items(self) -> list[tuple[str, Any]]:
        self._load_plugins()
        return sorted(self._items.items())


# The registries. Each discovers its plugins on first use, so importing this module stays torch-free.
METHODS = Registry("method", discover=("kdbench.methods",), scan=Scan(
    decorators=("register_method", "METHODS.register"), root=("kdbench.method", "Distiller"),
    attrs=("tasks", "version", "needs_teacher", "heterogeneous", "citation", "stage_params", "requires_taps"),
    opaque_if_defined=("check_pair", "check_params", "param_defaults", "param_annotations")))
MODELS = Registry("model source", discover=("kdbench.models",), scan=Scan(
    decorators=("MODELS.register",), root=("kdbench.models.sources", "Source"), attrs=("prefix",)))
DATASETS = Registry("dataset", discover=("kdbench.data",), scan=Scan(
    decorators=("DATASETS.register",), root=("kdbench.data.plugin", "DatasetPlugin"),
    attrs=("task", "needs_root", "layout", "corruption_point"), params_of="build"))
TASKS = Registry("task", discover=("kdbench.tasks",))


def register_method(name: str):
    """Class decorator: ``@register_method("kd")`` adds a Distiller subclass to METHODS."""
    return METHODS.register(name)
