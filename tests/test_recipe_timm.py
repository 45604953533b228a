"""The recipe keys that express the OFA paper's training recipe (OFAKD's train.py, a fork of timm 0.6's):
``label_smoothing``, ``mixup``, the ``timm_cosine`` schedule and the optimiser's ``decay_filter``, checked
against timm's own loss functions, scheduler, optimiser factory and Mixup, and in short training runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench import train
from kdbench.method import Outputs
from kdbench.recipe import (MIXUP_DEFAULTS, Recipe, RecipeError, build_mixup, build_optimizer, lr_factor, mix_batch,
                            mixup_seed)
from kdbench.tasks.classification import ClassificationTask
from kdb_util import random_classification_data

CPU = torch.device("cpu")
BASE = {"epochs": 2, "batch_size": 4, "amp": False, "eval_batch_size": 16, "optimizer": {"name": "sgd"},
        "schedule": {"name": "constant"}}
#: OFAKD's CIFAR-100 configs (configs/cifar/cnn.yaml, vit_mlp.yaml) as kdbench recipe parts
CNN = {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 2e-3, "decay_filter": "1d"},
       "schedule": {"name": "timm_cosine", "warmup_epochs": 3, "warmup_lr": 1e-4, "min_lr": 1e-3},
       "label_smoothing": 0.1}
VIT = {"optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05, "decay_filter": "timm"},
       "schedule": {"name": "timm_cosine", "warmup_epochs": 20, "warmup_lr": "5e-7", "min_lr": "1e-5"},
       "grad_clip": 5.0, "label_smoothing": 0.1, "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}}


# -- losses -------------------------------------------------------------------------------------------------
def test_label_smoothing_is_timms_label_smoothing_cross_entropy():
    from timm.loss import LabelSmoothingCrossEntropy

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 10, generator=g) * 3, torch.randint(0, 10, (16,), generator=g)
    task = ClassificationTask()
    plain = task.loss(Outputs(logits=logits), y)
    assert torch.equal(plain, nn.functional.cross_entropy(logits, y))  # 0 until the recipe says otherwise
    task.configure_training(Recipe.of({**BASE, **CNN}))
    smoothed = task.loss(Outputs(logits=logits), y)
    assert float(smoothed) == pytest.approx(float(LabelSmoothingCrossEntropy(0.1)(logits, y)), rel=1e-6)
    assert abs(float(smoothed) - float(plain)) > 1e-3  # it does smooth
    task.configure_training(Recipe.of(BASE))  # a later recipe without the key: plain again
    assert torch.equal(task.loss(Outputs(logits=logits), y), plain)


def test_evaluation_loss_stays_plain_cross_entropy():
    class Net(nn.Module):
        def forward(self, x, taps=()):
            return Outputs(logits=x.flatten(1)[:, :10] * 3)

    data = random_classification_data(n=8, size=4, k=10)
    task = ClassificationTask()
    loader = task.loader(data.val, 8)
    before = task.evaluate(Net(), loader, CPU)["loss"]
    task.configure_training({"label_smoothing": 0.3})
    assert task.label_smoothing == 0.3 and task.evaluate(Net(), loader, CPU)["loss"] == before


def test_soft_targets_are_timms_soft_target_cross_entropy():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(8, 10, generator=g) * 3, torch.randint(0, 10, (8,), generator=g)
    np.random.seed(0)
    _, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)(
        torch.randn(8, 3, 8, 8, generator=g), y)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    task = ClassificationTask()
    task.configure_training({"label_smoothing": 0.1})  # already in the soft targets: not applied again
    got = float(task.loss(Outputs(logits=logits), soft))
    assert got == pytest.approx(float(SoftTargetCrossEntropy()(logits, soft)), rel=1e-6)
    assert got != pytest.approx(float(nn.functional.cross_entropy(logits, soft, label_smoothing=0.1)), rel=1e-4)


# -- the timm_cosine schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [CNN, VIT], ids=["cnn", "vit"])
def test_timm_cosine_is_timms_cosine_lr_scheduler_per_epoch(recipe):
    from timm.scheduler import CosineLRScheduler

    opt_cfg, sch = recipe["optimizer"], recipe["schedule"]
    lr, epochs, spe = float(opt_cfg["lr"]), 300, 7
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    timm_sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=float(sch["min_lr"]),
                                   warmup_lr_init=float(sch["warmup_lr"]), warmup_t=int(sch["warmup_epochs"]),
                                   t_in_epochs=True)
    for e in (0, 1, 2, 3, 4, 10, 19, 20, 21, 100, 150, 299):
        timm_sched.step(e)
        want = opt.param_groups[0]["lr"]
        for k in (0, 3, spe - 1):  # the same LR all through the epoch
            got = lr * lr_factor(sch, e * spe + k, spe, epochs, lr=lr)
            assert got == pytest.approx(want, rel=1e-12, abs=0), (e, k)
    # the first epoch is warmup_lr itself and the warm-up reaches lr exactly at warmup_epochs
    w = int(sch["warmup_epochs"])
    assert lr * lr_factor(sch, 0, spe, epochs, lr=lr) == pytest.approx(float(sch["warmup_lr"]), rel=1e-12)
    assert lr_factor(sch, w * spe, spe, epochs, lr=lr) == pytest.approx(
        (float(sch["min_lr"]) + 0.5 * (lr - float(sch["min_lr"])) * (1 + math.cos(math.pi * w / epochs))) / lr)
    with pytest.raises(ValueError, match="needs the optimiser's lr"):
        lr_factor(sch, 0, spe, epochs)


def test_timm_cosine_in_the_loop_sets_every_group_to_timms_lr(tmp_path):
    """fit sets each group's LR to its base LR × the factor: decay_filter's two groups both get timm's LR."""
    members, res = _fit_one(tmp_path, {**CNN, "schedule": {**CNN["schedule"], "warmup_epochs": 1}}, epochs=2)
    want = 1e-3 + 0.5 * (0.05 - 1e-3) * (1 + math.cos(math.pi / 2))  # epoch 2 (t = 1), after the warm-up
    assert res.history[0]["lr"] == pytest.approx(1e-4, rel=1e-12)  # epoch 1 (t = 0): warmup_lr
    assert res.history[1]["lr"] == pytest.approx(want, rel=1e-12)
    groups = members[0].loop.setup.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 2e-3]
    assert [g["lr"] for g in groups] == pytest.approx([want, want], rel=1e-12)


