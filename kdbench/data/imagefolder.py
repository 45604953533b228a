"""ImageNet-style folders: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

Tiny-ImageNet's own validation layout (``val/images/*`` + ``val/val_annotations.txt``) is read as well, and so is
ImageNet's flat validation folder as Kaggle ships it (``val/<ImageId>.JPEG`` labelled by ``LOC_val_solution.csv``:
columns ``ImageId,PredictionString``, the first token of ``PredictionString`` being the synset; class names are
the train folders' synsets). ``check`` (run by ``validate`` and ``build``) verifies the layout, that every class
folder holds an image and that every validation label names a train class, each error naming the folder or file.
Images are decoded when read; one that cannot be (truncated, empty, not an image) is an error naming its file.

Transforms (see :meth:`ImageFolderData.build`): evaluation resizes and center-crops to ``image_size``; training
with ``augment`` takes a RandomResizedCrop + horizontal flip, or with ``rotation`` set a random rotation + flip of
the resized, center-cropped image (mdistiller's Tiny-ImageNet protocol at ``image_size: 64, resize: 64``). Both
splits are normalised with ImageNet's mean/std unless ``mean``/``std`` are given.

Corruptions (the datasets' ``image_fn`` hook) are applied as ImageNet-C applies them: to the resized,
center-cropped image (the eval transform's ``Resize`` + ``CenterCrop``: 256 then 224 at ``image_size`` 224),
before tensor conversion and normalisation, so the corrupted image is ``image_size`` pixels on a side.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from kdbench.data.base import (NOT_FOUND_HINT, ClassificationData, DataFileError, DataLayoutError, DatasetPlugin,
                               stratified_fraction)
from kdbench.registry import DATASETS

FLAT_CSV = "LOC_val_solution.csv"
LAYOUTS = (
    "ImageNet folders: ROOT/train/<class>/<image> and ROOT/val/<class>/<image>, the same class folders",
    "Tiny-ImageNet: ROOT/train/<class>/.../<image> with ROOT/val/images/<image> and ROOT/val/val_annotations.txt "
    "(<image> TAB <class> ... per line)",
    f"flat ImageNet val (Kaggle): ROOT/train/<synset>/<image> with ROOT/val/<ImageId>.JPEG and {FLAT_CSV} "
    "(ImageId,PredictionString, the synset first) in ROOT/val, ROOT or up to 3 folders above ROOT (the Kaggle "
    "download's top folder when ROOT is its ILSVRC/Data/CLS-LOC)",
)
LAYOUT = "one of: " + "; ".join(f"({i}) {text}" for i, text in enumerate(LAYOUTS, 1))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_transform_options(rotation=None, mean=None, std=None) -> None:
    """The ``rotation``, ``mean`` and ``std`` options checked without reading any file: each None (unset) or,
    for ``rotation``, a number >= 0 (degrees), for ``mean``/``std`` a list of 3 numbers (RGB, on images scaled to
    [0, 1]) with every ``std`` > 0. Anything else is a ValueError naming ``data.<option>`` and what is valid."""
    if rotation is not None and not (_is_number(rotation) and rotation >= 0):
        raise ValueError(f"data.rotation must be a number of degrees >= 0 (the training images are rotated by an "
                         f"angle drawn uniformly from [-rotation, rotation]) or unset, got {rotation!r}")
    for name, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
            raise ValueError(f"data.{name} must be a list of 3 numbers (the per-channel R, G, B {name} of the "
                             f"images scaled to [0, 1]) or unset (ImageNet's), got {value!r}")
        if name == "std" and not all(v > 0 for v in value):
            raise ValueError(f"data.std must be a list of 3 numbers > 0 (each channel is divided by it), got "
                             f"{value!r}")


#: where these datasets apply a corruption (kdbench.robustness.corruption_point): after Resize + CenterCrop
CORRUPTION_POINT = "center_crop"
#: transform steps that turn the PIL image into a tensor: the corruption hook runs just before the first of them
_TO_TENSOR = ("ToTensor", "PILToTensor", "ToImage", "ToImageTensor")


def _split_transform(transform) -> tuple[list, list]:
    """``(geometric, rest)`` steps of a transform: for a ``Compose``, the steps before the first tensor
    conversion (:data:`_TO_TENSOR`: resize, center crop, ...; they act on the PIL image) and the steps from it on
    (tensor conversion, normalisation). Any other transform is all ``rest`` (no geometric part known)."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return [], ([transform] if transform is not None else [])
    k = next((j for j, t in enumerate(steps) if type(t).__name__ in _TO_TENSOR), len(steps))
    return list(steps[:k]), list(steps[k:])


