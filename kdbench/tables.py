"""Paper-style tables from a suite's run records (DESIGN.md §5). Torch-free and pandas-free: tabulate only.

``make_table`` pivots the records of one suite (one suite version) into rows = methods and columns = pairs
(or the metric when the suite has one pair):

* a cell is the mean ± sample std (ddof=1) over the seeds that finished ``ok``, with their count:
  ``72.31 ± 0.41 (n=3)``; with one seed the std is omitted: ``72.31 (n=1)``;
* a "teacher" row comes first: the suite-trained teacher runs of the pair, else the ``teacher_metrics``
  that distillation runs recorded for the loaded teacher (one evaluation per distinct teacher checkpoint,
  shown as a plain value without ``n``);
* a "Δ" column beside every pair: difference of means to the ``baseline`` row of the same pair (raw
  difference, its sign is not flipped for lower-is-better metrics);
* the best mean per column is bold (``**`` / ``\\textbf``) following the metric's ``higher_is_better``
  (teacher row excluded; ties at the displayed precision are all marked; nothing is marked in a column
  with fewer than two rows that have a value);
* a "ref." column when records carry a published value for the metric, its source in a footnote;
* a cell with no ``ok`` run shows "—" and a footnote (statuses and the exception line of the first error);
  a partially failed cell shows the n of its ok runs and a footnote; a cell with no record is blank.

Records of one (label, pair) that were produced by another configuration (params, recipe, data, models or
method version changed without bumping the suite version) are not mixed: the configuration of the most
recent record wins, one record per seed (the most recent), and a footnote counts the ignored ones.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.results import (RecordError, check_one_suite, error_line, gc_paused, no_records_error, read_record,
                             run_dirs)
from kdbench.tasks import TASK_FACTS

FORMATS = ("md", "latex", "csv")
LAYOUTS = ("auto", "method_x_domain", "robustness", "cost")
SELECTS = ("final", "best")
BASELINE = "baseline"
TEACHER = "teacher"
NO_DOMAIN = "other"
DOMAIN_ORDER = ("spatial", "dwt")
#: Main metric per task, used when no ``ok`` record tells the metric (from the task registry's facts).
TASK_METRICS = {name: facts["primary_metric"] for name, facts in TASK_FACTS.items()}
#: Record kinds a results table is made of (stage and eval records have tables of their own).
TABLE_KINDS = ("teacher", "distill")
CSV_COLUMNS = ("suite", "suite_version", "eval", "metric", "select", "higher_is_better", "row", "method", "pair",
               "pair_index", "domain", "mean", "std", "n", "n_runs", "delta", "best", "reference",
               "reference_source", "note")


# ------------------------------------------------------------------------------------------- loading
def _load(suite_dir: Path, kinds: tuple[str, ...] = TABLE_KINDS) -> list[dict]:
    records = []
    with gc_paused():
        for d in run_dirs(suite_dir):
            rec = read_record(d)
            if rec is not None and rec.get("kind") in kinds:
                records.append(rec)
    if not records:
        raise no_records_error(suite_dir)
    check_one_suite(records, suite_dir)
    return records


def _one_version(records: list[dict], suite_dir: Path, suite_version: int | None) -> list[dict]:
    versions = sorted({r["suite_version"] for r in records}, key=str)
    if suite_version is None:
        if len(versions) > 1:
            raise ValueError(f"{suite_dir} holds records of suite versions {', '.join(map(str, versions))}; "
                             "numbers of different versions are not comparable: pass suite_version=N "
                             "(CLI: --suite-version N)")
        return records
    chosen = [r for r in records if r["suite_version"] == suite_version]
    if not chosen:
        raise ValueError(f"{suite_dir} has no record of suite version {suite_version}; versions found: "
                         f"{', '.join(map(str, versions))}")
    return chosen


def _config(rec: dict) -> dict:
    """What determines a run's numbers, seed excluded (the run_id's fields)."""
    key = {k: rec.get(k) for k in ("kind", "method", "method_version", "params", "recipe", "data")}
    key["student"] = (rec.get("student") or {}).get("model")
    key["teacher"] = (rec.get("teacher") or {}).get("model")
    return key


def _config_key(rec: dict) -> str:
    """:func:`_config` in a form both writers share (sorted keys; records that differ only in key order agree)."""
    return json.dumps(_config(rec), sort_keys=True, default=str)


def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def _recency(rec: dict) -> tuple:
    return (rec.get("finished_at") or rec.get("started_at") or "", rec.get("run_id") or "")


def _current(recs: list[dict]) -> tuple[list[dict], int]:
    """The records of one cell that belong together: the newest record's configuration, newest per seed."""
    if not recs:
        return [], 0
    newest = max(recs, key=_recency)
    newest_repr, newest_key = repr(_config(newest)), None

    def same(r: dict) -> bool:
        nonlocal newest_key
        # equal reprs of JSON values mean the same values of the same types in the same key order, hence the same
        # _config_key; it is ~5x cheaper than serialising every record of a 10,000-run table
        if repr(_config(r)) == newest_repr:
            return True
        if newest_key is None:
            newest_key = _config_key(newest)
        return _config_key(r) == newest_key

    by_seed: dict[Any, dict] = {}
    for r in sorted((r for r in recs if same(r)), key=_recency):
        by_seed[r.get("seed")] = r
    kept = sorted(by_seed.values(), key=lambda r: (_seed_key(r.get("seed")), r.get("run_id") or ""))
    return kept, len(recs) - len(kept)


def _metric_row(rows: list[dict], eval: str, metric: str, select: str) -> dict | None:
    return next((m for m in rows or [] if m.get("eval") == eval and m.get("metric") == metric
                 and m.get("select") == select), None)


def _order_key(r: dict) -> tuple:
    return (r["kind"] == TEACHER, r.get("pair_index", 0), r.get("method_index", 0), _seed_key(r.get("seed")),
            r.get("run_id") or "")


def _order(records: list[dict]) -> list[dict]:
    return sorted(records, key=_order_key)


def _choose_metric(records: list[dict], metric: str | None, eval: str, select: str) -> str:
    """The metric asked for (checked to exist) or the first metric of the first ok record."""
    available = sorted({(m["eval"], m["metric"], m["select"]) for r in records
                        for m in (r.get("metrics") or []) + (r.get("teacher_metrics") or [])})
    here = [m for e, m, s in available if e == eval and s == select]
    listing = ", ".join(f"{m} (eval {e}, select {s})" for e, m, s in available) or "none"
    if metric is not None:
        if metric not in here and available:
            raise ValueError(f"no record has metric {metric!r} for eval {eval!r}, select {select!r}; "
                             f"available: {listing}")
        return metric
    found = []  # (ok record, its first metric); the first in table order wins (min: no sort of 10,000 records)
    for r in records:
        if r["status"] == "ok":
            first = next((m["metric"] for m in r.get("metrics") or []
                          if m["eval"] == eval and m["select"] == select), None)
            if first is not None:
                found.append((r, first))
    if found:
        return min(found, key=lambda f: _order_key(f[0]))[1]
    if any(r["status"] == "ok" for r in records):
        raise ValueError(f"no ok record has a metric for eval {eval!r}, select {select!r}; available: {listing}")
    task = records[0].get("task")
    if task not in TASK_METRICS:
        raise ValueError(f"no ok record to take the metric from and no main metric known for task {task!r}; "
                         "pass metric=")
    return TASK_METRICS[task]


