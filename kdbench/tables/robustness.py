"""The robustness layout (``make_table(layout="robustness")``): per pair, one row per model that has corruption
results (eval records of the ``corruptions`` evaluation), the clean value beside the corruption summaries of
:mod:`kdbench.robustness` (mPC/rPC, or mCE/relative mCE for classification), mean ± std over seeds, Δ vs the
baseline, best in bold, and a caption saying where the corrupted images come from.

An eval record is shown only while it measured the evaluated model's current file and holds every severity of
its chunk (:func:`_eval_problem`); a note counts the others.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kdbench import stats

from kdbench.results import higher_is_better
from kdbench.tables.records import (BASELINE, EVAL_KIND, TASK_METRICS, TEACHER, in_order, metric_row,
                                    model_records, pair_order, recency, stat, teacher_sha_of_distill)
from kdbench.tables.render import (bold, check_format, csv_round, csv_text, dash, delta_text, excludes_zero, fmt_num,
                                   fmt_ref, latex_block, latex_escape, pipe_table, pm)

CORRUPTION_EVAL = "corruptions"
ROBUST_FAMILIES = ("noise", "blur", "weather", "digital")


@dataclass
class _Col:
    key: str  # summary key (robustness.performance_summary / error_summary)
    head: str
    higher: bool
    delta: bool = False
    ref: bool = False
    kind: str = "num"  # num | ratio (shown in %)


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
        sha = teacher_sha_of_distill([r for r in records if r["pair"] == p and r["kind"] == "distill"])
        if sha:
            loaded[p] = sha
    shown, left = [], Counter()
    for r in sorted((r for r in records if r["kind"] == EVAL_KIND and r["status"] == "ok"), key=recency):
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
    seeds: list[Any] = field(default_factory=list)  # the seed of each summary (None: a loaded teacher)
    cells: list[int] = field(default_factory=list)  # grid sizes
    ref: float | None = None
    ref_source: str = ""


def robustness_entries(records: list[dict], pair: str, metric: str) -> list[tuple[str, str, list[tuple[float, dict]]]]:
    """The models of ``pair`` that have corruption results: ``(label, method, [(clean value, grid)] per seed)``
    in table order (teacher first), ``grid`` = ``{(corruption, severity): value}`` of ``metric``."""
    return [(lab, method, [(c, g) for _, c, g in items]) for lab, method, items in _seeded_entries(records, pair, metric)]


def _seeded_entries(records: list[dict], pair: str, metric: str) -> list[tuple[str, str, list[tuple]]]:
    """:func:`robustness_entries` with each item's seed: ``(label, method, [(seed, clean value, grid)])``."""
    models = {k: v for k, v in model_records(records).items() if k[1] == pair}
    grids, orphans = _corruption_grids(records, metric)
    entries: list[tuple[str, str, int, list[tuple[float, dict]]]] = []
    labels = {lab for (lab, p) in models} | {lab for (lab, p, _) in orphans if p == pair}
    for lab in labels:
        recs = models.get((lab, pair), [])
        items = []
        for r in recs:
            m = metric_row(r.get("metrics"), "val", metric, "final")
            g = grids.get(r["run_id"])
            if m is not None and g:
                items.append((r.get("seed"), float(m["value"]), g))
        if lab == TEACHER and not recs:  # a loaded teacher: clean value from the distillation runs
            clean = None
            for r in in_order([r for r in records if r["pair"] == pair and r["kind"] == "distill"]):
                m = metric_row(r.get("teacher_metrics"), "val", metric, "final")
                if m is not None:
                    clean = float(m["value"])
                    break
            for (l2, p2, _), g in orphans.items():
                if l2 == TEACHER and p2 == pair and clean is not None and g:
                    items.append((None, clean, g))
        if items:
            method = recs[0]["method"] if recs else (TEACHER if lab == TEACHER else lab)
            index = -1 if lab == TEACHER else min((r.get("method_index", 0) for r in recs), default=0)
            entries.append((lab, method, index, items))
    entries.sort(key=lambda e: (e[2], e[0]))
    return [(lab, method, items) for lab, method, _, items in entries]


