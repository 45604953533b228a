"""Corruption engine, dataset hooks, the resumable sweep, CIFAR-100-C files and the robustness metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdbench import robustness as RB

ROOT = Path(__file__).resolve().parents[1]


def _image(h=32, w=32, c=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- names
def test_sets_and_families():
    assert len(RB.BENCHMARK) == 15 and len(RB.EXTRA) == 4 and len(RB.ALL) == 19
    assert RB.resolve_corruptions("benchmark") == list(RB.BENCHMARK)
    assert RB.resolve_corruptions("all") == list(RB.ALL)
    assert RB.resolve_corruptions("extra") == list(RB.EXTRA)
    assert RB.resolve_corruptions(["fog", "gaussian_noise", "fog"]) == ["gaussian_noise", "fog"]
    assert RB.resolve_corruptions("noise,saturate") == ["gaussian_noise", "shot_noise", "impulse_noise", "saturate"]
    assert RB.family_of("jpeg_compression") == "digital" and RB.family_of("spatter") == "extra"
    from imagecorruptions import get_corruption_names

    assert list(RB.ALL) == get_corruption_names("all")
    for fam in ("noise", "blur", "weather", "digital"):
        assert list(RB.FAMILIES[fam]) == get_corruption_names(fam)


def test_unknown_names_and_severities_are_refused():
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*benchmark, extra, all.*gaussian_noise"):
        RB.resolve_corruptions(["gausian_noise"])
    for bad in (0, 6, [1, 7], 2.5, []):
        with pytest.raises(ValueError, match="severities must be integers in 1-5"):
            RB.check_severities(bad)
    assert RB.check_severities([5, 1, 1]) == [1, 5]


# ------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("name", RB.ALL)
def test_every_corruption_on_32x32_rgb_and_gray(name):
    img = _image()
    for s in (1, 5):
        out = RB.corrupt(img, name, s, key=3)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, RB.corrupt(img, name, s, key=3))
    gray = _image(c=None)
    out = RB.corrupt(gray, name, 3, key=1)
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert RB.corrupt(gray[..., None], name, 3, key=1).shape == (32, 32, 1)


def test_changes_pixels_and_depends_on_key_and_severity():
    img = _image(48, 40)
    a = RB.corrupt(img, "gaussian_noise", 3, key=0)
    assert not np.array_equal(a, img)
    assert not np.array_equal(a, RB.corrupt(img, "gaussian_noise", 3, key=1))
    assert not np.array_equal(a, RB.corrupt(img, "gaussian_noise", 4, key=0))
    # the library's own output for the documented seed
    from imagecorruptions import corrupt as lib

    np.random.seed(RB.seed_for(0, "gaussian_noise", 3))
    assert np.array_equal(a, lib(img, severity=3, corruption_name="gaussian_noise"))


def test_global_numpy_rng_is_restored():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    RB.corrupt(_image(), "shot_noise", 2, key=9)
    assert np.array_equal(np.random.rand(3), expected)


def test_small_images_are_refused_clearly():
    with pytest.raises(ValueError, match=r"8×8 pixels is too small.*at least 32×32.*kdbench validate SUITE. names the data option"):
        RB.corrupt(_image(8, 8), "fog", 1, key=0)
    with pytest.raises(ValueError, match="uint8"):
        RB.corrupt(_image().astype(np.float32), "fog", 1, key=0)


_CHILD = """
import hashlib, sys, numpy as np
from kdbench.robustness import corrupt
np.random.seed(int(sys.argv[1]))  # a different global state in each process must not matter
rng = np.random.default_rng(7)
img = rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)
h = hashlib.sha256()
for name in ("gaussian_noise", "glass_blur", "snow", "frost", "elastic_transform", "spatter"):
    h.update(corrupt(img, name, 4, key=11).tobytes())