def _higher_is_better(records: list[dict], metric: str, eval: str) -> bool:
    flags = {bool(m["higher_is_better"]) for r in records
             for m in (r.get("metrics") or []) + (r.get("teacher_metrics") or [])
             if m["metric"] == metric and m["eval"] == eval}
    if len(flags) > 1:
        raise ValueError(f"records disagree on whether higher {metric!r} is better")
    return flags.pop() if flags else True


# ------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """The aggregate of one (row, column): the ok values, what went wrong, Δ, best, reference."""

    row: str
    method: str
    pair: str
    pair_index: int
    domain: str | None = None
    values: list[float] = field(default_factory=list)
    n_runs: int = 0
    bad: Counter = field(default_factory=Counter)  # non-ok status -> count
    first_error: str = ""
    no_metric: int = 0  # ok runs that lack the metric
    ignored: int = 0  # records of another configuration / superseded
    plain: bool = False  # a fixed evaluation (loaded teacher), not a seed aggregate
    ref: tuple[float, str] | None = None
    delta: float | None = None
    teacher_shas: list[str] = field(default_factory=list)  # per ok run: the sha256 of the teacher file it used
    replaced: int = 0  # ok runs trained with another teacher file than the one the teacher row shows
    best: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN below two values."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def where(self) -> str:
        col = self.pair if self.domain is None else f"{self.pair}, {self.domain}"
        return f"{self.row}, {col}"

    def notes(self, metric: str, eval: str, select: str) -> list[str]:
        """Footnote texts for this cell (failures, missing metric, ignored records)."""
        out = []
        if self.bad:
            desc = ", ".join(f"{c} {s}" for s, c in sorted(self.bad.items()))
            n_bad = sum(self.bad.values())
            head = (f"no run finished ok ({desc})" if n_bad == self.n_runs
                    else f"{self.n_runs - n_bad} of {self.n_runs} runs ok ({desc})")
            out.append(f"{self.where}: {head}" + (f"; first error: {self.first_error}" if self.first_error else ""))
        if self.no_metric:
            out.append(f"{self.where}: {self.no_metric} ok run(s) without {metric} (eval {eval}, {select})")
        if self.ignored:
            out.append(f"{self.where}: {self.ignored} record(s) of an older configuration or method version "
                       "ignored")
        if self.replaced:
            out.append(f"{self.where}: {self.replaced} of {self.n} run(s) trained with another teacher file than "
                       "the teacher row's (the teacher was retrained or its file replaced since); "
                       "`kdbench run SUITE --rerun-replaced` reruns them")
        return out


def _fill(cell: Cell, recs: list[dict], eval: str, metric: str, select: str) -> Cell:
    kept, cell.ignored = _current(recs)
    cell.n_runs = len(kept)
    for r in kept:
        if r["status"] != "ok":
            cell.bad[r["status"]] += 1
            cell.first_error = cell.first_error or error_line(r.get("error"))
            continue
        m = _metric_row(r.get("metrics"), eval, metric, select)
        if m is None or not math.isfinite(float(m["value"])):
            cell.no_metric += 1
        else:
            cell.values.append(float(m["value"]))
            cell.teacher_shas.append(str((r.get("teacher") or {}).get("sha256") or ""))
    for r in kept:
        ref = next((x for x in r.get("reference") or [] if x.get("metric") == metric), None)
        if ref is not None:
            cell.ref = (float(ref["value"]), str(ref.get("source") or ""))
            break
    return cell


def _teacher_sha_of_distill(recs: list[dict]) -> str:
    """The teacher file a pair's loaded teacher row shows: the one its newest distillation run loaded."""
    with_sha = [r for r in recs if (r.get("teacher") or {}).get("sha256")]
    return str(max(with_sha, key=_recency)["teacher"]["sha256"]) if with_sha else ""


def _teacher_from_distill(cell: Cell, recs: list[dict], eval: str, metric: str, select: str) -> Cell:
    """Teacher cell from the teacher_metrics distillation runs recorded for the teacher file they loaded: the file
    the newest of them loaded (:func:`_teacher_sha_of_distill`; runs of another file are flagged in their rows).

    A loaded teacher is evaluated once, so ``select`` falls back to "final" when the asked one is absent.
    """
    shown = _teacher_sha_of_distill(recs)
    for r in _order(recs):
        t = r.get("teacher") or {}
        if shown and t.get("sha256") != shown:
            continue
        rows = r.get("teacher_metrics") or []
        m = _metric_row(rows, eval, metric, select) or _metric_row(rows, eval, metric, "final")
        if m is not None and math.isfinite(float(m["value"])):
            cell.values = [float(m["value"])]
            break
    cell.n_runs = len(cell.values)
    cell.plain = True
    return cell


@dataclass
class Group:
    """One column group: a value column, then Δ and ref. columns when shown."""

    pair: str
    pair_index: int
    domain: str | None
    head: str  # header of the value column (markdown: the full header)
    top: str | None = None  # LaTeX spanning header (the pair) when there are several pairs
    sub: str = ""  # LaTeX value header under ``top``
    delta: bool = False
    ref: bool = False


@dataclass
class Grid:
    rows: list[str]
    methods: dict[str, str]
    groups: list[Group]
    cells: dict[tuple[str, int], Cell]  # (row, group index) -> cell
    teacher: bool


def _domain(rec: dict) -> str:
    return str((rec.get("params") or {}).get("domain", NO_DOMAIN))


