"""Robustness and cost tables (kdbench.tables layouts) and robustness figures (kdbench.plots), from hand-made
records; torch-free."""

from __future__ import annotations

import hashlib
import json
import math
import statistics

import pandas as pd
import pytest

from kdbench import results as R
from kdbench import robustness as RB
from kdbench.tables import make_table
from test_results_tables import P0, make_record, save


@pytest.fixture(autouse=True)
def _eval_kind(monkeypatch):
    """Eval records (kind "eval", contract 4) are accepted by the record schema once the run graph lands."""
    if "eval" not in R.KINDS:  # (kept for older branches; results.KINDS has it)
        monkeypatch.setattr(R, "KINDS", R.KINDS + ("eval",))


def eval_record(target: dict, grid: dict, metric="top1", corruptions=None) -> dict:
    rows = [{"eval": "corruptions", "corruption": c, "severity": s, "metric": metric, "select": "final",
             "value": v, "higher_is_better": True} for (c, s), v in grid.items()
            if corruptions is None or c in corruptions]
    rec = json.loads(json.dumps(target))
    rid = hashlib.sha256((target["run_id"] + json.dumps(sorted(corruptions or []))).encode()).hexdigest()[:16]
    rec.update(run_id=rid, kind="eval", target=target["run_id"], metrics=rows, teacher_metrics=[], reference=[])
    # the file it measured, as the runner records it: the target's model.pt, or a loaded teacher's checkpoint (the
    # sha256 make_record gives the teacher of pair i: "sha<i>")
    rec["student"]["sha256"] = ((target.get("artifact") or {}).get("sha256")
                                or (f"sha{target['pair_index']}" if target["label"] == "teacher" else None))
    return rec


def _det(label, seed, clean, kind="distill"):
    r = make_record(label, 0, seed, clean, kind=kind, metric="AP")
    r["task"] = "detection"
    return r


def detection_suite(d):
    """baseline seeds 0/1 (AP 40, 42; corrupted AP = clean/2 - severity), kd (44; 25 everywhere), teacher (50; 30),
    plus spatter (extra) at 5 for kd."""
    recs = []
    for label, seed, clean, kind in (("baseline", 0, 40.0, "distill"), ("baseline", 1, 42.0, "distill"),
                                     ("kd", 0, 44.0, "distill"), ("teacher", 0, 50.0, "teacher")):
        t = _det(label, seed, clean, kind)
        if label == "baseline":
            grid = {(c, s): clean / 2 - s for c in RB.BENCHMARK for s in RB.SEVERITIES}
        else:
            grid = {(c, s): (25.0 if label == "kd" else 30.0) for c in RB.BENCHMARK for s in RB.SEVERITIES}
        if label == "kd":
            grid.update({("spatter", s): 5.0 for s in RB.SEVERITIES})
        # one eval record per corruption chunk, as the run graph makes them
        recs += [t] + [eval_record(t, grid, "AP", [c]) for c in RB.ALL if any(k[0] == c for k in grid)]
    save(d, *recs)


def test_robustness_table_detection_by_hand(tmp_path):
    detection_suite(tmp_path / "s")
    md = make_table(tmp_path / "s", layout="robustness")
    lines = md.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["Method", "clean AP", "mPC", "Δ", "rPC", "noise", "blur", "weather", "digital", "extra", "n"]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")] for l in lines[2:5]}
    assert list(rows) == ["teacher", "baseline", "kd"]
    # baseline: mPC per seed 17, 18 -> 17.50 ± 0.71; rPC 17/40 = 42.50 %, 18/42 = 42.857 % -> 42.68 ± 0.25
    assert rows["baseline"][1:6] == ["41.00 ± 1.41", "17.50 ± 0.71", "", "42.68 ± 0.25", "17.50 ± 0.71"]
    # Δ pairs by seed: kd has seed 0 only, against the baseline's seed 0 (mPC 17): +8.00, no interval (n = 1)
    assert rows["kd"][1:6] == ["**44.00**", "**25.00**", "+8.00", "**56.82**", "**25.00**"]
    assert rows["kd"][9:] == ["5.00", "1"] and rows["baseline"][9] == "—"
    assert rows["teacher"][2] == "30.00" and rows["teacher"][3] == ""
    assert "mPC = mean AP over 15 corruptions" in md and "sweep not finished" not in md
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="robustness", fmt="csv")))
    b = csv[(csv.row == "baseline") & (csv.column == "rPC")].iloc[0]
    assert b["mean"] == pytest.approx(100 * (17 / 40 + 18 / 42) / 2) and b["n"] == 2
    kd_mpc = csv[(csv.row == "kd") & (csv.column == "mPC")].iloc[0]
    assert kd_mpc["delta"] == pytest.approx(8.0) and kd_mpc["n_paired"] == 1 and math.isnan(kd_mpc["delta_ci_low"])
    tex = make_table(tmp_path / "s", layout="robustness", fmt="latex")
    assert r"\textbf{25.00}" in tex and r"17.50 $\pm$ 0.71" in tex and r"\begin{tabular}" in tex


