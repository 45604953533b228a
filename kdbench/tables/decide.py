"""Tables that decide: ``kdbench compare`` (the paired difference of two methods, per pair and pooled), the
``summary`` layout (mean ranks over a suite's pairs, significant wins over the baseline, Friedman and the Nemenyi
critical difference) and ``kdbench check`` (our numbers against the published references, with a tolerance).

The statistics are :mod:`kdbench.stats`'s; the records are chosen as the paper table chooses them
(:func:`kdbench.tables.records.model_records`: the newest configuration, one ok record per seed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench import stats
from kdbench.results import higher_is_better, load_suite_records, one_version
from kdbench.tables.records import (BASELINE, TABLE_KINDS, TASK_METRICS, TEACHER, metric_row, model_records,
                                    pair_order, recency, teacher_sha_of_distill)
from kdbench.tables.render import check_format, csv_text, fmt_num, pipe_table

#: the smallest tolerance ``kdbench check`` allows, in the metric's own unit (points of a percentage: top-1, AP,
#: mIoU, mCE): a reproduction within half a point of a published mean is what the papers' own seed spread allows
CHECK_FLOOR = 0.5
#: ``kdbench check``'s tolerance in standard errors of our mean (over seeds)
CHECK_SE = 2.0


def _records(suite_dir: str | os.PathLike, suite_version: int | None) -> list[dict]:
    suite_dir = Path(suite_dir)
    return one_version(load_suite_records(suite_dir, TABLE_KINDS), suite_dir, suite_version)


def _metric(records: list[dict], metric: str | None) -> str:
    return metric or TASK_METRICS.get(records[0].get("task"), "top1")


def seed_values(records: list[dict], label: str, pair: str, eval: str, metric: str, select: str
                ) -> dict[Any, float]:
    """seed -> value of ``metric`` of the ok runs of ``label`` on ``pair`` (the newest configuration)."""
    out = {}
    for r in model_records(records).get((label, pair), []):
        m = metric_row(r.get("metrics"), eval, metric, select)
        if m is not None and m.get("value") is not None and math.isfinite(float(m["value"])):
            out[r.get("seed")] = float(m["value"])
    return out


def _labels(records: list[dict]) -> list[str]:
    firsts: dict[str, int] = {}
    for r in records:
        if r["kind"] == "distill":
            firsts[r["label"]] = min(firsts.get(r["label"], r.get("method_index", 0)), r.get("method_index", 0))
    return sorted(firsts, key=lambda k: (firsts[k], k))


def _p(x: float | None) -> str:
    return "" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def compare(suite_dir: str | os.PathLike, a: str, b: str, *, metric: str | None = None, select: str = "final",
            eval: str = "val", ci: str = "t", fmt: str = "md", suite_version: int | None = None,
            decimals: int = 2) -> str:
    """The paired difference ``a - b`` of two method labels on every pair of the suite and pooled over its pairs
    (each (pair, seed) one paired observation): n, mean Δ, the 95 % interval (``ci``: ``t`` or ``bootstrap``),
    the paired t-test and the Wilcoxon signed-rank p-values. ``fmt``: md or csv."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"unknown format {fmt!r} for compare; valid: md, csv")
    if ci not in stats.CI_METHODS:
        raise ValueError(f"unknown interval {ci!r}; valid: {', '.join(stats.CI_METHODS)}")
    records = _records(suite_dir, suite_version)
    labels = _labels(records)
    for name in (a, b):
        if name not in labels:
            raise ValueError(f"unknown method label {name!r} in {suite_dir}; valid: {', '.join(labels)}")
    if a == b:
        raise ValueError(f"compare two different labels (got {a!r} twice)")
    metric = _metric(records, metric)
    higher = higher_is_better(records, metric, eval)
    rows, pooled_a, pooled_b = [], {}, {}
    for pair in pair_order(records, {r["pair"] for r in records}):
        va, vb = (seed_values(records, x, pair, eval, metric, select) for x in (a, b))
        if not va and not vb:
            continue
        p = stats.paired(va, vb, ci)
        rows.append((pair, p))
        pooled_a.update({(pair, s): v for s, v in va.items()})
        pooled_b.update({(pair, s): v for s, v in vb.items()})
    if not rows:
        raise ValueError(f"{suite_dir}: no ok run of {a!r} or {b!r} has {metric} ({eval}, {select})")
    if len(rows) > 1:
        rows.append(("pooled", stats.paired(pooled_a, pooled_b, ci)))
    suite, version = records[0]["suite"], records[0]["suite_version"]
    if fmt == "csv":
        return csv_text([{"suite": suite, "suite_version": version, "a": a, "b": b, "metric": metric, "eval": eval,
                          "select": select, "higher_is_better": higher, "pair": pair, "n_paired": p.n,
                          "unpaired": p.unpaired, "delta": None if p.n == 0 else round(p.mean, 6),
                          "ci": ci, "delta_ci_low": None if p.ci_low is None else round(p.ci_low, 6),
                          "delta_ci_high": None if p.ci_high is None else round(p.ci_high, 6),
                          "p_ttest": p.p_t, "p_wilcoxon": p.p_wilcoxon,
                          "significant": "" if p.significant is None else p.significant}
                         for pair, p in rows],
                        ("suite", "suite_version", "a", "b", "metric", "eval", "select", "higher_is_better", "pair",
                         "n_paired", "unpaired", "delta", "ci", "delta_ci_low", "delta_ci_high", "p_ttest",
                         "p_wilcoxon", "significant"))
    body = []
    for pair, p in rows:
        interval = ("" if p.ci_low is None else f"[{fmt_num(p.ci_low, decimals, 'md', True)}, "
                    f"{fmt_num(p.ci_high, decimals, 'md', True)}]")
        body.append([pair, str(p.n) + (f" (+{p.unpaired} unpaired)" if p.unpaired else ""),
                     "" if p.n == 0 else fmt_num(p.mean, decimals, "md", True), interval,
                     "*" if p.significant else "", _p(p.p_t), _p(p.p_wilcoxon)])
    table = pipe_table(body, ["pair", "n", f"Δ {metric}", "95% CI", "", "p (t)", "p (Wilcoxon)"])
    what = "Student t, n − 1 degrees of freedom" if ci == "t" else (
        f"percentile bootstrap, {stats.BOOTSTRAP_RESAMPLES:,} resamples, seed {stats.BOOTSTRAP_SEED}")
    caption = (f"{suite} v{version}: {a} − {b}, {metric} (eval {eval}, {select} epoch; "
               f"{'higher' if higher else 'lower'} is better), paired by seed: Δ = mean of the per-seed "
               f"differences, 95% CI of that mean ({what}); *: the interval excludes 0. p (t): paired t-test; "
               "p (Wilcoxon): signed-rank test (two-sided). Seeds only one side finished are left out"
               + ("; pooled: every (pair, seed) of every pair as one paired sample." if len(rows) > 1 else "."))
    return table + "\n\n" + caption


