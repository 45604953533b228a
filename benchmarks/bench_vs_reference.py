"""kdbench's training step side by side with a reference step written the way the methods' official trainers
(mdistiller) run one: a plain ``nn.Module`` student forward, the teacher's forward under ``no_grad``, both in the
default NCHW memory format, the loss, ``zero_grad``, ``backward``, SGD ``step`` (written here for the
comparison, not taken from that code). Two references:

* ``ref KD``: CE·0.1 + 0.9·T²·KL (T=4), the student's logits only;
* ``ref ReviewKD``: the student's stage outputs + pooled feature through an attention-based fusion cascade
  (1×1 conv-BN, nearest resize, concat, 1×1 conv + sigmoid attention, 3×3 conv-BN, deep to shallow) and the
  hierarchical context loss against the teacher's pre-ReLU stages + pooled feature, CE + 5·HCL.

The kdbench steps are :func:`kdbench.step.train_step` on models prepared by :func:`kdbench.perf.prepare_models`
(as ``fit`` runs them). Also timed alone: the student step and the teacher forward of kdbench (their sum is
kdbench's floor). Interleaved rounds, minimum (median); default: resnet32x4 -> resnet8x4, batch 64, 32 px,
2 threads.

    python benchmarks/bench_vs_reference.py [--rounds 5] [--batch 64] [--threads 2] [--methods kd catkd ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from kdbench.bench import interleaved_times, summarize  # noqa: E402

TARGETS = {  # method -> (reference entry it is compared with, the largest ratio allowed)
    "kd": ("ref_kd", 0.90), "catkd": ("ref_kd", 0.90), "cwd": ("ref_kd", 0.90), "pkd": ("ref_kd", 0.90),
    "freekd": ("ref_kd", 0.90), "reviewkd": ("ref_reviewkd", 0.90), "afp": ("floor", 1.6), "uhkd": ("floor", 1.05),
}
PARAMS = {"reviewkd": {"weight": 5.0}, "catkd": {"beta": 15.0, "resolution": 2, "normalize": False}}


class _RefFusion(nn.Module):
    """One fusion block of the reference ReviewKD student head, NCHW throughout."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y, out_hw):
        x = self.conv1(x)
        n, _, h, w = x.shape
        if self.att is not None:
            y = F.interpolate(y, (h, w), mode="nearest")
            z = self.att(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-2:] != out_hw:
            x = F.interpolate(x, out_hw, mode="nearest")
        return self.conv2(x), x


def _ref_hcl(fs_list, ft_list):
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = fs.shape[2]
        loss, w, den = F.mse_loss(fs, ft), 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= h:
                continue
            w /= 2.0
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, lv), F.adaptive_avg_pool2d(ft, lv))
            den += w
        total = total + loss / den
    return total


def _ref_feats(net, x):
    """The reference student/teacher forward: a plain module call returning its features (mdistiller's nets
    return logits and every stage's pre- and post-ReLU output from one forward)."""
    taps = net.forward_taps(x)
    return taps["logits"], taps