def _build(records: list[dict], layout: str, eval: str, metric: str, select: str, higher: bool,
           decimals: int) -> Grid:
    distill = [r for r in records if r["kind"] != TEACHER]
    teachers = [r for r in records if r["kind"] == TEACHER]
    pairs: dict[str, int] = {}
    for r in records:
        pairs[r["pair"]] = min(pairs.get(r["pair"], r["pair_index"]), r["pair_index"])
    pair_list = sorted(pairs, key=lambda p: (pairs[p], p))
    multi = len(pair_list) > 1

    # rows and the key of each distill record
    if layout == "auto":
        def row_of(r: dict) -> str:
            return r["label"]
    else:
        clash: dict[tuple, set] = {}
        for r in distill:
            clash.setdefault((r["method"], r["pair"], _domain(r)), set()).add(r["label"])
        bad = {k: v for k, v in clash.items() if len(v) > 1}
        if bad:
            (meth, pair, dom), labels = next(iter(bad.items()))
            raise ValueError(f"layout method_x_domain needs one entry per (method, domain); {meth!r} "
                             f"({dom}) on {pair} has labels {', '.join(sorted(labels))}; use layout='auto'")

        def row_of(r: dict) -> str:
            return r["method"]
    first_index: dict[str, int] = {}
    methods: dict[str, str] = {}
    for r in distill:
        k = row_of(r)
        first_index[k] = min(first_index.get(k, r["method_index"]), r["method_index"])
        methods.setdefault(k, r["method"])
    rows = sorted(first_index, key=lambda k: (first_index[k], k))

    # column groups
    groups: list[Group] = []
    for p in pair_list:
        if layout == "auto":
            groups.append(Group(p, pairs[p], None, head=p if multi else metric, top=p if multi else None, sub=metric))
            continue
        present = {_domain(r) for r in distill if r["pair"] == p}
        if any(r["pair"] == p for r in teachers) or any(r["pair"] == p and r.get("teacher_metrics")
                                                        for r in distill):
            present.add(NO_DOMAIN)
        doms = [d for d in DOMAIN_ORDER if d in present]
        doms += sorted(present - set(DOMAIN_ORDER) - {NO_DOMAIN}) + ([NO_DOMAIN] if NO_DOMAIN in present else [])
        for d in doms:
            groups.append(Group(p, pairs[p], d, head=f"{p} · {d}" if multi else d, top=p if multi else None, sub=d))

    def group_of(r: dict) -> int:
        return next(i for i, g in enumerate(groups)
                    if g.pair == r["pair"] and (g.domain is None or g.domain == _domain(r)))

    cells: dict[tuple[str, int], Cell] = {}
    buckets: dict[tuple[str, int], list[dict]] = {}
    for r in distill:
        buckets.setdefault((row_of(r), group_of(r)), []).append(r)
    for (row, gi), recs in buckets.items():
        g = groups[gi]
        cells[(row, gi)] = _fill(Cell(row, methods[row], g.pair, g.pair_index, g.domain), recs, eval, metric, select)

    # teacher row: suite-trained teacher runs, else the teacher metrics the distillation runs recorded
    has_teacher = False
    for gi, g in enumerate(groups):
        if g.domain not in (None, NO_DOMAIN):
            continue
        cell = Cell(TEACHER, TEACHER, g.pair, g.pair_index, g.domain)
        t_recs = [r for r in teachers if r["pair"] == g.pair]
        if t_recs:
            _fill(cell, t_recs, eval, metric, select)
        else:
            _teacher_from_distill(cell, [r for r in distill if r["pair"] == g.pair], eval, metric, select)
        if cell.n_runs:
            cells[(TEACHER, gi)] = cell
            has_teacher = True

    # runs trained with another teacher file than the one the teacher row shows are flagged in their cells
    for p in pair_list:
        t_recs = [r for r in teachers if r["pair"] == p]
        if t_recs:
            shown = {str((r.get("artifact") or {}).get("sha256") or "") for r in _current(t_recs)[0]
                     if r["status"] == "ok"} - {""}
        else:
            shown = {_teacher_sha_of_distill([r for r in distill if r["pair"] == p])} - {""}
        if not shown:
            continue
        for (row, gi), cell in cells.items():
            if row != TEACHER and cell.pair == p:
                cell.replaced = sum(1 for sha in cell.teacher_shas if sha and sha not in shown)

    # Δ vs the baseline row of the same pair
    base_row = BASELINE if BASELINE in rows else None
    if base_row is None:  # a baseline entry given another label
        named = [k for k in rows if methods[k] == BASELINE]
        base_row = named[0] if len(named) == 1 else None
    if base_row is not None:
        for g in groups:
            g.delta = True
        for (row, gi), cell in cells.items():
            if row in (TEACHER, base_row) or not cell.n:
                continue
            base = [c for (r2, g2), c in cells.items() if r2 == base_row and groups[g2].pair == cell.pair and c.n]
            if base:
                cell.delta = cell.mean - base[0].mean

    # best mean per column (teacher excluded), at the displayed precision
    for gi, g in enumerate(groups):
        cand = [c for (row, g2), c in cells.items() if g2 == gi and row != TEACHER and c.n]
        if len(cand) > 1:
            key = [round(c.mean, decimals) for c in cand]
            top = max(key) if higher else min(key)
            for c, k in zip(cand, key):
                c.best = k == top
        g.ref = any(c.ref is not None for (row, g2), c in cells.items() if g2 == gi)
    return Grid(rows=([TEACHER] if has_teacher else []) + rows, methods={TEACHER: TEACHER, **methods},
                groups=groups, cells=cells, teacher=has_teacher)


# ------------------------------------------------------------------------------------------- rendering
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\rightarrow$",
        "±": r"$\pm$", "×": r"$\times$", "Δ": r"$\Delta$", "—": "---", "–": "--", "−": r"$-$",
        "·": r"$\cdot$", "…": r"\ldots{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ % & $ # { } ~ ^ \\``) and map the few unicode symbols tables use."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _num(x: float, decimals: int, fmt: str, signed: bool = False) -> str:
    s = f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"
    if s.lstrip("+-").strip("0.") == "":  # "-0.00" -> "+0.00" / "0.00"
        s = ("+" if signed else "") + s.lstrip("+-")
    return "$-$" + s[1:] if fmt == "latex" and s.startswith("-") else s


def _ref_num(x: float, fmt: str) -> str:
    s = f"{x:g}"
    return "$-$" + s[1:] if fmt == "latex" and s.startswith("-") else s


