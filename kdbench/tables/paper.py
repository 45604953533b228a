"""The paper table (``make_table``): rows = methods, columns = pairs (or the metric when the suite has one pair).

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
  a partially failed cell shows the n of its ok runs and a footnote; a cell with no record is blank;
* records of another configuration than a cell's newest are left out, and a footnote counts them
  (:func:`kdbench.tables.records.current`).

``make_table`` also reaches the robustness and cost layouts (:mod:`kdbench.tables.robustness`,
:mod:`kdbench.tables.cost`).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench import stats
from kdbench.results import error_line, gc_paused, higher_is_better, load_suite_records, one_version
from kdbench.tables.cost import cost_table
from kdbench.tables.protocol import protocol, protocol_text
from kdbench.tables.records import (BASELINE, EVAL_KIND, TABLE_KINDS, TASK_METRICS, TEACHER, current, in_order,
                                    metric_row, order_key, teacher_sha_of_distill)
from kdbench.tables.render import (Footnotes, bold, check_format, csv_round, csv_text, dash, delta_text,
                                   excludes_zero, fmt_num, fmt_ref, latex_escape, pipe_table, pm)
from kdbench.tables.robustness import robustness_table

LAYOUTS = ("auto", "method_x_domain", "robustness", "cost", "summary")
SELECTS = ("final", "best")
NO_DOMAIN = "other"
DOMAIN_ORDER = ("spatial", "dwt")
CSV_COLUMNS = ("suite", "suite_version", "eval", "metric", "select", "higher_is_better", "row", "method", "pair",
               "pair_index", "domain", "mean", "std", "n", "n_runs", "delta", "delta_ci_low", "delta_ci_high",
               "n_paired", "significant", "best", "reference", "reference_source", "note")


def make_table(suite_dir: str | os.PathLike, metric: str | None = None, select: str = "final", eval: str = "val",
               fmt: str = "md", suite_version: int | None = None, layout: str = "auto", *,
               decimals: int = 2, reference: str = BASELINE, ci: str = "t") -> str:
    """The paper table of the records under ``suite_dir`` (``<results>/<suite>``), as a string.

    ``metric``: defaults to the first metric of the first ok record (top1 / AP / mIoU). ``select``: "final"
    or "best" epoch. ``eval``: evaluation name. ``fmt``: "md" (pipe table, legend and footnotes below),
    "latex" (booktabs tabular, footnotes as its last rows) or "csv" (one row per method × pair with mean, std,
    n, delta, best; 6 decimals). ``suite_version``: the version to tabulate; records of several versions
    without it are refused. ``layout``: "auto" (rows = labels, columns = pairs) or "method_x_domain"
    (rows = method names, columns = ``params["domain"]`` values per pair; methods without a ``domain``
    parameter, the teacher included, go to an "other" column), "robustness" (:func:`robustness_table`;
    ``reference``: the row whose errors normalise the CE of classification suites) or "cost"
    (:func:`cost_table`) or "summary" (:func:`kdbench.tables.decide.summary_table`). ``decimals``: displayed
    precision. ``ci``: how Δ's 95 % intervals are computed: "t" (Student t) or "bootstrap" (percentile, seeded).
    """
    check_format(fmt)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECTS)}")
    if ci not in stats.CI_METHODS:
        raise ValueError(f"unknown interval {ci!r}; valid: {', '.join(stats.CI_METHODS)}")
    with gc_paused():  # 10,000 records are millions of live containers: a collection pass costs ~0.1 s each
        return _make_table(Path(suite_dir), metric, select, eval, fmt, suite_version, layout, decimals, reference,
                           ci)


def _make_table(suite_dir: Path, metric: str | None, select: str, eval: str, fmt: str, suite_version: int | None,
                layout: str, decimals: int, reference: str, ci: str = "t") -> str:
    kinds = TABLE_KINDS + ((EVAL_KIND,) if layout == "robustness" else ())
    records = one_version(load_suite_records(suite_dir, kinds), suite_dir, suite_version)
    if layout == "robustness":
        return robustness_table(records, fmt, metric=metric, reference=reference, decimals=decimals)
    if layout == "cost":
        return cost_table(records, fmt, decimals=decimals)
    if layout == "summary":
        from kdbench.tables.decide import summary_table

        return summary_table(records, fmt, metric=metric, eval=eval, select=select, decimals=decimals, ci=ci)
    metric = _choose_metric(records, metric, eval, select)
    higher = higher_is_better(records, metric, eval)
    grid = _build(records, layout, eval, metric, select, higher, decimals, ci)
    suite, version = records[0]["suite"], records[0]["suite_version"]
    if fmt == "csv":
        return _csv(grid, suite, version, metric, eval, select, higher, layout)
    legend = _legend(suite, version, grid, metric, eval, select, higher)
    card = protocol_text(_card(records, grid, metric, eval, select))
    if fmt == "md":
        return _markdown(grid, legend, metric, eval, select, decimals, card)
    return _latex(grid, legend + " " + card, metric, eval, select, decimals)


def _card(records: list[dict], grid: Grid, metric: str, eval: str, select: str) -> dict:
    teachers = {}
    for gi, g in enumerate(grid.groups):
        cell = grid.cells.get((TEACHER, gi))
        if cell is not None and cell.n:
            teachers[g.pair] = {"measured": cell.mean, "claimed": cell.ref[0] if cell.ref else None,
                                "source": cell.ref[1] if cell.ref else ""}
    return protocol(records, metric=metric, eval=eval, select=select, teachers=teachers)


def table_protocol(suite_dir: str | os.PathLike, metric: str | None = None, select: str = "final", eval: str = "val",
                   suite_version: int | None = None) -> dict:
    """The protocol card (:mod:`kdbench.tables.protocol`) of the paper table of ``suite_dir``, as data: what
    ``kdbench table --format csv --out FILE`` writes beside the CSV as ``FILE``'s ``.protocol.json``."""
    suite_dir = Path(suite_dir)
    records = one_version(load_suite_records(suite_dir, TABLE_KINDS), suite_dir, suite_version)
    metric = _choose_metric(records, metric, eval, select)
    grid = _build(records, "auto", eval, metric, select, higher_is_better(records, metric, eval), 2)
    return _card(records, grid, metric, eval, select)


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
        return min(found, key=lambda f: order_key(f[0]))[1]
    if any(r["status"] == "ok" for r in records):
        raise ValueError(f"no ok record has a metric for eval {eval!r}, select {select!r}; available: {listing}")
    task = records[0].get("task")
    if task not in TASK_METRICS:
        raise ValueError(f"no ok record to take the metric from and no main metric known for task {task!r}; "
                         "pass metric=")
    return TASK_METRICS[task]


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
    delta: float | None = None  # mean of the per-seed differences to the baseline (paired by seed)
    delta_ci: tuple[float, float] | None = None  # its 95 % interval (two or more paired seeds)
    n_paired: int = 0
    unpaired: int = 0  # seeds only this cell or only the baseline finished: left out of Δ
    seeds: list[Any] = field(default_factory=list)  # the seed of each value
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
    def significant(self) -> bool | None:
        """Δ's interval excludes 0 (None without an interval)."""
        return None if self.delta_ci is None else excludes_zero(self.delta_ci)

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
        if self.unpaired and self.delta is not None:
            out.append(f"{self.where}: Δ pairs {self.n_paired} seed(s) with the baseline; {self.unpaired} seed(s) "
                       "only one side finished are left out")
        if self.replaced:
            out.append(f"{self.where}: {self.replaced} of {self.n} run(s) trained with another teacher file than "
                       "the teacher row's (the teacher was retrained or its file replaced since); "
                       "`kdbench run SUITE --rerun-replaced` reruns them")
        return out


