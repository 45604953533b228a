"""One small registry class, used for methods, models, datasets and tasks.

A registry maps names to objects. Registering a name twice is an error; asking for an unknown name is
an error that names the registry, suggests close matches and lists what is valid. A registry may be given
packages to import on first use (plugin discovery): every module of such a package is imported, so a file
dropped into ``methods/`` registers itself without any other edit.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from typing import Any, Callable, Iterable


class RegistryError(KeyError):
    """Unknown or duplicate registry name. The message is the whole explanation."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind: str, discover: Iterable[str] = ()):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._discover = tuple(discover)
        self._discovered = False

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
        self._load_plugins()
        if name in self._items:
            return self._items[name]
        raise RegistryError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        self._load_plugins()
        names = sorted(self._items)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(names) or '(none)'}"

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def names(self, pattern: str = "*") -> list[str]:
        self._load_plugins()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def items(self) -> list[tuple[str, Any]]:
        self._load_plugins()
        return sorted(self._items.items())


# The registries. Each discovers its plugins on first use, so importing this module stays torch-free.
METHODS = Registry("method", discover=("kdbench.methods",))
MODELS = Registry("model source", discover=("kdbench.models",))
DATASETS = Registry("dataset", discover=("kdbench.data",))
TASKS = Registry("task", discover=("kdbench.tasks",))


def register_method(name: str):
    """Class decorator: ``@register_method("kd")`` adds a Distiller subclass to METHODS."""
    return METHODS.register(name)