# ------------------------------------------------------------------------------------------- summary layout
def summary_table(records: list[dict], fmt: str = "md", *, metric: str | None = None, eval: str = "val",
                  select: str = "final", decimals: int = 2, ci: str = "t") -> str:
    """Each method's mean rank over the suite's pairs (1 = best; the pairs where every method has a value), the
    number of pairs where it beats the baseline significantly (paired 95 % interval excluding 0 on the better
    side), the Friedman test over the methods and the Nemenyi critical difference of mean ranks (Demšar 2006).
    Cells of a pair: the mean over its seeds."""
    check_format(fmt)
    metric = _metric(records, metric)
    higher = higher_is_better(records, metric, eval)
    labels = _labels(records)
    pairs = pair_order(records, {r["pair"] for r in records})
    means: dict[str, dict[str, float]] = {}
    wins = {lab: 0 for lab in labels}
    tested = {lab: 0 for lab in labels}
    for pair in pairs:
        vals = {lab: seed_values(records, lab, pair, eval, metric, select) for lab in labels}
        means[pair] = {lab: sum(v.values()) / len(v) for lab, v in vals.items() if v}
        base = vals.get(BASELINE) or {}
        for lab in labels:
            if lab == BASELINE or not vals[lab] or not base:
                continue
            p = stats.paired(vals[lab], base, ci)
            if p.significant is not None:
                tested[lab] += 1
                if p.significant and ((p.mean > 0) == higher):
                    wins[lab] += 1
    fr = stats.friedman(means, higher)
    suite, version = records[0]["suite"], records[0]["suite_version"]
    order = sorted(fr.mean_ranks, key=lambda lab: (fr.mean_ranks[lab], lab))
    if fmt == "csv":
        return csv_text([{"suite": suite, "suite_version": version, "metric": metric, "eval": eval, "select": select,
                          "method": lab, "mean_rank": round(fr.mean_ranks[lab], 6), "pairs": fr.n,
                          "wins_vs_baseline": "" if lab == BASELINE else wins[lab],
                          "tested_vs_baseline": "" if lab == BASELINE else tested[lab],
                          "friedman_chi2": fr.statistic, "friedman_p": fr.p, "nemenyi_cd": fr.cd} for lab in order],
                        ("suite", "suite_version", "metric", "eval", "select", "method", "mean_rank", "pairs",
                         "wins_vs_baseline", "tested_vs_baseline", "friedman_chi2", "friedman_p", "nemenyi_cd"))
    body = [[lab, fmt_num(fr.mean_ranks[lab], decimals, fmt),
             "" if lab == BASELINE else f"{wins[lab]} / {tested[lab]}"] for lab in order]
    test = (f"Friedman χ² = {fr.statistic:.2f}, p = {_p(fr.p)}" if fr.statistic is not None
            else "Friedman test: needs at least 3 methods and 2 pairs")
    cd = f"Nemenyi critical difference (α = 0.05) = {fr.cd:.2f}" if fr.cd is not None else ""
    caption = (f"{suite} v{version}: mean rank of each method over {fr.n} pair(s) where every method has {metric} "
               f"(eval {eval}, {select} epoch; rank 1 = best, ties share their mean rank; a pair's value = the "
               f"mean over its seeds). Wins vs baseline: pairs where the paired 95% interval of method − baseline "
               f"excludes 0 on the better side / pairs with an interval. {test}" + (f"; {cd}: two methods whose "
               "mean ranks differ by less are not significantly different (Demšar, JMLR 2006)." if cd else "."))
    if fmt == "latex":
        from kdbench.tables.render import latex_block, latex_escape

        return latex_block(caption, ["Method", "mean rank", "wins vs baseline"],
                           [[latex_escape(c) for c in row] for row in body])
    return pipe_table(body, ["Method", "mean rank", "wins vs baseline"]) + "\n\n" + caption


