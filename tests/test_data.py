"""Data: the shipped digits, CIFAR-100 pickles written and read back through the real loader, image folders."""

import pickle

import numpy as np
import pytest
import torch

from kdbench.data.base import DataLayoutError, stratified_fraction
from kdbench.data.cifar import CIFAR100, write_cifar100
from kdbench.data.digits import Digits
from kdbench.data.imagefolder import ImageFolderData, write_imagefolder


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


def test_imagefolder_and_tiny_imagenet_val_layout(tmp_path):
    root = write_imagefolder(tmp_path / "in", num_classes=3, per_class=2, size=16)
    d = ImageFolderData().build(str(root), image_size=16, augment=False)
    assert (len(d.train), len(d.val), d.num_classes) == (6, 6, 3) and d.train[0][0].shape == (3, 16, 16)
    # Tiny-ImageNet: val/images + val/val_annotations.txt
    import shutil

    val = root / "val"
    lines = []
    (tmp_path / "imgs").mkdir()
    for cls in sorted(p.name for p in val.iterdir()):
        for f in sorted((val / cls).iterdir()):
            shutil.move(str(f), tmp_path / "imgs" / f.name)
            lines.append(f"{f.name}\t{cls}\t0\t0\t8\t8")
        (val / cls).rmdir()
    shutil.move(str(tmp_path / "imgs"), val / "images")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    d2 = ImageFolderData().build(str(root), image_size=16, augment=False)
    assert len(d2.val) == 6 and sorted(set(t for _, t in d2.val.samples)) == [0, 1, 2]
    with pytest.raises(DataLayoutError, match="no folder"):
        ImageFolderData().check(str(tmp_path / "empty"))