def test_robustness_table_classification_mce_vs_reference(tmp_path):
    base = make_record("baseline", 0, 0, 70.0)
    kd = make_record("kd", 0, 0, 75.0)
    ref_grid = {("gaussian_noise", 1): 50.0, ("gaussian_noise", 2): 40.0, ("fog", 1): 60.0, ("fog", 2): 50.0}
    kd_grid = {("gaussian_noise", 1): 60.0, ("gaussian_noise", 2): 50.0, ("fog", 1): 70.0, ("fog", 2): 65.0}
    save(tmp_path / "s", base, kd, eval_record(base, ref_grid), eval_record(kd, kd_grid))
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="robustness", fmt="csv")))
    get = lambda row, col: csv[(csv.row == row) & (csv.column == col)].iloc[0]
    assert get("baseline", "mCE")["mean"] == pytest.approx(100.0)
    assert get("kd", "mCE")["mean"] == pytest.approx(100 * ((90 / 110) + (65 / 90)) / 2)
    assert get("kd", "rel_mCE")["mean"] == pytest.approx(100 * (40 / 50 + 15 / 30) / 2)
    assert get("kd", "noise")["mean"] == pytest.approx(100 * 90 / 110)
    assert bool(get("kd", "mCE")["best"]) and get("kd", "mCE")["delta"] == pytest.approx(
        100 * ((90 / 110) + (65 / 90)) / 2 - 100)
    assert set(csv.reference_model) == {"baseline"}
    md = make_table(tmp_path / "s", layout="robustness")
    assert "CE normalised by baseline" in md and "rel. mCE" in md
    # another reference row
    md2 = make_table(tmp_path / "s", layout="robustness", reference="kd")
    assert "CE normalised by kd" in md2


def test_robustness_table_notes_unfinished_sweep_and_refuses_without_evals(tmp_path):
    a, b = make_record("baseline", 0, 0, 70.0), make_record("kd", 0, 0, 72.0)
    full = {(c, s): 50.0 for c in RB.BENCHMARK for s in (1, 2)}
    half = {k: v for k, v in full.items() if k[0] in RB.FAMILIES["noise"]}
    save(tmp_path / "s", a, b, eval_record(a, full), eval_record(b, half))
    md = make_table(tmp_path / "s", layout="robustness")
    assert "kd, " + P0 + ": 1 model(s) with 6 of 30 benchmark corrupted sets evaluated" in md
    save(tmp_path / "t", make_record("baseline", 0, 0, 70.0))
    with pytest.raises(ValueError, match="no corruption results"):
        make_table(tmp_path / "t", layout="robustness")


def test_cost_table(tmp_path):
    recs = []
    for label, steps in (("baseline", (0.010, 0.012)), ("kd", (0.020, 0.022)), ("dkd", (0.033, 0.033))):
        for seed, st in enumerate(steps):
            r = make_record(label, 0, seed, 70.0)
            r["cost"] = {"wall_time_s": 100.0 * (seed + 1), "step_time_s": st, "peak_mem_mb": 200.0,
                         "extra_params": 1000 if label == "dkd" else 0}
            recs.append(r)
    save(tmp_path / "s", *recs)
    md = make_table(tmp_path / "s", layout="cost")
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")] for l in md.splitlines()[2:5]}
    # baseline step 11 ms; kd 21 ms -> 21 / 11 = 1.91x; dkd 33 / 11 = 3.00x; floor not recorded
    assert rows["baseline"][1:4] == ["11.00 ± 1.41", "1.00×", "—"]
    assert rows["kd"][1:3] == ["21.00 ± 1.41", "1.91×"]
    assert rows["dkd"][2] == "3.00×" and rows["dkd"][4] == "1,000" and rows["dkd"][6] == "150.0 ± 70.7"
    assert "teacher forward" in md
    # with the teacher's forward time recorded, the floor is baseline step + teacher forward
    for r in recs:
        r["cost"]["teacher_forward_s"] = 0.011
    save(tmp_path / "s", *recs)
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="cost", fmt="csv")))
    floor = csv[(csv.row == "kd") & (csv.column == "x_floor")].iloc[0]["mean"]
    assert floor == pytest.approx(0.021 / (0.011 + 0.011))
    assert r"\times" in make_table(tmp_path / "s", layout="cost", fmt="latex")


