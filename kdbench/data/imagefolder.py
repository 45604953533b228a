"""ImageNet-style folders: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

Tiny-ImageNet's own validation layout (``val/images/*`` + ``val/val_annotations.txt``) is read as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from kdbench.data.base import ClassificationData, DataLayoutError, DatasetPlugin, stratified_fraction
from kdbench.registry import DATASETS

LAYOUT = ("ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (ImageNet), or Tiny-ImageNet's "
          "ROOT/val/images/<image> with ROOT/val/val_annotations.txt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _decode(loader, path, image_fn, i: int):
    """The PIL image at ``path``, through ``image_fn(H×W×3 uint8, index)`` when one is set (same size kept)."""
    img = loader(str(path))
    if image_fn is None:
        return img
    from PIL import Image

    raw = np.asarray(img.convert("RGB"))
    out = np.asarray(image_fn(raw, int(i)))
    if out.shape != raw.shape or out.dtype != np.uint8:
        raise ValueError(f"image_fn changed {path} from uint8 {raw.shape} to {out.dtype} {out.shape}")
    return Image.fromarray(np.ascontiguousarray(out))


class _Folder(Dataset):
    """torchvision's ImageFolder listing (``samples``, ``targets``, ``classes``, ``class_to_idx``) with an
    ``image_fn`` hook on the decoded image, before the transform (resize, crop, normalisation)."""

    def __init__(self, folder: Path, transform, image_fn=None):
        from torchvision import datasets

        inner = datasets.ImageFolder(str(folder))
        self.loader = inner.loader
        self.samples, self.targets = list(inner.samples), list(inner.targets)
        self.classes, self.class_to_idx = list(inner.classes), dict(inner.class_to_idx)
        self.transform = transform
        self.image_fn = image_fn

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return self.transform(_decode(self.loader, path, self.image_fn, i)), target


class _AnnotatedFolder(Dataset):
    """Tiny-ImageNet validation: images in one folder, labels in a tab-separated annotation file."""

    def __init__(self, folder: Path, annotations: Path, class_to_idx: dict[str, int], transform, image_fn=None):
        from torchvision.datasets.folder import default_loader

        self.image_fn = image_fn
        self.loader = default_loader
        self.samples = []
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in class_to_idx:
                self.samples.append((folder / parts[0], class_to_idx[parts[1]]))
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return self.transform(_decode(self.loader, path, self.image_fn, i)), target


@DATASETS.register("imagefolder")
class ImageFolderData(DatasetPlugin):
    layout = LAYOUT

    def check(self, root, **options):
        if root is None:
            raise DataLayoutError(f"data.root is required for imagefolder. Expected layout: {LAYOUT}")
        root = Path(root)
        if not (root / "train").is_dir():
            raise DataLayoutError(f"no folder {root / 'train'}. Expected layout: {LAYOUT}")
        if not (root / "val").is_dir():
            raise DataLayoutError(f"no folder {root / 'val'}. Expected layout: {LAYOUT}")

    def build(self, root=None, *, image_size: int = 224, train_fraction: float = 1.0, augment: bool = True,
              fraction_seed: int = 0, resize: int | None = None) -> ClassificationData:
        from torchvision import transforms as T

        self.check(root)
        root = Path(root)
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        resize = resize or int(round(image_size / 0.875))
        if augment:
            t_train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            t_train = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        t_val = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        train = _Folder(root / "train", transform=t_train)
        ann = root / "val" / "val_annotations.txt"
        if ann.is_file() and (root / "val" / "images").is_dir():
            val = _AnnotatedFolder(root / "val" / "images", ann, train.class_to_idx, t_val)
        else:
            val = _Folder(root / "val", transform=t_val)
            if val.classes != train.classes:
                raise DataLayoutError(f"{root / 'val'} has classes that differ from {root / 'train'}")
        if len(train) == 0 or len(val) == 0:
            raise DataLayoutError(f"no images found under {root}. Expected layout: {LAYOUT}")
        if train_fraction < 1:
            keep = stratified_fraction(np.asarray(train.targets), float(train_fraction), seed=fraction_seed)
            train = Subset(train, keep.tolist())
        classes = list(val.classes) if hasattr(val, "classes") else sorted(train.dataset.class_to_idx
                                                                           if isinstance(train, Subset) else train.class_to_idx)
        return ClassificationData(train, val, num_classes=len(classes), in_chans=3, image_size=image_size,
                                  classes=classes)


def write_imagefolder(root, num_classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write a tiny ImageNet-layout dataset of PNG images (class-coloured noise) for tests."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in ("train", "val"):
        for c in range(num_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            color = np.array([(60 * c) % 255, (120 + 50 * c) % 255, (200 - 30 * c) % 255], dtype=np.float32)
            for i in range(per_class):
                img = np.clip(color + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}_{c}_{i}.png")
    return root
