"""The imagefolder plugin's ``rotation``, ``mean`` and ``std`` options: with ``image_size: 64, resize: 64,
rotation: 20`` and Tiny-ImageNet's mean/std, both splits are mdistiller's Tiny-ImageNet transforms (checked
against torchvision reference pipelines on the same decoded files, under the same torch seed); the draws come
from the global torch RNG only; bad values are refused by ``check`` before any file is read, naming the option;
and without the options the dataset, and a suite's run ids, are what they were."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from kdbench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderData, write_imagefolder
from kdbench.data.plugin import check_data

from test_seed_suites import write_tiny_imagenet

TINY_MEAN = [0.4802, 0.4481, 0.3975]  # mdistiller's Tiny-ImageNet normalisation
TINY_STD = [0.2302, 0.2265, 0.2262]
SUITE_OPTIONS = {"image_size": 64, "resize": 64, "augment": True}  # suites/tiny_imagenet.yaml's data options
MDISTILLER = {**SUITE_OPTIONS, "rotation": 20, "mean": TINY_MEAN, "std": TINY_STD}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("data") / "tiny-imagenet-200")


def _pil(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _mdistiller_train():
    return T.Compose([T.RandomRotation(20), T.RandomHorizontalFlip(0.5), T.ToTensor(),
                      T.Normalize(TINY_MEAN, TINY_STD)])


def _mdistiller_eval():
    return T.Compose([T.ToTensor(), T.Normalize(TINY_MEAN, TINY_STD)])


def _train_image(data, i: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return data.train[i][0]


def test_eval_images_are_mdistillers(tiny):
    data = ImageFolderData().build(str(tiny), **MDISTILLER)
    ref = _mdistiller_eval()
    rows = [line.split("\t") for line in (tiny / "val" / "val_annotations.txt").read_text().splitlines()]
    assert [(p.name, data.classes[t]) for p, t in data.val.samples] == [(r[0], r[1]) for r in rows]
    assert len(data.val) == 6
    for i, (path, target) in enumerate(data.val.samples):
        x, y = data.val[i]
        assert x.shape == (3, 64, 64) and y == target
        assert torch.equal(x, ref(_pil(path))), path


def test_train_images_are_mdistillers_under_the_same_torch_seed(tiny):
    """Same seed, same decoded file: the plugin's training image is the reference pipeline's, and the global torch
    RNG is left where the reference leaves it (the same draws: the angle, then the flip)."""
    data = ImageFolderData().build(str(tiny), **MDISTILLER)
    ref = _mdistiller_train()
    assert data.classes == sorted((tiny / "wnids.txt").read_text().split())
    for i, (path, _) in enumerate(data.train.samples):
        for seed in range(6):
            x = _train_image(data, i, seed)
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            expected = ref(_pil(path))
            assert torch.equal(x, expected), (path, seed)
            assert torch.equal(after, torch.get_rng_state()), (path, seed)


def test_rotation_and_flip_are_applied(tiny):
    """Facts that do not lean on the reference's draw order: corners rotated out of the image hold the normalised
    black (-mean/std); with ``rotation: 0`` every image is the unaugmented one or its mirror, mirrored about half
    the time."""
    data = ImageFolderData().build(str(tiny), **MDISTILLER)
    path = data.train.samples[0][0]
    plain = _mdistiller_eval()(_pil(path))
    black = (-torch.tensor(TINY_MEAN) / torch.tensor(TINY_STD)).view(3, 1)
    tilted = 0
    for seed in range(40):
        torch.manual_seed(seed)
        angle = T.RandomRotation.get_params([-20.0, 20.0])
        x = _train_image(data, 0, seed)
        if abs(angle) > 3:  # every corner pixel then maps outside the 64x64 image
            tilted += 1
            corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]
            assert torch.allclose(corners, black.expand(3, 4), atol=1e-6), (seed, angle)
            assert not torch.equal(x, plain) and not torch.equal(x, plain.flip(-1))
    assert tilted > 25

    flat = ImageFolderData().build(str(tiny), **{**MDISTILLER, "rotation": 0})
    mirrored = 0
    for seed in range(200):
        x = _train_image(flat, 0, seed)
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1)), seed
        mirrored += int(torch.equal(x, plain.flip(-1)))
    assert 70 <= mirrored <= 130


def test_the_same_torch_seed_gives_the_same_image_and_nothing_else_matters(tiny):
    data = ImageFolderData().build(str(tiny), **MDISTILLER)
    images = [_train_image(data, 1, seed) for seed in range(8)]
    for a in range(8):
        assert torch.equal(images[a], _train_image(data, 1, a))
        for b in range(a + 1, 8):
            assert not torch.equal(images[a], images[b]), (a, b)
    # Python's and numpy's RNGs neither change the image nor are drawn from
    random.seed(1)
    np.random.seed(1)
    py, npy = random.getstate(), np.random.get_state()
    assert torch.equal(_train_image(data, 1, 5), images[5])
    assert random.getstate() == py and all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                                           for a, b in zip(np.random.get_state(), npy))
    random.seed(2)
    np.random.seed(2)
    assert torch.equal(_train_image(data, 1, 5), images[5])


def test_batches_are_reproducible_through_the_training_loops_seeding(tiny):
    from torch.utils.data import DataLoader

    from kdbench.train import batches

    data = ImageFolderData().build(str(tiny), **MDISTILLER)

    def first(seed):
        loader = DataLoader(data.train, batch_size=6, shuffle=False, num_workers=0)
        return next(b for _, b in batches(loader, 1, seed=seed, epoch=0))[0]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))


BAD = [
    ("rotation", -1, ">= 0"), ("rotation", -0.5, ">= 0"), ("rotation", "20", ">= 0"), ("rotation", True, ">= 0"),
    ("rotation", float("nan"), ">= 0"), ("rotation", float("inf"), ">= 0"), ("rotation", [20], ">= 0"),
    ("mean", [0.5, 0.5], "3 numbers"), ("mean", [0.5] * 4, "3 numbers"), ("mean", 0.5, "3 numbers"),
    ("mean", "0.5", "3 numbers"), ("mean", [0.5, "a", 0.5], "3 numbers"), ("mean", [True, 0.5, 0.5], "3 numbers"),
    ("mean", {"r": 0.5}, "3 numbers"), ("std", [0.2, 0.2], "3 numbers"), ("std", [0.2, float("nan"), 0.2], "3 numbers"),
    ("std", [0.2, 0, 0.2], "> 0"), ("std", [0.2, -0.1, 0.2], "> 0"),
]


@pytest.mark.parametrize("option,value,valid", BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_check_refuses_bad_values_naming_the_option(tmp_path, tiny, option, value, valid):
    # a missing root: the option is refused before the layout (any file) is looked at
    with pytest.raises(ValueError) as e:
        ImageFolderData().check(str(tmp_path / "missing"), **{option: value})
    assert f"data.{option} must be" in str(e.value) and valid in str(e.value) and repr(value) in str(e.value)
    with pytest.raises(ValueError, match=f"data.{option} must be"):
        check_data({"name": "imagefolder", "root": str(tiny), **SUITE_OPTIONS, option: value})
    with pytest.raises(ValueError, match=f"data.{option} must be"):
        ImageFolderData().build(str(tiny), **{**SUITE_OPTIONS, option: value})


@pytest.mark.parametrize("options", [{"rotation": 0}, {"rotation": 12.5}, {"rotation": 20}, {"mean": TINY_MEAN},
                                     {"mean": (0, 0, 0), "std": (1, 1, 1)}, {"std": TINY_STD}, MDISTILLER])
def test_check_accepts_good_values(tiny, options):
    ImageFolderData().check(str(tiny), **options)
    check_data({"name": "imagefolder", "root": str(tiny), **options})


def _old_train(image_size):
    """The training transform before the options existed (``augment: true``)."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _old_eval(image_size, resize):
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("layout", ["tiny", "folders"])
@pytest.mark.parametrize("augment", [True, False])
def test_without_the_options_the_dataset_is_as_it_was(tiny, tmp_path, layout, augment):
    if layout == "tiny":
        root, options, size, resize = tiny, {**SUITE_OPTIONS, "augment": augment}, 64, 64
    else:  # images larger than image_size: the default resize (round(16 / 0.875) = 18) and crop do something
        root, options, size, resize = write_imagefolder(tmp_path / "in", 2, 3, size=32), {"image_size": 16,
                                                                                          "augment": augment}, 16, 18
    plain = ImageFolderData().build(str(root), **options)
    unset = ImageFolderData().build(str(root), **options, rotation=None, mean=None, std=None)
    old_train = _old_train(size) if augment else _old_eval(size, resize)
    for i, (path, _) in enumerate(plain.train.samples):
        for seed in range(3):
            x = _train_image(plain, i, seed)
            assert torch.equal(x, _train_image(unset, i, seed))
            torch.manual_seed(seed)
            assert torch.equal(x, old_train(_pil(path))), (path, seed)
    for i, (path, _) in enumerate(plain.val.samples):
        assert torch.equal(plain.val[i][0], unset.val[i][0])
        assert torch.equal(plain.val[i][0], _old_eval(size, resize)(_pil(path)))


