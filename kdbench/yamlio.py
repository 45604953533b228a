"""Strict, bounded YAML loading for suite files (torch-free).

``load_file(path)`` / ``loads(text, source)`` read one YAML document with PyYAML's safe loader, plus:

* **duplicate keys are refused** (PyYAML keeps the last one silently): the error names the file, the line of the
  second occurrence, the key and the line of the first. Keys brought in by a ``<<:`` merge may be overridden;
  that is what merges are for.
* **bounded input**: a file over ``MAX_BYTES`` (1 MiB), more than ``MAX_ALIASES`` aliases (``*name``), a
  document whose aliases expand to more than ``MAX_NODES`` nodes (an "alias bomb"), a recursive alias or a
  nesting deeper than Python can compose is refused at once, before anything walks the data.
* **UTF-8 only** (a leading BOM is accepted); otherwise the error names the file, line and byte offset.
* **numbers as YAML 1.2 writes them**: PyYAML follows YAML 1.1, where a float needs a dot and a signed
  exponent, so ``1e1``, ``5e-4`` and ``1.0e4`` are *strings* there. Here every plain (unquoted) scalar that
  matches the YAML 1.2 core-schema float pattern (``[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?``,
  with an exponent or a dot) is a float, as a suite author expects. Quoted scalars stay strings; integers,
  booleans and null keep PyYAML's rules.
* aliases are expanded into independent copies, so that ``--set`` on one place never changes another.

Every error is a ``YamlError`` (a ``ValueError``) with a one-line message that starts with ``<file>:<line>:``
where the line is known.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1 << 20  # 1 MiB: the largest committed suite is a few KiB
MAX_ALIASES = 256
MAX_NODES = 100_000  # after expanding aliases

MERGE_TAG = "tag:yaml.org,2002:merge"

# YAML 1.2 core schema floats that YAML 1.1 (PyYAML) reads as strings: an exponent without sign or dot
# (1e1, 5e-4, 1.0e4, .5e3) and a leading-dot decimal without digits before it is already a float in PyYAML.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class YamlError(ValueError):
    """A YAML file could not be read; the message is one line naming the file (and line where known)."""


def _where(source: str, mark) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


class _Loader(yaml.SafeLoader):
    """SafeLoader with duplicate-key refusal, an alias budget and YAML 1.2 exponent floats."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.n_aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            self.n_aliases += 1
            if self.n_aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YamlError(f"{_where(self.source, mark)}: more than {MAX_ALIASES} aliases (*name); "
                                f"a suite never needs that many (refused as a possible alias bomb)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    key: Any = "<<"
                else:
                    key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeConstructor reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise YamlError(f"{self.source}:{line}: duplicate key {key!r} (first at line {first}); "
                                    f"a key may appear once per mapping")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _check_size(node: Node | None, source: str) -> None:
    """Refuse recursive aliases and documents that expand to more than MAX_NODES nodes (iteratively)."""
    if node is None:
        return
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        key = id(n)
        if done:
            on_path.discard(key)
            if isinstance(n, SequenceNode):
                children = n.value
            elif isinstance(n, MappingNode):
                children = [c for kv in n.value for c in kv]
            else:
                children = []
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_NODES:
                raise YamlError(f"{_where(source, n.start_mark)}: the document expands to more than {MAX_NODES} "
                                f"values through its aliases (refused as a possible alias bomb)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlError(f"{_where(source, n.start_mark)}: recursive alias (a node that contains itself)")
        if isinstance(n, ScalarNode):
            sizes[key] = 1
            continue
        on_path.add(key)
        stack.append((n, True))
        children = n.value if isinstance(n, SequenceNode) else [c for kv in n.value for c in kv]
        for c in children:
            if id(c) in on_path:
                raise YamlError(f"{_where(source, c.start_mark)}: recursive alias (a node that contains itself)")
            if id(c) not in sizes:
                stack.append((c, False))


def _unshare(x: Any) -> Any:
    """Copy containers so that no two places in the result share one object (aliases become copies)."""
    if isinstance(x, dict):
        return {k: _unshare(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshare(v) for v in x]
    return x


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def loads(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document from ``text`` (``source`` names it in errors). See the module docstring."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlError(f"{source}: larger than {MAX_BYTES // (1 << 20)} MiB; a suite is a few KiB of YAML")
    loader = None
    try:
        loader = _Loader(text, source)
        node = loader.get_single_node()
        _check_size(node, source)
        data = loader.construct_document(node) if node is not None else None
    except YamlError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(_one_line(p) for p in (e.context, e.problem) if p)
        raise YamlError(f"{_where(source, mark)}: not valid YAML: {what}") from None
    except yaml.reader.ReaderError as e:
        ch = e.character if isinstance(e.character, int) else ord(e.character)
        line = text[: e.position].count("\n") + 1
        raise YamlError(f"{source}:{line}: not valid YAML: character {ch:#x} is not allowed in YAML text") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise YamlError(f"{source}: not valid YAML for a suite: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return _unshare(data)


def load_file(path: str | os.PathLike, what: str = "file") -> Any:
    """Read and parse one YAML file (UTF-8, at most MAX_BYTES); every error is a one-line ``YamlError``.

    ``what`` names the file in the not-found message ("suite file not found: PATH")."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise YamlError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise YamlError(f"{path}: is a directory, not a YAML file") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise YamlError(f"{path}: larger than {MAX_BYTES // (1 << 20)} MiB; a suite is a few KiB of YAML")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        f"save the file as UTF-8") from None
    return loads(text, str(path))
