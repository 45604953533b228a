"""End to end: a tiny digits suite through the debug and local executors, records, resume, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from kdbench.scheduler import launch
from kdbench.results import read_record
from kdbench.suite import load_suite

from kdb_util import tiny_suite


def records(results: Path, suite: str = "tiny") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / suite / "runs").glob("*/record.json"))]


def metric(rec, name="top1", select="final"):
    return next(m["value"] for m in rec["metrics"] if m["metric"] == name and m["select"] == select)


def test_debug_run_writes_records_and_resumes(write_suite, tmp_path):
    path = write_suite(tiny_suite())
    results = tmp_path / "res"
    recs = launch(load_suite(path), results, executor="debug", log=lambda s: None)
    assert [r["status"] for r in recs] == ["ok", "ok", "ok"]
    teacher, base, kd = recs
    assert teacher["kind"] == "teacher" and base["teacher"] is None
    assert kd["teacher"]["run"] == teacher["run_id"] and kd["teacher_metrics"] == teacher["metrics"]
    assert {(m["metric"], m["select"]) for m in kd["metrics"]} >= {("top1", "final"), ("top1", "best"), ("top5", "final")}
    assert 0 <= metric(kd) <= 100 and kd["cost"]["step_time_s"] > 0 and kd["cost"]["wall_time_s"] > 0
    assert kd["params"] == {"temperature": 4.0, "weight": 0.9, "ce_weight": 0.1}
    assert kd["env"]["torch"] and "git_sha" in kd["env"]
    run_dir = results / "tiny" / "runs" / kd["run_id"]
    assert (run_dir / "log.jsonl").read_text().count("\n") == 2
    # a rerun does nothing: every record is ok
    again = launch(load_suite(path), results, executor="debug", log=lambda s: None)
    assert again == []


def test_local_executor_matches_debug(write_suite, tmp_path):
    path = write_suite(tiny_suite(methods=["baseline"]))
    debug = launch(load_suite(path), tmp_path / "d", executor="debug", log=lambda s: None)
    local = launch(load_suite(path), tmp_path / "l", executor="local", parallel=2, log=lambda s: None)
    # the baseline needs no teacher: both start at once, and records come back as they finish
    assert [r["status"] for r in local] == ["ok", "ok"]
    local, debug = (sorted(x, key=lambda r: r["run_id"]) for x in (local, debug))
    assert [r["run_id"] for r in local] == [r["run_id"] for r in debug]
    assert [r["metrics"] for r in local] == [r["metrics"] for r in debug]


def test_failed_and_diverged_runs_are_recorded_and_others_go_on(write_suite, tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    d = tiny_suite(methods=["baseline", {"name": "kd", "label": "kd-nan", "params": {"weight": float("nan")}}])
    d["pairs"].append({"name": "broken", "teacher": {"model": "kdbench:resnet8", "weights": str(bad)},
                       "student": {"model": "kdbench:resnet8"}})
    path = write_suite(d)
    results = tmp_path / "res"
    recs = launch(load_suite(path), results, executor="debug", log=lambda s: None)
    by = {(r["label"], r["pair"]): r for r in recs}
    assert by[("teacher", "resnet8→resnet8")]["status"] == "ok"
    assert by[("baseline", "resnet8→resnet8")]["status"] == "ok"
    assert by[("baseline", "broken")]["status"] == "ok"  # the baseline needs no teacher
    nan = by[("kd-nan", "resnet8→resnet8")]
    assert nan["status"] == "diverged" and "non-finite loss" in nan["error"]
    broken = by[("kd-nan", "broken")]
    assert broken["status"] == "failed" and "garbage.pt" in broken["error"]
    # a run whose need failed is not started: its record names the need
    d2 = tiny_suite(suite="tiny2", methods=["baseline", "kd"])
    d2["pairs"][0]["teacher"]["train"]["recipe"]["optimizer"] = {"name": "sgd", "lr": float("nan")}
    recs2 = launch(load_suite(write_suite(d2, name="tiny2")), results, executor="debug", log=lambda s: None)
    by2 = {r["label"]: r for r in recs2}
    assert by2["teacher"]["status"] == "diverged" and by2["baseline"]["status"] == "ok"
    assert by2["kd"]["status"] == "failed" and by2["kd"]["started_at"] is None
    assert f"needs the teacher run {by2['teacher']['run_id']}" in by2["kd"]["error"] and "ended diverged" in by2["kd"]["error"]
    # a rerun retries only what is not ok
    again = launch(load_suite(path), results, executor="debug", log=lambda s: None)
    assert sorted(r["label"] for r in again) == ["kd-nan", "kd-nan"]


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_interrupted_run_resumes_to_identical_metrics(write_suite, tmp_path):
    d = tiny_suite(methods=["kd"])
    d["recipe"]["epochs"] = 6
    path = write_suite(d)
    ref = launch(load_suite(path), tmp_path / "ref", executor="debug", log=lambda s: None)
    results = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(path), "--executor", "debug",
                             "--results", str(results), "--no-table"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kd_id = ref[-1]["run_id"]
    log = results / "tiny" / "runs" / kd_id / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill the student run once it has finished 2 epochs
        if log.is_file() and log.read_text().count("\n") >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be interrupted")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_record(results / "tiny" / "runs" / kd_id) is None
    done = log.read_text().count("\n")
    assert 2 <= done < 6
    r = _cli("run", str(path), "--executor", "debug", "--results", str(results), "--no-table")
    assert r.returncode == 0, r.stderr
    assert "1 already ok, 1 to run" in r.stdout
    rec = read_record(results / "tiny" / "runs" / kd_id)
    assert rec["status"] == "ok" and rec["scheduler"]["resumes"] == 1
    assert rec["metrics"] == ref[-1]["metrics"]


def test_cli_rejects_bad_suite_before_running(write_suite, tmp_path):
    path = write_suite(tiny_suite(methods=["baseline", {"name": "kd", "params": {"temprature": 2}}]))
    r = _cli("run", str(path), "--results", str(tmp_path / "res"))
    assert r.returncode == 2
    assert "unknown parameter(s) 'temprature'" in r.stderr and "valid: temperature=4.0" in r.stderr
    assert not (tmp_path / "res").exists()


def test_dry_run_prints_matrix_without_data(write_suite, tmp_path):
    d = tiny_suite()
    d["data"] = {"name": "cifar100", "root": str(tmp_path / "absent")}
    r = _cli("run", str(write_suite(d)), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "3 runs (1 teacher, 2 distill)" in r.stdout
    teacher_id = load_suite(write_suite(d)).specs[0].run_id
    kd_line = next(l for l in r.stdout.splitlines() if " kd " in l)
    assert "distill" in kd_line and teacher_id[:8] in kd_line and "resources" in r.stdout
    v = _cli("validate", str(write_suite(d)))
    assert v.returncode == 1 and "CIFAR-100 not found" in v.stderr and "cifar-100-python" in v.stderr


def test_prompt_stage_is_its_own_run_once_for_all_seeds_and_cached(write_suite, tmp_path):
    d = tiny_suite(methods=[{"name": "freekd", "params": {"stage_iters": 3}},
                            {"name": "freekd", "label": "freekd-paper", "params": {"stage_iters": 3, "variant": "paper"}}],
                   seeds=[0, 1])
    d["data"]["image_size"] = 16
    results = tmp_path / "res"
    suite = load_suite(write_suite(d))
    stages = [s for s in suite.specs if s.kind == "stage"]
    assert len(stages) == 1, "one teacher, one set of stage params: one stage run for both variants and seeds"
    recs = launch(suite, results, executor="debug", log=lambda s: None)
    assert [r["kind"] for r in recs] == ["teacher", "stage"] + ["distill"] * 4
    runs = [r for r in recs if r["kind"] == "distill"]
    assert [r["status"] for r in recs] == ["ok"] * 6
    assert {r["stage"]["run"] for r in runs} == {stages[0].run_id}
    assert all(stages[0].run_id in r["needs"] for r in runs)
    art = results / "tiny" / "runs" / stages[0].run_id / "stage.pt"
    state = torch.load(art, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    mtime = art.stat().st_mtime_ns
    # a rerun does nothing; a new seed reuses the stage without recomputing it
    assert launch(load_suite(write_suite(d)), results, executor="debug", log=lambda s: None) == []
    d["seeds"] = [2]
    more = launch(load_suite(write_suite(d)), results, executor="debug", log=lambda s: None)
    assert [r["kind"] for r in more] == ["distill", "distill"] and all(r["status"] == "ok" for r in more)
    assert art.stat().st_mtime_ns == mtime
    # the recipe's batch size is part of the stage's identity; its epochs are not
    bs = load_suite(write_suite(d), ["recipe.batch_size=16"])
    ep = load_suite(write_suite(d), ["recipe.epochs=3"])
    assert next(s for s in bs.specs if s.kind == "stage").run_id != stages[0].run_id
    assert next(s for s in ep.specs if s.kind == "stage").run_id == stages[0].run_id


def test_eval_runs_evaluate_saved_models_and_resume(write_suite, tmp_path, monkeypatch):
    """An eval run loads the model.pt of the run it needs and records rows with target, corruption, severity.
    (Eval groups off: the fake robustness module below evaluates one model at a time; tests/test_eval_groups.py
    covers the groups.)"""
    monkeypatch.setenv("KDBENCH_COHORT", "off")
    calls = []

    def fake_corruptions(net, task, data, device, *, corruptions, severities, cell_dir, batch_size, **kw):
        calls.append((corruptions[0], tuple(severities), str(cell_dir)))
        clean = task.evaluate(net, task.loader(data, batch_size), device)["top1"]
        return [{"corruption": corruptions[0], "severity": s, "metric": "top1", "value": clean - s,
                 "higher_is_better": True} for s in severities]

    import types, sys as _sys
    monkeypatch.setitem(_sys.modules, "kdbench.robustness",
                        types.SimpleNamespace(evaluate_corruptions=fake_corruptions, MIN_SIDE=32))
    d = tiny_suite(methods=["baseline"], evals=["val", {"name": "corruptions", "set": ["fog", "snow"],
                                                        "severities": [1, 3]}],
                   data={"name": "digits", "train_fraction": 0.2, "image_size": 32})
    results = tmp_path / "res"
    recs = launch(load_suite(write_suite(d)), results, executor="debug", log=lambda s: None)
    assert [r["kind"] for r in recs] == ["teacher", "distill", "eval", "eval", "eval", "eval"]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    base = next(r for r in recs if r["kind"] == "distill")
    ev = [r for r in recs if r["kind"] == "eval" and r["target"] == base["run_id"]]
    assert sorted(r["eval"]["corruption"] for r in ev) == ["fog", "snow"]
    assert ev[0]["label"] == "baseline" and ev[0]["seed"] == 0 and base["run_id"] in ev[0]["needs"]
    clean = next(m["value"] for m in base["metrics"] if m["metric"] == "top1" and m["select"] == "final")
    rows = ev[0]["metrics"]
    assert [(m["severity"], m["eval"]) for m in rows] == [(1, "corruptions"), (3, "corruptions")]
    assert rows[0]["value"] == pytest.approx(clean - 1), "the saved model.pt was loaded, not a fresh network"
    assert calls[2][2] == str(results / "tiny" / "runs" / base["run_id"] / "evals")
    from kdbench.results import load_records
    _, metrics = load_records(results / "tiny")
    cor = metrics[metrics["eval"] == "corruptions"]
    assert set(cor["corruption"]) == {"fog", "snow"} and set(cor["severity"]) == {1, 3}
    # resume: nothing is redone; a new corruption only adds its own eval runs
    assert launch(load_suite(write_suite(d)), results, executor="debug", log=lambda s: None) == []
    d["evals"][1]["set"] = ["fog", "snow", "frost"]
    more = launch(load_suite(write_suite(d)), results, executor="debug", log=lambda s: None)
    assert sorted(r["eval"]["corruption"] for r in more) == ["frost", "frost"]
    from kdbench.tables import make_table
    assert "baseline" in make_table(results / "tiny"), "eval records stay out of the main table"


def test_local_scheduler_starts_a_run_once_its_needs_are_ok(write_suite, tmp_path):
    d = tiny_suite(methods=["baseline", {"name": "freekd", "params": {"stage_iters": 3}}])
    d["data"]["image_size"] = 16
    suite = load_suite(write_suite(d))
    recs = launch(suite, tmp_path / "res", executor="local", parallel=2, log=lambda s: None)
    assert sorted(r["kind"] for r in recs) == ["distill", "distill", "stage", "teacher"]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    by = {r["kind"] if r["kind"] != "distill" else r["label"]: r for r in recs}
    assert by["stage"]["started_at"] >= by["teacher"]["finished_at"]
    assert by["freekd"]["started_at"] >= by["stage"]["finished_at"]
    assert by["baseline"]["started_at"] < by["teacher"]["finished_at"], "the baseline needs nothing: it starts at once"