def _decode(loader, path):
    """``loader(path)`` (torchvision's: the decoded RGB image); a missing, unreadable or undecodable file is a
    :class:`DataFileError` naming it."""
    from PIL import Image

    try:
        return loader(str(path))
    except FileNotFoundError:
        raise DataFileError(f"image {path} disappeared after the dataset was listed: restore it (or rerun to "
                            "relist)") from None
    except IsADirectoryError:
        raise DataFileError(f"image {path} is a folder; expected an image file") from None
    except PermissionError as e:
        raise DataFileError(f"cannot read image {path}: {e.strerror or e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        what = "the file is empty" if empty else "the file is truncated, corrupt or not an image"
        raise DataFileError(f"cannot decode image {path} ({type(e).__name__}: {e}): {what}; replace it with a good "
                            "copy") from None


def _load(loader, path, transform, image_fn, i: int):
    """The sample at ``path`` through ``transform``; with ``image_fn`` (a corruption) set, the image is corrupted
    (``image_fn(H×W×3 uint8, index)``, same size kept) between the transform's geometric part and its tensor
    conversion: the resized, center-cropped image of the eval transform (Resize(256) + CenterCrop(224) at 224
    px), as ImageNet-C corrupts it (Hendrycks & Dietterich 2019); the decoded image itself when the transform has
    no geometric part (or is not a ``Compose``)."""
    img = _decode(loader, path)
    if image_fn is None:
        return transform(img) if transform is not None else img
    from PIL import Image

    geometric, rest = _split_transform(transform)
    for t in geometric:
        img = t(img)
    raw = np.asarray(img.convert("RGB"))
    out = np.asarray(image_fn(raw, int(i)))
    if out.shape != raw.shape or out.dtype != np.uint8:
        raise ValueError(f"image_fn changed {path} from uint8 {raw.shape} to {out.dtype} {out.shape}")
    img = Image.fromarray(np.ascontiguousarray(out))
    for t in rest:
        img = t(img)
    return img


class _Folder(Dataset):
    """torchvision's ImageFolder listing (``samples``, ``targets``, ``classes``, ``class_to_idx``) with an
    ``image_fn`` hook (a corruption) applied to the image the transform's geometric part (resize, crop) produces,
    before tensor conversion and normalisation (see :func:`_load`)."""

    corruption_point = CORRUPTION_POINT

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
        return _load(self.loader, path, self.transform, self.image_fn, i), target


class _AnnotatedFolder(Dataset):
    """Tiny-ImageNet validation: images in one folder, labels in a tab-separated annotation file; ``image_fn`` as
    :class:`_Folder`."""

    corruption_point = CORRUPTION_POINT

    def __init__(self, folder: Path, annotations: Path, class_to_idx: dict[str, int], transform, image_fn=None):
        from torchvision.datasets.folder import default_loader

        self.image_fn = image_fn
        self.loader = default_loader
        self.samples = []
        for line in annotations.read_text(encoding="utf-8-sig").splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in class_to_idx:
                self.samples.append((folder / parts[0], class_to_idx[parts[1]]))
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return _load(self.loader, path, self.transform, self.image_fn, i), target


@DATASETS.register("imagefolder")
class ImageFolderData(DatasetPlugin):
    layout = LAYOUT
    corruption_point = CORRUPTION_POINT  # ImageNet-C (see _load)
    augments = "augment"  # the training split is augmented when the option is true

    def check(self, root, **options):
        check_transform_options(options.get("rotation"), options.get("mean"), options.get("std"))  # no file read
        if root is None:
            raise DataLayoutError(f"data.root is required for imagefolder. Accepted layouts: {LAYOUT}")
        _scan(Path(root))

    def corruption_min_side(self, root, *, image_size: int = 224, **options) -> int:
        """Corrupted after the eval transform's resize and center crop: ``image_size`` pixels square."""
        return int(image_size)

    def corruption_size_option(self, min_side, **options):
        return "image_size", int(min_side)

    def build(self, root=None, *, image_size: int = 224, train_fraction: float = 1.0, augment: bool = True,
              fraction_seed: int = 0, resize: int | None = None, rotation: float | None = None,
              mean: list[float] | None = None, std: list[float] | None = None) -> ClassificationData:
        """Evaluation (the validation split, and the training split when ``augment`` is false): torchvision's
        ``Resize(resize)`` (the shorter side to ``resize`` pixels; unset: ``round(image_size / 0.875)``, 256 at
        224) then ``CenterCrop(image_size)``, ``ToTensor`` and ``Normalize(mean, std)``.

        Training with ``augment`` and ``rotation`` unset: ``RandomResizedCrop(image_size)`` +
        ``RandomHorizontalFlip()`` of the decoded image, then ``ToTensor`` and ``Normalize``. With ``rotation``
        (degrees, >= 0) set: the evaluation's ``Resize(resize)`` + ``CenterCrop(image_size)``, then
        ``RandomRotation(rotation)`` (torchvision's defaults: angle uniform in [-rotation, rotation] about the
        centre, nearest-neighbour, same size, uncovered corners filled with black, i.e. 0 before normalisation) and
        ``RandomHorizontalFlip(0.5)``, ``ToTensor`` and ``Normalize``. On Tiny-ImageNet's 64×64 images with
        ``image_size: 64, resize: 64`` the resize and the crop leave the image as it is, so with ``rotation: 20``,
        ``mean: [0.4802, 0.4481, 0.3975]`` and ``std: [0.2302, 0.2265, 0.2262]`` both splits are mdistiller's
        Tiny-ImageNet transforms (train: RandomRotation(20), RandomHorizontalFlip(0.5), ToTensor, Normalize; eval:
        ToTensor, Normalize). ``rotation`` does nothing when ``augment`` is false.

        ``mean``/``std`` (lists of 3 numbers; unset: ImageNet's :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`)
        normalise both splits. The random transforms act on PIL images and draw from the global torch RNG only:
        the training loop seeds it per batch when it loads without workers, torch seeds it per DataLoader worker.
        """
        from torchvision import transforms as T

        self.check(root, rotation=rotation, mean=mean, std=std)
        root = Path(root)
        norm = T.Normalize(IMAGENET_MEAN if mean is None else [float(v) for v in mean],
                           IMAGENET_STD if std is None else [float(v) for v in std])
        resize = resize or int(round(image_size / 0.875))
        if augment and rotation is not None:
            t_train = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.RandomRotation(float(rotation)),
                                 T.RandomHorizontalFlip(0.5), T.ToTensor(), norm])
        elif augment:
            t_train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            t_train = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        t_val = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        train = _Folder(root / "train", transform=t_train)
        ann = root / "val" / "val_annotations.txt"
        if ann.is_file() and (root / "val" / "images").is_dir():
            val = _AnnotatedFolder(root / "val" / "images", ann, train.class_to_idx, t_val)
        elif (flat_csv := _flat_val_csv(root)) is not None:
            val = _FlatValFolder(root / "val", flat_csv, train.class_to_idx, t_val)
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


