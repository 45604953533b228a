"""The seed papers' suites: Tiny-ImageNet and ImageNet validate and dry-run against generated trees in the datasets'
real on-disk layouts (JPEG files written by PIL), the Tiny-ImageNet teacher checkpoint at the suite's path loads
into the suite's teacher with the dataset's 200 classes, the CIFAR-100 suites that gained methods only gained runs,
and every published number a suite quotes names its source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdbench.cli import main
from kdbench.suite import load_suite

SUITES = Path(__file__).resolve().parent.parent / "suites"
TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]
#: the methods the seed-papers issue added to the two CIFAR-100 suites (labels)
ADDED = {"cifar100_homogeneous.yaml": {"dkd", "dist", "fitnet"},
         "cifar100_heterogeneous.yaml": {"dkd", "dist", "fitnet", "ofa"}}


def _jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


def write_tiny_imagenet(root: Path, per_class: int = 2, val_per_class: int = 2) -> Path:
    """Tiny-ImageNet as the official zip unpacks: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG with
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<k>.JPEG labelled by val/val_annotations.txt (image, wnid, box,
    tab-separated), test/images/test_<k>.JPEG (unlabelled); 64x64 JPEG images."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (root / "words.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate(TINY_WNIDS)))
    for c, w in enumerate(TINY_WNIDS):
        boxes = []
        for i in range(per_class):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), 100 * c + i)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    rows, k = [], 0
    for _ in range(val_per_class):
        for c, w in enumerate(TINY_WNIDS):  # interleaved classes, as in the real file
            _jpeg(root / "val" / "images" / f"val_{k}.JPEG", (64, 64), 10_000 + k)
            rows.append(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for k in range(2):
        _jpeg(root / "test" / "images" / f"test_{k}.JPEG", (64, 64), 20_000 + k)
    return root


def write_imagenet(root: Path, per_class: int = 2, val_per_class: int = 1) -> Path:
    """ImageNet's class-folder layout: train/<wnid>/<wnid>_<i>.JPEG, val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG;
    JPEG images of varied sizes, as the real ones."""
    k = 1
    for c, w in enumerate(IMAGENET_WNIDS):
        for i in range(per_class):
            _jpeg(root / "train" / w / f"{w}_{i}.JPEG", (40 + 7 * i, 30 + 5 * c), 100 * c + i)
        for _ in range(val_per_class):
            _jpeg(root / "val" / w / f"ILSVRC2012_val_{k:08d}.JPEG", (50, 37), 10_000 + k)
            k += 1
    return root


def _torch_file(path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}}, path)


def _teacher_weights(suite: Path) -> list[str]:
    return sorted({s.teacher["weights"] for s in load_suite(suite).specs if s.teacher and s.teacher.get("weights")})


@pytest.fixture
def roots(tmp_path, monkeypatch):
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    monkeypatch.setenv("KDBENCH_DATA", str(data))
    monkeypatch.setenv("KDBENCH_CKPT", str(ckpt))
    return data, ckpt


def test_tiny_imagenet_validates_and_dry_runs_on_its_original_layout(roots, capsys):
    data, ckpt = roots
    path = SUITES / "tiny_imagenet.yaml"
    suite = load_suite(path)
    assert suite.raw["data"]["root"] == str(data / "tiny-imagenet-200")
    write_tiny_imagenet(data / "tiny-imagenet-200")
    weights = _teacher_weights(path)
    assert weights == [str(ckpt / "tiny_imagenet_teachers" / "ResNet18_vanilla" / "ti_res18")]  # mdistiller's path
    assert main(["validate", str(path)]) == 1  # the teacher checkpoint is missing, and said so
    assert "teacher weights not found" in capsys.readouterr().err
    for w in weights:
        _torch_file(Path(w))
    assert main(["validate", str(path)]) == 0
    assert f"ok   {path}: tiny_imagenet v1, {len(suite.specs)} runs" in capsys.readouterr().out
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{path}: tiny_imagenet v1, {len(suite.specs)} runs")
    assert "resnet18→shufflev2" in out and "resnet18→mobilenetv2" in out
    # without the annotation file the validation images are unlabelled: refused, naming the folder
    (data / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    assert main(["validate", str(path)]) == 1
    assert str(data / "tiny-imagenet-200" / "val") in capsys.readouterr().err


def test_tiny_imagenet_data_and_teacher_as_the_suite_builds_them(roots):
    """The imagefolder plugin reads the original layout with the suite's options: 64 px, the classes of wnids.txt
    (sorted train folders), validation labels from val_annotations.txt; a teacher checkpoint in mdistiller's layout
    ({"model": state_dict}) at the suite's path loads into the suite's teacher with that many classes."""
    import torch

    from kdbench.data.imagefolder import ImageFolderData
    from kdbench.models.sources import build_model, load_weights

    data, _ = roots
    root = write_tiny_imagenet(data / "tiny-imagenet-200")
    suite = load_suite(SUITES / "tiny_imagenet.yaml")
    options = {k: v for k, v in suite.raw["data"].items() if k not in ("name", "root")}
    d = ImageFolderData().build(suite.raw["data"]["root"], **options)
    assert d.classes == sorted((root / "wnids.txt").read_text().split()) and d.num_classes == 3
    assert (len(d.train), len(d.val)) == (6, 6)
    rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines()]
    assert [(p.name, d.classes[t]) for p, t in d.val.samples] == [(r[0], r[1]) for r in rows]
    x, _ = d.val[0]
    assert x.shape == (3, 64, 64)
    torch.manual_seed(0)
    assert d.train[0][0].shape == (3, 64, 64)

    teacher = suite.raw["pairs"][0]["teacher"]
    net = build_model(teacher["model"], d.num_classes, 3)
    Path(teacher["weights"]).parent.mkdir(parents=True)
    torch.save({"model": net.net.state_dict(), "epoch": 200}, teacher["weights"])
    load_weights(build_model(teacher["model"], d.num_classes, 3), teacher["weights"])


