"""The method contract, checked for every registered method (as timm checks every model).

Each method is built through the same Context the runner builds, on a tiny CNN pair and, where the method
claims it (``heterogeneous``), on ViT, Swin and MLP-Mixer teachers with a CNN student. One training step must
give finite scalar ``loss_*`` terms; after backward the student and the method's own trainable modules have
gradients, the teacher has none and stays in eval mode; unknown parameters are rejected.
"""

import math

import pytest
import torch

from kdbench.method import Batch, Distiller
from kdbench.models.sources import build_model
from kdbench.registry import METHODS
from kdbench.runner import build_context
from kdbench.tasks.classification import ClassificationTask
from kdbench.step import train_step

from kdb_util import random_classification_data

K = 10
HETERO_TEACHERS = {
    "vit": ("timm:vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)),
    "swin": ("timm:swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                                                       num_heads=(1, 1, 1, 1), window_size=2)),
    "mixer": ("timm:mixer_s16_224", dict(img_size=64)),  # its builder pins patch 16, depth and width
}
# parameters that the tiny heterogeneous setting needs (pre-ReLU taps exist only in kdbench's CIFAR nets)
HETERO_PARAMS = {"reviewkd": {"teacher_preact": False}}


def _data(n=8, size=32):
    return random_classification_data(n, size, K)


def _classification_methods():
    return [n for n, c in METHODS.items() if "classification" in c.tasks and c.needs_teacher]


def _cases():
    cases = []
    for name in _classification_methods():
        cases.append(pytest.param(name, "cnn", id=f"{name}-cnn"))
        if METHODS.get(name).heterogeneous:
            for arch in HETERO_TEACHERS:
                cases.append(pytest.param(name, arch, id=f"{name}-{arch}"))
    return cases


def one_step(name: str, teacher_kind: str, params: dict | None = None):
    torch.manual_seed(0)
    task = ClassificationTask()
    data = _data(size=64 if teacher_kind in ("mixer", "swin") else 32)
    student = build_model("kdbench:resnet8", K, 3)
    if teacher_kind == "cnn":
        model = "kdbench:resnet14"
        teacher = build_model(model, K, 3)
    else:
        model, kw = HETERO_TEACHERS[teacher_kind]
        teacher = build_model(model, K, 3, **kw)
    teacher.eval().requires_grad_(False)
    recipe = {"epochs": 2, "batch_size": 4}
    ctx = build_context(task, data, recipe, student, teacher, torch.device("cpu"))
    cls = METHODS.get(name)
    extra = dict(params or {})
    if teacher_kind != "cnn":
        extra = {**HETERO_PARAMS.get(name, {}), **extra}
    if "stage_iters" in cls.param_defaults():
        extra.setdefault("stage_iters", 2)  # a short stage: its own tests check what it learns
    cls.check_pair(extra, model, "kdbench:resnet8")  # the validate-time pair check accepts what works
    method = cls(ctx, **cls.check_params(extra))
    if cls.stage_params:
        from torch.utils.data import DataLoader

        method.load_stage(method.run_stage(teacher, DataLoader(data.train, batch_size=4), torch.device("cpu")))
        assert all(p.grad is None for p in teacher.parameters()), f"{name}: the stage trained the teacher"
    taps = method.taps()
    student.check_taps(taps.student)
    teacher.check_taps(taps.teacher)
    student.train()
    method.train()
    x = torch.stack([data.train[i][0] for i in range(4)])
    y = torch.stack([data.train[i][1] for i in range(4)])
    terms = train_step(student, teacher, method, task,
                       Batch(inputs=x, targets=y, epoch=2, step=2, epochs=2, steps_per_epoch=2)).terms
    return student, teacher, method, terms


@pytest.mark.parametrize("name, teacher_kind", _cases())
def test_method_contract(name, teacher_kind):
    student, teacher, method, terms = one_step(name, teacher_kind)
    assert isinstance(method, Distiller)
    assert terms, f"{name} returned no distillation term"
    for k, v in terms.items():
        assert k.startswith("loss_"), f"{name}: term {k!r} must be named loss_*"
        assert v.dim() == 0 and v.dtype == torch.float32, f"{name}: {k} must be an fp32 scalar"
        assert math.isfinite(float(v.detach())), f"{name}: {k} is not finite"
    s_grads = [p.grad for p in student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert s_grads, f"{name}: the distillation step gives the student no gradient"
    for n_, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: trainable module parameter {n_} got no gradient"
    assert all(p.grad is None for p in teacher.parameters()), f"{name}: the teacher got a gradient"
    assert not teacher.training, f"{name}: the teacher left eval mode"


@pytest.mark.parametrize("name", METHODS.names())
def test_unknown_params_rejected_and_metadata(name):
    cls = METHODS.get(name)
    with pytest.raises(ValueError, match="unknown parameter"):
        cls.check_params({"definitely_not_a_param": 1})
    assert cls.citation, f"{name} needs a one-line citation"
    assert cls.tasks and isinstance(cls.version, int)
    doc = (cls.__doc__ or "") + (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")
    if name != "baseline":
        assert "docs/methods.md §" in doc, f"{name} must cite its docs/methods.md section"
    # the stage contract: stage_params name constructor parameters, and a method with a stage implements it
    params = cls.param_defaults()
    assert isinstance(cls.stage_params, tuple) and set(cls.stage_params) <= set(params), cls.stage_params
    has_stage = cls.run_stage is not Distiller.run_stage and cls.load_stage is not Distiller.load_stage
    assert bool(cls.stage_params) == has_stage, f"{name}: stage_params and run_stage/load_stage go together"
