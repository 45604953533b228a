"""Figures from a suite's records (matplotlib, Agg backend, imported only when a figure is made).

* :func:`severity_figure`: the task's main metric against corruption severity (0 = clean; the evaluated
  severities = mean over the benchmark corruptions), one line per method, mean over seeds with a band of ± one
  sample std (no band with one seed), beside its drop relative to each model's clean value; one row per pair.
* :func:`heatmap_figure`: methods × corruptions, the drop from clean (clean − mean over severities, mean over
  seeds; for lower-is-better metrics the sign is flipped so that a positive drop is always a loss).
* :func:`cd_diagram`: the critical-difference diagram of the methods' mean ranks over the suite's pairs.
* :func:`save_figures`: those the records allow, as PNG and PDF under ``<suite_dir>/figures/``.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from kdbench import robustness as RB
from kdbench.results import higher_is_better, load_suite_records, one_version
from kdbench.tables import EVAL_KIND, TABLE_KINDS, TASK_METRICS, TEACHER, robustness_entries
from kdbench.tables.records import pair_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _records(suite_dir: Path, suite_version: int | None) -> list[dict]:
    return one_version(load_suite_records(suite_dir, TABLE_KINDS + (EVAL_KIND,)), suite_dir, suite_version)


def _metric(records: list[dict], metric: str | None) -> str:
    task = records[0].get("task")
    m = metric or TASK_METRICS.get(task)
    if m is None:
        raise ValueError(f"no main metric known for task {task!r}; pass metric=")
    return m


def _entries(records, metric):
    pairs = pair_order(records, {r["pair"] for r in records})
    out = [(pair, robustness_entries(records, pair, metric)) for pair in pairs]
    out = [(p, e) for p, e in out if e]
    if not out:
        raise ValueError("no model has both a clean result and corruption results: run the robustness sweep first")
    return out


#: how a figure names a metric on its axis
AXIS_NAMES = {"top1": "top-1 (%)", "top5": "top-5 (%)", "AP": "AP", "mIoU": "mIoU (%)"}


def severity_figure(records: list[dict], metric: str | None = None):
    """Figure: per pair, two panels: the metric against severity (0 = clean; x ticks at the evaluated severities),
    and its drop relative to each model's own clean value (% of clean), mean over seeds with a ± std band."""
    plt = _pyplot()
    metric = _metric(records, metric)
    entries = _entries(records, metric)
    evaluated = sorted({s for _, models in entries for _, _, items in models for _, g in items for _, s in g})
    fig, axes = plt.subplots(len(entries), 2, figsize=(10.4, 3.8 * len(entries)), squeeze=False)
    suite = records[0]["suite"]
    for (ax, rel_ax), (pair, models) in zip(axes, entries):
        for label, _method, items in models:
            xs, means, lo, hi, rel = [], [], [], [], []
            for sev in [0] + evaluated:
                per_seed, per_seed_rel = [], []
                for clean, grid in items:
                    if sev == 0:
                        per_seed.append(clean)
                        per_seed_rel.append(0.0)
                        continue
                    vals = [v for (c, s), v in grid.items() if s == sev and c in RB.BENCHMARK]
                    if vals:
                        per_seed.append(statistics.fmean(vals))
                        per_seed_rel.append(100 * (clean - statistics.fmean(vals)) / clean if clean else math.nan)
                if not per_seed:
                    continue
                m = statistics.fmean(per_seed)
                sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                xs.append(sev)
                means.append(m)
                lo.append(m - sd)
                hi.append(m + sd)
                rel.append(statistics.fmean(per_seed_rel))
            style = {"linestyle": "--", "color": "black"} if label == TEACHER else {}
            line, = ax.plot(xs, means, marker="o", label=f"{label} (n={len(items)})", **style)
            if len(items) > 1:
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
            rel_ax.plot(xs, rel, marker="o", color=line.get_color(), **{k: v for k, v in style.items()
                                                                       if k != "color"})
        for a in (ax, rel_ax):
            a.set_xticks([0] + evaluated, ["clean"] + [str(s) for s in evaluated])
            a.set_xlabel("severity (mean over the 15 benchmark corruptions)")
            a.grid(alpha=0.3)
        ax.set_ylabel(AXIS_NAMES.get(metric, metric))
        rel_ax.set_ylabel(f"drop from clean (% of clean {metric})")
        ax.set_title(f"{suite}, {pair}: {metric}", fontsize=10)
        rel_ax.set_title(f"{suite}, {pair}: relative drop", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_figure(records: list[dict], metric: str | None = None):
    """Figure: methods × corruptions, drop from clean (mean over severities and seeds), one panel per pair."""
    plt = _pyplot()
    import numpy as np

    metric = _metric(records, metric)
    higher = higher_is_better([r for r in records if r["kind"] != EVAL_KIND], metric, "val")
    entries = _entries(records, metric)
    present = {c for _, models in entries for _, _, items in models for _, g in items for c, _ in g}
    cols = [c for c in RB.ALL if c in present]
    fig, axes = plt.subplots(len(entries), 1, figsize=(max(6.0, 0.55 * len(cols) + 2.5),
                                                       (0.45 * max(len(m) for _, m in entries) + 1.8) * len(entries)),
                             squeeze=False)
    for ax, (pair, models) in zip(axes[:, 0], entries):
        data = np.full((len(models), len(cols)), np.nan)
        for i, (_label, _m, items) in enumerate(models):
            for j, c in enumerate(cols):
                drops = []
                for clean, grid in items:
                    vals = [v for (c2, _), v in grid.items() if c2 == c]
                    if vals:
                        d = clean - statistics.fmean(vals)
                        drops.append(d if higher else -d)
                if drops:
                    data[i, j] = statistics.fmean(drops)
        im = ax.imshow(data, aspect="auto", cmap="magma_r")
        ax.set_xticks(range(len(cols)), [c.replace("_", " ") for c in cols], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), [m[0] for m in models], fontsize=9)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if math.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] > np.nanmean(data) else "black")
        ax.set_title(f"{records[0]['suite']}, {pair}: drop of {metric} from clean (mean over severities and seeds)",
                     fontsize=10)
        bar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label(f"drop of {metric} (points)", fontsize=8)
    fig.tight_layout()
    return fig


