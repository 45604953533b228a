"""``kdbench report``: one self-contained HTML file for a suite's results: the protocol card, the paper table with
its paired intervals, the summary ranks and the critical-difference diagram, the robustness table and figures
(when the suite has corruption results), the cost table and the cost-vs-gain figure, and the run status with the
failures and their reasons.

Nothing in the file is fetched: the CSS is inline, the figures are PNG data URIs, and no element names an
external URL, so it reads the same offline. The tables are the markdown ``kdbench table`` prints, turned into
HTML tables (their captions and footnotes as text).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import statistics
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px 20px 60px}
h1{font-size:1.6em;margin:.2em 0} h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
p,li{line-height:1.45} .caption{color:#57606a;font-size:.9em} .card{background:#f6f8fa;border:1px solid #d0d7de;
border-radius:6px;padding:10px 14px;font-size:.92em}
.scroll{overflow-x:auto} table{border-collapse:collapse;margin:.6em 0;font-size:.9em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 8px;white-space:nowrap} th{background:#f6f8fa} td.num{text-align:right}
tr:nth-child(even) td{background:#fbfcfd} img{max-width:100%;height:auto;border:1px solid #eaeef2;margin:.5em 0}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.82em} .fail{color:#cf222e}
nav a{margin-right:1em}
"""


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _inline_md(text: str) -> str:
    """The markdown a table cell or caption uses: **bold**, footnote marks [^n]."""
    out = _esc(text)
    while "**" in out:
        a = out.find("**")
        b = out.find("**", a + 2)
        if b < 0:
            break
        out = out[:a] + "<b>" + out[a + 2:b] + "</b>" + out[b + 2:]
    import re

    return re.sub(r"\[\^(\d+)\]", r"<sup>\1</sup>", out)


