"""run_one(spec): the only place that wires task, data, models, method and training loop for one run of any
kind (``teacher``, ``stage``, ``distill``, ``eval``; see ``kdbench.suite.RunSpec``).

Whatever happens, a record is written atomically at ``<results>/<suite>/runs/<run_id>/record.json`` (built by
``kdbench.results.new_record``): ``ok``, ``failed`` (with the traceback tail) or ``diverged``. A run whose record
already says ``ok`` is not redone; an interrupted training run resumes from its last epoch checkpoint, an
interrupted corruption eval from its last finished (corruption, severity) cell. KeyboardInterrupt and SystemExit
write no record (the run is not over: it will resume; SystemExit is how submitit ends a job it has just
requeued). A run whose ``needs`` have not finished ok fails at once, naming the run it needed.

Integrity: whoever runs a run holds its lock (``run_lock``: ``flock`` on ``<run dir>/.lock``), so that two
processes never train it twice; temporary files of dead writers are removed under it (``clean_stale_temps``).
The record of a run that leaves a file (``model.pt``, ``stage.pt``) keeps its sha256 (``record["artifact"]``);
the runs that load it refuse a file with another hash, and an ok run whose file is missing or corrupt runs
again. Checkpoints carry their run_id (``kdbench/checkpoint.py``). A full disk, a quota or a read-only filesystem
(``DISK_FAULTS``) writes no record and stops the walk: it is not the run's fault.

What each kind leaves in its run folder: ``teacher`` and ``distill`` a ``model.pt`` (the trained network's
state dict), ``stage`` a ``stage.pt`` (tensors only, loaded with ``weights_only=True`` by the distill runs
that need it), ``eval`` its metric rows (corruption cells go to ``<evaluated run dir>/evals/``).

Runs that share their work run together in one process, each keeping its own record, folder and numbers:
``run_cohort`` (distill runs of a cohort, ``kdbench/cohort.py``) and ``run_eval_group`` (the eval runs of one
chunk over several models, ``kdbench/evalgroup.py``: one corruption pass).

A job with several tasks trains one run with torch.distributed (``kdbench/ddp.py``): every rank runs
``run_one``, only rank 0 writes (spec, record, checkpoint, model) and returns the written record.
``requeues`` (set by ``kdbench.slurm.RunJob`` when SLURM requeued the job after a time limit or a
preemption) is noted in the record's ``scheduler`` with the job id. ``threads``: the torch threads of this run
(the scheduler's share of the CPUs); ``KDBENCH_THREADS`` in the environment overrides it (a user's choice).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.results import (EVALS_DIR, LOCK_FILE, MODEL_FILE, STAGE_FILE, artifact_entry, clean_stale_temps,
                             run_dir, run_dir_for, write_torch_atomic)
from kdbench.recipe import Recipe, value
from kdbench.suite import RunSpec

TRACEBACK_TAIL = 4000
#: filesystem faults that stop the whole walk instead of failing one run: full disk, quota, read-only
DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

__all__ = ["run_one", "run_dir_for", "build_context", "resolved_params"]


def environment(device: Any = None) -> dict:
    import torch

    import kdbench

    env = {"kdbench": kdbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "host": socket.gethostname(), "device": str(device) if device is not None else None,
           "threads": torch.get_num_threads()}  # a run's thread count can change its last float digits
    for dist in ("torchvision", "timm"):  # from the installed metadata: importing them costs seconds per run
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            env[dist] = None
    if device is not None and getattr(device, "type", "") == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    from kdbench.allocator import allocator_state

    if allocator_state() is not None:
        env["cpu_allocator"] = allocator_state()
    if device is not None and getattr(device, "type", "") == "cpu":
        from kdbench.models import frozen

        env["teacher_graph"] = frozen.mode()
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
def run_lock(rdir: Path, enabled: bool = True):
    """Hold the run's lock (``flock`` on ``<run dir>/.lock``) while it runs: whoever runs it (a local job, the
    debug executor, a SLURM job, a second ``kdbench run`` on the same results) waits for the one already
    running it; the lock dies with its process (kill -9 included). A filesystem without locks (some network
    filesystems) runs unlocked, with a warning."""
    if not enabled:
        yield
        return
    import fcntl

    rdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{rdir}: another process is running this run; waiting for it to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK / EOPNOTSUPP
            print(f"warning: {rdir}: cannot lock ({e.strerror}); running unlocked", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _done(rdir: Path, rec: dict | None, spec: RunSpec, results: Path, warn: bool = True) -> bool:
    """The run has finished ok, what it left for others is usable, and, for an eval or a stage run, the model
    file it measured or was computed from is still the current one (``results.binding_problem``)."""
    from kdbench.results import artifact_problem, binding_problem

    if rec is None or rec.get("status") != "ok":
        return False
    problem = artifact_problem(rdir, rec)
    if problem is None and spec.kind in ("eval", "stage"):
        problem = binding_problem(results, spec, rec)
    if problem and warn:
        print(f"warning: run {spec.run_id} ({spec.kind}) is recorded ok but {problem}: running it again",
              file=sys.stderr, flush=True)
    return problem is None


def run_one(spec: RunSpec, results: str | os.PathLike = "results", *, requeues: int = 0,
            threads: int | None = None) -> dict:
    """Run one node of the graph; write and return its record. Idempotent: an ``ok`` record is returned as is."""
    from kdbench import ddp
    from kdbench.results import read_record

    results = Path(results)
    rdir = run_dir_for(results, spec)
    old = read_record(rdir)
    if _done(rdir, old, spec, results, warn=False):
        return old
    rank = ddp.job_topology()[0]
    with run_lock(rdir, enabled=rank == 0):
        if rank == 0:
            old = read_record(rdir)  # another process may have run it while this one waited for the lock
            if _done(rdir, old, spec, results):
                return old
            clean_stale_temps(rdir)
        with ddp.initialized() as dist:
            return _run_one(spec, results, rdir, requeues, dist, threads)


def run_cohort(specs: list[RunSpec], results: str | os.PathLike = "results", *, requeues: int = 0,
               threads: int | None = None) -> list[dict]:
    """Run the distill runs of a cohort (``kdbench.cohort``) together, in this process: the data and the teacher's
    forward are shared, each run keeps its own record, folder, checkpoint and numbers (``kdbench.train.fit_cohort``);
    return their records in the order of ``specs``. Idempotent per run: an ``ok`` run is returned as is, a run
    another process holds is run alone after the others (waiting for its lock), each resumes from its own
    checkpoint. A run that fails to set up, diverges or fails is recorded so and the others go on."""
    from kdbench import ddp
    from kdbench.cohort import cohort_id
    from kdbench.results import finish_record
    from kdbench.step import Diverged
    from kdbench.train import Member, fit_cohort

    results = Path(results)
    records: dict[str, dict] = {}
    later: list[RunSpec] = []
    with contextlib.ExitStack() as stack:
        todo = _claim(specs, results, stack, records, later)
        if len(todo) == 1:
            spec, rdir = todo[0]
            records[spec.run_id] = _run_one(spec, results, rdir, requeues, ddp.SINGLE, threads)
        elif todo:
            _set_threads(todo[0][0], threads)
            cid = cohort_id([s for s, _ in todo])
            shared: dict = {}
            jobs = _prepare_each(todo, _prepare_train, results, requeues, shared, records,
                                 {"cohort": {"id": cid, "runs": [s.run_id for s, _ in todo]}})
            members = [Member(j.student, j.method, j.place) for j in jobs]
            if members:
                fit_cohort(members, shared.get("teacher"), shared["task"], shared["data"], jobs[0].recipe,
                           seed=jobs[0].spec.seed, desc=f"cohort {cid}: {len(members)} runs of {jobs[0].spec.pair} "
                                                        f"s{jobs[0].spec.seed}")
            for job, m in zip(jobs, members):
                record = job.record
                if m.error is None:
                    try:
                        _finish_train(job, m.result)
                        record["status"] = "ok"
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:
                        _fault(e, record, traceback.format_exc())
                else:
                    _fault(m.error, record, m.error_text)
                    if isinstance(m.error, Diverged):
                        record["status"] = "diverged"
                finish_record(job.rdir, record)
                records[job.spec.run_id] = record
    for spec in later:
        records[spec.run_id] = run_one(spec, results, requeues=requeues, threads=threads)
    return [records[s.run_id] for s in specs]


def _claim(specs: list[RunSpec], results: Path, stack: contextlib.ExitStack, records: dict, later: list) -> list:
    """The runs of a group this process runs now, as ``(spec, run dir)``, each locked until ``stack`` closes; the
    records of the runs already ``ok`` go to ``records``, the runs another process holds to ``later``."""
    from kdbench.results import read_record

    todo = []
    for spec in specs:
        rdir = run_dir_for(results, spec)
        if _done(rdir, read_record(rdir), spec, results, warn=False):
            records[spec.run_id] = read_record(rdir)
            continue
        if not _try_lock(stack, rdir):
            later.append(spec)
            continue
        old = read_record(rdir)  # another process may have run it meanwhile
        if _done(rdir, old, spec, results):
            records[spec.run_id] = old
            continue
        clean_stale_temps(rdir)
        todo.append((spec, rdir))
    return todo


def _prepare_each(todo: list, prepare, results: Path, requeues: int, shared: dict, records: dict,
                  facts: dict | None = None) -> list:
    """``prepare(spec, results, rdir, record, dist, shared)`` for each claimed run of a group, with a new record
    (plus ``facts``); a run that cannot be set up is recorded failed in ``records`` and left out."""
    from kdbench import ddp
    from kdbench.results import finish_record, new_record, write_spec

    jobs = []
    for spec, rdir in todo:
        rdir.mkdir(parents=True, exist_ok=True)
        write_spec(rdir, spec)
        record = new_record(spec, scheduler={**scheduler_info(), "requeues": int(requeues)})
        record.update(facts or {})
        try:
            jobs.append(prepare(spec, results, rdir, record, ddp.SINGLE, shared))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            _fault(e, record, traceback.format_exc())
            finish_record(rdir, record)
            records[spec.run_id] = record
    return jobs


def _try_lock(stack: contextlib.ExitStack, rdir: Path) -> bool:
    """Take the run's lock (as :func:`run_lock`) without waiting; False when another process holds it."""
    import fcntl

    rdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # a filesystem without locks: unlocked, as run_lock
        pass
    stack.callback(os.close, fd)
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return True


