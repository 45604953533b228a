"""Cohorts (kdbench/cohort.py): distill runs that share the teacher, data, seed and recipe train together, one
data pass and one teacher forward per batch, and get exactly the numbers they get alone.

Exactly, not within a tolerance: on CPU the teacher's forward on the same batch gives the same tensors whether
it is taken once for the cohort (with the union of the members' taps) or once per run, and each member takes
its step in its own random stream, seeded as a run alone seeds it. The digits data is augmented here
(``augment: true``, no loader workers): the batches are made under per-batch seeds, so they are the same
whatever the members draw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdbench import train
from kdbench.cohort import ENV, cohort_key, cohorts
from kdbench.scheduler import launch
from kdbench.suite import load_suite
from kdb_util import tiny_suite

METHODS = ["baseline", "kd", "cwd", {"name": "pkd", "label": "pkd-dwt", "params": {"domain": "dwt"}},
           {"name": "kd", "label": "kd-nan", "params": {"weight": float("nan")}}]


def _suite(write_suite, epochs=2):
    d = tiny_suite(methods=METHODS, data={"name": "digits", "train_fraction": 0.2, "augment": True})
    d["recipe"]["epochs"] = epochs
    return write_suite(d)


def _records(results: Path) -> dict:
    out = {}
    for p in sorted((results / "tiny" / "runs").glob("*/record.json")):
        rec = json.loads(p.read_text())
        out[rec["run_id"]] = rec
    return out


def _numbers(rec: dict):
    return rec["status"], rec.get("metrics"), rec.get("best_epoch"), rec.get("data_digest"), rec.get("init_digest")


@pytest.fixture
def alone(write_suite, tmp_path_factory, monkeypatch):
    """The suite's runs, each alone (cohorts off)."""
    path = _suite(write_suite, epochs=3)
    results = tmp_path_factory.mktemp("alone")
    monkeypatch.setenv(ENV, "off")
    launch(load_suite(path), results, executor="debug", log=lambda s: None)
    monkeypatch.delenv(ENV)
    return path, _records(results), results


def test_the_suite_forms_one_cohort_of_the_distill_runs(write_suite):
    specs = load_suite(_suite(write_suite)).specs
    distill = [s for s in specs if s.kind == "distill"]
    groups = [c for c in cohorts(distill) if len(c) > 1]
    assert len(groups) == 1 and sorted(s.label for s in groups[0]) == ["cwd", "kd", "kd-nan", "pkd-dwt"]
    assert cohort_key(next(s for s in distill if s.label == "baseline")) != cohort_key(groups[0][0])  # no teacher
    assert all(cohort_key(s) is None for s in specs if s.kind != "distill")


def test_cohort_size_and_off_switch(write_suite, monkeypatch):
    d = tiny_suite(methods=METHODS, resources={"cohort_size": 3})
    specs = [s for s in load_suite(write_suite(d)).specs if s.kind == "distill" and s.teacher]
    assert [len(c) for c in cohorts(specs)] == [3, 1]
    monkeypatch.setenv(ENV, "off")
    assert [len(c) for c in cohorts(specs)] == [1, 1, 1, 1]


def test_a_cohort_gives_each_run_the_numbers_it_gets_alone(alone, tmp_path, capsys):
    path, solo, _ = alone
    results = tmp_path / "together"
    recs = launch(load_suite(path), results, executor="debug", log=print)
    together = _records(results)
    assert sorted(together) == sorted(solo)  # the same run_ids
    cohort = [r for r in together.values() if r.get("cohort")]
    assert sorted(r["label"] for r in cohort) == ["cwd", "kd", "kd-nan", "pkd-dwt"]
    assert len({r["cohort"]["id"] for r in cohort}) == 1 and len(cohort[0]["cohort"]["runs"]) == 4
    for rid, rec in together.items():
        assert _numbers(rec) == _numbers(solo[rid]), rec["label"]
        if rec["status"] == "ok":
            assert rec["artifact"]["sha256"] == solo[rid]["artifact"]["sha256"], rec["label"]  # the same weights
    # the member that diverged is recorded so; the others went on
    nan = next(r for r in cohort if r["label"] == "kd-nan")
    assert nan["status"] == "diverged" and "non-finite loss" in nan["error"]
    assert sum(r["status"] == "ok" for r in recs) == len(recs) - 1
    assert not solo[nan["run_id"]].get("cohort")


def test_an_interrupted_cohort_resumes_members_from_different_epochs(alone, tmp_path, monkeypatch):
    path, solo, _ = alone
    results = tmp_path / "interrupted"
    real_end = train._end_epoch

    def stop_after_the_first_member_of_epoch_2(m, entry, task, loader, epoch, bar):
        real_end(m, entry, task, loader, epoch, bar)
        if epoch == 2 and m.place.desc.startswith("kd "):  # kd ends its epochs first in the cohort
            raise KeyboardInterrupt  # kd has its epoch-2 checkpoint, cwd and pkd-dwt their epoch-1 one

    monkeypatch.setattr(train, "_end_epoch", stop_after_the_first_member_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        launch(load_suite(path), results, executor="debug", log=lambda s: None)
    monkeypatch.setattr(train, "_end_epoch", real_end)
    import torch

    epochs = {}
    for d in (results / "tiny" / "runs").iterdir():
        ck = d / "checkpoint.pt"
        if ck.exists():
            epochs[d.name] = torch.load(ck, map_location="cpu", weights_only=False)["epoch"]
    # kd stopped at epoch 2, cwd and pkd-dwt at epoch 1 (the teacher, 2 epochs, and the baseline are done)
    assert list(epochs.values()).count(1) == 2 and 2 in epochs.values(), epochs
    launch(load_suite(path), results, executor="debug", log=lambda s: None)
    for rid, rec in _records(results).items():
        assert _numbers(rec) == _numbers(solo[rid]), rec["label"]
        if epochs.get(rid) in (1, 2) and rec["kind"] == "distill":  # the members that were interrupted
            assert rec["scheduler"]["resumes"] == 1 and rec["cohort"], rec["label"]


def test_local_executor_runs_a_cohort_as_one_job(alone, tmp_path):
    path, solo, _ = alone
    results = tmp_path / "local"
    launch(load_suite(path), results, executor="local", parallel=2, log=lambda s: None)
    together = _records(results)
    for rid, rec in together.items():
        assert _numbers(rec) == _numbers(solo[rid]), rec["label"]
    jobs = {r["scheduler"].get("job_id") for r in together.values() if r.get("cohort")}
    assert len(jobs) == 1


def test_dry_run_lists_the_cohorts(write_suite):
    import subprocess
    import sys

    path = _suite(write_suite)
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(path), "--dry-run"], capture_output=True,
                       text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "cohorts: 1, holding 4 distill runs" in r.stdout and "kd cwd pkd-dwt kd-nan" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(path), "--dry-run", "--cohort", "off"],
                       capture_output=True, text=True, env={**os.environ})
    assert "cohorts: none" in r.stdout
