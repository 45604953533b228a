"""Shared test helpers (importable: tests/ is on sys.path under pytest's default import mode)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def slow_steps_env(seconds: float) -> dict:
    """Environment variables under which every training step of the Python processes started with them (a
    ``kdbench run`` subprocess, its local or SLURM jobs) sleeps ``seconds`` after it is done and timed: the
    ``sitecustomize.py`` of ``tests/hooks/slow_steps`` on ``PYTHONPATH``. No number changes."""
    path = [str(REPO / "tests" / "hooks" / "slow_steps"), str(REPO)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(path), "KDBENCH_TEST_STEP_SLEEP_S": str(seconds)}


def tiny_suite(**over) -> dict:
    """A digits suite small enough to run in seconds."""
    d = {
        "suite": "tiny",
        "version": 1,
        "task": "classification",
        "data": {"name": "digits", "train_fraction": 0.2},
        "recipe": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                                "weight_decay": 5.0e-4},
                   "schedule": {"name": "cosine"}, "amp": False, "eval_batch_size": 512},
        "pairs": [{"teacher": {"model": "kdbench:resnet8", "train": {"recipe": {"epochs": 2},
                                                                   "data": {"train_fraction": 1.0}}},
                   "student": {"model": "kdbench:resnet8"}}],
        "methods": ["baseline", "kd"],
        "seeds": [0],
    }
    d.update(over)
    return d


def one_classification_step(name: str, *, fold: bool = False, teacher_setup=None, teacher_warmup: bool = False):
    """One training step (no optimiser step) of method ``name`` on resnet20→resnet8, 8 random 16 px images, the
    same seeds every call: ``(loss terms, student gradients, teacher, prepared inputs)``. The teacher is built
    only for methods that need one; ``teacher_setup(teacher)`` runs before the models are prepared; ``fold``:
    :func:`kdbench.perf.prepare_models` gets the task (the frozen teacher's norms are folded); ``teacher_warmup``:
    one teacher forward with the method's taps before the step (so that the step's teacher forward is the first
    one that can run a graph made by :mod:`kdbench.models.frozen`)."""
    import torch

    from kdbench.method import Batch
    from kdbench.models.sources import build_model
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.tasks.classification import ClassificationTask
    from kdbench.perf import prepare_models
    from kdbench.step import train_step

    task, cpu = ClassificationTask(), torch.device("cpu")
    cls = METHODS.get(name)
    torch.manual_seed(0)
    teacher = build_model("kdbench:resnet20", 10, 3)
    if teacher_setup is not None:
        teacher_setup(teacher)
    student = build_model("kdbench:resnet8", 10, 3)
    t = teacher if cls.needs_teacher else None
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    data = type("D", (), {"num_classes": 10, "train": [(x[i], y[i]) for i in range(8)],
                          "val": [(x[i], y[i]) for i in range(2)]})()
    ctx = build_context(task, data, {"epochs": 4, "batch_size": 8}, student, t, cpu)
    torch.manual_seed(2)
    method = cls(ctx, **cls.check_params({}))
    if cls.stage_params:
        method.load_stage({k: v.clone() for k, v in method.prompts.state_dict().items()})
    xb, yb = prepare_models(student, t, method, cpu, x, y, task=task if fold else None)
    if teacher_warmup and t is not None:
        with torch.no_grad():
            task.forward(t, xb, None, method.taps().teacher)
    out = train_step(student, t, method, task, Batch(xb, yb, epoch=3, step=10, epochs=4, steps_per_epoch=4))
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    terms = {k: float(v.detach()) for k, v in {"loss": out.loss, **out.terms}.items()}
    return terms, grads, t, xb


def assert_same_step(a, b) -> None:
    """Two :func:`one_classification_step` results agree: the same loss terms (to 1e-4 relative) and student
    gradients (to 1e-3 relative, with an absolute floor of 1e-5 times the tensor's largest entry when that is above
    1: float rounding of a sum scales with its terms; DIST at random init has gradient entries of ~16)."""
    import pytest
    import torch

    (terms_a, grads_a), (terms_b, grads_b) = a[:2], b[:2]
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        assert terms_b[k] == pytest.approx(terms_a[k], rel=1e-4, abs=1e-6), k
    for k in grads_a:
        scale = max(1.0, float(grads_a[k].abs().max()))
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-3, atol=1e-5 * scale), k


def train_digits32(root: Path, methods: list, suite: str = "rob") -> tuple[Path, Path]:
    """A digits suite at 32 px (the corruption library's minimum) with a suite-trained teacher and ``methods``,
    trained for a couple of steps under ``root/res`` (debug executor); returns (suite file, results folder)."""
    import yaml

    from kdbench.scheduler import launch
    from kdbench.suite import load_suite

    d = tiny_suite(suite=suite, data={"name": "digits", "train_fraction": 0.2, "image_size": 32}, methods=methods)
    d["recipe"].update(epochs=1, max_steps_per_epoch=2, eval_batch_size=540)
    d["pairs"][0]["teacher"]["train"]["recipe"] = {"epochs": 1, "max_steps_per_epoch": 2}
    path = root / f"{suite}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    recs = launch(load_suite(path), root / "res", executor="debug", log=lambda s: None)
    assert [r["status"] for r in recs] == ["ok"] * (1 + len(methods)), [r.get("error") for r in recs]
    return path, root / "res"


def tiny_imagenet_val(root: Path) -> None:
    """Move an ImageNet-layout ``root/val/<class>/*`` into Tiny-ImageNet's ``val/images`` +
    ``val/val_annotations.txt`` (file, class, a box)."""
    import shutil

    val, lines = Path(root) / "val", []
    staging = Path(root) / "_val_images"
    staging.mkdir()
    for cls in sorted(p.name for p in val.iterdir()):
        for f in sorted((val / cls).iterdir()):
            shutil.move(str(f), staging / f.name)
            lines.append(f"{f.name}\t{cls}\t0\t0\t8\t8")
        (val / cls).rmdir()
    shutil.move(str(staging), val / "images")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def random_classification_data(n: int = 8, size: int = 32, k: int = 10):
    """A classification dataset of ``n`` seeded random ``size``-px images, labels ``0..k-1`` in turn (train = val):
    what the method tests build a context and take a step with."""
    import torch

    from kdbench.data.base import ClassificationData, TensorImages

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % k
    ds = TensorImages(x, y, mean=[0.0] * 3, std=[1.0] * 3)
    return ClassificationData(ds, ds, num_classes=k, in_chans=3, image_size=size, classes=[str(i) for i in range(k)])
