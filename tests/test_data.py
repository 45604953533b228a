"""Data: the shipped digits, CIFAR-100 pickles written and read back through the real loader, image folders."""

import pickle

import numpy as np
import pytest
import torch

from kdbench.data.base import DataFileError, DataLayoutError, stratified_fraction
from kdbench.data.cifar import CIFAR100, write_cifar100
from kdbench.data.digits import Digits
from kdbench.data.imagefolder import FLAT_CSV, LAYOUTS, ImageFolderData, write_imagefolder, write_imagenet_flat_val


def test_digits_fixed_split_and_fraction():
    d = Digits().build()
    assert (len(d.train), len(d.val)) == (1257, 540) and d.num_classes == 10 and d.in_chans == 1
    again = Digits().build()
    assert torch.equal(d.val.images, again.val.images) and torch.equal(d.train.labels, again.train.labels)
    small = Digits().build(train_fraction=0.1)
    counts = np.bincount(small.train.labels.numpy(), minlength=10)
    assert 120 <= len(small.train) <= 130 and counts.min() >= 11 and counts.max() <= 14
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and abs(float(d.val.images.mean()) - 0.305) < 0.01
    assert Digits().build(image_size=16).train[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="train_fraction"):
        Digits().build(train_fraction=0)


def test_stratified_fraction_keeps_every_class():
    labels = np.repeat(np.arange(5), [10, 10, 10, 10, 2])
    idx = stratified_fraction(labels, 0.2, seed=0)
    assert sorted(np.unique(labels[idx])) == [0, 1, 2, 3, 4]
    assert np.array_equal(idx, stratified_fraction(labels, 0.2, seed=0))