# -- decay_filter --------------------------------------------------------------------------------------------
def _tiny_vit():
    from kdbench.models.sources import build_model

    torch.manual_seed(0)
    return build_model("timm:vit_tiny_patch16_224", 10, 3, img_size=32, patch_size=8, depth=1)


def test_decay_filter_groups_are_timms():
    from timm.optim import create_optimizer_v2

    student = _tiny_vit()  # a TapModel around the timm ViT (student.net)
    projector = nn.Sequential(nn.Linear(192, 64), nn.LayerNorm(64), nn.Linear(64, 10))  # a method's own part
    params = [p for p in list(student.parameters()) + list(projector.parameters()) if p.requires_grad]
    opt = build_optimizer(params, VIT["optimizer"], modules=(student, projector))
    no_decay, decay = opt.param_groups
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    assert no_decay["lr"] == decay["lr"] == 5e-4

    names = {id(p): n for n, p in list(student.named_parameters()) + [("proj." + n, p) for n, p in
                                                                       projector.named_parameters()]}
    got_no_decay = {names[id(p)] for p in no_decay["params"]}
    want = {n for n, p in student.named_parameters() if p.ndim <= 1} | {"net.pos_embed", "net.cls_token"} | \
        {"proj." + n for n, p in projector.named_parameters() if p.ndim <= 1}
    assert got_no_decay == want
    assert {"net.pos_embed", "net.cls_token", "proj.0.bias", "proj.1.weight"} <= got_no_decay
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - want
    assert sorted(map(id, no_decay["params"] + decay["params"])) == sorted(map(id, params))

    # a bias of more than one dimension is named so: zero decay too (timm's rule)
    odd = nn.Sequential(nn.Module())
    odd[0].weight, odd[0].bias = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.zeros(2, 3))  # "0.bias"
    groups = build_optimizer(list(odd.parameters()), VIT["optimizer"], modules=(odd,)).param_groups
    assert [[p is odd[0].bias for p in g["params"]] for g in groups] == [[True], [False]]

    # timm's own factory on the bare timm model puts the same parameters in its zero-decay group
    timm_opt = create_optimizer_v2(student.net, "adamw", lr=5e-4, weight_decay=0.05)
    timm_zero = {id(p) for g in timm_opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    ours_zero = {id(p) for p in no_decay["params"]} - {id(p) for p in projector.parameters()}
    assert ours_zero == timm_zero


def test_decay_filter_1d_is_timms_factory_on_a_wrapper():
    """OFAKD hands timm's factory its distiller (no no_weight_decay()): a ViT student's pos_embed and cls_token
    keep their weight decay; only the 1-D parameters and biases go without."""
    from timm.optim import create_optimizer_v2

    student = _tiny_vit()
    wrapper = nn.ModuleDict({"student": student.net})  # what the factory sees: no no_weight_decay()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = build_optimizer(params, {**VIT["optimizer"], "decay_filter": "1d"}, modules=(student,))
    ours = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    timm_opt = create_optimizer_v2(wrapper, "adamw", lr=5e-4, weight_decay=0.05)
    assert ours == {id(p) for g in timm_opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(student.net.pos_embed) not in ours and id(student.net.cls_token) not in ours


def test_without_decay_filter_one_group_as_before():
    student = _tiny_vit()
    params = [p for p in student.parameters() if p.requires_grad]
    for cfg in ({k: v for k, v in VIT["optimizer"].items() if k != "decay_filter"},
                {**VIT["optimizer"], "decay_filter": None}):
        opt = build_optimizer(params, cfg, modules=(student,))
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.05
        assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]


# -- recipe checks ------------------------------------------------------------------------------------------
def test_new_keys_count_in_the_identity_only_when_set():
    given = BASE
    plain = Recipe.of(given)
    assert "label_smoothing" not in plain.identity() and "mixup" not in plain.identity()
    assert (plain.label_smoothing, plain.mixup) == (0.0, None)
    r = Recipe.of({**given, "label_smoothing": 0.1, "mixup": {"cutmix_alpha": 1.0}})
    assert r.identity()["label_smoothing"] == 0.1 and r.identity()["mixup"] == {"cutmix_alpha": 1.0}


def test_odd_batch_and_unknown_mixup_keys_are_rejected():
    given = {**BASE, **VIT}
    with pytest.raises(RecipeError, match=r"recipe\.batch_size: mixup needs an even batch size .* got 5"):
        Recipe.of({**given, "batch_size": 5})
    with pytest.raises(RecipeError, match="recipe.mixup.alpha: unknown key; valid keys here: "
                                          + ", ".join(MIXUP_DEFAULTS)):
        Recipe.of({**given, "mixup": {"alpha": 0.8}})
    bad = [({"mode": "global"}, "mixup.mode: unknown mode 'global'; valid: batch, pair, elem"),
           ({"prob": 1.5}, "mixup.prob: expected a number >= 0.0 and <= 1.0"),
           ({"mixup_alpha": 0.0}, "mixup: mixup_alpha or cutmix_alpha must be > 0")]
    for mix, msg in bad:
        with pytest.raises(RecipeError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            Recipe.of({**given, "mixup": mix})
    with pytest.raises(RecipeError, match=r"recipe\.label_smoothing: expected a number >= 0\.0 and < 1\.0"):
        Recipe.of({**given, "label_smoothing": 1.0})
    with pytest.raises(RecipeError, match="optimizer.decay_filter: unknown filter 'yes'; valid: 1d, timm"):
        Recipe.of({**given, "optimizer": {**VIT["optimizer"], "decay_filter": "yes"}})
    with pytest.raises(RecipeError, match="schedule.warmup_lr: expected a number"):
        Recipe.of({**given, "schedule": {**VIT["schedule"], "warmup_lr": "tiny"}})
    # a batch that turns out odd at run time (a training set smaller than a batch, a distributed slice)
    mixup = build_mixup(Recipe.of(given), 10)
    with pytest.raises(ValueError, match="a training batch of 3 images; mixup needs an even number"):
        mix_batch(mixup, torch.randn(3, 3, 8, 8), torch.arange(3), 0)


def test_the_task_must_take_the_keys():
    from kdbench.tasks.base import Task

    class Detection(Task):
        name = "detection"

    with pytest.raises(ValueError, match="are for classification; the detection task takes neither"):
        Detection().configure_training(Recipe.of({**BASE, **CNN}))
    Detection().configure_training(Recipe.of(BASE))  # without them: nothing to take


def test_mix_batch_is_seeded_and_leaves_numpys_state():
    mixup = build_mixup(Recipe.of({**BASE, **VIT}), 10)
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    a = mix_batch(mixup, x.clone(), y, mixup_seed(0, 1, 0))
    np.random.random(7)  # draws between batches change nothing
    b = mix_batch(mixup, x.clone(), y, mixup_seed(0, 1, 0))
    c = mix_batch(mixup, x.clone(), y, mixup_seed(0, 1, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    np.random.seed(5)
    np.random.random(7)
    mix_batch(mixup, x.clone(), y, mixup_seed(0, 1, 2))
    after = np.random.get_state()
    np.random.seed(5)
    np.random.random(7)
    ref = np.random.get_state()
    assert after[0] == ref[0] and np.array_equal(after[1], ref[1]) and after[2:] == ref[2:]


# -- training -------------------------------------------------------------------------------------------------
def _members(methods, recipe, data, root):
    from kdbench.models.sources import build_model
    from kdbench.registry import METHODS
    from kdbench.runner import build_context

    task = ClassificationTask()
    torch.manual_seed(0)
    teacher = build_model("kdbench:resnet8", 10, 3)
    members = []
    for label, name, params in methods:
        torch.manual_seed(1)
        student = build_model("kdbench:resnet8", 10, 3)
        ctx = build_context(task, data, recipe, student, teacher, CPU)
        cls = METHODS.get(name)
        torch.manual_seed(2)
        method = cls(ctx, **cls.check_params(params))
        members.append(train.Member(student, method, train.RunPlace(root / label, CPU, desc=label)))
    return members, teacher, task


def _fit_one(root, parts, epochs=2, methods=(("kd", "kd", {}),), seed=0):
    recipe = {**BASE, **parts, "epochs": epochs}
    data = random_classification_data(n=16, size=16, k=10)
    members, teacher, task = _members(methods, recipe, data, root)
    train.fit_cohort(members, teacher, task, data, recipe, seed=seed)
    for m in members:
        if m.error is not None:
            raise m.error
    return members, members[0].result


def _weights(m):
    return {k: v.clone() for k, v in m.student.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


OFA_CIFAR_VIT = {**VIT, "schedule": {**VIT["schedule"], "warmup_epochs": 1}}


def test_a_mixup_run_is_reproducible_and_leaves_numpys_state(tmp_path):
    np.random.seed(11)
    state = np.random.get_state()
    (m1,), r1 = _fit_one(tmp_path / "a", OFA_CIFAR_VIT)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    np.random.seed(99)  # another numpy state: the same run
    (m2,), r2 = _fit_one(tmp_path / "b", OFA_CIFAR_VIT)
    assert _same(_weights(m1), _weights(m2))
    assert r1.history == r2.history
    # the digest covers the mixed batch: another mixup gives another digest, the same data without mixup too
    (_,), r3 = _fit_one(tmp_path / "c", {**OFA_CIFAR_VIT, "mixup": {"cutmix_alpha": 1.0, "mixup_alpha": 0.0}})
    (_,), r4 = _fit_one(tmp_path / "d", {k: v for k, v in OFA_CIFAR_VIT.items() if k != "mixup"})
    digests = {r.history[0]["data_digest"] for r in (r1, r3, r4)}
    assert len(digests) == 3
    assert all("data_digest" not in h for h in r1.history[1:])


def test_a_mixup_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    (whole,), r_whole = _fit_one(tmp_path / "whole", OFA_CIFAR_VIT, epochs=3)
    real_end = train._end_epoch

    def stop_after_epoch_1(m, entry, task, loader, epoch, bar):
        real_end(m, entry, task, loader, epoch, bar)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_end_epoch", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        _fit_one(tmp_path / "cut", OFA_CIFAR_VIT, epochs=3)
    monkeypatch.setattr(train, "_end_epoch", real_end)
    (resumed,), r_resumed = _fit_one(tmp_path / "cut", OFA_CIFAR_VIT, epochs=3)
    assert r_resumed.resumes == 1
    assert _same(_weights(whole), _weights(resumed))
    assert r_resumed.history == r_whole.history


def test_cohort_members_and_the_teacher_see_the_same_mixed_batch(tmp_path, monkeypatch):
    seen: dict[int, list] = {}
    teacher_inputs = []
    real_step, real_teacher = train.train_step, train.teacher_forward

    def spy_step(student, teacher, method, task, batch, setup, **kw):
        seen.setdefault(id(student), []).append((batch.inputs.clone(), batch.targets.clone()))
        return real_step(student, teacher, method, task, batch, setup, **kw)

    def spy_teacher(teacher, task, x, *a, **kw):
        teacher_inputs.append(x.clone())
        return real_teacher(teacher, task, x, *a, **kw)

    monkeypatch.setattr(train, "train_step", spy_step)
    monkeypatch.setattr(train, "teacher_forward", spy_teacher)
    methods = (("kd", "kd", {}), ("dkd", "dkd", {}))  # dkd reads the targets (the argmax of the soft ones)
    members, _ = _fit_one(tmp_path / "cohort", OFA_CIFAR_VIT, methods=methods)
    a, b = (seen[id(m.student)] for m in members)
    assert len(a) == len(b) == len(teacher_inputs) == 8  # 2 epochs of 4 batches, one teacher forward per batch
    data = random_classification_data(n=16, size=16, k=10)
    raw = torch.stack([data.train[i][0] for i in range(16)])
    for (xa, ya), (xb, yb), xt in zip(a, b, teacher_inputs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xt)
        assert ya.shape == (4, 10) and torch.allclose(ya.sum(1), torch.ones(4))  # soft targets
        assert ya.min() >= 0.1 / 10 - 1e-7  # the label smoothing is folded in
        assert not any(torch.equal(xa[0], r) for r in raw)  # mixed, not a raw image
    # and each member gets what it gets alone (common random numbers)
    monkeypatch.setattr(train, "train_step", real_step)
    monkeypatch.setattr(train, "teacher_forward", real_teacher)
    (alone,), _ = _fit_one(tmp_path / "alone", OFA_CIFAR_VIT, methods=methods[1:])
    assert _same(_weights(alone), _weights(members[1]))