print(h.hexdigest())
"""


def test_bit_identical_in_two_processes():
    outs = [subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True, check=True,
                           cwd=ROOT).stdout.strip() for seed in (1, 2)]
    assert outs[0] == outs[1] and len(outs[0]) == 64


# ------------------------------------------------------------------------------------------- dataset hooks
def _tensor_images(n=6, c=3, size=32, dtype="uint8"):
    import torch

    from kdbench.data.base import TensorImages

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8))
    if dtype == "float":
        x = x.float() / 255.0
    return TensorImages(x, torch.arange(n) % 3, [0.5] * c, [0.25] * c)


def test_tensor_images_hook_before_normalisation():
    import torch

    ds = _tensor_images()
    cor = RB.with_image_fn(ds, RB.Corruptor("contrast", 5))
    assert ds.image_fn is None and cor.images is ds.images
    x, y = cor[2]
    raw = ds.images[2].permute(1, 2, 0).numpy()
    want = torch.from_numpy(RB.corrupt(raw, "contrast", 5, 2)).permute(2, 0, 1).float() / 255.0
    assert torch.allclose(x, (want - 0.5) / 0.25)
    assert torch.equal(ds[2][0], (ds.images[2].float() / 255.0 - 0.5) / 0.25)  # original untouched
    gray = RB.with_image_fn(_tensor_images(c=1, dtype="float"), RB.Corruptor("impulse_noise", 3))
    assert gray[0][0].shape == (1, 32, 32)
    from torch.utils.data import Subset

    sub = RB.with_image_fn(Subset(ds, [4, 5]), RB.Corruptor("fog", 1))
    assert torch.equal(sub[0][0], RB.with_image_fn(ds, RB.Corruptor("fog", 1))[4][0])
    with pytest.raises(ValueError, match="does not take an image_fn"):
        RB.with_image_fn([1, 2], None)


def test_coco_hook_keeps_boxes(tmp_path):
    import torch

    from kdbench.data.coco import CocoDetection, write_coco_shapes

    root = write_coco_shapes(tmp_path / "coco", n_train=2, n_val=2, seed=0)
    ds = CocoDetection(root, "val2017", train=False, min_size=64, max_size=96)
    cor = RB.with_image_fn(ds, RB.Corruptor("motion_blur", 2))
    (x0, t0), (x1, t1) = ds[0], cor[0]
    assert x0.shape == x1.shape and not torch.equal(x0, x1)
    assert torch.equal(t0["boxes"], t1["boxes"]) and t0["size"] == t1["size"]


def test_cityscapes_and_imagefolder_hooks(tmp_path):
    import torch

    from kdbench.data.cityscapes import CityscapesSegmentation, _pair_files, write_cityscapes
    from kdbench.data.imagefolder import ImageFolderData, write_imagefolder

    root = write_cityscapes(tmp_path / "cs", n_train=1, n_val=1, height=32, width=64)
    ds = CityscapesSegmentation(_pair_files(Path(root), "val"), train=False)
    cor = RB.with_image_fn(ds, RB.Corruptor("pixelate", 5))
    assert torch.equal(ds[0][1], cor[0][1]) and not torch.equal(ds[0][0], cor[0][0])
    data = ImageFolderData().build(str(write_imagefolder(tmp_path / "if", size=40)), image_size=32, augment=False)
    cor = RB.with_image_fn(data.val, RB.Corruptor("brightness", 5))
    assert cor[1][0].shape == data.val[1][0].shape and not torch.equal(cor[1][0], data.val[1][0])


class _RecordSize:
    """An image_fn that records the size it is called with and inverts the image (a visible change)."""

    def __init__(self):
        self.shapes = []

    def __call__(self, image, key):
        self.shapes.append(image.shape)
        return 255 - image


def test_imagefolder_corrupts_the_resized_center_crop_as_imagenet_c(tmp_path):
    """ImageNet-C corrupts the Resize + CenterCrop image (256 -> 224), before ToTensor and normalisation: the hook
    sees crop-size images, and the result is the crop corrupted, then converted; COCO-style 'before resizing'
    would see the file's 48×40 pixels."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from kdbench.data.imagefolder import ImageFolderData, _Folder, _split_transform, write_imagefolder

    root = write_imagefolder(tmp_path / "if", num_classes=2, per_class=2, size=48)
    data = ImageFolderData().build(str(root), image_size=32, augment=False)  # Resize(37) + CenterCrop(32)
    rec = _RecordSize()
    cor = RB.with_image_fn(data.val, rec)
    x = cor[1][0]
    assert rec.shapes == [(32, 32, 3)] and x.shape == data.val[1][0].shape == (3, 32, 32)
    geometric, rest = _split_transform(data.val.transform)
    assert [type(t).__name__ for t in geometric] == ["Resize", "CenterCrop"]
    crop = np.asarray(T.Compose(geometric)(Image.open(data.val.samples[1][0]).convert("RGB")))
    assert torch.equal(x, T.Compose(rest)(Image.fromarray(255 - crop)))
    # a real corruption: the same pixels as corrupting that crop by hand
    fog = RB.with_image_fn(data.val, RB.Corruptor("fog", 3))[1][0]
    assert torch.equal(fog, T.Compose(rest)(Image.fromarray(RB.corrupt(crop, "fog", 3, 1))))
    # no geometric part (a tiny folder read as is): the decoded image; any other transform: before it
    rec = _RecordSize()
    plain = _Folder(root / "val", T.Compose([T.ToTensor()]), image_fn=rec)
    assert plain[0][0].shape == (3, 48, 48) and rec.shapes == [(48, 48, 3)]
    rec = _RecordSize()
    assert _Folder(root / "val", T.ToTensor(), image_fn=rec)[0][0].shape == (3, 48, 48)
    assert rec.shapes == [(48, 48, 3)]


