"""The SLURM client of the scheduler (``kdbench.scheduler``): submits a run graph as submitit job arrays with
``afterok`` dependencies, follows the jobs, and tells ``kdbench status`` what the scheduler knows.

SLURM (``executor="slurm"``), decisions beyond DESIGN.md §6:

* The whole graph is submitted at once, level by level (a run's level is one more than the deepest run it
  needs): one ``map_array`` per (level, kind, resources, dependency set). A run depends on the array tasks of
  the runs it ``needs`` (``--dependency=afterok:<array>_<task>:...``): a distill run on its suite-trained
  teacher and on its method's stage run, an eval run on the model it evaluates; runs that need nothing (the
  baseline, checkpoint-teacher stages) start at once. ``--kill-on-invalid-dep=yes``: when a needed run
  fails, its dependents are cancelled instead of pending forever. A cohort of distill runs is one array task
  (:class:`CohortJob`); the eval runs of one chunk over several models (an eval group, ``kdbench/evalgroup.py``)
  are one array task after all of their models (:class:`EvalGroupJob`, ``afterany``), submitted last. A run that is still pending/running from
  an earlier submission is depended on, not resubmitted; nothing pending or running is submitted twice.
* Resources: the suite's ``resources:`` (submitit's generic names plus ``slurm_*`` passed through), updated
  for a suite-trained teacher by its ``train: {resources: ...}`` (one array per distinct set of resources);
  ``slurm_array_parallelism`` from ``--parallel`` or the suite. Defaults: ``timeout_min`` 24 h (submitit's
  own default, 5 min, kills real runs); ``tasks_per_node = gpus_per_node`` when it is above 1 (DDP, one
  task per GPU) and then ``srun --kill-on-bad-exit=1`` so a crashed rank ends the job instead of leaving
  the others blocked in a collective. Warning signal (``--signal=USR2@delay``): delay 90 s; 40 s when
  ``timeout_min`` is 2-4; 15 s for 1 minute. SLURM sends it at its first periodic check (every ~30 s) after
  ``limit - delay - 30 s``, so a 1-minute job would otherwise be signalled before Python has even installed
  submitit's handler; with 15 s on a 2-minute job the signal could come so late that SLURM's kill at the
  limit raced submitit's ``scontrol requeue``.
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
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import submitit
import submitit.helpers

from kdbench.results import run_dir_for, write_spec
from kdbench.cohort import cohorts
from kdbench.graph import crash_record, job_folder, levels, runs_per_gpu, summary
from kdbench.registry import PLUGINS_ENV
from kdbench.suite import RunSpec, Suite

GENERIC_RESOURCES = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node")


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
        # the method plugin folders of the submitting process, pickled with the job: also where the cluster
        # does not export the environment (--export=NONE); no run_id depends on them
        self.plugins = os.environ.get(PLUGINS_ENV)

    def _use_plugins(self) -> None:
        if getattr(self, "plugins", None) and not os.environ.get(PLUGINS_ENV):
            os.environ[PLUGINS_ENV] = self.plugins  # inherited by the processes of a RunPack too

    def __call__(self, spec: RunSpec, results: str) -> dict:
        from kdbench.results import error_line
        from kdbench.runner import run_one

        self._use_plugins()
        rec = run_one(spec, results, requeues=self.requeues, threads=spec.resources.get("cpus_per_task"))
        if rec["status"] != "ok":  # the record is written; end the job FAILED so `afterok` dependents never run
            raise RunNotOk(f"{spec.kind} run {spec.run_id} ({spec.label}, {spec.pair}, seed {spec.seed}) ended "
                           f"{rec['status']}: {error_line(rec.get('error'))}")
        return rec

    def checkpoint(self, spec: RunSpec, results: str) -> submitit.helpers.DelayedSubmission:
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, spec, results)


def _run_in_process(spec: RunSpec, results: str, requeues: int, threads: int | None) -> dict:
    from kdbench.runner import run_one

    return run_one(spec, results, requeues=requeues, threads=threads)


class RunPack(RunJob):
    """What a SLURM job runs when ``resources.runs_per_gpu: N`` packs several small runs on one GPU: the job
    holds one GPU and ``cpus_per_task`` cores and runs its (up to N) runs at once, each in its own process
    (``spawn``) with ``cpus_per_task // N`` threads; all of them see the job's GPU. Requeued like
    :class:`RunJob` (every run resumes from its own last epoch checkpoint); the job fails when any of its runs
    did not end ok, after all of them have ended and written their records (so the dependents of every run
    in the pack wait for the whole pack: ``afterok`` on its array task)."""

    def __call__(self, specs: list[RunSpec], results: str) -> list[dict]:  # type: ignore[override]
        import multiprocessing as mp

        from kdbench.results import error_line

        threads = max(1, int(specs[0].resources.get("cpus_per_task") or len(specs)) // len(specs))
        self._use_plugins()
        with mp.get_context("spawn").Pool(len(specs)) as pool:
            recs = pool.starmap(_run_in_process, [(s, results, self.requeues, threads) for s in specs])
        bad = [(s, r) for s, r in zip(specs, recs) if r["status"] != "ok"]
        if bad:
            raise RunNotOk("; ".join(f"{s.kind} run {s.run_id} ({s.label}, {s.pair}, seed {s.seed}) ended "
                                     f"{r['status']}: {error_line(r.get('error'))}" for s, r in bad))
        return recs

    def checkpoint(self, specs: list[RunSpec], results: str) -> submitit.helpers.DelayedSubmission:  # type: ignore[override]
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, specs, results)


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
    params["slurm_signal_delay_s"] = 90 if params["timeout_min"] >= 5 else 40 if params["timeout_min"] >= 2 else 15
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


def _dependency_failed(entry: dict) -> bool:
    """Whether a job that SLURM cancelled without saying why (accounting can lag behind the reason) depends on a
    job that ended other than COMPLETED: ``--kill-on-invalid-dep`` cancelled it."""
    deps = entry.get("depends") or []
    if not deps:
        return False
    states = slurm_states(deps)
    return any(states.get(d, ("UNKNOWN", ""))[0] not in ("COMPLETED", "UNKNOWN") for d in deps)


def _job_error(entry: dict, state: str, reason: str) -> str:
    if state == "CANCELLED" and (reason.startswith("Dependency")
                                 or (reason in ("", "None") and _dependency_failed(entry))):
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


class CohortJob(RunJob):
    """What a SLURM array task runs for a cohort (``kdbench/cohort.py``): its runs train together in the task's
    process (:func:`kdbench.runner.run_cohort`) on the task's GPU and ``cpus_per_task`` cores. Requeued like
    :class:`RunJob`: every member resumes from its own last epoch checkpoint. The task fails only when none of its
    runs ended ok: the evaluations of the members that did then run (``afterok`` on the task), and those of a
    member that diverged or failed are recorded as blocked by it."""

    def __call__(self, specs: list[RunSpec], results: str) -> list[dict]:  # type: ignore[override]
        from kdbench.results import error_line
        from kdbench.runner import run_cohort

        self._use_plugins()
        recs = run_cohort(specs, results, requeues=self.requeues, threads=specs[0].resources.get("cpus_per_task"))
        if all(r["status"] != "ok" for r in recs):
            raise RunNotOk("; ".join(f"{s.kind} run {s.run_id} ({s.label}, {s.pair}, seed {s.seed}) ended "
                                     f"{r['status']}: {error_line(r.get('error'))}" for s, r in zip(specs, recs)))
        return recs

    def checkpoint(self, specs: list[RunSpec], results: str) -> submitit.helpers.DelayedSubmission:  # type: ignore[override]
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, specs, results)


class EvalGroupJob(CohortJob):
    """What a SLURM array task runs for an eval group (``kdbench/evalgroup.py``): the eval runs of one chunk over
    several models, evaluated together in the task's process on one corruption pass
    (:func:`kdbench.runner.run_eval_group`). Requeued like :class:`RunJob`: every model resumes from its own
    cells. The task fails only when none of its runs ended ok."""

    def __call__(self, specs: list[RunSpec], results: str) -> list[dict]:  # type: ignore[override]
        from kdbench.results import error_line
        from kdbench.runner import run_eval_group

        self._use_plugins()
        recs = run_eval_group(specs, results, requeues=self.requeues,
                              threads=specs[0].resources.get("cpus_per_task"))
        if all(r["status"] != "ok" for r in recs):
            raise RunNotOk("; ".join(f"{s.kind} run {s.run_id} ({s.label}, {s.pair}, seed {s.seed}) ended "
                                     f"{r['status']}: {error_line(r.get('error'))}" for s, r in zip(specs, recs)))
        return recs


def submit_slurm(suite: Suite, todo: list[RunSpec], results: Path, parallel: int | None,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Submit every pending run of the graph at once (see the module docstring); return the new entries of
    ``jobs.jsonl`` (with ``spec``).

    Eval groups (``kdbench/evalgroup.py``): the eval runs that no run needs and that form groups of several models
    are submitted last, one array task per group (:class:`EvalGroupJob`), each task after every model of its group
    (``afterany``: a model that failed has its eval run recorded failed by the task, the other models are
    evaluated)."""
    import shutil

    from kdbench.evalgroup import eval_group_key, groups

    if not shutil.which("sbatch"):
        raise SlurmError("--executor slurm needs SLURM's sbatch on PATH, and there is none here. On a laptop, "
                         "`sudo scripts/slurm/start-local-slurm.sh` starts a one-node cluster (Debian/Ubuntu).")
    suite_dir = results / suite.name
    known = job_states(suite_dir)
    active = {rid: e for rid, e in known.items() if e["status"] in ACTIVE}
    job_of = {rid: e["job_id"] for rid, e in active.items()}
    folder = job_folder(results, suite.name).resolve()  # absolute: `kdbench status` may run from elsewhere
    depth = levels(todo)
    submitted: list[dict] = []

    def submit(kind: str, units: list[list[RunSpec]], deps: tuple, level: int, job, what: str,
               dep_type: str = "afterok") -> None:
        """One job array: one task per unit (a run, a cohort, a pack, an eval group) with ``job``."""
        specs = [s for u in units for s in u]
        params = slurm_parameters(specs[0].resources, parallel)
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
        extra = {"slurm_dependency": f"{dep_type}:" + ":".join(deps)} if deps else {}
        ex.update_parameters(name=f"kdbench-{suite.name}-{kind}", **params, **extra,
                             slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
        when = _now()
        try:
            if job is None:
                jobs = ex.map_array(RunJob(), specs, [str(results)] * len(specs))
            else:
                task_jobs = ex.map_array(job, units, [str(results)] * len(units))
                jobs = [j for j, u in zip(task_jobs, units) for _ in u]
        except Exception as e:  # sbatch's message says what is wrong (partition, account, limits...)
            raise SlurmError(f"SLURM refused the {len(specs)} {kind} run(s) of {suite.name} "
                             f"(resources {specs[0].resources}): {e}") from None
        entries = []
        for j, spec in zip(jobs, specs):
            job_of[spec.run_id] = str(j.job_id)
            write_spec(run_dir_for(results, spec), spec)
            entries.append({"run_id": spec.run_id, "job_id": str(j.job_id), "submitted_at": when,
                            "folder": str(folder), "stage": level, "depends": list(deps), "kind": spec.kind,
                            "needs": list(spec.needs), "label": spec.label, "pair": spec.pair,
                            "seed": spec.seed, "suite_version": spec.suite_version,
                            "pair_index": spec.pair_index, "method_index": spec.method_index})
        _append_jobs(suite_dir, entries)
        n_jobs = len({str(j.job_id) for j in jobs})
        desc = f"job array {str(jobs[0].job_id).split('_')[0]}" if n_jobs > 1 else f"job {jobs[0].job_id}"
        if what:
            desc += f" ({n_jobs} task(s), {what})"
        log(f"submitted {len(jobs)} {kind} run(s) as {desc}" + (f", after {' '.join(deps)} ({dep_type})" if deps else ""))
        submitted.extend({**e, "spec": s} for e, s in zip(entries, specs))

    needed = {n for s in todo for n in s.needs}
    grouped = [s for s in todo if s.kind == "eval" and s.run_id not in needed and s.run_id not in active
               and eval_group_key(s) is not None]
    late = {s.run_id for s in grouped}
    for level in sorted(set(depth.values())):
        by_key: dict[tuple, list[RunSpec]] = {}
        for spec in (s for s in todo if depth[s.run_id] == level):
            if spec.run_id in active:
                e = active[spec.run_id]
                log(f"[{e['status']:>8}] {spec.label:<14} {spec.pair:<28} seed {spec.seed} {spec.kind} "
                    f"(job {e['job_id']}, submitted earlier)")
                continue
            if spec.run_id in late:
                continue
            deps = tuple(job_of[n] for n in spec.needs if n in job_of)
            by_key.setdefault((spec.kind, json.dumps(spec.resources, sort_keys=True), deps), []).append(spec)
        for (kind, _, deps), specs in by_key.items():
            pack = runs_per_gpu(specs[0].resources)
            together = cohorts(specs)
            if any(len(c) > 1 for c in together):  # one array task per cohort (kdbench/cohort.py)
                submit(kind, together, deps, level, CohortJob(), "one per cohort")
            elif pack > 1:  # one array task per pack of `pack` runs sharing the task's GPU
                packs = [specs[i:i + pack] for i in range(0, len(specs), pack)]
                submit(kind, packs, deps, level, RunPack(), f"up to {pack} runs per GPU")
            else:
                submit(kind, [[s] for s in specs], deps, level, None, "")
    # the eval groups, after every run they need has been submitted: one array per (resources, dependency set)
    arrays: dict[tuple, list[list[RunSpec]]] = {}
    for g in groups(grouped):
        deps = tuple(sorted({job_of[n] for s in g for n in s.needs if n in job_of}))
        arrays.setdefault((json.dumps(g[0].resources, sort_keys=True), deps, len(g) > 1), []).append(g)
    for (_, deps, several), units in arrays.items():
        level = max(depth[s.run_id] for u in units for s in u)
        if several:
            submit("eval", units, deps, level, EvalGroupJob(), "one per eval group: one corruption pass for its "
                                                               "models", dep_type="afterany")
        else:
            submit("eval", units, deps, level, None, "")
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
    left = {(e["job_id"], e["run_id"]): e for e in submitted}  # a packed job (runs_per_gpu) holds several runs
    done: dict[tuple, dict] = {}
    interval, next_query = 5.0, time.time() + 5.0
    try:
        while left:
            for key, e in list(left.items()):
                rec = _record_of_job(run_dir_for(results, e["spec"]), key[0])
                if rec is not None:
                    done[key] = rec
                    log(summary(rec))
                    del left[key]
            if left and time.time() >= next_query:
                states = slurm_states({job_id for job_id, _ in left})
                interval = min(30.0, interval * 1.25)
                next_query = time.time() + interval
                for key, e in list(left.items()):
                    job_id = key[0]
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
                        rec = crash_record(spec, results, _job_error(e, state, reason),
                                            status="timeout" if status == "timeout" else "failed",
                                            scheduler={"job_id": job_id, "state": state})
                    done[key] = rec
                    log(summary(rec))
                    del left[key]
            if left:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log(f"stopped following {len(left)} job(s); they keep running. "
            f"`kdbench status {results / submitted[0]['spec'].suite}` shows their state.")
        raise
    return [done[(e["job_id"], e["run_id"])] for e in submitted]
