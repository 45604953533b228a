"""GPU readiness check (benchmarks/gpu_check.sh runs it): on CUDA, in a few minutes,

1. ``classification``: one training step of every classification method on resnet32x4 -> resnet8x4 (CIFAR-100
   shapes, batch 64, synthetic batches: ``kdbench bench``'s machinery) with ``amp: bf16``, the teacher under bf16
   autocast, channels_last; then the same with ``amp: fp16`` (GradScaler);
2. ``compile``: the KD step with ``compile: true`` (torch.compile of the student forward);
3. ``detection``: one step of every detection method on a small RetinaNet pair on CUDA under bf16;
4. ``ddp``: a 1-epoch KD run of a tiny digits suite as one task per visible GPU (NCCL, submitit's LocalExecutor),
   compared with the same run in one process;
5. ``runs_per_gpu``: two runs of that suite packed on GPU 0 (the SLURM pack job, :class:`kdbench.slurm.RunPack`).

It prints one table row per check (ok / FAILED with the error). Without a GPU it prints
``no GPU: skipped`` for each CUDA part and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("classification", "compile", "detection", "ddp", "runs_per_gpu")
rows: list[tuple[str, str, str, str]] = []


def _row(check: str, what: str, status: str, detail: str = "") -> None:
    rows.append((check, what, status, detail))
    print(f"  {check:<15} {what:<28} {status:<8} {detail}", flush=True)


def check_classification(amp: str, steps: int) -> None:
    from kdbench.bench import build_entries, interleaved_times, summarize
    from kdbench.suite import load_suite

    suite = load_suite(ROOT / "suites" / "cifar100_homogeneous.yaml", [f"recipe.amp={amp}"])
    dev = torch.device("cuda")
    for pair, info, entries in build_entries(suite, "resnet32x4→resnet8x4", dev, log=lambda m: None):
        for e in entries:
            try:
                best, _ = summarize(interleaved_times({0: e.step}, steps, warmup=1,
                                                      sync=lambda: torch.cuda.synchronize(dev)))
                _row(f"cls {amp}", e.label, "ok", f"{1000 * best[0]:.1f} ms/step, batch {info['batch_size']}")
            except Exception as exc:  # keep going: the table says what failed
                _row(f"cls {amp}", e.label, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def check_compile() -> None:
    from kdbench.bench import build_entries, interleaved_times, summarize
    from kdbench.suite import load_suite

    suite = load_suite(ROOT / "suites" / "cifar100_homogeneous.yaml", ["recipe.amp=bf16", "recipe.compile=true"])
    dev = torch.device("cuda")
    for _, _, entries in build_entries(suite, "kd", dev, log=lambda m: None):
        e = [e for e in entries if e.label == "kd"][0]
        t0 = time.perf_counter()
        try:
            e.step()  # compiles
            first = time.perf_counter() - t0
            best, _ = summarize(interleaved_times({0: e.step}, 3, warmup=1, sync=torch.cuda.synchronize))
            _row("compile", "kd (student compiled)", "ok", f"{1000 * best[0]:.1f} ms/step, compile {first:.0f} s")
        except Exception as exc:
            _row("compile", "kd (student compiled)", "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def check_detection() -> None:
    from benchmarks.bench_detection import run

    try:
        res = run("retinanet_resnet18_fpn", "retinanet_resnet18_fpn", size=256, batch=2, repeats=2,
                  fpn_channels=64, num_classes=11, device="cuda", amp="bf16", log=lambda m: None)
        for label, ratio in res["ratios"].items():
            _row("det bf16", label, "ok", f"{1000 * res['min_s'][label]:.1f} ms/step, ratio {ratio:.2f}")
    except Exception as exc:
        _row("det bf16", "all methods", "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def _tiny_suite(tmp: Path, n_gpus: int, extra_res: dict) -> Path:
    import yaml

    from kdbench.models.sources import build_model

    torch.manual_seed(0)
    w = tmp / "teacher.pt"
    torch.save(build_model("kdbench:resnet8", 10, 1).net.state_dict(), w)
    d = {"suite": "gpucheck", "version": 1, "task": "classification",
         "data": {"name": "digits", "train_fraction": 0.5, "image_size": 16},
         "recipe": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                    "schedule": {"name": "constant"}, "amp": "bf16", "eval_batch_size": 512},
         "pairs": [{"teacher": {"model": "kdbench:resnet8", "weights": str(w)}, "student": {"model": "kdbench:resnet8"}}],
         "methods": ["kd"], "seeds": [0, 1], "resources": {"gpus_per_node": n_gpus, "cpus_per_task": 2, **extra_res}}
    p = tmp / "gpucheck.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return p


def check_ddp(tmp: Path) -> None:
    import submitit

    from kdbench.scheduler import launch
    from kdbench.slurm import RunJob
    from kdbench.suite import load_suite

    n = torch.cuda.device_count()
    suite = load_suite(_tiny_suite(tmp, n, {}))
    spec = [s for s in suite.specs if s.kind == "distill"][0]
    try:
        one = {r["run_id"]: r for r in launch(suite, tmp / "one", executor="debug", log=lambda s: None)}[spec.run_id]
        ex = submitit.LocalExecutor(folder=tmp / "jobs")
        ex.update_parameters(tasks_per_node=n, gpus_per_node=n, timeout_min=10)
        recs = ex.submit(RunJob(), spec, str(tmp / "ddp")).results()
        top1 = [m["value"] for m in recs[0]["metrics"] if m.get("metric") == "top1" and m.get("select") == "final"]
        ref = [m["value"] for m in one["metrics"] if m.get("metric") == "top1" and m.get("select") == "final"]
        _row("ddp", f"kd, {n} GPU task(s)", "ok" if recs[0]["status"] == "ok" else "FAILED",
             f"world {recs[0]['scheduler'].get('world_size')}, top1 {top1[:1]} vs one process {ref[:1]}")
    except Exception as exc:
        _row("ddp", f"kd, {n} GPU task(s)", "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def check_runs_per_gpu(tmp: Path) -> None:
    from kdbench.slurm import RunPack
    from kdbench.suite import load_suite

    suite = load_suite(_tiny_suite(tmp, 1, {"runs_per_gpu": 2}))
    specs = [s for s in suite.specs if s.kind == "distill"]
    try:
        t0 = time.perf_counter()
        recs = RunPack()(specs, str(tmp / "pack"))
        _row("runs_per_gpu", f"{len(specs)} runs on one GPU", "ok",
             f"{time.perf_counter() - t0:.0f} s, status {[r['status'] for r in recs]}")
    except Exception as exc:
        _row("runs_per_gpu", f"{len(specs)} runs on one GPU", "FAILED",
             f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=CHECKS, help="run only these checks")
    p.add_argument("--steps", type=int, default=2, help="timed steps per classification entry")
    a = p.parse_args(argv)
    todo = a.only or list(CHECKS)
    print(f"kdbench GPU check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        for c in todo:
            _row(c, "(CUDA part)", "skipped", "no GPU: skipped")
        print("no GPU: skipped (every check above needs CUDA; nothing failed)")
        return 0
    print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}; bf16: {torch.cuda.is_bf16_supported()}")
    print(f"  {'check':<15} {'entry':<28} {'status':<8} detail")
    with tempfile.TemporaryDirectory(prefix="kdbench-gpucheck-") as tmp:
        for c in todo:
            try:
                if c == "classification":
                    check_classification("bf16", a.steps)
                    check_classification("fp16", 1)
                elif c == "compile":
                    check_compile()
                elif c == "detection":
                    check_detection()
                elif c == "ddp":
                    check_ddp(Path(tmp) / "ddp")
                elif c == "runs_per_gpu":
                    check_runs_per_gpu(Path(tmp) / "pack")
            except Exception:
                _row(c, "(setup)", "FAILED", traceback.format_exc().splitlines()[-1][:150])
    failed = [r for r in rows if r[2] == "FAILED"]
    print(f"{len(rows)} checks, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
