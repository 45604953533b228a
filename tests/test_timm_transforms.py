"""CIFAR-100's ``timm_transform`` option: timm's ImageNet-style train/eval pipelines (as OFAKD trains CIFAR-100 at
224 px) on the stored 32×32 images, with every random draw a function of the global torch RNG; without the option
the dataset and the suite's run ids are what they were."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from kdbench.data.base import random_crop_flip, resize_to
from kdbench.data.cifar import CIFAR100, CIFAR100_MEAN, CIFAR100_STD, cifar100c_dataset, write_cifar100

S = 40  # a small output size keeps the tests fast; int(40 / 0.875) = 45
#: OFAKD's configs/cifar/vit_mlp.yaml with train.py's defaults (scale, ratio, hflip, re_mode, re_count,
#: train_interpolation)
OFAKD_TRAIN = {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5, "vflip": 0.0, "color_jitter": 0.4,
               "auto_augment": "rand-m9-mstd0.5-inc1", "interpolation": "random", "re_prob": 0.25,
               "re_mode": "pixel", "re_count": 1}
#: a train transform without randomness that changes pixels: the whole image, resized, normalised
PLAIN_TRAIN = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": None,
               "interpolation": "bilinear"}
EVAL = {"crop_pct": 0.875, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train_per_class=1, n_test_per_class=1, num_classes=10)
    return root


def build(root, **options):
    return CIFAR100().build(root, **options)


def raw(ds, i) -> np.ndarray:
    """The stored image ``i`` of a TensorImages as uint8 H×W×3."""
    return ds.images[i].permute(1, 2, 0).numpy().copy()


def torchvision_eval(img: np.ndarray, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """The reference eval transform, written with PIL + torchvision only."""
    from PIL import Image
    from torchvision import transforms as T

    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    tf = T.Compose([T.Resize(int(size / crop_pct), interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    return tf(Image.fromarray(img))


def test_eval_transform_is_timm_eval_on_the_pil_image(root):
    data = build(root, image_size=S, timm_transform={"train": PLAIN_TRAIN, "eval": EVAL})
    assert data.image_size == S and len(data.val) == 10
    for i in (0, 7):
        x, y = data.val[i]
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        torch.testing.assert_close(x, torchvision_eval(raw(data.val, i), S, **EVAL), rtol=0, atol=1e-6)
        assert int(y) == int(data.val.labels[i])


def test_train_images_are_normalised_with_cifar100_mean_and_std(root):
    """A train config whose crop is the whole image and that neither flips nor jitters: the image resized to S×S,
    to tensor, normalised with CIFAR-100's statistics."""
    from PIL import Image
    from torchvision import transforms as T

    data = build(root, image_size=S, timm_transform={"train": PLAIN_TRAIN, "eval": EVAL})
    ref = T.Compose([T.Resize((S, S), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                     T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    for i in (0, 3):
        x, _ = data.train[i]
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        torch.testing.assert_close(x, ref(Image.fromarray(raw(data.train, i))), rtol=0, atol=1e-6)
    x = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert x.min() < 0 < x.max()  # normalised, not in [0, 1]


def test_without_augment_the_train_split_uses_the_eval_transform(root):
    data = build(root, image_size=S, augment=False, timm_transform={"train": OFAKD_TRAIN, "eval": EVAL})
    assert data.train.image_transform is data.val.image_transform
    x, _ = data.train[2]
    torch.testing.assert_close(x, torchvision_eval(raw(data.train, 2), S, **EVAL), rtol=0, atol=1e-6)


def test_augmentation_is_a_function_of_the_torch_rng_alone(root):
    data = build(root, image_size=S, timm_transform={"train": OFAKD_TRAIN, "eval": EVAL})
    ds = data.train

    def fetch(seed: int, py_seed: int = 0, np_seed: int = 0) -> torch.Tensor:
        random.seed(py_seed)
        np.random.seed(np_seed)
        torch.manual_seed(seed)
        return torch.stack([ds[i][0] for i in range(len(ds))])

    a = fetch(5)
    assert a.shape == (len(ds), 3, S, S)
    assert torch.equal(a, fetch(5)), "the same torch seed gives the same images"
    assert torch.equal(a, fetch(5, py_seed=1, np_seed=2)), "Python's and numpy's global RNGs play no part"
    assert not torch.equal(a, fetch(6)), "another torch seed gives other images"

    # the global random and numpy states are left as they were
    random.seed(123)
    np.random.seed(321)
    py_before, np_before = random.getstate(), np.random.get_state()
    for i in range(len(ds)):
        ds[i]
    np_after = np.random.get_state()
    assert random.getstate() == py_before
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]

    # the global torch RNG advances by one draw per image, whatever the transform draws
    torch.manual_seed(9)
    ds[0]
    after = torch.rand(4)
    torch.manual_seed(9)
    torch.randint(0, 2**32, (), dtype=torch.int64)
    assert torch.equal(after, torch.rand(4))


def test_the_dataset_pickles_with_its_transforms(root):
    """DataLoader workers started with spawn get a pickled copy: it makes the same images."""
    ds = build(root, image_size=S, timm_transform={"train": OFAKD_TRAIN, "eval": EVAL}).train
    copy = pickle.loads(pickle.dumps(ds))
    torch.manual_seed(3)
    a = ds[4][0]
    torch.manual_seed(3)
    assert torch.equal(a, copy[4][0])


def test_random_erasing_after_normalisation(root):
    """re_prob 1 with the 'const' mode erases a rectangle of every image to 0 in normalised space, a value no
    stored pixel normalises to (CIFAR-100's mean times 255 is not an integer)."""
    plain = build(root, image_size=S, timm_transform={"train": PLAIN_TRAIN})
    erased = build(root, image_size=S, timm_transform={"train": {**PLAIN_TRAIN, "re_prob": 1.0, "re_mode": "const"}})
    for i in range(len(plain.train)):
        torch.manual_seed(i)
        x = plain.train[i][0]
        torch.manual_seed(i)
        e = erased.train[i][0]
        zero = (e == 0).all(dim=0)
        assert zero.any() and not (x == 0).all(dim=0).any()
        assert torch.equal(e[:, ~zero], x[:, ~zero]), "only the erased rectangle changes"


def test_auto_augment_rand_is_accepted(root):
    data = build(root, image_size=S, timm_transform={"train": {"auto_augment": "rand-m9-mstd0.5-inc1"}})
    assert "RandAugment" in repr(data.train.image_transform)
    torch.manual_seed(0)
    x, _ = data.train[0]
    assert x.shape == (3, S, S) and torch.isfinite(x).all()
    # an absent eval mapping is timm's default eval transform (crop_pct 0.875, bilinear)
    torch.testing.assert_close(data.val[1][0], torchvision_eval(raw(data.val, 1), S, 0.875, "bilinear"),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec, match", [
    ({"train": {"reprob": 0.25}}, r"data\.timm_transform\.train: unknown key 'reprob'; valid: scale, ratio, .*re_prob"),
    ({"eval": {"crop": 0.9}}, r"data\.timm_transform\.eval: unknown key 'crop'; valid: crop_pct, interpolation"),
    ({"test": {}}, r"data\.timm_transform: unknown key 'test'; valid: train, eval"),
    ("rand-m9-mstd0.5-inc1", r"data\.timm_transform must be a mapping"),
    ({"train": ["scale"]}, r"data\.timm_transform\.train must be a mapping"),
    ({"train": {"hflip": "yes"}}, r"data\.timm_transform\.train\.hflip must be a probability"),
    ({"train": {"scale": [0.08]}}, r"data\.timm_transform\.train\.scale must be a list of two numbers"),
    ({"eval": {"crop_pct": 0}}, r"data\.timm_transform\.eval\.crop_pct must be a number > 0"),
])
def test_a_malformed_option_is_refused_before_any_data_is_read(tmp_path, spec, match):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ValueError, match=match):
        CIFAR100().check(str(missing), timm_transform=spec)
    with pytest.raises(ValueError, match=match):
        CIFAR100().build(str(missing), timm_transform=spec)


