"""Cost of distillation on a detector pair (issue "Dense prediction", performance benchmark; not a timed test).

For a RetinaNet pair (default: the coco_detection pair, RetinaNet-R101 -> RetinaNet-R50, 256-channel FPN) on
``--size`` px images (default 512, batch 2) on the CPU it prints

* ``teacher full``: the teacher's forward as a detector runs it in eval mode (backbone + FPN + heads + anchors +
  post-processing), ``teacher fpn``: backbone + FPN only (what kdbench runs for FPN-only methods), and the
  saving ``1 - fpn / full``;
* ``student step``: one training step of the student alone (forward with targets, backward, SGD step);
* per method: one distillation step, ``kdbench.step.train_step`` as ``fit`` runs it (student forward with its
  taps, teacher forward with its taps under no_grad, the method's terms, backward, SGD step), and its ratio to
  ``teacher full + student step`` (the cost of a naive distillation step that runs the whole teacher).

Times are the minimum over ``--repeats`` (median in parentheses) after one warm-up, taken round robin over
all entries, so that other load on the machine (which only ever adds time) biases no entry. Inputs are random
images with random boxes (weights are random too: timing does not depend on them, except the post-processing
of a trained teacher, which keeps more boxes). FreeKD/AFP use their seeded prompts (stage 1 is a one-off cost,
not part of a step).

    python benchmarks/bench_detection.py [--size 512] [--batch 2] [--threads N] [--repeats 3]
    python -m benchmarks.bench_detection --teacher retinanet_resnet50_fpn --student retinanet_resnet18_fpn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _images(batch: int, size: int, num_classes: int, seed: int = 0):
    from torchvision.models.detection.image_list import ImageList

    g = torch.Generator().manual_seed(seed)
    x = ImageList(torch.randn(batch, 3, size, size, generator=g), [(size, size)] * batch)
    targets = []
    for _ in range(batch):
        n = 5
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(n, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).clamp(max=size),
                        "labels": torch.randint(1, num_classes, (n,), generator=g)})
    return x, targets


def run(teacher_name: str = "retinanet_resnet101_fpn", student_name: str = "retinanet_resnet50_fpn",
        size: int = 512, batch: int = 2, repeats: int = 3, methods: list[str] | None = None, fpn_channels: int = 256,
        num_classes: int = 81, log=print, device: str = "cpu", amp: str | bool = False) -> dict:
    from types import SimpleNamespace

    from kdbench.method import Batch
    from kdbench.models.detection import build_detector
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.tasks.detection import DetectionTask
    from kdbench.bench import interleaved_times, summarize
    from kdbench.perf import prepare_models
    from kdbench.recipe import amp_dtype, teacher_dtype
    from kdbench.step import train_step

    dev = torch.device(device)
    amp_dt = amp_dtype(amp, dev)  # None on CPU
    t_amp = teacher_dtype({}, dev)
    task = DetectionTask()
    torch.manual_seed(0)
    teacher = build_detector(teacher_name, num_classes, fpn_channels=fpn_channels, frozen_bn=True)
    prepare_models(None, teacher, None, dev)
    x, y = _images(batch, size, num_classes)
    x, y = task.to_device(x, y, dev)
    data = SimpleNamespace(num_classes=num_classes - 1, train=[None] * batch, val=None)
    task_probe = SimpleNamespace(name="detection", example_input=lambda d: x, loss=task.loss)
    names = methods or [n for n, c in METHODS.items() if "detection" in c.tasks]
    variants = []
    for n in sorted(names, key=lambda n: n != "baseline"):
        variants.append((n, n, {}))
        if "domain" in METHODS.get(n).param_defaults():
            variants.append((f"{n}-dwt", n, {"domain": "dwt"}))

    def make_step(name: str, params: dict):
        torch.manual_seed(0)
        student = build_detector(student_name, num_classes, fpn_channels=fpn_channels).train()
        cls = METHODS.get(name)
        t = teacher if cls.needs_teacher else None
        ctx = build_context(task_probe, data, {"epochs": 1, "batch_size": batch}, student, t, dev)
        method = cls(ctx, **cls.check_params(params))
        if cls.stage_params:  # seeded prompts: stage 1 is a one-off cost, not part of a step
            method.load_stage({k: v.clone() for k, v in method.prompts.state_dict().items()})
        prepare_models(student, t, method, dev, task=task, example=x)  # as fit: the teacher's BN folded
        opt = torch.optim.SGD([p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad],
                              lr=1e-4, momentum=0.9)
        b = Batch(inputs=x, targets=y, epoch=1, step=0, epochs=1, steps_per_epoch=1)
        scaler = torch.amp.GradScaler("cuda") if amp_dt == torch.float16 else None

        def step():
            train_step(student, t, method, task, b, optimizer=opt, scaler=scaler, amp=amp_dt or False,
                       teacher_amp=t_amp if t is not None else None, device=dev)

        return step

    def full():
        with torch.no_grad():
            teacher(x, detect=True)

    def fpn():
        with torch.no_grad():
            teacher(x, ("fpn",))

    fns = {"teacher_full": full, "teacher_fpn": fpn}
    fns.update({label: make_step(name, params) for label, name, params in variants})
    # round robin after one warm-up (kdbench.bench's timing): a slow spell of the machine hits every entry alike
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    best, med = summarize(interleaved_times(fns, repeats, warmup=1, sync=sync))
    res: dict = {"teacher": teacher_name, "student": student_name, "size": size, "batch": batch,
                 "threads": torch.get_num_threads(), "repeats": repeats, "min_s": best, "median_s": med}
    res["fpn_saving"] = 1.0 - best["teacher_fpn"] / best["teacher_full"]
    ref = best["teacher_full"] + best["baseline"]
    res["ratios"] = {label: best[label] / ref for label, _, _ in variants}
    log(f"{teacher_name} -> {student_name}, {batch}x3x{size}x{size}, {res['threads']} threads, "
        f"min (median) of {repeats}")
    log(f"  teacher forward, full (heads + post-processing): {best['teacher_full']:7.3f} s ({med['teacher_full']:.3f})")
    log(f"  teacher forward, backbone + FPN only:            {best['teacher_fpn']:7.3f} s ({med['teacher_fpn']:.3f})"
        f"  -> saving {100 * res['fpn_saving']:.1f}%")
    log(f"  student train step (baseline):                   {best['baseline']:7.3f} s ({med['baseline']:.3f})")
    log(f"  distillation step / (teacher full forward + student step = {ref:.3f} s):")
    for label, _, _ in variants:
        log(f"    {label:<10} {best[label]:7.3f} s ({med[label]:.3f})   ratio {res['ratios'][label]:.3f}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="retinanet_resnet101_fpn")
    p.add_argument("--student", default="retinanet_resnet50_fpn")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--methods", nargs="*", help="methods to time (default: every detection method; "
                                                "those with a domain parameter also as -dwt)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = a.methods or None
    if methods and "baseline" not in methods:
        methods = ["baseline"] + methods
    run(a.teacher, a.student, a.size, a.batch, a.repeats, methods, a.fpn_channels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