def md_to_html(md: str) -> str:
    """The output of ``kdbench table`` (pipe tables, captions, footnotes) as HTML."""
    parts, rows = [], []

    def flush():
        if not rows:
            return
        head, body = rows[0], rows[2:]
        cells = "".join(f"<th>{_inline_md(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f'<td class="{"num" if i else ""}">{_inline_md(c)}</td>'
                                       for i, c in enumerate(r)) + "</tr>" for r in body)
        parts.append(f'<div class="scroll"><table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table></div>')
        rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            cls = "card" if line.startswith("Protocol: ") else "caption"
            parts.append(f'<p class="{cls}">{_inline_md(line)}</p>')
    flush()
    return "\n".join(parts)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cost_gain_figure(records: list[dict], metric: str, eval: str = "val", select: str = "final"):
    """Δ of each method over the baseline (mean of the paired per-seed differences) against its extra step time
    over the baseline's (× baseline), one panel per pair: the Pareto view of "by how much, at what cost". None
    when no method has both."""
    from kdbench import stats
    from kdbench.plots import _pyplot
    from kdbench.tables.decide import _labels, seed_values
    from kdbench.tables.records import BASELINE, model_records, pair_order

    models = model_records(records)
    pairs = pair_order(records, {r["pair"] for r in records})
    points: dict[str, list] = {}
    for pair in pairs:
        base = models.get((BASELINE, pair)) or []
        base_vals = seed_values(records, BASELINE, pair, eval, metric, select)
        steps = [float((r.get("cost") or {}).get("step_time_s")) for r in base
                 if isinstance((r.get("cost") or {}).get("step_time_s"), (int, float))]
        if not steps or not base_vals:
            continue
        base_step = statistics.fmean(steps)
        for lab in _labels(records):
            if lab == BASELINE:
                continue
            mine = [float((r.get("cost") or {}).get("step_time_s")) for r in models.get((lab, pair), [])
                    if isinstance((r.get("cost") or {}).get("step_time_s"), (int, float))]
            p = stats.paired(seed_values(records, lab, pair, eval, metric, select), base_vals)
            if mine and p.n and math.isfinite(p.mean):
                points.setdefault(pair, []).append((lab, statistics.fmean(mine) / base_step, p))
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(5.2 * len(points), 3.8), squeeze=False)
    for ax, (pair, pts) in zip(axes[0], points.items()):
        for lab, x, p in pts:
            lo = p.mean - p.ci_low if p.ci_low is not None else 0
            hi = p.ci_high - p.mean if p.ci_high is not None else 0
            ax.errorbar([x], [p.mean], yerr=[[lo], [hi]], fmt="o", capsize=3, color="C0" if p.significant else "C7")
            ax.annotate(lab, (x, p.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("step time (× baseline)")
        ax.set_ylabel(f"Δ {metric} vs baseline (95% CI)")
        ax.set_title(pair, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{records[0]['suite']}: gain against cost (blue: interval excludes 0)", fontsize=10)
    return fig


def report(suite_dir: str | os.PathLike, suite_version: int | None = None, metric: str | None = None) -> str:
    """The HTML report of ``suite_dir`` (``<results>/<suite>``) as a string."""
    from kdbench.plots import cd_diagram, heatmap_figure, severity_figure
    from kdbench.results import load_suite_records, one_version
    from kdbench.tables import EVAL_KIND, TABLE_KINDS, make_table, status_table
    from kdbench.tables.paper import _choose_metric

    suite_dir = Path(suite_dir)
    records = one_version(load_suite_records(suite_dir, TABLE_KINDS + (EVAL_KIND,)), suite_dir, suite_version)
    version = records[0]["suite_version"]
    suite = records[0]["suite"]
    models = [r for r in records if r["kind"] != EVAL_KIND]
    metric = _choose_metric(models, metric, "val", "final")
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    def table(layout: str) -> str | None:
        try:
            return md_to_html(make_table(suite_dir, metric=metric if layout != "robustness" else None,
                                         suite_version=version, layout=layout))
        except ValueError:
            return None

    paper = md_to_html(make_table(suite_dir, metric=metric, suite_version=version))
    sections.append(("results", "Results", paper))
    summary = table("summary")
    cd = cd_diagram(models, metric)
    if summary:
        body = summary + (f'<img alt="critical-difference diagram" src="{_png(cd)}">' if cd is not None else
                          '<p class="caption">Critical-difference diagram: drawn from 3 pairs on.</p>')
        sections.append(("ranks", "Ranks over the pairs", body))
    if any(r["kind"] == EVAL_KIND for r in records):
        rob = table("robustness")
        if rob:
            figs = "".join(f'<img alt="{a}" src="{_png(f(records, None))}">'
                           for a, f in (("robustness against severity", severity_figure),
                                        ("drop from clean per corruption", heatmap_figure)))
            sections.append(("robustness", "Robustness", rob + figs))
    cost = table("cost")
    if cost:
        fig = cost_gain_figure(models, metric)
        sections.append(("cost", "Cost", cost + (f'<img alt="gain against cost" src="{_png(fig)}">'
                                                 if fig is not None else "")))
    status = status_table(suite_dir, tail=3)
    bad = sum(1 for r in records if r["status"] != "ok")
    sections.append(("status", "Runs", (f'<p class="fail">{bad} run(s) did not finish ok.</p>' if bad else
                                        "<p>Every run finished ok.</p>") + f"<pre>{_esc(status)}</pre>"))
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    body = "\n".join(f'<h2 id="{a}">{_esc(t)}</h2>\n{h}' for a, t, h in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(suite)} v{version}: kdbench report</title><style>{CSS}</style></head>\n"
            f"<body><main><h1>{_esc(suite)} v{version}</h1><nav>{nav}</nav>\n{body}\n"
            "<p class=\"caption\">Written by <code>kdbench report</code> from the run records; every number is "
            "in the records under runs/.</p></main></body></html>\n")


__all__ = ["report", "md_to_html", "cost_gain_figure"]
