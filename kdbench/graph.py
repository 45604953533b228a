"""The run graph both executors walk (the local walk in ``kdbench.scheduler``, SLURM job arrays in
``kdbench.slurm``): selecting runs and what they need, levels and topological order, which runs are pending (a run
whose record says ``ok`` is skipped; a run others need also needs its file; eval and stage runs are bound to the
model file they used), the records written for runs that could not write their own, and the one-line summary of a
finished run.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from kdbench.results import (LOCK_FILE, artifact_problem, binding_problem, finish_record, new_record,
                             read_record, run_dir_for)
from kdbench.suite import RunSpec, Suite


def closure(specs: list[RunSpec], keep: Iterable[RunSpec]) -> list[RunSpec]:
    """``keep`` plus everything it needs, transitively, in the order of ``specs``."""
    by_id = {s.run_id: s for s in specs}
    want: set[str] = set()
    stack = [s.run_id for s in keep]
    while stack:
        rid = stack.pop()
        if rid in want:
            continue
        want.add(rid)
        stack += [n for n in by_id[rid].needs if n in by_id]
    return [s for s in specs if s.run_id in want]


def select_specs(suite: Suite, pattern: str | None) -> list[RunSpec]:
    """The runs whose label, method or pair matches ``pattern`` (all runs without one), plus what they need. A
    pattern that matches no run is an error that lists the labels, methods and pairs there are."""
    if not pattern:
        return list(suite.specs)
    def fields(s: RunSpec) -> tuple:  # a teacher (and its evals) goes by its label, not by "baseline"
        own = (s.label,) if s.label == "teacher" else (s.label, s.method)
        return own + (s.pair, f"{s.label}/{s.pair}")

    keep = [s for s in suite.specs if any(fnmatch.fnmatch(v, pattern) for v in fields(s))]
    if not keep:
        def names(values) -> str:
            return ", ".join(dict.fromkeys(values))

        raise ValueError(f"--filter {pattern!r} matches no run of {suite.name} (a glob over the label, the method, "
                         f"the pair and label/pair). Labels: {names(s.label for s in suite.specs)}; methods: "
                         f"{names(s.method for s in suite.specs if s.label != 'teacher')}; "
                         f"pairs: {names(s.pair for s in suite.specs)}")
    return closure(suite.specs, keep)


def levels(specs: list[RunSpec]) -> dict[str, int]:
    """run_id -> depth in the graph (0: needs nothing among ``specs``); a cycle is an error."""
    by_id = {s.run_id: s for s in specs}
    depth: dict[str, int] = {}

    def visit(rid: str, path: tuple) -> int:
        if rid in depth:
            return depth[rid]
        if rid in path:
            raise ValueError(f"the run graph has a cycle through {rid}")
        needs = [n for n in by_id[rid].needs if n in by_id]
        depth[rid] = 1 + max((visit(n, path + (rid,)) for n in needs), default=-1)
        return depth[rid]

    for s in specs:
        visit(s.run_id, ())
    return depth


def topological(specs: list[RunSpec]) -> list[RunSpec]:
    """``specs`` ordered so that every run comes after what it needs (stable within a level)."""
    d = levels(specs)
    return sorted(specs, key=lambda s: d[s.run_id])


def _ok(spec: RunSpec, results: Path, needed: bool = False, log: Callable[[str], None] | None = None,
        rerun_replaced: bool = False) -> bool:
    """The run's record says ok; for a run others need (``needed``), the file it left them is there and intact;
    for an eval or stage run, the model file it measured or was computed from is still the current one; for a
    distill run, with ``rerun_replaced``, its teacher's file too (``results.binding_problem``). A corrupt
    record, or one copied from another run or suite, raises (``RecordError`` naming the file): nothing is
    launched over it."""
    rdir = run_dir_for(results, spec)
    rec = read_record(rdir)
    if rec is None or rec.get("status") != "ok":
        return False
    if needed:
        problem = artifact_problem(rdir, rec)
        if problem:
            (log or _warn)(f"warning: the {spec.kind} run {spec.run_id} is recorded ok but {problem}: "
                           "it runs again")
            return False
    if spec.kind in ("eval", "stage") or (spec.kind == "distill" and rerun_replaced):
        problem = binding_problem(results, spec, rec)
        if problem:
            (log or _warn)(f"warning: the {spec.kind} run {spec.run_id} ({spec.label}, {spec.pair}, seed "
                           f"{spec.seed}) is recorded ok but {problem}: it runs again")
            return False
    return True


def _warn(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def pending(specs: Iterable[RunSpec], results: Path, log: Callable[[str], None] | None = None,
            rerun_replaced: bool = False) -> list[RunSpec]:
    """The runs without an ``ok`` record; the runs others need whose file (model.pt, stage.pt) is missing or
    corrupt (rebuilt: a teacher resumes from its last checkpoint when it is still there); eval and stage runs
    bound to a model file that has been replaced, or whose model runs again now (checked once it has: a model
    retrained to the same file keeps them); with ``rerun_replaced``, distill runs trained with a teacher file that
    has been replaced."""
    specs = topological(list(specs))
    needed = {n for s in specs for n in s.needs}
    out: list[RunSpec] = []
    redo: set[str] = set()
    for s in specs:
        if not _ok(s, results, s.run_id in needed, log, rerun_replaced) or (
                s.kind in ("eval", "stage") and redo.intersection(s.needs)):
            out.append(s)
            redo.add(s.run_id)
    return out


def replaced_teacher_runs(specs: Iterable[RunSpec], results: Path) -> list[tuple[RunSpec, str]]:
    """The ok distill runs trained with a teacher file that has since been replaced, with the reason."""
    out = []
    for s in specs:
        if s.kind != "distill" or s.teacher is None:
            continue
        try:
            rec = read_record(run_dir_for(results, s))
        except Exception:
            continue
        if rec is not None and rec.get("status") == "ok":
            problem = binding_problem(results, s, rec)
            if problem:
                out.append((s, problem))
    return out


def set_aside_run(rdir: Path) -> Path:
    """Move every file of a finished run into ``<run dir>/replaced-<UTC time>/`` (nothing is deleted), so that the
    run trains again from nothing; return that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = rdir / f"replaced-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = rdir / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in list(rdir.iterdir()):
        if p == dest or p.name.startswith("replaced-") or p.name == LOCK_FILE:
            continue
        os.replace(p, dest / p.name)
    return dest


