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

Plugins from outside kdbench (``Registry(..., entry_points=, plugins_env=)``; METHODS has both) are read the
same way, without importing them: the modules named by the entry points of a group (``kdbench.methods``) of
the installed distributions, found through their ``*.dist-info/entry_points.txt`` and located without running
any package ``__init__`` (a package: its modules, as ``methods/``), and every ``*.py`` not starting with ``_``
in the folders named by an environment variable (``KDBENCH_PLUGINS``, ``os.pathsep``-separated; ``--plugins``
and a suite's ``plugins:`` add to it through :func:`add_plugin_dirs`, so that the processes the scheduler
starts find them too). A plugin folder's files are modules named by their stem, the folder appended to
``sys.path``. :meth:`Registry.origin` says where a name comes from (file, sha256, distribution and version).
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
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


def locate_module(module: str):
    """The ``ModuleSpec`` of ``module`` without executing any code: a module already imported gives its own;
    a top-level name is looked up on ``sys.path``; a submodule is looked up by the import system's finders in
    its parent's folders, the parent located the same way (its ``__init__`` is not run, unlike
    ``importlib.util.find_spec``). None when it is not found."""
    if module in sys.modules:
        return getattr(sys.modules[module], "__spec__", None)
    parent, _, _ = module.rpartition(".")
    if not parent:
        try:
            return importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
    pspec = locate_module(parent)
    if pspec is None or pspec.submodule_search_locations is None:
        return None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(module, list(pspec.submodule_search_locations))
        except (ImportError, ValueError):  # pragma: no cover  (a finder that cannot answer without importing)
            continue
        if spec is not None:
            return spec
    return None


class _ModuleFile:
    """One parsed module: its classes and the names it imports (``from X import Y [as Z]``, relative too)."""

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
                if isinstance(n, ast.ImportFrom) and (n.module or n.level):
                    module = n.module or ""
                    if n.level:  # ``from .base import X``: relative to this module's package
                        pkg = self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]
                        for _ in range(n.level - 1):
                            pkg = pkg.rpartition(".")[0]
                        if not pkg:
                            continue
                        module = f"{pkg}.{module}" if module else pkg
                    for a in n.names:
                        self.imports[a.asname or a.name] = (module, a.name)
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
            spec = locate_module(module)  # runs nothing, not even the parent packages' __init__
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


@dataclass(frozen=True)
class Origin:
    """Where a plugin module comes from: ``source`` is ``"kdbench"`` (a package kdbench discovers itself),
    ``"entry point"`` (a module named by an installed distribution's entry point) or ``"plugins folder"``."""

    module: str
    path: Path | None  # the module's file; None when it is not a .py file (imported to be read)
    source: str
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None

    def where(self) -> str:
        """The origin in a message: the file, and the distribution that declared it."""
        text = str(self.path) if self.path is not None else self.module
        if self.source == "entry point":
            text += f" (entry point {self.entry_point!r} of {self.distribution} {self.version})"
        return text

    def to_dict(self) -> dict:
        """For a record: source, module, file and its sha256, distribution and version."""
        sha = None
        if self.path is not None:
            try:
                sha = hashlib.sha256(self.path.read_bytes()).hexdigest()
            except OSError:
                pass
        return {"source": self.source, "module": self.module, "file": str(self.path) if self.path else None,
                "sha256": sha, "distribution": self.distribution, "version": self.version,
                "entry_point": self.entry_point}


def _kdbench_version() -> str | None:
    return getattr(sys.modules.get("kdbench"), "__version__", None)  # the package of this module: imported