class _Notes:
    """Numbered footnotes in reading order; identical texts share a number."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        i = self.texts.index(text) + 1
        return f"[^{i}]" if self.fmt == "md" else f"$^{{{i}}}$"


def _value_text(cell: Cell | None, decimals: int, fmt: str, marks: str) -> str:
    if cell is None or cell.n_runs == 0:
        return marks
    if not cell.n:
        return ("—" if fmt == "md" else "---") + marks
    core = _num(cell.mean, decimals, fmt)
    if cell.n > 1:
        core += (" ± " if fmt == "md" else r" $\pm$ ") + _num(cell.std, decimals, fmt)
    if cell.best:
        core = f"**{core}**" if fmt == "md" else rf"\textbf{{{core}}}"
    return core + ("" if cell.plain else f" (n={cell.n})") + marks


def _matrix(grid: Grid, metric: str, eval: str, select: str, decimals: int, fmt: str) -> tuple[list, list]:
    """Body rows as strings and the footnote texts, for md and latex."""
    notes = _Notes(fmt)
    body = []
    for row in grid.rows:
        line = [row if fmt == "md" else latex_escape(row)]
        for gi, g in enumerate(grid.groups):
            cell = grid.cells.get((row, gi))
            marks = "".join(notes.mark(t) for t in (cell.notes(metric, eval, select) if cell else []))
            line.append(_value_text(cell, decimals, fmt, marks))
            if g.delta:
                line.append("" if cell is None or cell.delta is None else _num(cell.delta, decimals, fmt, True))
            if g.ref:
                ref = cell.ref if cell is not None else None
                line.append("" if ref is None else _ref_num(ref[0], fmt)
                            + (notes.mark(f"ref.: {ref[1]}") if ref[1] else ""))
        body.append(line)
    return body, notes.texts


def _legend(suite: str, version: Any, grid: Grid, metric: str, eval: str, select: str, higher: bool) -> str:
    pairs = {g.pair for g in grid.groups}
    parts = [f"{suite} v{version}: {metric} (eval {eval}, {select} epoch; "
             f"{'higher' if higher else 'lower'} is better)" + (f" on {next(iter(pairs))}" if len(pairs) == 1 else "")
             + ".",
             "Cells: mean ± std over seeds (sample std), n = runs that finished ok."]
    if grid.teacher:
        parts.append("Teacher: the suite's teacher runs, or the loaded teacher evaluated once (no n).")
    if any(g.delta for g in grid.groups):
        parts.append("Δ: mean − baseline mean, same pair.")
    parts.append("Bold: best mean per column (teacher excluded).")
    if any(g.ref for g in grid.groups):
        parts.append("ref.: published value.")
    return " ".join(parts)


def _markdown(grid: Grid, legend: str, metric: str, eval: str, select: str, decimals: int) -> str:
    from tabulate import tabulate

    headers = ["Method"]
    for g in grid.groups:
        headers += [g.head] + (["Δ"] if g.delta else []) + (["ref."] if g.ref else [])
    body, notes = _matrix(grid, metric, eval, select, decimals, "md")
    table = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(headers) - 1))
    out = [table, "", legend]
    if notes:
        out += [""] + [f"[^{i}]: {t}" for i, t in enumerate(notes, 1)]
    return "\n".join(out)


def _latex(grid: Grid, legend: str, metric: str, eval: str, select: str, decimals: int) -> str:
    widths = [1 + g.delta + g.ref for g in grid.groups]
    ncol = 1 + sum(widths)
    body, notes = _matrix(grid, metric, eval, select, decimals, "latex")
    lines = [f"% {latex_escape(legend)}".replace("\n", " "),
             r"\begin{tabular}{l" + " ".join("r" * w for w in widths) + "}", r"\toprule"]
    if any(g.top for g in grid.groups):  # spanning pair headers over their sub-columns
        spans: list[list] = []
        col = 2
        for g, w in zip(grid.groups, widths):
            if spans and spans[-1][0] == g.top:
                spans[-1][2] += w
            else:
                spans.append([g.top, col, w])
            col += w
        lines.append(" & ".join([""] + [rf"\multicolumn{{{w}}}{{c}}{{{latex_escape(t)}}}" for t, _, w in spans])
                     + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{c}-{c + w - 1}}}" for _, c, w in spans))
    head = ["Method"]
    for g in grid.groups:
        head += [latex_escape(g.sub if g.top else g.head)] + ([r"$\Delta$"] if g.delta else []) + \
                (["ref."] if g.ref else [])
    lines += [" & ".join(head) + r" \\", r"\midrule"]
    for i, line in enumerate(body):
        lines.append(" & ".join(line) + r" \\")
        if grid.teacher and i == 0 and len(body) > 1:
            lines.append(r"\midrule")
    lines.append(r"\bottomrule")
    for i, t in enumerate(notes, 1):
        lines.append(rf"\multicolumn{{{ncol}}}{{l}}{{\footnotesize $^{{{i}}}$ {latex_escape(t)}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def _r(x: float) -> float:
    """CSV precision: 6 decimals, enough for any metric and free of float noise (74.19999999999999)."""
    return round(x, 6)


def _csv_text(rows: list[dict], columns: list[str] | tuple[str, ...]) -> str:
    """``pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\\n").rstrip("\\n")``, the same
    text without importing pandas (a third of a `kdbench table --format csv`); values of other types than
    str, float, bool and 64-bit int are left to pandas itself.

    A column is written as pandas types it: all numbers (bool aside) with a float or a missing value among them
    -> float64 (``repr`` of the float, missing as ""), all ints -> int64, anything else -> object (``str``,
    missing as ""); the csv module quotes as pandas' writer does (it is the same module, same dialect).
    """
    import csv
    import io

    def missing(v: Any) -> bool:
        return v is None or (type(v) is float and v != v)

    cols = []
    for c in columns:
        vals = [r.get(c) for r in rows]
        present = [v for v in vals if not missing(v)]
        if any(type(v) not in (str, float, bool, int) or (type(v) is int and not -2**63 <= v < 2**63)
               for v in present):  # numpy scalars, huge ints, containers: pandas' own inference decides
            import pandas as pd

            return pd.DataFrame(rows, columns=list(columns)).to_csv(index=False, lineterminator="\n").rstrip("\n")
        if present and all(type(v) in (int, float) for v in present) and \
                (len(present) < len(vals) or any(type(v) is float for v in present)):
            cols.append(["" if missing(v) else repr(float(v)) for v in vals])
        else:
            cols.append(["" if missing(v) else str(v) for v in vals])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*cols))
    return buf.getvalue().rstrip("\n")


def _csv(grid: Grid, suite: str, version: Any, metric: str, eval: str, select: str, higher: bool,
         layout: str) -> str:
    rows = []
    for row in grid.rows:
        for gi, g in enumerate(grid.groups):
            cell = grid.cells.get((row, gi))
            if cell is None:
                continue
            rows.append({
                "suite": suite, "suite_version": version, "eval": eval, "metric": metric, "select": select,
                "higher_is_better": higher, "row": row, "method": grid.methods.get(row, row), "pair": g.pair,
                "pair_index": g.pair_index, "domain": g.domain if layout != "auto" else "",
                "mean": _r(cell.mean) if cell.n else None, "std": _r(cell.std) if cell.n > 1 else None,
                "n": cell.n, "n_runs": cell.n_runs, "delta": None if cell.delta is None else _r(cell.delta),
                "best": cell.best,
                "reference": cell.ref[0] if cell.ref else None, "reference_source": cell.ref[1] if cell.ref else "",
                "note": " | ".join(cell.notes(metric, eval, select)),
            })
    return _csv_text(rows, CSV_COLUMNS)


# ------------------------------------------------------------------------------------------- public
def make_table(suite_dir: str | os.PathLike, metric: str | None = None, select: str = "final", eval: str = "val",
               fmt: str = "md", suite_version: int | None = None, layout: str = "auto", *,
               decimals: int = 2, reference: str = BASELINE) -> str:
    """The paper table of the records under ``suite_dir`` (``<results>/<suite>``), as a string.

    ``metric``: defaults to the first metric of the first ok record (top1 / AP / mIoU). ``select``: "final"
    or "best" epoch. ``eval``: evaluation name. ``fmt``: "md" (pipe table, legend and footnotes below),
    "latex" (booktabs tabular, footnotes as its last rows) or "csv" (one row per method × pair with mean, std,
    n, delta, best; 6 decimals). ``suite_version``: the version to tabulate; records of several versions
    without it are refused. ``layout``: "auto" (rows = labels, columns = pairs) or "method_x_domain"
    (rows = method names, columns = ``params["domain"]`` values per pair; methods without a ``domain``
    parameter, the teacher included, go to an "other" column), "robustness" (:func:`robustness_table`;
    ``reference``: the row whose errors normalise the CE of classification suites) or "cost"
    (:func:`cost_table`). ``decimals``: displayed precision.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECTS)}")
    with gc_paused():  # 10,000 records are millions of live containers: a collection pass costs ~0.1 s each
        return _make_table(Path(suite_dir), metric, select, eval, fmt, suite_version, layout, decimals, reference)


def _make_table(suite_dir: Path, metric: str | None, select: str, eval: str, fmt: str, suite_version: int | None,
                layout: str, decimals: int, reference: str) -> str:
    kinds = TABLE_KINDS + ((EVAL_KIND,) if layout == "robustness" else ())
    records = _one_version(_load(suite_dir, kinds), suite_dir, suite_version)
    if layout == "robustness":
        return robustness_table(records, fmt, metric=metric, reference=reference, decimals=decimals)
    if layout == "cost":
        return cost_table(records, fmt, decimals=decimals)
    metric = _choose_metric(records, metric, eval, select)
    higher = _higher_is_better(records, metric, eval)
    grid = _build(records, layout, eval, metric, select, higher, decimals)
    suite, version = records[0]["suite"], records[0]["suite_version"]
    if fmt == "csv":
        return _csv(grid, suite, version, metric, eval, select, higher, layout)
    legend = _legend(suite, version, grid, metric, eval, select, higher)
    if fmt == "md":
        return _markdown(grid, legend, metric, eval, select, decimals)
    return _latex(grid, legend, metric, eval, select, decimals)


