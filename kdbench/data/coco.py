"""COCO detection through pycocotools (``annotations/instances_<split>.json`` + ``<split>/`` images), and a
writer of small generated datasets in exactly that format (``write_coco_shapes``, plugin ``coco_shapes``).

Pipeline (decisions not settled by docs/architecture.md or docs/methods.md):

* **Resize** as torchvision's ``GeneralizedRCNNTransform`` and mmdet's ``Resize(keep_ratio=True)``: scale
  ``s = min(min_size / short side, max_size / long side)``, size ``round(h·s) × round(w·s)``, bilinear with
  antialias; boxes scaled by the realised ratios. ``min_size``/``max_size`` are *data* options
  (``data: {min_size: 800, max_size: 1333}``, the 1333×800 of the papers), applied once, so teacher and
  student see exactly the same batch (the models' own transforms are bypassed, see ``kdbench.models.detection``).
* **Flip**: horizontal with probability ``flip_prob`` (0.5) on training images only, from the global torch RNG
  (the training loop reseeds it per epoch: augmentation is reproducible and resumable).
* **Normalisation**: ImageNet mean/std on [0, 1] RGB (torchvision's detectors and mmdet's configs).
* **Batching**: images padded at the bottom/right to a common size, a multiple of 32 (torchvision's
  ``size_divisible``), into an ``ImageList`` that keeps every image's own size.
* **Annotations**: training drops ``iscrowd=1`` boxes and boxes under 1 px wide/high (mmdet ignores crowd boxes,
  as torchvision's references do), and drops images left without boxes (mmdet ``filter_empty_gt``).
  Validation keeps every image; COCOeval reads the original json (crowd regions included).
* **Labels**: ``label_mode: contiguous`` (default, mmdet): category ``k``-th by id -> label ``k+1``, 0 is the
  background, the model has K+1 classes. ``label_mode: category_id``: label = COCO category id, the model has
  ``max id + 1`` classes (91 for COCO): what torchvision's COCO checkpoints predict, so they load as teachers.
* **Subsets**: ``max_train_images`` / ``max_val_images`` keep the first N images by id (deterministic).
* **Checks**: ``check`` (run by ``validate``) reads each annotation file's first bytes and, up to
  :data:`CHECK_JSON_BYTES`, parses it and checks the top-level ``images``, ``annotations`` and ``categories``
  lists; ``build`` checks every image entry (file name, positive integer size), category (integer id, name) and
  annotation (integer ids, ``bbox`` of 4 finite numbers with non-negative size, numeric ``area``). Annotations
  that name an image id missing from ``images`` or a category id missing from ``categories`` are ignored, with
  one warning per file giving their count. An image that cannot be decoded, or whose size differs from the
  annotation, is an error naming the file when it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdbench.data.base import NOT_FOUND_HINT, DataFileError, DataLayoutError, DatasetPlugin
from kdbench.registry import DATASETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32
LAYOUT = ("ROOT/annotations/instances_<split>.json and ROOT/<split>/<file_name> for the train and val splits "
          "(COCO 2017: train2017, val2017)")
LABEL_MODES = ("contiguous", "category_id")
#: ``check`` parses an annotation file up to this size (COCO's val2017, 25 MB, included; train2017, 448 MB, is
#: parsed by ``build`` only)
CHECK_JSON_BYTES = 64 << 20
_EXPECTED_JSON = ("a COCO instances json (a mapping with the lists images, annotations and categories, as the "
                  "official instances_<split>.json)")
_JSON_TOP = ("images", "annotations", "categories")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_top_level(ds, ann_file: Path) -> None:
    """The top level of a parsed annotation file: a mapping with the lists ``images``, ``annotations`` and
    ``categories``, at least one category, each an integer ``id`` with a ``name``."""
    if not isinstance(ds, dict):
        raise DataFileError(f"{ann_file} holds a json {type(ds).__name__}; expected {_EXPECTED_JSON}")
    for key in _JSON_TOP:
        if not isinstance(ds.get(key), list):
            found = "missing" if key not in ds else f"a {type(ds[key]).__name__}"
            raise DataFileError(f"{ann_file}: top-level key '{key}' is {found}, expected a list; expected "
                                f"{_EXPECTED_JSON}")
    if not ds["categories"]:
        raise DataFileError(f"{ann_file}: 'categories' is empty; expected at least one {{id, name}} category")
    for k, cat in enumerate(ds["categories"]):
        if not isinstance(cat, dict) or not _int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataFileError(f"{ann_file}: categories[{k}] is {cat!r}; expected {{id: integer, name: string}}")


def _check_annotation_file(ann_file: Path) -> None:
    """``check``'s look at an annotation file: readable, not empty, a json object; parsed and its top level
    checked when it is at most :data:`CHECK_JSON_BYTES`."""
    try:
        size = ann_file.stat().st_size
        with open(ann_file, "rb") as f:
            head = f.read(64).lstrip()
            f.seek(0)
            ds = json.load(f) if size <= CHECK_JSON_BYTES else None
    except OSError as e:
        raise DataFileError(f"cannot read {ann_file}: {e.strerror or e}; expected {_EXPECTED_JSON}") from None
    except (ValueError, UnicodeDecodeError) as e:
        what = "empty" if size == 0 else f"not valid json ({type(e).__name__}: {e})"
        raise DataFileError(f"{ann_file} is {what}; expected {_EXPECTED_JSON}") from None
    if not head.startswith(b"{"):
        what = "empty" if size == 0 else f"not a json object (it starts with {head[:12]!r})"
        raise DataFileError(f"{ann_file} is {what}; expected {_EXPECTED_JSON}")
    if ds is not None:
        _check_top_level(ds, ann_file)


def _check_entries(coco, ann_file: Path) -> None:
    """Every image entry (file name, positive integer size) and annotation (integer ids, 4-number ``bbox`` of
    non-negative size, numeric ``area``) of a loaded file; annotations naming an image or category the file does
    not declare are counted and ignored, with one warning."""
    for img_id, info in coco.imgs.items():
        sizes_ok = all(_int(info.get(k)) and info[k] > 0 for k in ("height", "width"))
        if not isinstance(info.get("file_name"), str) or not sizes_ok:
            got = {k: info.get(k) for k in ("file_name", "height", "width")}
            raise DataFileError(f"{ann_file}: image {img_id} needs file_name and positive integer height and width, "
                                f"got {got}")
    no_image, no_cat = [], []
    for a in coco.dataset["annotations"]:
        box = a.get("bbox")
        ok = (_int(a.get("image_id")) and _int(a.get("category_id")) and _number(a.get("area"))
              and isinstance(box, (list, tuple)) and len(box) == 4 and all(_number(v) for v in box)
              and box[2] >= 0 and box[3] >= 0)
        if not ok:
            got = {k: a.get(k) for k in ("image_id", "category_id", "bbox", "area")}
            raise DataFileError(f"{ann_file}: annotation {a.get('id')!r} has {got}; expected integer image_id and "
                                "category_id, bbox [x, y, width, height] of 4 numbers (width, height >= 0) and a "
                                "numeric area")
        if a["image_id"] not in coco.imgs:
            no_image.append(a)
        elif a["category_id"] not in coco.cats:
            no_cat.append(a)
    if no_image or no_cat:
        parts = []
        if no_image:
            parts.append(f"{len(no_image)} name an image id missing from 'images' (first: annotation "
                         f"{no_image[0].get('id')!r}, image_id {no_image[0]['image_id']})")
        if no_cat:
            parts.append(f"{len(no_cat)} a category id missing from 'categories' (first: annotation "
                         f"{no_cat[0].get('id')!r}, category_id {no_cat[0]['category_id']})")
        warnings.warn(f"{ann_file}: {len(no_image) + len(no_cat)} of {len(coco.dataset['annotations'])} annotations "
                      f"are ignored: {'; '.join(parts)}", stacklevel=3)


def _quiet_coco(ann_file: Path):
    """The pycocotools ``COCO`` index of ``ann_file``, its content checked (:func:`_check_top_level`,
    :func:`_check_entries`); any problem is one line naming the file."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except OSError as e:
        raise DataFileError(f"cannot read {ann_file}: {e.strerror or e}; expected {_EXPECTED_JSON}") from None
    except (ValueError, AssertionError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{ann_file} is not a COCO annotation file ({type(e).__name__}: {e}); "
                            f"expected {_EXPECTED_JSON}") from None
    _check_top_level(coco.dataset, ann_file)
    _check_entries(coco, ann_file)
    return coco


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of the keep-ratio resize: short side to ``min_size`` unless the long side would pass
    ``max_size``."""
    s = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def _read_image(path: Path, expected_hw: tuple[int, int] | None = None, ann_file: Path | None = None) -> torch.Tensor:
    """uint8 ``3×H×W`` RGB (PIL decodes: torchvision's image io is deprecated).

    An unreadable or undecodable file, or (given ``expected_hw``, the ``(height, width)`` of the annotation file
    ``ann_file``) a decoded size other than the annotated one, is a :class:`DataFileError` naming the file: the
    boxes are in the annotated pixel grid, so another size would scale them by the wrong ratio.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataFileError(f"image {path} listed in {ann_file or 'the annotation file'} does not exist: restore it "
                            "or remove the image from the annotation file") from None
    except IsADirectoryError:
        raise DataFileError(f"image {path} listed in {ann_file or 'the annotation file'} is a folder; expected an "
                            "image file") from None
    except PermissionError as e:
        raise DataFileError(f"cannot read image {path}: {e.strerror or e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataFileError(f"cannot decode image {path} ({type(e).__name__}: {e}): the file is truncated or "
                            "corrupt; replace it with a good copy") from None
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(int(v) for v in expected_hw):
        (h, w), (eh, ew) = arr.shape[:2], expected_hw
        raise DataFileError(f"image {path} is {w}×{h} (width×height) but {ann_file or 'its annotation file'} says "
                            f"{ew}×{eh}: its boxes would be scaled by the wrong ratio; use the original image or fix "
                            "width/height (and the boxes) in the annotation file")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class CocoDetection(Dataset):
    """One split. ``dataset[i] -> (image 3×h×w float normalised, target)``; ``target`` holds ``boxes`` (``K×4``
    xyxy in the resized image), ``labels`` (int64), ``image_id``, ``orig_size`` and ``size`` (``(h, w)``) and
    ``scale`` (``(s_y, s_x)``: resized / original)."""

    def __init__(self, root: str | os.PathLike, split: str, *, train: bool, min_size: int, max_size: int,
                 flip_prob: float = 0.5, label_mode: str = "contiguous", max_images: int | None = None,
                 image_fn=None):
        self.image_fn = image_fn  # fn(H×W×3 uint8, COCO image id) -> same size, before resizing (corruptions)
        self.root = Path(root)
        self.split = split
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.img_dir = self.root / split
        self.coco = _quiet_coco(self.ann_file)
        self.train = bool(train)
        self.min_size, self.max_size, self.flip_prob = int(min_size), int(max_size), float(flip_prob)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_mode = label_mode
        if label_mode == "contiguous":
            self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        else:
            self.cat_to_label = {c: int(c) for c in self.cat_ids}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        ids = sorted(self.coco.getImgIds())
        if self.train:
            ids = [i for i in ids if self._annotations(i)[0].shape[0] > 0]
        if max_images is not None:
            ids = ids[: int(max_images)]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, img_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes (xyxy, original pixels) and labels of one image: crowd and < 1 px boxes dropped."""
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        boxes, labels = [], []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0) or a["category_id"] not in self.cat_to_label:
                continue
            x, y, bw, bh = a["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_to_label[a["category_id"]])
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        img = _read_image(self.img_dir / info["file_name"], (info["height"], info["width"]), self.ann_file)
        h, w = int(img.shape[1]), int(img.shape[2])
        if self.image_fn is not None:  # boxes stay valid: the image keeps its size
            out = np.asarray(self.image_fn(img.permute(1, 2, 0).numpy(), int(img_id)))
            if out.shape != (h, w, 3) or out.dtype != np.uint8:
                raise ValueError(f"image_fn changed image {img_id} from uint8 {(h, w, 3)} to {out.dtype} {out.shape}")
            img = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
        nh, nw = resized_size(h, w, self.min_size, self.max_size)
        img = TF.resize(img, [nh, nw], antialias=True).float().div_(255.0)
        boxes, labels = self._annotations(img_id)
        boxes = torch.from_numpy(boxes)
        sy, sx = nh / h, nw / w
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        if self.train and self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob):
            img = img.flip(-1)
            boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        img = (img - mean) / std
        target = {"boxes": boxes.float(), "labels": torch.from_numpy(labels), "image_id": int(img_id),
                  "orig_size": (h, w), "size": (nh, nw), "scale": (sy, sx)}
        return img, target


def collate_detection(batch):
    """``[(image, target)] -> (ImageList, [target])``: images zero-padded bottom/right to a common size, a
    multiple of 32. Padding is 0 after normalisation (the mean colour), as torchvision's ``batch_images``."""
    from torchvision.models.detection.image_list import ImageList

    imgs = [b[0] for b in batch]
    hmax = max(int(im.shape[1]) for im in imgs)
    wmax = max(int(im.shape[2]) for im in imgs)
    hp = (hmax + SIZE_DIVISIBLE - 1) // SIZE_DIVISIBLE * SIZE_DIVISIBLE
    wp = (wmax + SIZE_DIVISIBLE - 1) // SIZE_DIVISIBLE * SIZE_DIVISIBLE
    out = imgs[0].new_zeros(len(imgs), imgs[0].shape[0], hp, wp)
    for k, im in enumerate(imgs):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    return ImageList(out, [(int(im.shape[1]), int(im.shape[2])) for im in imgs]), [b[1] for b in batch]


@dataclass
class DetectionData:
    train: CocoDetection
    val: CocoDetection
    num_classes: int  # object classes K
    model_num_classes: int  # classes of the detector's head, background 0 included
    classes: list[str]
    cat_ids: list[int]
    label_mode: str
    in_chans: int = 3
    options: dict = field(default_factory=dict)


def _check_options(min_size, max_size, flip_prob, label_mode, max_train_images, max_val_images) -> None:
    if int(min_size) < 16 or int(max_size) < int(min_size):
        raise ValueError(f"data.min_size must be >= 16 and data.max_size >= min_size, got {min_size}, {max_size}")
    if not 0 <= float(flip_prob) <= 1:
        raise ValueError(f"data.flip_prob must be in [0, 1], got {flip_prob}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"data.label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
    for k, v in (("max_train_images", max_train_images), ("max_val_images", max_val_images)):
        if v is not None and int(v) < 1:
            raise ValueError(f"data.{k} must be a positive integer or null, got {v}")


def _check_layout(root, train_split: str, val_split: str, files: bool = False) -> Path:
    """The layout under ``root``; with ``files``, each annotation file's look (:func:`_check_annotation_file`)."""
    if root is None:
        raise DataLayoutError(f"data.root is required for coco. Expected layout: {LAYOUT}")
    root = Path(root)
    missing = []
    for split in (train_split, val_split):
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            missing.append(str(ann) + (" (a folder, expected a json file)" if ann.is_dir() else ""))
        if not (root / split).is_dir():
            missing.append(str(root / split) + "/")
    if missing:
        raise DataLayoutError(f"COCO not found at {root}: missing {', '.join(missing)}. Expected layout: {LAYOUT}"
                              f"{NOT_FOUND_HINT}")
    if files:
        for split in dict.fromkeys((train_split, val_split)):
            _check_annotation_file(root / "annotations" / f"instances_{split}.json")
    return root


@DATASETS.register("coco")
class Coco(DatasetPlugin):
    task = "detection"
    layout = LAYOUT

    def check(self, root, **options):
        opts = {**self.option_defaults(), **options}
        _check_options(opts["min_size"], opts["max_size"], opts["flip_prob"], opts["label_mode"],
                       opts["max_train_images"], opts["max_val_images"])
        _check_layout(root, opts["train_split"], opts["val_split"], files=True)

    def build(self, root=None, *, train_split: str = "train2017", val_split: str = "val2017", min_size: int = 800,
              max_size: int = 1333, flip_prob: float = 0.5, label_mode: str = "contiguous",
              max_train_images: int | None = None, max_val_images: int | None = None) -> DetectionData:
        _check_options(min_size, max_size, flip_prob, label_mode, max_train_images, max_val_images)
        root = _check_layout(root, train_split, val_split)
        common = dict(min_size=min_size, max_size=max_size, label_mode=label_mode)
        train = CocoDetection(root, train_split, train=True, flip_prob=flip_prob, max_images=max_train_images, **common)
        val = CocoDetection(root, val_split, train=False, flip_prob=0.0, max_images=max_val_images, **common)
        if train.cat_ids != val.cat_ids:
            raise ValueError(f"{root}: the train and val annotation files list different categories")
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"{root}: no usable images (train {len(train)}, val {len(val)})")
        cats = train.coco.loadCats(train.cat_ids)
        n_model = len(train.cat_ids) + 1 if label_mode == "contiguous" else max(train.cat_ids) + 1
        return DetectionData(train, val, num_classes=len(train.cat_ids), model_num_classes=n_model,
                             classes=[c["name"] for c in cats], cat_ids=list(train.cat_ids), label_mode=label_mode,
                             options={"min_size": min_size, "max_size": max_size})


# ----------------------------------------------------------------------------------------------------------------
# generated data in the exact COCO format
# ----------------------------------------------------------------------------------------------------------------
# category ids deliberately not contiguous (as COCO's 1..90 with gaps), so the label mapping is exercised
SHAPE_CATEGORIES = ((1, "square"), (2, "disk"), (4, "triangle"), (7, "cross"))


def _shape_polygon(kind: str, cx: float, cy: float, w: float, h: float) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if kind == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "disk":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return [(cx + w / 2 * np.cos(a), cy + h / 2 * np.sin(a)) for a in t]
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "cross":
        a, b = w / 6, h / 6
        return [(cx - a, y0), (cx + a, y0), (cx + a, cy - b), (x1, cy - b), (x1, cy + b), (cx + a, cy + b),
                (cx + a, y1), (cx - a, y1), (cx - a, cy + b), (x0, cy + b), (x0, cy - b), (cx - a, cy - b)]
    raise ValueError(kind)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def _render_split(out: Path, split: str, n: int, rng: np.random.Generator, *, height: tuple[int, int],
                  width: tuple[int, int], max_objects: int, object_size: tuple[int, int], first_ann: int) -> dict:
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = first_ann
    for k in range(n):
        img_id = k + 1
        h = int(rng.integers(height[0], height[1] + 1))
        w = int(rng.integers(width[0], width[1] + 1))
        # background: a smooth random gradient plus noise
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(70, 180, size=3)
        grad = rng.uniform(-40, 40, size=(2, 3))
        bg = base + (yy / h)[..., None] * grad[0] + (xx / w)[..., None] * grad[1]
        bg = bg + rng.normal(0, 10, size=(h, w, 3))
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        placed: list[list[float]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _try in range(30):
                cat_id, kind = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
                size = float(np.exp(rng.uniform(np.log(object_size[0]), np.log(min(object_size[1], 0.8 * min(h, w))))))
                ar = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
                bw, bh = size * np.sqrt(ar), size / np.sqrt(ar)
                if bw >= w - 2 or bh >= h - 2:
                    continue
                cx = float(rng.uniform(bw / 2 + 1, w - bw / 2 - 1))
                cy = float(rng.uniform(bh / 2 + 1, h - bh / 2 - 1))
                box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
                if all(_iou(box, p) < 0.15 for p in placed):
                    break
            else:
                continue
            placed.append(box)
            color = rng.uniform(0, 255, size=3)
            while np.abs(color - base).mean() < 60:
                color = rng.uniform(0, 255, size=3)
            poly = _shape_polygon(kind, cx, cy, bw, bh)
            draw.polygon(poly, fill=tuple(int(c) for c in color))
            flat = [round(float(v), 2) for xy in poly for v in xy]
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
            x, y, bw_, bh_ = (float(v) for v in mask_utils.toBbox(rle))
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat_id, "segmentation": [flat],
                         "area": float(mask_utils.area(rle)), "bbox": [round(x, 2), round(y, 2), round(bw_, 2),
                                                                       round(bh_, 2)], "iscrowd": 0})
            ann_id += 1
        name = f"{img_id:012d}.jpg"
        img.save(img_dir / name, quality=92)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w, "license": 1,
                       "date_captured": "2026-01-01 00:00:00", "coco_url": "", "flickr_url": ""})
    return {
        "info": {"description": f"kdbench generated shapes ({split})", "version": "1.0", "year": 2026,
                 "contributor": "kdbench", "date_created": "2026-01-01"},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": nm, "supercategory": "shape"} for c, nm in SHAPE_CATEGORIES],
    }


