"""run_one(spec): the only place that wires task, data, models, method and training loop for one run.

Whatever happens, a record is written atomically at ``<results>/<suite>/runs/<run_id>/record.json``:
``ok``, ``failed`` (with the traceback tail) or ``diverged``. A run whose record already says ``ok`` is not
redone; an interrupted run resumes from its last epoch checkpoint. KeyboardInterrupt and SystemExit write no
record (the run is not over: it will resume; SystemExit is how submitit ends a job it has just requeued).

A job with several tasks trains one run with torch.distributed (``kdbench/ddp.py``): every rank runs
``run_one``, only rank 0 writes (spec, record, checkpoint, model) and returns the written record.
``requeues`` (set by ``kdbench.launch.RunJob`` when SLURM requeued the job after a time limit or a
preemption) is noted in the record's ``scheduler`` with the job id.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from kdbench.suite import RunSpec

TRACEBACK_TAIL = 4000


def run_dir_for(results: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(results) / spec.suite / "runs" / spec.run_id


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: Any = None) -> dict:
    import torch

    import kdbench

    env = {"kdbench": kdbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "host": socket.gethostname(), "device": str(device) if device is not None else None}
    for dist in ("torchvision", "timm"):  # from the installed metadata: importing them costs seconds per run
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            env[dist] = None
    if device is not None and getattr(device, "type", "") == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    src = Path(kdbench.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10)
        env["git_sha"] = sha.stdout.strip() or None
        env["git_dirty"] = bool(dirty.stdout.strip()) if sha.returncode == 0 else None
    except Exception:  # pragma: no cover
        env["git_sha"], env["git_dirty"] = None, None
    return env


def scheduler_info() -> dict:
    info = {"job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
            "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}
    if os.environ.get("SLURM_RESTART_COUNT"):  # set by SLURM in a requeued job
        info["restart_count"] = int(os.environ["SLURM_RESTART_COUNT"])
    try:
        import submitit

        je = submitit.JobEnvironment()
        info.update(job_id=je.job_id, global_rank=je.global_rank, num_tasks=je.num_tasks)
    except Exception:
        pass
    return info


def _metric_rows(metrics: dict[str, float], select: str, task, eval_name: str = "val") -> list[dict]:
    return [{"eval": eval_name, "metric": k, "select": select, "value": float(v),
             "higher_is_better": bool(task.metrics.get(k, True))} for k, v in metrics.items()]


def _select_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare_stage(method, spec: RunSpec, results: Path, teacher, teacher_id: str, task, data, device) -> dict | None:
    """Run (once) or load the method's pre-distillation stage, cached by the hash of what determines it."""
    import torch

    cfg = method.stage_config()
    if cfg is None:
        return None
    key = {"method": spec.method, "method_version": spec.method_version, "stage": cfg, "teacher": teacher_id,
           "data": spec.data}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stage_dir = results / spec.suite / "stages" / f"{spec.method}-{digest}"
    artifact = stage_dir / "stage.pt"
    with _file_lock(stage_dir / ".lock"):
        if artifact.is_file():
            state = torch.load(artifact, map_location="cpu", weights_only=True)
            reused = True
        else:
            g = torch.Generator().manual_seed(int(cfg.get("seed", 0)) if isinstance(cfg, dict) else 0)
            torch.manual_seed(int(cfg.get("seed", 0)) if isinstance(cfg, dict) else 0)
            loader = task.loader(data.train, int(spec.recipe["batch_size"]), shuffle=True,
                                 drop_last=len(data.train) >= int(spec.recipe["batch_size"]), generator=g)
            t0 = time.perf_counter()
            state = method.run_stage(teacher, loader, device)
            state = {k: v.detach().cpu() for k, v in state.items()}
            tmp = stage_dir / f"stage.pt.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, artifact)
            (stage_dir / "stage.json").write_text(json.dumps({**key, "seconds": time.perf_counter() - t0}, indent=2,
                                                             default=str))
            reused = False
    method.load_stage(state)
    return {"dir": str(stage_dir), "hash": digest, "reused": reused}


def run_one(spec: RunSpec, results: str | os.PathLike = "results", *, requeues: int = 0) -> dict:
    """Train and evaluate one run; write and return its record. Idempotent: an ``ok`` record is returned as is."""
    from kdbench import ddp
    from kdbench.results import read_record, write_record

    results = Path(results)
    run_dir = run_dir_for(results, spec)
    old = read_record(run_dir)
    if old is not None and old.get("status") == "ok":
        return old
    with ddp.initialized() as dist:
        return _run_one(spec, results, run_dir, requeues, dist)


def _run_one(spec: RunSpec, results: Path, run_dir: Path, requeues: int, dist) -> dict:
    from kdbench.results import write_record

    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True, default=str))
    record: dict[str, Any] = {
        "schema": 1, "run_id": spec.run_id, "kind": spec.kind, "suite": spec.suite,
        "suite_version": spec.suite_version, "task": spec.task, "method": spec.method, "label": spec.label,
        "method_index": spec.method_index, "method_version": spec.method_version, "params": spec.params,
        "pair": spec.pair, "pair_index": spec.pair_index, "teacher": None,
        "student": {"model": spec.student["model"], "params": None}, "seed": spec.seed, "recipe": spec.recipe,
        "data": spec.data, "evals": list(spec.evals), "status": "failed", "error": None, "metrics": [],
        "teacher_metrics": [], "reference": list(spec.reference), "cost": {}, "env": {},
        "scheduler": {**scheduler_info(), "requeues": int(requeues)}, "started_at": _now(), "finished_at": None,
    }
    try:
        _run(spec, results, run_dir, record, dist)
        record["status"] = "ok"
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # the record says what went wrong; the other runs go on
        from kdbench.train import Diverged

        record["status"] = "diverged" if isinstance(e, Diverged) else "failed"
        record["error"] = traceback.format_exc()[-TRACEBACK_TAIL:]
    record["finished_at"] = _now()
    if dist.is_main:
        write_record(run_dir, record)
    return record


