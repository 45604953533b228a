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


class TensorImages(Dataset):
    """Images held in memory as a uint8 or float tensor ``N×C×H×W`` with integer labels.

    ``transform`` (optional) maps one normalised ``C×H×W`` float image to another, using the global torch RNG
    (the training loop seeds it per epoch, so augmentation is reproducible and resumable).

    ``image_fn`` (optional, e.g. a corruption): ``fn(image, index) -> image`` on the raw ``H×W×C`` (``H×W`` for
    one channel) uint8 image before normalisation and ``transform``; it must keep the size. Float images (in
    [0, 1], e.g. digits) are quantised to uint8 (``round(255 x)``) for it and read back as ``uint8 / 255``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, transform: Callable | None = None,
                 image_fn: Callable | None = None):
        self.image_fn = image_fn
        self.images = images
        self.labels = labels.long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def _raw(self, i: int) -> torch.Tensor:
        """Image ``i`` as float in [0, 1] (uint8 / 255), through ``image_fn`` when one is set."""
        img = self.images[i]
        if self.image_fn is None:
            return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if img.dtype != torch.uint8:
            img = (img.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        arr = img.permute(1, 2, 0).numpy()
        arr = arr[..., 0] if arr.shape[2] == 1 else arr
        out = np.asarray(self.image_fn(np.ascontiguousarray(arr), int(i)))
        if out.shape != arr.shape or out.dtype != np.uint8:
            raise ValueError(f"image_fn must return a uint8 image of shape {arr.shape}, got {out.dtype} {out.shape}")
        out = torch.from_numpy(np.ascontiguousarray(out)).reshape(img.shape[1], img.shape[2], -1).permute(2, 0, 1)
        return out.float() / 255.0

    def __getitem__(self, i: int):
        x = self._raw(i)
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