# ------------------------------------------------------------------------------------------- kdbench check
@dataclass
class CheckRow:
    row: str
    pair: str
    metric: str
    ours: float
    n: int
    reference: float
    source: str
    tolerance: float

    @property
    def diff(self) -> float:
        return self.ours - self.reference

    @property
    def passed(self) -> bool:
        return abs(self.diff) <= self.tolerance


def _refs(records: list[dict], snapshot: dict | None) -> dict[tuple[str, str], list[dict]]:
    """(label, pair) -> its published references: from the suite snapshot when given (``--suite``, or the one
    kept with the results), else from the records (each record keeps its own)."""
    out: dict[tuple[str, str], list[dict]] = {}
    if snapshot is not None:
        for r in snapshot.get("reference") or []:
            out.setdefault((str(r["method"]), str(r["pair"])), []).append(dict(r))
        return out
    for r in sorted(records, key=recency):
        for ref in r.get("reference") or []:
            out[(r["label"], r["pair"])] = list(r.get("reference") or [])
            break
    return out


def check(records: list[dict], snapshot: dict | None = None, *, tolerance: float | None = None, eval: str = "val",
          select: str = "final") -> list[CheckRow]:
    """Every cell with a published reference for a metric the records have: our mean over seeds (teachers
    included: a suite-trained teacher's runs, else the loaded teacher's evaluation), the reference and the
    tolerance: ``tolerance`` when given, else max(:data:`CHECK_FLOOR`, :data:`CHECK_SE` × the standard error of
    our mean)."""
    refs = _refs(records, snapshot)
    models = model_records(records)
    out = []
    for (label, pair), items in refs.items():
        for ref in items:
            metric = str(ref.get("metric"))
            recs = models.get((label, pair), [])
            vals = [float(m["value"]) for m in (metric_row(r.get("metrics"), eval, metric, select) for r in recs)
                    if m is not None and m.get("value") is not None and math.isfinite(float(m["value"]))]
            if not vals and label == TEACHER:  # a loaded teacher: the evaluation its distillation runs recorded
                distill = [r for r in records if r["pair"] == pair and r["kind"] == "distill" and r["status"] == "ok"]
                sha = teacher_sha_of_distill(distill)
                for r in sorted(distill, key=recency, reverse=True):
                    if sha and (r.get("teacher") or {}).get("sha256") != sha:
                        continue
                    m = metric_row(r.get("teacher_metrics"), eval, metric, "final")
                    if m is not None and m.get("value") is not None:
                        vals = [float(m["value"])]
                        break
            if not vals:
                continue
            n = len(vals)
            mean = sum(vals) / n
            se = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) / math.sqrt(n)) if n > 1 else 0.0
            tol = tolerance if tolerance is not None else max(CHECK_FLOOR, CHECK_SE * se)
            out.append(CheckRow(label, pair, metric, mean, n, float(ref["value"]), str(ref.get("source") or ""), tol))
    order = {p: i for i, p in enumerate(pair_order(records, {r["pair"] for r in records}))}
    return sorted(out, key=lambda c: (order.get(c.pair, 99), c.row != TEACHER, c.row, c.metric))


def check_text(rows: list[CheckRow], decimals: int = 2, tolerance: float | None = None) -> str:
    body = [[c.row, c.pair, c.metric, f"{c.ours:.{decimals}f} (n={c.n})", f"{c.reference:g}",
             fmt_num(c.diff, decimals, "md", True), f"±{c.tolerance:.{decimals}f}", "pass" if c.passed else "FAIL"]
            for c in rows]
    rule = (f"tolerance ±{tolerance:g} (--tolerance)" if tolerance is not None else
            f"tolerance: the larger of {CHECK_FLOOR:g} points and {CHECK_SE:g} standard errors of our mean over seeds")
    failed = sum(not c.passed for c in rows)
    sources = sorted({c.source for c in rows if c.source})
    return (pipe_table(body, ["Method", "pair", "metric", "ours", "reference", "Δ", "tolerance", ""])
            + f"\n\n{len(rows) - failed} of {len(rows)} cell(s) within their tolerance ({rule}); references: "
            + ("; ".join(sources) if sources else "no source given") + ".")


__all__ = ["compare", "summary_table", "check", "check_text", "CheckRow", "seed_values", "CHECK_FLOOR", "CHECK_SE"]
