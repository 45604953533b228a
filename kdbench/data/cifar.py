"""CIFAR-100 from its official python pickles (``cifar-100-python/{train,test,meta}``), no download.

``root`` may be the folder that holds ``cifar-100-python/`` or that folder itself. The pickles are read as
torchvision reads them (``encoding='latin1'``), with their keys as ``bytes`` (the official Python 2 files) or
``str`` (a dict pickled by Python 3); only numpy arrays, lists, strings and numbers are unpickled. ``check`` (run
by ``validate``) refuses an empty file, a file that is not a pickle (text, json) and a truncated one (a pickle
ends with its STOP byte); ``build`` checks the content (keys, shapes, dtypes, labels). ``write_cifar100`` writes a
small dataset in exactly this format (for tests and for trying suites without the real data); it is read back
through the same loader.

The ``timm_transform`` option of ``cifar100`` replaces kdbench's own augmentation and resizing with timm's
ImageNet-style pipelines (``timm.data.create_transform``), as the OFA paper's code (OFAKD, a fork of timm's
train.py) trains CIFAR-100 students at 224 px: see :meth:`CIFAR100.build`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from kdbench.data.base import (NOT_FOUND_HINT, ClassificationData, DataFileError, DataLayoutError, DatasetPlugin, TensorImages, TorchSeeded,
                               compose, random_crop_flip, resize_to, stratified_fraction)
from kdbench.registry import DATASETS

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
LAYOUT = "ROOT/cifar-100-python/{train,test,meta} (the official 'python version' pickles of CIFAR-100)"


def _folder(root: str | os.PathLike) -> Path:
    root = Path(root)
    for cand in (root / "cifar-100-python", root):
        if all((cand / f).is_file() for f in ("train", "test", "meta")):
            return cand
    for cand in (root / "cifar-100-python", root):
        if all((cand / f).exists() for f in ("train", "test", "meta")):
            folder = next(cand / f for f in ("train", "test", "meta") if not (cand / f).is_file())
            raise DataLayoutError(f"{folder} is a folder; expected a CIFAR-100 pickle file. Expected layout: {LAYOUT}")
    missing = [f for f in ("train", "test", "meta") if not (root / "cifar-100-python" / f).is_file()]
    raise DataLayoutError(f"CIFAR-100 not found at {root}: missing {', '.join(missing)} in "
                          f"{root / 'cifar-100-python'}. Expected layout: {LAYOUT}{NOT_FOUND_HINT}")


# what the official pickles (and numpy arrays in them) need; anything else in a pickle (e.g. os.system) is refused
# instead of run: a data file must not execute code
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})
_FIX = "replace it with the file from the official cifar-100-python.tar.gz"


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR pickle never holds (not loaded)")


#: the first byte of a pickled dict: PROTO (protocol 2 and later), MARK (protocol 0), EMPTY_DICT (protocol 1)
_PICKLE_FIRST = (b"\x80", b"(", b"}")


def _check_pickle_file(path: Path) -> None:
    """The cheap part of reading a CIFAR pickle, for ``check``: the file can be opened, is not empty, starts as a
    pickled dict and ends with the pickle STOP byte (``.``), so that an empty, text, json or truncated file is
    named before anything is built."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(1)
            f.seek(max(0, size - 1))
            last = f.read(1)
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e.strerror or e}; expected a CIFAR-100 pickle. {_FIX}") from None
    if size == 0:
        raise DataFileError(f"{path} is empty; expected a CIFAR-100 pickle; {_FIX}")
    if first not in _PICKLE_FIRST:
        raise DataFileError(f"{path} is not a pickle (it starts with {first!r}: text, json?); expected a CIFAR-100 "
                            f"pickle; {_FIX}")
    if last != b".":
        raise DataFileError(f"{path} is truncated (a pickle ends with its STOP byte '.', this one with {last!r}); "
                            f"{_FIX}")


