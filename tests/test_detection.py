"""Detection task and detectors: names and kwargs, taps (what runs for which tap), losses and detections equal to
torchvision's own forward, teacher losses in eval mode (stage 1), every detection method for one training step,
and the shipped detection suites run end to end, shrunk, on generated data."""

import math
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from kdbench.data.coco import CocoShapes
from kdbench.method import Batch
from kdbench.models.detection import DETECTOR_NAMES, build_backbone, build_detector
from kdbench.models.sources import build_model, check_model
from kdbench.models.tap import edit_tap
from kdbench.registry import METHODS
from kdbench.runner import build_context
from kdbench.tasks.detection import DetectionTask
from kdbench.step import train_step

SUITES = Path(__file__).resolve().parent.parent / "suites"
KINDS = ("retinanet", "fcos", "fasterrcnn")
SMALL = {"fpn_channels": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return CocoShapes().build(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, image_size=80, min_size=64,
                              max_size=96)


def _batch(data, n=2, split="train"):
    ds = getattr(data, split)
    return DetectionTask.collate([ds[i] for i in range(n)])


def _model(kind, data, backbone="resnet18", **kw):
    torch.manual_seed(0)
    return build_model(f"torchvision:{kind}_{backbone}_fpn", data.model_num_classes, 3, **{**SMALL, **kw})


# ----------------------------------------------------------------------------------------- names and kwargs
def test_names_checked_and_kwargs_validated():
    for name in DETECTOR_NAMES:
        check_model(f"torchvision:{name}")
    assert "torchvision:retinanet_resnext101_64x4d_fpn" in {f"torchvision:{n}" for n in DETECTOR_NAMES}
    with pytest.raises(ValueError, match="retinanet_resnet101_fpn"):
        check_model("torchvision:retinanet_resnet101_fp")
    with pytest.raises(ValueError, match="data.min_size"):
        build_detector("retinanet_resnet18_fpn", 5, min_size=128)
    with pytest.raises(ValueError, match="unknown model kwarg.*valid: fpn_channels.*score_thresh"):
        build_detector("retinanet_resnet18_fpn", 5, nonsense=1)
    m = build_detector("fasterrcnn_resnet18_fpn", 5, box_detections_per_img=7, fpn_channels=16)
    assert m.net.roi_heads.detections_per_img == 7 and m.net.backbone.out_channels == 16


def test_backbones_of_the_suites_build(tmp_path):
    """The teacher/student backbones of coco_detection: levels, channels, frozen stages and BN kinds."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    x = torch.randn(1, 3, 64, 64)
    for det, bb, n_levels in (("retinanet", "resnext101_64x4d", 5), ("fasterrcnn", "resnet101", 5),
                              ("fcos", "resnet50", 5)):
        b = build_backbone(det, bb, frozen_bn=True)
        with torch.no_grad():
            out = b(x)
        assert len(out) == n_levels and all(v.shape[1] == 256 for v in out.values())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in b.modules())
    # backbone_weights: an ImageNet checkpoint of the ResNet (fc ignored), then frozen BN and 3 trainable stages
    import torchvision

    net = torchvision.models.resnet18()
    torch.nn.init.constant_(net.layer1[0].conv1.weight, 0.5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    b = build_backbone("retinanet", "resnet18", backbone_weights=str(tmp_path / "r18.pth"))
    assert torch.all(b.body.layer1[0].conv1.weight == 0.5)
    assert not b.body.layer1[0].conv1.weight.requires_grad and b.body.layer2[0].conv1.weight.requires_grad
    assert isinstance(b.body.layer1[0].bn1, FrozenBatchNorm2d)
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        build_backbone("retinanet", "resnet18", backbone_weights=str(tmp_path / "missing.pth"))


def test_r50_detectors_have_torchvision_state_dict_layout():
    """So torchvision's COCO checkpoints (91 classes) load as teachers: same keys and shapes as its builders."""
    from torchvision.models import detection as D

    builders = {"retinanet": D.retinanet_resnet50_fpn, "fcos": D.fcos_resnet50_fpn,
                "fasterrcnn": D.fasterrcnn_resnet50_fpn}
    for kind, builder in builders.items():
        ours = build_detector(f"{kind}_resnet50_fpn", 91).net.state_dict()
        theirs = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}, kind


