"""The mmdet backend (``mmdet:`` models, kdbench/models/mmdet.py): without it installed, a one-line install hint
(always tested); with it, COCOeval through an mmdet model equal to the torchvision path, a checkpoint written by
mmdet/mmengine reproducing mmdet's own outputs and losses, taps and what runs, eval-mode teacher losses, every
detection method for one step on RepPoints, RetinaNet and FCOS, and an mmdet teacher with a torchvision student.
Tests that need mmdet are skipped, with the reason, when the backend (mmdet + mmcv with compiled ops) is absent:
``pip install -e ".[mmdet]" && python scripts/install_mmcv.py``."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.models import mmdet as M

ROOT = Path(__file__).resolve().parent.parent
SUITES = ROOT / "suites"

# small versions of mmdet's shipped configs (ResNet-18/34, 32-channel neck and head) for CPU tests
_R18 = {"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512], "model.neck.out_channels": 32,
        "model.bbox_head.in_channels": 32, "model.bbox_head.feat_channels": 32}
CONFIGS = {
    "reppoints": ("reppoints-moment_r50_fpn-gn_head-gn_2x_coco", {**_R18, "model.bbox_head.point_feat_channels": 32,
                                                                   "model.bbox_head.stacked_convs": 1}),
    "retinanet": ("retinanet_r18_fpn_1x_coco", {**_R18, "model.bbox_head.stacked_convs": 1}),
    "fcos": ("fcos_r50-caffe_fpn_gn-head_1x_coco", {**_R18, "model.bbox_head.stacked_convs": 1}),
}


def test_without_the_backend_one_line_says_how_to_install():
    """mmcv made unimportable in a fresh interpreter: building an mmdet: model fails with one line naming the
    install command; a suite naming mmdet models still validates (dry-run needs no backend)."""
    code = ("import sys; sys.modules['mmcv'] = None; sys.modules['mmdet'] = None\n"
            "from kdbench.models.sources import build_model, check_model\n"
            "check_model('mmdet:retinanet_r50_fpn_1x_coco')\n"
            "try:\n"
            "    build_model('mmdet:retinanet_r50_fpn_1x_coco', 5, 3)\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert len(out) == 1 and "\n" not in out[0]
    msg = out[0]
    assert "mmdet:retinanet_r50_fpn_1x_coco" in msg and "not installed" in msg
    assert 'pip install -e ".[mmdet]"' in msg and "scripts/install_mmcv.py" in msg, msg


def test_input_map_for_a_caffe_style_preprocessor_is_exact():
    """The per-channel map from kdbench's normalisation to a config's preprocessor, by hand for one pixel."""
    from kdbench.data.coco import IMAGENET_MEAN, IMAGENET_STD

    assert M._input_affine({"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                            "bgr_to_rgb": True, "pad_size_divisor": 32}) is None
    perm, scale, shift, div = M._input_affine({"mean": [102.9801, 115.9465, 122.7717], "std": [1.0, 1.0, 1.0],
                                              "bgr_to_rgb": False, "pad_size_divisor": 32})
    assert perm == [2, 1, 0] and div == 32
    rgb = (200.0, 100.0, 50.0)  # a pixel, 0..255
    x = [(rgb[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)]  # kdbench's input
    y = [x[perm[c]] * scale[c] + shift[c] for c in range(3)]
    assert y == pytest.approx([50.0 - 102.9801, 100.0 - 115.9465, 200.0 - 122.7717], abs=1e-4)


def test_reg_module_table_and_checkpoint_globals_are_plain_data():
    assert M.REG_MODULES[0] == "retina_reg" and "reppoints_pts_refine_out" in M.REG_MODULES
    assert all(isinstance(s, str) for s in M.SAFE_CHECKPOINT_GLOBALS)


def test_suites_name_mmdet_models_and_carry_table_10():
    """coco_spatial_vs_dwt is FreeKD supp. Table 10 on RepPoints with its published numbers."""
    from kdbench.suite import load_suite

    s = load_suite(SUITES / "coco_spatial_vs_dwt.yaml")
    refs = {(r["method"], r["metric"]): r["value"] for r in s.raw["reference"]}
    assert refs == {("teacher", "AP"): 44.2, ("baseline", "AP"): 38.6, ("cwd", "AP"): 41.8, ("cwd-dwt", "AP"): 42.0,
                    ("pkd", "AP"): 42.0, ("pkd-dwt", "AP"): 42.1, ("freekd", "AP"): 42.4}
    assert {sp.student["model"] for sp in s.specs} == {"mmdet:reppoints-moment_r50_fpn-gn_head-gn_2x_coco"}
    assert [sp.kind for sp in s.specs].count("distill") == 6 and [sp.kind for sp in s.specs].count("stage") == 1
    q = load_suite(SUITES / "quickstart_detection_mmdet.yaml")
    assert all(sp.student["model"].startswith("mmdet:reppoints") for sp in q.specs)


# ------------------------------------------------------------------------------------ with the backend
needs_backend = pytest.mark.skipif(M.missing_backend() is not None,
                                   reason=f"mmdet backend not installed ({M.missing_backend()}): {M.INSTALL}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kdbench.data.coco import CocoShapes

    return CocoShapes().build(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=6, image_size=80, min_size=64,
                              max_size=96)


def _batch(data, n=2, split="train"):
    from kdbench.tasks.detection import DetectionTask

    ds = getattr(data, split)
    return DetectionTask.collate([ds[i] for i in range(n)])


def _mm(kind, data, seed=0, **extra_opts):
    from kdbench.models.sources import build_model

    name, opts = CONFIGS[kind]
    torch.manual_seed(seed)
    return build_model(f"mmdet:{name}", data.model_num_classes, 3, cfg_options={**opts, **extra_opts})


@needs_backend
def test_names_and_kwargs_checked():
    from kdbench.models.sources import check_model

    check_model("mmdet:reppoints-moment_r50_fpn-gn_head-gn_2x_coco")
    assert "retinanet_r50_fpn_1x_coco" in M.MmdetSource().names()
    with pytest.raises(ValueError, match="Did you mean mmdet:retinanet_r50_fpn_1x_coco"):
        check_model("mmdet:retinanet_r50_fpn_1x_cocoo")
    with pytest.raises(ValueError, match="data.min_size"):
        M.build_mmdet_detector("retinanet_r18_fpn_1x_coco", 5, min_size=10)
    with pytest.raises(ValueError, match="unknown model kwarg.*valid: cfg_options, backbone_weights"):
        M.build_mmdet_detector("retinanet_r18_fpn_1x_coco", 5, nonsense=1)
    with pytest.raises(ValueError, match="config file not found"):
        check_model("mmdet:/nonexistent/cfg.py")


@needs_backend
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_taps_and_what_runs(kind, data):
    m = _mm(kind, data).eval()
    x, _ = _batch(data)
    h, w = x.tensors.shape[-2:]
    calls = []  # the head's modules that ran (mmdet calls bbox_head.forward directly, so hook its layers)
    for name, mod in m.net.bbox_head.named_children():
        mod.register_forward_pre_hook(lambda *_, _n=name: calls.append(_n))
    with torch.no_grad():
        out = m(x, ("fpn", "stages", "module:backbone.layer2"))
    assert calls == [] and out.logits is None and set(out.feats) == {"fpn", "stages", "module:backbone.layer2"}
    strides = [8, 16, 32, 64, 128]
    assert [tuple(f.shape) for f in out["fpn"]] == [(2, 32, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    assert [f.shape[1] for f in out["stages"]] == [64, 128, 256, 512]
    assert out["module:backbone.layer2"][0].shape[1] == 128
    assert "losses" not in out.extras and "loss_fn" not in out.extras
    with torch.no_grad():
        out = m(x, ("reg",))
    assert calls and m.reg_module_name.split(".")[1] in calls
    c = {"reppoints": 18, "retinanet": 36, "fcos": 4}[kind]  # 9 points x 2, 9 anchors x 4, (l, t, r, b)
    assert [tuple(r.shape) for r in out["reg"]] == [(2, c, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    with pytest.raises(ValueError, match="does not provide tap 'final'"):
        m(x, ("final",))
    assert len(m.tap_modules("fpn")) == 5


@needs_backend
def test_same_detections_give_the_same_cocoeval_through_mmdet_and_torchvision(data):
    """Detections made from the ground truth (jittered boxes, scores, some labels swapped; 0-based labels as
    mmdet's head predicts, 1-based for torchvision's) scored by DetectionTask.evaluate through each model."""
    from mmengine.structures import InstanceData

    from kdbench.models.sources import build_model
    from kdbench.tasks.detection import DetectionTask

    ds = data.val
    gen = torch.Generator().manual_seed(0)
    by_image = {}
    for i in range(len(ds)):
        img, t = ds[i]
        n = len(t["boxes"])
        boxes = t["boxes"] + torch.randn(n, 4, generator=gen) * 3.0
        extra = boxes[: max(1, n // 2)] + 10.0  # false positives
        labels = t["labels"].clone()
        if n > 1:
            labels[0] = labels[0] % (data.model_num_classes - 1) + 1  # a wrong class
        by_image[_key(img)] = {
            "boxes": torch.cat([boxes, extra]), "scores": torch.rand(len(boxes) + len(extra), generator=gen),
            "labels": torch.cat([labels, labels[: len(extra)]])}

    def lookup(images_tensor, sizes):
        return [by_image[_key(images_tensor[k, :, :h, :w])] for k, (h, w) in enumerate(sizes)]

    mm = _mm("retinanet", data)
    state = {}

    def mm_predict(feats, samples, rescale=False):
        res = []
        for d in lookup(state["x"].tensors, state["x"].image_sizes):
            r = InstanceData()
            r.bboxes, r.scores, r.labels = d["boxes"], d["scores"], d["labels"] - 1
            res.append(r)
        return res

    mm.net.bbox_head.predict = mm_predict
    mm.register_forward_pre_hook(lambda _mod, args: state.__setitem__("x", args[0]))
    tv = build_model("torchvision:retinanet_resnet18_fpn", data.model_num_classes, 3, fpn_channels=32)
    tv._detect = lambda images, feats, st: [dict(d) for d in lookup(images.tensors, images.image_sizes)]
    task = DetectionTask()
    loader = task.loader(ds, 4)
    a = task.evaluate(mm, loader, torch.device("cpu"))
    b = task.evaluate(tv, loader, torch.device("cpu"))
    assert a == b or all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)
    assert 5.0 < a["AP"] < 95.0 and a["AP50"] > a["AP75"]  # not trivial: the jitter and the wrong labels count


def _key(img):
    """An image's identity: its size and every 97th value (exact copies in the padded batch)."""
    return (tuple(img.shape), tuple(img.flatten()[::97].tolist()))


