"""Shared pieces of the data layer: the dataset plugin base, in-memory image datasets and subsets."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset


class DataLayoutError(FileNotFoundError):
    """The data is not where the suite says, or not in the expected layout."""


class DataFileError(ValueError):
    """A data file is there but unusable: undecodable, or inconsistent with its annotations (the message names
    the file and what to do)."""


@dataclass
class ClassificationData:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    classes: list[str]


class DatasetPlugin:
    """A dataset family. Subclasses implement ``check`` (layout only, cheap) and ``build``.

    Keyword arguments of ``build`` (after ``root``) are the suite's ``data:`` options; unknown keys are rejected.
    """

    task = "classification"
    needs_root = True
    layout = ""  # a human description of the expected on-disk layout, used in errors

    def check(self, root: str | None, **options: Any) -> None:
        raise NotImplementedError

    def build(self, root: str | None, **options: Any) -> ClassificationData:
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        sig = inspect.signature(cls.build)
        return [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.build)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


class TensorImages(Dataset):
    """Images held in memory as a uint8 or float tensor ``N×C×H×W`` with integer labels.

    ``transform`` (optional) maps one normalised ``C×H×W`` float image to another, using the global torch RNG
    (the training loop seeds it per epoch, so augmentation is reproducible and resumable).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, transform: Callable | None = None):
        self.images = images
        self.labels = labels.long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float()
        if self.images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified subset holding ``fraction`` of each class (at least one per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def random_crop_flip(pad: int, flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """CIFAR-style augmentation on a normalised tensor: zero-pad, random crop back, random horizontal flip."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            i = int(torch.randint(0, 2 * pad + 1, ()))
            j = int(torch.randint(0, 2 * pad + 1, ()))
            x = x[:, i : i + h, j : j + w]
        if flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    return apply


def resize_to(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Bilinear resize of one ``C×H×W`` image to ``size×size``."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]

    return apply


def compose(*fns: Callable | None) -> Callable | None:
    """Chain the given transforms (None entries skipped); None when there are none."""
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None

    def apply(x):
        for f in fns:
            x = f(x)
        return x

    return apply