def _load(path: Path) -> dict:
    """Unpickle one CIFAR file (numpy arrays, lists, strings, numbers only) as torchvision does
    (``encoding='latin1'``); its keys are returned as ``str`` whether they were pickled as ``bytes`` (the official
    Python 2 files) or ``str``. Any failure is one line naming the file."""
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises, the message names the file
        raise DataFileError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); {_FIX}") from None
    if not isinstance(d, dict):
        raise DataFileError(f"{path} holds a {type(d).__name__}, not the dict of a CIFAR pickle; {_FIX}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _keys(d: dict) -> str:
    return ", ".join(sorted(str(k) for k in d)) or "none"


def _require(d: dict, path: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        hint = " (a CIFAR-10 batch? it has 'labels')" if "labels" in d else ""
        raise DataFileError(f"{path}: keys found {_keys(d)}; expected {', '.join(keys)}{hint}; {_FIX}")


def _split_arrays(d: dict, path: Path, num_classes: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``N×3×32×32``) and fine labels (int64 ``N``) of a train/test pickle, checked: one label per
    image, every label in ``[0, num_classes)``."""
    _require(d, path, ("data", "fine_labels"))
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d["fine_labels"])
    except (ValueError, TypeError) as e:
        raise DataFileError(f"{path}: 'data'/'fine_labels' are not arrays ({e}); {_FIX}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFileError(f"{path}: 'data' must be uint8 N×3072 (32×32 RGB planes), got {data.dtype} "
                            f"{tuple(data.shape)}; {_FIX}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(f"{path}: 'fine_labels' must be a list of integers, got {labels.dtype} "
                            f"{tuple(labels.shape)}; {_FIX}")
    if len(labels) != len(data):
        raise DataFileError(f"{path}: {len(labels)} labels for {len(data)} images; {_FIX}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataFileError(f"{path}: label {int(labels[bad[0]])} of image {int(bad[0])} (and {len(bad) - 1} more) "
                            f"is outside [0, {num_classes}); {_FIX}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _class_names(d: dict, path: Path, num_classes: int = 100) -> list[str]:
    _require(d, path, ("fine_label_names",))
    names = list(d["fine_label_names"])
    if len(names) != num_classes:
        raise DataFileError(f"{path}: {len(names)} fine_label_names, CIFAR-100 has {num_classes}; {_FIX}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


#: the keyword arguments of ``timm.data.create_transform(is_training=True)`` that ``timm_transform.train`` may
#: set (the augmentation arguments OFAKD's train.py passes), with the kinds of value accepted
TIMM_TRAIN_KEYS = {
    "scale": "a list of two numbers (the crop's area range, e.g. [0.08, 1.0])",
    "ratio": "a list of two numbers (the crop's aspect-ratio range, e.g. [0.75, 1.3333])",
    "hflip": "a probability", "vflip": "a probability",
    "color_jitter": "a number, a list of 3 or 4 numbers, or null (timm applies it only without auto_augment)",
    "auto_augment": "a timm auto-augment string (e.g. 'rand-m9-mstd0.5-inc1') or null",
    "interpolation": "a timm interpolation name ('bilinear', 'bicubic', 'random', ...)",
    "re_prob": "a probability (random erasing, after normalisation)",
    "re_mode": "a timm random-erasing mode ('const', 'rand', 'pixel')",
    "re_count": "an integer >= 1",
}
#: the keyword arguments of ``timm.data.create_transform(is_training=False)`` that ``timm_transform.eval`` may set
TIMM_EVAL_KEYS = {
    "crop_pct": "a number > 0 (resize to int(image_size / crop_pct), then centre-crop image_size)",
    "interpolation": "a timm interpolation name ('bilinear', 'bicubic', ...)",
}
TIMM_SPLITS = {"train": TIMM_TRAIN_KEYS, "eval": TIMM_EVAL_KEYS}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v, counts: tuple[int, ...]) -> bool:
    return isinstance(v, (list, tuple)) and len(v) in counts and all(_is_number(x) for x in v)


#: what each key's value must be (None where timm takes null for its default)
_TIMM_VALUE_OK = {
    "scale": lambda v: v is None or _numbers(v, (2,)),
    "ratio": lambda v: v is None or _numbers(v, (2,)),
    "hflip": lambda v: _is_number(v) and 0 <= v <= 1,
    "vflip": lambda v: _is_number(v) and 0 <= v <= 1,
    "color_jitter": lambda v: v is None or _is_number(v) or _numbers(v, (3, 4)),
    "auto_augment": lambda v: v is None or isinstance(v, str),
    "interpolation": lambda v: isinstance(v, str) and bool(v),
    "re_prob": lambda v: _is_number(v) and 0 <= v <= 1,
    "re_mode": lambda v: isinstance(v, str),
    "re_count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "crop_pct": lambda v: v is None or (_is_number(v) and v > 0),
}


def _known_keys(where: str, m, valid, what: str) -> None:
    """``m`` is a mapping whose keys are all in ``valid``, else a ValueError naming ``where``."""
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be {what}, got {type(m).__name__} {m!r}")
    bad = sorted(str(k) for k in m if k not in valid)
    if bad:
        raise ValueError(f"{where}: unknown key {bad[0]!r}; valid: {', '.join(valid)}")


def check_timm_transform(spec) -> dict[str, dict] | None:
    """The ``timm_transform`` option of ``cifar100`` checked, without torch or timm: None (not set), or
    ``{"train": {...}, "eval": {...}}`` with every split present (an absent or null split is ``{}``: timm's
    defaults). A value that is not a mapping, an unknown split or key, or a value of the wrong kind is a
    ValueError naming ``data.timm_transform...`` and what is valid. Values are handed to timm as they are (lists
    as lists); timm itself refuses what it cannot build (an unknown auto-augment string, interpolation or
    erasing mode) when the dataset is built."""
    if spec is None:
        return None
    _known_keys("data.timm_transform", spec, TIMM_SPLITS, "a mapping {train: {...}, eval: {...}}")
    out = {}
    for split, valid in TIMM_SPLITS.items():
        sub = spec.get(split)
        sub = {} if sub is None else sub
        _known_keys(f"data.timm_transform.{split}", sub, valid,
                    f"a mapping of timm.data.create_transform arguments ({', '.join(valid)})")
        for k, v in sub.items():
            if not _TIMM_VALUE_OK[k](v):
                raise ValueError(f"data.timm_transform.{split}.{k} must be {valid[k]}, got {v!r}")
        out[split] = dict(sub)
    return out


class _OnPIL:
    """``fn`` applied to a uint8 ``H×W×3`` numpy image converted to a PIL RGB image (what
    ``torchvision.datasets.CIFAR100`` hands its transform)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, arr: np.ndarray):
        from PIL import Image

        return self.fn(Image.fromarray(arr))

    def __repr__(self) -> str:
        return f"_OnPIL({self.fn!r})"


def timm_transforms(image_size: int, spec: dict[str, dict], augment: bool = True):
    """``(train, eval)`` image transforms of the ``timm_transform`` option (checked by
    :func:`check_timm_transform`): each maps a uint8 ``32×32×3`` numpy image to a normalised ``3×S×S`` float
    tensor (``S = image_size``), normalised with CIFAR-100's mean and std (as OFAKD sets them).

    ``eval``: ``timm.data.create_transform(image_size, is_training=False, crop_pct, interpolation, mean, std)``
    (resize the shorter side to ``int(S / crop_pct)``, centre-crop ``S``, to tensor, normalise). ``train``:
    ``create_transform(image_size, is_training=True, **spec['train'], mean, std)`` (random resized crop, flips,
    colour jitter or auto-augment, to tensor, normalise, random erasing), wrapped in :class:`TorchSeeded` so
    that its draws come from the global torch RNG alone; without ``augment`` the train transform is the eval
    one. A value timm refuses is a ValueError naming the option."""
    from timm.data import create_transform

    def make(split: str, is_training: bool):
        kwargs = dict(spec[split])
        for k in ("scale", "ratio"):  # timm takes tuples (it also builds tuples from lists)
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
        if isinstance(kwargs.get("color_jitter"), list):
            kwargs["color_jitter"] = tuple(kwargs["color_jitter"])
        try:
            return create_transform(int(image_size), is_training=is_training, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                                    **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever timm raises for a bad value, the message names the option
            raise ValueError(f"data.timm_transform.{split}: timm.data.create_transform refused {kwargs}: "
                             f"{type(e).__name__}: {e}") from None

    t_eval = _OnPIL(make("eval", False))
    t_train = TorchSeeded(_OnPIL(make("train", True))) if augment else t_eval
    return t_train, t_eval


@DATASETS.register("cifar100")
class CIFAR100(DatasetPlugin):
    layout = LAYOUT
    augments = "augment"  # the training split is augmented when the option is true

    def check(self, root, **options):
        check_timm_transform(options.get("timm_transform"))  # before any file is read
        if root is None:
            raise DataLayoutError(f"data.root is required for cifar100. Expected layout: {LAYOUT}")
        folder = _folder(root)
        for name in ("train", "test", "meta"):
            _check_pickle_file(folder / name)

    def corruption_min_side(self, root, **options) -> int:
        """32: the stored 32×32 images are corrupted before any resizing (``image_size``)."""
        return 32

    def build(self, root=None, *, train_fraction: float = 1.0, augment: bool = True, fraction_seed: int = 0,
              image_size: int = 32, timm_transform: dict | None = None) -> ClassificationData:
        """``image_size`` other than 32 upsamples bilinearly (e.g. 224 for timm ViT/Swin students and teachers);
        with ``augment`` the training images are padded by 4, randomly cropped back and randomly flipped (on the
        normalised 32×32 tensor, before the upsampling), drawing from the global torch RNG.

        ``timm_transform: {train: {...}, eval: {...}}`` (None: the pipeline above) makes the images with timm's
        ImageNet-style transforms instead, as OFAKD (the OFA paper's code) trains CIFAR-100 at 224 px: each
        stored 32×32 image, as a PIL image (after ``image_fn``, e.g. a corruption), goes through
        ``timm.data.create_transform(image_size, ...)`` with CIFAR-100's mean and std. ``train`` holds
        create_transform's training arguments (:data:`TIMM_TRAIN_KEYS`: scale, ratio, hflip, vflip,
        color_jitter, auto_augment, interpolation, re_prob, re_mode, re_count; unset: timm's defaults),
        ``eval`` its evaluation ones (:data:`TIMM_EVAL_KEYS`: crop_pct, interpolation): the validation split's
        transform, and the training split's when ``augment`` is false. The training transform's draws (timm's
        and torchvision's, from Python's ``random``, numpy's and torch's RNGs) are made a function of the global
        torch RNG: per image one seed is drawn from it and the three RNGs are seeded from that seed, their
        states restored afterwards (:class:`kdbench.data.base.TorchSeeded`). The same torch seed thus gives the
        same images (the training loop seeds torch per batch: reproducible and resumable), and the global
        ``random``/numpy states are left as they were. See :func:`timm_transforms`."""
        spec = check_timm_transform(timm_transform)
        folder = _folder(root)
        x_tr, ytr = _split_arrays(_load(folder / "train"), folder / "train")
        x_te, yte = _split_arrays(_load(folder / "test"), folder / "test")
        classes = _class_names(_load(folder / "meta"), folder / "meta")
        keep = stratified_fraction(ytr, float(train_fraction), seed=fraction_seed)
        if spec is not None:
            t_train, t_eval = timm_transforms(int(image_size), spec, augment=bool(augment))
            train = TensorImages(torch.from_numpy(x_tr[keep]), torch.from_numpy(ytr[keep]), CIFAR100_MEAN,
                                 CIFAR100_STD, image_transform=t_train)
            val = TensorImages(torch.from_numpy(x_te.copy()), torch.from_numpy(yte), CIFAR100_MEAN, CIFAR100_STD,
                               image_transform=t_eval)
            return ClassificationData(train, val, num_classes=100, in_chans=3, image_size=int(image_size),
                                      classes=classes)
        aug = random_crop_flip(pad=4) if augment else None
        resize = resize_to(int(image_size)) if int(image_size) != 32 else None
        t_train = compose(aug, resize)
        train = TensorImages(torch.from_numpy(x_tr[keep]), torch.from_numpy(ytr[keep]), CIFAR100_MEAN, CIFAR100_STD,
                             t_train)
        val = TensorImages(torch.from_numpy(x_te.copy()), torch.from_numpy(yte), CIFAR100_MEAN, CIFAR100_STD, resize)
        return ClassificationData(train, val, num_classes=100, in_chans=3, image_size=int(image_size), classes=classes)

    def synthetic_shape(self, *, image_size: int = 32, **options) -> tuple[int, int, int]:
        return 100, 3, int(image_size)


def write_cifar100(root: str | os.PathLike, n_train_per_class: int = 5, n_test_per_class: int = 2,
                   num_classes: int = 100, seed: int = 0) -> Path:
    """Write a small CIFAR-100-format dataset under ``root/cifar-100-python`` and return that folder.

    Each class has its own colour and stripe orientation plus noise, so the task is learnable. The pickles have
    the official keys (``data`` uint8 N×3072 row-major RGB planes, ``fine_labels``, ``coarse_labels``,
    ``filenames``, ``batch_label``; meta: ``fine_label_names``, ``coarse_label_names``).
    """
    if num_classes > 100:
        raise ValueError("CIFAR-100 has 100 classes")
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32]
    base_colors = rng.uniform(40, 215, size=(100, 3))

    def make(n_per_class: int, split: str) -> dict:
        data, labels = [], []
        for c in range(num_classes):
            angle = np.pi * (c % 10) / 10
            freq = 2 + (c // 10) % 5
            stripe = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * freq * 2 * np.pi / 32)
            for _ in range(n_per_class):
                img = base_colors[c][:, None, None] + 40 * stripe[None] + rng.normal(0, 12, size=(3, 32, 32))
                data.append(np.clip(img, 0, 255).astype(np.uint8).reshape(-1))
                labels.append(c)
        order = rng.permutation(len(labels))
        data = np.stack(data)[order]
        labels = [int(labels[i]) for i in order]
        return {b"data": data, b"fine_labels": labels, b"coarse_labels": [l // 5 for l in labels],
                b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(len(labels))],
                b"batch_label": f"{split} batch (kdbench synthetic)".encode()}

    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        with open(out / split, "wb") as f:
            pickle.dump(make(n, split), f)
    meta = {b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]}
    with open(out / "meta", "wb") as f:
        pickle.dump(meta, f)
    return out