def test_imagefolder_cells_from_before_the_crop_order_are_redone(tmp_path):
    """A generated cell records where the images were corrupted (``point``); an ImageFolder sweep redoes a cell
    written without one (corrupted before resizing, the old order), while other datasets' old cells (corrupted
    before resizing, as they still are) are reused."""
    from torch.utils.data import Subset

    from kdbench.data.imagefolder import ImageFolderData, write_imagefolder

    root = write_imagefolder(tmp_path / "if", num_classes=2, per_class=2, size=48)
    data = ImageFolderData().build(str(root), image_size=32, augment=False)
    assert RB.corruption_point(data.val) == "center_crop" == RB.corruption_point(Subset(data.val, [0, 1]))
    tensors = _tensor_images(n=4)
    assert RB.corruption_point(tensors) == "decoded"
    for ds, point, redone in ((data.val, "center_crop", True), (tensors, "decoded", False)):
        task, cells = _MeanBrightness(), tmp_path / point
        RB.evaluate_corruptions(None, task, ds, "cpu", corruptions=["brightness"], severities=[1], cell_dir=cells,
                                batch_size=4, log=lambda s: None)
        path = cells / "brightness_s1.json"
        cell = json.loads(path.read_text())
        assert cell["point"] == point and task.calls == 1
        del cell["point"]  # as written before cells recorded it
        path.write_text(json.dumps(cell))
        RB.evaluate_corruptions(None, task, ds, "cpu", corruptions=["brightness"], severities=[1], cell_dir=cells,
                                batch_size=4, log=lambda s: None)
        assert task.calls == (2 if redone else 1)
        assert json.loads(path.read_text()).get("point") == (point if redone else None)


# ------------------------------------------------------------------------------------------- sweep
class _MeanBrightness:
    """A stand-in classifier task: top1 = % of images whose mean pixel (normalised) is above 0 when label 0."""

    name = "classification"
    primary_metric = "top1"
    metrics = {"top1": True, "loss": False}

    def __init__(self):
        self.calls = 0

    def loader(self, dataset, batch_size, num_workers=0):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)

    def evaluate(self, net, loader, device):
        self.calls += 1
        xs = [x for x, _ in loader]
        import torch

        x = torch.cat(xs)
        return {"top1": float(100.0 * (x.mean(dim=(1, 2, 3)) > 0).float().mean()), "loss": float(x.std()),
                "ignored": 1.0}


