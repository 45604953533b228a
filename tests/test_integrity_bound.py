"""Every number bound to the model file it was measured on or trained with: eval records and corruption cells to
the evaluated model's file, distill records to their teacher's file. A model retrained in its folder, a checkpoint
replaced, a cell copied from another model or a cell without a readable metric never becomes a number in a table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdb_util import tiny_suite, train_digits32
from kdbench import results as R
from kdbench.cli import main
from kdbench.scheduler import launch
from kdbench.graph import summary
from kdbench.suite import load_suite


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits suite at 32 px with a suite-trained teacher, a baseline and a kd student, and a fog sweep
    (severities 1, 2) over the three, run once for the module; each test copies the results folder."""
    path, res = train_digits32(tmp_path_factory.mktemp("bound"), ["baseline", "kd"])
    assert main(["robustness", str(res / "rob"), "--corruptions", "fog", "--severities", "1,2",
                 "--executor", "debug"]) == 0
    return path, res


@pytest.fixture
def res(trained, tmp_path):
    path, res = trained
    shutil.copytree(res, tmp_path / "res")
    return path, tmp_path / "res"


def _records(res: Path) -> dict[Path, dict]:
    return {d: R.read_record(d) for d in R.run_dirs(res / "rob") if R.read_record(d) is not None}


def _run_of(res: Path, kind: str, label: str | None = None) -> Path:
    return next(d for d, r in _records(res).items() if r["kind"] == kind and (label is None or r["label"] == label))


def _retrain_in_place(rdir: Path) -> str:
    """The state a retrain in the same folder leaves (another thread count or GPU gives other weights): another
    model.pt, recorded as the run's artifact. Returns its sha256."""
    import torch

    sd = torch.load(rdir / "model.pt", weights_only=True)
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k] + 0.01
    torch.save(sd, rdir / "model.pt")
    rec = R.read_record(rdir)
    rec["artifact"] = R.artifact_entry(rdir / "model.pt")
    R.write_record(rdir, rec)
    return rec["artifact"]["sha256"]


def _sweep(res: Path, sev: str = "1,2") -> int:
    return main(["robustness", str(res / "rob"), "--corruptions", "fog", "--severities", sev, "--executor", "debug"])


def _table(res: Path, fmt: str = "csv") -> str:
    from kdbench.tables import make_table

    return make_table(res / "rob", layout="robustness", fmt=fmt)


def test_cells_and_eval_records_carry_the_measured_models_sha(res):
    _, res = res
    for d, r in _records(res).items():
        if r["kind"] in ("teacher", "distill"):
            for cell in (d / "evals").glob("*.json"):
                assert json.loads(cell.read_text())["model_sha256"] == r["artifact"]["sha256"]
    evals = [r for r in _records(res).values() if r["kind"] == "eval"]
    arts = {r["run_id"]: r["artifact"]["sha256"] for r in _records(res).values() if r["kind"] != "eval"}
    assert evals and all(r["student"]["sha256"] == arts[r["target"]] for r in evals)


def test_a_model_retrained_in_its_folder_gets_its_cells_and_evals_redone(res, capsys):
    """Case 1: the old weights' eval records are not shown beside the new model's clean value, and a sweep redoes
    them (a wider sweep never reuses the old weights' cells under the new sha)."""
    _, res = res
    t_dir = _run_of(res, "teacher")
    before = _table(res)
    assert "teacher" in before
    new_sha = _retrain_in_place(t_dir)
    table = _table(res)
    teacher_rows = [line for line in table.splitlines() if ",teacher," in line]
    assert not teacher_rows, table  # no corruption result of the current teacher file yet
    assert "left out: measured on a model file since replaced" in _table(res, "md")
    capsys.readouterr()
    assert _sweep(res) == 0  # the same sweep: its teacher eval records are stale, redone
    assert "file was replaced since" in capsys.readouterr().err
    assert _sweep(res, "1,2,3") == 0  # a wider one
    for cell in (t_dir / "evals").glob("fog_s*.json"):
        assert json.loads(cell.read_text())["model_sha256"] == new_sha
    t_evals = [r for r in _records(res).values() if r["kind"] == "eval" and r["target"] == t_dir.name]
    assert t_evals and all(r["student"]["sha256"] == new_sha for r in t_evals)
    assert any(",teacher," in line for line in _table(res).splitlines())


