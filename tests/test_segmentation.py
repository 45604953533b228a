"""The segmentation task: mIoU from a hand-made confusion matrix, the loss with ignored pixels, segmenters and
their taps (smp and torchvision), every segmentation method for one step, the shipped segmentation suites (dry
run, and end to end shrunk to seconds on generated Cityscapes-layout data)."""

import math
from pathlib import Path

import pytest
import torch

from kdbench.data.cityscapes import write_cityscapes
from kdbench.method import Batch, Distiller, Outputs
from kdbench.models.segmentation import SegmentationTapModel
from kdbench.models.sources import build_model, check_model
from kdbench.registry import METHODS
from kdbench.runner import build_context
from kdbench.tasks.segmentation import SegmentationTask, confusion_matrix, pad_collate, segmentation_metrics
from kdbench.step import train_step

torch.set_num_threads(2)
SUITES = Path(__file__).resolve().parent.parent / "suites"
SEG_SUITES = ("cityscapes_segmentation.yaml", "quickstart_segmentation.yaml")


# ------------------------------------------------------------------------------------------------ metrics
def test_miou_from_a_hand_made_confusion_matrix():
    # rows = ground truth, columns = prediction; class 3 never occurs (left out), class 2 is only predicted
    conf = torch.tensor([[8, 2, 0, 0],
                         [1, 3, 1, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    iou_a = 8 / (10 + 9 - 8)
    iou_b = 3 / (5 + 5 - 3)
    iou_c = 0 / (0 + 1 - 0)
    assert m["IoU/a"] == pytest.approx(100 * iou_a)
    assert m["IoU/b"] == pytest.approx(100 * iou_b)
    assert m["IoU/c"] == 0.0 and "IoU/d" not in m
    assert m["mIoU"] == pytest.approx(100 * (iou_a + iou_b + iou_c) / 3)
    assert m["aAcc"] == pytest.approx(100 * 11 / 15)
    assert m["mAcc"] == pytest.approx(100 * (8 / 10 + 3 / 5) / 2)


def test_confusion_matrix_ignores_255_and_counts_gt_by_prediction():
    target = torch.tensor([[0, 0, 1, 255], [2, 1, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="labels must be in"):
        confusion_matrix(pred, torch.full_like(target, 7), 3)
    perfect = segmentation_metrics(confusion_matrix(target.clamp(max=2), target, 3))
    assert perfect["mIoU"] == 100.0 and perfect["aAcc"] == 100.0


def test_loss_ignores_255_and_evaluate_on_a_perfect_model():
    task = SegmentationTask()
    y = torch.tensor([[[0, 1], [255, 255]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = 5.0
    logits[0, 2, 1] = 100.0  # wrong, but on ignored pixels
    ref = torch.nn.functional.cross_entropy(logits[..., 0, :], y[..., 0, :])
    assert float(task.loss(Outputs(logits=logits), y)) == pytest.approx(float(ref))
    assert float(task.loss(Outputs(logits=logits), torch.full_like(y, 255))) == 0.0  # no NaN

    class Oracle(torch.nn.Module):  # predicts the label hidden in the first input channel
        def forward(self, x, taps=()):
            lab = x[:, 0].long()
            return Outputs(logits=torch.nn.functional.one_hot(lab, 4).permute(0, 3, 1, 2).float() * 10)

    class DS(torch.utils.data.Dataset):
        classes = ["w", "x", "y", "z"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            lab = torch.randint(0, 3, (5, 4 + i), generator=torch.Generator().manual_seed(i))
            return lab[None].float().repeat(3, 1, 1), lab

    out = task.evaluate(Oracle(), task.loader(DS(), 2), "cpu")
    assert list(out)[:4] == ["mIoU", "aAcc", "mAcc", "loss"]
    assert out["mIoU"] == 100.0 and out["IoU/w"] == 100.0 and "IoU/z" not in out  # padding (255) is ignored


def test_pad_collate_pads_images_with_0_and_labels_with_255():
    xs, ys = pad_collate([(torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.long)),
                          (torch.ones(3, 4, 2), torch.ones(4, 2, dtype=torch.long))])
    assert xs.shape == (2, 3, 4, 3) and ys.shape == (2, 4, 3)
    assert (xs[0, :, 2:] == 0).all() and (ys[0, 2:] == 255).all() and (ys[1, :, 2] == 255).all()


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["smp:pspnet_resnet18", "smp:deeplabv3_resnet18", "torchvision:deeplabv3_resnet50"])
def test_segmenters_give_dense_logits_and_taps(name):
    torch.manual_seed(0)
    check_model(name)
    m = build_model(name, 5, 3)
    assert isinstance(m, SegmentationTapModel)
    m.eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = m(x, ("stages", "final", "logits"))
    assert out.logits.shape == (2, 5, 48, 64)
    stages = out["stages"]
    assert len(stages) == 4 and out["final"][0] is stages[-1]
    assert stages[-1].shape[-2:] == (6, 8)  # output stride 8 (dilated layer3/layer4)
    assert out["logits"][0].shape == (2, 5, 6, 8)  # the coarse logits, before upsampling
    up = torch.nn.functional.interpolate(out["logits"][0], size=(48, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(up, out.logits)
    # tap_modules: the modules whose outputs are the taps (FreeKD's stage-1 edit of layer4)
    seen = {}
    with m.edit_tap("final", lambda i, t: seen.setdefault(i, t) * 0):
        with torch.no_grad():
            edited = m(x, ("final",))
    assert torch.equal(seen[0], stages[-1]) and (edited["final"][0] == 0).all()
    with m.edit_tap("logits", lambda i, t: t + 1.0), torch.no_grad():
        assert torch.allclose(m(x).logits, out.logits + 1.0, atol=1e-5)


def test_smp_names_defaults_and_local_encoder_weights(tmp_path):
    with pytest.raises(ValueError, match="Did you mean smp:pspnet_resnet18"):
        check_model("smp:pspnet_resnet81")
    m = build_model("smp:pspnet_resnet18", 19, 3).eval()
    assert m.net.decoder.psp.blocks and m.net.segmentation_head[0].in_channels == 512
    assert m(torch.randn(1, 3, 64, 64), ("final",))["final"][0].shape == (1, 512, 8, 8)
    m16 = build_model("smp:deeplabv3_resnet18", 19, 3, output_stride=16).eval()
    assert m16(torch.randn(1, 3, 64, 64), ("final",))["final"][0].shape[-1] == 4
    import torchvision

    ref = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "r18.pth")
    m = build_model("smp:pspnet_resnet18", 19, 3, encoder_weights=str(tmp_path / "r18.pth"))
    assert torch.equal(m.net.encoder.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    with pytest.raises(ValueError, match="downloads nothing"):
        build_model("smp:pspnet_resnet18", 19, 3, encoder_weights="imagenet")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")  # extra blocks: unexpected keys
    with pytest.raises(ValueError, match="not a checkpoint of"):
        build_model("smp:pspnet_resnet18", 19, 3, encoder_weights=str(tmp_path / "r34.pth"))
    bad = ref.state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # a shape mismatch
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a checkpoint of"):
        build_model("smp:pspnet_resnet18", 19, 3, encoder_weights=str(tmp_path / "bad.pth"))


def test_task_rejects_classifiers(tmp_path):
    task = SegmentationTask()
    data = task.build_data({"name": "cityscapes", "root": str(write_cityscapes(tmp_path / "cs", 1, 1, 16, 32))})
    with pytest.raises(ValueError, match="not a segmentation model"):
        task.build_model({"model": "torchvision:resnet18"}, data)
    with pytest.raises(ValueError, match="not segmentation"):
        task.build_data({"name": "digits"})


# ------------------------------------------------------------------------------------------------ methods
PAIRS = {
    "smp": ("smp:pspnet_resnet50", "smp:pspnet_resnet18"),  # 2048 -> 512 channels, as R101 -> R18
    "torchvision": ("torchvision:deeplabv3_resnet50", "smp:deeplabv3_resnet18"),
}


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = write_cityscapes(tmp_path_factory.mktemp("cs") / "cs", n_train=4, n_val=2, height=32, width=64)
    return SegmentationTask().build_data({"name": "cityscapes", "root": str(root), "crop_size": 32})


@pytest.fixture(scope="module")
def seg_models(seg_data):
    """Each pair built once (building ResNet-50 segmenters is a noticeable part of this file's time)."""
    task, built = SegmentationTask(), {}
    for pair, (t_name, s_name) in PAIRS.items():
        torch.manual_seed(0)
        built[pair] = (task.build_model({"model": s_name}, seg_data), task.build_model({"model": t_name}, seg_data))
    return built


def _seg_methods():
    return [n for n, c in METHODS.items() if "segmentation" in c.tasks and c.needs_teacher]


def test_segmentation_methods_are_the_expected_ones():
    assert {"cwd", "pkd", "freekd", "kd"} <= set(_seg_methods())


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", _seg_methods())
def test_every_segmentation_method_one_step(name, pair, seg_data, seg_models):
    import copy

    task = SegmentationTask()
    torch.manual_seed(0)
    student, teacher = (copy.deepcopy(m) for m in seg_models[pair])
    teacher.eval().requires_grad_(False)
    ctx = build_context(task, seg_data, {"epochs": 2, "batch_size": 2}, student, teacher, torch.device("cpu"))
    cls = METHODS.get(name)
    params = {"stage_iters": 2} if "stage_iters" in cls.param_defaults() else {}
    method = cls(ctx, **cls.check_params(params))
    if cls.stage_params:
        method.load_stage(method.run_stage(teacher, task.loader(seg_data.train, 2), torch.device("cpu")))
        assert all(p.grad is None for p in teacher.parameters())
    taps = method.taps()
    student.check_taps(taps.student)
    teacher.check_taps(taps.teacher)
    student.train()
    method.train()
    x, y = next(iter(task.loader(seg_data.train, 2)))
    terms = train_step(student, teacher, method, task,
                       Batch(inputs=x, targets=y, epoch=1, step=0, epochs=2, steps_per_epoch=2)).terms
    assert terms and all(k.startswith("loss_") for k in terms)
    for k, v in terms.items():
        assert v.dim() == 0 and math.isfinite(float(v.detach())), (name, k, v)
        assert float(v.detach()) > 0, f"{name}: {k} is zero on different networks"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for n_, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {n_} got no gradient"
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert isinstance(method, Distiller)


def test_default_taps_per_method(seg_data, seg_models):
    task = SegmentationTask()
    student, teacher = seg_models["smp"]
    teacher.eval()
    ctx = build_context(task, seg_data, {"epochs": 1, "batch_size": 2}, student, teacher, torch.device("cpu"))
    cwd = METHODS.get("cwd")(ctx)
    assert cwd.taps().student == ("logits",) and cwd.weight == 5.0  # CWD on the logits, weight 5 (§2)
    assert ctx.shapes("teacher", "logits") == [(19, 4, 4)]
    freekd = METHODS.get("freekd")(ctx, stage_iters=1)
    assert freekd.tap == "final" and freekd.mu == 5.0  # layer4 (the last stage), μ = 5 (§7.3)
    assert [freekd.t_shapes[0]] == ctx.shapes("teacher", "stages")[-1:]
    assert METHODS.get("pkd")(ctx).taps().teacher == ("final",)


# ------------------------------------------------------------------------------------------------ suites
def test_segmentation_suites_expand_without_data(tmp_path, monkeypatch):
    """The run matrices (tests/test_suites_e2e.py dry-runs every suite through the CLI without data)."""
    from kdbench.suite import load_suite

    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "none"))
    cs = load_suite(SUITES / "cityscapes_segmentation.yaml")
    assert [(s.kind, s.label, s.pair) for s in cs.specs] == [
        ("teacher", "teacher", "pspnet_r101→pspnet_r18"),
        *[("distill", m, "pspnet_r101→pspnet_r18") for m in ("baseline", "cwd")],
        ("stage", "freekd", "pspnet_r101→pspnet_r18"), ("distill", "freekd", "pspnet_r101→pspnet_r18"),
        *[("distill", m, "pspnet_r101→deeplabv3_r18") for m in ("baseline", "cwd")],
        ("stage", "freekd", "pspnet_r101→deeplabv3_r18"), ("distill", "freekd", "pspnet_r101→deeplabv3_r18")]
    assert len({s.teacher_run for s in cs.specs if s.teacher_run}) == 1  # one teacher, trained once
    assert cs.specs[0].recipe["epochs"] * (2975 // cs.specs[1].recipe["batch_size"]) >= 80_000
    assert 40_000 <= cs.specs[1].recipe["epochs"] * (2975 // 8) < 40_000 + 371
    assert cs.specs[1].data["crop_size"] == 512 and cs.specs[1].data["scale_range"] == [0.5, 2.0]
    qs = load_suite(SUITES / "quickstart_segmentation.yaml")
    assert [(s.kind, s.label) for s in qs.specs] == [("teacher", "teacher"), ("distill", "baseline"), ("distill", "cwd"),
                                                     ("distill", "pkd"), ("stage", "freekd"), ("distill", "freekd")]
    assert qs.specs[0].data["synthetic"]


@pytest.mark.slow
@pytest.mark.parametrize("suite", SEG_SUITES)
def test_segmentation_suites_run_end_to_end_shrunk(suite, tmp_path, monkeypatch):
    import yaml

    from kdbench.scheduler import launch
    from kdbench.suite import load_suite
    from kdbench.tables import make_table

    raw = yaml.safe_load((SUITES / suite).read_text())
    root = tmp_path / "data" / "cs"
    sets = ["recipe.epochs=1", "recipe.max_steps_per_epoch=2", "recipe.batch_size=2", "recipe.num_workers=0",
            "recipe.amp=false", "recipe.eval_batch_size=2", "seeds=[0]", "data.crop_size=32", f"data.root={root}",
            "data.synthetic={n_train: 4, n_val: 2, height: 32, width: 64}"]
    for i, pair in enumerate(raw["pairs"]):
        if "train" in pair["teacher"]:
            sets.append(f"pairs.{i}.teacher.train.recipe.epochs=1")
    for i, m in enumerate(raw["methods"]):
        if (m if isinstance(m, str) else m["name"]) in ("freekd", "afp"):
            sets.append(f"methods.{i}={{name: {m if isinstance(m, str) else m['name']}, params: {{stage_iters: 2}}}}")
    # local ImageNet encoder checkpoints where the suite looks for them (random weights, the right format)
    monkeypatch.setenv("KDBENCH_CKPT", str(tmp_path / "ckpt"))
    s = load_suite(SUITES / suite, sets)
    import torchvision

    for pair in s.raw["pairs"]:
        for side in ("teacher", "student"):
            w = (pair[side].get("kwargs") or {}).get("encoder_weights")
            if w and not Path(w).exists():
                Path(w).parent.mkdir(parents=True, exist_ok=True)
                arch = Path(w).stem
                torch.save(getattr(torchvision.models, arch)().state_dict(), w)
    recs = launch(s, tmp_path / "res", executor="debug", log=lambda m: None)
    bad = [(r["label"], r["pair"], (r["error"] or "").strip().splitlines()[-1:]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    assert len(recs) == len(s.specs)
    for r in (r for r in recs if r["kind"] != "stage"):  # a stage run has no metrics
        names = {m["metric"] for m in r["metrics"]}
        assert {"mIoU", "aAcc", "mAcc", "loss"} <= names and any(n.startswith("IoU/") for n in names)
    table = make_table(tmp_path / "res" / s.name)
    assert "mIoU" in table and all(r["pair"] in table for r in recs)