def _fault(e: BaseException, record: dict, text: str) -> None:
    """Record a run's error as :func:`_run_one` does; a disk fault is not the run's: it stops the cohort."""
    if isinstance(e, OSError) and e.errno in DISK_FAULTS:
        raise e
    record["status"] = "failed"
    record["error"] = text[-TRACEBACK_TAIL:]


def _run_one(spec: RunSpec, results: Path, rdir: Path, requeues: int, dist, threads: int | None) -> dict:
    from kdbench.results import finish_record, new_record, write_spec

    rdir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        write_spec(rdir, spec)
    record = new_record(spec, scheduler={**scheduler_info(), "requeues": int(requeues)})
    try:
        _set_threads(spec, threads)
        {"teacher": _train, "distill": _train, "stage": _stage, "eval": _eval}[spec.kind](
            spec, results, rdir, record, dist)
        record["status"] = "ok"
    except (KeyboardInterrupt, SystemExit):
        raise
    except OSError as e:
        if e.errno not in DISK_FAULTS:
            record["status"] = "failed"
            record["error"] = traceback.format_exc()[-TRACEBACK_TAIL:]
        else:  # a full disk / quota / read-only filesystem is not the run's fault and would fail every run
            raise  # no record (none could be written); the run resumes once the disk is fixed
    except Exception as e:  # the record says what went wrong; the other runs go on
        from kdbench.step import Diverged

        record["status"] = "diverged" if isinstance(e, Diverged) else "failed"
        record["error"] = traceback.format_exc()[-TRACEBACK_TAIL:]
    if dist.is_main:
        finish_record(rdir, record)
    return record