def test_cifar100_writer_roundtrip(tmp_path):
    folder = write_cifar100(tmp_path, n_train_per_class=3, n_test_per_class=1)
    raw = pickle.load(open(folder / "train", "rb"), encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (300, 3072)
    assert set(raw) >= {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    meta = pickle.load(open(folder / "meta", "rb"), encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100
    for root in (tmp_path, folder):  # the parent folder or cifar-100-python itself
        data = CIFAR100().build(root, augment=False)
        assert (len(data.train), len(data.val), data.num_classes) == (300, 100, 100)
    x, y = data.train[0]
    # the loader's first image is the pickle's first row, normalised with the CIFAR-100 statistics
    img = torch.tensor(raw[b"data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    assert torch.allclose(x, (img - mean) / std, atol=1e-6) and int(y) == raw[b"fine_labels"][0]


def test_cifar100_missing_layout_names_path_and_layout(tmp_path):
    with pytest.raises(DataLayoutError) as e:
        CIFAR100().check(str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value) and "cifar-100-python/{train,test,meta}" in str(e.value)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _rewrite(path, **changes):
    d = pickle.load(open(path, "rb"), encoding="bytes")
    for k, v in changes.items():
        if v is None:
            del d[k.encode()]
        else:
            d[k.encode()] = v
    with open(path, "wb") as f:
        pickle.dump(d, f)


@pytest.mark.parametrize("case", ["few_labels", "label_100", "label_negative", "cifar10_keys", "data_shape",
                                  "meta_names", "truncated", "not_a_pickle", "not_a_dict"])
def test_cifar100_bad_pickles_are_refused_naming_the_file(tmp_path, case):
    folder = write_cifar100(tmp_path, n_train_per_class=1, n_test_per_class=1, num_classes=100)
    train = folder / "train"
    raw = pickle.load(open(train, "rb"), encoding="bytes")
    labels = list(raw[b"fine_labels"])
    target, want = train, None
    if case == "few_labels":
        _rewrite(train, fine_labels=labels[:-3])
        want = "97 labels for 100 images"
    elif case == "label_100":
        _rewrite(train, fine_labels=labels[:5] + [100] + labels[6:])
        want = "label 100 of image 5 (and 0 more) is outside [0, 100)"
    elif case == "label_negative":
        _rewrite(train, fine_labels=[-1] + labels[1:])
        want = "label -1 of image 0"
    elif case == "cifar10_keys":  # a CIFAR-10 batch: 'labels' instead of 'fine_labels'
        _rewrite(train, fine_labels=None, coarse_labels=None, labels=labels)
        want = "keys found batch_label, data, filenames, labels; expected data, fine_labels (a CIFAR-10 batch?"
    elif case == "data_shape":
        _rewrite(train, data=raw[b"data"][:, :1024])
        want = "'data' must be uint8 N×3072"
    elif case == "meta_names":
        target = folder / "meta"
        _rewrite(target, fine_label_names=[b"a", b"b"])
        want = "2 fine_label_names, CIFAR-100 has 100"
    elif case == "truncated":
        target = folder / "test"
        target.write_bytes(target.read_bytes()[:500])
        want = "not a readable CIFAR pickle"
    elif case == "not_a_pickle":
        target = folder / "test"
        target.write_text("hello")
        want = "not a readable CIFAR pickle"
    elif case == "not_a_dict":
        target = folder / "meta"
        pickle.dump([1, 2], open(target, "wb"))
        want = "holds a list, not the dict"
    with pytest.raises(DataFileError) as e:
        CIFAR100().build(str(tmp_path), augment=False)
    msg = _one_line(e)
    assert str(target) in msg and want in msg


def test_cifar100_pickle_cannot_run_code(tmp_path):
    """A pickle that would call os.system when loaded is refused without running anything."""
    import os

    folder = write_cifar100(tmp_path, n_train_per_class=1, n_test_per_class=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Payload(), b"fine_labels": []}, f)
    with pytest.raises(DataFileError) as e:
        CIFAR100().build(str(tmp_path))
    assert "posix.system" in _one_line(e) or "os.system" in str(e.value)
    assert not marker.exists()


def test_imagefolder_and_tiny_imagenet_val_layout(tmp_path):
    root = write_imagefolder(tmp_path / "in", num_classes=3, per_class=2, size=16)
    d = ImageFolderData().build(str(root), image_size=16, augment=False)
    assert (len(d.train), len(d.val), d.num_classes) == (6, 6, 3) and d.train[0][0].shape == (3, 16, 16)
    # Tiny-ImageNet: val/images + val/val_annotations.txt
    from kdb_util import tiny_imagenet_val

    tiny_imagenet_val(root)
    d2 = ImageFolderData().build(str(root), image_size=16, augment=False)
    assert len(d2.val) == 6 and sorted(set(t for _, t in d2.val.samples)) == [0, 1, 2]
    # the same file saved with a byte-order mark and CRLF line ends (edited on Windows) reads the same
    ann = root / "val" / "val_annotations.txt"
    ann.write_bytes(ann.read_text().replace("\n", "\r\n").encode("utf-8-sig"))
    d3 = ImageFolderData().build(str(root), image_size=16, augment=False)
    assert d3.val.samples == d2.val.samples and d3.val[0][0].shape == (3, 16, 16)
    with pytest.raises(DataLayoutError, match="no folder"):
        ImageFolderData().check(str(tmp_path / "empty"))


def _csv_labels(path):
    rows = path.read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString"
    return {r.split(",")[0]: r.split(",")[1].split()[0] for r in rows[1:]}


@pytest.mark.parametrize("kaggle", [False, True])
def test_imagenet_flat_val_with_kaggle_csv(tmp_path, kaggle):
    """val/*.JPEG labelled by LOC_val_solution.csv (first token of PredictionString = synset), classes from the
    train folders; the CSV next to val/'s parent or, as in the Kaggle download, three folders up."""
    root = write_imagenet_flat_val(tmp_path / "in", num_classes=3, per_class=2, val_per_class=2, size=20,
                                   kaggle=kaggle)
    csv_path = (tmp_path / "in") / FLAT_CSV
    assert csv_path.is_file() and (root.name == "CLS-LOC") == kaggle
    jpegs = sorted((root / "val").glob("*.JPEG"))
    assert len(jpegs) == 6 and jpegs[0].read_bytes()[:2] == b"\xff\xd8"  # real JPEG files
    d = ImageFolderData().build(str(root), image_size=16, augment=False)
    synsets = sorted(p.name for p in (root / "train").iterdir())
    assert d.classes == synsets and d.num_classes == 3 and (len(d.train), len(d.val)) == (6, 6)
    labels = _csv_labels(csv_path)
    assert [(p.name, synsets[t]) for p, t in d.val.samples] == [(p.name, labels[p.stem]) for p in jpegs]
    x, y = d.val[0]
    assert x.shape == (3, 16, 16) and int(y) == synsets.index(labels[jpegs[0].stem])


def test_imagenet_flat_val_bad_csv_is_named(tmp_path):
    root = write_imagenet_flat_val(tmp_path / "in", num_classes=2, per_class=1, val_per_class=2, size=16)
    csv_path = root / FLAT_CSV
    good = csv_path.read_text()
    lines = good.splitlines()
    cases = [
        ("\n".join(lines[:2] + [lines[2].replace("n0", "n9", 1)] + lines[3:]), f"{csv_path}:3: synset n9"),
        ("\n".join(lines[:-1]), "1 image(s) of"),
        ("\n".join(lines + [lines[1]]), "is listed twice"),
        ("\n".join(lines + ["ILSVRC2012_val_00000099,n01440764 1 2 3 4"]), "no image ILSVRC2012_val_00000099"),
        ("\n".join(["id,label"] + lines[1:]), "header ImageId,PredictionString"),
    ]
    for text, want in cases:
        csv_path.write_text(text + "\n")
        with pytest.raises(DataFileError) as e:
            ImageFolderData().check(str(root))
        assert want in _one_line(e) and str(csv_path) in str(e.value)
    csv_path.unlink()
    with pytest.raises(DataLayoutError) as e:
        ImageFolderData().build(str(root), image_size=16)
    assert f"no {FLAT_CSV} in {root / 'val'}, {root}" in _one_line(e)


def test_unrecognised_layout_lists_every_accepted_layout(tmp_path):
    root = write_imagefolder(tmp_path / "in", num_classes=2, per_class=1, size=8)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataLayoutError) as e:
        ImageFolderData().build(str(root))
    msg = _one_line(e)
    assert str(root / "val") in msg and all(layout in msg for layout in LAYOUTS)
    assert "ImageNet folders" in msg and "Tiny-ImageNet" in msg and FLAT_CSV in msg


def test_imagefolder_class_sanity_names_the_folder(tmp_path):
    root = write_imagefolder(tmp_path / "in", num_classes=3, per_class=2, size=8)
    empty = root / "train" / "n00000009"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(DataLayoutError) as e:
        ImageFolderData().build(str(root))
    assert "class folder(s) without any image" in _one_line(e) and str(empty) in str(e.value)
    (empty / "notes.txt").unlink()
    empty.rmdir()
    extra = root / "val" / "n00000007"
    extra.mkdir()
    next((root / "val" / "n00000000").iterdir()).rename(extra / "moved.png")
    with pytest.raises(DataLayoutError) as e:
        ImageFolderData().check(str(root))
    assert "only in val: n00000007" in _one_line(e)
    empty_train = tmp_path / "bare"
    (empty_train / "train").mkdir(parents=True)
    (empty_train / "val").mkdir()
    with pytest.raises(DataLayoutError, match=f"{empty_train / 'train'} holds no class folders"):
        ImageFolderData().check(str(empty_train))


def test_tiny_imagenet_annotations_naming_unknown_classes_are_refused(tmp_path):
    root = write_imagefolder(tmp_path / "in", num_classes=2, per_class=1, size=8)
    val = root / "val"
    (val / "images").mkdir()
    lines = []
    for cls in ("n00000000", "n00000001"):
        for f in sorted((val / cls).iterdir()):
            f.rename(val / "images" / f.name)
            lines.append(f"{f.name}\t{cls}\t0\t0\t8\t8")
        (val / cls).rmdir()
    ann = val / "val_annotations.txt"
    ann.write_text("\n".join(lines) + "\n")
    assert len(ImageFolderData().build(str(root), image_size=8).val) == 2
    ann.write_text(lines[0] + "\n" + lines[1].replace("n00000001", "n00000005") + "\n")
    with pytest.raises(DataFileError) as e:  # silently dropped before: the val set lost an image
        ImageFolderData().build(str(root), image_size=8)
    assert f"{ann}:2: class n00000005" in _one_line(e)
