"""Executors: ``debug`` (in process, pdb works), ``local`` (submitit LocalExecutor subprocesses, at most
``parallel`` at a time: submitit itself would start every job at once), ``slurm`` (submitit job arrays).

Runs are launched in waves (suite-trained teachers first, then the runs that load them). A run whose record
says ``ok`` is skipped; any other run (failed, diverged, interrupted) is launched again and resumes from its
last checkpoint. A job that dies without writing a record (killed, out of memory) gets a ``failed`` record
with the job's log tail, and the other runs go on.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from kdbench.suite import RunSpec, Suite

EXECUTORS = ("debug", "local", "slurm")
GENERIC_RESOURCES = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node")


def select_specs(suite: Suite, pattern: str | None) -> list[list[RunSpec]]:
    """Waves of specs whose label, method or pair matches ``pattern`` (plus the teachers they need)."""
    waves = suite.stages()
    if not pattern:
        return waves
    keep = [s for s in suite.specs if s.kind != "teacher" and any(
        fnmatch.fnmatch(v, pattern) for v in (s.label, s.method, s.pair, f"{s.label}/{s.pair}"))]
    needed = {s.teacher_run for s in keep if s.teacher_run}
    out = [[s for s in w if (s.kind == "teacher" and s.run_id in needed) or s in keep] for w in waves]
    return [w for w in out if w]


def pending(specs: Iterable[RunSpec], results: Path) -> list[RunSpec]:
    from kdbench.results import read_record
    from kdbench.runner import run_dir_for

    out = []
    for s in specs:
        try:
            rec = read_record(run_dir_for(results, s))
        except Exception:  # a corrupt record: rerun
            rec = None
        if rec is None or rec.get("status") != "ok":
            out.append(s)
    return out


def _crash_record(spec: RunSpec, results: Path, error: str) -> dict:
    """Record for a job that ended without writing one (killed, out of memory, lost)."""
    from kdbench.results import read_record, write_record
    from kdbench.runner import run_dir_for

    run_dir = run_dir_for(results, spec)
    rec = read_record(run_dir)
    if rec is not None and rec.get("finished_at"):
        return rec
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rec = {"schema": 1, "run_id": spec.run_id, "kind": spec.kind, "suite": spec.suite,
           "suite_version": spec.suite_version, "task": spec.task, "method": spec.method, "label": spec.label,
           "method_index": spec.method_index, "method_version": spec.method_version, "params": spec.params,
           "pair": spec.pair, "pair_index": spec.pair_index, "teacher": spec.teacher,
           "student": {"model": spec.student["model"], "params": None}, "seed": spec.seed, "recipe": spec.recipe,
           "data": spec.data, "status": "failed", "error": error[-4000:], "metrics": [], "teacher_metrics": [],
           "reference": list(spec.reference), "cost": {}, "env": {}, "scheduler": {}, "started_at": None,
           "finished_at": now}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(run_dir, rec)
    return rec


def default_parallel(resources: dict) -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count() // max(1, int(resources.get("gpus_per_node") or 1)))
    except Exception:  # pragma: no cover
        pass
    cpus = int(resources.get("cpus_per_task") or 1)
    return max(1, (os.cpu_count() or 1) // cpus)


def _summary(rec: dict) -> str:
    m = {(r["metric"], r["select"]): r["value"] for r in rec.get("metrics", [])}
    main = next((f"{k[0]}={v:.2f}" for k, v in m.items() if k[1] == "final"), "")
    t = rec.get("cost", {}).get("wall_time_s")
    extra = f" {main}" if main else ""
    extra += f" ({t:.0f}s)" if t else ""
    err = ""
    if rec["status"] != "ok" and rec.get("error"):
        err = " :: " + rec["error"].strip().splitlines()[-1][:160]
    return f"[{rec['status']:>8}] {rec['label']:<14} {rec['pair']:<28} seed {rec['seed']}{extra}{err}"


def launch(suite: Suite, results: str | os.PathLike = "results", executor: str = "local", parallel: int | None = None,
           pattern: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every pending run of the suite; return the records of the runs launched now."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    results = Path(results)
    waves = select_specs(suite, pattern)
    total = sum(len(w) for w in waves)
    todo_waves = [pending(w, results) for w in waves]
    n_todo = sum(len(w) for w in todo_waves)
    log(f"{suite.name} v{suite.version}: {total} runs, {total - n_todo} already ok, {n_todo} to run "
        f"({executor} executor) -> {results / suite.name}")
    records: list[dict] = []
    for wave in todo_waves:
        if not wave:
            continue
        if executor == "debug":
            records += _run_debug(wave, results, log)
        elif executor == "local":
            records += _run_local(suite, wave, results, parallel or default_parallel(suite.resources), log)
        else:
            records += _run_slurm(suite, wave, results, parallel, log)
    return records


def _run_debug(wave: list[RunSpec], results: Path, log) -> list[dict]:
    from kdbench.runner import run_one

    out = []
    for spec in wave:
        rec = run_one(spec, results)
        log(_summary(rec))
        out.append(rec)
    return out


def _job_folder(results: Path, suite: Suite) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return results / suite.name / ".submitit" / stamp


def _collect(job, spec: RunSpec, results: Path) -> dict:
    try:
        rec = job.result()
    except Exception as e:  # the job died without returning (killed, OOM, cancelled) or raised outside run_one
        tail = ""
        try:
            tail = (job.stderr() or "")[-3000:]
        except Exception:
            pass
        rec = _crash_record(spec, results, f"job {job.job_id} ended without a result: {e}\n{tail}")
    return rec


def _run_local(suite: Suite, wave: list[RunSpec], results: Path, parallel: int, log) -> list[dict]:
    import submitit

    from kdbench.runner import run_one

    res = suite.resources
    ex = submitit.LocalExecutor(folder=_job_folder(results, suite))
    ex.update_parameters(timeout_min=int(res.get("timeout_min") or 24 * 60),
                         gpus_per_node=int(res.get("gpus_per_node") or 0))
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    queue = list(wave)
    running: list[tuple] = []
    out: list[dict] = []
    old_threads = os.environ.get("KDBENCH_THREADS")
    os.environ.setdefault("KDBENCH_THREADS", str(threads))
    try:
        while queue or running:
            while queue and len(running) < parallel:
                spec = queue.pop(0)
                running.append((ex.submit(run_one, spec, str(results)), spec))
            time.sleep(0.5)
            still = []
            for job, spec in running:
                if job.done():
                    rec = _collect(job, spec, results)
                    log(_summary(rec))
                    out.append(rec)
                else:
                    still.append((job, spec))
            running = still
    except KeyboardInterrupt:
        for job, _ in running:
            job.cancel(check=False)
        raise
    finally:
        if old_threads is None:
            os.environ.pop("KDBENCH_THREADS", None)
    return out


def slurm_parameters(resources: dict, parallel: int | None) -> dict:
    params = {k: resources[k] for k in GENERIC_RESOURCES if resources.get(k) is not None}
    params.update({k: v for k, v in resources.items() if k.startswith("slurm_") and v is not None})
    if parallel:
        params["slurm_array_parallelism"] = int(parallel)
    gpus = int(resources.get("gpus_per_node") or 0)
    if gpus > 1:  # one task per GPU (DDP), rank from submitit's job environment
        params.setdefault("tasks_per_node", gpus)
    return params


def _run_slurm(suite: Suite, wave: list[RunSpec], results: Path, parallel: int | None, log) -> list[dict]:
    import submitit

    from kdbench.runner import run_one

    ex = submitit.AutoExecutor(folder=_job_folder(results, suite), cluster="slurm")
    ex.update_parameters(name=f"kdbench-{suite.name}", **slurm_parameters(suite.resources, parallel))
    jobs = ex.map_array(run_one, wave, [str(results)] * len(wave))
    log(f"submitted {len(jobs)} jobs as array {jobs[0].job_id.split('_')[0] if jobs else '-'}")
    out = []
    for job, spec in zip(jobs, wave):
        rec = _collect(job, spec, results)
        log(_summary(rec))
        out.append(rec)
    return out