def report_replaced(specs: Iterable[RunSpec], results: Path, log: Callable[[str], None]) -> None:
    """Say which ok distill runs were trained with a teacher file replaced since, and what the user may do."""
    found = replaced_teacher_runs(specs, results)
    if not found:
        return
    names = ", ".join(f"{s.label} {s.pair} s{s.seed}" for s, _ in found[:8]) + (
        f" and {len(found) - 8} more" if len(found) > 8 else "")
    log(f"warning: {len(found)} distill run(s) were trained with a teacher file replaced since ({names}): the "
        "tables flag them; `kdbench run SUITE --rerun-replaced` reruns them (their old files are kept in "
        "<run dir>/replaced-<time>/), or keep them as they are")


# ------------------------------------------------------------------------------------------- records
def resume_points(specs: Iterable[RunSpec], results: Path) -> list[str]:
    """What an interrupted run left to resume from, one line per run: a training run's last checkpointed epoch
    (its ``log.jsonl``), an eval run's finished corruption cells. Torch-free."""
    import json

    from kdbench.results import CHECKPOINT_FILE, EVALS_DIR, LOG_FILE, run_dir

    out = []
    for s in specs:
        rdir = run_dir_for(results, s)
        if s.kind in ("teacher", "distill") and (rdir / CHECKPOINT_FILE).is_file():
            try:
                lines = (rdir / LOG_FILE).read_text().splitlines()
                epoch = int(json.loads(lines[-1])["epoch"]) if lines else 0
            except (OSError, ValueError, KeyError, IndexError):
                continue
            epochs = (s.recipe or {}).get("epochs", "?")
            if epoch:
                out.append(f"{progress_name(s)}: resumes after epoch {epoch}/{epochs} (its checkpoint)")
        elif s.kind == "eval" and s.eval and s.eval.get("corruption") and s.target:
            cells = run_dir(results, s.suite, s.target) / EVALS_DIR
            done = [sev for sev in s.eval.get("severities") or []
                    if (cells / f"{s.eval['corruption']}_s{int(sev)}.json").is_file()]
            if done:
                out.append(f"{progress_name(s)}: {len(done)} of {len(s.eval['severities'])} cell(s) already there "
                           "(reused if they are of this model file)")
    return out


