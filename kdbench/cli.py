"""kdbench command line: run | validate | ls | table | robustness | plot | status.

Only argparse and the torch-free modules are imported at start-up; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to get the usage, not the usage itself."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} -h` shows the usage)\n")


def _add_suite_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("suite", nargs="+" if many else None,
                   help=("suite YAML files" if many else "suite YAML file") + ", or names of suites in ./suites "
                        "(e.g. quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite value, e.g. --set recipe.epochs=2 (repeatable)")


def _add_plugins_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                   help="a folder of method plugin files: every *.py not starting with _ (repeatable; also "
                        "KDBENCH_PLUGINS, os.pathsep-separated; installed packages' kdbench.methods entry points "
                        "are always found)")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--parallel 0`` or ``-1`` would never start a run)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _resources(res: dict) -> str:
    return " ".join(f"{k.replace('slurm_', '')}={v}" for k, v in sorted(res.items())) or "-"


def _matrix(specs) -> str:
    """The run graph, in topological order: run_id, kind, label, pair, seed, needs (short ids), resources."""
    from tabulate import tabulate

    from kdbench.graph import levels, topological

    depth = levels(specs)
    rows = []
    for s in topological(specs):
        what = s.label
        if s.kind == "eval" and s.eval:
            what = f"{s.label}: {s.eval.get('corruption') or s.eval['name']}"
        rows.append([s.run_id, depth[s.run_id], s.kind, what, s.pair, s.seed,
                     " ".join(n[:8] for n in s.needs) or "-", _resources(s.resources)])
    return tabulate(rows, headers=["run_id", "level", "kind", "label", "pair", "seed", "needs", "resources"],
                    tablefmt="simple")


def _cohorts(specs) -> str:
    """The cohorts the scheduler would form of these runs (kdbench/cohort.py), one line each."""
    from kdbench.cohort import cohort_id, cohorts

    groups = [c for c in cohorts([s for s in specs if s.kind == "distill"]) if len(c) > 1]
    if not groups:
        return "cohorts: none (every run trains alone)"
    n = sum(len(c) for c in groups)
    lines = [f"cohorts: {len(groups)}, holding {n} distill runs (each trains on shared batches and teacher forwards; "
             "--cohort off trains every run alone)"]
    for c in groups:
        lines.append(f"  {cohort_id(c)}  {c[0].pair} seed {c[0].seed}: {len(c)} runs: "
                     + " ".join(s.label for s in c))
    return "\n".join(lines)


def cmd_run(a) -> int:
    from kdbench.scheduler import launch
    from kdbench.graph import select_specs
    from kdbench.suite import check_data_available, find_suite, load_suite

    if a.cohort == "off":  # inherited by the jobs; kdbench/cohort.py
        import os

        from kdbench.cohort import ENV

        os.environ[ENV] = "off"
    suite = load_suite(find_suite(a.suite), a.overrides)  # a bare name: ./suites/<name>.yaml, then the package's
    specs = select_specs(suite, a.filter)
    for note in suite.notes:
        print(f"note: {note}", file=sys.stderr)
    if a.dry_run:
        kinds = {k: sum(s.kind == k for s in specs) for k in ("teacher", "stage", "distill", "eval")}
        print(f"{suite.path}: {suite.name} v{suite.version}, {len(specs)} runs "
              f"({', '.join(f'{n} {k}' for k, n in kinds.items() if n)})")
        print(_matrix(specs))
        print()
        print(_cohorts(specs))
        return 0
    check_results_folder(Path(a.results), suite.name)
    from kdbench.results import suite_snapshot_path, write_json_atomic

    write_json_atomic(suite_snapshot_path(Path(a.results) / suite.name, suite.version), suite.raw)
    check_data_available(suite)
    records = launch(suite, a.results, executor=a.executor, parallel=a.parallel, pattern=a.filter,
                     wait=not a.no_wait, rerun_replaced=a.rerun_replaced)
    bad = [r for r in records if r["status"] != "ok"]
    suite_dir = Path(a.results) / suite.name
    if a.no_wait:
        print(f"submitted; `kdbench status {suite_dir}` shows the state of every run, "
              f"`kdbench table {suite_dir}` the table once they are done.")
        return 0
    if not a.no_table:
        from kdbench.tables import make_table

        try:
            print()
            print(make_table(suite_dir, suite_version=suite.version))
            if any(s.kind == "eval" and (s.eval or {}).get("name") == "corruptions" for s in suite.specs):
                print()  # a suite with corruption evals ends with its robustness table too
                print(make_table(suite_dir, suite_version=suite.version, layout="robustness"))
        except Exception as e:  # the runs are recorded; a table problem must not hide that
            print(f"(no table: {e})", file=sys.stderr)
    if bad:
        print(f"{len(bad)} run(s) did not finish ok; `kdbench status {suite_dir}` lists them, "
              f"`kdbench run {suite.path}` again reruns only those.", file=sys.stderr)
    return 1 if bad else 0


def check_results_folder(results: Path, suite_name: str) -> None:
    """The results folder can hold this suite's runs: it is a folder (or can be made) and can be written to;
    checked before anything runs, so that the error names the folder instead of surfacing in every run."""
    import os
    import tempfile

    for p in (results, *results.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--results {results}: {p} is a file, not a folder; name a folder")
            break
    folder = results / suite_name
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
    os.close(fd)
    os.unlink(probe)


def cmd_validate(a) -> int:
    from kdbench.suite import check_data_available, find_suite, load_suite

    failed = 0
    for path in a.suite:
        try:
            suite = load_suite(find_suite(path), a.overrides)
            if not a.no_data:
                check_data_available(suite)
            print(f"ok   {suite.path}: {suite.name} v{suite.version}, {len(suite.specs)} runs")
            for note in suite.notes:
                print(f"     note: {note}")
            if a.verbose:
                print(_matrix(suite.specs))
        except (ValueError, KeyError, OSError) as e:
            failed += 1
            print(f"FAIL {e}", file=sys.stderr)
    return 1 if failed else 0


def cmd_ls(a) -> int:
    from tabulate import tabulate

    if a.what == "methods":  # metadata read from the method files (kdbench.methodinfo): no torch
        from kdbench.methodinfo import method_info
        from kdbench.registry import METHODS

        rows = []
        for name in METHODS.names():
            info = method_info(name)
            defaults = ", ".join(f"{k}={v}" for k, v in info.param_defaults().items())
            first_doc = (info.doc.strip().splitlines() or [""])[0]
            rows.append([name, ",".join(sorted(info.tasks)), info.citation or first_doc] + ([defaults] if a.verbose else []))
        headers = ["method", "tasks", "citation"] + (["params"] if a.verbose else [])
        origins = [METHODS.origin(row[0]) for row in rows]  # plugins from outside kdbench: where each comes from
        if any(o["source"] != "kdbench" for o in origins):
            for row, o in zip(rows, origins):
                row.append("kdbench" if o["source"] == "kdbench" else
                           f"{o['distribution']} {o['version']}" if o["distribution"] else o["file"] or o["module"])
            headers.append("from")
        print(tabulate(rows, headers=headers, tablefmt="simple"))
    elif a.what == "suites":
        from kdbench.suite import load_raw

        folder = Path(a.dir)
        rows = []
        for p in sorted(folder.glob("*.yaml")):
            try:  # the loader the runs use: an include: (e.g. coco_spatial_vs_dwt) brings the task
                d = load_raw(p)
                rows.append([p.name, d.get("version", "?"), d.get("task", "?"),
                             _shorten(" ".join(str(d.get("description") or "").split()), 70)])
            except Exception as e:
                rows.append([p.name, "?", "?", f"(unreadable: {e})"])
        print(tabulate(rows, headers=["suite", "version", "task", "description"], tablefmt="simple"))
    elif a.what == "models":  # kdbench/smp names from kdbench.models.catalog; timm/torchvision ask their library
        import fnmatch

        from kdbench.models import catalog
        from kdbench.registry import MODELS

        for prefix in MODELS.names():
            names = list(catalog.LISTED.get(prefix) or MODELS.get(prefix)().names())
            if not names and prefix == "mmdet":  # the optional backend: no mmdet, no configs
                print("mmdet: not installed (pip install -e \".[mmdet]\" then python3 scripts/install_mmcv.py; "
                      "README, \"mmdet backend\")")
                continue
            if a.pattern:
                names = [n for n in names if fnmatch.fnmatch(n, a.pattern)]
                if not names:
                    print(f"{prefix}: (no name matches {a.pattern})")
                    continue
            shown = names if (a.verbose or len(names) <= 40) else names[:40] + [f"... {len(names)} in all (-v)"]
            print(f"{prefix}: " + ", ".join(shown))
    elif a.what == "datasets":  # read from the plugin files; a plugin whose metadata is not literal is imported
        from kdbench.registry import DATASETS

        for name in DATASETS.names():
            info = DATASETS.info(name)
            if info is not None:
                task, options, layout = info.attrs.get("task", "classification"), list(info.params), info.attrs.get("layout", "")
            else:
                plugin = DATASETS.get(name)
                task, options, layout = plugin.task, plugin.option_names(), plugin.layout
            print(f"{name} ({task}): options {', '.join(options)}; layout {layout}")
    return 0


def _shorten(text: str, width: int) -> str:
    """``text`` cut at a word boundary to at most ``width`` characters, with "…" when cut."""
    if len(text) <= width:
        return text
    cut = text[:width - 1].rsplit(" ", 1)[0] if " " in text[:width - 1] else text[:width - 1]
    return cut.rstrip(" ,;:(") + "…"


def cmd_table(a) -> int:
    from kdbench.tables import make_table

    extra = {"reference": a.reference} if a.reference else {}
    if a.reference and a.layout != "robustness":
        raise ValueError(f"--reference names the row that normalises mCE: it goes with --layout robustness, "
                         f"not --layout {a.layout}")
    out = make_table(Path(a.results_dir), metric=a.metric, select=a.select, eval=a.eval, fmt=a.format,
                     suite_version=a.suite_version, layout=a.layout, ci=a.ci, **extra)
    if a.out:
        from kdbench.results import prepare_output, write_json_atomic

        prepare_output(a.out).write_text(out + ("" if out.endswith("\n") else "\n"))
        print(f"wrote {a.out}")
        if a.format == "csv" and a.layout in ("auto", "method_x_domain"):  # the protocol card beside the CSV
            from kdbench.tables.paper import table_protocol

            card = Path(a.out).with_suffix(".protocol.json")
            write_json_atomic(card, table_protocol(Path(a.results_dir), metric=a.metric, select=a.select,
                                                   eval=a.eval, suite_version=a.suite_version))
            print(f"wrote {card}")
    else:
        print(out)
    return 0


def cmd_compare(a) -> int:
    from kdbench.tables.decide import compare

    print(compare(Path(a.results_dir), a.a, a.b, metric=a.metric, select=a.select, eval=a.eval, ci=a.ci,
                  fmt=a.format, suite_version=a.suite_version))
    return 0


def cmd_report(a) -> int:
    from kdbench.report import report
    from kdbench.results import prepare_output

    out = Path(a.out) if a.out else Path(a.results_dir) / "report.html"
    text = report(Path(a.results_dir), suite_version=a.suite_version, metric=a.metric)
    prepare_output(out, "--out").write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def cmd_check(a) -> int:
    """Exit 0 when every referenced cell is within its tolerance, 1 when one is not, 2 when nothing can be checked
    (no reference, or no result for any)."""
    from kdbench.results import load_suite_records, one_version
    from kdbench.tables.decide import check, check_text
    from kdbench.tables.records import TABLE_KINDS

    folder = Path(a.results_dir)
    records = one_version(load_suite_records(folder, TABLE_KINDS), folder, a.suite_version)
    if a.suite:
        from kdbench.suite import find_suite, load_suite

        snapshot = load_suite(find_suite(a.suite)).raw
    else:  # the suite the records were produced with, kept beside them by `kdbench run`
        from kdbench.results import read_suite_snapshot

        snapshot = read_suite_snapshot(folder, records[0]["suite_version"])
    rows = check(records, snapshot, tolerance=a.tolerance, eval=a.eval, select=a.select)
    source = a.suite or f"the suite {folder} was produced with"
    if not rows:
        refs = (snapshot or {}).get("reference") if snapshot is not None else \
            [x for r in records for x in r.get("reference") or []]
        why = ("has no published reference (reference: in the suite file)" if not refs else
               "has references, but no finished result of a referenced cell and metric")
        print(f"kdbench check: {source} {why}: nothing to check", file=sys.stderr)
        return 2
    print(check_text(rows, tolerance=a.tolerance))
    return 0 if all(r.passed for r in rows) else 1


def _list_arg(values: list[str] | None) -> list[str] | None:
    """``--x a b`` and ``--x a,b`` alike."""
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _severities_arg(values: list[str] | None) -> list[int] | None:
    items = _list_arg(values)
    if items is None:
        return None
    out = []
    for v in items:
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"--severities: {v!r} is not an integer; severities are 1-5") from None
    return out


def cmd_robustness(a) -> int:
    """The corruption sweep over a suite's finished models (no training), then the robustness table."""
    from kdbench.sweep import plan_sweep
    from kdbench.scheduler import launch

    sweep = plan_sweep(Path(a.results_dir), _list_arg(a.corruptions), _severities_arg(a.severities),
                       suite_version=a.suite_version, root=a.root, batch_size=a.batch_size)
    if a.dry_run:
        print(f"{a.results_dir}: {len(sweep.specs)} eval runs over the finished models of "
              f"{sweep.name} v{sweep.version}")
        print(_matrix(sweep.specs))
        return 0
    results = Path(a.results_dir).parent
    records = launch(sweep, results, executor=a.executor, parallel=a.parallel, wait=not a.no_wait)
    if a.no_wait:
        print(f"submitted; `kdbench status {a.results_dir}` shows the state of every run, "
              f"`kdbench table {a.results_dir} --layout robustness` the table once they are done.")
        return 0
    bad = [r for r in records if r["status"] != "ok"]
    from kdbench.tables import make_table

    print()
    print(make_table(Path(a.results_dir), layout="robustness", suite_version=sweep.version,
                     **({"reference": a.reference} if a.reference else {})))
    if bad:
        print(f"{len(bad)} eval run(s) did not finish ok; `kdbench status {a.results_dir}` lists them, "
              f"`kdbench robustness {a.results_dir}` again resumes (finished cells are kept).", file=sys.stderr)
    return 1 if bad else 0


