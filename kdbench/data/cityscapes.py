"""Cityscapes semantic segmentation from its official on-disk layout, and a writer of small datasets in it.

Layout (what the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` unpack to)::

    ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Labels are read from the ``*_gtFine_labelIds.png`` files (ids 0..33) and mapped to the 19 train ids with the
official table of the ``cityscapesscripts`` package (``cityscapesscripts.helpers.labels``, read at import
into :data:`LABEL_ID_TO_TRAIN_ID`); every other official id (void classes, parking, rail track, guard rail,
bridge, tunnel, polegroup, caravan, trailer) becomes 255, the ignore index. A label file holding a value above
the official ids (> 33: a ``*_labelTrainIds.png`` or ``*_instanceIds.png`` under the labelIds name) is refused
with an error naming it. ``*_gtFine_labelTrainIds.png`` files (made by ``createTrainIdLabelImgs``) are not
needed.

Checks: ``check`` (run by ``validate``) lists both splits: every image has its annotation, and every image and
annotation is a non-empty file (a folder or an empty file under such a name is named); a file that cannot be
decoded, an RGB labelIds file or an image and annotation of different sizes is named when it is read.

Training pipeline (the mmsegmentation Cityscapes pipeline that the FreeKD/CWD segmentation results use):

* random rescale by a ratio drawn uniformly from ``scale_range`` (0.5–2) of the image's own size (for the
  2048×1024 Cityscapes images this is mmseg's ``RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0),
  keep_ratio=True)``); image bilinear, labels nearest (PIL);
* random crop of ``crop_size`` (512 → 512×512; ``[h, w]`` for a rectangle) with mmseg's ``cat_max_ratio``
  rule: up to 10 draws until no single class covers ≥ ``cat_max_ratio`` of the crop's labelled pixels
  (``cat_max_ratio: 1.0`` disables it); a side smaller than the crop is padded after normalisation (image 0,
  labels 255), as mmseg's ``Pad`` after ``Normalize``;
* horizontal flip with probability 0.5 (``flip``);
* ImageNet mean/std normalisation (mmseg's ``[123.675, 116.28, 103.53] / [58.395, 57.12, 57.375]``).

Not done: mmseg's ``PhotoMetricDistortion`` (colour jitter); the issue and the FreeKD supplementary name only
scale, crop and flip. Validation images are used whole at their own size (mmseg ``mode='whole'``).
Randomness comes from the global torch RNG, which the training loop seeds per epoch (and DataLoader workers
derive their seeds from it), so augmentation is reproducible and resumable.

Generated data: :func:`write_cityscapes` writes street-like scenes (sky, buildings, vegetation, road, sidewalk,
poles with signs, cars, people, plus void "ego vehicle" and "unlabeled" regions) as RGB ``*_leftImg8bit.png``
images with ``*_gtFine_labelIds.png`` (and ``*_gtFine_color.png``) annotations in exactly this layout. The
suite option ``synthetic: {...}`` (writer arguments) makes ``build`` write such a dataset into ``ROOT`` when
ROOT holds none (once, under a file lock, atomically), so the segmentation quickstart runs on a fresh clone;
a ``kdbench_synthetic.json`` marker in ROOT records the arguments and a mismatch is an error.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kdbench.data.base import NOT_FOUND_HINT, DataFileError, DataLayoutError, DatasetPlugin
from kdbench.registry import DATASETS

LAYOUT = ("ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png with "
          "ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (the official Cityscapes layout)")
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
COLOR_SUFFIX = "_gtFine_color.png"
SYNTHETIC_MARKER = "kdbench_synthetic.json"


def _official_labels() -> tuple[tuple[str, int, int, tuple[int, int, int]], ...]:
    """``(name, id, trainId, color)`` of every label with an id, from the official ``cityscapesscripts`` package
    (``cityscapesscripts.helpers.labels``), with the 19 evaluated classes checked to be train ids 0..18."""
    from cityscapesscripts.helpers.labels import labels

    table = tuple((str(l.name), int(l.id), int(l.trainId) if 0 <= l.trainId < IGNORE_INDEX and not l.ignoreInEval
                   else IGNORE_INDEX, tuple(int(c) for c in l.color)) for l in labels if l.id >= 0)
    train_ids = sorted(t for _, _, t, _ in table if t != IGNORE_INDEX)
    if train_ids != list(range(19)) or max(lid for _, lid, _, _ in table) > 255:
        raise RuntimeError(f"cityscapesscripts.helpers.labels defines train ids {train_ids}, expected the 19 "
                           "classes 0..18 with label ids < 256: install an official cityscapesscripts (>= 2.2)")
    return table


#: The official table (``cityscapesscripts.helpers.labels``): ``(name, id, trainId, color)``; trainId 255 for every
#: label that is not one of the 19 evaluated classes (``ignoreInEval``).
LABELS: tuple[tuple[str, int, int, tuple[int, int, int]], ...] = _official_labels()
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {lid: tid for _, lid, tid, _ in LABELS}
#: The 19 evaluated classes, in train-id order.
CLASSES: tuple[str, ...] = tuple(name for name, _, tid, _ in sorted((l for l in LABELS if l[2] != IGNORE_INDEX),
                                                                    key=lambda l: l[2]))
NAME_TO_ID: dict[str, int] = {name: lid for name, lid, _, _ in LABELS}
#: trainId -> labelId of the 19 classes (what the official evaluator reads in prediction PNGs).
TRAIN_ID_TO_LABEL_ID: dict[int, int] = {tid: lid for _, lid, tid, _ in LABELS if tid != IGNORE_INDEX}


def train_id_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table labelId -> trainId (255 for every id outside the 19 classes)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lid, tid in LABEL_ID_TO_TRAIN_ID.items():
        lut[lid] = tid
    return lut


_LUT = train_id_lut()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a ``*_gtFine_labelIds.png`` array (uint8) to train ids (0..18, 255 ignored)."""
    return _LUT[np.asarray(label_ids, dtype=np.uint8)]