def crash_record(spec: RunSpec, results: Path, error: str, status: str = "failed",
                 scheduler: dict | None = None) -> dict:
    """Record for a run that ended without writing one (its job was killed, or a run it needs failed). With
    ``scheduler`` (SLURM: the job id), a finished record is kept only when that job wrote it."""
    rdir = run_dir_for(results, spec)
    try:
        rec = read_record(rdir)
    except Exception:
        rec = None
    if rec is not None and rec.get("finished_at") and (
            scheduler is None or str((rec.get("scheduler") or {}).get("job_id")) == str(scheduler.get("job_id"))):
        return rec
    rec = new_record(spec, status=status, error=error, scheduler=scheduler, started=False)
    return finish_record(rdir, rec)


def _blocked(spec: RunSpec, need: RunSpec, status: str, results: Path) -> dict:
    return crash_record(spec, results, f"not run: it needs the {need.kind} run {need.run_id} ({need.label}, "
                                       f"{need.pair}, seed {need.seed}), which ended {status}")


def summary(rec: dict) -> str:
    """One line per finished run, then the warnings the run recorded (a checkpoint or a cell set aside), so that
    they reach the terminal and not only the worker's log."""
    m = {(r["metric"], r["select"]): r["value"] for r in rec.get("metrics", [])}
    main = next((f"{k[0]}={v:.2f}" for k, v in m.items() if k[1] == "final"), "")
    t = (rec.get("cost") or {}).get("wall_time_s")
    extra = f" {main}" if main else ""
    extra += f" ({t:.0f}s)" if t else ""
    err = ""
    if rec["status"] != "ok" and rec.get("error"):
        err = " :: " + rec["error"].strip().splitlines()[-1][:160]
    kind = rec.get("kind", "")
    what = kind if kind in ("stage", "eval") else ""
    if kind == "eval" and rec.get("eval"):
        what = "eval " + (rec["eval"].get("corruption") or rec["eval"].get("name", ""))
    warnings = "".join(f"\n  {w}" for w in rec.get("warnings") or [] if isinstance(w, str))
    return (f"[{rec['status']:>8}] {rec['label']:<14} {rec['pair']:<28} seed {rec['seed']}"
            f"{' ' + what if what else ''}{extra}{err}{warnings}")


def progress_name(spec: RunSpec) -> str:
    """How the live progress names a run: ``kd resnet20→resnet8 s0`` (stage and eval runs say so)."""
    what = f"{spec.kind} " if spec.kind in ("stage", "eval") else ""
    if spec.kind == "eval" and spec.eval:
        what = f"eval {spec.eval.get('corruption') or spec.eval.get('name', '')} "
    return f"{what}{spec.label} {spec.pair} s{spec.seed}"



def runs_per_gpu(resources: dict) -> int:
    """How many runs share one GPU (``resources.runs_per_gpu``, only with ``gpus_per_node: 1``; default 1)."""
    return max(1, int(resources.get("runs_per_gpu") or 1)) if int(resources.get("gpus_per_node") or 0) == 1 else 1


def job_folder(results: Path, suite_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return results / suite_name / ".submitit" / stamp