# ----------------------------------------------------------------------------------------------------- taps
@pytest.mark.parametrize("kind", KINDS)
def test_taps_and_what_runs(kind, data):
    m = _model(kind, data, **({"reg_tap": "rpn"} if kind == "fasterrcnn" else {})).eval()
    x, _ = _batch(data)
    h, w = x.tensors.shape[-2:]
    calls = []
    heads = {"retinanet": ["head.classification_head", "head.regression_head"],
             "fcos": ["head.classification_head", "head.regression_head"],
             "fasterrcnn": ["rpn.head", "roi_heads"]}[kind]
    for name in heads:
        m.net.get_submodule(name).register_forward_pre_hook(lambda mod, inp, _n=name: calls.append(_n))
    with torch.no_grad():
        out = m(x, ("fpn",))
    assert calls == [] and out.logits is None and set(out.feats) == {"fpn"}  # backbone + FPN only
    strides = [4, 8, 16, 32, 64] if kind == "fasterrcnn" else [8, 16, 32, 64, 128]
    assert [tuple(f.shape) for f in out["fpn"]] == [(2, 32, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    with torch.no_grad():
        out = m(x, ("reg",))
    assert heads[0] not in calls or kind == "fasterrcnn"  # only the regression branch ran
    a4 = {"retinanet": 36, "fcos": 4, "fasterrcnn": 12}[kind]
    assert [tuple(r.shape) for r in out["reg"]] == [(2, a4, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    calls.clear()
    with torch.no_grad():
        out = m(x, ("fpn", "reg", "module:backbone.body.layer2"))
    assert out["module:backbone.body.layer2"][0].shape[1] == 128
    assert [tuple(r.shape) for r in out["reg"]] == [(2, a4, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    with pytest.raises(ValueError, match="does not provide tap 'stages'"):
        m(x, ("stages",))
    assert len(m.tap_modules("fpn")) == 5


def test_fasterrcnn_roi_reg_tap_teacher_on_the_students_rois(data):
    """Faster R-CNN RegKD (docs/methods.md §7.2-6): the "reg" tap is the RoI head's box regression, and the
    teacher regresses the student's RoIs (the proposals the student's RoI head was trained on)."""
    from kdbench.models.detection import ROI_EXCHANGE

    student = _model("fasterrcnn", data, "resnet18").train()
    teacher = _model("fasterrcnn", data, "resnet34", frozen_bn=True).eval().requires_grad_(False)
    x, y = _batch(data, 2)
    task = DetectionTask()
    seen = {}
    student.net.roi_heads.box_predictor.bbox_pred.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("student", out))
    s = task.forward(student, x, y, ("fpn", "reg"))
    with torch.no_grad():
        t = task.forward(teacher, x, None, ("fpn", "reg"))
    k4 = 4 * data.model_num_classes
    rois = s.extras["reg_rois"]
    n_rois = sum(r.shape[0] for r in rois)
    assert len(s["reg"]) == len(t["reg"]) == 1
    assert tuple(s["reg"][0].shape) == tuple(t["reg"][0].shape) == (n_rois, k4)
    assert all(torch.equal(a, b) for a, b in zip(rois, t.extras["reg_rois"]))
    # the student's tap is its RoI head's regression on its training RoIs (torchvision adds the GT boxes to them)
    assert s["reg"][0] is seen["student"] and s["reg"][0].requires_grad
    for r, tgt in zip(rois, y):
        assert all((r == box).all(dim=1).any() for box in tgt["boxes"])
    # the teacher's tap is its own RoI head on those RoIs, through torchvision's modules
    rh = teacher.net.roi_heads
    with torch.no_grad():
        feats = teacher.net.backbone(x.tensors)
        expected = rh.box_predictor.bbox_pred(rh.box_head(rh.box_roi_pool(feats, rois, x.image_sizes)))
    torch.testing.assert_close(t["reg"][0], expected)
    assert "losses" not in t.extras and "loss_fn" not in t.extras  # no RPN, no losses on the teacher's side
    assert ROI_EXCHANGE.lookup(x) is not None and ROI_EXCHANGE.lookup(_batch(data, 2)[0]) is None
    # a forward without published RoIs (a probe) regresses its own test-time proposals
    x2, _ = _batch(data, 2, "val")
    with torch.no_grad():
        alone = teacher(x2, ("reg",))
    assert alone["reg"][0].shape == (sum(r.shape[0] for r in alone.extras["reg_rois"]), k4)
    # the RPN option keeps the dense per-level deltas; one-stage detectors take no reg_tap
    rpn = _model("fasterrcnn", data, reg_tap="rpn").train()
    assert [r.dim() for r in rpn(x, ("reg",), targets=y)["reg"]] == [4] * 5
    with pytest.raises(ValueError, match="reg_tap must be one of roi, rpn"):
        _model("fasterrcnn", data, reg_tap="box")
    with pytest.raises(ValueError, match="reg_tap applies to Faster R-CNN only"):
        _model("retinanet", data, reg_tap="rpn")


# ----------------------------------------------------------------- equal to torchvision's own forward
def _torchvision_forward(m, x, targets):
    """torchvision's ``GeneralizedRCNN``/RetinaNet/FCOS forward on our transformed batch (its own transform
    replaced by the identity)."""
    net = m.net
    real = net.transform

    class Identity(torch.nn.Module):
        def forward(self, images, targets=None):
            return x, targets

        def postprocess(self, result, image_shapes, original_image_sizes):
            return result

    net.transform = Identity()
    try:
        images = [x.tensors[i, :, :h, :w] for i, (h, w) in enumerate(x.image_sizes)]
        return net(images, targets)
    finally:
        net.transform = real


@pytest.mark.parametrize("kind", KINDS)
def test_losses_and_detections_match_torchvision(kind, data):
    m = _model(kind, data, score_thresh=0.0) if kind != "fasterrcnn" else _model(kind, data, box_score_thresh=0.0)
    x, y = _batch(data, 3)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in y]
    m.train()
    torch.manual_seed(1)
    ours = m(x, (), targets=y).extras["losses"]
    torch.manual_seed(1)
    theirs = _torchvision_forward(m, x, tv_targets)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6), k
    m.eval()
    with torch.no_grad():
        dets = m(x, detect=True).extras["detections"]
        ref = _torchvision_forward(m, x, None)
    for a, b in zip(dets, ref):
        assert len(a["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


def test_teacher_losses_in_eval_mode_leave_bn_alone_and_reach_edits(data):
    """FreeKD/AFP stage 1: ``teacher(x)`` in eval mode, an edit on an FPN level, the task loss from the outputs'
    loss_fn; BN running statistics stay, the gradient reaches the edit, the teacher's weights get none."""
    task = DetectionTask()
    for kind in KINDS:
        m = _model(kind, data).eval().requires_grad_(False)
        bn = m.net.backbone.body.bn1
        before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        scale = torch.ones((), requires_grad=True)
        x, y = _batch(data, 2)
        with edit_tap(m, "fpn", lambda i, f: f * scale if i == 0 else f):
            out = m(x)
            loss = task.loss(out, y)
        loss.backward()
        assert torch.isfinite(loss) and scale.grad is not None and scale.grad.abs() > 0, kind
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
        assert int(bn.num_batches_tracked) == before[2] and not m.training
        assert all(p.grad is None for p in m.parameters())
    with pytest.raises(ValueError, match="neither"):
        task.loss(m(x, ("fpn",)), y)


def test_student_training_mode_updates_bn_and_returns_losses(data):
    task = DetectionTask()
    m = _model("retinanet", data).train()
    x, y = task.to_device(*_batch(data, 2), torch.device("cpu"))
    out = task.forward(m, x, y, ("fpn",))
    assert set(out.extras["losses"]) == {"classification", "bbox_regression"} and len(out["fpn"]) == 5
    assert int(m.net.backbone.body.bn1.num_batches_tracked) == 1
    loss = task.loss(out, y)
    assert loss == sum(out.extras["losses"].values())


def test_tensor_input_and_device_move(data):
    m = _model("fcos", data).eval()
    x, _ = _batch(data)
    with torch.no_grad():
        a = m(x.tensors, ("fpn",))["fpn"]
        b = m(ImageList(x.tensors, x.image_sizes), ("fpn",))["fpn"]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------------------- every detection method
def _detection_methods():
    return [n for n, c in METHODS.items() if "detection" in c.tasks and c.needs_teacher]


@pytest.mark.parametrize("name, kind", [pytest.param(n, k, id=f"{n}-{k}") for n in _detection_methods()
                                        for k in (KINDS if n in ("freekd", "afp") else ("retinanet",))])
def test_every_detection_method_one_step(name, kind, data):
    task = DetectionTask()
    student = _model(kind, data, "resnet18")
    teacher = _model(kind, data, "resnet34", frozen_bn=True).eval().requires_grad_(False)
    ctx = build_context(task, data, {"epochs": 1, "batch_size": 2}, student, teacher, torch.device("cpu"))
    cls = METHODS.get(name)
    params = {"stage_iters": 2} if "stage_iters" in cls.param_defaults() else {}
    method = cls(ctx, **cls.check_params(params))
    if cls.stage_params:
        method.load_stage(method.run_stage(teacher, task.loader(data.train, 2), torch.device("cpu")))
        assert all(p.grad is None for p in teacher.parameters())
    taps = method.taps()
    assert "fpn" in taps.teacher
    if name in ("freekd", "afp"):
        assert "reg" in taps.teacher and method.use_reg  # regression KD (docs/methods.md §7.1)
    student.check_taps(taps.student)
    teacher.check_taps(taps.teacher)
    student.train()
    method.train()
    x, y = _batch(data, 2)
    out = train_step(student, teacher, method, task, Batch(inputs=x, targets=y, epoch=1, step=0, epochs=1,
                                                           steps_per_epoch=1))
    t, terms = out.teacher, out.terms
    assert "losses" not in t.extras and "loss_fn" not in t.extras  # taps only: no heads beyond the regression branch
    assert terms
    for k, v in terms.items():
        assert k.startswith("loss_") and v.dim() == 0 and v.dtype == torch.float32 and math.isfinite(float(v.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_fpn_only_teacher_is_cheaper(data):
    """The teacher forward for an FPN-only method skips the heads: fewer modules run than a full forward."""
    m = _model("retinanet", data).eval()
    x, _ = _batch(data)
    count = {"n": 0}
    for mod in m.net.modules():
        mod.register_forward_hook(lambda *_: count.__setitem__("n", count["n"] + 1))
    with torch.no_grad():
        m(x, ("fpn",))
        fpn_only = count["n"]
        count["n"] = 0
        m(x)
    assert fpn_only < count["n"]


# ------------------------------------------------------------------------------ shipped suites, shrunk
def _shrink(suite: Path, tmp: Path) -> list[str]:
    """--set overrides: generated data, ResNet-18 versions of each pair's detectors (32-channel FPN) with teacher
    checkpoints written where the (overridden) paths point, 1 step, 1 seed, 2-iteration prompt stages."""
    import yaml

    from kdbench.suite import load_raw

    raw = load_raw(suite)
    data = {"name": "coco_shapes", "root": str(tmp / "data"), "n_train": 4, "n_val": 2, "image_size": 64,
            "min_size": 64, "max_size": 96}
    sets = [f"data={yaml.safe_dump(data, default_flow_style=True).strip()}", "recipe.epochs=1",
            "recipe.max_steps_per_epoch=1", "recipe.batch_size=2", "recipe.eval_batch_size=2", "recipe.num_workers=0",
            "recipe.amp=false", "seeds=[0]"]
    for i, m in enumerate(raw["methods"]):
        name = m if isinstance(m, str) else m["name"]
        if name in ("freekd", "afp"):
            sets.append(f"methods.{i}={{name: {name}, params: {{stage_iters: 2}}}}" if isinstance(m, str)
                        else f"methods.{i}.params.stage_iters=2")
    for i, pair in enumerate(raw["pairs"]):
        kind = pair["student"]["model"].split(":")[1].split("_")[0]
        small = f"torchvision:{kind}_resnet18_fpn"
        sets += [f"pairs.{i}.student.model={small}", f"pairs.{i}.student.kwargs={{fpn_channels: 32}}",
                 f"pairs.{i}.teacher.model={small}", f"pairs.{i}.teacher.kwargs={{fpn_channels: 32, frozen_bn: true}}"]
        if "weights" in pair["teacher"]:
            path = tmp / "ckpt" / f"{i}.pth"
            torch.manual_seed(i)
            net = build_detector(f"{kind}_resnet18_fpn", 5, fpn_channels=32, frozen_bn=True).net
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": net.state_dict()}, path)
            sets.append(f"pairs.{i}.teacher.weights={path}")
        else:
            sets += [f"pairs.{i}.teacher.train.recipe.epochs=1", f"pairs.{i}.teacher.train.data.n_train=4"]
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["quickstart_detection.yaml", "coco_detection.yaml"])  # mmdet suites: test_mmdet.py
def test_detection_suites_run_end_to_end_shrunk(suite, tmp_path):
    from kdbench.scheduler import launch
    from kdbench.suite import load_suite
    from kdbench.tables import make_table

    sets = _shrink(SUITES / suite, tmp_path)
    s = load_suite(SUITES / suite, sets)
    recs = launch(s, tmp_path / "res", executor="debug", log=lambda m: None)
    bad = [(r["label"], r["pair"], (r["error"] or "").strip().splitlines()[-1:]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    assert len(recs) == len(s.specs)
    for r in (r for r in recs if r["kind"] != "stage"):  # a stage run has no metrics
        metrics = {m["metric"] for m in r["metrics"]}
        assert metrics == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    layout = "method_x_domain" if suite == "coco_spatial_vs_dwt.yaml" else "auto"
    table = make_table(tmp_path / "res" / s.name, layout=layout)
    assert all(r["pair"] in table for r in recs) or len({r["pair"] for r in recs}) == 1
    if layout == "method_x_domain":
        assert "spatial" in table and "dwt" in table