def _robustness_rows(records: list[dict], pair: str, metric: str, classification: bool, reference: str
                     ) -> tuple[list[_RowStats], list[str]]:
    from kdbench import robustness as RB

    models = {k: v for k, v in model_records(records).items() if k[1] == pair}
    notes: list[str] = []
    entries = [(lab, method, 0, items) for lab, method, items in _seeded_entries(records, pair, metric)]
    ref_clean = ref_grid = None
    if classification:
        ref = next((e for e in entries if e[0] == reference), None)
        if ref is None:
            notes.append(f"{pair}: no corruption results of the reference {reference!r}: mCE needs them")
        else:
            ref_clean = statistics.fmean(c for _, c, _ in ref[3])
            keys = set.intersection(*(set(g) for _, _, g in ref[3]))
            ref_grid = {k: statistics.fmean(g[k] for _, _, g in ref[3]) for k in keys}
    rows = []
    for lab, method, _, items in entries:
        st = _RowStats(lab, method)
        for seed, clean, g in items:
            st.seeds.append(seed)
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

    current = {r["run_id"] for (_, p), recs in model_records(records).items() if p == pair for r in recs}
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


def _fmt_stat(mean: float, std: float, n: int, decimals: int, fmt: str, best: bool) -> str:
    if not n:
        return dash(fmt)
    core = fmt_num(mean, decimals, fmt)
    if n > 1 and math.isfinite(std):
        core += pm(fmt) + fmt_num(std, decimals, fmt)
    return bold(core, fmt) if best else core


#: relative mCE rewards a model whose clean error is already high: a row whose clean value is this many points below
#: the reference row's is not marked best for it (a note says why)
REL_MCE_CLEAN_GAP = 5.0