def test_save_figures_writes_png_and_pdf(tmp_path):
    import sys

    detection_suite(tmp_path / "s")
    had_mpl = "matplotlib" in sys.modules
    from kdbench import plots

    assert had_mpl or "matplotlib" not in sys.modules  # imported only when a figure is made
    paths = plots.save_figures(tmp_path / "s")
    assert sorted(p.name for p in paths) == ["robustness_heatmap.pdf", "robustness_heatmap.png",
                                             "robustness_severity.pdf", "robustness_severity.png"]
    for p in paths:
        assert p.parent == tmp_path / "s" / "figures" and p.stat().st_size > 1000
        assert p.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
    # the plotted numbers: kd's heatmap row is the drop 44 - 25 = 19 on every benchmark corruption
    fig = plots.heatmap_figure(list(R.iter_records(tmp_path / "s")))
    data = fig.axes[0].images[0].get_array().filled(math.nan)  # rows teacher, baseline, kd; 15 + spatter
    assert data.shape == (3, 16) and float(data[2, 0]) == pytest.approx(19.0)
    assert float(data[1, 0]) == pytest.approx(41.0 - 17.5) and math.isnan(float(data[0, 15]))

    save(tmp_path / "t", make_record("baseline", 0, 0, 70.0))
    with pytest.raises(ValueError, match="run the robustness sweep first"):
        plots.save_figures(tmp_path / "t")
    assert not (tmp_path / "t" / "figures").exists()


def test_loaded_teacher_row_takes_its_clean_value_from_the_distillation_runs(tmp_path):
    kd = make_record("kd", 0, 0, 72.0, teacher_value=80.0)
    teacher = make_record("teacher", 0, 0, 80.0)  # never saved: a checkpoint teacher has no run record
    grid = {(c, s): 80.0 - 10 * s for c in RB.BENCHMARK for s in (1, 3)}
    save(tmp_path / "s", kd, eval_record(kd, {k: 60.0 for k in grid}), eval_record(teacher, grid))
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="robustness", fmt="csv")))
    t = csv[csv.row == "teacher"].set_index("column")["mean"]
    # classification with no baseline: mCE columns empty, a note says why; clean value 80 from teacher_metrics
    assert t["clean"] == 80.0 and math.isnan(t["mCE"])
    assert "no corruption results of the reference 'baseline'" in make_table(tmp_path / "s", layout="robustness")
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="robustness", fmt="csv",
                                                           reference="teacher")))
    k = csv[csv.row == "kd"].set_index("column")["mean"]
    # kd errors 40 everywhere; teacher errors 30 (s1) and 50 (s3): CE_c = 80 / 80 = 100 %;
    # relative: (40-28)*2 / ((30-20) + (50-20)) = 24 / 40 = 60 %
    assert k["mCE"] == pytest.approx(100.0) and k["rel_mCE"] == pytest.approx(60.0)


def test_published_reference_column(tmp_path):
    base = _det("baseline", 0, 40.0)
    kd = _det("kd", 0, 44.0)
    kd["reference"] = [{"metric": "mPC", "value": 21.5, "source": "Michaelis et al. 2019, Table 2"}]
    grid = {(c, s): 20.0 for c in RB.BENCHMARK for s in (1, 2)}
    save(tmp_path / "s", base, kd, eval_record(base, grid, "AP"), eval_record(kd, grid, "AP"))
    md = make_table(tmp_path / "s", layout="robustness")
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert head[:5] == ["Method", "clean AP", "mPC", "Δ", "ref."]
    kd_line = [c.strip() for c in md.splitlines()[3].strip("|").split("|")]
    assert kd_line[0] == "kd" and kd_line[4] == "21.5"
    assert "ref. (kd): Michaelis et al. 2019, Table 2" in md