def cmd_plot(a) -> int:
    from kdbench.plots import save_figures

    for path in save_figures(Path(a.results_dir), suite_version=a.suite_version, metric=a.metric):
        print(f"wrote {path}")
    return 0


def cmd_status(a) -> int:
    from kdbench.slurm import job_states
    from kdbench.tables import status_table

    jobs = job_states(Path(a.results_dir))  # {} unless runs were submitted to SLURM
    print(status_table(Path(a.results_dir), jobs=jobs, tail=a.tail))
    return 0


def _results_args(parser: argparse.ArgumentParser, *which: str) -> None:
    """The arguments the commands that read a suite's records share: the folder, ``--suite-version`` and those of
    ``which`` (metric, select, eval)."""
    parser.add_argument("results_dir", help="RESULTS/SUITE folder")
    if "metric" in which:
        parser.add_argument("--metric", help="metric (default: the task's main metric)")
    if "select" in which:
        parser.add_argument("--select", choices=("final", "best"), default="final")
    if "eval" in which:
        parser.add_argument("--eval", default="val")
    parser.add_argument("--suite-version", type=int, help="use records of this suite version only")


def build_parser() -> argparse.ArgumentParser:
    from kdbench import __version__

    p = _Parser(prog="kdbench", description="Knowledge-distillation benchmark harness: "
                                "run suites of (method x teacher/student pair x seed), aggregate paper tables.")
    p.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a suite (resumes: runs already ok are skipped)")
    _add_suite_args(r)
    r.add_argument("--executor", choices=("debug", "local", "slurm"), default="local",
                   help="debug: in process; local: subprocesses on this machine (default); slurm: job arrays")
    r.add_argument("--results", default="results", help="results folder (default: results/)")
    r.add_argument("--filter", metavar="GLOB", help="only runs whose label, method or pair matches GLOB (and the runs they need)")
    r.add_argument("--parallel", type=_positive_int, metavar="N",
                   help="runs at a time (local) / array parallelism (slurm); N >= 1")
    r.add_argument("--dry-run", action="store_true", help="resolve the suite and print the run graph (kinds, needs, resources); run nothing")
    r.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    r.add_argument("--rerun-replaced", action="store_true",
                   help="train again the distill runs trained with a teacher file replaced since (retrained in its "
                        "folder, or another file under the same path); without it they are kept and flagged")
    r.add_argument("--cohort", choices=("on", "off"), default="on",
                   help="on (default): distill runs that share the teacher, data, seed and recipe train together, "
                        "one data pass and one teacher forward per batch (same numbers); off: every run alone")
    r.add_argument("--no-wait", action="store_true",
                   help="slurm: submit the whole run graph (needs as job dependencies) and return at once")
    _add_plugins_arg(r)
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="validate suites fully (models, methods, params, data) without running")
    _add_suite_args(v, many=True)
    v.add_argument("--no-data", action="store_true", help="skip the data layout check")
    v.add_argument("-v", "--verbose", action="store_true", help="print the run matrix")
    _add_plugins_arg(v)
    v.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list methods, suites, models or datasets")
    ls.add_argument("what", choices=("methods", "suites", "models", "datasets"))
    ls.add_argument("pattern", nargs="?", help="glob filter (models)")
    ls.add_argument("--dir", default="suites", help="suites folder (default: suites/)")
    ls.add_argument("-v", "--verbose", action="store_true")
    _add_plugins_arg(ls)
    ls.set_defaults(fn=cmd_ls)

    t = sub.add_parser("table", help="paper-style table of a suite's records")
    t.add_argument("results_dir", help="RESULTS/SUITE folder")
    t.add_argument("--format", choices=("md", "latex", "csv"), default="md")
    t.add_argument("--metric", help="metric (default: the task's main metric)")
    t.add_argument("--select", choices=("final", "best"), default="final")
    t.add_argument("--eval", default="val")
    t.add_argument("--suite-version", type=int, help="use records of this suite version only")
    t.add_argument("--layout", default="auto", choices=("auto", "method_x_domain", "robustness", "cost", "summary"),
                   help="auto: methods x pairs; method_x_domain: methods x (spatial, dwt); robustness: clean, "
                        "mPC, rPC (classification: mCE, relative mCE) and the corruption families; cost: "
                        "time, memory and extra parameters of each method; summary: mean ranks over the pairs, "
                        "significant wins over the baseline, Friedman test and Nemenyi critical difference")
    t.add_argument("--ci", choices=("t", "bootstrap"), default="t",
                   help="95%% intervals of Δ: t (Student t, n-1 degrees of freedom; default) or bootstrap "
                        "(percentile, 10,000 resamples, seeded)")
    t.add_argument("--reference", metavar="LABEL",
                   help="robustness layout, classification: the row whose errors normalise CE (default: baseline)")
    t.add_argument("--out", help="write to this file")
    t.set_defaults(fn=cmd_table)

    c = sub.add_parser("compare", help="paired difference of two methods on every pair and pooled: mean, 95%% CI, "
                                       "paired t-test and Wilcoxon p-values")
    _results_args(c, "metric", "select", "eval")
    c.add_argument("a", help="method label")
    c.add_argument("b", help="method label it is compared with (e.g. baseline)")
    c.add_argument("--ci", choices=("t", "bootstrap"), default="t",
                   help="t: Student t, n-1 degrees of freedom (default); bootstrap: percentile, 10,000 resamples, "
                        "seeded")
    c.add_argument("--format", choices=("md", "csv"), default="md")
    c.set_defaults(fn=cmd_compare)

    ck = sub.add_parser("check", help="our numbers against the published references: pass/fail with a tolerance "
                                      "(exit 1 when a cell fails)")
    _results_args(ck, "select", "eval")
    ck.add_argument("--suite", metavar="FILE", help="check against this suite file's references instead of those "
                                                    "the records were produced with")
    ck.add_argument("--tolerance", type=float, metavar="X",
                    help="absolute tolerance (default: the larger of 0.5 points and 2 standard errors of our mean)")
    ck.set_defaults(fn=cmd_check)

    rp = sub.add_parser("report", help="one self-contained HTML file: protocol, tables with intervals, ranks, "
                                       "robustness, cost, run status (no network needed to read it)")
    _results_args(rp, "metric")
    rp.add_argument("-o", "--out", help="the HTML file (default: RESULTS/SUITE/report.html)")
    rp.set_defaults(fn=cmd_report)

    rb = sub.add_parser("robustness", help="corruption sweep over a suite's finished teachers and students "
                                           "(no training; resumes), then the robustness table")
    rb.add_argument("results_dir", help="RESULTS/SUITE folder")
    rb.add_argument("--corruptions", nargs="+", metavar="NAME",
                    help="corruption names or sets (benchmark, extra, all, noise, blur, weather, digital); "
                         "space- or comma-separated (default: benchmark)")
    rb.add_argument("--severities", nargs="+", metavar="S", help="severities 1-5 (default: 1 2 3 4 5)")
    rb.add_argument("--executor", choices=("debug", "local", "slurm"), default="local",
                    help="debug: in process; local: subprocesses (default); slurm: job arrays, one task per "
                         "model x corruption")
    rb.add_argument("--parallel", type=_positive_int, metavar="N",
                    help="runs at a time (local) / array parallelism (slurm); N >= 1")
    rb.add_argument("--suite-version", type=int, help="sweep the models of this suite version")
    rb.add_argument("--root", metavar="FOLDER",
                    help="classification: released CIFAR-100-C files (<corruption>.npy, labels.npy) instead of "
                         "corrupting the val images")
    rb.add_argument("--batch-size", type=_positive_int, help="evaluation batch size (default: the recipe's)")
    rb.add_argument("--reference", metavar="LABEL", help="the row whose errors normalise CE (default: baseline)")
    rb.add_argument("--dry-run", action="store_true", help="check everything and print the eval runs; run nothing")
    rb.add_argument("--no-wait", action="store_true", help="slurm: submit and return at once")
    rb.set_defaults(fn=cmd_robustness)

    pl = sub.add_parser("plot", help="robustness figures (PNG and PDF) under RESULTS/SUITE/figures/")
    pl.add_argument("results_dir", help="RESULTS/SUITE folder")
    pl.add_argument("--metric", help="metric (default: the task's main metric)")
    pl.add_argument("--suite-version", type=int, help="use records of this suite version only")
    pl.set_defaults(fn=cmd_plot)

    s = sub.add_parser("status", help="state of every run of a suite")
    s.add_argument("results_dir", help="RESULTS/SUITE folder")
    s.add_argument("--tail", type=int, default=5, metavar="N",
                   help="last N lines of the error of every run that did not finish ok (default 5; 0: none)")
    s.set_defaults(fn=cmd_status)

    from kdbench import bench  # torch-free at import

    b = sub.add_parser("bench", help="step cost of every (pair, method) of a suite on synthetic batches (no data)")
    bench.add_arguments(b)
    _add_plugins_arg(b)
    b.set_defaults(fn=bench.run_cli)
    return p