def _simple_table(rows: list[list], headers: list[str]) -> str:
    """``tabulate(rows, headers, tablefmt="simple", disable_numparse=True)``, the same text, ~10x faster.

    tabulate spends most of a 10,000-run status table on per-cell type sniffing and width measuring. For
    one-line printable cells (what status shows) the layout is simple: None -> "", cells stripped, every
    column left-aligned, as wide as its widest cell and at least its header + 2, columns joined by two spaces,
    a dashed rule under the header, lines right-stripped. Anything else (line breaks, control or ANSI codes,
    "True"/"False" cells that tabulate types as bool) goes to tabulate itself.
    """
    from tabulate import tabulate

    def slow() -> str:
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    import tabulate as tabulate_module

    # tabulate measures display width with wcwidth when it is installed (CJK characters take two columns)
    use_wcwidth = tabulate_module.wcwidth is not None and tabulate_module.WIDE_CHARS_MODE
    measure = tabulate_module.wcwidth.wcswidth if use_wcwidth else len
    known: dict[str, int] = {}  # non-ASCII texts repeat (pair names with "→"): measure each once

    def wide(c: str) -> int:
        n = known.get(c)
        if n is None:
            n = known[c] = measure(c)
        return n
    texts = [["" if c is None else str(c).strip() for c in row] for row in rows]
    ncol = len(headers)
    widths = [len(h) + 2 for h in headers]
    for row in texts:
        if len(row) != ncol:
            return slow()
        for i, c in enumerate(row):
            if not c.isascii() or not c.isprintable() or c in ("True", "False"):
                if not c.isprintable() or c in ("True", "False") or wide(c) < 0:
                    return slow()
            n = len(c) if c.isascii() else wide(c)
            if n > widths[i]:
                widths[i] = n
    if any(not h.isascii() or not h.isprintable() for h in headers):
        return slow()

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - (len(c) if c.isascii() else wide(c))) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(row) for row in texts])


def status_table(suite_dir: str | os.PathLike, jobs: dict[str, dict] | None = None, tail: int = 0) -> str:
    """State of every run folder of a suite: run id (short), version, label, pair, seed, status, error line.

    A folder without a record yet (running, or killed before writing one) shows "no record" (label/pair/seed
    from its ``spec.json``); an unreadable record shows "corrupt" with the reason. A summary line ends it.

    ``jobs`` (``kdbench.slurm.job_states``: run id -> the latest SLURM submission, with a ``status`` of
    pending / running / completed / cancelled / timeout / failed / unknown) adds a "job" column and lets the
    scheduler speak where the record cannot: a run whose job is pending or running shows that (unless this
    very job already wrote its record); a job that ended without writing a record (cancelled, time limit,
    killed) shows the job's state and error. A record written by the job, or after it was submitted, wins.
    ``tail``: below the table, the last ``tail`` lines of the error of every run that is not ok.
    """
    suite_dir = Path(suite_dir)
    jobs = jobs or {}
    dirs = {d.name: d for d in run_dirs(suite_dir)}
    if not dirs and not jobs:
        raise no_records_error(suite_dir)
    read: dict[str, dict | RecordError | None] = {}
    for name, d in dirs.items():
        try:
            read[name] = read_record(d)
        except RecordError as e:
            read[name] = e
    suites = Counter(r["suite"] for r in read.values() if isinstance(r, dict))
    own = suite_dir.name if suite_dir.name in suites or not suites else suites.most_common(1)[0][0]
    rows = []
    for name in sorted(set(dirs) | set(jobs)):
        d = dirs.get(name)
        rec, status, err, full = None, "no record", "", ""
        got = read.get(name)
        if isinstance(got, RecordError):
            status, full = "corrupt", str(got)
        elif got is not None and got["suite"] != own:  # copied or moved here from another suite's folder
            status, full = "foreign", (f"{d / 'record.json'}: a record of suite {got['suite']!r}, not of {own!r}: "
                                       "copied or moved here; move it to its own suite's folder or delete it")
        elif got is not None:
            rec = got
            status, full = rec["status"], rec.get("error") or ""
        job = jobs.get(name)
        job_cell = ""
        if job:
            sched = (rec.get("scheduler") or {}) if rec else {}
            mine = rec is not None and str(sched.get("job_id")) == str(job.get("job_id"))
            newer = rec is not None and str(rec.get("finished_at") or "") >= str(job.get("submitted_at") or "~")
            requeues = sched.get("requeues") if mine else None
            job_cell = str(job.get("job_id", "")) + (f" (requeued {requeues}x)" if requeues else "")
            if job.get("status") in ("pending", "running") and not mine:
                status, full = job["status"], ""
            elif job.get("status") in ("cancelled", "timeout", "failed") and not (mine or newer):
                status, full = job["status"], job.get("error") or ""
        err = error_line(full, 100)
        info = rec if rec is not None else (got if isinstance(got, dict) else None)
        if info is None:
            try:
                info = json.loads((d / "spec.json").read_text()) if d is not None else dict(job or {})
            except (OSError, ValueError):
                info = dict(job or {})
        cells = [name[:8], info.get("suite_version", ""), info.get("label", ""), info.get("pair", ""),
                 info.get("seed", ""), status] + ([job_cell] if jobs else []) + [err]
        rows.append({"key": (str(info.get("suite_version", "")), info.get("pair_index", 0),
                             info.get("kind") != TEACHER, info.get("method_index", 0), _seed_key(info.get("seed")),
                             name),
                     "cells": cells, "full": full if status != "ok" else "", "status": status})
    rows.sort(key=lambda r: r["key"])
    headers = ["run", "v", "label", "pair", "seed", "status"] + (["job"] if jobs else []) + ["error"]
    table = _simple_table([r["cells"] for r in rows], headers)
    tails = []
    if tail > 0:
        for r in rows:
            lines = [ln for ln in str(r["full"]).rstrip().splitlines() if ln.strip()]
            if lines:
                c = r["cells"]
                tails.append(f"- {c[0]} {c[2]} {c[3]} seed {c[4]} ({r['status']}):")
                tails += ["    " + ln for ln in lines[-tail:]]
    counts = Counter(r["status"] for r in rows)
    order = ["ok", "running", "pending", "failed", "diverged", "timeout", "cancelled", "corrupt", "foreign",
             "no record"]
    summary = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: (order.index(s)
                                                                                   if s in order else 99, s)))
    middle = ("\n\nerrors (last lines):\n" + "\n".join(tails)) if tails else ""
    return f"{table}{middle}\n\n{len(rows)} run(s) in {suite_dir / 'runs'}: {summary}"


__all__ = ["make_table", "robustness_table", "cost_table", "status_table", "latex_escape", "Cell", "FORMATS",
           "LAYOUTS", "TASK_METRICS"]


# ------------------------------------------------------------------------------------------- robustness layout
EVAL_KIND = "eval"
CORRUPTION_EVAL = "corruptions"
ROBUST_FAMILIES = ("noise", "blur", "weather", "digital")


@dataclass
class _Col:
    key: str  # summary key (robustness.performance_summary / error_summary) or cost field
    head: str
    higher: bool | None  # None: not ranked
    delta: bool = False
    ref: bool = False
    kind: str = "num"  # num | ratio (×) | int