def _mmdet_reference(net, cfg, images_rgb255, sizes, targets=None):
    """mmdet's own path: BGR pixels through the config's DetDataPreprocessor, then predict / loss."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    from mmdet.registry import MODELS as MMDET_MODELS

    pre = MMDET_MODELS.build(cfg.model.data_preprocessor)
    samples = []
    for k, (h, w) in enumerate(sizes):
        s = DetDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)})
        if targets is not None:
            gt = InstanceData()
            gt.bboxes = targets[k]["boxes"].float()
            gt.labels = targets[k]["labels"].long() - 1
            s.gt_instances = gt
        samples.append(s)
    inputs = [im[[2, 1, 0]] for im in images_rgb255]  # mmdet reads BGR
    batch = pre({"inputs": inputs, "data_samples": samples}, training=targets is not None)
    if targets is None:
        return net.predict(batch["inputs"], batch["data_samples"], rescale=False)
    return net.loss(batch["inputs"], batch["data_samples"])


@needs_backend
@pytest.mark.parametrize("kind", ["fcos", "reppoints"])
def test_a_checkpoint_written_by_mmdet_loads_and_reproduces_its_outputs(kind, data, tmp_path):
    """mmdet builds the detector from its config, mmengine saves it as its runner does (meta, state_dict,
    message_hub with its numpy-backed buffers, optimizer); ``weights:`` loads it into ``mmdet:`` and the detections
    and losses equal mmdet's own forward from the same pixels (FCOS: caffe-style BGR preprocessor)."""
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    from kdbench.data.coco import IMAGENET_MEAN, IMAGENET_STD
    from kdbench.models.sources import load_weights
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    name, opts = CONFIGS[kind]
    register_all_modules(init_default_scope=False)
    cfg = M.model_config(name, data.model_num_classes - 1, {**opts, "model.test_cfg.score_thr": 0.0})
    torch.manual_seed(3)
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):
        net = MMDET_MODELS.build(cfg.model)
    net.init_weights()
    with torch.no_grad():  # a trained-looking checkpoint: every parameter moved off its initialisation
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    hub = MessageHub.get_instance("kdbench-test")
    hub.update_scalar("train/loss", 1.25)
    hub.update_scalar("train/loss", 0.75)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    ckpt = {"meta": {"epoch": 24, "iter": 1000, "mmengine_version": "0.10.7", "dataset_meta": {"classes": ("a", "b")},
                     "cfg": cfg.pretty_text, "seed": 3, "experiment_name": "t"},
            "state_dict": weights_to_cpu(net.state_dict()), "message_hub": hub.state_dict(),
            "optimizer": opt.state_dict()}
    path = tmp_path / "mmdet_ckpt.pth"
    save_checkpoint(ckpt, str(path))

    ours = _mm(kind, data, seed=99, **{"model.test_cfg.score_thr": 0.0})
    sha = load_weights(ours, path)
    assert len(sha) == 64
    net.eval()
    ours.eval()
    x, y = _batch(data, 2, "val")
    # the same pixels for mmdet: undo kdbench's normalisation (RGB 0..255, each image its own size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = [(x.tensors[k, :, :h, :w] * std + mean) * 255.0 for k, (h, w) in enumerate(x.image_sizes)]
    with torch.no_grad():
        ref = _mmdet_reference(net, cfg, pixels, x.image_sizes)
        got = ours(x, detect=True).extras["detections"]
    for r, g in zip(ref, got):
        p = r.pred_instances
        assert len(p.bboxes) > 0 and len(g["boxes"]) == len(p.bboxes)
        assert torch.allclose(g["boxes"], p.bboxes, atol=2e-3)
        assert torch.allclose(g["scores"], p.scores, atol=1e-4)
        assert torch.equal(g["labels"], p.labels + 1)
    net.train()  # RepPoints' head returns boxes in eval mode: mmdet computes losses in train mode
    ours.train()
    torch.manual_seed(5)
    ref_losses = _mmdet_reference(net, cfg, pixels, x.image_sizes, targets=y)
    torch.manual_seed(5)
    our_losses = ours(x, (), targets=y).extras["losses"]
    for k, v in ref_losses.items():
        if "loss" in k:
            v = sum(v) if isinstance(v, (list, tuple)) else v
            assert torch.allclose(our_losses[k], v, rtol=1e-3, atol=1e-5), k
    # kdbench's own model.pt of an mmdet: model is mmdet's state dict: mmdet loads it back
    torch.save(ours.net.state_dict(), tmp_path / "model.pt")
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)


