"""COCO data: the generated-data writer (exact COCO format), the loader (resize/flip/labels/batching) and the
evaluation (COCOeval on hand-made cases with known AP, and the task's evaluate end to end with an oracle)."""

import json
import math

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from kdbench.data.base import DataFileError, DataLayoutError
from kdbench.data.coco import (SHAPE_CATEGORIES, Coco, CocoShapes, collate_detection, resized_size,
                               write_coco_shapes)
from kdbench.method import Outputs
from kdbench.tasks.detection import DetectionTask, coco_eval, coco_results


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_coco_shapes(tmp_path_factory.mktemp("coco") / "shapes", n_train=6, n_val=4, seed=1)


def test_writer_writes_exact_coco_layout(shapes):
    for split, n in (("train2017", 6), ("val2017", 4)):
        d = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        assert set(d) == {"info", "licenses", "images", "annotations", "categories"}
        assert [c["id"] for c in d["categories"]] == [c for c, _ in SHAPE_CATEGORIES]
        assert len(d["images"]) == n and len({im["id"] for im in d["images"]}) == n
        ids = {im["id"]: im for im in d["images"]}
        assert len({a["id"] for a in d["annotations"]}) == len(d["annotations"]) >= n  # >= 1 object per image
        for a in d["annotations"]:
            im = ids[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["category_id"] in {c for c, _ in SHAPE_CATEGORIES}
            assert 0 <= x and 0 <= y and x + w <= im["width"] + 0.5 and y + h <= im["height"] + 0.5
            assert 0 < a["area"] <= w * h + 1  # the mask area of the polygon, inside its box
            assert len(a["segmentation"][0]) >= 6
        for im in d["images"]:
            with Image.open(shapes / split / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
        COCO(str(shapes / "annotations" / f"instances_{split}.json"))  # pycocotools reads it


def test_writer_deterministic_and_val_independent_of_n_train(tmp_path):
    a = write_coco_shapes(tmp_path / "a", 3, 2, seed=5)
    b = write_coco_shapes(tmp_path / "b", 5, 2, seed=5)
    c = write_coco_shapes(tmp_path / "c", 3, 2, seed=6)
    val = lambda r: (r / "annotations" / "instances_val2017.json").read_text()  # noqa: E731
    train = lambda r: json.loads((r / "annotations" / "instances_train2017.json").read_text())  # noqa: E731
    assert val(a) == val(b) != val(c)
    assert train(b)["images"][:3] == train(a)["images"]  # a larger n_train extends a smaller one


def test_loader_resizes_scales_boxes_and_maps_labels(shapes):
    data = Coco().build(shapes, min_size=64, max_size=100, flip_prob=0.0)
    assert (len(data.train), len(data.val)) == (6, 4)
    assert data.num_classes == 4 and data.model_num_classes == 5 and data.classes == [n for _, n in SHAPE_CATEGORIES]
    coco = data.val.coco
    for i in range(len(data.val)):
        img, t = data.val[i]
        info = coco.imgs[t["image_id"]]
        h, w = info["height"], info["width"]
        assert t["orig_size"] == (h, w) and tuple(img.shape[1:]) == t["size"] == resized_size(h, w, 64, 100)
        assert min(img.shape[1:]) == 64 or max(img.shape[1:]) == 100
        anns = coco.imgToAnns[t["image_id"]]
        sy, sx = t["scale"]
        want = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                              (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns])
        assert torch.allclose(t["boxes"], want, atol=1e-3)
        cat_to_label = {c: k + 1 for k, (c, _) in enumerate(SHAPE_CATEGORIES)}  # ids 1,2,4,7 -> 1..4
        assert t["labels"].tolist() == [cat_to_label[a["category_id"]] for a in anns]
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
    assert abs(float(img.mean())) < 3  # ImageNet-normalised


def test_flip_mirrors_image_and_boxes(shapes):
    plain = Coco().build(shapes, min_size=64, max_size=100, flip_prob=0.0).train[0]
    flipped = Coco().build(shapes, min_size=64, max_size=100, flip_prob=1.0).train[0]
    w = plain[0].shape[2]
    assert torch.equal(flipped[0], plain[0].flip(-1))
    b = plain[1]["boxes"]
    assert torch.allclose(flipped[1]["boxes"], torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    assert Coco().build(shapes, min_size=64, max_size=100, flip_prob=1.0).val[0][0].equal(
        Coco().build(shapes, min_size=64, max_size=100, flip_prob=0.0).val[0][0])  # never flips val


def test_category_id_labels_and_subsets(shapes):
    data = Coco().build(shapes, min_size=64, max_size=100, label_mode="category_id", max_train_images=2,
                        max_val_images=3)
    assert data.model_num_classes == 8 and (len(data.train), len(data.val)) == (2, 3)
    labels = torch.cat([data.val[i][1]["labels"] for i in range(3)])
    assert set(labels.tolist()) <= {c for c, _ in SHAPE_CATEGORIES}
    with pytest.raises(ValueError, match="label_mode"):
        Coco().build(shapes, label_mode="nope")


def test_collate_pads_to_multiple_of_32(shapes):
    data = Coco().build(shapes, min_size=70, max_size=100)
    items = [data.val[i] for i in range(3)]
    images, targets = collate_detection(items)
    n, c, h, w = images.tensors.shape
    assert (n, c) == (3, 3) and h % 32 == 0 and w % 32 == 0
    assert images.image_sizes == [tuple(it[0].shape[1:]) for it in items]
    for k, (img, _) in enumerate(items):
        assert torch.equal(images.tensors[k, :, : img.shape[1], : img.shape[2]], img)
        assert images.tensors[k, :, img.shape[1]:].abs().sum() == 0
    assert targets == [it[1] for it in items]


def test_layout_errors_name_the_missing_files(tmp_path):
    task = DetectionTask()
    with pytest.raises(DataLayoutError, match="instances_val2017.json"):
        task.check_data({"name": "coco", "root": str(tmp_path)})
    with pytest.raises(DataLayoutError, match="data.root is required"):
        task.check_data({"name": "coco"})
    with pytest.raises(ValueError, match="not detection"):
        task.check_data({"name": "digits"})
    task.check_data({"name": "coco_shapes", "n_train": 2})  # generated: nothing to check on disk


def test_coco_shapes_plugin_generates_once_and_reuses(tmp_path):
    d1 = CocoShapes().build(tmp_path, n_train=3, n_val=2, image_size=64, min_size=48, max_size=80)
    folder = tmp_path / "shapes-3-2-64-0"
    assert d1.train.root == folder and len(d1.val) == 2
    stamp = (folder / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    CocoShapes().build(tmp_path, n_train=3, n_val=2, image_size=64)
    assert (folder / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_image_whose_size_differs_from_the_json_is_refused(tmp_path):
    """A replaced image (here half size) would have its boxes scaled by the wrong ratio: refused when read,
    naming the image, both sizes and the annotation file."""
    root = write_coco_shapes(tmp_path / "s", n_train=2, n_val=2, seed=3)
    ann = root / "annotations" / "instances_val2017.json"
    info = json.loads(ann.read_text())["images"][1]
    path = root / "val2017" / info["file_name"]
    w, h = info["width"], info["height"]
    with Image.open(path) as im:
        im.resize((w // 2, h // 2)).save(path, quality=92)
    data = Coco().build(root, min_size=64, max_size=100)
    data.val[0]  # the untouched image reads fine
    with pytest.raises(DataFileError) as e:
        data.val[1]
    msg = _one_line(e)
    assert str(path) in msg and f"{w // 2}×{h // 2}" in msg and f"{w}×{h}" in msg and str(ann) in msg
    task = DetectionTask()  # and through the task's loader, as training/evaluation read it
    with pytest.raises(DataFileError, match=info["file_name"]):
        list(task.loader(data.val, 2))


def test_undecodable_missing_images_and_bad_json_are_named(tmp_path):
    root = write_coco_shapes(tmp_path / "s", n_train=3, n_val=1, seed=4)
    data = Coco().build(root, min_size=64, max_size=100)
    files = [root / "train2017" / data.train.coco.imgs[i]["file_name"] for i in data.train.ids]
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) // 2])  # truncated JPEG
    files[1].write_bytes(b"not an image at all")
    files[2].unlink()
    for k, word in ((0, "truncated"), (1, "cannot decode"), (2, "does not exist")):
        with pytest.raises(DataFileError) as e:
            data.train[k]
        msg = _one_line(e)
        assert str(files[k]) in msg and word in msg
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text('{"images": [')
    with pytest.raises(DataFileError) as e:
        Coco().build(root)
    assert str(ann) in _one_line(e)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 10}], "annotations": [],
                               "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DataFileError, match="image 1 needs file_name and positive integer height and width"):
        Coco().build(root)


# -------------------------------------------------------------------------------------------- COCOeval
def _gt() -> COCO:
    """One 300×300 image with a small (20×20), a medium (50×50) and a large (120×100) object of class 1,
    and a second image with one medium object of class 2."""
    d = {"images": [{"id": 1, "width": 300, "height": 300, "file_name": "a.jpg"},
                    {"id": 2, "width": 300, "height": 300, "file_name": "b.jpg"}],
         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": []}
    for i, (img, cat, box) in enumerate([(1, 1, [10, 10, 20, 20]), (1, 1, [100, 100, 50, 50]),
                                         (1, 1, [150, 20, 120, 100]), (2, 2, [30, 30, 60, 60])]):
        d["annotations"].append({"id": i + 1, "image_id": img, "category_id": cat, "bbox": box,
                                 "area": box[2] * box[3], "iscrowd": 0})
    coco = COCO()
    coco.dataset = d
    coco.createIndex()
    return coco


def _dets(coco, skip=(), score=0.9):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in coco.dataset["annotations"] if a["id"] not in skip]


def test_cocoeval_perfect_predictions_give_100():
    coco = _gt()
    m = coco_eval(coco, _dets(coco), [1, 2])
    assert m == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": 100.0})


def test_cocoeval_known_partial_values():
    coco = _gt()
    # a false positive scored above the true positive of class 2: precision 1/2 at recall 1 -> AP 50
    fp = {"image_id": 2, "category_id": 2, "bbox": [200, 200, 40, 40], "score": 0.95}
    m = coco_eval(coco, _dets(coco, skip=(1, 2, 3)) + [fp], [2])
    assert m["AP"] == pytest.approx(50.0) and m["AP50"] == pytest.approx(50.0)
    assert math.isnan(m["APs"]) and math.isnan(m["APl"])  # no ground truth of those sizes on image 2
    # image 1: only the large of its three class-1 objects found
    m = coco_eval(coco, _dets(coco, skip=(1, 2, 4)), [1])
    assert m["APl"] == pytest.approx(100.0) and m["APm"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(100.0 * 34 / 101, abs=1e-6)  # recall 1/3: points 0..0.33 -> 34 of 101
    # a box with IoU 0.62 to its ground truth: matched at IoU 0.50, 0.55, 0.60 only -> AP 30, AP50 100, AP75 0
    g = [30, 30, 60, 60]
    shift = 60 * (1 - 0.62) / (1 + 0.62)  # horizontal shift that gives IoU 0.62 for equal boxes
    det = {"image_id": 2, "category_id": 2, "bbox": [g[0] + shift, g[1], g[2], g[3]], "score": 0.9}
    m = coco_eval(coco, [det], [2])
    assert (m["AP"], m["AP50"], m["AP75"]) == pytest.approx((30.0, 100.0, 0.0))


def test_cocoeval_without_detections_is_zero_or_undefined():
    m = coco_eval(_gt(), [], [2])
    assert m["AP"] == 0.0 and m["APm"] == 0.0 and math.isnan(m["APs"]) and math.isnan(m["APl"])
    # an object of area exactly 32² is small and medium for COCOeval (inclusive bounds): no detection at all gives
    # what COCOeval gives with one wrong detection, 0 for both (not NaN)
    coco = _gt()
    a = coco.dataset["annotations"][3]
    a["bbox"], a["area"] = [30, 30, 32, 32], 32 * 32
    coco.createIndex()
    wrong = {"image_id": 2, "category_id": 2, "bbox": [200, 200, 10, 10], "score": 0.5}
    with_wrong = coco_eval(coco, [wrong], [2])
    assert with_wrong["APs"] == 0.0 and with_wrong["APm"] == 0.0 and math.isnan(with_wrong["APl"])
    m = coco_eval(coco, [], [2])
    assert all(m[k] == with_wrong[k] or (math.isnan(m[k]) and math.isnan(with_wrong[k])) for k in m)


def test_task_evaluate_with_an_oracle_gives_100(shapes):
    """Detections = the ground truth in resized-image coordinates: the task maps them back to the original
    images and COCOeval gives AP 100; shifted by 30% of their size, AP drops."""
    task = DetectionTask()
    data = Coco().build(shapes, min_size=64, max_size=100)
    loader = task.loader(data.val, 3)
    batches = [y for _, y in loader]

    class Oracle(torch.nn.Module):
        def __init__(self, shift=0.0):
            super().__init__()
            self.queue, self.shift = list(batches), shift

        def forward(self, x, taps=(), targets=None, detect=False):
            assert detect
            dets = []
            for t in self.queue.pop(0):
                b = t["boxes"].clone()
                b[:, 0::2] += self.shift * (b[:, 2:3] - b[:, 0:1])
                dets.append({"boxes": b, "labels": t["labels"], "scores": torch.ones(len(b))})
            return Outputs(None, extras={"detections": dets})

    m = task.evaluate(Oracle(), loader, torch.device("cpu"))
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    assert task.evaluate(Oracle(0.3), loader, torch.device("cpu"))["AP"] < 60.0
    # coco_results drops labels the dataset does not have (background 0)
    res = coco_results([{"boxes": torch.tensor([[0., 0, 10, 10]]), "scores": torch.tensor([1.0]),
                         "labels": torch.tensor([0])}], [batches[0][0]], data.val.label_to_cat)
    assert res == []
