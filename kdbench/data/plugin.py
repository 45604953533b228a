"""The dataset plugin contract, torch-free: ``kdbench validate`` checks a suite's data with a plugin's ``check``
(layout and options only) without importing torch; ``build`` imports what it needs. A plugin module that keeps
its torch imports inside ``build`` (``kdbench/data/digits.py``) is validated without torch; the registry reads
every plugin's task, options and layout from its file (``kdbench.registry``).
"""

from __future__ import annotations

import inspect
from typing import Any


#: appended to "not found" messages: the bundled suites write ``root: ${KDBENCH_DATA:-data}/<dataset>``
NOT_FOUND_HINT = ("; the suites in suites/ read data.root under ${KDBENCH_DATA:-data}: point KDBENCH_DATA at the "
                  "folder that holds your datasets (export KDBENCH_DATA=/path/to/datasets)")


class DataLayoutError(FileNotFoundError):
    """The data is not where the suite says, or not in the expected layout."""


class DataFileError(ValueError):
    """A data file is there but unusable: undecodable, or inconsistent with its annotations (the message names
    the file and what to do)."""


class DatasetPlugin:
    """A dataset family. Subclasses implement ``check`` (layout only, cheap) and ``build``.

    Keyword arguments of ``build`` (after ``root``) are the suite's ``data:`` options; unknown keys are rejected.
    """

    task = "classification"
    needs_root = True
    layout = ""  # a human description of the expected on-disk layout, used in errors
    #: where its datasets apply a corruption (kdbench.robustness.corruption_point): "decoded" (the stored or decoded
    #: image, before resizing) or "center_crop" (after the eval transform's resize and crop: ImageNet-C)
    corruption_point = "decoded"
    #: whether its training split draws random numbers (augmentation): True (always), False (never), or the name
    #: of the boolean ``build`` option that turns it on (``"augment"``). Such draws are seeded per batch
    #: (``kdbench.train.batch_rng``), which is part of a training run's identity (``RunSpec.batch_rng``).
    augments: bool | str = True

    def check(self, root: str | None, **options: Any) -> None:
        raise NotImplementedError

    def build(self, root: str | None, **options: Any) -> ClassificationData:
        raise NotImplementedError

    def corruption_min_side(self, root: str | None, **options: Any) -> int | None:
        """The smallest side, in pixels, that an evaluated (validation) image can have where this dataset applies a
        corruption (its :attr:`corruption_point`), known from the options without reading every file; None when
        only the files know. Torch-free: ``kdbench validate`` compares it with the corruption library's limit
        (``kdbench.robustness.MIN_SIDE``)."""
        return None

    def corruption_size_option(self, min_side: int, **options: Any) -> tuple[str, Any] | None:
        """``(option, value)``: the ``data:`` option (dotted below a mapping option: ``synthetic.height``) and the
        smallest value of it that makes :meth:`corruption_min_side` at least ``min_side``; None when no option
        sets the size."""
        return None

    def synthetic_shape(self, **options: Any) -> tuple[int, int, int] | None:
        """``(num_classes, in_chans, image_size)`` of what ``build(root, **options)`` would give, known without
        the data (``kdbench bench`` times steps on random batches of this shape); None when only the data
        knows (the cost benchmark then builds the data)."""
        return None

    @classmethod
    def option_names(cls) -> list[str]:
        sig = inspect.signature(cls.build)
        return [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.build)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _imports_torch(module: str) -> bool:
    """Whether importing the plugin module ``module`` imports torch (a module-level ``import torch`` or
    torchvision in its file), read without importing it; True when it cannot be told."""
    import ast

    from kdbench.registry import locate_module

    spec = locate_module(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return True
    try:
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return True
    heavy = ("torch", "torchvision")
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n.split(".")[0] in heavy for n in names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdbench.data.") \
                and node.module != "kdbench.data.plugin" and _imports_torch(node.module):
            return True
    return False


def corruption_size_problem(data: dict[str, Any], min_side: int, *, light: bool = False) -> str | None:
    """Why the dataset of a suite's ``data:`` mapping cannot be corrupted (an image side under ``min_side`` pixels
    where it is corrupted), naming the option to change and the value needed; None when it can, or when only the
    files know. Imports the plugin's module; with ``light`` (``validate --no-data``, ``run --dry-run``: no torch)
    only a plugin module that imports no torch (``digits``), else None: ``check_data_available`` asks again with
    every plugin before anything runs."""
    from kdbench.registry import DATASETS

    opts = {k: v for k, v in data.items() if k not in ("name", "root")}
    if light:
        info = DATASETS.info(data["name"])
        if info is None or _imports_torch(info.module):
            return None
    plugin = DATASETS.get(data["name"])()
    side = plugin.corruption_min_side(data.get("root"), **opts)
    if side is None or side >= min_side:
        return None
    fix = plugin.corruption_size_option(min_side, **opts)
    how = f"; set data.{fix[0]} to {fix[1]} or more" if fix else ""
    return (f"dataset {data['name']!r} gives images of {side} px on their smallest side where they are corrupted, "
            f"and the corruption library needs at least {min_side}×{min_side}{how}")


def check_data(data: dict[str, Any]) -> None:
    """Check a suite's ``data:`` mapping with its plugin's ``check`` (the layout on disk, the options)."""
    from kdbench.registry import DATASETS

    opts = {k: v for k, v in data.items() if k not in ("name", "root")}
    DATASETS.get(data["name"])().check(data.get("root"), **opts)