def run(teacher_name="kdbench:resnet32x4", student_name="kdbench:resnet8x4", batch=64, size=32, num_classes=100,
        rounds=5, methods=None, log=print) -> dict:
    from types import SimpleNamespace

    from kdbench.method import Batch
    from kdbench.models.sources import build_model
    from kdbench.registry import METHODS
    from kdbench.runner import build_context
    from kdbench.tasks.classification import ClassificationTask
    from kdbench.perf import prepare_models
    from kdbench.step import train_step

    methods = methods or list(TARGETS)
    task = ClassificationTask()
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    data = SimpleNamespace(num_classes=num_classes, train=[(x[i], y[i]) for i in range(batch)],
                           val=[(x[i], y[i]) for i in range(2)])
    torch.manual_seed(0)
    fns = {}

    # -- references: plain modules, NCHW ------------------------------------------------------------------
    ref_t = build_model(teacher_name, num_classes, 3).net.eval().requires_grad_(False)
    ref_s = build_model(student_name, num_classes, 3).net.train()
    opt = torch.optim.SGD(ref_s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def ref_kd():
        logits = ref_s(x)
        with torch.no_grad():
            lt = ref_t(x)
        T = 4.0
        kl = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(lt / T, 1), reduction="none").sum(1).mean() * T * T
        loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()

    rs = build_model(student_name, num_classes, 3).net.train()
    with torch.no_grad():
        _, ts = _ref_feats(ref_t, x[:2])
        _, ss = _ref_feats(rs, x[:2])
    s_shapes = [f.shape[1:] for f in ss["stages"]] + [(ss["pooled"].shape[1], 1, 1)]
    t_shapes = [f.shape[1:] for f in ts["stages_preact"]] + [(ts["pooled"].shape[1], 1, 1)]
    mid = min(512, s_shapes[-1][0])
    n = len(s_shapes)
    fusion = nn.ModuleList(_RefFusion(s[0], mid, t[0], i < n - 1) for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))
    opt_r = torch.optim.SGD(list(rs.parameters()) + list(fusion.parameters()), lr=0.05, momentum=0.9,
                            weight_decay=5e-4)

    def ref_reviewkd():
        logits, f = _ref_feats(rs, x)
        feats = list(f["stages"]) + [f["pooled"][:, :, None, None]]
        with torch.no_grad():
            _, ft = _ref_feats(ref_t, x)
        tfeats = list(ft["stages_preact"]) + [ft["pooled"][:, :, None, None]]
        outs, res = [None] * n, None
        for i in reversed(range(n)):
            outs[i], res = fusion[i](feats[i], res, tuple(t_shapes[i][1:]))
        loss = F.cross_entropy(logits, y) + 5.0 * _ref_hcl(outs, tfeats)
        opt_r.zero_grad()
        loss.backward()
        opt_r.step()

    fns["ref_kd"], fns["ref_reviewkd"] = ref_kd, ref_reviewkd

    # -- kdbench: train_step on prepared models -------------------------------------------------------------
    teacher = build_model(teacher_name, num_classes, 3)
    xt, _ = prepare_models(None, teacher, None, cpu, x, None, task=task)

    def teacher_fwd():
        with torch.no_grad():
            task.forward(teacher, xt, None, ())

    fns["teacher_fwd"] = teacher_fwd
    for name in ["baseline"] + [m for m in methods if m != "baseline"]:
        cls = METHODS.get(name)
        torch.manual_seed(0)
        student = build_model(student_name, num_classes, 3)
        t = teacher if cls.needs_teacher else None
        ctx = build_context(task, data, {"epochs": 240, "batch_size": batch}, student, t, cpu)
        method = cls(ctx, **cls.check_params(PARAMS.get(name, {})))
        if cls.stage_params:
            method.load_stage({k: v.clone() for k, v in method.prompts.state_dict().items()})
        xb, yb = prepare_models(student, t, method, cpu, x, y, task=task)
        params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
        o = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        b = Batch(xb, yb, epoch=100, step=0, epochs=240, steps_per_epoch=1)
        taps = method.taps()

        def step(student=student, t=t, method=method, o=o, b=b, params=params, taps=taps):
            train_step(student, t, method, task, b, optimizer=o, params=params, taps=taps, device=cpu)

        fns[name] = step

    times = interleaved_times(fns, rounds, warmup=1)
    best, med = summarize(times)
    floor = best["baseline"] + best["teacher_fwd"]
    base = {"ref_kd": best["ref_kd"], "ref_reviewkd": best["ref_reviewkd"], "floor": floor}
    log(f"{teacher_name} -> {student_name}, batch {batch} x 3x{size}x{size}, {torch.get_num_threads()} threads, "
        f"min (median) of {rounds} interleaved rounds")
    for k in ("ref_kd", "ref_reviewkd", "teacher_fwd", "baseline"):
        log(f"  {k:<13} {1000 * best[k]:8.1f} ms ({1000 * med[k]:.1f})")
    log(f"  kdbench floor (student step + teacher forward) {1000 * floor:.1f} ms; "
        f"ref KD / floor {best['ref_kd'] / floor:.2f}, ref ReviewKD / floor {best['ref_reviewkd'] / floor:.2f}")
    log("")
    log("| method | kdbench step ms (min) | median | / ref KD | / ref ReviewKD | / floor | target | ok |")
    log("|---|---:|---:|---:|---:|---:|---|---|")
    rows = {}
    for m in methods:
        ref, limit = TARGETS.get(m, ("floor", float("inf")))
        ratio = best[m] / base[ref]
        rows[m] = {"min_s": best[m], "median_s": med[m], "ratio": ratio, "against": ref, "limit": limit,
                   "ok": ratio <= limit}
        log(f"| {m} | {1000 * best[m]:.1f} | {1000 * med[m]:.1f} | {best[m] / base['ref_kd']:.2f} | "
            f"{best[m] / base['ref_reviewkd']:.2f} | {best[m] / floor:.2f} | ≤ {limit} × {ref} | "
            f"{'yes' if ratio <= limit else 'NO'} |")
    return {"min_s": best, "median_s": med, "floor_s": floor, "rows": rows, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="kdbench:resnet32x4")
    p.add_argument("--student", default="kdbench:resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", help=f"default: {' '.join(TARGETS)}")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.teacher, a.student, a.batch, a.size, rounds=a.rounds, methods=a.methods or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