def cd_diagram(records: list[dict], metric: str | None = None, eval: str = "val", select: str = "final"):
    """The critical-difference diagram of Demšar (JMLR 2006) over the suite's pairs: each method at its mean rank
    (1 = best, left), the Nemenyi critical difference as a bar, and a thick line joining methods whose mean ranks
    differ by less than it (not significantly different). None below 3 pairs or 2 methods."""
    from kdbench import stats
    from kdbench.tables.decide import _labels, seed_values

    metric = metric or TASK_METRICS.get(records[0].get("task"), "top1")
    higher = higher_is_better([r for r in records if r["kind"] != EVAL_KIND], metric, eval)
    labels = _labels(records)
    table = {}
    for pair in pair_order(records, {r["pair"] for r in records}):
        vals = {lab: seed_values(records, lab, pair, eval, metric, select) for lab in labels}
        table[pair] = {lab: statistics.fmean(v.values()) for lab, v in vals.items() if v}
    fr = stats.friedman(table, higher)
    if fr.n < 3 or fr.k < 2 or fr.cd is None:
        return None
    plt = _pyplot()
    order = sorted(fr.mean_ranks, key=lambda m: fr.mean_ranks[m])
    k = fr.k
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.32 * k))
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(-((k + 1) // 2 + 1) * 0.55 - 0.3, 2.2)
    ax.axis("off")
    ax.plot([1, k], [0, 0], color="black", lw=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.12], color="black", lw=1)
        ax.text(r, 0.25, str(r), ha="center", va="bottom", fontsize=8)
    ax.plot([1, 1 + fr.cd], [1.3, 1.3], color="black", lw=1.5)
    ax.text(1 + fr.cd / 2, 1.45, f"CD = {fr.cd:.2f}", ha="center", va="bottom", fontsize=8)
    half = (k + 1) // 2
    for i, m in enumerate(order):
        r = fr.mean_ranks[m]
        left = i < half
        y = -(i + 1 if left else k - i) * 0.55 - 0.3
        x_text = 0.6 if left else k + 0.4
        ax.plot([r, r, x_text], [0, y, y], color="black", lw=0.8)
        ax.text(x_text + (-0.05 if left else 0.05), y, f"{m} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=8)
    ranks = [fr.mean_ranks[m] for m in order]
    spans, last_end = [], -1
    for i in range(k):  # maximal groups of methods within CD of each other
        j = max(j for j in range(i, k) if ranks[j] - ranks[i] < fr.cd)
        if j > i and j > last_end:
            spans.append((ranks[i], ranks[j]))
            last_end = j
    for n, (a, b) in enumerate(spans):
        y = -0.2 - 0.22 * n
        ax.plot([a - 0.03, b + 0.03], [y, y], color="black", lw=3)
    suite, version = records[0]["suite"], records[0]["suite_version"]
    test = f"Friedman p = {fr.p:.3g}" if fr.p is not None else "Friedman: k < 3"
    ax.set_title(f"{suite} v{version}: mean rank of {metric} over {fr.n} pairs ({test}; Nemenyi α = 0.05)",
                 fontsize=9)
    return fig


def save_figures(suite_dir: str | os.PathLike, suite_version: int | None = None, metric: str | None = None
                 ) -> list[Path]:
    """Write the figures a suite's records allow as PNG and PDF under ``<suite_dir>/figures/``: the severity
    curves and the drop heatmap (with corruption results), the critical-difference diagram (3 pairs or more);
    return the paths written. A suite with none of them is an error saying why."""
    plt = _pyplot()
    suite_dir = Path(suite_dir)
    records = _records(suite_dir, suite_version)
    figs = []
    if any(r["kind"] == EVAL_KIND for r in records):
        figs.append(("robustness_severity", severity_figure(records, metric)))
        figs.append(("robustness_heatmap", heatmap_figure(records, metric)))
    cd = cd_diagram(records, metric)
    if cd is not None:
        figs.append(("critical_difference", cd))
    if not figs:
        raise ValueError(f"{suite_dir}: nothing to plot: no corruption results (run the robustness sweep first: "
                         "kdbench robustness) and fewer than 3 pairs with every method finished (the "
                         "critical-difference diagram)")
    out_dir = suite_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs:
        try:
            for ext in ("png", "pdf"):
                path = out_dir / f"{name}.{ext}"
                fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf"
                            else {"Software": None})
                written.append(path)
        finally:
            plt.close(fig)
    return written


__all__ = ["severity_figure", "heatmap_figure", "cd_diagram", "save_figures"]