@needs_backend
def test_checkpoint_with_foreign_objects_is_refused_naming_them(tmp_path, data):
    import collections

    from kdbench.models.sources import load_weights

    class Foreign:
        pass

    globals()["Foreign"] = Foreign
    Foreign.__module__ = __name__
    Foreign.__qualname__ = "Foreign"
    m = _mm("retinanet", data)
    torch.save({"state_dict": collections.OrderedDict(m.net.state_dict()), "meta": {"x": Foreign()}},
               tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not unpickle.*Foreign"):
        load_weights(m, tmp_path / "bad.pth")


@needs_backend
@pytest.mark.parametrize("kind", ["reppoints", "fcos"])
def test_teacher_losses_in_eval_mode_leave_bn_alone_and_reach_edits(kind, data):
    """FreeKD/AFP stage 1 on an mmdet teacher: ``teacher(x)`` in eval mode (RepPoints/FCOS heads branch on
    ``training``), an edit on a neck output, the task loss through loss_fn: finite, the gradient reaches the edit,
    BN statistics and the teacher's weights untouched, and it equals the train-mode loss with BN frozen."""
    from kdbench.models.tap import edit_tap
    from kdbench.tasks.detection import DetectionTask

    task = DetectionTask()
    m = _mm(kind, data, **{"model.backbone.norm_eval": True}).eval().requires_grad_(False)
    bn = m.net.backbone.bn1
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    scale = torch.ones((), requires_grad=True)
    x, y = _batch(data, 2)
    with edit_tap(m, "fpn", lambda i, f: f * scale if i == 0 else f):
        out = m(x)
        loss = task.loss(out, y)
    loss.backward()
    assert torch.isfinite(loss) and scale.grad is not None and scale.grad.abs() > 0
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[2]
    assert all(p.grad is None for p in m.parameters()) and not m.training
    m.train()  # norm_eval: the backbone's BN stays in eval mode in train(), so the two losses must agree
    with torch.no_grad():
        train_loss = task.loss(m(x, (), targets=y), y)
    assert torch.allclose(loss.detach(), train_loss, rtol=1e-4), (float(loss), float(train_loss))


@needs_backend
def test_student_step_evaluate_and_detections(data):
    from kdbench.tasks.detection import DetectionTask

    task = DetectionTask()
    m = _mm("retinanet", data).train()
    x, y = task.to_device(*_batch(data, 2), torch.device("cpu"))
    out = task.forward(m, x, y, ("fpn",))
    assert set(out.extras["losses"]) == {"loss_cls", "loss_bbox"} and len(out["fpn"]) == 5
    loss = task.loss(out, y)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.bbox_head.parameters())
    metrics = task.evaluate(m, task.loader(data.val, 4), torch.device("cpu"))
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and m.training