@dataclass
class SegmentationData:
    """What a segmentation dataset plugin returns: datasets of ``(image C×H×W float, label H×W long)``."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    classes: list[str]
    ignore_index: int = IGNORE_INDEX
    crop_size: tuple[int, int] = (512, 512)


# ------------------------------------------------------------------------------------------------ layout
def _check_png_file(path: Path) -> None:
    """``path`` is a non-empty file (a folder or an empty file under an image's name is refused)."""
    try:
        st = path.stat()
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e.strerror or e}; expected a PNG file") from None
    if not path.is_file():
        raise DataFileError(f"{path} is a folder; expected a PNG file. Expected layout: {LAYOUT}")
    if st.st_size == 0:
        raise DataFileError(f"{path} is empty; expected a PNG file: replace it with a good copy from the official zip")


def _pair_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, labelIds)`` paths of a split, sorted; each image has its annotation and both are non-empty
    files."""
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_dir.is_dir():
        raise DataLayoutError(f"no folder {img_dir}. Expected layout: {LAYOUT}")
    if not gt_dir.is_dir():
        raise DataLayoutError(f"no folder {gt_dir}. Expected layout: {LAYOUT}")
    pairs = []
    for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
        stem = img.name[: -len(IMG_SUFFIX)]
        label = gt_dir / img.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.exists():
            raise DataLayoutError(f"{img} has no annotation {label}. Expected layout: {LAYOUT}")
        _check_png_file(img)
        _check_png_file(label)
        pairs.append((img, label))
    if not pairs:
        raise DataLayoutError(f"no *{IMG_SUFFIX} images under {img_dir}/<city>/. Expected layout: {LAYOUT}")
    return pairs


def _crop_hw(crop_size: Any) -> tuple[int, int]:
    if isinstance(crop_size, int) and not isinstance(crop_size, bool):
        hw = (crop_size, crop_size)
    elif isinstance(crop_size, (list, tuple)) and len(crop_size) == 2:
        hw = (int(crop_size[0]), int(crop_size[1]))
    else:
        raise ValueError(f"data.crop_size must be an integer or [height, width], got {crop_size!r}")
    if min(hw) < 1:
        raise ValueError(f"data.crop_size must be positive, got {crop_size!r}")
    return hw


def _check_options(crop_size=512, scale_range=(0.5, 2.0), flip=True, cat_max_ratio=0.75, synthetic=None) -> None:
    _crop_hw(crop_size)
    if (not isinstance(scale_range, (list, tuple)) or len(scale_range) != 2
            or not 0 < float(scale_range[0]) <= float(scale_range[1])):
        raise ValueError(f"data.scale_range must be [low, high] with 0 < low <= high, got {scale_range!r}")
    if not isinstance(flip, bool):
        raise ValueError(f"data.flip must be true or false, got {flip!r}")
    if not 0 < float(cat_max_ratio) <= 1:
        raise ValueError(f"data.cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}")
    if synthetic is not None:
        if not isinstance(synthetic, dict):
            raise ValueError(f"data.synthetic must be a mapping of write_cityscapes arguments, got {synthetic!r}")
        valid = [n for n in inspect.signature(write_cityscapes).parameters if n != "root"]
        unknown = sorted(set(synthetic) - set(valid))
        if unknown:
            raise ValueError(f"data.synthetic: unknown key(s) {unknown}; valid: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------------ dataset
def _open_error(path: Path, e: Exception) -> DataFileError:
    if isinstance(e, FileNotFoundError):
        return DataFileError(f"{path} disappeared after the dataset was listed: restore it (or rerun to relist)")
    return DataFileError(f"cannot decode {path} ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                         "replace it with a good copy from the official zip")


_DECODE_ERRORS = (OSError, SyntaxError, ValueError)
_MAX_LABEL_ID = max(lid for _, lid, _, _ in LABELS)


def _load_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise _open_error(path, e) from None


def _load_label(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataLayoutError(f"{path}: a labelIds PNG must be single-channel, got mode {im.mode} (is it the "
                                      f"{COLOR_SUFFIX} file?)")
            arr = np.asarray(im)
    except DataLayoutError:
        raise
    except _DECODE_ERRORS as e:
        raise _open_error(path, e) from None
    if arr.size and int(arr.max()) > _MAX_LABEL_ID:
        raise DataFileError(f"{path} holds value {int(arr.max())}, above the official label ids 0..{_MAX_LABEL_ID}: "
                            "is it a *_labelTrainIds.png or *_instanceIds.png under the labelIds name? Use the "
                            "official *_gtFine_labelIds.png")
    return label_ids_to_train_ids(arr.astype(np.uint8))


class CityscapesSegmentation(Dataset):
    """``(image, label)`` pairs of one split; ``train=True`` applies the random scale/crop/flip pipeline."""

    def __init__(self, files: Sequence[tuple[Path, Path]], *, train: bool, crop_size=(512, 512),
                 scale_range=(0.5, 2.0), flip=True, cat_max_ratio=0.75, image_fn=None):
        self.image_fn = image_fn  # fn(H×W×3 uint8, index) -> same size, before scaling/cropping (corruptions)
        self.files = list(files)
        self.train = train
        self.crop_size = _crop_hw(list(crop_size) if not isinstance(crop_size, int) else crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.cat_max_ratio = float(cat_max_ratio)
        self.classes = list(CLASSES)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def _normalise(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def _random_crop_box(self, label: np.ndarray) -> tuple[int, int]:
        h, w = label.shape
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)

        def draw():
            return int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))

        top, left = draw()
        if self.cat_max_ratio < 1.0:  # mmseg RandomCrop: up to 10 draws
            for _ in range(10):
                crop = label[top: top + ch, left: left + cw]
                _, cnt = np.unique(crop[crop != IGNORE_INDEX], return_counts=True)
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return top, left

    def __getitem__(self, i: int):
        img_path, label_path = self.files[i]
        img = _load_rgb(img_path)
        label = _load_label(label_path)
        if (img.size[1], img.size[0]) != label.shape:
            raise DataLayoutError(f"{img_path} is {img.size[0]}×{img.size[1]} but {label_path} is "
                                  f"{label.shape[1]}×{label.shape[0]}")
        if self.image_fn is not None:
            from PIL import Image

            raw = np.asarray(img)
            out = np.asarray(self.image_fn(raw, int(i)))
            if out.shape != raw.shape or out.dtype != np.uint8:
                raise ValueError(f"image_fn changed {img_path} from uint8 {raw.shape} to {out.dtype} {out.shape}")
            img = Image.fromarray(np.ascontiguousarray(out))
        if not self.train:
            return self._normalise(np.asarray(img)), torch.from_numpy(label.astype(np.int64))
        from PIL import Image

        lo, hi = self.scale_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        w0, h0 = img.size
        nw, nh = max(1, int(w0 * ratio + 0.5)), max(1, int(h0 * ratio + 0.5))
        if (nw, nh) != (w0, h0):
            img = img.resize((nw, nh), Image.BILINEAR)
            label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        img = np.asarray(img)
        top, left = self._random_crop_box(label)
        ch, cw = self.crop_size
        img = img[top: top + ch, left: left + cw]
        label = label[top: top + ch, left: left + cw]
        if self.flip and bool(torch.rand(()) < 0.5):
            img, label = img[:, ::-1], label[:, ::-1]
        x = self._normalise(img)
        y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        ph, pw = ch - y.shape[0], cw - y.shape[1]
        if ph > 0 or pw > 0:  # smaller than the crop: pad bottom/right (image 0 after normalisation, labels 255)
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
            y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        return x, y


# ------------------------------------------------------------------------------------------------ plugin
@DATASETS.register("cityscapes")
class Cityscapes(DatasetPlugin):
    """Cityscapes (fine annotations), 19 train ids. Options: see :meth:`build`."""

    task = "segmentation"
    layout = LAYOUT

    def check(self, root, **options):
        _check_options(**options)
        if root is None:
            raise DataLayoutError(f"data.root is required for cityscapes. Expected layout: {LAYOUT}")
        root = Path(root)
        if options.get("synthetic") is not None and not (root / "leftImg8bit").exists():
            return  # written by build()
        for split in ("train", "val"):
            for top in ("leftImg8bit", "gtFine"):
                if not (root / top / split).is_dir():
                    raise DataLayoutError(f"no folder {root / top / split}. Expected layout: {LAYOUT}{NOT_FOUND_HINT}")
        for split in ("train", "val"):
            _pair_files(root, split)

    def corruption_min_side(self, root, *, synthetic: dict | None = None, **options) -> int | None:
        """Images are corrupted as decoded, at their own size: with ``synthetic``, the generated
        ``height × width``; otherwise only the files know (None)."""
        if synthetic is None:
            return None
        args = {**_WRITER_SIZE, **synthetic}
        return min(int(args["height"]), int(args["width"]))

    def corruption_size_option(self, min_side, *, synthetic: dict | None = None, **options):
        if synthetic is None:
            return None
        args = {**_WRITER_SIZE, **synthetic}
        return ("synthetic.height" if int(args["height"]) <= int(args["width"]) else "synthetic.width"), int(min_side)

    def build(self, root=None, *, crop_size: int | list = 512, scale_range: list = (0.5, 2.0), flip: bool = True,
              cat_max_ratio: float = 0.75, synthetic: dict | None = None) -> SegmentationData:
        """``crop_size``: training crop (int or ``[h, w]``); ``scale_range``: random rescale ratios;
        ``flip``: random horizontal flip; ``cat_max_ratio``: mmseg's crop rule (1.0 = off); ``synthetic``:
        :func:`write_cityscapes` arguments to generate ROOT when it holds no dataset (see the module doc)."""
        _check_options(crop_size, scale_range, flip, cat_max_ratio, synthetic)
        if root is None:
            raise DataLayoutError(f"data.root is required for cityscapes. Expected layout: {LAYOUT}")
        root = Path(root)
        if synthetic is not None:
            ensure_synthetic(root, synthetic)
        train_files, val_files = _pair_files(root, "train"), _pair_files(root, "val")
        opts = dict(crop_size=_crop_hw(crop_size), scale_range=scale_range, flip=flip, cat_max_ratio=cat_max_ratio)
        train = CityscapesSegmentation(train_files, train=True, **opts)
        val = CityscapesSegmentation(val_files, train=False, **opts)
        return SegmentationData(train, val, num_classes=len(CLASSES), in_chans=3, classes=list(CLASSES),
                                crop_size=_crop_hw(crop_size))


# ------------------------------------------------------------------------------------------------ writer
def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A street-like label-id map ``h×w`` (uint8 Cityscapes label ids)."""
    ids = np.full((h, w), NAME_TO_ID["sky"], dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.35, 0.5))
    # buildings: blocks of random width and height standing on the horizon
    x = 0
    while x < w:
        bw = int(rng.integers(max(2, w // 10), max(3, w // 4)))
        top = int(horizon - rng.uniform(0.15, 0.35) * h)
        kind = "building" if rng.random() < 0.75 else "vegetation"
        ids[max(0, top):horizon, x:x + bw] = NAME_TO_ID[kind]
        x += bw
    # ground: sidewalk strip below the horizon, road as a trapezoid towards the bottom, terrain at the sides
    ids[horizon:, :] = NAME_TO_ID["sidewalk"]
    centre = w / 2 + rng.uniform(-0.1, 0.1) * w
    half = (yy - horizon) / max(1, h - horizon) * w * rng.uniform(0.45, 0.7) + w * 0.05
    road = (yy >= horizon + max(1, h // 16)) & (np.abs(xx - centre) <= half)
    ids[road] = NAME_TO_ID["road"]
    side = (yy >= horizon) & (np.abs(xx - centre) > half + w * 0.12)
    ids[side & (rng.random() < 0.5)] = NAME_TO_ID["terrain"] if rng.random() < 0.5 else NAME_TO_ID["sidewalk"]
    # poles with traffic signs on the sidewalk
    for _ in range(int(rng.integers(1, 3))):
        px = int(rng.integers(0, w - 2))
        pw = max(1, w // 64)
        ptop = int(horizon - rng.uniform(0.1, 0.25) * h)
        pbot = min(h, horizon + int(rng.integers(1, max(2, h // 8))))
        ids[max(0, ptop):pbot, px:px + pw] = NAME_TO_ID["pole"]
        s = max(2, h // 16)
        ids[max(0, ptop - s):max(0, ptop), max(0, px - s // 2):px + pw + s // 2] = NAME_TO_ID["traffic sign"]
    # cars on the road, people on the sidewalk
    for _ in range(int(rng.integers(1, 4))):
        cy = int(rng.integers(horizon + h // 10, h - h // 8))
        ch = max(3, int((cy - horizon) / max(1, h - horizon) * h * 0.3) + 2)
        cw = int(ch * rng.uniform(1.4, 2.2))
        cx = int(np.clip(centre + rng.uniform(-1, 1) * half[min(cy, h - 1), 0], 0, w - cw))
        ids[max(0, cy - ch):cy, cx:cx + cw] = NAME_TO_ID["car"]
    for _ in range(int(rng.integers(1, 4))):
        py = int(rng.integers(horizon + 2, h - 2))
        ph = max(4, int((py - horizon) / max(1, h - horizon) * h * 0.35) + 3)
        pw = max(2, ph // 3)
        px = int(rng.integers(0, w - pw))
        ids[max(0, py - ph):py, px:px + pw] = NAME_TO_ID["person"]
    # void: the ego vehicle's bonnet at the bottom and a few unlabeled blobs (train id 255)
    ids[h - max(1, h // 16):, :] = NAME_TO_ID["ego vehicle"]
    for _ in range(int(rng.integers(0, 3))):
        by, bx = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
        ids[by:by + max(2, h // 20), bx:bx + max(2, w // 30)] = NAME_TO_ID["unlabeled"]
    return ids


def _render(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """An RGB image for a label-id map: each class its Cityscapes colour (dark grey for void) jittered per image
    (cars: any colour), a class-specific stripe texture, per-image illumination and pixel noise, so classes are
    learnable from local appearance, shape and context but not from colour alone."""
    h, w = ids.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), dtype=np.float32)
    light = rng.uniform(0.75, 1.2)
    for name, lid, _, color in LABELS:
        m = ids == lid
        if not m.any():
            continue
        base = np.array(color if color != (0, 0, 0) else (30, 30, 30), dtype=np.float32)
        if name == "car":  # cars come in any colour: they must be told by shape and context
            base = rng.uniform(20, 235, size=3).astype(np.float32)
        else:  # per-image colour jitter of every class
            base = base + rng.normal(0, 20, size=3).astype(np.float32)
        k = 2 * np.pi * (1 + lid % 5) / 12.0
        texture = 18.0 * np.sin(k * (xx if lid % 2 else yy) + lid)[..., None]
        img[m] = base + texture[m]
    img = img * light + rng.normal(0, 10, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cityscapes(root: str | os.PathLike, n_train: int = 8, n_val: int = 4, height: int = 64, width: int = 128,
                     seed: int = 0, train_cities: Sequence[str] = ("aachen", "bremen"),
                     val_cities: Sequence[str] = ("frankfurt",)) -> Path:
    """Write a small street-scene dataset in the exact Cityscapes layout under ``root`` and return ``root``.

    Files per image: ``leftImg8bit/<split>/<city>/<city>_<seq:06d>_000019_leftImg8bit.png`` (RGB),
    ``gtFine/<split>/<city>/<city>_<seq:06d>_000019_gtFine_labelIds.png`` (8-bit label ids) and
    ``..._gtFine_color.png`` (the official colours). Every image holds road, sidewalk, building, sky, pole,
    traffic sign, car and person pixels (plus vegetation/terrain most of the time) and void pixels (ids 0
    and 1, train id 255). Deterministic in ``seed``.
    """
    from PIL import Image

    if n_train < 1 or n_val < 1 or height < 16 or width < 16:
        raise ValueError(f"write_cityscapes: need n_train, n_val >= 1 and height, width >= 16; got {n_train}, "
                         f"{n_val}, {height}, {width}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for _, lid, _, color in LABELS:
        palette[lid] = color
    for split, n, cities in (("train", n_train, train_cities), ("val", n_val, val_cities)):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            ids = _scene(rng, height, width)
            img = _render(rng, ids)
            for top in ("leftImg8bit", "gtFine"):
                (root / top / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="RGB").save(root / "leftImg8bit" / split / city / f"{stem}{IMG_SUFFIX}")
            Image.fromarray(ids, mode="L").save(root / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}")
            Image.fromarray(palette[ids], mode="RGB").save(root / "gtFine" / split / city / f"{stem}{COLOR_SUFFIX}")
    return root


#: the image size :func:`write_cityscapes` writes by default
_WRITER_SIZE = {k: inspect.signature(write_cityscapes).parameters[k].default for k in ("height", "width")}


def ensure_synthetic(root: str | os.PathLike, args: dict) -> Path:
    """Write ``write_cityscapes(root, **args)`` unless ROOT already holds it (checked by the marker file).

    Safe against concurrent runs (file lock next to ROOT; written to a temporary folder, then renamed).
    A ROOT holding a dataset kdbench did not generate, or one generated with other arguments, is an error.
    """
    import fcntl

    root = Path(root)
    want = json.loads(json.dumps(dict(args), sort_keys=True, default=list))
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            marker = root / SYNTHETIC_MARKER
            if marker.is_file():
                have = json.loads(marker.read_text())
                if have != want:
                    raise DataLayoutError(f"{root} was generated with synthetic={have}, the suite asks for {want}; "
                                          "delete it or point data.root elsewhere")
                return root
            if root.exists() and any(root.iterdir()):
                raise DataLayoutError(f"{root} is not empty and holds no {SYNTHETIC_MARKER}: it is not a dataset "
                                      "kdbench generated; remove data.synthetic to read it, or choose another root")
            tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            write_cityscapes(tmp, **args)
            (tmp / SYNTHETIC_MARKER).write_text(json.dumps(want, indent=2, sort_keys=True))
            if root.exists():
                root.rmdir()
            os.replace(tmp, root)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return root
