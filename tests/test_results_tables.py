"""Records (kdbench.results) and paper tables (kdbench.tables) on hand-made records; torch-free.

The golden markdown table is tests/golden/table_basic.md. Regenerate it only on purpose:
KDBENCH_REGEN_GOLDEN=1 pytest tests/test_results_tables.py -k golden
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from kdbench import results as R
from kdbench.results import (RECORD_SCHEMA, STATUSES, RecordError, error_line, iter_records, load_records,
                             read_record, write_json_atomic, write_record)
from kdbench.tables import CSV_COLUMNS, latex_escape, make_table, status_table

GOLDEN = Path(__file__).parent / "golden"
P0, P1 = "resnet32x4→resnet8x4", "wrn_40_2→wrn_16_2"
TRACEBACK = ('Traceback (most recent call last):\n  File "kdbench/runner.py", line 159, in run_one\n'
             '    _run(spec, results, run_dir, record)\n    ^^^^^^^^^^^^^^^^^\n'
             "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")


def make_record(label="kd", pair_index=0, seed=0, value: float | None = 70.0, *, method=None, method_index=None,
                status="ok", error=None, kind="distill", suite="s", suite_version=1, metric="top1",
                higher_is_better=True, teacher_value=None, reference=(), params=None, finished="2025-01-01T12:00:00",
                metrics=None, pair=None) -> dict:
    """A complete schema-1 record; ``value`` is the (val, final) metric (best = value + 0.5)."""
    method = method or ("baseline" if label in ("baseline", "teacher") else label)
    pair = pair or [P0, P1][pair_index]
    if method_index is None:
        method_index = -1 if kind == "teacher" else {"baseline": 0, "kd": 1, "dkd": 2}.get(label, 3)
    if metrics is None:
        metrics = [] if value is None or status != "ok" else [
            {"eval": "val", "metric": metric, "select": "final", "value": value, "higher_is_better": higher_is_better},
            {"eval": "val", "metric": metric, "select": "best", "value": value + 0.5,
             "higher_is_better": higher_is_better}]
    teacher = None
    teacher_metrics = []
    if teacher_value is not None:
        teacher = {"model": "kdbench:resnet32x4", "weights": "ckpt/t.pt", "sha256": f"sha{pair_index}", "params": 7}
        teacher_metrics = [{"eval": "val", "metric": metric, "select": "final", "value": teacher_value,
                            "higher_is_better": higher_is_better}]
    params = params if params is not None else {}
    rid = hashlib.sha256(json.dumps([suite, suite_version, kind, label, pair, seed, params, method],
                                    sort_keys=True).encode()).hexdigest()[:16]
    return {
        "schema": 1, "run_id": rid, "kind": kind, "suite": suite, "suite_version": suite_version,
        "task": "classification", "method": method, "label": label, "method_index": method_index,
        "method_version": 1, "params": params, "pair": pair, "pair_index": pair_index, "teacher": teacher,
        "student": {"model": "kdbench:resnet8x4", "params": 1}, "seed": seed, "recipe": {"epochs": 240},
        "data": {"name": "cifar100"}, "status": status, "error": error, "metrics": metrics,
        "teacher_metrics": teacher_metrics, "reference": list(reference),
        "cost": {"wall_time_s": 1.0, "step_time_s": 0.01, "peak_mem_mb": 10.0, "extra_params": 0},
        "env": {"git_sha": "abc", "git_dirty": False, "device": "cpu"}, "scheduler": {},
        "started_at": "2025-01-01T10:00:00", "finished_at": finished,
    }


def save(suite_dir: Path, *records: dict) -> None:
    for rec in records:
        write_record(suite_dir / "runs" / rec["run_id"], rec)


def basic_suite(suite_dir: Path) -> None:
    """2 pairs × (baseline, kd, dkd) × 3 seeds; dkd fails on every seed of pair 1, diverges once on pair 0.

    Pair 0's teacher is loaded (its evaluation comes with the distillation records), pair 1's teacher is
    trained by the suite (a teacher-kind run). kd and dkd on pair 0 and the pair-1 teacher carry references.
    """
    vals = {("baseline", 0): [72.0, 72.4, 72.2], ("kd", 0): [73.0, 73.5, 74.0], ("dkd", 0): [74.1, 74.3, None],
            ("baseline", 1): [73.0, 73.3, 73.6], ("kd", 1): [74.0, 74.2, 74.4], ("dkd", 1): [None, None, None]}
    refs = {("kd", 0): [{"metric": "top1", "value": 73.33, "source": "CRD, Table 1"},
                        {"metric": "top5", "value": 93.0, "source": "CRD, Table 1"}],
            ("dkd", 0): [{"metric": "top1", "value": 76.32, "source": "DKD, Table 1"}]}
    recs = []
    for (label, p), values in vals.items():
        for seed, v in enumerate(values):
            status, err = "ok", None
            if v is None:
                status = "diverged" if (p == 0 or seed == 2) else "failed"
                err = ("kdbench.train.Diverged: non-finite loss at epoch 3 step 17" if status == "diverged"
                       else TRACEBACK)
            tv = (79.42 if p == 0 else 75.61) if label != "baseline" else None
            recs.append(make_record(label, p, seed, v, status=status, error=err, teacher_value=tv,
                                    reference=refs.get((label, p), ())))
    recs.append(make_record("teacher", 1, 0, 75.61, kind="teacher",
                            reference=[{"metric": "top1", "value": 75.61, "source": "CRD, Table 1"}]))
    save(suite_dir, *recs)


# --------------------------------------------------------------------------------------------- records
def test_write_record_atomic_and_crash_keeps_old(tmp_path, monkeypatch):
    old = make_record(value=71.0)
    run = tmp_path / "s" / "runs" / old["run_id"]
    write_record(run, old)
    assert sorted(p.name for p in run.iterdir()) == ["record.json"]
    assert read_record(run) == old

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # the temporary file is written, not yet renamed
    with pytest.raises(OSError, match="disk full"):
        write_record(run, make_record(value=99.0))
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["record.json"], "temp file left behind"
    assert read_record(run)["metrics"][0]["value"] == 71.0


def test_write_json_atomic_replaces_and_serialises_paths(tmp_path):
    p = tmp_path / "deep" / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2, "path": tmp_path})
    assert json.loads(p.read_text()) == {"a": 2, "path": str(tmp_path)}
    assert os.listdir(p.parent) == ["x.json"]
    with pytest.raises(TypeError, match="object"):
        write_json_atomic(p, {"bad": object()})
    assert json.loads(p.read_text())["a"] == 2 and os.listdir(p.parent) == ["x.json"]


def test_write_record_validates(tmp_path):
    rec = make_record()
    del rec["seed"], rec["metrics"]
    with pytest.raises(RecordError, match="missing key.*seed.*metrics|missing key.*metrics"):
        write_record(tmp_path / "r", rec)
    with pytest.raises(RecordError, match="status 'crashed' is not one of ok, failed, diverged, timeout"):
        write_record(tmp_path / "r", {**make_record(), "status": "crashed"})
    bad_metric = make_record()
    del bad_metric["metrics"][0]["higher_is_better"]
    with pytest.raises(RecordError, match=r"metrics\[0\] lacks higher_is_better"):
        write_record(tmp_path / "r", bad_metric)
    assert not (tmp_path / "r" / "record.json").exists()
    assert RECORD_SCHEMA == 1 and STATUSES == ("ok", "failed", "diverged", "timeout")


def test_read_missing_and_corrupt(tmp_path):
    assert read_record(tmp_path / "nothing") is None
    run = tmp_path / "s" / "runs" / "r1"
    run.mkdir(parents=True)
    text = json.dumps(make_record())
    (run / "record.json").write_text(text[: len(text) // 2])  # a partial write
    with pytest.raises(RecordError) as e:
        read_record(run)
    assert str(run / "record.json") in str(e.value) and "corrupt or partial" in str(e.value)
    with pytest.raises(RecordError, match="record.json"):
        list(iter_records(tmp_path / "s"))
    with pytest.raises(RecordError, match="record.json"):
        make_table(tmp_path / "s")
    (run / "record.json").write_text(json.dumps({**make_record(), "schema": 2}))
    with pytest.raises(RecordError, match="schema is 2"):
        read_record(run)


def test_load_records_frames(tmp_path):
    basic_suite(tmp_path / "s")
    runs, metrics = load_records(tmp_path / "s")
    assert len(runs) == 19 and runs["run_id"].is_unique
    assert list(runs.columns) == list(R.RUN_COLUMNS) and list(metrics.columns) == list(R.METRIC_COLUMNS)
    # one metric row per (run, eval, metric, select); failed runs have none
    assert len(metrics) == 2 * (runs["status"] == "ok").sum()
    assert not metrics.duplicated(["run_id", "eval", "metric", "select"]).any()
    row = metrics[(metrics["label"] == "kd") & (metrics["pair"] == P0) & (metrics["seed"] == 1)
                  & (metrics["select"] == "best")]
    assert row["value"].tolist() == [74.0] and row["status"].tolist() == ["ok"]
    failed = runs[(runs.label == "dkd") & (runs.pair_index == 1) & (runs.status == "failed")]
    assert set(failed["error_line"]) == {"RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert runs.loc[runs.label == "kd", "teacher_sha256"].isin(["sha0", "sha1"]).all()


def test_no_records_error_names_path_and_layout(tmp_path):
    (tmp_path / "res" / "cifar" / "runs" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        load_records(tmp_path / "res")
    msg = str(e.value)
    assert str(tmp_path / "res") in msg and "<results>/<suite>/runs/<run_id>/record.json" in msg
    assert "cifar" in msg  # the folder given is a results folder: the suite inside is named
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_table(tmp_path / "nope")


def test_error_line():
    assert error_line(TRACEBACK) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    cut = TRACEBACK[40:]  # a traceback tail cut mid-frame
    assert error_line(cut) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert error_line("plain message\nsecond") == "plain message"
    assert error_line(None) == "" and error_line("x" * 500, width=10) == "x" * 9 + "…"


# --------------------------------------------------------------------------------------------- tables
def test_golden_markdown(tmp_path):
    basic_suite(tmp_path / "s")
    out = make_table(tmp_path / "s")
    golden = GOLDEN / "table_basic.md"
    if os.environ.get("KDBENCH_REGEN_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out + "\n", encoding="utf-8")
    assert out + "\n" == golden.read_text(encoding="utf-8")


def test_markdown_cells_hand_checked(tmp_path):
    basic_suite(tmp_path / "s")
    out = make_table(tmp_path / "s")
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in out.splitlines()
             if ln.startswith("| ") and not ln.startswith("| Method")}
    # headers: pair0 value, Δ, ref. | pair1 value, Δ, ref.
    assert lines["baseline"][:2] == ["72.20 ± 0.20 (n=3)", ""]
    # Δ paired by seed: 1.0, 1.1, 1.8 -> mean 1.30, sd 0.436, t(0.975, 2) = 4.303: ±1.083
    assert lines["kd"][:3] == ["73.50 ± 0.50 (n=3)", "+1.30 [+0.22, +2.38]*", "73.33[^1]"]
    # sample std of 74.1, 74.3; Δ pairs seeds 0, 1 (2.1, 1.9): its seed 2 diverged, a footnote says it is left out
    assert lines["dkd"][0] == "**74.20 ± 0.14** (n=2)[^2][^3]" and lines["dkd"][1] == "+2.00 [+0.73, +3.27]*"
    assert lines["dkd"][3] == "—[^5]" and lines["dkd"][4] == ""  # all failed: no Δ
    assert lines["kd"][3:5] == ["**74.20 ± 0.20** (n=3)", "+0.90 [+0.65, +1.15]*"]  # diffs 1.0, 0.9, 0.8
    assert lines["teacher"][0] == "79.42" and lines["teacher"][3] == "75.61 (n=1)"
    assert list(lines) == ["teacher", "baseline", "kd", "dkd"]
    assert "[^5]: dkd, wrn_40_2→wrn_16_2: no run finished ok (1 diverged, 2 failed); first error: RuntimeError: " \
           "CUDA out of memory" in out
    assert "[^2]: dkd, resnet32x4→resnet8x4: 2 of 3 runs ok (1 diverged); first error: kdbench.train.Diverged" in out
    assert sum("CRD, Table 1" in ln for ln in out.splitlines() if ln.startswith("[^")) == 1  # shared footnote


def test_std_n_and_delta_in_csv(tmp_path):
    s = tmp_path / "s"
    save(s, *[make_record("baseline", 0, i, v) for i, v in enumerate([1.0, 2.0, 4.0])],
         *[make_record("kd", 0, i, v) for i, v in enumerate([5.0, 6.0])], make_record("dkd", 0, 0, 3.0))
    df = pd.read_csv(io.StringIO(make_table(s, fmt="csv")))
    assert list(df.columns) == list(CSV_COLUMNS)
    by = df.set_index("row")
    assert by.loc["baseline", "n"] == 3 and by.loc["baseline", "mean"] == pytest.approx(7 / 3)
    assert by.loc["baseline", "std"] == pytest.approx(math.sqrt(7 / 3))  # ddof=1: 4.667/2; population would be 1.247
    assert by.loc["kd", "std"] == pytest.approx(math.sqrt(0.5)) and by.loc["kd", "n"] == 2
    assert math.isnan(by.loc["dkd", "std"]) and by.loc["dkd", "n"] == 1
    # Δ pairs by seed: kd's seeds 0, 1 against the baseline's (5 - 1, 6 - 2): +4 and +4; dkd's seed 0: 3 - 1
    assert by.loc["kd", "delta"] == pytest.approx(4.0) and math.isnan(by.loc["baseline", "delta"])
    assert by.loc["kd", "n_paired"] == 2 and by.loc["kd", "delta_ci_low"] == by.loc["kd", "delta_ci_high"] == 4.0
    assert bool(by.loc["kd", "significant"]) is True
    assert by.loc["dkd", "delta"] == pytest.approx(2.0) and by.loc["dkd", "n_paired"] == 1
    assert math.isnan(by.loc["dkd", "delta_ci_low"]) and pd.isna(by.loc["dkd", "significant"])
    assert by["best"].tolist() == [False, True, False]
    md = make_table(s)
    assert "2.33 ± 1.53 (n=3)" in md and "**5.50 ± 0.71** (n=2)" in md and " 3.00 (n=1)" in md
    assert "+4.00 [+4.00, +4.00]*" in md and md.splitlines()[4].rstrip(" |").endswith("+2.00")  # n = 1: no CI
    assert "kd, resnet32x4→resnet8x4: Δ pairs 2 seed(s) with the baseline; 1 seed(s) only one side finished" in md


def test_csv_of_basic_suite(tmp_path):
    basic_suite(tmp_path / "s")
    df = pd.read_csv(io.StringIO(make_table(tmp_path / "s", fmt="csv")))
    assert len(df) == 8  # (teacher + 3 methods) × 2 pairs
    assert df[["row", "pair"]].values.tolist()[:4] == [["teacher", P0], ["teacher", P1], ["baseline", P0],
                                                       ["baseline", P1]]
    dkd1 = df[(df.row == "dkd") & (df.pair == P1)].iloc[0]
    assert dkd1["n"] == 0 and dkd1["n_runs"] == 3 and math.isnan(dkd1["mean"]) and "no run finished ok" in dkd1["note"]
    kd0 = df[(df.row == "kd") & (df.pair == P0)].iloc[0]
    assert kd0["delta"] == pytest.approx(1.3) and kd0["reference"] == 73.33 and kd0["reference_source"] == "CRD, Table 1"
    assert df.groupby("pair")["best"].sum().tolist() == [1, 1]


def test_latex_booktabs_and_escaping(tmp_path):
    basic_suite(tmp_path / "s")
    tex = make_table(tmp_path / "s", fmt="latex")
    for needed in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}",
                   r"\cmidrule(lr){2-4}", r"\multicolumn{3}{c}{wrn\_40\_2$\rightarrow$wrn\_16\_2}",
                   r"\textbf{74.20 $\pm$ 0.14} (n=2)$^{2}$", "---$^{5}$", r"$\Delta$"):
        assert needed in tex, needed
    body = [ln for ln in tex.splitlines() if not ln.startswith("%")]
    assert not any("_" in ln.replace(r"\_", "") for ln in body)  # every underscore escaped
    assert tex.splitlines()[1] == r"\begin{tabular}{lrrr rrr}"
    assert latex_escape("kd_50% & $x#{}") == r"kd\_50\% \& \$x\#\{\}"
    assert latex_escape("a~b^c\\") == r"a\textasciitilde{}b\textasciicircum{}c\textbackslash{}"


def test_best_respects_lower_is_better(tmp_path):
    s = tmp_path / "s"
    recs = [make_record(label, 0, seed, v + seed * 0.01, metric="loss", higher_is_better=False)
            for label, v in (("baseline", 1.5), ("kd", 0.9), ("dkd", 1.2)) for seed in range(2)]
    save(s, *recs)
    md = make_table(s)
    assert "**0.91 ± 0.01** (n=2)" in md and "**1.51" not in md and "**1.21" not in md
    assert "lower is better" in md and "-0.60" in md  # Δ is the raw difference of means
    csv = pd.read_csv(io.StringIO(make_table(s, fmt="csv"))).set_index("row")
    assert bool(csv.loc["kd", "best"]) and not csv.loc["baseline", "best"] and not csv.loc["kd", "higher_is_better"]


def test_mixing_suite_versions_refused(tmp_path):
    s = tmp_path / "s"
    save(s, make_record("baseline", 0, 0, 70.0, suite_version=1), make_record("baseline", 0, 0, 71.0, suite_version=2),
         make_record("kd", 0, 0, 72.0, suite_version=2))
    with pytest.raises(ValueError, match=r"suite versions 1, 2.*suite_version"):
        make_table(s)
    assert "71.00 (n=1)" in make_table(s, suite_version=2) and "72.00" in make_table(s, suite_version=2)
    assert "70.00" in make_table(s, suite_version=1)
    with pytest.raises(ValueError, match="no record of suite version 3; versions found: 1, 2"):
        make_table(s, suite_version=3)


def test_single_pair_metric_select_and_errors(tmp_path):
    s = tmp_path / "s"
    save(s, *[make_record(lbl, 0, seed, 70.0 + i + seed) for i, lbl in enumerate(("baseline", "kd")) for seed in (0, 1)])
    md = make_table(s)
    assert md.splitlines()[0].split("|")[2].strip() == "top1"  # one pair: the column is the metric
    assert "top1 (eval val, final epoch; higher is better) on resnet32x4→resnet8x4" in md
    assert "71.00 ± 0.71 (n=2)" in make_table(s, select="best")  # best = final + 0.5
    with pytest.raises(ValueError, match="no record has metric 'AP'.*available: top1 \\(eval val, select best\\)"):
        make_table(s, metric="AP")
    for kw, msg in (({"fmt": "html"}, "unknown format"), ({"layout": "wide"}, "unknown layout"),
                    ({"select": "last"}, "unknown select")):
        with pytest.raises(ValueError, match=msg):
            make_table(s, **kw)


def test_older_configuration_not_mixed(tmp_path):
    s = tmp_path / "s"
    old = [make_record("kd", 0, seed, 60.0, params={"tau": 2}, finished="2025-01-01T00:00:00") for seed in (0, 1)]
    new = [make_record("kd", 0, seed, 70.0 + seed, params={"tau": 4}, finished="2025-02-01T00:00:00") for seed in (0,)]
    save(s, *old, *new)
    md = make_table(s)
    assert "70.00 (n=1)[^1]" in md and "60" not in md.split("\n\n")[0]
    assert "2 record(s) of an older configuration or method version ignored" in md


def test_all_failed_table_still_renders(tmp_path):
    s = tmp_path / "s"
    save(s, make_record("kd", 0, 0, None, status="timeout", error="job timed out after 60 min"))
    md = make_table(s)
    assert "| kd       |  —[^1] |" in md
    assert "no run finished ok (1 timeout); first error: job timed out after 60 min" in md
    assert "top1 (eval val" in md  # the task's main metric when no ok record names one


def test_method_x_domain_layout(tmp_path):
    s = tmp_path / "s"
    recs = [make_record("baseline", 0, 0, 40.0, method_index=0)]
    for i, (label, method, dom, v) in enumerate((("cwd", "cwd", "spatial", 41.8), ("cwd-dwt", "cwd", "dwt", 42.0),
                                                  ("pkd", "pkd", "spatial", 42.0), ("pkd-dwt", "pkd", "dwt", 42.1))):
        recs.append(make_record(label, 0, 0, v, method=method, method_index=i + 1,
                                params={"domain": dom, "weight": 10.0}))
    recs.append(make_record("freekd", 0, 0, 42.4, method_index=5, params={"gamma": 1.0}))
    save(s, *recs)
    md = make_table(s, layout="method_x_domain")
    head = [c.strip() for c in md.splitlines()[0].split("|")[1:-1]]
    assert head == ["Method", "spatial", "Δ", "dwt", "Δ", "other", "Δ"]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in md.splitlines()[2:]
            if ln.startswith("|")}
    assert list(rows) == ["baseline", "cwd", "pkd", "freekd"]
    assert rows["cwd"] == ["41.80 (n=1)", "+1.80", "42.00 (n=1)", "+2.00", "", ""]
    assert rows["pkd"][2] == "**42.10** (n=1)" and rows["cwd"][0] == "41.80 (n=1)"
    assert rows["freekd"][4] == "**42.40** (n=1)" and rows["baseline"][4] == "40.00 (n=1)"
    csv = pd.read_csv(io.StringIO(make_table(s, layout="method_x_domain", fmt="csv")))
    assert sorted(csv["domain"].tolist()) == ["dwt", "dwt", "other", "other", "spatial", "spatial"]
    save(s, make_record("cwd-w5", 0, 0, 41.0, method="cwd", method_index=6, params={"domain": "spatial", "weight": 5.0}))
    with pytest.raises(ValueError, match="one entry per \\(method, domain\\).*cwd, cwd-w5"):
        make_table(s, layout="method_x_domain")


def test_status_table(tmp_path):
    s = tmp_path / "s"
    basic_suite(s)
    pending = s / "runs" / "zz_pending"
    pending.mkdir()
    (pending / "spec.json").write_text(json.dumps({"label": "kd", "pair": P1, "seed": 7, "suite_version": 1,
                                                   "pair_index": 1, "method_index": 1, "kind": "distill"}))
    broken = s / "runs" / "zz_broken"
    broken.mkdir()
    (broken / "record.json").write_text("{")
    out = status_table(s)
    assert "RuntimeError: CUDA out of memory" in out and "no record" in out and "corrupt" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("zz_pend"))
    assert line.split()[1:6] == ["1", "distill", "kd", P1, "7"]
    assert out.splitlines()[-1].endswith("21 run(s) in " + str(s / "runs") + ": 15 ok, 2 failed, 2 diverged, "
                                         "1 corrupt, 1 no record")
    with pytest.raises(FileNotFoundError):
        status_table(tmp_path / "empty")


def test_tables_module_is_torch_free():
    import subprocess

    code = ("import sys, kdbench.tables, kdbench.results; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fast_renderers_match_tabulate_and_pandas():
    """status and csv tables are written without tabulate's / pandas' per-cell machinery (10,000-run suites);
    the text must be exactly theirs, tricky cells included (wide characters, quotes, missing values, bool cells
    and line breaks, which go back to tabulate)."""
    from tabulate import tabulate

    from kdbench.tables.render import csv_text
    from kdbench.tables.status import _simple_table

    headers = ["run", "v", "label", "pair", "seed", "status", "error"]
    cases = [[["abcdefgh", 1, "kd", P0, 0, "ok", ""], ["zz", None, " lead", "漢字→ｶﾅ", 12, "failed", "E: x,y"]],
             [["a", "", "True", "p", 1, "ok", ""]], [["a", "", "x\ny", "p", 1, "ok", ""]], []]
    for rows in cases:
        assert _simple_table(rows, headers) == tabulate(rows, headers=headers, tablefmt="simple",
                                                        disable_numparse=True)
    rows = [{"a": 1, "b": 72.31, "c": None, "d": True, "e": 'q"x,y', "f": 3, "g": math.nan},
            {"a": 2, "b": None, "c": None, "d": False, "e": "line\nbreak", "f": 4.5, "g": "s"},
            {"a": 3, "b": 1e16, "c": None, "d": None, "e": "→", "f": None, "g": 10**20}]
    for cols in (list("abcdefg"), list("ab"), ["a", "zz"]):
        for sub in (rows, rows[:1], []):
            assert csv_text(sub, cols) == pd.DataFrame(sub, columns=cols).to_csv(
                index=False, lineterminator="\n").rstrip("\n")


def test_table_and_status_commands_import_neither_torch_nor_pandas(tmp_path):
    """`kdbench table/status` on 10,000 records must start fast: pandas (~0.3-0.6 s to import) and torch stay out."""
    import subprocess

    basic_suite(tmp_path / "s")
    code = ("import sys; from kdbench.cli import main; main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'pandas') if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    for args in (["table", str(tmp_path / "s")], ["table", str(tmp_path / "s"), "--format", "csv"],
                 ["table", str(tmp_path / "s"), "--layout", "cost"], ["status", str(tmp_path / "s")]):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert p.returncode == 0, (args, p.stderr[-500:])