def write_coco_shapes(root: str | os.PathLike, n_train: int = 64, n_val: int = 16, *, seed: int = 0,
                      height: tuple[int, int] = (192, 256), width: tuple[int, int] = (224, 320), max_objects: int = 4,
                      object_size: tuple[int, int] = (24, 128), splits: tuple[str, str] = ("train2017", "val2017")
                      ) -> Path:
    """Write a small detection dataset in the exact COCO layout under ``root`` and return ``root``.

    ``root/annotations/instances_<split>.json`` (info, licenses, images, annotations with polygon
    ``segmentation``, ``area`` (mask area through pycocotools), ``bbox`` (xywh of the mask), ``iscrowd: 0``,
    categories with non-contiguous ids) and ``root/<split>/<12-digit id>.jpg``. Each image (size drawn in
    ``height`` × ``width``) has 1 to ``max_objects`` filled shapes of 4 classes (square, disk, triangle, cross;
    random colours contrasting with the background, sizes log-uniform in ``object_size`` px, overlaps IoU < 0.15)
    on a noisy gradient background. Deterministic given ``seed``; each split has its own random stream, so the
    validation images do not depend on ``n_train`` and a larger ``n_train`` extends a smaller one.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(zip(splits, (n_train, n_val))):
        rng = np.random.default_rng([int(seed), k])  # one stream per split: val does not depend on n_train
        d = _render_split(root, split, int(n), rng, height=height, width=width, max_objects=max_objects,
                          object_size=object_size, first_ann=1 + k * 10_000_000)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    return root


@DATASETS.register("coco_shapes")
class CocoShapes(Coco):
    """Generated shapes in the COCO format (:func:`write_coco_shapes`), written on first use under
    ``root/shapes-<n_train>-<n_val>-<image_size>-<seed>`` (default root ``data/coco_shapes``) and read back
    through the COCO loader. Needs no download; used by the detection quickstart and the tests."""

    needs_root = False
    layout = "(generated on first use under ROOT/shapes-<n_train>-<n_val>-<image_size>-<seed>/ in the COCO layout)"

    def check(self, root, **options):
        """The options; and, once the dataset has been generated, its annotation files (as ``coco``'s check)."""
        opts = {**self.option_defaults(), **options}
        _check_options(opts["min_size"], opts["max_size"], opts["flip_prob"], opts["label_mode"],
                       opts["max_train_images"], opts["max_val_images"])
        if int(opts["n_train"]) < 1 or int(opts["n_val"]) < 1:
            raise ValueError(f"data.n_train and data.n_val must be >= 1, got {opts['n_train']}, {opts['n_val']}")
        if int(opts["image_size"]) < 32:
            raise ValueError(f"data.image_size must be >= 32, got {opts['image_size']}")
        folder = self.folder(root, **opts)
        if (folder / "annotations" / "instances_val2017.json").is_file():
            _check_layout(folder, "train2017", "val2017", files=True)

    @staticmethod
    def folder(root, *, n_train: int = 64, n_val: int = 16, seed: int = 0, image_size: int = 256, **options) -> Path:
        """Where the dataset of these options is generated: ``root/shapes-<n_train>-<n_val>-<image_size>-<seed>``
        (root ``data/coco_shapes`` when None)."""
        return (Path(root if root is not None else "data/coco_shapes")
                / f"shapes-{int(n_train)}-{int(n_val)}-{int(image_size)}-{int(seed)}")

    def corruption_min_side(self, root, *, image_size: int = 256, **options) -> int:
        """``image_size`` S generates images of ``[0.75·S, S] × [0.9·S, 1.25·S]`` (h × w, see :meth:`build`),
        corrupted as decoded (before the ``min_size``/``max_size`` resize): the smallest side an image can have is
        the smallest height, ``S * 3 // 4``."""
        return int(image_size) * 3 // 4

    def corruption_size_option(self, min_side: int, **options):
        return "image_size", -(-4 * int(min_side) // 3)  # the smallest S with S * 3 // 4 >= min_side

    def build(self, root=None, *, n_train: int = 64, n_val: int = 16, seed: int = 0, image_size: int = 256,
              min_size: int = 128, max_size: int = 224, flip_prob: float = 0.5, label_mode: str = "contiguous",
              max_train_images: int | None = None, max_val_images: int | None = None) -> DetectionData:
        """``image_size`` S: generated images are ``[0.75·S, S] × [0.9·S, 1.25·S]`` (h × w) with objects of
        ``S/8`` to ``S/2`` px; they are then resized by ``min_size``/``max_size`` as any COCO image."""
        self.check(root, n_train=n_train, n_val=n_val, seed=seed, image_size=image_size, min_size=min_size,
                   max_size=max_size, flip_prob=flip_prob, label_mode=label_mode, max_train_images=max_train_images,
                   max_val_images=max_val_images)
        s = int(image_size)
        folder = self.folder(root, n_train=n_train, n_val=n_val, seed=seed, image_size=s)
        if not (folder / "annotations" / "instances_val2017.json").is_file():
            import fcntl

            folder.parent.mkdir(parents=True, exist_ok=True)
            with open(folder.parent / f".{folder.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (folder / "annotations" / "instances_val2017.json").is_file():
                    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    write_coco_shapes(tmp, int(n_train), int(n_val), seed=int(seed), height=(s * 3 // 4, s),
                                      width=(s * 9 // 10, s * 5 // 4), object_size=(max(4, s // 8), s // 2))
                    shutil.rmtree(folder, ignore_errors=True)
                    os.replace(tmp, folder)
        return Coco.build(self, folder, min_size=min_size, max_size=max_size, flip_prob=flip_prob,
                          label_mode=label_mode, max_train_images=max_train_images, max_val_images=max_val_images)