def _fill(cell: Cell, recs: list[dict], eval: str, metric: str, select: str) -> Cell:
    kept, cell.ignored = current(recs)
    cell.n_runs = len(kept)
    for r in kept:
        if r["status"] != "ok":
            cell.bad[r["status"]] += 1
            cell.first_error = cell.first_error or error_line(r.get("error"))
            continue
        m = metric_row(r.get("metrics"), eval, metric, select)
        if m is None or not math.isfinite(float(m["value"])):
            cell.no_metric += 1
        else:
            cell.values.append(float(m["value"]))
            cell.seeds.append(r.get("seed"))
            cell.teacher_shas.append(str((r.get("teacher") or {}).get("sha256") or ""))
    for r in kept:
        ref = next((x for x in r.get("reference") or [] if x.get("metric") == metric), None)
        if ref is not None:
            cell.ref = (float(ref["value"]), str(ref.get("source") or ""))
            break
    return cell


def _teacher_from_distill(cell: Cell, recs: list[dict], eval: str, metric: str, select: str) -> Cell:
    """Teacher cell from the teacher_metrics distillation runs recorded for the teacher file they loaded: the file
    the newest of them loaded (:func:`teacher_sha_of_distill`; runs of another file are flagged in their rows).

    A loaded teacher is evaluated once, so ``select`` falls back to "final" when the asked one is absent.
    """
    shown = teacher_sha_of_distill(recs)
    for r in in_order(recs):
        t = r.get("teacher") or {}
        if shown and t.get("sha256") != shown:
            continue
        rows = r.get("teacher_metrics") or []
        m = metric_row(rows, eval, metric, select) or metric_row(rows, eval, metric, "final")
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
    ci: str = "t"  # how Δ's intervals were computed (kdbench.stats.CI_METHODS)