def test_a_cell_copied_from_another_model_is_redone(res):
    """Case 4: a cell names the model file it measured; another model's cell under this model's folder is redone."""
    _, res = res
    t_dir, b_dir = _run_of(res, "teacher"), _run_of(res, "distill", "baseline")
    shutil.copy(b_dir / "evals" / "fog_s1.json", t_dir / "evals" / "fog_s1.json")
    for d, r in _records(res).items():  # the teacher's fog eval record is gone: the sweep looks at its cells again
        if r["kind"] == "eval" and r["target"] == t_dir.name:
            (d / "record.json").unlink()
    assert _sweep(res) == 0
    cell = json.loads((t_dir / "evals" / "fog_s1.json").read_text())
    assert cell["model_sha256"] == R.read_record(t_dir)["artifact"]["sha256"]


@pytest.mark.parametrize("bad", [{"top1": "abc"}, {}, {"top5": 50.0}, "not json"])
def test_a_cell_without_a_numeric_metric_is_set_aside_and_redone(res, capsys, bad):
    """Case 3: the cell is unreadable: set aside (kept under another name), redone, a warning on the terminal; the
    eval record then has every severity."""
    _, res = res
    b_dir = _run_of(res, "distill", "baseline")
    path = b_dir / "evals" / "fog_s2.json"
    cell = json.loads(path.read_text())
    if isinstance(bad, str):
        path.write_text(bad)
    else:
        cell["metrics"] = bad
        path.write_text(json.dumps(cell))
    for d, r in _records(res).items():
        if r["kind"] == "eval" and r["target"] == b_dir.name:
            (d / "record.json").unlink()
    capsys.readouterr()
    assert _sweep(res) == 0
    out = capsys.readouterr()
    assert "unreadable corruption cell" in out.out and "set aside" in out.out
    assert list((b_dir / "evals").glob("fog_s2.json.unreadable-*"))
    assert isinstance(json.loads(path.read_text())["metrics"]["top1"], float)
    rec = next(r for r in _records(res).values() if r["kind"] == "eval" and r["target"] == b_dir.name)
    assert sorted(m["severity"] for m in rec["metrics"] if m["metric"] == "top1") == [1, 2]
    assert any("unreadable corruption cell" in w for w in rec["warnings"])


def test_an_eval_record_missing_a_severity_is_not_averaged(res):
    """Case 3, table side: an ok eval record without the metric at one of its severities is left out with a note,
    never averaged over fewer severities than the other models."""
    _, res = res
    b_dir = _run_of(res, "distill", "baseline")
    d, rec = next((d, r) for d, r in _records(res).items() if r["kind"] == "eval" and r["target"] == b_dir.name)
    rec["metrics"] = [m for m in rec["metrics"] if not (m["metric"] == "top1" and m["severity"] == 2)]
    R.write_record(d, rec)
    table = _table(res)
    assert not [line for line in table.splitlines() if line.split(",")[3] == "baseline"]
    assert "missing top1 at a severity" in _table(res, "md")


def test_warnings_of_a_worker_reach_the_terminal():
    rec = {"status": "ok", "label": "kd", "pair": "a→b", "seed": 0, "kind": "eval", "metrics": [],
           "eval": {"name": "corruptions", "corruption": "fog"}, "warnings": ["warning: x: set aside as y"]}
    assert summary(rec).splitlines()[1].strip() == "warning: x: set aside as y"