def _stat(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def _newest(recs: list[dict]) -> dict:
    return max(recs, key=_recency)


def _model_records(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """ok teacher/distill records per (label, pair), newest configuration, one per seed."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["kind"] in (TEACHER, "distill"):
            out.setdefault((r["label"], r["pair"]), []).append(r)
    return {k: [r for r in _current(v)[0] if r["status"] == "ok"] for k, v in out.items()}


def _eval_problem(r: dict, models: dict[str, dict], loaded: dict[str, str], metric: str) -> str | None:
    """Why an ok eval record must not be shown, else None: it measured another file than the evaluated model's
    current one (a model retrained in its folder, a checkpoint replaced: ``student.sha256`` against the model
    record's ``artifact``, or for a loaded teacher the file its pair's newest distillation run loaded), or it lacks
    ``metric`` at one of its chunk's severities (an unreadable cell)."""
    had = (r.get("student") or {}).get("sha256")
    target = models.get(str(r.get("target")))
    now = ((target.get("artifact") or {}).get("sha256") if target is not None
           else loaded.get(str(r.get("pair"))))
    if now and had != now:
        return "replaced"
    chunk = r.get("eval") if isinstance(r.get("eval"), dict) else {}
    want = {(str(chunk["corruption"]), int(s)) for s in chunk.get("severities") or []} if chunk.get("corruption") \
        else set()
    have = {(str(m.get("corruption")), m.get("severity")) for m in r.get("metrics") or []
            if m.get("eval") == CORRUPTION_EVAL and m.get("metric") == metric and m.get("value") is not None
            and math.isfinite(float(m["value"]))}
    return "incomplete" if want - have else None


def _shown_evals(records: list[dict], metric: str) -> tuple[list[dict], Counter]:
    """The ok eval records a robustness table may show (:func:`_eval_problem`), oldest first, and per pair the
    count of those left out."""
    models = {str(r.get("run_id")): r for r in records if r["kind"] in (TEACHER, "distill")}
    loaded = {}
    for p in {r["pair"] for r in records}:
        sha = _teacher_sha_of_distill([r for r in records if r["pair"] == p and r["kind"] == "distill"])
        if sha:
            loaded[p] = sha
    shown, left = [], Counter()
    for r in sorted((r for r in records if r["kind"] == EVAL_KIND and r["status"] == "ok"), key=_recency):
        if _eval_problem(r, models, loaded, metric):
            left[r["pair"]] += 1
        else:
            shown.append(r)
    return shown, left


def _corruption_grids(records: list[dict], metric: str) -> tuple[dict[str, dict], dict[tuple, dict]]:
    """Per target run_id: ``{(corruption, severity): value}`` from the ok eval records of the model's current file
    (:func:`_shown_evals`; newest wins per cell); and per (label, pair, seed) of eval records whose target has no
    record here (a loaded teacher) the same grid."""
    by_target: dict[str, dict] = {}
    orphan_key: dict[str, tuple] = {}
    for r in _shown_evals(records, metric)[0]:
        g = by_target.setdefault(str(r.get("target")), {})
        orphan_key[str(r.get("target"))] = (r["label"], r["pair"], r.get("seed"))
        for m in r.get("metrics") or []:
            if m.get("eval") == CORRUPTION_EVAL and m.get("metric") == metric and m.get("select", "final") == "final":
                v = float(m["value"])
                if math.isfinite(v):
                    g[(str(m["corruption"]), int(m["severity"]))] = v
    return by_target, {orphan_key[t]: g for t, g in by_target.items()}


@dataclass
class _RowStats:
    label: str
    method: str
    per_seed: list[dict] = field(default_factory=list)  # summary dicts
    cells: list[int] = field(default_factory=list)  # grid sizes
    ref: float | None = None
    ref_source: str = ""


def robustness_entries(records: list[dict], pair: str, metric: str) -> list[tuple[str, str, list[tuple[float, dict]]]]:
    """The models of ``pair`` that have corruption results: ``(label, method, [(clean value, grid)] per seed)``
    in table order (teacher first), ``grid`` = ``{(corruption, severity): value}`` of ``metric``."""
    models = {k: v for k, v in _model_records(records).items() if k[1] == pair}
    grids, orphans = _corruption_grids(records, metric)
    entries: list[tuple[str, str, int, list[tuple[float, dict]]]] = []
    labels = {lab for (lab, p) in models} | {lab for (lab, p, _) in orphans if p == pair}
    for lab in labels:
        recs = models.get((lab, pair), [])
        items = []
        for r in recs:
            m = _metric_row(r.get("metrics"), "val", metric, "final")
            g = grids.get(r["run_id"])
            if m is not None and g:
                items.append((float(m["value"]), g))
        if lab == TEACHER and not recs:  # a loaded teacher: clean value from the distillation runs
            clean = None
            for r in _order([r for r in records if r["pair"] == pair and r["kind"] == "distill"]):
                m = _metric_row(r.get("teacher_metrics"), "val", metric, "final")
                if m is not None:
                    clean = float(m["value"])
                    break
            for (l2, p2, _), g in orphans.items():
                if l2 == TEACHER and p2 == pair and clean is not None and g:
                    items.append((clean, g))
        if items:
            method = recs[0]["method"] if recs else (TEACHER if lab == TEACHER else lab)
            index = -1 if lab == TEACHER else min((r.get("method_index", 0) for r in recs), default=0)
            entries.append((lab, method, index, items))
    entries.sort(key=lambda e: (e[2], e[0]))
    return [(lab, method, items) for lab, method, _, items in entries]


def _robustness_rows(records: list[dict], pair: str, metric: str, classification: bool, reference: str
                     ) -> tuple[list[_RowStats], list[str]]:
    from kdbench import robustness as RB

    models = {k: v for k, v in _model_records(records).items() if k[1] == pair}
    notes: list[str] = []
    entries = [(lab, method, 0, items) for lab, method, items in robustness_entries(records, pair, metric)]
    ref_clean = ref_grid = None
    if classification:
        ref = next((e for e in entries if e[0] == reference), None)
        if ref is None:
            notes.append(f"{pair}: no corruption results of the reference {reference!r}: mCE needs them")
        else:
            ref_clean = statistics.fmean(c for c, _ in ref[3])
            keys = set.intersection(*(set(g) for _, g in ref[3]))
            ref_grid = {k: statistics.fmean(g[k] for _, g in ref[3]) for k in keys}
    rows = []
    for lab, method, _, items in entries:
        st = _RowStats(lab, method)
        for clean, g in items:
            if classification:
                s = {"clean": clean, **(RB.error_summary(clean, g, ref_clean, ref_grid) if ref_grid else {})}
            else:
                s = RB.performance_summary(clean, g)
                s["clean"] = s.pop("P")
            st.per_seed.append(s)
            st.cells.append(sum(1 for c, _ in g if c in RB.BENCHMARK))
        for r in models.get((lab, pair), []):
            refs = {x.get("metric"): x for x in r.get("reference") or []}
            x = refs.get("mCE" if classification else "mPC")
            if x is not None:
                st.ref, st.ref_source = float(x["value"]), str(x.get("source") or "")
                break
        rows.append(st)
    left = _shown_evals(records, metric)[1].get(pair, 0)
    if left:
        notes.append(f"{pair}: {left} eval record(s) left out: measured on a model file since replaced, or missing "
                     f"{metric} at a severity; `kdbench robustness` (or `kdbench run`) redoes them")
    most = max((c for st in rows for c in st.cells), default=0)
    for st in rows:
        short = [c for c in st.cells if c < most]
        if short:
            notes.append(f"{st.label}, {pair}: {len(short)} model(s) with {min(short)} of {most} benchmark "
                         "corrupted sets evaluated (sweep not finished)")
    return rows, notes


def _corruption_source(records: list[dict], pair: str, metric: str, classification: bool) -> str:
    """Where the corrupted images of the cells ``pair``'s table shows come from
    (:func:`kdbench.robustness.record_source`), as a caption sentence: generated (ImageNet-C strengths; on CIFAR
    not the released CIFAR-100-C), released files at their folder, or both (flagged as mixed). Only the cells the
    table reads count: the newest ok eval record per (evaluated model, corruption, severity), of the pair's current
    models or of a loaded teacher (a target without a record), as :func:`_corruption_grids` picks them."""
    from kdbench import robustness as RB

    current = {r["run_id"] for (_, p), recs in _model_records(records).items() if p == pair for r in recs}
    known = {r.get("run_id") for r in records}
    shown: dict[tuple, tuple[str, str | None, str]] = {}  # (target, corruption, severity) -> (source, root, data)
    for r in _shown_evals(records, metric)[0]:
        target = str(r.get("target"))
        if target not in current and (target in known or r["pair"] != pair):
            continue
        src, root = RB.record_source(r)
        for m in r.get("metrics") or []:
            if m.get("eval") == CORRUPTION_EVAL and m.get("metric") == metric and m.get("select", "final") == "final":
                shown[(target, str(m["corruption"]), int(m["severity"]))] = (
                    src, root, str((r.get("data") or {}).get("name") or ""))
    generated, roots, data = False, set(), set()
    for src, root, name in shown.values():
        if src == "released":
            roots.add(root or "a folder not recorded")
        else:
            generated = True
            data.add(name)
    parts = []
    if generated:
        parts.append(RB.SOURCES["generated"] + (
            ", a CIFAR-100-C-style set, not Hendrycks' released CIFAR-100-C: not comparable with published "
            "CIFAR-100-C numbers" if classification and any(d.startswith("cifar") for d in data) else ""))
    if roots:
        parts.append(f"{RB.SOURCES['released']} at {', '.join(sorted(roots))}")
    if len(parts) > 1:
        return "Corrupted images from MIXED sources, not comparable with each other: " + "; ".join(parts) + "."
    return f"Corrupted images: {parts[0]}." if parts else ""


def _robust_cols(classification: bool, metric: str, rows: list[_RowStats], higher: bool) -> list[_Col]:
    has_extra = any(math.isfinite(s.get("extra", math.nan)) for st in rows for s in st.per_seed)
    has_ref = any(st.ref is not None for st in rows)
    if classification:
        cols = [_Col("clean", f"clean {metric}", higher), _Col("mCE", "mCE", False, delta=True, ref=has_ref),
                _Col("rel_mCE", "rel. mCE", False)]
        cols += [_Col(f, f"CE {f}", False) for f in ROBUST_FAMILIES]
        return cols + ([_Col("extra", "CE extra", False)] if has_extra else [])
    cols = [_Col("clean", f"clean {metric}", higher), _Col("mPC", "mPC", higher, delta=True, ref=has_ref),
            _Col("rPC", "rPC", True, kind="ratio")]
    cols += [_Col(f, f, higher) for f in ROBUST_FAMILIES]
    return cols + ([_Col("extra", "extra", higher)] if has_extra else [])


def _fmt_stat(mean: float, std: float, n: int, decimals: int, fmt: str, bold: bool) -> str:
    if not n:
        return "—" if fmt == "md" else "---"
    core = _num(mean, decimals, fmt)
    if n > 1 and math.isfinite(std):
        core += (" ± " if fmt == "md" else r" $\pm$ ") + _num(std, decimals, fmt)
    if bold:
        core = f"**{core}**" if fmt == "md" else rf"\textbf{{{core}}}"
    return core


def _summary_grid(rows: list[_RowStats], cols: list[_Col], decimals: int, baseline: str
                  ) -> dict[tuple[str, str], dict]:
    """(label, column key) -> mean, std, n, delta, best."""
    out: dict[tuple[str, str], dict] = {}
    for st in rows:
        for c in cols:
            mean, std, n = _stat([s.get(c.key, math.nan) for s in st.per_seed])
            if c.kind == "ratio":
                mean, std = 100 * mean, 100 * std  # rPC in %
            out[(st.label, c.key)] = {"mean": mean, "std": std, "n": n, "delta": None, "best": False}
    base = next((st.label for st in rows if st.label == baseline), None) or \
        next((st.label for st in rows if st.method == BASELINE), None)
    for c in cols:
        if c.delta and base is not None and out[(base, c.key)]["n"]:
            for st in rows:
                cell = out[(st.label, c.key)]
                if st.label not in (base, TEACHER) and cell["n"]:
                    cell["delta"] = cell["mean"] - out[(base, c.key)]["mean"]
        cand = [out[(st.label, c.key)] for st in rows if st.label != TEACHER and out[(st.label, c.key)]["n"]]
        if c.higher is not None and len(cand) > 1:
            keys = [round(x["mean"], decimals) for x in cand]
            top = max(keys) if c.higher else min(keys)
            for x, k in zip(cand, keys):
                x["best"] = k == top
    return out


def robustness_table(records: list[dict], fmt: str = "md", *, metric: str | None = None, reference: str = BASELINE,
                     decimals: int = 2) -> str:
    """The corruption-robustness table of one suite version's records (``layout="robustness"``).

    Rows: the methods of each pair (teacher and baseline included) that have corruption results (eval records,
    ``kind: "eval"``, whose ``target`` is the model's run). Detection/segmentation: clean value P of the target
    run, mPC (mean over the 15 benchmark corruptions × severities), its Δ vs the baseline, rPC = mPC / P (in %),
    the mean per family (noise, blur, weather, digital) and the extra corruptions apart. Classification: clean
    top-1, mCE and relative mCE (Hendrycks & Dietterich) with the ``reference`` row's errors (mean over its
    seeds) as the normaliser, the mean CE per family. Cells: mean ± std over seeds; bold: best per column
    (teacher excluded). The caption (csv: column ``corruption_source``) says where the corrupted images come
    from, read from the eval records: generated by the engine (ImageNet-C strengths; on CIFAR-100 not the
    released CIFAR-100-C), released files at their folder, or mixed. ``fmt``: md, latex or csv."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    task = records[0].get("task")
    metric = metric or TASK_METRICS.get(task)
    if metric is None:
        raise ValueError(f"no main metric known for task {task!r}; pass metric=")
    if not any(r["kind"] == EVAL_KIND for r in records):
        raise ValueError("no corruption results in these records (no eval record): run the robustness sweep first")
    classification = task == "classification"
    higher = _higher_is_better([r for r in records if r["kind"] != EVAL_KIND], metric, "val")
    pairs = sorted({r["pair"] for r in records}, key=lambda p: (min(r["pair_index"] for r in records
                                                                    if r["pair"] == p), p))
    suite, version = records[0]["suite"], records[0]["suite_version"]
    blocks, csv_rows = [], []
    for pair in pairs:
        rows, notes = _robustness_rows(records, pair, metric, classification, reference)
        if not rows:
            continue
        cols = _robust_cols(classification, metric, rows, higher)
        grid = _summary_grid(rows, cols, decimals, reference if classification else BASELINE)
        caption = (f"{suite} v{version}, {pair}: corruption robustness ("
                   + ("CE normalised by " + reference + ", the reference model, its errors averaged over its "
                      "seeds; mCE, rel. mCE and CE per family in %, lower is better" if classification else
                      f"mPC = mean {metric} over 15 corruptions × severities, rPC = mPC / clean in %; families: "
                      f"mean {metric}")
                   + "; extra corruptions apart). Cells: mean ± std over seeds; Δ vs baseline; bold: best "
                   "(teacher excluded).")
        source = _corruption_source(records, pair, metric, classification)
        caption += f" {source}" if source else ""
        if fmt == "csv":
            for st in rows:
                for c in cols:
                    g = grid[(st.label, c.key)]
                    csv_rows.append({"suite": suite, "suite_version": version, "pair": pair, "row": st.label,
                                     "method": st.method, "column": c.key,
                                     "mean": _r(g["mean"]) if g["n"] else None,
                                     "std": _r(g["std"]) if g["n"] > 1 else None, "n": g["n"],
                                     "delta": None if g["delta"] is None else _r(g["delta"]), "best": g["best"],
                                     "reference": st.ref if c.ref else None,
                                     "reference_source": st.ref_source if c.ref else "",
                                     "reference_model": reference if classification else "",
                                     "corruption_source": source})
            continue
        headers = ["Method"]
        for c in cols:
            headers += [c.head] + (["Δ"] if c.delta else []) + (["ref."] if c.ref else [])
        headers.append("n")
        body = []
        for st in rows:
            line = [st.label if fmt == "md" else latex_escape(st.label)]
            for c in cols:
                g = grid[(st.label, c.key)]
                line.append(_fmt_stat(g["mean"], g["std"], g["n"], decimals, fmt, g["best"]))
                if c.delta:
                    line.append("" if g["delta"] is None else _num(g["delta"], decimals, fmt, True))
                if c.ref:
                    line.append("" if st.ref is None else _ref_num(st.ref, fmt))
            line.append(str(len(st.per_seed)))
            body.append(line)
        if fmt == "md":
            from tabulate import tabulate

            text = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                            colalign=("left",) + ("right",) * (len(headers) - 1))
            extra = [f"- {n}" for n in notes] + [f"- ref. ({st.label}): {st.ref_source}" for st in rows
                                                  if st.ref is not None and st.ref_source]
            blocks.append("\n".join([text, "", caption] + (["", *extra] if extra else [])))
        else:
            lines = [f"% {latex_escape(caption)}", r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule",
                     " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
            lines += [" & ".join(line) + r" \\" for line in body]
            lines.append(r"\bottomrule")
            for n in notes:
                lines.append(rf"\multicolumn{{{len(headers)}}}{{l}}{{\footnotesize {latex_escape(n)}}} \\")
            lines.append(r"\end{tabular}")
            blocks.append("\n".join(lines))
    if fmt == "csv":
        cols_csv = ["suite", "suite_version", "pair", "row", "method", "column", "mean", "std", "n", "delta", "best",
                    "reference", "reference_source", "reference_model", "corruption_source"]
        return _csv_text(csv_rows, cols_csv)
    if not blocks:
        raise ValueError("no model has both a clean result and corruption results")
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------- cost layout
FLOOR_NOTE = ("× floor: step time / (baseline step + teacher forward per step, cost.teacher_forward_s); "
              "\"—\" where the runs did not record the teacher's forward time")


def cost_table(records: list[dict], fmt: str = "md", *, decimals: int = 2) -> str:
    """What each method costs (``layout="cost"``), per pair: mean over the ok seeds of the training step time
    (ms), that step relative to the baseline's step and to the floor (teacher forward + student step: the
    baseline's step plus ``cost.teacher_forward_s`` when the records hold it), the method's extra parameters,
    peak memory (MB) and wall time (s). Teacher runs are listed for reference, without ratios."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    suite, version = records[0]["suite"], records[0]["suite_version"]
    models = _model_records(records)
    pairs = sorted({p for _, p in models}, key=lambda p: (min(r["pair_index"] for r in records if r["pair"] == p),
                                                          p))
    fields = [("step_ms", "step (ms)"), ("x_baseline", "× baseline"), ("x_floor", "× floor"),
              ("extra_params", "extra params"), ("peak_mem_mb", "peak mem (MB)"), ("wall_time_s", "wall (s)")]
    blocks, csv_rows = [], []
    for pair in pairs:
        entries = [(lab, recs) for (lab, p), recs in models.items() if p == pair and recs]
        entries.sort(key=lambda e: (e[0] != TEACHER, min(r.get("method_index", 0) for r in e[1]), e[0]))

        def mean_of(recs, key):
            return _stat([float((r.get("cost") or {}).get(key)) for r in recs
                          if isinstance((r.get("cost") or {}).get(key), (int, float))])

        base = next((recs for lab, recs in entries if lab == BASELINE), None) or \
            next((recs for lab, recs in entries if recs[0]["method"] == BASELINE and recs[0]["kind"] != TEACHER), None)
        base_step = mean_of(base, "step_time_s")[0] if base else math.nan
        rows = []
        for lab, recs in entries:
            step = mean_of(recs, "step_time_s")
            tf = mean_of(recs, "teacher_forward_s")
            teacher_row = recs[0]["kind"] == TEACHER
            floor = base_step + tf[0] if tf[2] and math.isfinite(base_step) else math.nan
            vals = {"step_ms": (1000 * step[0], 1000 * step[1], step[2]),
                    "x_baseline": ((step[0] / base_step, math.nan, step[2])
                                   if step[2] and base_step and math.isfinite(base_step) and not teacher_row
                                   else (math.nan, math.nan, 0)),
                    "x_floor": ((step[0] / floor, math.nan, step[2]) if step[2] and math.isfinite(floor)
                                and not teacher_row else (math.nan, math.nan, 0)),
                    "extra_params": mean_of(recs, "extra_params"), "peak_mem_mb": mean_of(recs, "peak_mem_mb"),
                    "wall_time_s": mean_of(recs, "wall_time_s")}
            rows.append((lab, recs[0]["method"], len(recs), vals))
        if fmt == "csv":
            for lab, method, n, vals in rows:
                for key, _ in fields:
                    m, sd, k = vals[key]
                    csv_rows.append({"suite": suite, "suite_version": version, "pair": pair, "row": lab,
                                     "method": method, "column": key, "mean": _r(m) if k else None,
                                     "std": _r(sd) if k > 1 and math.isfinite(sd) else None, "n": k})
            continue
        dash = "—" if fmt == "md" else "---"

        def show(key, m, sd, k):
            if not k or not math.isfinite(m):
                return dash
            if key in ("x_baseline", "x_floor"):
                return f"{m:.2f}×" if fmt == "md" else f"{m:.2f}$\\times$"
            if key == "extra_params":
                return f"{int(round(m)):,}"
            d = 1 if key in ("peak_mem_mb", "wall_time_s") else decimals
            core = _num(m, d, fmt)
            if k > 1 and math.isfinite(sd):
                core += (" ± " if fmt == "md" else r" $\pm$ ") + _num(sd, d, fmt)
            return core

        headers = ["Method"] + [h for _, h in fields] + ["n"]
        body = [[lab if fmt == "md" else latex_escape(lab)] + [show(key, *vals[key]) for key, _ in fields] + [str(n)]
                for lab, method, n, vals in rows]
        caption = (f"{suite} v{version}, {pair}: training cost, mean ± std over ok seeds. × baseline: step time / "
                   "the baseline's step. " + FLOOR_NOTE + ". Extra params: parameters the method trains besides "
                   "the student. Teacher: its own training run, no ratio.")
        if fmt == "md":
            from tabulate import tabulate

            blocks.append(tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                                   colalign=("left",) + ("right",) * (len(headers) - 1)) + "\n\n" + caption)
        else:
            lines = [f"% {latex_escape(caption)}", r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule",
                     " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
            lines += [" & ".join(b) + r" \\" for b in body] + [r"\bottomrule", r"\end{tabular}"]
            blocks.append("\n".join(lines))
    if fmt == "csv":
        return _csv_text(csv_rows, ["suite", "suite_version", "pair", "row", "method", "column", "mean", "std", "n"])
    if not blocks:
        raise ValueError("no ok teacher or distillation record to take costs from")
    return "\n\n".join(blocks)
