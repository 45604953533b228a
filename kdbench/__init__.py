"""kdbench: a benchmark harness for knowledge distillation.

Importing this package is cheap: it must not import torch (the CLI stays fast). The heavy modules
(`kdbench.runner`, `kdbench.train`, `kdbench.tasks`, `kdbench.models`, the method plugins) import torch
when they are imported themselves.
"""

__version__ = "0.1.0"

from kdbench.registry import Registry, RegistryError  # noqa: E402  (torch-free)

__all__ = ["Registry", "RegistryError", "__version__"]