def os_error_line(e: OSError) -> str:
    """One line for a filesystem fault: the file, what went wrong, and what to do."""
    import errno

    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "the disk is full: free space, then run the same command again (finished runs are kept)",
            errno.EDQUOT: "the disk quota is exceeded: free space, then run the same command again",
            errno.EROFS: "the filesystem is read-only: choose a writable folder (e.g. --results DIR)",
            errno.EACCES: "no permission: choose a folder you can write to (e.g. --results DIR) or fix its permissions",
            errno.EPERM: "not permitted: choose another folder or fix its permissions",
            errno.EISDIR: "a folder where a file is expected: name a file",
            errno.ENOTDIR: "a file where a folder is expected: name a folder"}.get(e.errno, "")
    return f"{where + ': ' if where else ''}{what}" + (f" ({hint})" if hint else "")


def _one_line(msg: str) -> str:
    return " | ".join(ln.strip() for ln in str(msg).strip().splitlines() if ln.strip())


def main(argv: list[str] | None = None) -> int:
    """The command line. User mistakes and filesystem faults end in one line on stderr and a non-zero exit,
    never a traceback (``KDBENCH_TRACEBACK=1`` shows it for an unexpected error); the records of runs that
    crashed keep their full traceback."""
    import os

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "plugins", None):  # in the environment: the runs' processes find them too
            from kdbench.registry import add_plugin_dirs

            add_plugin_dirs(args.plugins)
        return int(args.fn(args) or 0)
    except BrokenPipeError:  # e.g. `kdbench run S --dry-run | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (kdbench.scheduler.Stopped: the signal's name)
        what = f"stopped by {e.args[0]}" if e.args else "interrupted"
        again = ("`kdbench robustness` again resumes the rest (finished cells are kept)" if args.cmd == "robustness"
                 else "`kdbench run` again resumes the rest")
        print(f"kdbench: {what}: finished runs are recorded; {again}", file=sys.stderr)
        import signal

        sig = getattr(signal, str(e.args[0]), None) if e.args else None
        return 128 + int(sig) if sig is not None else 130
    except (ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"kdbench: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kdbench: error: {_one_line(os_error_line(e))}", file=sys.stderr)
        return 2 if isinstance(e, FileNotFoundError) else 1
    except Exception as e:  # a bug, not a user mistake: one line, the traceback on request
        if os.environ.get("KDBENCH_TRACEBACK"):
            raise
        print(f"kdbench: internal error: {type(e).__name__}: {_one_line(str(e))[:500]} "
              "(KDBENCH_TRACEBACK=1 shows the traceback; please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
