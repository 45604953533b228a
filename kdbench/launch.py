"""Executors: ``debug`` (in process, pdb works), ``local`` (submitit LocalExecutor subprocesses, at most
``parallel`` at a time: submitit itself would start every job at once; each runs up to ``LOCAL_RUNS_PER_JOB`` runs
in turn), ``slurm`` (submitit job arrays).

Runs are launched in waves (suite-trained teachers first, then the runs that load them). A run whose record
says ``ok`` is skipped; any other run (failed, diverged, interrupted) is launched again and resumes from its
last checkpoint. A job that dies without writing a record (killed, out of memory) gets a ``failed`` record
with the job's log tail, and the other runs go on.

SLURM (``executor="slurm"``), decisions beyond DESIGN.md §6:

* The whole suite is submitted at once: one ``map_array`` per stage and dependency set. Runs that load a
  suite-trained teacher depend on that teacher's array task (``--dependency=afterok:<array>_<task>``;
  runs of different teachers go to different arrays, runs that need no suite-trained teacher, like the
  baseline, start at once). ``--kill-on-invalid-dep=yes``: when a teacher fails, its dependents are
  cancelled instead of pending forever. A teacher that is still pending/running from an earlier
  submission is depended on, not resubmitted; nothing pending or running is submitted twice.
* Resources: the suite's ``resources:`` (submitit's generic names plus ``slurm_*`` passed through), updated
  for a suite-trained teacher by its ``train: {resources: ...}`` (one array per distinct set of resources);
  ``slurm_array_parallelism`` from ``--parallel`` or the suite. Defaults: ``timeout_min`` 24 h (submitit's
  own default, 5 min, kills real runs); ``tasks_per_node = gpus_per_node`` when it is above 1 (DDP, one
  task per GPU) and then ``srun --kill-on-bad-exit=1`` so a crashed rank ends the job instead of leaving
  the others blocked in a collective. Warning signal (``--signal=USR2@delay``): delay 90 s, 15 s when
  ``timeout_min < 5``. SLURM sends it at its first periodic check (every ~30 s) after ``limit - delay - 30 s``,
  so a 1-minute job would otherwise be signalled before Python has even installed submitit's handler.
* Preemption and time limits: the job runs :class:`RunJob`, a ``submitit.helpers.Checkpointable``. On the
  signal submitit calls its ``checkpoint`` (which counts the requeue; the training loop's per-epoch
  checkpoint is the state, so at most the current epoch is redone) and requeues the job under the same
  job id; the run resumes from its last epoch checkpoint. Up to ``MAX_TIMEOUT_REQUEUES`` time-limit
  requeues (preemptions are not counted).
* Job ids are appended to ``<results>/<suite>/jobs.jsonl`` (one JSON line per submitted run: run id, job
  id, submission time, submitit folder), so ``kdbench status`` can ask ``sacct`` (or ``squeue`` when the
  cluster has no accounting) about runs without a final record: :func:`job_states`.
* ``wait=True`` follows the jobs until they end (records are polled every second, the scheduler every
  5-30 s). A job that ends without a record gets one: ``timeout`` (time limit, not requeued) or ``failed``
  (killed, out of memory, node failure), with the job's log tail; a cancelled job gets none (status shows
  ``cancelled``; a rerun resubmits it). Ctrl-C stops following; the jobs keep running.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import submitit
import submitit.helpers

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


def _crash_record(spec: RunSpec, results: Path, error: str, status: str = "failed",
                  scheduler: dict | None = None) -> dict:
    """Record for a job that ended without writing one (killed, out of memory, lost). With ``scheduler``
    (SLURM: the job id), a finished record is kept only when that job wrote it."""
    from kdbench.results import read_record, write_record
    from kdbench.runner import run_dir_for

    run_dir = run_dir_for(results, spec)
    rec = read_record(run_dir)
    if rec is not None and rec.get("finished_at") and (
            scheduler is None or str((rec.get("scheduler") or {}).get("job_id")) == str(scheduler.get("job_id"))):
        return rec
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rec = {"schema": 1, "run_id": spec.run_id, "kind": spec.kind, "suite": spec.suite,
           "suite_version": spec.suite_version, "task": spec.task, "method": spec.method, "label": spec.label,
           "method_index": spec.method_index, "method_version": spec.method_version, "params": spec.params,
           "pair": spec.pair, "pair_index": spec.pair_index, "teacher": spec.teacher,
           "student": {"model": spec.student["model"], "params": None}, "seed": spec.seed, "recipe": spec.recipe,
           "data": spec.data, "status": status, "error": error[-4000:], "metrics": [], "teacher_metrics": [],
           "reference": list(spec.reference), "cost": {}, "env": {}, "scheduler": dict(scheduler or {}),
           "started_at": None,
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
           pattern: str | None = None, log: Callable[[str], None] = print, wait: bool = True) -> list[dict]:
    """Run every pending run of the suite; return the records of the runs launched now.

    ``wait=False`` (slurm only): submit everything, with stage dependencies, and return ``[]`` at once.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if not wait and executor != "slurm":
        raise ValueError(f"--no-wait needs the slurm executor (got {executor!r}): local and debug runs live "
                         "in this process")
    results = Path(results)
    waves = select_specs(suite, pattern)
    total = sum(len(w) for w in waves)
    todo_waves = [pending(w, results) for w in waves]
    n_todo = sum(len(w) for w in todo_waves)
    log(f"{suite.name} v{suite.version}: {total} runs, {total - n_todo} already ok, {n_todo} to run "
        f"({executor} executor) -> {results / suite.name}")
    records: list[dict] = []
    if executor == "slurm":
        submitted = submit_slurm(suite, todo_waves, results, parallel, log)
        return wait_slurm(submitted, results, log) if wait else []
    for wave in todo_waves:
        if not wave:
            continue
        if executor == "debug":
            records += _run_debug(wave, results, log)
        else:
            # the suite's resources, or a suite-trained teacher's own (teacher.train.resources)
            records += _run_local(suite, wave, results, parallel or min(default_parallel(s.resources) for s in wave),
                                  log)
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