# ------------------------------------------------------------------------------------------------ layout checks
_IMG_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMG_EXT)


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image at any depth (stops at the first, as cheap as one listing)."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_file() and _is_image(e.name):
                    return True
                if e.is_dir():
                    stack.append(Path(e.path))
    return False


def _class_folders(split: Path) -> list[str]:
    """The class folders of a split (sorted, as torchvision's ImageFolder), each checked to hold an image."""
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir())
    if not classes:
        raise DataLayoutError(f"{split} holds no class folders. Accepted layouts: {LAYOUT}")
    empty = [str(split / c) for c in classes if not _has_image(split / c)]
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise DataLayoutError(f"class folder(s) without any image ({', '.join(_IMG_EXT)}): {', '.join(empty[:3])}"
                              f"{more}; add its images or remove the folder")
    return classes


def _csv_candidates(root: Path) -> list[Path]:
    return [root / "val" / FLAT_CSV, root / FLAT_CSV] + [p / FLAT_CSV for p in list(root.resolve().parents)[:3]]


def _val_layout(root: Path) -> tuple[str, Path | None]:
    """``("folders", None)``, ``("tiny", annotations file)`` or ``("flat", csv file)``; anything else is an error
    that lists every accepted layout."""
    val = root / "val"
    if (val / "images").is_dir() and (val / "val_annotations.txt").exists():
        if not (val / "val_annotations.txt").is_file():
            raise DataFileError(f"{val / 'val_annotations.txt'} is a folder; expected Tiny-ImageNet's annotation file "
                                f"(<image> TAB <class> ... per line)")
        return "tiny", val / "val_annotations.txt"
    entries = list(os.scandir(val))
    if any(e.is_file() and _is_image(e.name) for e in entries):
        for csv_path in _csv_candidates(root):
            if csv_path.is_file():
                return "flat", csv_path
        raise DataLayoutError(f"{val} holds images directly (ImageNet's flat val) but there is no {FLAT_CSV} in "
                              f"{', '.join(str(p.parent) for p in _csv_candidates(root))} to label them. Accepted "
                              f"layouts: {LAYOUT}")
    if any(e.is_dir() for e in entries):
        return "folders", None
    raise DataLayoutError(f"{val} holds neither class folders nor images. Accepted layouts: {LAYOUT}")


