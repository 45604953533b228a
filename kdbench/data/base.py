"""Shared pieces of the data layer: the dataset plugin base, in-memory image datasets and subsets."""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from kdbench.data.plugin import NOT_FOUND_HINT, DataFileError, DataLayoutError, DatasetPlugin  # noqa: F401  (torch-free; re-exported)


@dataclass
class ClassificationData:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    classes: list[str]


class TensorImages(Dataset):
    """Images held in memory as a uint8 or float tensor ``N×C×H×W`` with integer labels.

    ``transform`` (optional) maps one normalised ``C×H×W`` float image to another, using the global torch RNG
    (the training loop seeds it per epoch, so augmentation is reproducible and resumable).

    ``image_fn`` (optional, e.g. a corruption): ``fn(image, index) -> image`` on the raw ``H×W×C`` (``H×W`` for
    one channel) uint8 image before normalisation and ``transform``; it must keep the size. Float images (in
    [0, 1], e.g. digits) are quantised to uint8 (``round(255 x)``) for it and read back as ``uint8 / 255``.

    ``image_transform`` (optional) takes the place of the normalisation and of ``transform``: it maps the raw
    uint8 image (a numpy ``H×W×C`` array, ``H×W`` for one channel, after ``image_fn``; float images quantised as
    for ``image_fn``) to the normalised ``C×H×W`` float tensor, e.g. a torchvision or timm pipeline (CIFAR-100's
    ``timm_transform`` option). ``mean``/``std`` are then only recorded: they should be the ones it normalises
    with. A random ``image_transform`` should draw from the global torch RNG only (:class:`TorchSeeded`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, transform: Callable | None = None,
                 image_fn: Callable | None = None, image_transform: Callable | None = None):
        if transform is not None and image_transform is not None:
            raise ValueError("TensorImages takes a transform (on the normalised tensor) or an image_transform (on "
                             "the raw uint8 image), not both")
        self.image_fn = image_fn
        self.images = images
        self.labels = labels.long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.labels)

    def _uint8(self, i: int) -> np.ndarray:
        """Image ``i`` as a uint8 numpy ``H×W×C`` array (``H×W`` for one channel), through ``image_fn`` when one
        is set; a float image is quantised (``round(255 x)``)."""
        img = self.images[i]
        if img.dtype != torch.uint8:
            img = (img.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        arr = img.permute(1, 2, 0).numpy()
        arr = np.ascontiguousarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        if self.image_fn is None:
            return arr
        out = np.asarray(self.image_fn(arr, int(i)))
        if out.shape != arr.shape or out.dtype != np.uint8:
            raise ValueError(f"image_fn must return a uint8 image of shape {arr.shape}, got {out.dtype} {out.shape}")
        return np.ascontiguousarray(out)

    def _raw(self, i: int) -> torch.Tensor:
        """Image ``i`` as float in [0, 1] (uint8 / 255), through ``image_fn`` when one is set."""
        img = self.images[i]
        if self.image_fn is None:
            return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        out = torch.from_numpy(self._uint8(i)).reshape(img.shape[1], img.shape[2], -1).permute(2, 0, 1)
        return out.float() / 255.0

    def __getitem__(self, i: int):
        if self.image_transform is not None:
            return self.image_transform(self._uint8(i)), self.labels[i]
        x = self._raw(i)
        x = (x - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


class TorchSeeded:
    """A transform whose random draws are a function of the global torch RNG alone.

    ``fn`` may draw from Python's ``random``, numpy's global RNG and torch's CPU RNG (torchvision and timm
    transforms do all three). Each call draws one seed from the global torch RNG (``torch.randint``), runs ``fn``
    with ``random``, numpy's global RNG and torch's CPU RNG seeded from it, then restores all three states. So the
    global torch RNG advances by exactly one draw per call whatever ``fn`` draws, the same torch seed gives the
    same output (the training loop seeds torch per batch, and DataLoader workers seed it per worker, so
    augmentation is reproducible and resumable), and the global ``random``/numpy states are left as they were.
    Picklable when ``fn`` is (for DataLoader workers).
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x):
        seed = int(torch.randint(0, 2**32, (), dtype=torch.int64))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.fn(x)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"TorchSeeded({self.fn!r})"


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