def test_distill_runs_of_a_replaced_teacher_are_flagged_listed_and_rerun_on_request(res, capsys):
    """Case 2: kept by default (flagged in the table, listed by `kdbench run`); `--rerun-replaced` sets their files
    aside and trains them again with the current teacher."""
    from kdbench.tables import make_table

    path, res = res
    t_dir, b_dir = _run_of(res, "teacher"), _run_of(res, "distill", "kd")
    new_sha = _retrain_in_place(t_dir)
    md = make_table(res / "rob")
    assert "trained with another teacher file than the teacher row's" in md
    base_line = next(line for line in md.splitlines() if line.startswith("| kd"))
    assert "[^" in base_line
    capsys.readouterr()
    assert main(["run", str(path), "--results", str(res), "--executor", "debug", "--no-table"]) == 0
    out = capsys.readouterr()
    assert "1 distill run(s) were trained with a teacher file replaced since (kd" in out.out
    assert R.read_record(b_dir)["teacher"]["sha256"] != new_sha  # kept: the user's choice
    assert main(["run", str(path), "--results", str(res), "--executor", "debug", "--no-table",
                 "--rerun-replaced"]) == 0
    rec = R.read_record(b_dir)
    assert rec["status"] == "ok" and rec["teacher"]["sha256"] == new_sha
    aside = list(b_dir.glob("replaced-*/record.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["teacher"]["sha256"] != new_sha
    assert "trained with another teacher file" not in make_table(res / "rob")


def test_a_temp_cell_left_by_a_killed_eval_is_cleaned(res):
    """A cell file a killed eval run was writing (its atomic write's temporary) is removed when the chunk runs."""
    import os
    import time

    _, res = res
    t_dir = _run_of(res, "teacher")
    tmp = t_dir / "evals" / ".fog_s1.json.k3j2h1.tmp"
    tmp.write_text("{")
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    for d, r in _records(res).items():
        if r["kind"] == "eval" and r["target"] == t_dir.name:
            (d / "record.json").unlink()
    assert _sweep(res) == 0
    assert not tmp.exists()


def test_an_interrupted_sweep_says_how_to_resume_it(res, capsys, monkeypatch):
    import kdbench.scheduler as S

    _, res = res

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "launch", stop)
    assert _sweep(res) == 130
    err = capsys.readouterr().err
    assert "`kdbench robustness` again resumes the rest" in err and "`kdbench run`" not in err


def test_status_marks_a_record_of_another_suite(tmp_path):
    from test_results_tables import make_record, save

    from kdbench.tables import status_table

    mine, other = make_record("kd", 0, 0, 70.0, suite="s"), make_record("dkd", 0, 0, 71.0, suite="other")
    save(tmp_path / "s", mine, other)
    text = status_table(tmp_path / "s")
    line = next(ln for ln in text.splitlines() if ln.startswith(other["run_id"][:8]))
    assert "foreign" in line and " ok " not in line
    assert "1 ok, 1 foreign" in text


def test_table_out_through_a_file_names_it(tmp_path, capsys):
    from test_results_tables import make_record, save

    save(tmp_path / "s", make_record("baseline", 0, 0, 70.0))
    (tmp_path / "afile").write_text("x")
    assert main(["table", str(tmp_path / "s"), "--out", str(tmp_path / "afile" / "t.md")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err and "--out" in err


@pytest.mark.parametrize("key, value, expect", [
    ("recipe.optimizer.lr", "abc", "recipe.optimizer.lr: expected a number, got 'abc'"),
    ("recipe.optimizer.momentum", "[1]", "recipe.optimizer.momentum: expected a number"),
    ("recipe.schedule.warmup_epochs", "x", "recipe.schedule.warmup_epochs: expected a number, got 'x'"),
])
def test_optimizer_and_schedule_values_are_checked_at_validate(capsys, key, value, expect):
    quickstart = Path(__file__).parent.parent / "suites" / "quickstart.yaml"
    assert main(["validate", str(quickstart), "--no-data", "--set", f"{key}={value}"]) != 0
    assert expect in capsys.readouterr().err


def test_a_sweep_over_models_of_images_under_32_px_is_refused_before_any_work(tmp_path, capsys):
    """Case 6, `kdbench robustness`: the models' data gives 8 px digits: refused in one line naming the option."""
    import yaml

    d = tiny_suite(suite="small", methods=["baseline"])
    d["recipe"].update(epochs=1, max_steps_per_epoch=1)
    d["pairs"][0]["teacher"]["train"]["recipe"] = {"epochs": 1, "max_steps_per_epoch": 1}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    launch(load_suite(path), tmp_path / "res", executor="debug", log=lambda s: None)
    assert main(["robustness", str(tmp_path / "res" / "small"), "--corruptions", "fog", "--severities", "1",
                 "--executor", "debug"]) == 2
    err = capsys.readouterr().err
    assert "set data.image_size to 32 or more" in err and len(err.strip().splitlines()) == 1
    assert not [p for p in (tmp_path / "res" / "small" / "runs").glob("*/evals")]


def test_binding_of_stage_and_checkpoint_records(tmp_path):
    """A stage record is bound to its teacher's file like a distill record, and a checkpoint teacher's file (no run)
    is read from its path: overwritten under the same path, every record made with it is of another model."""
    from types import SimpleNamespace

    weights = tmp_path / "t.pt"
    weights.write_bytes(b"first")
    first = R.file_sha256(weights)
    stage = SimpleNamespace(kind="stage", suite="s", teacher={"model": "m", "weights": str(weights)},
                            teacher_run=None, needs=(), target=None, student={"model": "s"})
    ev = SimpleNamespace(kind="eval", suite="s", teacher=None, teacher_run=None, needs=(), target="x",
                         student={"model": "m", "weights": str(weights)})
    assert R.binding_problem(tmp_path, stage, {"teacher": {"sha256": first}}) is None
    assert R.binding_problem(tmp_path, ev, {"student": {"sha256": first}}) is None
    import os
    import time

    weights.write_bytes(b"second")
    os.utime(weights, (time.time() + 5, time.time() + 5))  # another mtime: the cached hash is not reused
    assert "replaced since" in R.binding_problem(tmp_path, stage, {"teacher": {"sha256": first}})
    assert "replaced since" in R.binding_problem(tmp_path, ev, {"student": {"sha256": first}})
    assert "replaced since" in R.binding_problem(tmp_path, ev, {"student": {}})  # none recorded: not bound