# ------------------------------------------------------------------------------- every detection method
def _detection_methods():
    from kdbench.registry import METHODS

    return [n for n, c in METHODS.items() if "detection" in c.tasks and c.needs_teacher]


def _one_step(name, student, teacher, data):
    from kdbench.method import Batch
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.tasks.detection import DetectionTask

    task = DetectionTask()
    ctx = build_context(task, data, {"epochs": 1, "batch_size": 2}, student, teacher, torch.device("cpu"))
    cls = METHODS.get(name)
    params = {"stage_iters": 2} if "stage_iters" in cls.param_defaults() else {}
    method = cls(ctx, **cls.check_params(params))
    if method.stage_config() is not None:
        method.load_stage(method.run_stage(teacher, task.loader(data.train, 2), torch.device("cpu")))
        assert all(p.grad is None for p in teacher.parameters())
    taps = method.taps()
    assert "fpn" in taps.teacher
    if name in ("freekd", "afp"):
        assert "reg" in taps.teacher and method.use_reg
    student.check_taps(taps.student)
    teacher.check_taps(taps.teacher)
    student.train()
    method.train()
    x, y = _batch(data, 2)
    s = task.forward(student, x, y, taps.student)
    with torch.no_grad():
        t = task.forward(teacher, x, None, taps.teacher)
    assert "losses" not in t.extras and "loss_fn" not in t.extras
    terms = method(s, t, Batch(inputs=x, targets=y, epoch=1, step=0, epochs=1, steps_per_epoch=1))
    assert terms
    for k, v in terms.items():
        assert k.startswith("loss_") and v.dim() == 0 and v.dtype == torch.float32 and math.isfinite(float(v.detach()))
    loss = method.task_loss_weight * task.loss(s, y) + sum(terms.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


@needs_backend
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_detection_method_one_step(kind, data):
    for name in _detection_methods():
        student = _mm(kind, data, seed=1)
        teacher = _mm(kind, data, seed=2, **{"model.backbone.depth": 34}).eval().requires_grad_(False)
        _one_step(name, student, teacher, data)


@needs_backend
def test_mmdet_teacher_torchvision_student(data):
    """RetinaNet from mmdet (ResNet-34) teaching torchvision's RetinaNet-R18: the same 5 FPN levels, and the same
    regression layout (9 anchors x 4), so every detection method runs across the two backends."""
    from kdbench.models.sources import build_model

    for name in _detection_methods():
        torch.manual_seed(1)
        student = build_model("torchvision:retinanet_resnet18_fpn", data.model_num_classes, 3, fpn_channels=32)
        teacher = _mm("retinanet", data, seed=2, **{"model.backbone.depth": 34}).eval().requires_grad_(False)
        _one_step(name, student, teacher, data)


@needs_backend
@pytest.mark.slow
@pytest.mark.parametrize("suite", ["quickstart_detection_mmdet.yaml", "coco_spatial_vs_dwt.yaml",
                                   "coco_detection_mmdet.yaml"])
def test_mmdet_suites_run_end_to_end_shrunk(suite, tmp_path):
    """Each shipped mmdet suite, shrunk: generated data, its detectors at ResNet-18 size (the configs' own heads),
    teacher checkpoints written by mmengine where the (overridden) paths point, 1 step, 1 seed."""
    import yaml

    from kdbench.scheduler import launch
    from kdbench.suite import load_raw, load_suite
    from kdbench.tables import make_table
    from mmengine.runner.checkpoint import save_checkpoint

    raw = load_raw(SUITES / suite)
    dat = {"name": "coco_shapes", "root": str(tmp_path / "data"), "n_train": 4, "n_val": 2, "image_size": 64,
           "min_size": 64, "max_size": 96}
    sets = [f"data={yaml.safe_dump(dat, default_flow_style=True).strip()}", "recipe.epochs=1",
            "recipe.max_steps_per_epoch=1", "recipe.batch_size=2", "recipe.eval_batch_size=2", "recipe.num_workers=0",
            "recipe.amp=false", "seeds=[0]"]
    for i, m in enumerate(raw["methods"]):
        name = m if isinstance(m, str) else m["name"]
        if name in ("freekd", "afp"):
            sets.append(f"methods.{i}={{name: {name}, params: {{stage_iters: 2}}}}" if isinstance(m, str)
                        else f"methods.{i}.params.stage_iters=2")
    from kdbench.models.sources import build_model

    for i, pair in enumerate(raw["pairs"]):
        kw = {}
        for side in ("teacher", "student"):
            model = pair[side]["model"].split(":", 1)[1]
            opts = {**_R18, "model.bbox_head.stacked_convs": 1}
            if "reppoints" in model:
                opts["model.bbox_head.point_feat_channels"] = 32
            if "x101" in model:  # ResNeXt(-DCN) configs: a plain ResNet-18 in their place
                del opts["model.backbone.depth"]
                opts["model.backbone"] = {"_delete_": True, "type": "ResNet", "depth": 18, "num_stages": 4,
                                          "out_indices": [0, 1, 2, 3], "frozen_stages": 1, "style": "pytorch",
                                          "norm_cfg": {"type": "BN", "requires_grad": True}, "norm_eval": True}
            kw[side] = {"cfg_options": opts}
            sets.append(f"pairs.{i}.{side}.kwargs={yaml.safe_dump(kw[side], default_flow_style=True, width=10**6).strip()}")
        if "weights" in pair["teacher"]:
            torch.manual_seed(i)
            net = build_model(pair["teacher"]["model"], 5, 3, **kw["teacher"]).net
            path = tmp_path / "ckpt" / f"{i}.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint({"meta": {"epoch": 24}, "state_dict": net.state_dict()}, str(path))
            sets.append(f"pairs.{i}.teacher.weights={path}")
        else:
            sets += [f"pairs.{i}.teacher.train.recipe.epochs=1", f"pairs.{i}.teacher.train.data.n_train=4"]
    s = load_suite(SUITES / suite, sets)
    recs = launch(s, tmp_path / "res", executor="debug", log=lambda m: None)
    bad = [(r["label"], r["pair"], (r["error"] or "").strip().splitlines()[-1:]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    for r in recs:
        if r["kind"] in ("teacher", "distill"):  # stage runs (FreeKD prompts) have no metrics
            assert {m["metric"] for m in r["metrics"]} == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    layout = "method_x_domain" if suite == "coco_spatial_vs_dwt.yaml" else "auto"
    table = make_table(tmp_path / "res" / s.name, layout=layout)
    if layout == "method_x_domain":
        assert "spatial" in table and "dwt" in table and "42.4" in table  # Table 10's FreeKD reference