def _set_threads(spec: RunSpec, threads: int | None) -> None:
    import torch

    n = os.environ.get("KDBENCH_THREADS") or threads or spec.resources.get("cpus_per_task")
    if n:
        torch.set_num_threads(int(n))


def _needed_record(results: Path, spec: RunSpec, run_id: str, what: str) -> tuple[Path, dict]:
    """The folder and ok record of a run this one needs; an error naming it when it has not finished ok."""
    from kdbench.results import read_record

    d = run_dir(results, spec.suite, run_id)
    rec = read_record(d)
    if rec is None or rec.get("status") != "ok":
        state = "no record" if rec is None else rec.get("status")
        raise RuntimeError(f"{what} run {run_id} has not finished ok ({state}); see {d}")
    return d, rec


def _setup(spec: RunSpec, record: dict, dist):
    from kdbench.registry import TASKS

    device = dist.device() if dist.enabled else _select_device()
    if device.type == "cpu":
        from kdbench.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    record["env"] = environment(device)
    task = TASKS.get(spec.task)()
    return device, task, task.build_data(spec.data)


def _load_teacher(spec: RunSpec, results: Path, record: dict, task, data, device):
    """The run's teacher, built, loaded (a suite-trained teacher's model.pt or the checkpoint), frozen."""
    import torch

    from kdbench.models.sources import load_weights

    torch.manual_seed(0)
    teacher = task.build_model(spec.teacher, data)
    t_rec = None
    expect = None
    if spec.teacher_run:
        t_dir, t_rec = _needed_record(results, spec, spec.teacher_run, f"the suite's teacher ({spec.teacher['model']})")
        weights = t_dir / MODEL_FILE
        record["teacher_metrics"] = t_rec["metrics"]
        expect = (t_rec.get("artifact") or {}).get("sha256")  # the file its run wrote, not a replacement
    else:
        weights = Path(spec.teacher["weights"])
    sha = load_weights(teacher, weights, sha256=expect)
    record["teacher"] = {"model": spec.teacher["model"], "weights": str(weights), "sha256": sha,
                         "params": sum(p.numel() for p in teacher.parameters()), "run": spec.teacher_run}
    teacher.to(device).eval().requires_grad_(False)
    return teacher, t_rec