# ------------------------------------------------------------------------------------------------ CIFAR-100-C
#: the layout of Hendrycks' released CIFAR-100-C (read with ``root:``; :func:`write_cifar100_c` writes the same
#: layout, with ImageNet-C strengths: not the released images)
C_LAYOUT = ("FOLDER/<corruption>.npy (uint8 N×32×32×3: severities 1-5 stacked, n images each, N = 5 n) and "
            "FOLDER/labels.npy (N labels), as Hendrycks' released CIFAR-100-C")
#: written by :func:`write_cifar100_c` into its folder: a folder holding it is generated, not released
GENERATED_MARK = "kdbench_generated.json"


def cifar100c_generated(folder: str | os.PathLike) -> bool:
    """Whether a CIFAR-100-C-layout folder was written by :func:`write_cifar100_c` (ImageNet-C strengths), not
    Hendrycks' released files: it holds :data:`GENERATED_MARK`."""
    return (Path(folder) / GENERATED_MARK).is_file()


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_npy(path: Path, expected: str) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped. A file that cannot be opened, is not a ``.npy`` file (text,
    json, a pickle), holds Python objects or is shorter than its header says (truncated) is one line naming the
    file and ``expected``; nothing is unpickled."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError:
                f.seek(0)
                head = f.read(12)
                what = "empty" if not head else f"not a .npy file (it starts with {head!r}, not the .npy magic)"
                raise DataFileError(f"{path} is {what}; expected {expected}") from None
            header = _NPY_HEADERS.get(version)
            if header is not None:
                try:
                    shape, _, dtype = header(f)
                except ValueError as e:
                    raise DataFileError(f"{path}: unreadable .npy header, the file is truncated or corrupt ({e}); "
                                        f"expected {expected}") from None
                if dtype.hasobject:
                    raise DataFileError(f"{path} holds Python objects (dtype {dtype}), which are not loaded; "
                                        f"expected {expected}")
                need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if size - f.tell() < need:
                    raise DataFileError(f"{path} is truncated: its header says {dtype} {tuple(shape)} ({need} bytes "
                                        f"of data), the file holds {size - f.tell()}; expected {expected}")
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e.strerror or e}; expected {expected}") from None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFileError(f"{path} is not a readable .npy array ({type(e).__name__}: {e}); expected "
                            f"{expected}") from None


