"""Scale of the harness itself (issue 13, "Scale of the harness itself"; a benchmark, not a timed test).

Writes ``--records`` (default 10,000) valid synthetic run records of a made-up classification suite (several
pairs x method entries x seeds, suite-trained teacher runs, a few failed and diverged runs with tracebacks,
val metrics top1/top5 at the final and best epoch, the loaded teacher's metrics, costs) with
``kdbench.results.write_record`` into ``--out`` (default: a temporary folder, removed afterwards), and a suite
YAML on the built-in digits data that expands to about ``--runs`` (default 1,000) runs. Then it times, each in
a fresh subprocess as a user runs them (interpreter start-up and imports included), the kdbench next to this
Python (the venv's):

* ``kdbench table DIR``, ``kdbench table DIR --layout cost``, ``kdbench table DIR --format csv``,
  ``kdbench status DIR`` on the records (target: under 3 s each);
* ``kdbench validate SUITE --no-data`` and ``kdbench run SUITE --dry-run`` on the generated suite (target:
  under 5 s each).

and prints a table: what, wall seconds and CPU seconds (user + system; each the minimum over ``--repeats``),
target, ok/over (by wall time). Exit status 0 whatever the times (it is a measurement, not a test).

    .venv/bin/python benchmarks/bench_scale.py [--records 10000] [--runs 1000] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdbench.results import write_record  # noqa: E402

SUITE = "scale_bench"
PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("resnet110", "resnet32"),
         ("vgg13", "vgg8")]
#: label, method, params: 20 entries (the feature methods in both domains, KD at several temperatures)
METHODS = [("baseline", "baseline", {}), ("kd", "kd", {"temperature": 4.0}), ("kd-t2", "kd", {"temperature": 2.0}),
           ("kd-t8", "kd", {"temperature": 8.0}), ("cwd", "cwd", {"domain": "spatial"}),
           ("cwd-dwt", "cwd", {"domain": "dwt", "dwt_levels": 2}), ("pkd", "pkd", {"domain": "spatial"}),
           ("pkd-dwt", "pkd", {"domain": "dwt", "dwt_levels": 2}), ("reviewkd", "reviewkd", {}),
           ("catkd", "catkd", {"beta": 15.0}), ("catkd-b7", "catkd", {"beta": 7.0}), ("freekd", "freekd", {}),
           ("afp", "afp", {}), ("uhkd", "uhkd", {}), ("cwd-t1", "cwd", {"domain": "spatial", "temperature": 1.0}),
           ("pkd-l1", "pkd", {"domain": "dwt", "dwt_levels": 1}), ("kd-a05", "kd", {"alpha": 0.5}),
           ("reviewkd-w", "reviewkd", {"loss_weight": 2.0}), ("uhkd-d", "uhkd", {"domain": "dwt"}),
           ("freekd-s", "freekd", {"stage_iters": 100})]
TRACEBACK = ('Traceback (most recent call last):\n  File "kdbench/runner.py", line 159, in run_one\n'
             '    _run(spec, results, run_dir, record)\n  File "kdbench/train.py", line 88, in fit\n'
             '    loss.backward()\nRuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n')


def _record(rng: random.Random, kind: str, label: str, method: str, m_i: int, params: dict, p_i: int, seed: int
            ) -> dict:
    teacher_name, student_name = PAIRS[p_i]
    pair = f"{teacher_name}→{student_name}"
    base = 70.0 + p_i + (3.0 if kind == "teacher" else 0.1 * m_i)
    status, error = "ok", None
    roll = rng.random()
    if kind != "teacher" and roll < 0.02:
        status, error = "failed", TRACEBACK
    elif kind != "teacher" and roll < 0.03:
        status, error = "diverged", "kdbench.train.Diverged: non-finite loss at epoch 3 step 17"
    metrics = []
    if status == "ok":
        top1 = base + rng.gauss(0, 0.3)
        for metric, v in (("top1", top1), ("top5", min(99.9, top1 + 20.0))):
            metrics += [{"eval": "val", "metric": metric, "select": "final", "value": round(v, 4),
                         "higher_is_better": True},
                        {"eval": "val", "metric": metric, "select": "best", "value": round(v + 0.2, 4),
                         "higher_is_better": True}]
    model = {"model": f"kdbench:{teacher_name}", "kwargs": {}}
    teacher_run = hashlib.sha256(f"teacher-{p_i}".encode()).hexdigest()[:16]
    if kind == "teacher":
        teacher, student, teacher_metrics = None, {**model, "params": 7_433_860}, []
    else:
        teacher = {**model, "run": teacher_run, "params": 7_433_860}
        student = {"model": f"kdbench:{student_name}", "kwargs": {}, "params": 1_232_596}
        teacher_metrics = [{"eval": "val", "metric": "top1", "select": "final", "value": 79.42 + p_i,
                            "higher_is_better": True}]
    run_id = hashlib.sha256(json.dumps([kind, label, p_i, seed]).encode()).hexdigest()[:16]
    step = 0.012 * (1.0 + 0.05 * m_i) * rng.uniform(0.95, 1.05)
    return {
        "schema": 1, "run_id": run_id, "kind": kind, "suite": SUITE, "suite_version": 1, "task": "classification",
        "method": method, "label": label, "method_index": m_i, "method_version": 1, "params": params, "pair": pair,
        "pair_index": p_i, "teacher": teacher, "student": student, "seed": seed,
        "recipe": {"epochs": 240, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                                   "weight_decay": 5e-4},
                   "schedule": {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}},
        "data": {"name": "cifar100", "root": "data/cifar100"}, "status": status, "error": error,
        "metrics": metrics, "teacher_metrics": teacher_metrics,
        "reference": ([{"metric": "top1", "value": 73.33, "source": "CRD, Table 1"}] if label == "kd" else []),
        "cost": {"wall_time_s": round(step * 78_000, 1), "step_time_s": round(step, 6),
                 "teacher_forward_s": 0.004, "peak_mem_mb": 812.5 + 10 * m_i,
                 "extra_params": 0 if method in ("baseline", "kd") else 12_345 * (m_i + 1)},
        "env": {"git_sha": "0123456789abcdef", "git_dirty": False, "device": "cuda:0", "torch": "2.5.1",
                "python": "3.12.3", "host": "node042"},
        "scheduler": {"executor": "slurm", "job_id": str(100000 + seed)},
        "started_at": f"2026-01-{1 + seed % 28:02d}T10:00:00", "finished_at": f"2026-01-{1 + seed % 28:02d}T12:00:00",
    }


def write_records(suite_dir: Path, n: int, seed: int = 0) -> int:
    """``n`` records: per seed, a teacher run per pair and every (pair, method entry); returns the count."""
    rng = random.Random(seed)
    count, s = 0, 0
    while count < n:
        for p_i in range(len(PAIRS)):
            entries = [("teacher", "teacher", "baseline", -1, {})] + \
                [("distill", lab, meth, i, prm) for i, (lab, meth, prm) in enumerate(METHODS)]
            for kind, lab, meth, m_i, prm in entries:
                if count >= n:
                    return count
                rec = _record(rng, kind, lab, meth, m_i, prm, p_i, s)
                write_record(suite_dir / "runs" / rec["run_id"], rec)
                count += 1
        s += 1
    return count


def write_suite(folder: Path, runs: int) -> Path:
    """A digits suite of 5 pairs x 20 method entries x seeds (+ one teacher run per pair): about ``runs``."""
    pairs = [("resnet20", "resnet8"), ("resnet32", "resnet8"), ("resnet44", "resnet14"), ("resnet56", "resnet20"),
             ("resnet32", "resnet14")]
    methods = ["baseline", "kd", {"name": "kd", "label": "kd-t2", "params": {"temperature": 2.0}},
               {"name": "kd", "label": "kd-t8", "params": {"temperature": 8.0}}, "cwd",
               {"name": "cwd", "label": "cwd-dwt", "params": {"domain": "dwt", "dwt_levels": 2}}, "pkd",
               {"name": "pkd", "label": "pkd-dwt", "params": {"domain": "dwt", "dwt_levels": 2}}, "reviewkd", "catkd",
               {"name": "catkd", "label": "catkd-b7", "params": {"beta": 7.0}}, "freekd", "afp", "uhkd",
               {"name": "freekd", "label": "freekd-s", "params": {"stage_iters": 100}},
               {"name": "afp", "label": "afp-s", "params": {"stage_iters": 100}},
               {"name": "cwd", "label": "cwd-dwt1", "params": {"domain": "dwt", "dwt_levels": 1}},
               {"name": "pkd", "label": "pkd-dwt1", "params": {"domain": "dwt", "dwt_levels": 1}},
               {"name": "kd", "label": "kd-t6", "params": {"temperature": 6.0}},
               {"name": "catkd", "label": "catkd-b3", "params": {"beta": 3.0}}]
    seeds = max(1, round(runs / (len(pairs) * len(methods))))
    lines = [f"suite: {SUITE}", "version: 1", "description: generated by benchmarks/bench_scale.py",
             "task: classification", "data: {name: digits, train_fraction: 0.1, image_size: 16}",
             "recipe:", "  epochs: 2", "  batch_size: 32", "  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}",
             "  schedule: {name: cosine}", "  amp: false", "pairs:"]
    for t, s in pairs:
        lines += [f"  - teacher: {{model: \"kdbench:{t}\", train: {{recipe: {{epochs: 3}}}}}}",
                  f"    student: {{model: \"kdbench:{s}\"}}"]
    lines.append("methods:")
    lines += [f"  - {json.dumps(m)}" for m in methods]
    lines.append(f"seeds: {list(range(seeds))}")
    path = folder / f"{SUITE}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _time(cmd: list[str], repeats: int) -> tuple[float, float, str]:
    """Minimum wall time and minimum CPU time (user + system of the child) over ``repeats`` runs, and stdout.

    The CPU time is what the command costs on an idle machine; the wall time also holds waiting for a core and
    for the disk, which a loaded shared machine inflates."""
    best, cpu, out = float("inf"), float("inf"), ""
    env = {**os.environ, "KDBENCH_THREADS": os.environ.get("KDBENCH_THREADS", "1")}
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best, cpu, out = min(best, dt), min(cpu, used), p.stdout
    return best, cpu, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=1_000, help="runs the generated suite expands to (about)")
    ap.add_argument("--repeats", type=int, default=1, help="time each command this many times, report the min")
    ap.add_argument("--out", help="results folder to write into (kept); default: a temporary one (removed)")
    ap.add_argument("--kdbench", default=str(Path(sys.executable).parent / "kdbench"),
                    help="the kdbench executable (default: the one next to this Python)")
    ap.add_argument("--only", choices=("records", "suite"), help="time only the record or only the suite commands")
    a = ap.parse_args(argv)

    tmp = None if a.out else tempfile.mkdtemp(prefix="kdbench-scale-")
    root = Path(a.out or tmp)
    try:
        kd = [a.kdbench]
        results = []  # (what, wall seconds, cpu seconds, target)
        if a.only != "suite":
            suite_dir = root / SUITE
            if not (suite_dir / "runs").is_dir() or sum(1 for _ in (suite_dir / "runs").iterdir()) != a.records:
                shutil.rmtree(suite_dir, ignore_errors=True)
                t0 = time.perf_counter()
                n = write_records(suite_dir, a.records)
                print(f"wrote {n} records to {suite_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for what, args in (("table", ["table", str(suite_dir)]),
                               ("table --layout cost", ["table", str(suite_dir), "--layout", "cost"]),
                               ("table --format csv", ["table", str(suite_dir), "--format", "csv"]),
                               ("status", ["status", str(suite_dir)])):
                dt, cpu, _ = _time(kd + args, a.repeats)
                results.append((f"kdbench {what} ({a.records:,} records)", dt, cpu, 3.0))
        if a.only != "records":
            suite_yaml = write_suite(root, a.runs)
            dt, cpu, out = _time(kd + ["validate", str(suite_yaml), "--no-data"], a.repeats)
            n_runs = out.rsplit(",", 1)[-1].split()[0] if out.rstrip().endswith(" runs") else "?"
            results.append((f"kdbench validate ({n_runs} runs)", dt, cpu, 5.0))
            dt, cpu, _ = _time(kd + ["run", str(suite_yaml), "--dry-run"], a.repeats)
            results.append((f"kdbench run --dry-run ({n_runs} runs)", dt, cpu, 5.0))
        from tabulate import tabulate

        print(tabulate([(w, f"{s:.2f}", f"{c:.2f}", f"< {t:g}", "ok" if s < t else "over") for w, s, c, t in results],
                       headers=["what", "wall s", "cpu s", "target", ""], tablefmt="pipe", disable_numparse=True))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