def test_mean_and_std_normalise_both_splits_each_defaulting_to_imagenets(tiny):
    only_mean = ImageFolderData().build(str(tiny), **{**SUITE_OPTIONS, "mean": TINY_MEAN})
    only_std = ImageFolderData().build(str(tiny), **{**SUITE_OPTIONS, "std": TINY_STD, "augment": False})
    path = only_mean.val.samples[0][0]
    raw = T.ToTensor()(_pil(path))
    assert torch.equal(only_mean.val[0][0], T.Normalize(TINY_MEAN, IMAGENET_STD)(raw))
    assert torch.equal(only_std.val[0][0], T.Normalize(IMAGENET_MEAN, TINY_STD)(raw))
    path = only_std.train.samples[2][0]
    assert torch.equal(only_std.train[2][0], T.Normalize(IMAGENET_MEAN, TINY_STD)(T.ToTensor()(_pil(path))))


#: the run ids of the suite below, computed before the rotation/mean/std options existed
RUN_IDS_BEFORE = {("teacher", "baseline"): "25f88899adaeb521", ("distill", "baseline"): "7fb37e5042a0c1c0",
                  ("distill", "kd"): "f41809f62a8f8bbf"}


def test_a_suite_without_the_options_keeps_its_run_ids(write_suite):
    from kdb_util import tiny_suite

    from kdbench.suite import load_suite

    data = {"name": "imagefolder", "root": "/nonexistent/tiny-imagenet-200", **SUITE_OPTIONS}
    suite = load_suite(write_suite(tiny_suite(data=data)))
    assert {(s.kind, s.method): s.run_id for s in suite.specs} == RUN_IDS_BEFORE
    assert all(s.data == {**data, "train_fraction": 1.0} if s.kind == "teacher" else s.data == data
               for s in suite.specs)
    rotated = load_suite(write_suite(tiny_suite(data={**data, "rotation": 20})))
    assert all(s.data["rotation"] == 20 for s in rotated.specs)
    assert {s.run_id for s in rotated.specs}.isdisjoint(RUN_IDS_BEFORE.values())