def _dist_field(folder: Path, key: str) -> str | None:
    for meta in ("METADATA", "PKG-INFO"):
        try:
            with open(folder / meta, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        break  # the headers end at the first blank line
                    if line.lower().startswith(key.lower() + ":"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


def entry_points_of(group: str) -> list[tuple[str, str, str | None, str | None]]:
    """``(name, value, distribution, version)`` of every entry point of ``group`` of the distributions installed
    on ``sys.path`` (the first distribution of a name wins, as in ``importlib.metadata``). Reads the
    ``*.dist-info``/``*.egg-info`` folders' ``entry_points.txt`` directly: a few milliseconds, where
    ``importlib.metadata.entry_points`` takes tens (this runs on every ``kdbench ls``/``validate``)."""
    out, seen = [], set()
    header = f"[{group}]"
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:  # not a folder (a zip file), or gone
            continue
        for d in names:
            if not d.endswith((".dist-info", ".egg-info")):
                continue
            folder = Path(entry or ".") / d
            dist_key = re.sub(r"[-_.]+", "-", d.rsplit(".", 1)[0].split("-")[0]).lower()
            if dist_key in seen:
                continue
            seen.add(dist_key)
            try:
                text = (folder / "entry_points.txt").read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if header not in text:
                continue
            dist, version = _dist_field(folder, "Name") or d.split("-")[0], _dist_field(folder, "Version")
            section = None
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith(("#", ";")):
                    continue
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line:
                    name, value = (x.strip() for x in line.split("=", 1))
                    out.append((name, value, dist, version))
    return out


class Registry:
    def __init__(self, kind: str, discover: Iterable[str] = (), scan: Scan | None = None,
                 entry_points: str | None = None, plugins_env: str | None = None):
        """``discover``: packages of kdbench whose modules are the plugins; ``entry_points``: the entry-point
        group of plugin modules of other distributions; ``plugins_env``: the environment variable naming folders
        of plugin files (both need a ``scan``)."""
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._discover = tuple(discover)
        self._discovered = False
        self._scan_spec = scan
        self._group = entry_points
        self._env = plugins_env
        self._scanned: dict[str, tuple[str, PluginInfo | None]] | None = None  # name -> (module, info or None)
        self._scanned_dirs: tuple[Path, ...] = ()  # the plugin folders self._scanned was read with
        self._origins: dict[str, Origin] = {}  # module -> where it comes from

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

    def plugin_dirs(self) -> tuple[Path, ...]:
        """The plugin folders named by the environment variable now (resolved, in order, once each); a name that
        is not a folder is a RegistryError."""
        if not self._env:
            return ()
        out: list[Path] = []
        for item in os.environ.get(self._env, "").split(os.pathsep):
            if not item.strip():
                continue
            d = Path(item).expanduser().resolve()
            if not d.is_dir():
                raise RegistryError(f"{self._env} names {item}, which is not a folder (a folder of {self.kind} "
                                    f"plugin files is expected)")
            if d not in out:
                out.append(d)
        return tuple(out)

    def _sources(self, dirs: tuple[Path, ...]):
        """``(module, file or None, Origin)`` of every plugin module: kdbench's packages, the entry points'
        modules, the plugin folders' files; nothing is imported but kdbench's own (torch-free) packages."""
        for pkg_name in self._discover:
            pkg = importlib.import_module(pkg_name)  # the plugin packages' own modules are torch-free
            for mi in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if not mi.name.startswith("_"):
                    module = f"{pkg_name}.{mi.name}"
                    path = Path(mi.module_finder.path) / (f"{mi.name}/__init__.py" if mi.ispkg else f"{mi.name}.py")
                    yield module, path, Origin(module, path, "kdbench", "kdbench", _kdbench_version())
        for name, value, dist, version in (entry_points_of(self._group) if self._group else ()):
            module = value.split(":", 1)[0].split("[", 1)[0].strip()
            where = f"entry point {name} = {value!r} of {dist} {version} (group {self._group})"
            try:
                spec = locate_module(module)
            except Exception as e:  # pragma: no cover  (a broken finder)
                raise RegistryError(f"{where}: cannot locate module {module!r}: {e}") from None
            if spec is None:
                raise RegistryError(f"{where}: no module {module!r} is installed (reinstall {dist}, or fix its "
                                    f"entry point)")

            def one(mod_name: str, origin_file: str | None, ep=(name, dist, version)):
                path = Path(origin_file) if origin_file and origin_file.endswith(".py") else None
                return mod_name, path, Origin(mod_name, path, "entry point", ep[1], ep[2], ep[0])

            if spec.submodule_search_locations is not None:  # a package: its modules, as kdbench's methods/
                if spec.origin and spec.origin.endswith(".py"):
                    yield one(module, spec.origin)
                for mi in sorted(pkgutil.iter_modules(list(spec.submodule_search_locations)), key=lambda i: i.name):
                    if not mi.name.startswith("_"):
                        sub = Path(mi.module_finder.path) / (f"{mi.name}/__init__.py" if mi.ispkg else f"{mi.name}.py")
                        yield one(f"{module}.{mi.name}", str(sub))
            else:
                yield one(module, spec.origin)
        for d in dirs:
            for path in sorted(d.glob("*.py")):
                if not path.name.startswith("_") and path.is_file():
                    yield path.stem, path, Origin(path.stem, path, "plugins folder")

    def _check_module_name(self, origin: Origin) -> None:
        """A plugin folder's file is imported as the module of its stem: that name must be free."""
        stem, path = origin.module, origin.path
        if not stem.isidentifier():
            raise RegistryError(f"{self.kind} plugin {path}: {stem!r} is not a Python module name; rename the file")
        if stem in sys.stdlib_module_names or stem in sys.builtin_module_names or stem == "kdbench":
            raise RegistryError(f"{self.kind} plugin {path}: its module name {stem!r} is a module of Python's "
                                f"(or kdbench); rename the file")
        spec = locate_module(stem)
        other = getattr(spec, "origin", None)
        if other and Path(other).resolve() != path.resolve():
            raise RegistryError(f"{self.kind} plugin {path}: its module name {stem!r} is already the module "
                                f"{other}; rename the file")

    def _import(self, module: str) -> None:
        """Import a plugin module; a plugin folder's file must be the module its stem imports."""
        origin = self._origins.get(module)
        mod = importlib.import_module(module)
        if origin is not None and origin.source == "plugins folder" and origin.path is not None:
            got = getattr(mod, "__file__", None)
            if not got or Path(got).resolve() != origin.path.resolve():
                raise RegistryError(f"{self.kind} plugin {origin.path}: importing {module!r} gave {got} instead; "
                                    f"rename the file")

    def _scan(self) -> dict[str, tuple[str, PluginInfo | None]]:
        """name -> (module, PluginInfo or None when opaque), for every plugin file, without importing them. A file
        whose registrations are not all ``@decorator("literal")`` classes is imported to learn its names. Read
        again when the plugin folders have changed (:func:`add_plugin_dirs`). The garbage collector waits while the
        files are parsed: their syntax trees are many young objects, and a collection pass in the middle of them
        costs more than the parse (~40 ms of a ``kdbench validate``)."""
        import gc

        was = gc.isenabled()
        gc.disable()
        try:
            return self._scan_files()
        finally:
            if was:
                gc.enable()

    def _scan_files(self) -> dict[str, tuple[str, PluginInfo | None]]:
        dirs = self.plugin_dirs() if self._scan_spec is not None else ()
        if self._scanned is not None and dirs == self._scanned_dirs:
            return self._scanned
        if self._scan_spec is None:
            self._load_plugins()
            self._scanned = {}
            return self._scanned
        for d in dirs:  # a plugin file's module is its stem; its sibling helpers (_common.py) import the same way
            if str(d) not in sys.path:
                sys.path.append(str(d))
                importlib.invalidate_caches()
        found: dict = {}
        origins: dict[str, Origin] = {}
        files: set[Path] = set()
        for module, path, origin in self._sources(dirs):
            if path is not None:
                if path.resolve() in files:  # the same file from two sources (a folder named twice)
                    continue
                files.add(path.resolve())
            if module in origins:
                raise RegistryError(f"two {self.kind} plugin modules are named {module!r}: {origins[module].where()} "
                                    f"and {origin.where()}; rename one")
            origins[module] = origin
            self._origins[module] = origin
            names: dict | None = None
            if path is not None:
                try:
                    mod = _ModuleFile(module, path)
                    names = self._scan_module(mod)
                    if names:
                        _ModuleFile._cache.setdefault(module, mod)
                except SyntaxError as e:
                    raise RegistryError(f"{self.kind} plugin {path}:{e.lineno}: syntax error: {e.msg}") from None
                except UnicodeDecodeError:
                    raise RegistryError(f"{self.kind} plugin {path}: not UTF-8 text") from None
                except (_Opaque, OSError, AttributeError):
                    names = None
            if origin.source == "plugins folder" and names != {}:
                self._check_module_name(origin)
            if names is None:  # not readable as literals: import it, it registers itself
                before = set(self._items)
                self._import(module)
                names = {n: None for n in set(self._items) - before}
                names.update({n: None for n, obj in self._items.items()  # registered by it before this scan
                              if n not in names and getattr(obj, "__module__", None) == module})
            for n, info in names.items():
                if n in found and found[n][0] != module:
                    raise RegistryError(f"duplicate {self.kind} name {n!r}: registered by "
                                        f"{origins[found[n][0]].where()} and by {origin.where()}")
                found[n] = (module, info)
        self._scanned, self._scanned_dirs = found, dirs
        return found

    def origin(self, name: str) -> dict:
        """Where ``name`` comes from, for a record: ``source`` (kdbench, entry point, plugins folder, or
        ``registered`` for a name registered by code the registry did not discover), ``module``, ``file`` and
        its ``sha256``, ``distribution`` and ``version`` (entry points), ``entry_point``. Imports nothing."""
        scanned = self._scan()
        module = scanned[name][0] if name in scanned else getattr(self._items.get(name), "__module__", None)
        if module is None:
            raise RegistryError(self.unknown_message(name))
        if module in self._origins:
            return self._origins[module].to_dict()
        file = getattr(sys.modules.get(module), "__file__", None)
        return Origin(module, Path(file) if file else None, "registered").to_dict()

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
                raise RegistryError(f"duplicate {self.kind} name {name!r}: already registered by "
                                    f"{_where(self._items[name])}, registered again by {_where(obj)}")
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
            self._import(scanned[name][0])
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
        """Every plugin, imported (the plugin folders' and entry points' too)."""
        self._load_plugins()
        for module in sorted({m for m, _ in self._scan().values()}):
            self._import(module)
        return sorted(self._items.items())


def _where(obj: Any) -> str:
    """A registered object in a message: ``module.qualname`` and its module's file."""
    module = getattr(obj, "__module__", "?")
    file = getattr(sys.modules.get(module), "__file__", None)
    return f"{module}.{getattr(obj, '__qualname__', obj)}" + (f" ({file})" if file else "")


# The registries. Each discovers its plugins on first use, so importing this module stays torch-free.
#: the entry-point group of method plugin modules (a package's pyproject:
#: ``[project.entry-points."kdbench.methods"] mykd = "mypkg.mykd"``)
METHODS_ENTRY_POINTS = "kdbench.methods"
#: folders of method plugin files (``os.pathsep``-separated); ``--plugins`` and a suite's ``plugins:`` add to it,
#: and the processes the scheduler starts inherit it
PLUGINS_ENV = "KDBENCH_PLUGINS"
METHODS = Registry("method", discover=("kdbench.methods",), scan=Scan(
    decorators=("register_method", "METHODS.register"), root=("kdbench.method", "Distiller"),
    attrs=("tasks", "version", "needs_teacher", "heterogeneous", "citation", "stage_params", "requires_taps"),
    opaque_if_defined=("check_pair", "check_params", "param_defaults", "param_annotations")),
    entry_points=METHODS_ENTRY_POINTS, plugins_env=PLUGINS_ENV)
MODELS = Registry("model source", discover=("kdbench.models",), scan=Scan(
    decorators=("MODELS.register",), root=("kdbench.models.sources", "Source"), attrs=("prefix",)))
DATASETS = Registry("dataset", discover=("kdbench.data",), scan=Scan(
    decorators=("DATASETS.register",), root=("kdbench.data.plugin", "DatasetPlugin"),
    attrs=("task", "needs_root", "layout", "corruption_point", "augments"), params_of="build"))
TASKS = Registry("task", discover=("kdbench.tasks",))


def register_method(name: str):
    """Class decorator: ``@register_method("kd")`` adds a Distiller subclass to METHODS."""
    return METHODS.register(name)


def add_plugin_dirs(dirs: Iterable[str | os.PathLike], where: str = "--plugins") -> list[Path]:
    """Add folders of method plugin files (``--plugins``, a suite's ``plugins:``): checked, resolved, put first in
    ``KDBENCH_PLUGINS`` in this process's environment, which every process it starts (local and SLURM jobs,
    DDP ranks) inherits; the registry reads its plugin files again on next use. Run ids do not change: a method
    is known by its name and ``version``. A name that is not a folder is a ValueError naming ``where``."""
    out = []
    for d in dirs:
        path = Path(d).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"{where}: {d} is not a folder (a folder of method plugin files is expected)")
        out.append(path)
    have = [x for x in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if x.strip()]
    new = [str(p) for p in out if str(p) not in have]
    if new:
        os.environ[PLUGINS_ENV] = os.pathsep.join(new + have)
    return out