def _c_rows(n_clean: int | None) -> str:
    return (f"N = 5 × {n_clean} (the {n_clean} clean test images at severities 1-5)" if n_clean is not None
            else "N a multiple of 5 (severities 1-5 stacked)")


def cifar100c_slice(folder: str | os.PathLike, corruption: str, severity: int,
                    n_clean: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``n×32×32×3``, memory-mapped) and labels (int64 ``n``) of one (corruption, severity) of a
    CIFAR-100-C folder: rows ``(severity - 1) n`` to ``severity n`` of ``<corruption>.npy``.

    The files are checked against :data:`C_LAYOUT` before any row is read: ``<corruption>.npy`` uint8
    ``N×32×32×3`` with ``N`` a multiple of 5 (``5 n_clean`` when ``n_clean``, the size of the clean test set, is
    given), ``labels.npy`` one integer per row (1-D); the slice's labels in ``[0, 100)``. Anything else (another
    shape, dtype or row count, a truncated or non-``.npy`` file) is one line naming the file, what was expected
    and what was found."""
    from kdbench.corruptions import ALL, check_severities

    folder = Path(folder)
    s = check_severities([severity])[0]
    if corruption not in ALL:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(ALL)}")
    path, lpath = folder / f"{corruption}.npy", folder / "labels.npy"
    for p in (path, lpath):
        if not p.is_file():
            what = f"{p} is a folder, expected a file" if p.is_dir() else f"no file {p}"
            raise DataLayoutError(f"CIFAR-100-C: {what}. Expected layout: {C_LAYOUT}")
    want = f"uint8 N×32×32×3 with {_c_rows(n_clean)}"
    images = _read_npy(path, want + f" ({C_LAYOUT})")
    rows_ok = len(images) > 0 and len(images) % 5 == 0 and (n_clean is None or len(images) == 5 * int(n_clean))
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3) or not rows_ok:
        raise DataFileError(f"{path}: expected {want}, found {images.dtype} {tuple(images.shape)}. Expected layout: "
                            f"{C_LAYOUT}")
    lwant = f"integer labels of shape ({len(images)},), one per row of {path.name}"
    labels = _read_npy(lpath, lwant)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
        raise DataFileError(f"{lpath}: expected {lwant}, found {labels.dtype} {tuple(labels.shape)}")
    n = len(images) // 5
    lab = np.asarray(labels[(s - 1) * n: s * n], dtype=np.int64)
    bad = np.flatnonzero((lab < 0) | (lab >= 100))
    if len(bad):
        raise DataFileError(f"{lpath}: label {int(lab[bad[0]])} at row {(s - 1) * n + int(bad[0])} is outside "
                            f"[0, 100) (CIFAR-100's classes)")
    return images[(s - 1) * n: s * n], lab


def cifar100c_dataset(folder: str | os.PathLike, corruption: str, severity: int, like: TensorImages) -> TensorImages:
    """One (corruption, severity) of a CIFAR-100-C folder as a dataset normalised (and resized) as ``like``
    (the clean CIFAR-100 validation set; its ``image_transform`` too, e.g. the eval transform of the
    ``timm_transform`` option). The folder's rows must be 5 × ``len(like)`` and each severity's labels the clean
    test labels, in their order (:func:`cifar100c_slice`; the released files are the test set at each severity,
    in order)."""
    images, labels = cifar100c_slice(folder, corruption, severity, n_clean=len(like))
    clean = np.asarray(like.labels)
    if len(clean) == len(labels) and not np.array_equal(labels, clean):
        k = int(np.flatnonzero(labels != clean)[0])
        lpath = Path(folder) / "labels.npy"
        raise DataFileError(f"{lpath}: the labels of severity {int(severity)} differ from the clean test labels "
                            f"(row {(int(severity) - 1) * len(clean) + k}: {int(labels[k])}, the test set's image "
                            f"{k}: {int(clean[k])}); expected the test labels repeated for severities 1-5, in order")
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    return TensorImages(x, torch.from_numpy(labels), like.mean.flatten().tolist(), like.std.flatten().tolist(),
                        like.transform, image_transform=getattr(like, "image_transform", None))


def write_cifar100_c(cifar_root: str | os.PathLike, out: str | os.PathLike, corruptions="benchmark",
                     max_images: int | None = None) -> Path:
    """Generate a CIFAR-100-C-style folder (released layout, all five severities) from the CIFAR-100 test set at
    ``cifar_root`` with kdbench's corruption engine (each image seeded by its test-set index). ``max_images``
    keeps the first test images only (for tests). Existing ``.npy`` files of the same size are kept.

    These are *not* Hendrycks' released CIFAR-100-C files: the engine (imagecorruptions) uses the ImageNet-C
    severity parameters (e.g. gaussian noise sigma .08-.38), whereas the released set was made by
    make_cifar_c.py with strengths tuned for 32×32 images (e.g. sigma .04-.10), so numbers on this folder are
    not comparable with published CIFAR-100-C numbers (methods compared against the same baseline are). They
    are the on-the-fly ``generated`` images, pixel for pixel, and the folder says so (:data:`GENERATED_MARK`):
    read back as an eval ``root:``, its results are recorded as ``generated``, never as released files. A folder
    without the mark reads as released: run this again on it (existing ``.npy`` files are kept) to mark it."""
    from kdbench.corruptions import SEVERITIES, corrupt, resolve_corruptions

    test = _folder(cifar_root) / "test"
    x, labels = _split_arrays(_load(test), test)
    data = x.transpose(0, 2, 3, 1)
    if max_images is not None:
        data, labels = data[: int(max_images)], labels[: int(max_images)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(data)
    (out / GENERATED_MARK).write_text(json.dumps({
        "written_by": "kdbench.data.cifar.write_cifar100_c", "source": "generated",
        "engine": "imagecorruptions (ImageNet-C severity parameters)", "n_images": n,
        "note": "not Hendrycks' released CIFAR-100-C: not comparable with published CIFAR-100-C numbers"}, indent=1))
    for name in resolve_corruptions(corruptions):
        path = out / f"{name}.npy"
        try:
            if path.is_file() and _read_npy(path, "").shape == (5 * n, 32, 32, 3):
                continue
        except DataFileError:  # unreadable or truncated: written again
            pass
        arr = np.empty((5 * n, 32, 32, 3), dtype=np.uint8)
        for s in SEVERITIES:
            for i in range(n):
                arr[(s - 1) * n + i] = corrupt(data[i], name, s, i)
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
    np.save(out / "labels.npy", np.tile(labels.astype(np.uint8 if labels.max() < 256 else np.int64), 5))
    return out