def test_a_value_timm_refuses_names_the_option(root):
    with pytest.raises(ValueError, match=r"data\.timm_transform\.train: timm\.data\.create_transform refused"):
        build(root, image_size=S, timm_transform={"train": {"auto_augment": "bogus-m9"}})
    with pytest.raises(ValueError, match=r"data\.timm_transform\.eval: timm\.data\.create_transform refused"):
        build(root, image_size=S, timm_transform={"eval": {"interpolation": "no-such-mode"}})


def test_a_corruption_image_fn_applies_before_the_timm_eval_transform(root, tmp_path):
    from kdbench.corruptions import with_image_fn

    val = build(root, image_size=S, timm_transform={"eval": EVAL}).val
    inverted = with_image_fn(val, lambda img, i: 255 - img)
    assert val.image_fn is None
    x, _ = inverted[3]
    torch.testing.assert_close(x, torchvision_eval(255 - raw(val, 3), S, **EVAL), rtol=0, atol=1e-6)

    # released CIFAR-100-C images go through the same eval transform
    n = len(val)
    imgs = np.random.default_rng(0).integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "gaussian_noise.npy", imgs)
    np.save(tmp_path / "labels.npy", np.tile(val.labels.numpy(), 5))
    c = cifar100c_dataset(tmp_path, "gaussian_noise", 2, like=val)
    torch.testing.assert_close(c[1][0], torchvision_eval(imgs[n + 1], S, **EVAL), rtol=0, atol=1e-6)