def test_sweep_writes_cells_resumes_and_matches_workers(tmp_path):
    ds = _tensor_images(n=8)
    task = _MeanBrightness()
    logs = []
    rows = RB.evaluate_corruptions(None, task, ds, "cpu", corruptions=["brightness", "contrast"], severities=[1, 5],
                                   cell_dir=tmp_path / "evals", batch_size=4, log=logs.append)
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == [
        "brightness_s1.json", "brightness_s5.json", "contrast_s1.json", "contrast_s5.json"]
    assert task.calls == 4 and any("images/s" in line for line in logs)
    top = [r for r in rows if r["metric"] == "top1"]
    assert [(r["corruption"], r["severity"]) for r in top] == [("brightness", 1), ("brightness", 5), ("contrast", 1),
                                                               ("contrast", 5)]
    assert all(r["eval"] == "corruptions" and r["select"] == "final" and r["higher_is_better"] for r in top)
    assert {r["metric"] for r in rows} == {"top1", "loss", "images_per_s"}
    # resume: nothing recomputed, same rows
    (tmp_path / "evals" / "contrast_s5.json").write_text("{trunc")  # a partial cell is redone
    again = RB.evaluate_corruptions(None, task, ds, "cpu", corruptions=["brightness", "contrast"], severities=[1, 5],
                                    cell_dir=tmp_path / "evals", batch_size=4, log=logs.append)
    assert task.calls == 5
    strip = lambda rs: [(r["corruption"], r["severity"], r["metric"], r["value"]) for r in rs if r["metric"] != "images_per_s"]
    assert strip(again) == strip(rows)
    # DataLoader workers corrupt the same pixels as the main process (random corruptions; "loss" here is the
    # std of every pixel of the set, so any pixel difference shows)
    kw = dict(corruptions=["gaussian_noise", "glass_blur", "snow"], severities=[2], batch_size=3, log=logs.append)
    main = RB.evaluate_corruptions(None, task, ds, "cpu", cell_dir=tmp_path / "m", **kw)
    w = RB.evaluate_corruptions(None, task, ds, "cpu", cell_dir=tmp_path / "w", num_workers=2, **kw)
    assert strip(w) == strip(main) and len(strip(main)) == 6
    cell = json.loads((tmp_path / "evals" / "brightness_s1.json").read_text())
    assert cell["n_images"] == 8 and cell["family"] == "weather" and cell["images_per_s"] > 0


def test_cifar100_c_files_match_on_the_fly(tmp_path):
    import torch

    from kdbench.data.cifar import CIFAR100, cifar100c_dataset, write_cifar100, write_cifar100_c

    write_cifar100(tmp_path / "c100", n_train_per_class=1, n_test_per_class=1, num_classes=4)
    data = CIFAR100().build(str(tmp_path / "c100"), augment=False)
    out = write_cifar100_c(tmp_path / "c100", tmp_path / "C", corruptions=["fog", "shot_noise"])
    arr = np.load(out / "fog.npy")
    assert arr.shape == (20, 32, 32, 3) and arr.dtype == np.uint8 and np.load(out / "labels.npy").shape == (20,)
    sl = cifar100c_dataset(out, "fog", 3, like=data.val)
    onfly = RB.with_image_fn(data.val, RB.Corruptor("fog", 3))
    assert len(sl) == 4
    for i in range(4):
        assert torch.equal(sl[i][0], onfly[i][0]) and int(sl[i][1]) == int(data.val[i][1])
    task = _MeanBrightness()
    a = RB.evaluate_corruptions(None, task, data.val, "cpu", corruptions="fog,shot_noise", severities=[2, 5],
                                cell_dir=tmp_path / "a", batch_size=2, log=lambda s: None)
    b = RB.evaluate_corruptions(None, task, data.val, "cpu", corruptions="fog,shot_noise", severities=[2, 5],
                                cell_dir=tmp_path / "b", batch_size=2, log=lambda s: None, released=out)
    key = lambda rs: [(r["corruption"], r["severity"], r["metric"], r["value"]) for r in rs if r["metric"] == "top1"]
    assert key(a) == key(b)
    # the source is recorded in every cell and row: a folder write_cifar100_c wrote is generated (it says so)...
    assert json.loads((out / "kdbench_generated.json").read_text())["source"] == "generated"
    assert {r["source"] for r in a + b} == {"generated"}
    # ... the released files (no mark) are "released", in other cells than the generated ones
    (out / "kdbench_generated.json").unlink()
    c = RB.evaluate_corruptions(None, task, data.val, "cpu", corruptions="fog", severities=[2], cell_dir=tmp_path / "a",
                                batch_size=2, log=lambda s: None, released=out)
    assert {r["source"] for r in c} == {"released"} and key(c) == [k for k in key(a) if k[:2] == ("fog", 2)]
    assert json.loads((tmp_path / "a" / "fog_s2.json").read_text())["source"] == "released"
    rec = {"kind": "eval", "eval": {"name": "corruptions", "root": str(out)}, "metrics": c}
    assert RB.record_source(rec) == ("released", str(out))
    assert RB.record_source({"kind": "eval", "eval": {"name": "corruptions"}, "metrics": a}) == ("generated", None)
    from kdbench.data.base import DataLayoutError

    with pytest.raises(DataLayoutError, match="no file .*snow.npy"):
        cifar100c_dataset(out, "snow", 1, like=data.val)