#: runs per local job: a new process pays ~5-10 s of imports (torch, its optimizer's dynamo hooks, the data
#: libraries) before it trains, more than a small run's training; a few runs per process amortise it, while a
#: process that dies (killed, out of memory) takes at most this many runs with it (recorded failed, rerun next time)
LOCAL_RUNS_PER_JOB = 4


def run_many(specs: list[RunSpec], results: str) -> list[dict]:
    """Several runs one after another in one process (a local job)."""
    from kdbench.runner import run_one

    return [run_one(spec, results) for spec in specs]


def _collect(job, specs: list[RunSpec], results: Path) -> list[dict]:
    try:
        return job.result()
    except Exception as e:  # the job died without returning (killed, OOM, cancelled) or raised outside run_one
        tail = ""
        try:
            tail = (job.stderr() or "")[-3000:]
        except Exception:
            pass
        # runs the job finished keep their records; the others get one that says why
        return [_crash_record(spec, results, f"job {job.job_id} ended without a result: {e}\n{tail}")
                for spec in specs]


def _run_local(suite: Suite, wave: list[RunSpec], results: Path, parallel: int, log) -> list[dict]:
    import submitit

    ex = submitit.LocalExecutor(folder=_job_folder(results, suite))
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    per_job = max(1, min(LOCAL_RUNS_PER_JOB, -(-len(wave) // parallel)))
    # each run's own resources (a suite-trained teacher may carry its own): the largest of the wave
    timeout = max(int(s.resources.get("timeout_min") or 24 * 60) for s in wave)
    ex.update_parameters(timeout_min=timeout * per_job,
                         gpus_per_node=max(int(s.resources.get("gpus_per_node") or 0) for s in wave))
    queue = [wave[i:i + per_job] for i in range(0, len(wave), per_job)]
    running: list[tuple] = []
    out: list[dict] = []
    old_threads = os.environ.get("KDBENCH_THREADS")
    os.environ.setdefault("KDBENCH_THREADS", str(threads))
    try:
        while queue or running:
            while queue and len(running) < parallel:
                specs = queue.pop(0)
                running.append((ex.submit(run_many, specs, str(results)), specs))
            time.sleep(0.5)
            still = []
            for job, specs in running:
                if job.done():
                    for rec in _collect(job, specs, results):
                        log(_summary(rec))
                        out.append(rec)
                else:
                    still.append((job, specs))
            running = still
    except KeyboardInterrupt:
        for job, _ in running:
            job.cancel(check=False)
        raise
    finally:
        if old_threads is None:
            os.environ.pop("KDBENCH_THREADS", None)
    return out


# ------------------------------------------------------------------------------------------- SLURM
JOBS_FILE = "jobs.jsonl"
MAX_TIMEOUT_REQUEUES = 10
DEFAULT_TIMEOUT_MIN = 24 * 60
#: SLURM job state (first word of sacct's State) -> the run state ``kdbench status`` shows. "completed"
#: means "look at the record".
SLURM_STATUS = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "CONFIGURING": "pending", "RESV_DEL_HOLD": "pending", "RUNNING": "running", "COMPLETING": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running", "SUSPENDED": "running",
    "STOPPED": "running", "COMPLETED": "completed", "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "TIMEOUT": "timeout", "FAILED": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed", "SPECIAL_EXIT": "failed",
    "ENDED": "failed",  # (squeue only) left the queue: a finished run has a record, so without one it failed
}
ACTIVE = ("pending", "running")


class SlurmError(ValueError):
    """SLURM refused a submission (bad partition, account, resources...). The message has sbatch's words."""


class RunNotOk(RuntimeError):
    """Raised in a SLURM job whose run ended failed or diverged (after its record was written)."""


class RunJob(submitit.helpers.Checkpointable):
    """What a SLURM job runs: ``run_one(spec, results)``, requeued on a time limit or a preemption. A run
    that ends failed or diverged makes the job fail too, so SLURM's state and ``afterok`` follow the run.

    ``checkpoint`` is called by submitit inside the job when SLURM's warning signal arrives; the state to
    resume from is the training loop's last epoch checkpoint on disk, so it only counts the requeue (noted
    in the record) and resubmits itself with the same arguments.
    """

    def __init__(self) -> None:
        self.requeues = 0

    def __call__(self, spec: RunSpec, results: str) -> dict:
        from kdbench.results import error_line
        from kdbench.runner import run_one

        rec = run_one(spec, results, requeues=self.requeues)
        if rec["status"] != "ok":  # the record is written; end the job FAILED so `afterok` dependents never run
            raise RunNotOk(f"run {spec.run_id} ({spec.label}, {spec.pair}, seed {spec.seed}) ended "
                           f"{rec['status']}: {error_line(rec.get('error'))}")
        return rec

    def checkpoint(self, spec: RunSpec, results: str) -> submitit.helpers.DelayedSubmission:
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, spec, results)


def slurm_parameters(resources: dict, parallel: int | None) -> dict:
    """submitit ``AutoExecutor`` parameters of a suite's ``resources:`` (see the module docstring)."""
    params = {k: resources[k] for k in GENERIC_RESOURCES if resources.get(k) is not None}
    params.update({k: v for k, v in resources.items() if k.startswith("slurm_") and v is not None})
    if parallel:
        params["slurm_array_parallelism"] = int(parallel)
    params["timeout_min"] = max(1, int(params.get("timeout_min") or DEFAULT_TIMEOUT_MIN))
    gpus = int(resources.get("gpus_per_node") or 0)
    if gpus > 1:  # one task per GPU (DDP), rank from submitit's job environment
        params.setdefault("tasks_per_node", gpus)
    if int(params.get("nodes") or 1) * int(params.get("tasks_per_node") or 1) > 1:
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    params["slurm_signal_delay_s"] = 90 if params["timeout_min"] >= 5 else 15
    return params


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_jobs(suite_dir: str | os.PathLike) -> dict[str, dict]:
    """The latest submission of every run of a suite, from ``jobs.jsonl`` (run id -> entry)."""
    path = Path(suite_dir) / JOBS_FILE
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
            out[e["run_id"]] = e
        except (ValueError, KeyError, TypeError):  # a line cut by a crash: skip it
            continue
    return out


def _append_jobs(suite_dir: Path, entries: list[dict]) -> None:
    suite_dir.mkdir(parents=True, exist_ok=True)
    with open(suite_dir / JOBS_FILE, "a") as fh:
        fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        fh.flush()
        os.fsync(fh.fileno())


def slurm_states(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``job id -> (STATE, reason)`` for SLURM jobs and array tasks (``123`` / ``123_4``): ``sacct`` (ended
    jobs included), then ``squeue`` for the ids sacct does not know (yet: accounting lags a little behind
    submissions; or at all: a cluster without accounting). Without accounting, an id that neither knows has
    left the queue: ``ENDED``. Ids the scheduler has never heard of are left out, and so is everything on a
    machine without SLURM commands (``kdbench status`` then goes by the records)."""
    import subprocess

    from submitit.slurm.slurm import SlurmInfoWatcher

    job_ids = sorted({str(j) for j in job_ids})
    if not job_ids:
        return {}
    out: dict[str, tuple[str, str]] = {}
    accounting = False
    try:
        ids = sorted({j.split("_")[0] for j in job_ids})
        r = subprocess.run(["sacct", "-X", "-P", "-o", "JobID,State,Reason", "-j", ",".join(ids)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            accounting = True
            for jid, info in SlurmInfoWatcher().read_info(r.stdout).items():
                out[jid] = ((info.get("State") or "UNKNOWN").split()[0], info.get("Reason") or "")
    except (OSError, subprocess.SubprocessError):
        pass
    missing = [j for j in job_ids if j not in out]
    if not missing:
        return out
    ids = sorted({j.split("_")[0] for j in missing})
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(ids)],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):  # no SLURM here (results copied from a cluster): no news
        return out
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in missing:
            out[parts[0]] = (parts[1], parts[2])
    if not accounting:  # squeue answers at once, so a job it does not list has left the queue
        for j in missing:
            out.setdefault(j, ("ENDED", "left the queue; no SLURM accounting to tell how it ended"))
    return out


def job_log_tail(folder: str | os.PathLike, job_id: str, chars: int = 3000) -> str:
    """The end of a job's stderr (the task whose log has a traceback, else task 0)."""
    logs = sorted(Path(folder).glob(f"{job_id}_*_log.err"))
    if not logs:
        return ""
    texts = [(p, p.read_text(errors="replace")) for p in logs]
    best = next((t for p, t in texts if "Traceback" in t), texts[0][1])
    return best[-chars:]


def _job_error(entry: dict, state: str, reason: str) -> str:
    if state == "CANCELLED" and reason.startswith("Dependency"):
        deps = " ".join(entry.get("depends") or []) or "?"
        return f"job {entry['job_id']} CANCELLED: a job it depends on ({deps}, afterok) did not succeed"
    msg = f"job {entry['job_id']} {state}" + (f" ({reason})" if reason and reason != "None" else "")
    tail = job_log_tail(entry.get("folder", ""), entry["job_id"]) if state != "CANCELLED" else ""
    return msg + (f" without writing a record; log tail:\n{tail}" if tail else "")


def job_states(suite_dir: str | os.PathLike) -> dict[str, dict]:
    """What the scheduler says about the latest submission of each run of a suite (run id -> entry of
    ``jobs.jsonl`` plus ``state`` (SLURM's), ``reason``, ``status`` (pending / running / completed /
    cancelled / timeout / failed / unknown) and, for a job that ended badly, ``error``). Torch-free."""
    entries = read_jobs(suite_dir)
    if not entries:
        return {}
    sched = slurm_states(e["job_id"] for e in entries.values())
    out = {}
    for rid, e in entries.items():
        state, reason = sched.get(e["job_id"], ("UNKNOWN", ""))
        status = SLURM_STATUS.get(state, "unknown" if state == "UNKNOWN" else "failed")
        e = {**e, "state": state, "reason": reason, "status": status}
        if status in ("cancelled", "timeout", "failed"):
            e["error"] = _job_error(e, state, reason)
        out[rid] = e
    return out


def submit_slurm(suite: Suite, todo_waves: list[list[RunSpec]], results: Path, parallel: int | None,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Submit every pending run of the suite at once (see the module docstring); return the new entries of
    ``jobs.jsonl`` (with ``spec``)."""
    import shutil

    if not shutil.which("sbatch"):
        raise SlurmError("--executor slurm needs SLURM's sbatch on PATH, and there is none here. On a laptop, "
                         "`sudo scripts/slurm/start-local-slurm.sh` starts a one-node cluster (Debian/Ubuntu).")
    suite_dir = results / suite.name
    known = job_states(suite_dir)
    active = {rid: e for rid, e in known.items() if e["status"] in ACTIVE}
    job_of = {rid: e["job_id"] for rid, e in active.items()}
    folder = _job_folder(results, suite).resolve()  # absolute: `kdbench status` may run from elsewhere
    submitted: list[dict] = []
    for stage, wave in enumerate(todo_waves):
        groups: dict[tuple, list[RunSpec]] = {}
        for spec in wave:
            if spec.run_id in active:
                e = active[spec.run_id]
                log(f"[{e['status']:>8}] {spec.label:<14} {spec.pair:<28} seed {spec.seed} (job {e['job_id']}, "
                    "submitted earlier)")
                continue
            deps = (job_of[spec.teacher_run],) if spec.teacher_run in job_of else ()
            groups.setdefault((deps, json.dumps(spec.resources, sort_keys=True)), []).append(spec)
        for (deps, _), specs in groups.items():
            params = slurm_parameters(specs[0].resources, parallel)
            ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
            extra = {"slurm_dependency": "afterok:" + ":".join(deps)} if deps else {}
            ex.update_parameters(name=f"kdbench-{suite.name}", **params, **extra,
                                 slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
            when = _now()
            try:
                jobs = ex.map_array(RunJob(), specs, [str(results)] * len(specs))
            except Exception as e:  # sbatch's message says what is wrong (partition, account, limits...)
                raise SlurmError(f"SLURM refused the {len(specs)} run(s) of stage {stage} of {suite.name} "
                                 f"(resources {specs[0].resources}): {e}") from None
            entries = []
            for job, spec in zip(jobs, specs):
                job_of[spec.run_id] = str(job.job_id)
                run_dir = suite_dir / "runs" / spec.run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True,
                                                              default=str))
                entries.append({"run_id": spec.run_id, "job_id": str(job.job_id), "submitted_at": when,
                                "folder": str(folder), "stage": stage, "depends": list(deps), "kind": spec.kind,
                                "label": spec.label, "pair": spec.pair, "seed": spec.seed,
                                "suite_version": spec.suite_version, "pair_index": spec.pair_index,
                                "method_index": spec.method_index})
            _append_jobs(suite_dir, entries)
            what = f"job array {str(jobs[0].job_id).split('_')[0]}" if len(jobs) > 1 else f"job {jobs[0].job_id}"
            log(f"submitted {len(jobs)} run(s) of stage {stage} as {what}"
                + (f", after {' '.join(deps)} (afterok)" if deps else ""))
            submitted += [{**e, "spec": s} for e, s in zip(entries, specs)]
    return submitted


def _record_of_job(run_dir: Path, job_id: str | None) -> dict | None:
    """The run's finished record if that job wrote it (``job_id=None``: whoever wrote it)."""
    from kdbench.results import read_record

    try:
        rec = read_record(run_dir)
    except Exception:  # being replaced right now, or corrupt: not this job's final record
        return None
    if rec is not None and rec.get("finished_at") and (
            job_id is None or str((rec.get("scheduler") or {}).get("job_id")) == job_id):
        return rec
    return None


def _cancelled(spec: RunSpec, error: str) -> dict:
    """An unwritten record-like summary of a run whose job was cancelled (status shows it from sacct)."""
    return {"run_id": spec.run_id, "kind": spec.kind, "label": spec.label, "pair": spec.pair, "seed": spec.seed,
            "status": "cancelled", "error": error, "metrics": [], "cost": {}}


def wait_slurm(submitted: list[dict], results: Path, log: Callable[[str], None] = print,
               poll_s: float = 1.0) -> list[dict]:
    """Follow submitted jobs until each has ended; return their records (in submission order)."""
    from kdbench.runner import run_dir_for

    left = {e["job_id"]: e for e in submitted}
    done: dict[str, dict] = {}
    interval, next_query = 5.0, time.time() + 5.0
    try:
        while left:
            for job_id, e in list(left.items()):
                rec = _record_of_job(run_dir_for(results, e["spec"]), job_id)
                if rec is not None:
                    done[job_id] = rec
                    log(_summary(rec))
                    del left[job_id]
            if left and time.time() >= next_query:
                states = slurm_states(left)
                interval = min(30.0, interval * 1.25)
                next_query = time.time() + interval
                for job_id, e in list(left.items()):
                    state, reason = states.get(job_id, ("UNKNOWN", ""))
                    status = SLURM_STATUS.get(state, "unknown")
                    if status in ACTIVE + ("unknown",):
                        continue
                    spec = e["spec"]
                    rec = _record_of_job(run_dir_for(results, spec), job_id)
                    if rec is None and status == "completed":  # it found the run already ok (someone else's)
                        rec = _record_of_job(run_dir_for(results, spec), None)
                    if rec is None and status == "cancelled":
                        rec = _cancelled(spec, _job_error(e, state, reason))
                    elif rec is None:
                        rec = _crash_record(spec, results, _job_error(e, state, reason),
                                            status="timeout" if status == "timeout" else "failed",
                                            scheduler={"job_id": job_id, "state": state})
                    done[job_id] = rec
                    log(_summary(rec))
                    del left[job_id]
            if left:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log(f"stopped following {len(left)} job(s); they keep running. "
            f"`kdbench status {results / submitted[0]['spec'].suite}` shows their state.")
        raise
    return [done[e["job_id"]] for e in submitted]
