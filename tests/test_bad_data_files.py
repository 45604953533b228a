"""Every bad data file is named before it becomes a number.

One table (:data:`CASES`): for each dataset plugin with files of its own (cifar100, released CIFAR-100-C folders,
coco, coco_shapes, cityscapes and its synthetic writer, imagefolder with ImageNet, Kaggle-flat and Tiny-ImageNet
validation layouts), a good tree written by the plugin's own writer, one file damaged (truncated, of another
shape or dtype, another kind of file under the right name, empty, a folder in its place) and where the damage
must be refused: at ``check`` (what ``kdbench validate`` runs) when the file can be seen there, else when the data
is built and read. Either way the error is one line of :class:`DataFileError` / :class:`DataLayoutError` naming
the damaged file, and building and reading the data refuses it too (a run that skipped ``validate`` gets no
number from it). ``digits`` reads scikit-learn's bundled copy and has no files of its own.

The other tests: CIFAR-100 pickles with ``str`` keys, COCO annotations of undeclared images or categories,
corruption evaluations of images under 32 px refused at validation, released files checked by ``validate``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from kdbench.data.plugin import DataFileError, DataLayoutError, check_data
from kdbench.registry import DATASETS

from kdb_util import tiny_imagenet_val, tiny_suite

REPO = Path(__file__).resolve().parent.parent
C_NAME = "brightness"  # the corruption of the CIFAR-100-C trees (cheap to generate)
SYNTH = {"n_train": 2, "n_val": 1, "height": 32, "width": 64}

# (plugin, suite options) of each kind of tree; "cifar100-c" is a released-layout folder read with an eval's root:
KINDS = {
    "cifar100": ("cifar100", {"augment": False}),
    "cifar100-c": (None, {}),
    "coco": ("coco", {"min_size": 32, "max_size": 64}),
    "coco_shapes": ("coco_shapes", {"n_train": 2, "n_val": 2, "image_size": 48, "min_size": 32, "max_size": 64}),
    "cityscapes": ("cityscapes", {"crop_size": 32}),
    "cityscapes-synthetic": ("cityscapes", {"crop_size": 32, "synthetic": SYNTH}),
    "imagefolder": ("imagefolder", {"image_size": 16, "augment": False}),
    "imagenet-flat": ("imagefolder", {"image_size": 16, "augment": False}),
    "tiny-imagenet": ("imagefolder", {"image_size": 16, "augment": False}),
}


def _write(kind: str, root: Path) -> None:
    """A good tree of ``kind`` under ``root``, written by the plugin's own writer."""
    if kind == "cifar100":
        from kdbench.data.cifar import write_cifar100

        write_cifar100(root, n_train_per_class=1, n_test_per_class=1)
    elif kind == "cifar100-c":
        from kdbench.data.cifar import write_cifar100, write_cifar100_c

        write_cifar100(root / "c100", n_train_per_class=1, n_test_per_class=1, num_classes=4)
        write_cifar100_c(root / "c100", root / "C", corruptions=[C_NAME])
    elif kind == "coco":
        from kdbench.data.coco import write_coco_shapes

        write_coco_shapes(root, n_train=2, n_val=2, height=(40, 48), width=(40, 56), object_size=(8, 20))
    elif kind == "coco_shapes":
        from kdbench.data.coco import CocoShapes

        CocoShapes().build(root, **KINDS[kind][1])
    elif kind == "cityscapes":
        from kdbench.data.cityscapes import write_cityscapes

        write_cityscapes(root, n_train=2, n_val=1, height=32, width=64)
    elif kind == "cityscapes-synthetic":
        DATASETS.get("cityscapes")().build(str(root), **KINDS[kind][1])
    elif kind == "imagefolder":
        from kdbench.data.imagefolder import write_imagefolder

        write_imagefolder(root, num_classes=2, per_class=2, size=16)
    elif kind == "imagenet-flat":
        from kdbench.data.imagefolder import write_imagenet_flat_val

        write_imagenet_flat_val(root, num_classes=2, per_class=2, val_per_class=1, size=16)
    elif kind == "tiny-imagenet":  # the ImageNet folders, val moved to val/images + val/val_annotations.txt
        from kdbench.data.imagefolder import write_imagefolder

        write_imagefolder(root, num_classes=2, per_class=2, size=16)
        tiny_imagenet_val(root)