def _summary_grid(rows: list[_RowStats], cols: list[_Col], decimals: int, baseline: str,
                  notes: list[str] | None = None, higher_clean: bool = True) -> dict[tuple[str, str], dict]:
    """(label, column key) -> mean, std, n, delta, best. A row whose clean value is :data:`REL_MCE_CLEAN_GAP`
    points worse than the reference (``baseline``) row's is not marked best for relative mCE; ``notes`` gets why."""
    out: dict[tuple[str, str], dict] = {}
    for st in rows:
        for c in cols:
            mean, std, n = stat([s.get(c.key, math.nan) for s in st.per_seed])
            if c.kind == "ratio":
                mean, std = 100 * mean, 100 * std  # rPC in %
            out[(st.label, c.key)] = {"mean": mean, "std": std, "n": n, "delta": None, "best": False}
    base = next((st.label for st in rows if st.label == baseline), None) or \
        next((st.label for st in rows if st.method == BASELINE), None)
    for c in cols:
        if c.delta and base is not None and out[(base, c.key)]["n"]:
            base_st = next(st for st in rows if st.label == base)
            scale = 100 if c.kind == "ratio" else 1
            base_vals = {sd: scale * s.get(c.key, math.nan) for sd, s in zip(base_st.seeds, base_st.per_seed)}
            for st in rows:
                cell = out[(st.label, c.key)]
                if st.label not in (base, TEACHER) and cell["n"]:
                    p = stats.paired({sd: scale * s.get(c.key, math.nan) for sd, s in zip(st.seeds, st.per_seed)},
                                     base_vals)
                    if p.n:  # paired by seed, as the paper table's Δ
                        cell["delta"], cell["n_paired"] = p.mean, p.n
                        cell["delta_ci"] = (p.ci_low, p.ci_high) if p.ci_low is not None else None
                        if p.unpaired and notes is not None and c.key in ("mCE", "mPC"):
                            notes.append(f"{st.label}: Δ {c.head} pairs {p.n} seed(s) with {base}; {p.unpaired} "
                                         "seed(s) only one side has are left out")
        eligible = [st for st in rows if st.label != TEACHER and out[(st.label, c.key)]["n"]]
        if c.key == "rel_mCE" and base is not None and out[(base, "clean")]["n"]:
            ref_clean = out[(base, "clean")]["mean"]
            weak = [st for st in eligible if (ref_clean - out[(st.label, "clean")]["mean"]) * (1 if higher_clean
                                                                                              else -1)
                    > REL_MCE_CLEAN_GAP]
            eligible = [st for st in eligible if st not in weak]
            for st in weak:
                if notes is not None:
                    notes.append(f"{st.label}: not marked best for rel. mCE: its clean value is more than "
                                 f"{REL_MCE_CLEAN_GAP:g} points below {base}'s, and rel. mCE rewards a high clean "
                                 "error")
        cand = [out[(st.label, c.key)] for st in eligible]
        if len(cand) > 1:
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
    check_format(fmt)
    task = records[0].get("task")
    metric = metric or TASK_METRICS.get(task)
    if metric is None:
        raise ValueError(f"no main metric known for task {task!r}; pass metric=")
    if not any(r["kind"] == EVAL_KIND for r in records):
        raise ValueError("no corruption results in these records (no eval record): run the robustness sweep first")
    classification = task == "classification"
    higher = higher_is_better([r for r in records if r["kind"] != EVAL_KIND], metric, "val")
    pairs = pair_order(records, {r["pair"] for r in records})
    suite, version = records[0]["suite"], records[0]["suite_version"]
    blocks, csv_rows = [], []
    for pair in pairs:
        rows, notes = _robustness_rows(records, pair, metric, classification, reference)
        if not rows:
            continue
        cols = _robust_cols(classification, metric, rows, higher)
        grid = _summary_grid(rows, cols, decimals, reference if classification else BASELINE, notes, higher)
        caption = (f"{suite} v{version}, {pair}: corruption robustness ("
                   + ("CE normalised by " + reference + ", the reference model, its errors averaged over its "
                      "seeds; mCE, rel. mCE and CE per family in %, lower is better; rel. mCE measures the errors "
                      "added by corruption over each model's own clean error, so it rewards a model whose clean "
                      "error is already high" if classification else
                      f"mPC = mean {metric} over 15 corruptions × severities, rPC = mPC / clean in %; families: "
                      f"mean {metric}")
                   + "; extra corruptions apart). Cells: mean ± std over seeds; Δ: mean over seeds of (method − "
                   "reference), paired by seed, [95% CI] (Student t) from two paired seeds, *: it excludes 0; bold: "
                   "best (teacher excluded).")
        source = _corruption_source(records, pair, metric, classification)
        caption += f" {source}" if source else ""
        if fmt == "csv":
            for st in rows:
                for c in cols:
                    g = grid[(st.label, c.key)]
                    csv_rows.append({"suite": suite, "suite_version": version, "pair": pair, "row": st.label,
                                     "method": st.method, "column": c.key,
                                     "mean": csv_round(g["mean"]) if g["n"] else None,
                                     "std": csv_round(g["std"]) if g["n"] > 1 else None, "n": g["n"],
                                     "delta": None if g["delta"] is None else csv_round(g["delta"]),
                                     "delta_ci_low": None if not g.get("delta_ci") else csv_round(g["delta_ci"][0]),
                                     "delta_ci_high": None if not g.get("delta_ci") else csv_round(g["delta_ci"][1]),
                                     "n_paired": g.get("n_paired") if g["delta"] is not None else None,
                                     "significant": "" if not g.get("delta_ci") else excludes_zero(g["delta_ci"]),
                                     "best": g["best"],
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
                    line.append(delta_text(g["delta"], g.get("delta_ci"), decimals, fmt))
                if c.ref:
                    line.append("" if st.ref is None else fmt_ref(st.ref, fmt))
            line.append(str(len(st.per_seed)))
            body.append(line)
        if fmt == "md":
            text = pipe_table(body, headers)
            extra = [f"- {n}" for n in notes] + [f"- ref. ({st.label}): {st.ref_source}" for st in rows
                                                  if st.ref is not None and st.ref_source]
            blocks.append("\n".join([text, "", caption] + (["", *extra] if extra else [])))
        else:
            blocks.append(latex_block(caption, headers, body, notes))
    if fmt == "csv":
        cols_csv = ["suite", "suite_version", "pair", "row", "method", "column", "mean", "std", "n", "delta",
                    "delta_ci_low", "delta_ci_high", "n_paired", "significant", "best", "reference", "reference_source",
                    "reference_model", "corruption_source"]
        return csv_text(csv_rows, cols_csv)
    if not blocks:
        raise ValueError("no model has both a clean result and corruption results")
    return "\n\n".join(blocks)