def test_imagenet_validates_and_dry_runs_on_its_class_folder_layout(roots, capsys):
    data, ckpt = roots
    path = SUITES / "imagenet.yaml"
    suite = load_suite(path)
    write_imagenet(data / "imagenet")
    weights = _teacher_weights(path)
    assert weights == sorted(str(ckpt / "imagenet" / f) for f in (
        "resnet34-b627a593.pth", "resnet50-0676ba61.pth", "deit_tiny_patch16_224-a1311bcf.pth"))
    for w in weights:
        _torch_file(Path(w))
    assert main(["validate", str(path)]) == 0
    assert f"ok   {path}: imagenet v1, {len(suite.specs)} runs" in capsys.readouterr().out
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{path}: imagenet v1, {len(suite.specs)} runs")
    for pair in ("resnet34→resnet18", "resnet50→mobilenetv1", "deit_t→resnet18"):
        assert pair in out

    from kdbench.data.imagefolder import ImageFolderData

    d = ImageFolderData().build(str(data / "imagenet"), image_size=suite.raw["data"]["image_size"])
    assert d.classes == IMAGENET_WNIDS and (len(d.train), len(d.val)) == (6, 3)
    assert d.val[0][0].shape == (3, 224, 224)


def test_imagenet_mobilenet_v1_is_the_classic_network():
    """timm's mobilenetv1_100 with ReLU is mdistiller's/ReviewKD's MobileNet-V1: 1024-d features, 4.2M parameters,
    ReLU (not timm's default ReLU6)."""
    import torch

    from kdbench.models.sources import build_model

    spec = next(p["student"] for p in load_suite(SUITES / "imagenet.yaml").raw["pairs"]
                if p["name"] == "resnet50→mobilenetv1")
    m = build_model(spec["model"], 1000, 3, **spec.get("kwargs", {}))
    assert m.net.num_features == 1024
    assert round(sum(p.numel() for p in m.net.parameters()) / 1e6, 1) == 4.2
    acts = {type(a).__name__ for a in m.net.modules() if "ReLU" in type(a).__name__}
    assert acts == {"ReLU"}
    with torch.no_grad():
        assert m.net(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", sorted(ADDED))
def test_added_methods_only_add_runs(name):
    """The runs of the methods that were there before are the runs of the suite without the added methods: same
    run_ids (adding a method, its pair params or its references renames nothing)."""
    path = SUITES / name
    full = load_suite(path)
    labels = lambda m: m if isinstance(m, str) else m.get("label") or m["name"]  # noqa: E731
    before = [m for m in full.raw["methods"] if labels(m) not in ADDED[name]]
    assert len(before) == len(full.raw["methods"]) - len(ADDED[name])
    refs = [r for r in full.raw.get("reference") or [] if r["method"] not in ADDED[name]]
    old = load_suite(path, [f"methods={json.dumps(before)}", f"reference={json.dumps(refs)}"])
    assert {s.run_id for s in full.specs if s.label not in ADDED[name]} == {s.run_id for s in old.specs}
    assert {s.label for s in full.specs} >= ADDED[name]


@pytest.mark.parametrize("name", ["cifar100_homogeneous.yaml", "cifar100_heterogeneous.yaml", "tiny_imagenet.yaml",
                                  "imagenet.yaml"])
def test_every_reference_names_its_source(name):
    suite = load_suite(SUITES / name)
    refs = suite.raw.get("reference") or []
    assert all(isinstance(r.get("source"), str) and r["source"].strip() for r in refs), name
    # a quoted number reaches the runs of its cell (so that tables print it)
    for r in refs:
        cells = [s for s in suite.specs if s.pair == r["pair"] and s.label == r["method"] and s.kind == "distill"]
        assert r["method"] == "teacher" or any(
            any(x.get("value") == r["value"] for x in s.reference) for s in cells), r


def test_cifar100_heterogeneous_says_its_recipe_is_not_ofas():
    """No number from OFA's paper is attached (another recipe); the description says how the recipes differ."""
    suite = load_suite(SUITES / "cifar100_heterogeneous.yaml")
    text = " ".join(suite.raw["description"].split())
    assert "not OFA's" in text and "300 epochs" in text and "configs/cifar/cnn.yaml" in text
    assert not suite.raw.get("reference")