def _check(kind: str, root: Path) -> None:
    """What ``kdbench validate`` runs on the tree (a released folder: what it runs on an eval's ``root:``)."""
    if kind == "cifar100-c":
        from kdbench.data.cifar import cifar100c_slice

        cifar100c_slice(root / "C", C_NAME, 1)
        return
    name, options = KINDS[kind]
    check_data({"name": name, "root": str(root), **options})


def _read(kind: str, root: Path) -> None:
    """Build the data and read every image of it, as training and evaluation do."""
    if kind == "cifar100-c":
        from kdbench.data.cifar import CIFAR100, cifar100c_dataset

        clean = CIFAR100().build(str(root / "c100"), augment=False)
        splits = [cifar100c_dataset(root / "C", C_NAME, s, like=clean.val) for s in range(1, 6)]
    else:
        name, options = KINDS[kind]
        data = DATASETS.get(name)().build(str(root), **options)
        splits = [data.train, data.val]
    for ds in splits:
        for i in range(len(ds)):
            ds[i]


# ------------------------------------------------------------------------------------------- damage
def truncate(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def text(p: Path) -> None:
    p.write_text("these are not the bytes you are looking for\n")


def json_file(p: Path) -> None:
    p.write_text(json.dumps({"images": [], "note": "a json file under another file's name"}))


def empty(p: Path) -> None:
    p.write_bytes(b"")


def folder(p: Path) -> None:
    p.unlink()
    p.mkdir()


def binary(p: Path) -> None:
    p.write_bytes(b"\xff\xfe\x00\x81\x93 not text \xc3\x28")


def _pickled(p: Path, **changes) -> None:
    d = pickle.load(open(p, "rb"), encoding="bytes")
    d.update({k.encode(): v for k, v in changes.items()})
    pickle.dump(d, open(p, "wb"))


def _npy(p: Path, fn) -> None:
    arr = np.load(p)
    np.save(p.with_suffix(".tmp.npy"), fn(arr))
    p.with_suffix(".tmp.npy").replace(p)


def _json(p: Path, fn) -> None:
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def _png(p: Path, fn) -> None:
    from PIL import Image

    with Image.open(p) as im:
        out = fn(im)
    out.save(p, format="PNG")


def _shuffled_labels(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    n = len(out) // 5
    out[2 * n: 3 * n] = np.roll(out[2 * n: 3 * n], 1)  # severity 3 in another order
    return out


def _label_value(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out[0, 0] = 200
    return out


# ------------------------------------------------------------------------------------------- the table
CIFAR_TEST = "cifar-100-python/test"
C_NPY, C_LABELS = f"C/{C_NAME}.npy", "C/labels.npy"
COCO_VAL = "annotations/instances_val2017.json"
COCO_IMG = "val2017/000000000001.jpg"
SHAPES = "shapes-2-2-48-0"
CS_IMG = "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
CS_LABEL = "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
CS_COLOR = "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_color.png"
IF_TRAIN = "train/n00000000/train_0_0.png"
FLAT_TRAIN = "train/n01440764/n01440764_0.JPEG"
FLAT_VAL = "val/ILSVRC2012_val_00000001.JPEG"
TINY_ANN = "val/val_annotations.txt"
TINY_IMG = "val/images/val_0_0.png"

def _families(kind: str, rel: str, stage: str = "check", **expect) -> list[tuple]:
    """The file-level families of one file: each damage named (truncate, text, json_file, empty, folder, binary)
    with the fragment of its message, or ``(stage, fragment)`` where it is refused elsewhere than ``stage``."""
    damages = {"truncate": truncate, "text": text, "json_file": json_file, "empty": empty, "folder": folder,
               "binary": binary}
    return [(kind, rel, damages[name], *(e if isinstance(e, tuple) else (stage, e))) for name, e in expect.items()]


# (kind, file damaged (relative to the tree's root), damage, where it is refused, fragment of the message)
CASES = [
    # CIFAR-100 pickles
    *_families("cifar100", CIFAR_TEST, truncate="is truncated", text="is not a pickle", json_file="is not a pickle",
               empty="is empty", folder="is a folder"),
    ("cifar100", "cifar-100-python/meta", text, "check", "is not a pickle"),
    ("cifar100", CIFAR_TEST, lambda p: _pickled(p, data=np.zeros((100, 1024), np.uint8)), "read",
     "'data' must be uint8 N×3072"),
    ("cifar100", CIFAR_TEST, lambda p: _pickled(p, data=np.zeros((100, 3072), np.float32)), "read",
     "'data' must be uint8 N×3072"),
    ("cifar100", CIFAR_TEST, lambda p: _pickled(p, fine_labels=[[k % 100] for k in range(100)]), "read",
     "'fine_labels' must be a list of integers"),
    # released CIFAR-100-C folders: <corruption>.npy and labels.npy
    *_families("cifar100-c", C_NPY, truncate="is truncated", text="is not a .npy file",
               json_file="is not a .npy file", empty="is empty", folder="is a folder"),
    ("cifar100-c", C_NPY, lambda p: _npy(p, lambda a: np.zeros((20, 64, 64, 3), np.uint8)), "check",
     "expected uint8 N×32×32×3 with N a multiple of 5 (severities 1-5 stacked), found uint8 (20, 64, 64, 3)"),
    ("cifar100-c", C_NPY, lambda p: _npy(p, lambda a: a.astype(np.float32)), "check", "found float32"),
    ("cifar100-c", C_NPY, lambda p: _npy(p, lambda a: a[:19]), "check", "N a multiple of 5"),
    ("cifar100-c", C_NPY, lambda p: (_npy(p, lambda a: a[:15]), _npy(p.parent / "labels.npy", lambda a: a[:15])),
     "read", "N = 5 × 4 (the 4 clean test images at severities 1-5), found uint8 (15, 32, 32, 3)"),
    ("cifar100-c", C_LABELS, lambda p: _npy(p, lambda a: a[:, None]), "check",
     "expected integer labels of shape (20,)"),
    ("cifar100-c", C_LABELS, lambda p: _npy(p, lambda a: a.astype(np.float32)), "check",
     "expected integer labels of shape (20,)"),
    *_families("cifar100-c", C_LABELS, truncate="truncated", text="is not a .npy file"),
    ("cifar100-c", C_LABELS, lambda p: np.save(p, np.array([{"label": 1}] * 20, dtype=object)), "check",
     "holds Python objects"),
    ("cifar100-c", C_LABELS, lambda p: _npy(p, lambda a: np.concatenate([[200], a[1:]]).astype(np.uint8)), "check",
     "label 200 at row 0 is outside [0, 100)"),
    ("cifar100-c", C_LABELS, lambda p: _npy(p, _shuffled_labels), "read", "differ from the clean test labels"),
    # COCO: annotation json and images
    *_families("coco", COCO_VAL, truncate="is not valid json", text="is not valid json", empty="is empty",
               folder="(a folder, expected a json file)"),
    ("coco", COCO_VAL, lambda p: p.write_text("[1, 2, 3]"), "check", "not a json object"),
    ("coco", COCO_VAL, lambda p: _json(p, lambda d: d.pop("categories")), "check",
     "top-level key 'categories' is missing, expected a list"),
    ("coco", COCO_VAL, lambda p: _json(p, lambda d: d.update(images={"1": d["images"][0]})), "check",
     "top-level key 'images' is a dict, expected a list"),
    ("coco", COCO_VAL, lambda p: _json(p, lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "read",
     "bbox [x, y, width, height] of 4 numbers"),
    *_families("coco", COCO_IMG, "read", truncate="cannot decode image", text="cannot decode image",
               empty="cannot decode image", json_file="cannot decode image",
               folder="is a folder; expected an image file"),
    # coco_shapes: the generated dataset, damaged after it was written
    ("coco_shapes", f"{SHAPES}/{COCO_VAL}", lambda p: _json(p, lambda d: d.pop("categories")), "check",
     "top-level key 'categories' is missing"),
    ("coco_shapes", f"{SHAPES}/{COCO_VAL}", truncate, "check", "is not valid json"),
    ("coco_shapes", f"{SHAPES}/train2017/000000000001.jpg", truncate, "read", "cannot decode image"),
    # Cityscapes: leftImg8bit images and gtFine labelIds
    *_families("cityscapes", CS_IMG, truncate=("read", "cannot decode"), text=("read", "cannot decode"),
               empty="is empty; expected a PNG file", folder="is a folder; expected a PNG file"),
    *_families("cityscapes", CS_LABEL, truncate=("read", "cannot decode"), json_file=("read", "cannot decode"),
               empty="is empty; expected a PNG file", folder="is a folder; expected a PNG file"),
    ("cityscapes", CS_LABEL, lambda p: shutil.copy(p.parent / Path(CS_COLOR).name, p), "read",
     "a labelIds PNG must be single-channel, got mode RGB"),
    ("cityscapes", CS_LABEL, lambda p: _png(p, lambda im: im.point(lambda v: 40)), "read", "holds value 40"),
    ("cityscapes", CS_LABEL, lambda p: _png(p, lambda im: im.resize((32, 16))), "read", "is 32×16"),
    ("cityscapes-synthetic", CS_LABEL, empty, "check", "is empty"),
    ("cityscapes-synthetic", CS_IMG, truncate, "read", "cannot decode"),
    # ImageFolder: images (PNG, JPEG), Kaggle's flat val CSV, Tiny-ImageNet's annotation file
    *_families("imagefolder", IF_TRAIN, "read", truncate="cannot decode image", text="cannot decode image",
               empty="the file is empty", json_file="cannot decode image"),
    ("imagenet-flat", FLAT_TRAIN, truncate, "read", "cannot decode image"),
    ("imagenet-flat", FLAT_VAL, truncate, "read", "cannot decode image"),
    ("imagenet-flat", "LOC_val_solution.csv", empty, "check", "the first line must be the header"),
    ("imagenet-flat", "LOC_val_solution.csv", binary, "check", "cannot read"),
    *_families("tiny-imagenet", TINY_ANN, empty="labels no image", folder="is a folder", binary="cannot read",
               json_file="expected <image> TAB <class>"),
    ("tiny-imagenet", TINY_IMG, truncate, "read", "cannot decode image"),
]


def _case_id(case) -> str:
    kind, rel, damage, stage, _ = case
    name = getattr(damage, "__name__", "")
    return f"{kind}:{Path(rel).name}:{name if name != '<lambda>' else 'content'}:{stage}"


@pytest.fixture(scope="module")
def good_trees(tmp_path_factory):
    """One good tree per kind, written on first use; each case damages its own copy."""
    trees: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in trees:
            root = tmp_path_factory.mktemp(kind.replace("-", "_")) / "root"
            _write(kind, root)
            _check(kind, root)  # the good tree passes
            trees[kind] = root
        return trees[kind]

    return get


def _refused(fn, kind: str, root: Path) -> str:
    with pytest.raises((DataFileError, DataLayoutError)) as e:
        fn(kind, root)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_a_bad_file_is_named_before_it_becomes_a_number(case, good_trees, tmp_path):
    kind, rel, damage, stage, fragment = case
    root = tmp_path / "root"
    shutil.copytree(good_trees(kind), root)
    target = root / rel
    assert target.exists(), f"the table names a file the writer does not write: {target}"
    damage(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged file may also warn (pycocotools, PIL); the error is the point
        if stage == "check":
            msg = _refused(_check, kind, root)
            assert str(target) in msg and fragment in msg, msg
            msg = _refused(_read, kind, root)  # a run without `validate` never reads a number from it either
            assert str(target) in msg, msg
        else:
            _check(kind, root)
            msg = _refused(_read, kind, root)
            assert str(target) in msg and fragment in msg, msg


# ------------------------------------------------------------------------------------------- CIFAR-100 keys
def test_cifar100_pickles_with_str_keys_read_as_the_official_ones(tmp_path):
    """A CIFAR-100 pickle whose dict keys are ``str`` (pickled by Python 3) reads as the official ``bytes``-keyed
    one (torchvision reads both, with ``encoding='latin1'``)."""
    import torch

    from kdbench.data.cifar import CIFAR100, write_cifar100

    folder = write_cifar100(tmp_path / "a", n_train_per_class=1, n_test_per_class=1)
    ref = CIFAR100().build(str(folder), augment=False)
    for name in ("train", "test", "meta"):
        d = pickle.load(open(folder / name, "rb"), encoding="bytes")
        pickle.dump({k.decode(): v for k, v in d.items()}, open(folder / name, "wb"))
    CIFAR100().check(str(folder))
    data = CIFAR100().build(str(folder), augment=False)
    assert data.classes == ref.classes and data.classes[0] == "class_00"
    assert torch.equal(data.val.images, ref.val.images) and torch.equal(data.train.labels, ref.train.labels)
    d = pickle.load(open(folder / "test", "rb"))
    del d["fine_labels"]
    pickle.dump(d, open(folder / "test", "wb"))
    with pytest.raises(DataFileError, match=r"keys found batch_label, coarse_labels, data, filenames; expected "
                                            r"data, fine_labels;"):
        CIFAR100().build(str(folder), augment=False)


# ------------------------------------------------------------------------------------------- COCO ids
def test_coco_annotations_of_undeclared_images_or_categories_warn_once_per_file(tmp_path):
    from kdbench.data.coco import Coco, write_coco_shapes

    root = write_coco_shapes(tmp_path / "s", n_train=2, n_val=2, height=(40, 48), width=(40, 56),
                             object_size=(8, 20))
    ann = root / "annotations" / "instances_val2017.json"
    d = json.loads(ann.read_text())
    n = len(d["annotations"])
    d["annotations"][0]["image_id"] = 999
    d["annotations"][1]["category_id"] = 3  # no category 3 (ids 1, 2, 4, 7)
    ann.write_text(json.dumps(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = Coco().build(root, min_size=32, max_size=64)
    mine = [str(w.message) for w in caught if str(ann) in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert f"2 of {n} annotations are ignored" in mine[0] and "image_id 999" in mine[0] and "category_id 3" in mine[0]
    assert not [w for w in caught if "instances_train2017" in str(w.message)]
    assert len(data.val) == 2


# ------------------------------------------------------------------------------------------- image sizes
def _suite_with(write_suite, data: dict, evals: list) -> Path:
    return write_suite(tiny_suite(data=data, evals=evals))


CORRUPT = {"name": "corruptions", "set": ["fog"], "severities": [1]}


@pytest.mark.parametrize("data, option, needed", [
    ({"name": "digits", "image_size": 16}, "image_size", 32),
    ({"name": "imagefolder", "root": "in", "image_size": 24}, "image_size", 32),
])
def test_corruptions_of_images_under_32_px_are_refused_at_validation(write_suite, tmp_path, data, option, needed):
    """digits' plugin module is torch-free: the suite itself refuses it (`validate --no-data`, `run --dry-run`);
    imagefolder's imports torch: the data check does (`kdbench validate`, `kdbench run` before any job)."""
    from kdbench.suite import SuiteError, check_data_available
    from kdbench.suite import load_suite as _load

    if data["name"] == "imagefolder":
        from kdbench.data.imagefolder import write_imagefolder

        data = {**data, "root": str(write_imagefolder(tmp_path / "in", num_classes=2, per_class=1, size=16))}
        assert _load(_suite_with(write_suite, data, ["val", CORRUPT]))  # the torch-free part passes

    def load_suite(path, overrides=()):
        suite = _load(path, list(overrides))
        if data["name"] != "digits":
            check_data_available(suite)
        return suite

    path = _suite_with(write_suite, data, ["val", CORRUPT])
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    msg = str(e.value)
    if data["name"] != "digits":  # the data check ends with its hint line
        msg = msg.splitlines()[0]
    assert msg.startswith(f"{path}: evals[1]: ") and "\n" not in msg
    assert f"set data.{option} to {needed} or more" in msg and f"{data['image_size']} px" in msg
    load_suite(path, [f"data.{option}={needed}"])  # the value it names is enough
    load_suite(path, ["evals=[val]"])  # no corruptions, no limit
    load_suite(path, [f"evals.1.root={path.parent}"])  # released files are read as they are, not corrupted


def test_corruption_size_of_detection_and_segmentation_suites(write_suite):
    """coco_shapes at image_size S generates images of at least S * 3 // 4 px (corrupted before the resize): 43
    is the smallest S that gives 32; a synthetic Cityscapes is corrupted at its generated size. Their plugin
    modules import torch, so the check is the data check's (`kdbench validate`, `kdbench run` before any job), not
    the suite's own (`validate --no-data`, `run --dry-run` stay torch-free)."""
    from kdbench.suite import SuiteError, check_data_available
    from kdbench.suite import load_suite as _load

    def load_suite(path, overrides=()):
        suite = _load(path, list(overrides))  # the torch-free part passes
        check_data_available(suite)
        return suite

    det = dict(tiny_suite(), suite="det", task="detection", methods=["baseline"],
               pairs=[{"teacher": {"model": "torchvision:fcos_resnet18_fpn", "train": {}},
                       "student": {"model": "torchvision:fcos_resnet18_fpn"}}],
               data={"name": "coco_shapes", "image_size": 32}, evals=["val", CORRUPT])
    path = write_suite(det, "det")
    with pytest.raises(SuiteError, match=r"evals\[1\]: dataset 'coco_shapes' gives images of 24 px .* set "
                                         r"data.image_size to 43 or more"):
        load_suite(path)
    with pytest.raises(SuiteError, match="gives images of 31 px"):
        load_suite(path, ["data.image_size=42"])
    load_suite(path, ["data.image_size=43"])
    seg = dict(det, suite="seg", task="segmentation",
               data={"name": "cityscapes", "root": "cs", "synthetic": {"height": 16}},
               pairs=[{"teacher": {"model": "smp:pspnet_resnet18", "train": {}},
                       "student": {"model": "smp:pspnet_resnet18"}}])
    path = write_suite(seg, "seg")
    with pytest.raises(SuiteError, match=r"gives images of 16 px .* set data.synthetic.height to 32 or more"):
        load_suite(path)
    from kdbench.data.plugin import corruption_size_problem

    # (its root is generated at build: the layout check refuses it here, the size check passes)
    assert corruption_size_problem(_load(path, ["data.synthetic.height=32"]).raw["data"], 32) is None
    # the real files: only they know their size (never below 32)
    assert corruption_size_problem(_load(path, ["data.synthetic=null"]).raw["data"], 32) is None


def test_coco_shapes_smallest_side_is_what_the_writer_gives(tmp_path):
    from kdbench.data.coco import CocoShapes

    plugin = CocoShapes()
    for s in (32, 42, 43, 96, 256):
        need = plugin.corruption_size_option(32)[1]
        assert (plugin.corruption_min_side(None, image_size=s) >= 32) == (s >= need)
    data = plugin.build(tmp_path, n_train=1, n_val=6, image_size=43, min_size=32, max_size=64)
    sides = [min(i["height"], i["width"]) for i in data.val.coco.imgs.values()]
    assert min(sides) >= plugin.corruption_min_side(None, image_size=43) == 32


def _torch_free(*lines: str) -> subprocess.CompletedProcess:
    """Run ``kdbench.cli.main`` calls (``lines``, under stdout capture) in a fresh process and check that torch was
    never imported."""
    code = ("import sys, contextlib, io\nfrom kdbench.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            + "".join(f"    {line}\n" for line in lines) + "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_validating_a_digits_robustness_suite_stays_torch_free():
    r = _torch_free("assert main(['validate', 'suites/quickstart_robustness.yaml']) == 0",
                    "assert main(['validate', 'suites/quickstart_robustness.yaml', '--set', 'data.image_size=16']) == 1")
    assert "set data.image_size to 32 or more" in r.stderr


def test_validating_robustness_suites_without_data_stays_torch_free():
    """The suites whose dataset plugins import torch (CIFAR, COCO, Cityscapes) leave the size check to the data
    check: `validate --no-data` imports no torch, as before the check existed."""
    _torch_free("for s in ('cifar100_c', 'coco_robustness', 'cityscapes_robustness'):",
                "    assert main(['validate', f'suites/{s}.yaml', '--no-data']) == 0, s")


# ------------------------------------------------------------------------------------------- released files
def test_a_released_folder_of_the_wrong_size_is_refused_by_validate(write_suite, tmp_path):
    """A CIFAR-100-C file of 64×64 images is refused by ``validate`` (before anything runs), naming the file, the
    expected layout and what was found."""
    from kdbench.suite import SuiteError, check_data_available, load_suite

    folder = tmp_path / "CIFAR-100-C"
    folder.mkdir()
    np.save(folder / "fog.npy", np.zeros((10, 64, 64, 3), np.uint8))
    np.save(folder / "labels.npy", np.zeros(10, np.uint8))
    ev = dict(CORRUPT, root=str(folder))
    suite = load_suite(write_suite(tiny_suite(evals=["val", ev])))
    with pytest.raises(SuiteError) as e:
        check_data_available(suite)
    line = str(e.value).splitlines()[0]
    assert str(folder / "fog.npy") in line and "expected uint8 N×32×32×3" in line and "(10, 64, 64, 3)" in line
    np.save(folder / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    check_data_available(suite)