def _flat_val_csv(root: Path) -> Path | None:
    kind, path = _val_layout(root)
    return path if kind == "flat" else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def _flat_val_samples(val: Path, csv_path: Path, classes) -> list[tuple[Path, str]]:
    """``(image path, synset)`` of every image of a flat val folder, sorted by file name. Every image must have
    exactly one row in the CSV and every row's synset must be a train class."""
    import csv

    images = {os.path.splitext(e.name)[0]: e.name for e in os.scandir(val) if e.is_file() and _is_image(e.name)}
    rows = list(csv.reader(_read_text(csv_path).splitlines()))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DataFileError(f"{csv_path}: the first line must be the header ImageId,PredictionString (Kaggle's "
                            f"{FLAT_CSV}), got {','.join(rows[0]) if rows else 'an empty file'!r}")
    labels: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[1].split():
            raise DataFileError(f"{csv_path}:{n}: expected ImageId,PredictionString with the synset first, got "
                                f"{','.join(row)!r}")
        image_id, synset = row[0].strip(), row[1].split()[0]
        if synset not in classes:
            raise DataFileError(f"{csv_path}:{n}: synset {synset} of {image_id} is not one of the "
                                f"{len(classes)} class folders of {val.parent / 'train'}")
        if image_id in labels:
            raise DataFileError(f"{csv_path}:{n}: {image_id} is listed twice")
        if image_id not in images:
            raise DataFileError(f"{csv_path}:{n}: no image {image_id}.JPEG (or another image type) in {val}")
        labels[image_id] = synset
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise DataFileError(f"{len(unlabelled)} image(s) of {val} have no row in {csv_path} (first: "
                            f"{images[unlabelled[0]]}): use the CSV that belongs to these images")
    return [(val / images[i], labels[i]) for i in sorted(labels, key=lambda i: images[i])]


