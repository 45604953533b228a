"""Cityscapes data: the official labelId -> trainId table, the writer of the exact on-disk layout read back through
the loader, the training pipeline (scale, crop, pad, flip) and the generated-on-demand dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdbench.data.base import DataFileError, DataLayoutError
from kdbench.data.cityscapes import (CLASSES, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, LABELS, SYNTHETIC_MARKER,
                                     TRAIN_ID_TO_LABEL_ID, Cityscapes, CityscapesSegmentation, ensure_synthetic,
                                     label_ids_to_train_ids, write_cityscapes)
from kdbench.registry import DATASETS

torch.set_num_threads(2)


def test_official_train_id_table():
    assert len(CLASSES) == 19
    assert CLASSES[0] == "road" and CLASSES[10] == "sky" and CLASSES[13] == "car" and CLASSES[18] == "bicycle"
    evaluated = {lid: tid for lid, tid in LABEL_ID_TO_TRAIN_ID.items() if tid != 255}
    assert evaluated == {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    ids = np.array([[0, 1, 6, 7, 9, 14, 18, 29, 30, 33, 34, 255]], dtype=np.uint8)
    assert label_ids_to_train_ids(ids).tolist() == [[255, 255, 255, 0, 255, 255, 255, 255, 255, 18, 255, 255]]


def test_writer_layout_and_loader_round_trip(tmp_path):
    root = write_cityscapes(tmp_path / "cs", n_train=3, n_val=2, height=32, width=64, seed=1)
    imgs = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    assert [p.parent.name for p in imgs] == ["aachen", "aachen", "bremen"]
    assert imgs[0].name == "aachen_000000_000019_leftImg8bit.png"
    label_path = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    assert label_path.is_file() and label_path.with_name("aachen_000000_000019_gtFine_color.png").is_file()
    assert len(list((root / "leftImg8bit" / "val" / "frankfurt").glob("*.png"))) == 2
    raw = np.asarray(Image.open(label_path))
    assert Image.open(label_path).mode == "L" and Image.open(imgs[0]).mode == "RGB"
    present = set(np.unique(raw).tolist())
    assert {1, 7, 8, 11, 17, 20, 23, 26}.issubset(present)  # ego vehicle (void) and several classes

    data = DATASETS.get("cityscapes")().build(str(root), crop_size=16)
    assert data.num_classes == 19 and data.classes == list(CLASSES) and len(data.train) == 3 and len(data.val) == 2
    x, y = data.val[0]
    assert x.shape == (3, 32, 64) and x.dtype == torch.float32 and y.shape == (32, 64) and y.dtype == torch.int64
    raw_val = np.asarray(Image.open(sorted((root / "gtFine" / "val").glob("*/*_labelIds.png"))[0]))
    expected = np.vectorize(lambda v: LABEL_ID_TO_TRAIN_ID.get(int(v), 255))(raw_val)
    assert np.array_equal(y.numpy(), expected)
    assert (y == IGNORE_INDEX).any() and set(torch.unique(y).tolist()) - {255} <= set(range(19))
    assert (y[-1] == IGNORE_INDEX).all()  # the ego vehicle's row is ignored
    img = np.asarray(Image.open(sorted((root / "leftImg8bit" / "val").glob("*/*.png"))[0])).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert np.allclose(x.permute(1, 2, 0).numpy(), (img / 255.0 - mean) / std, atol=1e-5)


def test_writer_is_deterministic(tmp_path):
    a = write_cityscapes(tmp_path / "a", n_train=2, n_val=1, height=32, width=48, seed=3)
    b = write_cityscapes(tmp_path / "b", n_train=2, n_val=1, height=32, width=48, seed=3)
    for pa in sorted(a.rglob("*.png")):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(b / pa.relative_to(a))))


def test_training_pipeline_scale_crop_pad_flip(tmp_path):
    root = write_cityscapes(tmp_path / "cs", n_train=2, n_val=1, height=32, width=64)
    data = Cityscapes().build(str(root), crop_size=[24, 40], scale_range=[0.5, 2.0])
    seen_pad = seen_crop = False
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = data.train[0]
        assert x.shape == (3, 24, 40) and y.shape == (24, 40)
        assert set(torch.unique(y).tolist()) <= set(range(19)) | {255}
        pad = (x == 0).all(dim=0) & (y == 255)
        seen_pad |= bool(pad[-1].all())  # a small scale leaves the crop larger than the image: padded
        seen_crop |= not bool(pad.any())
    assert seen_pad and seen_crop
    torch.manual_seed(7)
    a = data.train[1]
    torch.manual_seed(7)
    b = data.train[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the global RNG drives augmentation

    # without scaling, a full-size crop is the image itself or its mirror, labels moved with it
    plain = CityscapesSegmentation(data.train.files, train=True, crop_size=(32, 64), scale_range=(1.0, 1.0),
                                   cat_max_ratio=1.0)
    ref_x, ref_y = CityscapesSegmentation(data.train.files, train=False)[0]
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = plain[0]
        flipped = torch.equal(y, ref_y.flip(-1)) and torch.allclose(x, ref_x.flip(-1))
        assert flipped or (torch.equal(y, ref_y) and torch.allclose(x, ref_x))
        flips.add(flipped)
    assert flips == {True, False}


def test_cat_max_ratio_avoids_single_class_crops(tmp_path):
    root = write_cityscapes(tmp_path / "cs", n_train=4, n_val=1, height=64, width=128)
    files = Cityscapes().build(str(root)).train.files

    def dominant(ratio):
        ds = CityscapesSegmentation(files, train=True, crop_size=(12, 12), scale_range=(1.0, 1.0), flip=False,
                                    cat_max_ratio=ratio)
        torch.manual_seed(0)
        out = []
        for i in range(40):
            y = ds[i % 4][1]
            v = y[y != 255]
            out.append(float(torch.bincount(v).max()) / max(1, v.numel()) if v.numel() else 1.0)
        return np.mean([o >= 0.75 for o in out])

    assert dominant(0.75) < dominant(1.0)


def test_layout_errors_name_the_expected_layout(tmp_path):
    plugin = Cityscapes()
    with pytest.raises(DataLayoutError, match="leftImg8bit"):
        plugin.check(str(tmp_path / "missing"))
    root = write_cityscapes(tmp_path / "cs", n_train=1, n_val=1, height=16, width=32)
    plugin.check(str(root))
    next((root / "gtFine" / "val").glob("*/*_labelIds.png")).unlink()
    with pytest.raises(DataLayoutError, match="has no annotation .*gtFine_labelIds.png"):
        plugin.build(str(root))
    with pytest.raises(ValueError, match="crop_size"):
        plugin.check(str(root), crop_size="big")
    with pytest.raises(ValueError, match="scale_range"):
        plugin.check(str(root), scale_range=[2.0, 0.5])
    with pytest.raises(ValueError, match="synthetic: unknown key"):
        plugin.check(str(root), synthetic={"n_images": 3})


def test_synthetic_root_is_written_once_and_checked(tmp_path):
    root = tmp_path / "gen"
    args = {"n_train": 2, "n_val": 1, "height": 16, "width": 32, "seed": 0}
    Cityscapes().check(str(root), synthetic=args)  # not there yet: fine, build writes it
    data = Cityscapes().build(str(root), crop_size=16, synthetic=args)
    assert len(data.train) == 2 and json.loads((root / SYNTHETIC_MARKER).read_text()) == args
    stamp = (root / SYNTHETIC_MARKER).stat().st_mtime_ns
    ensure_synthetic(root, dict(args))
    assert (root / SYNTHETIC_MARKER).stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(DataLayoutError, match="generated with"):
        ensure_synthetic(root, {**args, "seed": 1})
    real = write_cityscapes(tmp_path / "real", n_train=1, n_val=1, height=16, width=32)
    with pytest.raises(DataLayoutError, match="not a dataset kdbench generated"):
        ensure_synthetic(real, args)


def test_label_table_is_the_official_package():
    """The table is read from cityscapesscripts (the dataset's official scripts), not written by hand."""
    from cityscapesscripts.helpers.labels import id2label, labels

    assert [l[:2] for l in LABELS] == [(l.name, l.id) for l in labels if l.id >= 0]
    for lid, tid in LABEL_ID_TO_TRAIN_ID.items():
        official = id2label[lid]
        assert tid == (IGNORE_INDEX if official.ignoreInEval else official.trainId)
        assert LABELS[lid][3] == official.color
    assert [id2label[TRAIN_ID_TO_LABEL_ID[t]].name for t in range(19)] == list(CLASSES)


def test_miou_matches_the_official_evaluator(tmp_path):
    """Our confusion matrix + segmentation_metrics against cityscapesscripts' evalPixelLevelSemanticLabeling on
    prediction / ground-truth label-id PNGs in the official layout: every class IoU and the mean, to 1e-6
    (void ground truth ignored, classes predicted but absent from the ground truth at IoU 0, classes absent from
    both left out of the mean)."""
    import copy

    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    from kdbench.tasks.segmentation import confusion_matrix, segmentation_metrics

    root = write_cityscapes(tmp_path / "cs", n_train=1, n_val=3, height=48, width=96, seed=5,
                            val_cities=("frankfurt", "lindau"))
    data = Cityscapes().build(str(root))
    rng = np.random.default_rng(0)
    results = tmp_path / "results"
    results.mkdir()
    to_label_id = np.full(256, 0, dtype=np.uint8)
    for t, lid in TRAIN_ID_TO_LABEL_ID.items():
        to_label_id[t] = lid
    conf = torch.zeros(19, 19, dtype=torch.int64)
    preds, gts = [], []
    for i, (_, gt_path) in enumerate(data.val.files):
        target = data.val[i][1]
        pred = target.clone()
        pred[pred == IGNORE_INDEX] = int(rng.integers(0, 19))  # void pixels get some class
        noise = torch.from_numpy(rng.random(tuple(pred.shape)) < 0.3)
        pred[noise] = torch.from_numpy(rng.integers(0, 16, size=int(noise.sum())))  # 16-18 never predicted
        conf += confusion_matrix(pred, target, 19)
        name = gt_path.name.replace("_gtFine_labelIds.png", "_pred.png")
        Image.fromarray(to_label_id[pred.numpy()], mode="L").save(results / name)
        preds.append(str(results / name))
        gts.append(str(gt_path))
    ours = segmentation_metrics(conf, list(CLASSES))

    args = copy.copy(official.args)
    args.quiet, args.JSONOutput, args.evalInstLevelScore, args.evalPixelAccuracy = True, False, False, False
    args.exportFile = str(tmp_path / "unused.json")
    res = official.evaluateImgLists(preds, gts, args)
    scores = {k: v for k, v in res["classScores"].items() if k in CLASSES}
    assert set(scores) == set(CLASSES)
    compared = 0
    for name, v in scores.items():
        if np.isnan(v):
            assert f"IoU/{name}" not in ours
        else:
            assert ours[f"IoU/{name}"] / 100 == pytest.approx(v, abs=1e-6)
            compared += 1
    assert 8 <= compared < 19 and any(v == 0 for v in scores.values() if not np.isnan(v))
    assert ours["mIoU"] / 100 == pytest.approx(res["averageScoreClasses"], abs=1e-6)
    assert not (tmp_path / "unused.json").exists()


def test_image_label_size_mismatch_and_undecodable_files_are_named(tmp_path):
    root = write_cityscapes(tmp_path / "cs", n_train=3, n_val=1, height=32, width=64)
    data = Cityscapes().build(str(root), crop_size=16)
    (img0, lab0), (img1, lab1), (img2, lab2) = data.train.files
    Image.open(lab0).resize((32, 16), Image.NEAREST).save(lab0)
    with pytest.raises(DataLayoutError) as e:
        data.train[0]
    msg = str(e.value)
    assert str(img0) in msg and str(lab0) in msg and "64×32" in msg and "32×16" in msg and "\n" not in msg
    raw = img1.read_bytes()
    img1.write_bytes(raw[: len(raw) // 2])  # truncated PNG
    lab2.write_bytes(b"garbage")
    val_label = data.val.files[0][1]
    Image.fromarray(label_ids_to_train_ids(np.asarray(Image.open(val_label))), mode="L").save(val_label)
    with pytest.raises(DataFileError) as e:  # a labelTrainIds PNG (255 = ignore) under the labelIds name
        data.val[0]
    assert str(val_label) in str(e.value) and "value 255, above the official label ids 0..33" in str(e.value)
    for k, path in ((1, img1), (2, lab2)):
        with pytest.raises(DataFileError) as e:
            data.train[k]
        assert str(path) in str(e.value) and "cannot decode" in str(e.value) and "\n" not in str(e.value)