def _train(spec: RunSpec, results: Path, rdir: Path, record: dict, dist) -> None:
    """teacher and distill runs: train the student (a teacher run trains the teacher as a baseline student)."""
    from kdbench.train import fit

    job = _prepare_train(spec, results, rdir, record, dist)
    res = fit(job.student, job.teacher, job.method, job.task, job.data, job.recipe, seed=spec.seed, place=job.place)
    _finish_train(job, res)


@dataclass
class TrainJob:
    """A teacher or distill run, set up to train (:func:`_prepare_train`): what :func:`kdbench.train.fit` needs and
    the record it fills."""

    spec: RunSpec
    rdir: Path
    record: dict
    dist: Any
    device: Any
    task: Any
    data: Any
    recipe: Recipe
    student: Any
    teacher: Any
    method: Any
    place: Any


def _prepare_train(spec: RunSpec, results: Path, rdir: Path, record: dict, dist, shared: dict | None = None) -> TrainJob:
    """Build the run's student, teacher and method (with its stage) and fill the record's facts. ``shared``: what
    the members of a cohort build once (device, task, data; the loaded teacher and its record entries)."""
    import torch

    from kdbench.registry import METHODS
    from kdbench.train import RunPlace, weights_digest

    shared = {} if shared is None else shared
    if "data" not in shared:
        shared["device"], shared["task"], shared["data"] = _setup(spec, record, dist)
    else:
        record["env"] = environment(shared["device"])
    device, task, data = shared["device"], shared["task"], shared["data"]
    recipe = Recipe.of(spec.recipe)
    torch.manual_seed(spec.seed)
    student = task.build_model(spec.student, data)
    record["student"]["params"] = sum(p.numel() for p in student.parameters())
    record["init_digest"] = weights_digest(student)  # before any method part: the same for every run of a seed

    teacher = None
    if spec.teacher is not None:
        key = json.dumps([spec.teacher, spec.teacher_run], sort_keys=True, default=str)
        if shared.get("teacher_key") != key:
            t_record: dict = {}
            teacher, t_rec = _load_teacher(spec, results, t_record, task, data, device)
            if t_rec is None:  # a checkpoint teacher: evaluate it once here, for the table's teacher row
                loader = task.loader(data.val, recipe.eval_batch_size)
                t_record["teacher_metrics"] = _metric_rows(task.evaluate(teacher, loader, device), "final", task)
            shared.update(teacher_key=key, teacher=teacher, teacher_record=t_record)
        teacher = shared["teacher"]
        record.update(copy.deepcopy(shared["teacher_record"]))

    ctx = build_context(task, data, recipe, student, teacher, device, spec.student["model"],
                        (spec.teacher or {}).get("model", ""))
    torch.manual_seed(spec.seed)
    method = METHODS.get(spec.method)(ctx, **spec.params)
    record["method_origin"] = METHODS.origin(spec.method)  # built-in, plugin folder or installed package
    record["params_resolved"] = resolved_params(method, spec.params)
    taps = method.taps()
    student.check_taps(taps.student)
    if teacher is not None:
        teacher.check_taps(taps.teacher)
    if spec.stage_run:
        s_dir, s_rec = _needed_record(results, spec, spec.stage_run, f"the {spec.method} stage")
        s_sha = (s_rec.get("teacher") or {}).get("sha256")
        if s_sha != record["teacher"]["sha256"]:
            raise RuntimeError(f"the stage run {spec.stage_run} was computed with teacher weights of sha256 "
                               f"{s_sha}, this run loads {record['teacher']['sha256']} "
                               f"({record['teacher']['weights']}): the file changed; delete {s_dir} to redo the stage")
        method.load_stage(_load_stage(s_dir / STAGE_FILE, s_rec))
        record["stage"] = {"run": spec.stage_run, "dir": str(s_dir)}
    place = RunPlace(rdir, device, run_id=spec.run_id, dist=dist, resources=spec.resources,
                     desc=f"{spec.label} {spec.pair} s{spec.seed}")
    return TrainJob(spec, rdir, record, dist, device, task, data, recipe, student, teacher, method, place)


