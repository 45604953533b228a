"""The handwritten digits that scikit-learn ships (UCI optdigits test set: 1,797 real 8×8 images, 10 classes).

Real data that needs no download, for the quickstart and the tests. The train/test split is fixed
(stratified, 70/30, ``random_state=0``) so every run and every machine sees the same split.
"""

from __future__ import annotations

from kdbench.data.plugin import DatasetPlugin  # torch-free: `kdbench validate` imports this module (without torch, numpy)
from kdbench.registry import DATASETS


@DATASETS.register("digits")
class Digits(DatasetPlugin):
    needs_root = False
    layout = "(ships with scikit-learn: sklearn.datasets.load_digits)"
    augments = "augment"  # the training split is augmented when the option is true

    def check(self, root, **options):
        self.option_check(**options)

    def corruption_min_side(self, root, *, image_size=8, **options) -> int:
        """The stored images are ``image_size`` pixels square (upsampled from 8×8 at build) and are corrupted as
        stored."""
        return int(image_size)

    def corruption_size_option(self, min_side, **options):
        return "image_size", int(min_side)

    @staticmethod
    def option_check(*, train_fraction=1.0, image_size=8, augment=False, fraction_seed=0):
        if not 0 < float(train_fraction) <= 1:
            raise ValueError(f"data.train_fraction must be in (0, 1], got {train_fraction}")
        if int(image_size) < 8:
            raise ValueError(f"data.image_size must be >= 8 for digits, got {image_size}")

    def build(self, root=None, *, train_fraction: float = 1.0, image_size: int = 8, augment: bool = False,
              fraction_seed: int = 0) -> ClassificationData:
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        from kdbench.data.base import ClassificationData, TensorImages, random_crop_flip, stratified_fraction

        self.option_check(train_fraction=train_fraction, image_size=image_size, augment=augment)
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # N×1×8×8 in [0, 1]
        if image_size != 8:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        y = d.target.astype(np.int64)
        idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
        idx_tr = idx_tr[stratified_fraction(y[idx_tr], float(train_fraction), seed=fraction_seed)]
        mean, std = [0.3053], [0.3760]  # over the whole set, [0,1] scale
        aug = random_crop_flip(pad=max(1, image_size // 8), flip=False) if augment else None
        train = TensorImages(x[idx_tr], torch.from_numpy(y[idx_tr]), mean, std, transform=aug)
        val = TensorImages(x[idx_te], torch.from_numpy(y[idx_te]), mean, std)
        return ClassificationData(train, val, num_classes=10, in_chans=1, image_size=image_size,
                                  classes=[str(i) for i in range(10)])