def test_caption_states_where_the_corrupted_images_come_from(tmp_path):
    """Generated (ImageNet-C strengths; on CIFAR-100 not the released CIFAR-100-C), released files at their folder,
    or mixed: read from the eval records (rows' ``source``; an old record without it: its chunk's ``root``)."""
    generated = "generated by kdbench with imagecorruptions (ImageNet-C strengths)"
    not_c100c = "not Hendrycks' released CIFAR-100-C: not comparable with published CIFAR-100-C numbers"
    base, kd = make_record("baseline", 0, 0, 70.0), make_record("kd", 0, 0, 75.0)
    grid = {("fog", 1): 50.0, ("fog", 2): 40.0}

    def released(rec, root="/data/CIFAR-100-C", rows=True):
        e = eval_record(rec, grid)
        e["eval"] = {"name": "corruptions", "corruption": "fog", "severities": [1, 2], "root": root}
        for m in e["metrics"] if rows else []:
            m["source"] = "released"
        return e

    # old records: no source in the rows, no root in the chunk -> generated
    save(tmp_path / "gen", base, kd, eval_record(base, grid), eval_record(kd, grid))
    md = make_table(tmp_path / "gen", layout="robustness")
    assert f"Corrupted images: {generated}, a CIFAR-100-C-style set, {not_c100c}." in md
    tex = make_table(tmp_path / "gen", layout="robustness", fmt="latex")
    assert "ImageNet-C strengths" in tex.splitlines()[0]
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "gen", layout="robustness", fmt="csv")))
    assert set(csv.corruption_source) == {f"Corrupted images: {generated}, a CIFAR-100-C-style set, {not_c100c}."}
    # released files: rows say so; an old record without row sources is read from its chunk's root
    save(tmp_path / "rel", base, kd, released(base), released(kd, rows=False))
    md = make_table(tmp_path / "rel", layout="robustness")
    assert "Corrupted images: released pre-corrupted files at /data/CIFAR-100-C." in md
    assert "ImageNet-C" not in md and "CIFAR-100-C-style" not in md
    # a mixture is flagged
    save(tmp_path / "mix", base, kd, released(base), eval_record(kd, grid))
    md = make_table(tmp_path / "mix", layout="robustness")
    assert "MIXED sources" in md and generated in md and "released pre-corrupted files at /data/CIFAR-100-C" in md
    # only the cells the table shows count: a released sweep newer than a generated one of the same cells
    # replaces it (not mixed); an evaluated model that is not current (an older configuration) is not read
    old_g, new_r = eval_record(kd, grid), released(kd)
    old_g["finished_at"], new_r["finished_at"] = "2026-01-01T00:00:00", "2026-02-01T00:00:00"
    new_r["run_id"] = "r" + new_r["run_id"][1:]
    stale = eval_record(dict(kd, run_id="0" * 16), grid)  # a target no longer among the table's models...
    stale["finished_at"] = "2026-03-01T00:00:00"
    gone = dict(kd, run_id="0" * 16, status="failed")  # ...because its own record is a failed one
    save(tmp_path / "newer", base, kd, gone, released(base), old_g, new_r, stale)
    md = make_table(tmp_path / "newer", layout="robustness")
    assert "Corrupted images: released pre-corrupted files at /data/CIFAR-100-C." in md and "MIXED" not in md
    # rows saying "generated" win over a root (a folder written by write_cifar100_c is generated)
    e = released(kd, "/tmp/written-by-kdbench", rows=False)
    for m in e["metrics"]:
        m["source"] = "generated"
    assert RB.record_source(e) == ("generated", None) and RB.record_source(released(kd)) == (
        "released", "/data/CIFAR-100-C")
    # detection: generated, no CIFAR-100-C remark
    detection_suite(tmp_path / "det")
    md = make_table(tmp_path / "det", layout="robustness")
    assert f"Corrupted images: {generated}." in md and "CIFAR" not in md


def test_robustness_delta_is_paired_by_seed_with_an_interval(tmp_path):
    """mPC Δ = mean over seeds of (method − baseline), with its Student t interval, by hand."""
    recs = []
    mpc = {("baseline", 0): 17.0, ("baseline", 1): 18.0, ("baseline", 2): 16.0,
           ("kd", 0): 20.0, ("kd", 1): 22.0, ("kd", 2): 19.0}
    for (label, seed), v in mpc.items():
        r = _det(label, seed, 40.0)
        recs += [r, eval_record(r, {(c, s): v for c in RB.BENCHMARK for s in (1, 2)}, "AP")]
    save(tmp_path / "s", *recs)
    diffs = [3.0, 4.0, 3.0]
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    csv = pd.read_csv(__import__("io").StringIO(make_table(tmp_path / "s", layout="robustness", fmt="csv")))
    kd = csv[(csv.row == "kd") & (csv.column == "mPC")].iloc[0]
    assert kd["delta"] == pytest.approx(10 / 3) and kd["n_paired"] == 3
    assert kd["delta_ci_low"] == pytest.approx(10 / 3 - half, abs=1e-6) and bool(kd["significant"])
    md = make_table(tmp_path / "s", layout="robustness")
    assert f"+3.33 [{10 / 3 - half:+.2f}, {10 / 3 + half:+.2f}]*" in md