def _finish_train(job: TrainJob, res) -> None:
    """Fill the record of a run that trained to its end: metrics, cost, warnings; write its model file."""
    record, task, dist, method = job.record, job.task, job.dist, job.method
    record["metrics"] = _metric_rows(res.final, "final", task) + _metric_rows(res.best, "best", task)
    record["best_epoch"] = res.best_epoch
    record["data_digest"] = next((h["data_digest"] for h in res.history if "data_digest" in h), None)
    record["cost"] = {"wall_time_s": round(res.wall_time_s, 3), "step_time_s": res.step_time_s,
                      "peak_mem_mb": res.peak_mem_mb, "extra_params": method.extra_parameters(),
                      "epochs": len(res.history), **machine_load()}
    if job.teacher is not None and dist.is_main:  # the floor's teacher part (kdbench table --layout cost)
        record["cost"]["teacher_forward_s"] = teacher_forward_time(job.teacher, method.taps().teacher, task, job.data,
                                                                   job.recipe, job.device)
    record["scheduler"]["resumes"] = res.resumes
    if res.warnings:
        record["warnings"] = list(res.warnings)
    if dist.enabled:
        record["scheduler"]["world_size"] = dist.world
    if dist.is_main:  # a suite-trained teacher is loaded from it; every model is kept for its eval runs
        write_torch_atomic(job.rdir / MODEL_FILE, job.student.net.state_dict())
        record["artifact"] = artifact_entry(job.rdir / MODEL_FILE)  # its sha256: dependents refuse another file


