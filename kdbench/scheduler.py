"""The scheduler: walks a suite's run graph (``kdbench.suite.RunSpec``: teacher, stage, distill, eval runs,
each with the run_ids it ``needs``) with one of three executors:

* ``debug``: in this process, in topological order (pdb works);
* ``local``: submitit ``LocalExecutor`` subprocesses on this machine. A run starts once every run it needs has
  finished ok; at most ``parallel`` jobs run at once (default: what the runs' resources allow on this machine,
  GPUs or CPU cores), each running up to ``LOCAL_RUNS_PER_JOB`` ready runs in turn with its share of the CPU
  threads (passed to the runs, not through the environment);
* ``slurm``: the whole graph submitted at once as job arrays with ``afterok`` dependencies
  (``kdbench.slurm``).

Runs that gain from running together in one process do so with every executor (``kdbench.evalgroup.groups``):
the ready distill runs of a cohort (``kdbench/cohort.py``: shared batches and teacher forwards) and the ready eval
runs of one chunk over several models (``kdbench/evalgroup.py``: one corruption pass). With eval groups on, the
debug and local walks start eval runs after the other ready runs, so that a chunk's group gathers the models
trained meanwhile. ``--cohort off`` (``KDBENCH_COHORT=off``) runs every run alone, in the graph's order.

A run whose record says ``ok`` is skipped (a run others need also needs its file: a missing or corrupt
``model.pt``/``stage.pt`` is rebuilt); a corrupt record, or one copied from another run, stops the launch
naming the file. SIGTERM and SIGHUP stop a walk as Ctrl-C does, and any abort stops the local workers
(``stop_jobs``) before it propagates. Any other run (failed, diverged, interrupted) is launched again and
resumes (training from its last epoch checkpoint, a corruption eval from its finished cells). A run whose need
ends badly is not started: it gets a ``failed`` record naming that need, and the runs that do not depend on it
go on. A job that dies without writing a record (killed, out of memory) gets a ``failed`` record with the
job's log tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from kdbench.evalgroup import deferred, groups, run_group
from kdbench.graph import (_blocked, _warn, crash_record, job_folder, pending, progress_name, replaced_teacher_runs,
                           report_replaced, resume_points, runs_per_gpu, select_specs, set_aside_run, summary,
                           topological)
from kdbench.results import run_dir_for
from kdbench.suite import RunSpec, Suite

EXECUTORS = ("debug", "local", "slurm")
#: runs per local job: a new process pays ~5-10 s of imports (torch, its optimizer's dynamo hooks, the data
#: libraries) before it trains, more than a small run's training; a few runs per process amortise it, while a
#: process that dies (killed, out of memory) takes at most this many runs with it (recorded failed, rerun next time)
LOCAL_RUNS_PER_JOB = 4


# ------------------------------------------------------------------------------------------- local resources
def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def default_parallel(resources: dict, n_gpus: int | None = None) -> int:
    """Runs at a time on this machine: GPU groups of ``gpus_per_node`` times ``runs_per_gpu`` on a GPU
    machine, else the cores divided by ``cpus_per_task``."""
    n_gpus = _gpu_count() if n_gpus is None else n_gpus
    if n_gpus:
        return max(1, n_gpus // max(1, int(resources.get("gpus_per_node") or 1))) * runs_per_gpu(resources)
    cpus = int(resources.get("cpus_per_task") or 1)
    return max(1, (os.cpu_count() or 1) // cpus)


class GpuSlots:
    """Which GPUs a local job gets: the machine's GPUs in groups of ``gpus_per_node``, each group shared by up to
    ``runs_per_gpu`` jobs at a time (several small runs packed on one GPU). ``take`` returns the least loaded
    group with room (None when every group is full); ``give`` returns it."""

    def __init__(self, n_gpus: int):
        self.n_gpus = n_gpus
        self.load: dict[tuple[int, ...], int] = {}

    def take(self, resources: dict) -> tuple[int, ...] | None:
        g = int(resources.get("gpus_per_node") or 0)
        if g <= 0 or not self.n_gpus:
            return ()
        groups = [tuple(range(k * g, (k + 1) * g)) for k in range(max(1, self.n_gpus // g))]
        room = [grp for grp in groups if self.load.get(grp, 0) < runs_per_gpu(resources)
                and not any(self.load.get(o, 0) for o in self.load if o != grp and set(o) & set(grp))]
        if not room:
            return None
        grp = min(room, key=lambda grp: self.load.get(grp, 0))
        self.load[grp] = self.load.get(grp, 0) + 1
        return grp

    def give(self, grp: tuple[int, ...]) -> None:
        if grp:
            self.load[grp] -= 1
            if not self.load[grp]:
                del self.load[grp]


# ------------------------------------------------------------------------------------------- launching
def launch(suite: Suite, results: str | os.PathLike = "results", executor: str = "local", parallel: int | None = None,
           pattern: str | None = None, log: Callable[[str], None] = print, wait: bool = True,
           rerun_replaced: bool = False) -> list[dict]:
    """Run every pending run of the suite (of ``pattern``'s runs and what they need); return the records of
    the runs launched now. ``wait=False`` (slurm only): submit everything with its dependencies and return
    ``[]`` at once. Distill runs trained with a teacher file replaced since are kept and listed at the end;
    ``rerun_replaced`` sets their files aside (:func:`set_aside_run`) and trains them again."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if not wait and executor != "slurm":
        raise ValueError(f"--no-wait needs the slurm executor (got {executor!r}): local and debug runs live "
                         "in this process")
    results = Path(results)
    specs = select_specs(suite, pattern)
    todo = topological(pending(specs, results, _warn, rerun_replaced))
    if rerun_replaced:
        for s, why in replaced_teacher_runs(todo, results):
            dest = set_aside_run(run_dir_for(results, s))
            log(f"{s.label} {s.pair} s{s.seed}: trained with a teacher file replaced since ({why.split('(')[-1]}; "
                f"its files are set aside in {dest}, it trains again")
    log(f"{suite.name} v{suite.version}: {len(specs)} runs, {len(specs) - len(todo)} already ok, {len(todo)} to run "
        f"({executor} executor) -> {results / suite.name}")
    resumed = resume_points(todo, results)
    if resumed:
        log(f"resuming {len(resumed)} interrupted run(s):")
        for line in resumed[:20]:
            log(f"  {line}")
        if len(resumed) > 20:
            log(f"  ... and {len(resumed) - 20} more")
    if not todo:
        report_replaced(specs, results, log)
        return []
    with signals_interrupt():
        if executor == "slurm":
            from kdbench.slurm import submit_slurm, wait_slurm

            submitted = submit_slurm(suite, todo, results, parallel, log)
            if not wait:
                return []
            out = wait_slurm(submitted, results, log)
        elif executor == "debug":
            out = _walk_debug(todo, results, log)
        else:
            out = _walk_local(suite, todo, results, parallel, log)
    report_replaced(specs, results, log)
    return out


#: signals that end ``kdbench run`` the way Ctrl-C does (``timeout``, ``kill``, a closed terminal, schedulers)
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled as Ctrl-C (workers stopped, finished runs recorded, a rerun resumes)."""


@contextlib.contextmanager
def signals_interrupt():
    """While the scheduler runs, SIGTERM and SIGHUP raise :class:`Stopped` (a KeyboardInterrupt) in the main
    thread, so that the local workers are stopped and nothing is left running. Outside the main thread (where
    Python cannot take signals) nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    old = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _walk_debug(todo: list[RunSpec], results: Path, log) -> list[dict]:
    """Every run in this process, in the graph's order; the ready runs of a cohort together (kdbench/cohort.py), the
    ready eval runs of one chunk together (kdbench/evalgroup.py: one corruption pass for all their models; the
    eval runs come after the training runs, so that each chunk's group holds every model)."""
    by_id = {s.run_id: s for s in todo}
    status: dict[str, str] = {}
    out = []
    remaining = deferred(todo)
    shared: dict = {}
    while remaining:
        spec = remaining.pop(0)
        bad = next((n for n in spec.needs if n in by_id and status.get(n) != "ok"), None)
        if bad:
            recs = [_blocked(spec, by_id[bad], status.get(bad, "unknown"), results)]
        else:
            ready = [s for s in remaining if all(n not in by_id or status.get(n) == "ok" for n in s.needs)]
            group = groups([spec] + ready)[0]
            for s in group[1:]:
                remaining.remove(s)
            recs = run_group(group, results, shared=shared)
        for rec in recs:
            status[rec["run_id"]] = rec["status"]
            log(summary(rec))
            out.append(rec)
    return out


def run_many(specs: list[RunSpec], results: str, threads: int | None = None) -> list[dict]:
    """Several runs one after another in one process (a local job).

    A ``kdbench run`` started in the background by a script (``nohup kdbench run ... &``) has SIGINT ignored, as
    every asynchronous command of a non-interactive shell, and its jobs inherit that: the Ctrl-C with which
    :func:`stop_jobs` stops them would be ignored until its grace period ends in a kill. The job takes Python's
    own SIGINT handler back, so a stop reaches its runs at once."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    out = []
    shared: dict = {}  # the data, built once for the eval groups of the job
    for group in groups(specs):  # a cohort's runs train together (kdbench/cohort.py), an eval group's models are
        out += run_group(group, results, threads=threads, shared=shared)  # evaluated on one corruption pass
    return out


def _collect(job, specs: list[RunSpec], results: Path) -> list[dict]:
    try:
        return job.result()
    except Exception as e:  # the job died without returning (killed, OOM, cancelled) or raised outside run_one
        _raise_disk_fault(str(e))
        tail = ""
        try:
            tail = (job.stderr() or "")[-3000:]
        except Exception:
            pass
        # runs the job finished keep their records; the others get one that says why
        return [crash_record(spec, results, f"job {job.job_id} ended without a result: {e}\n{tail}")
                for spec in specs]


def _raise_disk_fault(text: str) -> None:
    """A worker that stopped on a full disk, a quota or a read-only filesystem (``runner.DISK_FAULTS``) stops
    the walk: every other run would fail the same way; the error says what to fix."""
    import errno
    import re

    m = re.search(r"OSError: \[Errno (\d+)\] ([^\n]*)", text)
    if m and int(m.group(1)) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        raise OSError(int(m.group(1)), m.group(2).strip() + " (in a worker)")


class CpuShare:
    """The torch threads of the next local job, its share of the cores (cores / jobs at once), and whether other
    processes keep the cores busy. The share does not follow the load: a run's thread count changes its float
    rounding, and over an epochs-long run its numbers (the quickstart's teacher: 99.81 top-1 on 2 threads, 99.44
    on 1), so a default that followed another user's load would make the same suite give other numbers on another
    day. Beside a busy process a step with as many threads as cores waits on the cores it shares and slows several
    times more than a one-thread step (``benchmarks/bench_threads.py``), so the walk says once when the others'
    load is at least half a core per job and names ``KDBENCH_THREADS``, the user's choice, recorded with every run
    (``env.threads``). The others' load is the 1-minute load average less this walk's own jobs' threads, averaged
    the same way (the kernel's exponential 1-minute average), so that its own jobs ending is not someone else's
    load."""

    def __init__(self, cpus: int | None = None, loadavg: Callable[[], tuple] | None = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.loadavg = loadavg or getattr(os, "getloadavg", None)
        self.ours = 0.0
        self.t = time.monotonic()

    def observe(self, threads_running: int) -> None:
        """This walk's jobs run ``threads_running`` threads now."""
        import math

        now = time.monotonic()
        decay = math.exp(-(now - self.t) / 60.0)
        self.ours = self.ours * decay + threads_running * (1.0 - decay)
        self.t = now

    def threads(self, jobs: int) -> int:
        """The threads of a job of ``jobs`` running at once."""
        return max(1, self.cpus // max(1, jobs))

    def others(self) -> float:
        """The load of other processes (0 when the load average cannot be read)."""
        try:
            load = float(self.loadavg()[0]) if self.loadavg else 0.0
        except OSError:
            return 0.0
        return max(0.0, load - self.ours)

    def busy(self, jobs: int) -> bool:
        """Other processes keep at least half a core per job busy and the jobs have more than one thread."""
        return self.threads(jobs) > 1 and self.others() >= 0.5 * max(1, jobs)


def _res_key(spec: RunSpec) -> str:
    return json.dumps(spec.resources, sort_keys=True)


def _walk_local(suite: Suite, todo: list[RunSpec], results: Path, parallel: int | None, log) -> list[dict]:
    """Start each run once what it needs is ok, as many jobs at a time as the resources allow."""
    import submitit

    by_id = {s.run_id: s for s in todo}
    status: dict[str, str] = {}  # run_id -> final status of the runs of this walk
    waiting = list(todo)
    running: list[tuple] = []  # (job, specs, limit, gpus)
    slots = GpuSlots(_gpu_count())
    cpu, job_threads, said_busy = CpuShare(), {}, False
    out: list[dict] = []
    folder = job_folder(results, suite.name)

    def limit_of(spec: RunSpec) -> int:
        return parallel or default_parallel(spec.resources)

    from kdbench.progress import LiveProgress, current_run

    from kdbench.progress import expected_work

    work = {progress_name(s): expected_work(s.kind, (s.recipe or {}).get("epochs"), s.teacher is not None,
                                            len((s.eval or {}).get("severities") or [])) for s in todo}
    keys = {progress_name(s): json.dumps([s.data, (s.recipe or {}).get("batch_size"),
                                          (s.recipe or {}).get("max_steps_per_epoch")], sort_keys=True, default=str)
            for s in todo if s.kind in ("teacher", "distill")}  # runs of one data and batch: the same epoch
    live = LiveProgress(len(todo), log=log, work=work, keys=keys)  # tqdm bars on a terminal, plain lines otherwise
    names = {s.run_id: progress_name(s) for s in todo}

    def finish(rec: dict) -> None:
        status[rec["run_id"]] = rec["status"]
        live.log(summary(rec))
        live.finished(name=names.get(rec["run_id"]))
        out.append(rec)

    def now_running():  # (name, run dir) of the run each job works on
        for _, batch, _, _ in running:
            dirs = [run_dir_for(results, s) for s in batch]
            i = current_run(dirs, live.t0)
            if i is not None:
                yield progress_name(batch[i]), dirs[i]

    try:
        while waiting or running:
            # runs whose need ended badly: recorded failed with the reason, never started
            changed = True
            while changed:
                changed = False
                for spec in list(waiting):
                    bad = next((n for n in spec.needs if n in by_id and status.get(n, "ok") != "ok"), None)
                    if bad is not None:
                        waiting.remove(spec)
                        finish(_blocked(spec, by_id[bad], status[bad], results))
                        changed = True
            ready = [s for s in waiting if all(n not in by_id or status.get(n) == "ok" for n in s.needs)]
            ready = deferred(ready)  # eval runs after the others: a chunk's group gathers the models trained meanwhile
            while ready:
                first = ready[0]
                cap = min([limit_of(first)] + [lim for _, _, lim, _ in running])
                if len(running) >= cap:
                    break
                gpus = slots.take(first.resources)
                if gpus is None:  # every GPU holds runs_per_gpu runs already
                    break
                group = [s for s in ready if _res_key(s) == _res_key(first)]
                # a cohort is a job of its own (kdbench/cohort.py); an eval group (its models evaluated on one
                # corruption pass, kdbench/evalgroup.py) is one unit of a job, as a single run is: up to per_job units
                together = groups(group)
                if len(together[0]) > 1 and together[0][0].kind != "eval":
                    batch = together[0]
                else:
                    units = [c for c in together if len(c) == 1 or c[0].kind == "eval"]
                    per_job = max(1, min(LOCAL_RUNS_PER_JOB, -(-len(units) // cap)))
                    batch = [s for c in units[:per_job] for s in c]
                ex = submitit.LocalExecutor(folder=folder)
                timeout = int(first.resources.get("timeout_min") or 24 * 60)
                ex.update_parameters(timeout_min=timeout * len(batch), gpus_per_node=len(gpus),
                                     **({"visible_gpus": list(gpus)} if gpus else {}))
                threads = cpu.threads(cap)
                if not said_busy and not os.environ.get("KDBENCH_THREADS") and cpu.busy(cap):
                    said_busy = True
                    live.log(f"note: the machine is busy (load {cpu.others():.1f} of other processes on {cpu.cpus} "
                             f"CPUs): each job runs {threads} threads, which wait on the cores they share; "
                             "KDBENCH_THREADS=1 makes steps faster there (the thread count can change a run's "
                             "last float digits, so kdbench does not change it by itself)")
                with _controller_signals():
                    job = ex.submit(run_many, batch, str(results), threads)
                running.append((job, batch, cap, gpus))
                job_threads[id(job)] = threads
                cpu.observe(sum(job_threads.get(id(j), 0) for j, _, _, _ in running))
                for s in batch:
                    waiting.remove(s)
                    ready.remove(s)
            time.sleep(0.5)
            still = []
            for job, batch, cap, gpus in running:
                if job.done():
                    slots.give(gpus)
                    for rec in _collect(job, batch, results):
                        finish(rec)
                else:
                    still.append((job, batch, cap, gpus))
            running = still
            cpu.observe(sum(job_threads.get(id(j), 0) for j, _, _, _ in running))
            live.poll(now_running())
            if waiting and not running and not any(
                    all(n not in by_id or n in status for n in s.needs) for s in waiting):
                raise RuntimeError("scheduler stalled: runs wait on needs that never run")  # pragma: no cover
    except BaseException:  # Ctrl-C, SIGTERM/SIGHUP, or an error of the scheduler itself (a corrupt record,
        stop_jobs([job for job, _, _, _ in running])  # a full disk): no worker may outlive it
        raise
    finally:
        live.close()
    return out


@contextlib.contextmanager
def _controller_signals():
    """While a local job starts, SIGINT is ignored here, so that submitit's job controller inherits that: a Ctrl-C
    at the terminal reaches the job's task (the run stops without a record, to resume) but not the controller,
    which would print a traceback of its own on the terminal; it ends by itself once its task has. The task takes
    Python's SIGINT handler back (:func:`run_many`); :func:`stop_jobs` stops a controller without a task."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; empty where there is none)."""
    out = []
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit() and _ppid(int(d.name)) == pid:
            out.append(int(d.name))
    return out


def stop_jobs(jobs: list, grace_s: float = 15.0) -> None:
    """Stop local submitit jobs and their task processes: Ctrl-C to each job's tasks (the runs stop without a
    record, to resume later; the job's controller then ends by itself), and whatever is still alive after
    ``grace_s`` is killed, tasks first."""
    import signal

    import threading

    old = {}
    if threading.current_thread() is threading.main_thread():  # a second Ctrl-C must not cut the cleanup short
        for name in ("SIGINT",) + STOP_SIGNALS:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                old[getattr(signal, name)] = signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        _stop(jobs, grace_s)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _stop(jobs: list, grace_s: float) -> None:
    import signal

    procs = [p for p in (getattr(j, "_process", None) for j in jobs) if p is not None and p.poll() is None]
    tasks = {p.pid: _children(p.pid) for p in procs}
    for p in procs:  # Ctrl-C to the tasks (each run stops without a record); their controller then ends cleanly
        for pid in tasks[p.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
        if not tasks[p.pid]:  # not started its task yet: no run to stop cleanly (it ignores SIGINT)
            with contextlib.suppress(OSError):
                p.kill()
    deadline = time.time() + grace_s
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        for pid in set(tasks[p.pid] + _children(p.pid)):
            if _ppid(pid) in (p.pid, 1):  # still its task, or orphaned by it
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