def test_without_the_option_the_dataset_is_unchanged(root):
    """The default pipeline: normalise the 32×32 image, pad-4 crop + flip (train, torch RNG), bilinear resize."""
    from kdbench.corruptions import with_image_fn

    default = build(root, image_size=S)
    explicit = build(root, image_size=S, timm_transform=None)
    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    crop, resize = random_crop_flip(pad=4), resize_to(S)
    for data in (default, explicit):
        assert data.train.image_transform is None and data.val.image_transform is None
        for i in range(len(data.train)):
            torch.manual_seed(i)
            x = data.train[i][0]
            torch.manual_seed(i)
            ref = resize(crop((data.train.images[i].float() / 255 - mean) / std))
            assert torch.equal(x, ref)
        for i in range(len(data.val)):
            assert torch.equal(data.val[i][0], resize((data.val.images[i].float() / 255 - mean) / std))
        inverted = with_image_fn(data.val, lambda img, i: 255 - img)
        assert torch.equal(inverted[2][0], resize(((255 - data.val.images[2]).float() / 255 - mean) / std))
    at32 = build(root)
    assert at32.val[0][0].shape == (3, 32, 32)
    assert torch.equal(at32.val[0][0], (at32.val.images[0].float() / 255 - mean) / std)


def test_shape_corruption_side_and_validation_with_the_option(root):
    from kdbench.data.plugin import check_data, corruption_size_problem

    spec = {"train": OFAKD_TRAIN, "eval": {"crop_pct": 0.9, "interpolation": "bilinear"}}
    p = CIFAR100()
    assert p.synthetic_shape(image_size=224, timm_transform=spec) == (100, 3, 224)
    assert p.corruption_min_side(str(root), image_size=224, timm_transform=spec) == 32
    data = {"name": "cifar100", "root": str(root), "image_size": 224, "timm_transform": spec}
    check_data(data)
    assert corruption_size_problem(data, 32) is None
    with pytest.raises(ValueError, match=r"data\.timm_transform\.train: unknown key 'aa'"):
        check_data({**data, "timm_transform": {"train": {"aa": "rand-m9-mstd0.5-inc1"}}})


def test_suite_identity_without_and_with_the_option(write_suite, root):
    """A suite that does not set the option keeps its data mapping (and so its run ids): unset options are not
    part of it. Setting it makes other runs; a malformed one is named by the data check."""
    from kdb_util import tiny_suite

    from kdbench.suite import SuiteError, check_data_available, load_suite

    base = tiny_suite(data={"name": "cifar100", "root": str(root), "train_fraction": 0.2})
    plain = load_suite(write_suite(base))
    again = load_suite(write_suite(base))
    assert [s.run_id for s in plain.specs] == [s.run_id for s in again.specs]
    assert all("timm_transform" not in s.data for s in plain.specs)
    assert plain.specs[-1].data == {"name": "cifar100", "root": str(root), "train_fraction": 0.2}
    check_data_available(plain)

    spec = {"train": OFAKD_TRAIN, "eval": {"crop_pct": 0.9, "interpolation": "bilinear"}}
    timm = load_suite(write_suite({**base, "data": {**base["data"], "timm_transform": spec}}))
    assert all(s.data["timm_transform"] == spec for s in timm.specs)
    assert {s.run_id for s in timm.specs}.isdisjoint(s.run_id for s in plain.specs)
    assert [s.batch_rng for s in timm.specs] == [s.batch_rng for s in plain.specs]
    check_data_available(timm)

    bad = load_suite(write_suite({**base, "data": {**base["data"], "timm_transform": {"train": {"reprob": 0.25}}}}))
    with pytest.raises(SuiteError, match=r"data\.timm_transform\.train: unknown key 'reprob'"):
        check_data_available(bad)
