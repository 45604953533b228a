"""Robustness figures from a suite's records (matplotlib, Agg backend, imported only when a figure is made).

* :func:`severity_figure`: the task's main metric against corruption severity (0 = clean; severities 1-5 =
  mean over the benchmark corruptions), one line per method, mean over seeds with a band of ± one sample std
  (no band with one seed); one panel per pair.
* :func:`heatmap_figure`: methods × corruptions, the drop from clean (clean − mean over severities, mean over
  seeds; for lower-is-better metrics the sign is flipped so that a positive drop is always a loss).
* :func:`save_figures`: both, as PNG and PDF under ``<suite_dir>/figures/``.
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


def severity_figure(records: list[dict], metric: str | None = None):
    """Figure: metric vs severity (0 = clean) per method, mean over seeds with a ± std band."""
    plt = _pyplot()
    metric = _metric(records, metric)
    entries = _entries(records, metric)
    fig, axes = plt.subplots(1, len(entries), figsize=(5.2 * len(entries), 3.8), squeeze=False)
    for ax, (pair, models) in zip(axes[0], entries):
        for label, _method, items in models:
            xs, means, lo, hi = [], [], [], []
            for sev in (0,) + RB.SEVERITIES:
                per_seed = []
                for clean, grid in items:
                    if sev == 0:
                        per_seed.append(clean)
                        continue
                    vals = [v for (c, s), v in grid.items() if s == sev and c in RB.BENCHMARK]
                    if vals:
                        per_seed.append(statistics.fmean(vals))
                if not per_seed:
                    continue
                m = statistics.fmean(per_seed)
                sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                xs.append(sev)
                means.append(m)
                lo.append(m - sd)
                hi.append(m + sd)
            style = {"linestyle": "--", "color": "black"} if label == TEACHER else {}
            line, = ax.plot(xs, means, marker="o", label=f"{label} (n={len(items)})", **style)
            if len(items) > 1:
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_xticks(range(0, 6), ["clean", "1", "2", "3", "4", "5"])
        ax.set_xlabel("severity (mean over the 15 benchmark corruptions)")
        ax.set_ylabel(metric)
        ax.set_title(pair, fontsize=10)
        ax.grid(alpha=0.3)
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
        ax.set_title(f"{pair}: drop of {metric} from clean (mean over severities and seeds)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    return fig


def save_figures(suite_dir: str | os.PathLike, suite_version: int | None = None, metric: str | None = None
                 ) -> list[Path]:
    """Write the severity curves and the drop heatmap of ``suite_dir`` (``<results>/<suite>``) as PNG and PDF
    under ``<suite_dir>/figures/``; return the paths written."""
    plt = _pyplot()
    suite_dir = Path(suite_dir)
    records = _records(suite_dir, suite_version)
    figs = [("robustness_severity", severity_figure(records, metric))]
    figs.append(("robustness_heatmap", heatmap_figure(records, metric)))
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


__all__ = ["severity_figure", "heatmap_figure", "save_figures"]