def machine_load() -> dict:
    """The machine's 1-minute load average and CPU count as a run ends (``cost.load_1m``, ``cost.cpus``): the cost
    table warns when they say the machine was busier than its CPUs, whose step times are then inflated."""
    if not hasattr(os, "getloadavg"):
        return {}
    try:
        return {"load_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    except OSError:  # pragma: no cover
        return {}


def teacher_forward_time(teacher, taps, task, data, recipe: Recipe, device, repeats: int = 3) -> float:
    """Seconds of one teacher forward as the training step runs it (the method's taps, no_grad, channels_last
    when the loop uses it) on a training batch: the minimum over ``repeats`` after one warm-up. With the
    baseline's step it is the floor a distillation step is compared with."""
    import time

    import torch

    from kdbench.perf import channels_last_enabled, to_channels_last

    loader = task.loader(data.train, int(value(recipe, "batch_size")))
    x, y = next(iter(loader))
    x, _ = task.to_device(x, y, device)
    if channels_last_enabled(teacher):
        x = to_channels_last(x)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            task.forward(teacher, x, None, taps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def _stage(spec: RunSpec, results: Path, rdir: Path, record: dict, dist) -> None:
    """A stage run: the method built with its stage params on the pair, ``run_stage`` on the frozen teacher
    over the training data (batches of the recipe's size, order seeded by the spec's seed), tensors saved."""
    import torch

    from kdbench.registry import METHODS

    device, task, data = _setup(spec, record, dist)
    teacher, _ = _load_teacher(spec, results, record, task, data, device)
    torch.manual_seed(0)
    student = task.build_model(spec.student, data)
    recipe = Recipe.of(spec.recipe)
    ctx = build_context(task, data, recipe, student, teacher, device, spec.student["model"],
                        spec.teacher["model"])
    torch.manual_seed(spec.seed)
    method = METHODS.get(spec.method)(ctx, **spec.params)
    record["method_origin"] = METHODS.origin(spec.method)  # built-in, plugin folder or installed package
    bs = recipe.batch_size
    g = torch.Generator().manual_seed(spec.seed)
    loader = task.loader(data.train, bs, shuffle=True, drop_last=len(data.train) >= bs, generator=g)
    t0 = time.perf_counter()
    state = {k: v.detach().cpu() for k, v in method.run_stage(teacher, loader, device).items()}
    record["cost"] = {"wall_time_s": round(time.perf_counter() - t0, 3), "extra_params": 0}
    record["stage"] = {"tensors": {k: list(v.shape) for k, v in state.items()}}
    if dist.is_main:
        write_torch_atomic(rdir / STAGE_FILE, state)
        record["artifact"] = artifact_entry(rdir / STAGE_FILE)


def _eval(spec: RunSpec, results: Path, rdir: Path, record: dict, dist) -> None:
    """An eval run: the finished model (its run's model.pt, or a checkpoint teacher's weights) on one chunk."""
    _eval_prepared(_prepare_eval(spec, results, rdir, record, dist))


@dataclass
class EvalJob:
    """An eval run, set up to evaluate (:func:`_prepare_eval`): the loaded network, the folder of its cells, the
    record it fills."""

    spec: RunSpec
    rdir: Path
    record: dict
    device: Any
    task: Any
    data: Any
    net: Any
    sha256: str
    cell_dir: Path
    warnings: list


def _prepare_eval(spec: RunSpec, results: Path, rdir: Path, record: dict, dist, shared: dict | None = None) -> EvalJob:
    """Load the evaluated model and fill the record's facts. ``shared``: what the eval runs of one process build once
    (device, task and data of one ``data:``; the environment facts)."""
    from kdbench.models.sources import load_weights

    shared = {} if shared is None else shared
    key = json.dumps([spec.task, spec.data], sort_keys=True, default=str)
    if shared.get("data_key") != key:
        shared["device"], shared["task"], shared["data"] = _setup(spec, record, dist)
        shared.update(data_key=key, env=copy.deepcopy(record["env"]))
    else:
        record["env"] = copy.deepcopy(shared["env"])
    device, task, data = shared["device"], shared["task"], shared["data"]
    net = task.build_model(spec.student, data)
    expect = None
    if spec.needs:
        t_dir, t_rec = _needed_record(results, spec, spec.target, "the evaluated model's")
        weights = t_dir / MODEL_FILE
        expect = (t_rec.get("artifact") or {}).get("sha256")
    else:
        weights = Path(spec.student["weights"])
    sha = load_weights(net, weights, sha256=expect)
    record["student"] = {"model": spec.student["model"], "params": sum(p.numel() for p in net.parameters()),
                         "weights": str(weights), "sha256": sha}
    net.to(device).eval().requires_grad_(False)
    cell_dir = run_dir(results, spec.suite, spec.target) / EVALS_DIR
    clean_stale_temps(cell_dir)  # cells a killed eval run was writing (every cell write takes milliseconds)
    return EvalJob(spec, rdir, record, device, task, data, net, sha, cell_dir, [])


def _finish_eval(job: EvalJob, rows: list[dict], stats: dict, seconds: float, group: dict | None = None) -> None:
    """Fill the record of an eval run that finished: its rows, its cost (``seconds``: its time; in a group its share
    of the pass), what its corruption pass shared (``corruption_pass``: images corrupted in this process, models
    evaluated on them), its warnings."""
    record = job.record
    record["metrics"] = rows
    record["cost"] = {"wall_time_s": round(seconds, 3)}
    if stats.get("images_read") is not None:
        record["corruption_pass"] = {
            **(group or {"group": None, "runs": [job.spec.run_id]}), "models": stats["models"],
            "cells": stats.get("cells_evaluated", stats["cells"]),
            "cells_reused": stats.get("cells_reused", 0), "images_read": stats["images_read"],
            "images_corrupted": stats["images_corrupted"], "evaluations": stats["evaluations"],
            "shared_by": round(stats["evaluations"] / stats["images_read"], 3) if stats["images_read"] else 0.0}
    if job.warnings:
        record["warnings"] = list(job.warnings)


def run_eval_group(specs: list[RunSpec], results: str | os.PathLike = "results", *, requeues: int = 0,
                   threads: int | None = None, shared: dict | None = None) -> list[dict]:
    """Run the eval runs of an eval group (``kdbench.evalgroup``: several models, one chunk) together, in this
    process: each (image, corruption, severity) is corrupted once and every model that needs the cell is evaluated
    on it (:func:`kdbench.evals.run_eval_models`); each run keeps its own record, cells and numbers; return their
    records in the order of ``specs``. Idempotent per run, as :func:`run_cohort`: an ``ok`` run is returned as is,
    a run another process holds is run alone after the others (waiting for its lock), a cell a model already has
    is reused. A run whose model fails to load or to evaluate is recorded failed and the others go on; a failure
    of the shared pass (the data, the corruption) fails every run of the group. ``shared``: what successive
    groups of one process reuse (the data)."""
    from kdbench.cohort import cohort_id as group_id  # (kdbench.evalgroup, which imports this module, names it so)
    from kdbench.results import finish_record

    results = Path(results)
    shared = {} if shared is None else shared
    records: dict[str, dict] = {}
    later: list[RunSpec] = []
    with contextlib.ExitStack() as stack:
        todo = _claim(specs, results, stack, records, later)
        if todo:
            _set_threads(todo[0][0], threads)
            runs = [s.run_id for s, _ in todo]
            group = {"group": group_id([s for s, _ in todo]), "runs": runs} if len(todo) > 1 else None
            jobs: list[EvalJob] = _prepare_each(todo, _prepare_eval, results, requeues, shared, records)
            if len(jobs) == 1:  # one model left to evaluate: its run alone (it has its cells' pass to itself)
                j = jobs[0]
                try:
                    _eval_prepared(j)
                    j.record["status"] = "ok"
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    _fault(e, j.record, traceback.format_exc())
                finish_record(j.rdir, j.record)
                records[j.spec.run_id] = j.record
            elif jobs:
                _eval_together(jobs, group, records)
    for spec in later:
        records[spec.run_id] = run_one(spec, results, requeues=requeues, threads=threads)
    return [records[s.run_id] for s in specs]


def _eval_prepared(job: EvalJob) -> None:
    """The evaluation of one prepared eval run (as :func:`_eval`)."""
    from kdbench.evals import run_eval

    t0 = time.perf_counter()
    stats: dict = {}
    rows = run_eval(job.spec, job.net, job.task, job.data, job.device, job.cell_dir, model_sha256=job.sha256,
                    warnings=job.warnings, stats=stats)
    _finish_eval(job, rows, stats, time.perf_counter() - t0)


def _eval_together(jobs: list[EvalJob], group: dict | None, records: dict) -> None:
    """Evaluate the models of several prepared eval runs of one chunk on one corruption pass; record each run."""
    from kdbench.evals import run_eval_models
    from kdbench.results import finish_record
    from kdbench.robustness import SweepModel

    models = [SweepModel(j.net, j.cell_dir, model_sha256=j.sha256, warnings=j.warnings,
                         name=f"{j.spec.label} {j.spec.pair} s{j.spec.seed}") for j in jobs]
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        stats = run_eval_models(jobs[0].spec, models, jobs[0].task, jobs[0].data, jobs[0].device)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # the shared pass failed (the data, the corruption): every run with it
        text = traceback.format_exc()
        for m in models:
            if m.error is None:
                m.error, m.error_text = e, text
    # each run's time: its own evaluations and share of the corrupting (its cells' seconds), plus an equal share of
    # what the pass spent outside the cells (reading cells, building the corrupted sets)
    rest = max(0.0, time.perf_counter() - t0 - sum(m.seconds for m in models)) / len(models)
    for j, m in zip(jobs, models):
        if m.error is None:
            _finish_eval(j, m.rows, {**stats, "cells_evaluated": m.cells, "cells_reused": m.reused}, m.seconds + rest,
                         group)
            j.record["status"] = "ok"
        else:
            _fault(m.error, j.record, m.error_text or repr(m.error))
        finish_record(j.rdir, j.record)
        records[j.spec.run_id] = j.record


def _load_stage(path: Path, s_rec: dict) -> dict:
    """A stage run's tensors: the file its run recorded (sha256), read with ``weights_only=True``."""
    from kdbench.models.sources import check_tensor_dict, load_tensor_file

    if not path.exists():
        raise FileNotFoundError(f"stage file not found: {path}; run again to rebuild it")
    state, _ = load_tensor_file(path, (s_rec.get("artifact") or {}).get("sha256"), "stage file",
                                f"put the original back, or delete {path.parent} to redo the stage")
    return check_tensor_dict(state, path, "stage file", (s_rec.get("stage") or {}).get("tensors"))


def build_context(task, data, recipe: Recipe | dict, student, teacher, device, student_model: str = "",
                  teacher_model: str = ""):
    """The Context a method is built with: task facts plus a probe that returns real tap shapes from one dry
    forward of each network on a couple of validation images."""
    import torch

    from kdbench.method import Context
    from kdbench.recipe import steps_per_epoch

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

    return Context(task=task.name, num_classes=data.num_classes, epochs=int(value(recipe, "epochs")),
                   steps_per_epoch=steps_per_epoch(recipe, len(data.train)),
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
