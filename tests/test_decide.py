"""Tables that decide: `kdbench compare` (paired Δ, interval, tests), the summary layout (mean ranks, Friedman,
Nemenyi) and `kdbench check` (references with a tolerance), each recomputed by hand from the records."""

from __future__ import annotations

import math
from pathlib import Path
import statistics

import pytest

from kdbench import stats
from kdbench.cli import main
from kdbench.tables import make_table
from kdbench.tables.decide import CHECK_FLOOR, check, compare
from test_results_tables import make_record, save

T_975 = {2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}  # Student t quantiles, df = n - 1


def _suite(tmp_path, rows):
    """rows: (label, pair_index, seed, value[, reference])."""
    recs = []
    for row in rows:
        label, pi, seed, value = row[:4]
        recs.append(make_record(label, pi, seed, value, reference=row[4] if len(row) > 4 else ()))
    save(tmp_path / "s", *recs)
    return tmp_path / "s"


BASE = [70.0, 71.0, 69.5]
KD = [71.2, 71.9, 71.0]


def test_compare_recomputes_the_paired_interval_by_hand(tmp_path):
    d = _suite(tmp_path, [("baseline", 0, s, v) for s, v in enumerate(BASE)] + [("kd", 0, s, v) for s, v in enumerate(KD)])
    diffs = [k - b for k, b in zip(KD, BASE)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = T_975[2] * sd / math.sqrt(3)  # 3 seeds: 2 degrees of freedom
    csv = compare(d, "kd", "baseline", fmt="csv").splitlines()
    assert len(csv) == 2
    row = dict(zip(csv[0].split(","), csv[1].split(",")))
    assert int(row["n_paired"]) == 3 and float(row["delta"]) == pytest.approx(mean, abs=1e-6)
    assert float(row["delta_ci_low"]) == pytest.approx(mean - half, abs=1e-6)
    assert float(row["delta_ci_high"]) == pytest.approx(mean + half, abs=1e-6)
    assert row["significant"] == str(mean - half > 0)
    md = compare(d, "kd", "baseline")
    assert f"[{mean - half:+.2f}, {mean + half:+.2f}]" in md and "Student t" in md
    # the sign flips with the order
    row2 = dict(zip(*[x.split(",") for x in compare(d, "baseline", "kd", fmt="csv").splitlines()]))
    assert float(row2["delta"]) == pytest.approx(-mean, abs=1e-6)


def test_compare_leaves_unpaired_seeds_out_and_pools_pairs(tmp_path):
    d = _suite(tmp_path, [("baseline", 0, 0, 70.0), ("baseline", 0, 1, 71.0), ("kd", 0, 0, 72.0), ("kd", 0, 1, 72.5),
                          ("kd", 0, 2, 90.0),  # seed 2 has no baseline: left out of the pairing
                          ("baseline", 1, 0, 60.0), ("baseline", 1, 1, 61.0), ("kd", 1, 0, 61.0), ("kd", 1, 1, 61.5)])
    rows = [x.split(",") for x in compare(d, "kd", "baseline", fmt="csv").splitlines()]
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(body) == 3 and body[-1]["pair"] == "pooled"
    first, pooled = body[0], body[-1]
    assert first["n_paired"] == "2" and first["unpaired"] == "1" and float(first["delta"]) == pytest.approx(1.75)
    assert pooled["n_paired"] == "4" and float(pooled["delta"]) == pytest.approx(statistics.fmean([2, 1.5, 1, 0.5]))
    assert "+1 unpaired" in compare(d, "kd", "baseline")


def test_compare_names_the_valid_labels(tmp_path, capsys):
    d = _suite(tmp_path, [("baseline", 0, 0, 70.0), ("kd", 0, 0, 71.0)])
    assert main(["compare", str(d), "kdd", "baseline"]) == 2
    err = capsys.readouterr().err
    assert "unknown method label 'kdd'" in err and "valid: baseline, kd" in err


def test_bootstrap_interval_is_seeded_and_wide_enough():
    diffs = [1.2, 0.9, 1.5, 0.2, 1.1]
    a, b = stats.interval(diffs, "bootstrap"), stats.interval(diffs, "bootstrap")
    assert a == b and a[0] < statistics.fmean(diffs) < a[1] and min(diffs) <= a[0] and a[1] <= max(diffs)
    with pytest.raises(ValueError, match="at least 10,000"):
        stats.interval(diffs, "bootstrap", resamples=100)


def test_summary_layout_ranks_friedman_and_nemenyi(tmp_path):
    rows = []
    values = {0: {"baseline": 70, "kd": 71, "dkd": 72}, 1: {"baseline": 60, "kd": 62, "dkd": 61}}
    for pi, vals in values.items():
        for label, v in vals.items():
            for seed, noise in enumerate((-0.1, 0.0, 0.1)):
                rows.append((label, pi, seed, v + noise + (0.05 * seed if label == "dkd" else 0)))
    d = _suite(tmp_path, rows)
    csv = make_table(d, layout="summary", fmt="csv").splitlines()
    body = {r["method"]: r for r in (dict(zip(csv[0].split(","), line.split(","))) for line in csv[1:])}
    # ranks per pair: pair 0 dkd 1, kd 2, baseline 3; pair 1 kd 1, dkd 2, baseline 3
    assert float(body["dkd"]["mean_rank"]) == 1.5 and float(body["kd"]["mean_rank"]) == 1.5
    assert float(body["baseline"]["mean_rank"]) == 3.0
    from scipy import stats as sps

    q = sps.studentized_range.ppf(0.95, 3, math.inf) / math.sqrt(2)
    assert float(body["kd"]["nemenyi_cd"]) == pytest.approx(q * math.sqrt(3 * 4 / (6 * 2)))
    assert body["kd"]["wins_vs_baseline"] == "2" and body["kd"]["tested_vs_baseline"] == "2"
    md = make_table(d, layout="summary")
    assert "Nemenyi critical difference" in md and "Friedman" in md


def test_check_passes_fails_and_says_when_there_is_nothing(tmp_path, capsys):
    ref = ({"metric": "top1", "value": 71.0, "source": "Paper, Table 1"},)
    d = _suite(tmp_path, [("kd", 0, 0, 71.2, ref), ("kd", 0, 1, 71.4, ref), ("baseline", 0, 0, 70.0)])
    rows = check(__import__("kdbench.results", fromlist=["x"]).load_suite_records(d, ("teacher", "distill")))
    assert len(rows) == 1 and rows[0].ours == pytest.approx(71.3) and rows[0].tolerance == CHECK_FLOOR
    assert rows[0].passed
    assert main(["check", str(d)]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and "Paper, Table 1" in out
    assert main(["check", str(d), "--tolerance", "0.1"]) == 1
    assert "FAIL" in capsys.readouterr().out
    d2 = _suite(tmp_path / "x", [("kd", 0, 0, 71.2), ("baseline", 0, 0, 70.0)])
    assert main(["check", str(d2)]) == 2
    assert "has no published reference" in capsys.readouterr().err


def test_check_tolerance_grows_with_the_seed_spread(tmp_path):
    ref = ({"metric": "top1", "value": 70.0, "source": "x"},)
    vals = [68.0, 70.0, 72.0, 74.0]
    d = _suite(tmp_path, [("kd", 0, s, v, ref) for s, v in enumerate(vals)])
    from kdbench.results import load_suite_records

    (row,) = check(load_suite_records(d, ("teacher", "distill")))
    se = statistics.stdev(vals) / math.sqrt(4)
    assert row.tolerance == pytest.approx(2 * se) and row.diff == pytest.approx(1.0) and row.passed


def test_check_reads_the_suite_snapshot_kept_with_the_results(tmp_path, capsys):
    """A loaded teacher's reference is in the suite only (no teacher run carries it): `kdbench run` keeps the
    suite beside the runs, and `check` reads it; `--suite FILE` checks against another suite's references."""
    import json

    import yaml

    d = _suite(tmp_path, [])
    save(d, make_record("kd", 0, 0, 71.0, teacher_value=79.4), make_record("kd", 0, 1, 71.2, teacher_value=79.4))
    pair = make_record("kd", 0, 0, 71.0)["pair"]
    refs = [{"method": "teacher", "pair": pair, "metric": "top1", "value": 79.42, "source": "mdistiller README"},
            {"method": "kd", "pair": pair, "metric": "top1", "value": 73.33, "source": "DKD, Table 1"}]
    (d / "suite-v1.json").write_text(json.dumps({"suite": "s", "version": 1, "reference": refs}))
    assert main(["check", str(d)]) == 1
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "pass" in lines["teacher"] and "FAIL" in lines["kd"] and "mdistiller README" in out
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load((Path(__file__).parent.parent / "suites" / "quickstart.yaml").read_text())
    other.write_text(yaml.safe_dump({**raw, "suite": "other"}))
    assert main(["check", str(d), "--suite", str(other)]) == 2
    assert "has no published reference" in capsys.readouterr().err


def test_cd_diagram_of_a_suite_with_three_pairs(tmp_path, capsys):
    import pathlib

    rows = []
    for pi, pair in enumerate(("a→b", "c→d", "e→f")):
        for label, v in (("baseline", 70.0), ("kd", 72.0), ("dkd", 73.0 - pi)):
            for seed in range(2):
                rows.append(make_record(label, 0, seed, v + 0.1 * seed, pair=pair) | {"pair_index": pi})
    save(tmp_path / "s", *rows)
    assert main(["plot", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    png = pathlib.Path(tmp_path / "s" / "figures" / "critical_difference.png")
    assert str(png) in out and png.stat().st_size > 5000
    assert not (tmp_path / "s" / "figures" / "robustness_severity.png").exists()  # no corruption results
    two = _suite(tmp_path / "two", [("baseline", 0, 0, 70.0), ("kd", 0, 0, 71.0)])
    assert main(["plot", str(two)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_protocol_card_under_the_table_and_beside_the_csv(tmp_path, capsys):
    import json

    recs = [make_record("baseline", 0, s, 70.0 + s) for s in range(2)] + \
        [make_record("kd", 0, s, 71.0 + s, teacher_value=79.0) for s in range(2)]
    for r in recs:
        r["recipe"] = {"epochs": 240, "batch_size": 64, "amp": True}
        r["env"] = {"git_sha": "1111111111aa", "git_dirty": False, "device": "cuda:0", "kdbench": "0.1.0"}
    recs[-1]["env"] = {**recs[-1]["env"], "git_sha": "2222222222bb"}  # one run of other code
    save(tmp_path / "s", *recs)
    md = make_table(tmp_path / "s")
    card = md.split("Protocol: ", 1)[1]
    assert "epochs 240" in card and "seeds 0, 1" in card and "global batch 64" in card and "AMP True" in card
    assert "measured 79.00" in card and "MIXED" in card and "1111111111, 2222222222" in card
    assert "kd v1" in card
    assert main(["table", str(tmp_path / "s"), "--format", "csv", "--out", str(tmp_path / "t.csv")]) == 0
    sidecar = json.loads((tmp_path / "t.protocol.json").read_text())
    assert sidecar["mixed_commits"] is True and sidecar["seeds"] == [0, 1] and sidecar["epochs"] == [240]
    assert sidecar["teachers"]["resnet32x4→resnet8x4"]["measured"] == 79.0


def test_report_is_one_self_contained_html_file(tmp_path, capsys):
    """Protocol card, paper table with intervals, ranks and the CD diagram, robustness (with corruption results),
    cost and the gain-vs-cost figure, run status; inline CSS, figures as data URIs, no external URL."""
    import re

    from test_robustness_tables import eval_record

    from kdbench import robustness as RB

    rows = []
    for pi, pair in enumerate(("a→b", "c→d", "e→f")):
        for label, v in (("baseline", 70.0), ("kd", 72.0), ("dkd", 73.0 - pi)):
            for seed in range(2):
                r = make_record(label, 0, seed, v + 0.3 * seed, pair=pair) | {"pair_index": pi}
                r["cost"] = {**r["cost"], "step_time_s": {"baseline": 0.01, "kd": 0.012, "dkd": 0.015}[label]}
                rows.append(r)
    grid = {(c, s): 50.0 for c in RB.BENCHMARK for s in (1, 2)}
    evals = [eval_record(r, grid) for r in rows if r["pair"] == "a→b"]
    failed = make_record("cwd", 0, 0, None, status="failed", error="Traceback\nValueError: boom", pair="a→b")
    save(tmp_path / "s", *rows, *evals, failed)
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "s"), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    ids = re.findall(r'<h2 id="(\w+)">', text)
    assert ids == ["results", "ranks", "robustness", "cost", "status"]
    assert "Protocol: " in text and "[+" in text and "Nemenyi" in text and "mCE" in text
    assert text.count("data:image/png;base64,") == 4  # CD, severity, heatmap, gain vs cost
    assert "ValueError: boom" in text and "did not finish ok" in text
    assert not re.search(r"(src|href)=\"(?!data:|#)", text) and "http" not in text.replace("data:image", "")


def test_the_runs_of_a_seed_share_data_and_init_digests(tmp_path):
    """Every run of one seed sees the same batches and starts from the same student: the records say so
    (data_digest of the first epoch's batches, init_digest of the student before any method part), whatever the
    method draws from the random number generators; another seed differs."""
    import yaml

    from kdb_util import tiny_suite
    from kdbench.scheduler import launch
    from kdbench.suite import load_suite

    d = tiny_suite(methods=["baseline", "kd", "freekd"], seeds=[0, 1],
                   data={"name": "digits", "train_fraction": 0.2, "augment": True})
    d["recipe"].update(epochs=1, max_steps_per_epoch=3)
    d["methods"][2] = {"name": "freekd", "params": {"stage_iters": 2}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    recs = [r for r in launch(load_suite(path), tmp_path / "res", executor="debug", log=lambda s: None)
            if r["kind"] == "distill"]
    assert all(r["status"] == "ok" for r in recs) and len(recs) == 6
    for seed in (0, 1):
        mine = [r for r in recs if r["seed"] == seed]
        assert len({r["data_digest"] for r in mine}) == 1 and len({r["init_digest"] for r in mine}) == 1, seed
    assert {r["data_digest"] for r in recs if r["seed"] == 0} != {r["data_digest"] for r in recs if r["seed"] == 1}
    assert {r["init_digest"] for r in recs if r["seed"] == 0} != {r["init_digest"] for r in recs if r["seed"] == 1}