def _run(spec: RunSpec, results: Path, run_dir: Path, record: dict, dist) -> None:
    import torch

    from kdbench.models.sources import load_weights
    from kdbench.registry import METHODS, TASKS
    from kdbench.results import read_record
    from kdbench.train import fit

    threads = os.environ.get("KDBENCH_THREADS") or spec.resources.get("cpus_per_task")
    if threads:
        torch.set_num_threads(int(threads))
    device = dist.device() if dist.enabled else _select_device()
    record["env"] = environment(device)
    task = TASKS.get(spec.task)()
    data = task.build_data(spec.data)

    torch.manual_seed(spec.seed)
    student = task.build_model(spec.student, data)
    record["student"]["params"] = sum(p.numel() for p in student.parameters())

    teacher = None
    teacher_id = ""
    if spec.teacher is not None:
        torch.manual_seed(0)
        teacher = task.build_model(spec.teacher, data)
        if spec.teacher_run:
            t_dir = results / spec.suite / "runs" / spec.teacher_run
            t_rec = read_record(t_dir)
            if t_rec is None or t_rec.get("status") != "ok":
                state = "no record" if t_rec is None else t_rec.get("status")
                raise RuntimeError(f"the suite's teacher run {spec.teacher_run} ({spec.teacher['model']}) has not "
                                   f"finished ok ({state}); see {t_dir}")
            weights = t_dir / "model.pt"
            record["teacher_metrics"] = t_rec["metrics"]
        else:
            weights = Path(spec.teacher["weights"])
        sha = load_weights(teacher, weights)
        teacher_id = spec.teacher_run or sha
        record["teacher"] = {"model": spec.teacher["model"], "weights": str(weights), "sha256": sha,
                             "params": sum(p.numel() for p in teacher.parameters()), "run": spec.teacher_run}
        teacher.to(device).eval().requires_grad_(False)
        if not spec.teacher_run:
            loader = task.loader(data.val, int(spec.recipe.get("eval_batch_size", 256)))
            tm = task.evaluate(teacher, loader, device)
            record["teacher_metrics"] = _metric_rows(tm, "final", task)

    ctx = build_context(task, data, spec.recipe, student, teacher, device, spec.student["model"],
                        (spec.teacher or {}).get("model", ""))
    torch.manual_seed(spec.seed)
    method = METHODS.get(spec.method)(ctx, **spec.params)
    record["params_resolved"] = resolved_params(method, spec.params)
    taps = method.taps()
    student.check_taps(taps.student)
    if teacher is not None:
        teacher.check_taps(taps.teacher)
    stage = _prepare_stage(method, spec, results, teacher, teacher_id, task, data, device) if teacher is not None else None

    res = fit(student=student, teacher=teacher, method=method, task=task, data=data, recipe=spec.recipe,
              run_dir=run_dir, seed=spec.seed, device=device, desc=f"{spec.label} {spec.pair} s{spec.seed}",
              primary=task.primary_metric, higher_is_better=task.metrics.get(task.primary_metric, True),
              dist=dist)
    record["metrics"] = _metric_rows(res.final, "final", task) + _metric_rows(res.best, "best", task)
    record["best_epoch"] = res.best_epoch
    record["cost"] = {"wall_time_s": round(res.wall_time_s, 3), "step_time_s": res.step_time_s,
                      "peak_mem_mb": res.peak_mem_mb, "extra_params": method.extra_parameters(),
                      "epochs": len(res.history)}
    record["scheduler"]["resumes"] = res.resumes
    if stage is not None:
        record["stage"] = stage
    if dist.enabled:
        record["scheduler"]["world_size"] = dist.world
    if not dist.is_main:
        return
    # keep the trained network: a suite-trained teacher is loaded from it; students are kept for later evals
    tmp = run_dir / f"model.pt.tmp{os.getpid()}"
    torch.save(student.net.state_dict(), tmp)
    os.replace(tmp, run_dir / "model.pt")


def build_context(task, data, recipe: dict, student, teacher, device, student_model: str = "", teacher_model: str = ""):
    """The Context a method is built with: task facts plus a probe that returns real tap shapes from one dry
    forward of each network on a couple of validation images."""
    import torch

    from kdbench.method import Context

    example = task.example_input(data).to(device)
    nets = {"student": student.to(device), "teacher": teacher}

    def probe(side: str, tap: str):
        net = nets[side]
        if net is None:
            raise ValueError(f"a {side} tap was asked for but this run has no {side}")
        was = net.training
        net.eval()
        with torch.no_grad():
            out = net(example, (tap,))
        net.train(was)
        return [tuple(t.shape[1:]) for t in out[tap]]

    steps = len(data.train) // int(recipe["batch_size"]) or 1
    if recipe.get("max_steps_per_epoch"):
        steps = min(steps, int(recipe["max_steps_per_epoch"]))
    return Context(task=task.name, num_classes=data.num_classes, epochs=int(recipe["epochs"]), steps_per_epoch=steps,
                   dataset_size=len(data.train), student_model=student_model, teacher_model=teacher_model,
                   probe=probe, task_loss=task.loss)


def resolved_params(method, params: dict) -> dict:
    """The hyperparameters as the method resolved them: a parameter left at ``None`` ("the task's default") is
    replaced by the value the method stored under the same attribute name, so the record shows what ran."""
    out = {}
    for k, v in params.items():
        got = getattr(method, k, v) if v is None else v
        out[k] = got if isinstance(got, (int, float, str, bool, list, tuple, type(None))) else v
    return out