# ------------------------------------------------------------------------------------------- metrics
def test_mpc_rpc_and_families_by_hand():
    # AP grid: value = 30 - 2 * severity for every benchmark corruption except fog (20 at every severity)
    grid = {(c, s): (20.0 if c == "fog" else 30.0 - 2 * s) for c in RB.BENCHMARK for s in (1, 2, 3, 4, 5)}
    grid.update({("spatter", s): 5.0 for s in (1, 2, 3, 4, 5)})
    out = RB.performance_summary(40.0, grid)
    # 14 corruptions average 30 - 2*3 = 24, fog 20: (14 * 24 + 20) / 15 = 23.7333
    assert out["P"] == 40.0
    assert out["mPC"] == pytest.approx((14 * 24 + 20) / 15)
    assert out["rPC"] == pytest.approx((14 * 24 + 20) / 15 / 40)
    assert out["noise"] == pytest.approx(24.0) and out["weather"] == pytest.approx((3 * 24 + 20) / 4)
    assert out["extra"] == pytest.approx(5.0)


def test_mce_and_relative_mce_by_hand():
    # two corruptions, two severities; model f and reference r (top-1 accuracies)
    f = {("gaussian_noise", 1): 60.0, ("gaussian_noise", 2): 50.0, ("fog", 1): 70.0, ("fog", 2): 65.0}
    r = {("gaussian_noise", 1): 50.0, ("gaussian_noise", 2): 40.0, ("fog", 1): 60.0, ("fog", 2): 50.0}
    out = RB.error_summary(75.0, f, 70.0, r)
    # errors f: gn 40, 50; fog 30, 35. ref: gn 50, 60; fog 40, 50. clean errors 25 and 30.
    ce_gn, ce_fog = (40 + 50) / (50 + 60), (30 + 35) / (40 + 50)
    rel_gn = ((40 - 25) + (50 - 25)) / ((50 - 30) + (60 - 30))  # 40 / 50
    rel_fog = ((30 - 25) + (35 - 25)) / ((40 - 30) + (50 - 30))  # 15 / 30
    assert out["E"] == 25.0
    assert out["mCE"] == pytest.approx(100 * (ce_gn + ce_fog) / 2)
    assert out["rel_mCE"] == pytest.approx(100 * (0.8 + 0.5) / 2) == pytest.approx(100 * (rel_gn + rel_fog) / 2)
    assert out["noise"] == pytest.approx(100 * ce_gn) and out["weather"] == pytest.approx(100 * ce_fog)
    assert math.isnan(out["blur"])
    same = RB.error_summary(70.0, r, 70.0, r)
    assert same["mCE"] == pytest.approx(100.0) and same["rel_mCE"] == pytest.approx(100.0)


def test_sweep_with_the_real_classification_task_on_digits(tmp_path):
    """Digits at 32×32 (the 8×8 originals are refused with the image_size hint) through ClassificationTask."""
    import torch

    from kdbench.data.digits import Digits
    from kdbench.method import Outputs
    from kdbench.tasks.classification import ClassificationTask

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(32 * 32, 10)

        def forward(self, x):
            return Outputs(logits=self.fc(x.flatten(1)))

    task = ClassificationTask()
    small = Digits().build(image_size=8).val
    with pytest.raises(ValueError, match="8×8 pixels is too small.*names the data option to change"):
        RB.with_image_fn(small, RB.Corruptor("fog", 1))[0]
    val = torch.utils.data.Subset(Digits().build(image_size=32).val, list(range(24)))
    rows = RB.evaluate_corruptions(Linear(), task, val, "cpu", corruptions=["gaussian_noise"], severities=[1, 5],
                                   cell_dir=tmp_path, batch_size=8, log=lambda s: None)
    top1 = {r["severity"]: r["value"] for r in rows if r["metric"] == "top1"}
    assert set(top1) == {1, 5} and all(0 <= v <= 100 for v in top1.values())
    assert {r["metric"] for r in rows} == {"top1", "top5", "loss", "images_per_s"}
    assert all(r["higher_is_better"] is (r["metric"] != "loss") for r in rows)


def test_sweep_refuses_small_images_before_workers_start(tmp_path):
    ds = _tensor_images(n=4, size=16)
    with pytest.raises(ValueError, match="16×16 pixels is too small"):
        RB.evaluate_corruptions(None, _MeanBrightness(), ds, "cpu", corruptions="fog", severities=[1],
                                cell_dir=tmp_path, batch_size=2, num_workers=2, log=lambda s: None)
    assert not list(tmp_path.iterdir())