def _tiny_val_check(images_dir: Path, ann: Path, classes) -> None:
    present = {e.name for e in os.scandir(images_dir) if e.is_file()} if images_dir.is_dir() else set()
    n_rows = 0
    for n, line in enumerate(_read_text(ann).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataFileError(f"{ann}:{n}: expected <image> TAB <class> ..., got {line!r}")
        if parts[1] not in classes:
            raise DataFileError(f"{ann}:{n}: class {parts[1]} of {parts[0]} is not one of the {len(classes)} class "
                                f"folders of {images_dir.parent.parent / 'train'}")
        if parts[0] not in present:
            raise DataFileError(f"{ann}:{n}: no image {images_dir / parts[0]}")
        n_rows += 1
    if n_rows == 0:
        raise DataFileError(f"{ann} labels no image; expected one '<image> TAB <class> ...' line per image")


def _scan(root: Path) -> str:
    """Check the layout under ``root`` (see :data:`LAYOUTS`) and return the validation layout's kind."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataLayoutError(f"no folder {root / split}. Accepted layouts: {LAYOUT}{NOT_FOUND_HINT}")
    classes = _class_folders(root / "train")
    kind, path = _val_layout(root)
    if kind == "folders":
        val_classes = _class_folders(root / "val")
        if val_classes != classes:
            only_t, only_v = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise DataLayoutError(f"the class folders of {root / 'val'} differ from those of {root / 'train'} "
                                  f"(only in train: {', '.join(only_t[:5]) or '-'}; only in val: "
                                  f"{', '.join(only_v[:5]) or '-'})")
    elif kind == "tiny":
        _tiny_val_check(root / "val" / "images", path, set(classes))
    else:
        _flat_val_samples(root / "val", path, set(classes))
    return kind


class _FlatValFolder(_AnnotatedFolder):
    """ImageNet's flat validation folder (``val/<ImageId>.JPEG``) labelled by Kaggle's ``LOC_val_solution.csv``;
    reads images as :class:`_AnnotatedFolder` does."""

    def __init__(self, folder: Path, csv_path: Path, class_to_idx: dict[str, int], transform, image_fn=None):
        from torchvision.datasets.folder import default_loader

        self.image_fn = image_fn
        self.loader = default_loader
        self.samples = [(path, class_to_idx[s]) for path, s in _flat_val_samples(folder, csv_path, class_to_idx)]
        self.targets = [t for _, t in self.samples]
        self.transform = transform


def write_imagenet_flat_val(root, num_classes: int = 3, per_class: int = 3, val_per_class: int = 2, size: int = 32,
                            seed: int = 0, kaggle: bool = False) -> Path:
    """Write a tiny ImageNet with the flat validation layout of Kaggle's ImageNet download, real JPEG files:
    ``train/<synset>/<synset>_<i>.JPEG``, ``val/ILSVRC2012_val_<8 digits>.JPEG`` (numbered in a shuffled class
    order) and ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; per image its synset followed by
    a box ``x_min y_min x_max y_max``, rows in another shuffled order). Images are class-coloured noise.

    Returns the dataset root: ``root`` with the CSV in it, or with ``kaggle=True`` ``root/ILSVRC/Data/CLS-LOC``
    with the CSV at ``root`` (where the Kaggle archive puts it).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    top = Path(root)
    data = top / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else top
    synsets = [f"n{1440764 + 1013 * c:08d}" for c in range(num_classes)]

    def image(c: int) -> Image.Image:
        color = np.array([(60 * c) % 255, (120 + 50 * c) % 255, (200 - 30 * c) % 255], dtype=np.float32)
        return Image.fromarray(np.clip(color + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8))

    for c, syn in enumerate(synsets):
        (data / "train" / syn).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image(c).save(data / "train" / syn / f"{syn}_{i}.JPEG", format="JPEG", quality=90)
    (data / "val").mkdir(parents=True, exist_ok=True)
    order = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    rows = []
    for k, c in enumerate(order, start=1):
        image_id = f"ILSVRC2012_val_{k:08d}"
        image(int(c)).save(data / "val" / f"{image_id}.JPEG", format="JPEG", quality=90)
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, size=2))
        x1, y1 = (int(v) for v in rng.integers(size // 2 + 1, size, size=2))
        rows.append(f"{image_id},{synsets[int(c)]} {x0} {y0} {x1} {y1} ")
    rows = [rows[i] for i in rng.permutation(len(rows))]
    (top / FLAT_CSV).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return data