def _domain(rec: dict) -> str:
    return str((rec.get("params") or {}).get("domain", NO_DOMAIN))


def _build(records: list[dict], layout: str, eval: str, metric: str, select: str, higher: bool,
           decimals: int, ci: str = "t") -> Grid:
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
            shown = {str((r.get("artifact") or {}).get("sha256") or "") for r in current(t_recs)[0]
                     if r["status"] == "ok"} - {""}
        else:
            shown = {teacher_sha_of_distill([r for r in distill if r["pair"] == p])} - {""}
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
                p = stats.paired(dict(zip(cell.seeds, cell.values)), dict(zip(base[0].seeds, base[0].values)), ci)
                if p.n:
                    cell.delta, cell.n_paired, cell.unpaired = p.mean, p.n, p.unpaired
                    cell.delta_ci = (p.ci_low, p.ci_high) if p.ci_low is not None else None

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
                groups=groups, cells=cells, teacher=has_teacher, ci=ci)


# ------------------------------------------------------------------------------------------- rendering
def _value_text(cell: Cell | None, decimals: int, fmt: str, marks: str) -> str:
    if cell is None or cell.n_runs == 0:
        return marks
    if not cell.n:
        return dash(fmt) + marks
    core = fmt_num(cell.mean, decimals, fmt)
    if cell.n > 1:
        core += pm(fmt) + fmt_num(cell.std, decimals, fmt)
    if cell.best:
        core = bold(core, fmt)
    return core + ("" if cell.plain else f" (n={cell.n})") + marks


def _matrix(grid: Grid, metric: str, eval: str, select: str, decimals: int, fmt: str) -> tuple[list, list]:
    """Body rows as strings and the footnote texts, for md and latex."""
    notes = Footnotes(fmt)
    body = []
    for row in grid.rows:
        line = [row if fmt == "md" else latex_escape(row)]
        for gi, g in enumerate(grid.groups):
            cell = grid.cells.get((row, gi))
            marks = "".join(notes.mark(t) for t in (cell.notes(metric, eval, select) if cell else []))
            line.append(_value_text(cell, decimals, fmt, marks))
            if g.delta:
                line.append("" if cell is None else delta_text(cell.delta, cell.delta_ci, decimals, fmt))
            if g.ref:
                ref = cell.ref if cell is not None else None
                line.append("" if ref is None else fmt_ref(ref[0], fmt)
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
        what = ("Student t, n − 1 degrees of freedom" if grid.ci == "t" else
                f"percentile bootstrap, {stats.BOOTSTRAP_RESAMPLES:,} resamples, seed {stats.BOOTSTRAP_SEED}")
        parts.append(f"Δ: mean over seeds of (method − baseline), paired by seed, same pair; [95% CI] ({what}) "
                     "from two paired seeds; *: the interval excludes 0.")
    parts.append("Bold: best mean per column (teacher excluded).")
    if any(g.ref for g in grid.groups):
        parts.append("ref.: published value.")
    return " ".join(parts)


def _markdown(grid: Grid, legend: str, metric: str, eval: str, select: str, decimals: int, card: str = "") -> str:
    headers = ["Method"]
    for g in grid.groups:
        headers += [g.head] + (["Δ"] if g.delta else []) + (["ref."] if g.ref else [])
    body, notes = _matrix(grid, metric, eval, select, decimals, "md")
    out = [pipe_table(body, headers), "", legend] + (["", card] if card else [])
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
                "mean": csv_round(cell.mean) if cell.n else None, "std": csv_round(cell.std) if cell.n > 1 else None,
                "n": cell.n, "n_runs": cell.n_runs, "delta": None if cell.delta is None else csv_round(cell.delta),
                "delta_ci_low": None if cell.delta_ci is None else csv_round(cell.delta_ci[0]),
                "delta_ci_high": None if cell.delta_ci is None else csv_round(cell.delta_ci[1]),
                "n_paired": cell.n_paired if cell.delta is not None else None,
                "significant": "" if cell.significant is None else cell.significant,
                "best": cell.best,
                "reference": cell.ref[0] if cell.ref else None, "reference_source": cell.ref[1] if cell.ref else "",
                "note": " | ".join(cell.notes(metric, eval, select)),
            })
    return csv_text(rows, CSV_COLUMNS)
