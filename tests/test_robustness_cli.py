"""`kdbench robustness` (the sweep over a suite's finished models, no training; resumes per cell), `kdbench plot`,
`kdbench table --layout/--reference`, and one list of corruption names."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from kdb_util import tiny_suite, train_digits32
from kdbench import results as R
from kdbench.cli import main
from kdbench.suite import load_suite

CELL = re.compile(r"^[a-z_]+_s[1-5]\.json$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits suite at 32 px (the corruption library's minimum), a suite-trained teacher and a baseline
    student, trained once (a couple of steps) for the module; each test copies the results folder."""
    return train_digits32(tmp_path_factory.mktemp("rob"), ["baseline"])


@pytest.fixture
def res(trained, tmp_path):
    path, res = trained
    shutil.copytree(res, tmp_path / "res")
    return path, tmp_path / "res"


@pytest.fixture
def count_cells(monkeypatch):
    """Counts the corruption cells evaluated (written) in this process."""
    written: list[str] = []
    real = R.write_json_atomic

    def counting(p, obj):
        if CELL.match(Path(p).name):
            written.append(f"{Path(p).parent.parent.name}/{Path(p).name}")
        return real(p, obj)

    monkeypatch.setattr(R, "write_json_atomic", counting)
    return written


def _cells(res: Path) -> list[Path]:
    return sorted(res.glob("rob/runs/*/evals/*.json"))


def test_sweep_runs_once_and_resumes_only_what_is_missing(res, count_cells, capsys):
    path, res = res
    args = ["robustness", str(res / "rob"), "--corruptions", "fog,snow", "--severities", "1", "2",
            "--executor", "debug"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(count_cells) == 8 and len(_cells(res)) == 8  # 2 models x 2 corruptions x 2 severities
    assert "mCE" in out and "| teacher" in out and "| baseline" in out
    # no training: the models' folders hold the same model.pt, no new teacher/distill record
    kinds = [json.loads((d / "record.json").read_text())["kind"] for d in R.run_dirs(res / "rob")]
    assert sorted(kinds).count("eval") == 4 and len(kinds) == 6

    # the eval runs are the suite's own: adding the same corruptions to evals: gives the same run_ids
    suite = load_suite(path, ["evals=[{name: corruptions, set: [fog, snow], severities: [1, 2]}]"])
    from kdbench.sweep import plan_sweep

    assert {s.run_id for s in plan_sweep(res / "rob", ["fog", "snow"], [1, 2]).specs} == \
        {s.run_id for s in suite.specs if s.kind == "eval"}

    # again: nothing to do
    count_cells.clear()
    assert main(args) == 0 and count_cells == []
    # killed mid-way: a chunk (one model x one corruption) lost its record and one of its two cells, another
    # chunk lost its record only: only the lost cell is evaluated again, the other chunk's cells are reused
    lost = _cells(res)[0]
    lost.unlink()
    evals = {d: json.loads((d / "record.json").read_text()) for d in R.run_dirs(res / "rob")}
    evals = {d: r for d, r in evals.items() if r["kind"] == "eval"}
    mine = next(d for d, r in evals.items() if r["target"] == lost.parent.parent.name
                and r["eval"]["corruption"] == lost.name.rsplit("_s", 1)[0])
    other = next(d for d, r in evals.items() if r["target"] != lost.parent.parent.name)
    (mine / "record.json").unlink()
    (other / "record.json").unlink()
    assert main(args) == 0
    assert count_cells == [f"{lost.parent.parent.name}/{lost.name}"]
    assert all(json.loads((d / "record.json").read_text())["status"] == "ok" for d in evals)
    # a new severity evaluates only the new cells
    count_cells.clear()
    assert main(args[:-4] + ["1,2,3", "--executor", "debug"]) == 0
    assert sorted(count_cells) == sorted(f"{d.name}/{c}_s3.json" for d in {p.parent.parent for p in _cells(res)}
                                         for c in ("fog", "snow"))


@pytest.mark.parametrize("args, expect", [
    (["--corruptions", "fogg"], "unknown corruption 'fogg'; valid sets: benchmark, extra, all"),
    (["--severities", "0"], "severity 0 is outside 1-5"),
    (["--severities", "2,6"], "severity 6 is outside 1-5"),
    (["--severities", "x"], "--severities: 'x' is not an integer"),
])
def test_bad_sweep_input_is_refused_in_one_line(res, capsys, args, expect, count_cells):
    _, res = res
    assert main(["robustness", str(res / "rob"), "--executor", "debug"] + args) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert count_cells == []


def test_missing_checkpoint_and_other_version_are_refused(res, capsys, count_cells):
    _, res = res
    suite_dir = res / "rob"
    dirs = R.run_dirs(suite_dir)
    # a model of another suite version next to the current ones
    from kdbench.suite import spec_from_dict

    d0 = dirs[0]
    spec = spec_from_dict(json.loads((d0 / "spec.json").read_text()))
    v2 = replace(spec, suite_version=2)
    d2 = suite_dir / "runs" / v2.run_id
    shutil.copytree(d0, d2)
    R.write_spec(d2, v2)
    rec = json.loads((d2 / "record.json").read_text())
    rec.update(run_id=v2.run_id, suite_version=2)
    (d2 / "record.json").write_text(json.dumps(rec))
    assert main(["robustness", str(suite_dir), "--executor", "debug", "--corruptions", "fog"]) == 2
    err = capsys.readouterr().err
    assert "holds models of suite versions 1, 2" in err and "--suite-version" in err
    assert main(["robustness", str(suite_dir), "--suite-version", "1", "--dry-run", "--corruptions", "fog"]) == 0
    assert "2 eval runs" in capsys.readouterr().out
    # a finished model whose checkpoint is gone
    (dirs[1] / "model.pt").unlink()
    assert main(["robustness", str(suite_dir), "--suite-version", "1", "--executor", "debug"]) == 2
    err = capsys.readouterr().err
    assert f"run {dirs[1].name} (" in err and "no checkpoint" in err and str(dirs[1] / "model.pt") in err
    assert count_cells == [] and _cells(res) == []


def test_table_layouts_and_plot_commands(res, capsys, tmp_path):
    _, res = res
    suite_dir = res / "rob"
    assert main(["robustness", str(suite_dir), "--corruptions", "noise", "--severities", "1", "5",
                 "--executor", "debug"]) == 0
    capsys.readouterr()
    assert main(["table", str(suite_dir), "--layout", "robustness", "--reference", "teacher"]) == 0
    out = capsys.readouterr().out
    assert "CE normalised by teacher" in out and "rel. mCE" in out
    # the eval records and the caption say where the corrupted images come from (digits: no CIFAR-100-C remark)
    assert "Corrupted images: generated by kdbench with imagecorruptions (ImageNet-C strengths)." in out
    evals = [r for r in map(R.read_record, sorted((suite_dir / "runs").iterdir())) if r and r["kind"] == "eval"]
    assert evals and {m.get("source") for r in evals for m in r["metrics"]} == {"generated"}
    assert main(["table", str(suite_dir), "--layout", "robustness", "--format", "csv",
                 "--out", str(tmp_path / "t.csv")]) == 0
    assert "mCE" in (tmp_path / "t.csv").read_text()
    assert main(["table", str(suite_dir), "--layout", "cost"]) == 0
    capsys.readouterr()
    assert main(["table", str(suite_dir), "--reference", "teacher"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["plot", str(suite_dir)]) == 0
    out = capsys.readouterr().out
    for name in ("robustness_severity", "robustness_heatmap"):
        for ext in ("png", "pdf"):
            f = suite_dir / "figures" / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000 and str(f) in out


def test_one_list_of_corruption_names():
    from kdbench import evals as E
    from kdbench import robustness as RB

    assert E.corruption_names("benchmark") is RB.BENCHMARK and E.corruption_names("extra") is RB.EXTRA
    assert E.corruption_names("noise") == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert E.corruption_names("all") == RB.ALL
    with pytest.raises(ValueError, match="valid: benchmark, extra, all, noise, blur, weather, digital"):
        E.corruption_names("most")
    entry = E.check_eval({"name": "corruptions", "set": "weather", "severities": [5, 1]}, ("val", "corruptions"))
    assert entry == {"name": "corruptions", "corruptions": list(RB.FAMILIES["weather"]), "severities": [1, 5]}
    with pytest.raises(E.EvalEntryError, match="classification only"):
        E.check_eval({"name": "corruptions", "root": "x"}, ("val", "corruptions"), "detection")
    assert E.check_eval({"name": "corruptions", "root": "c100c"}, ("val", "corruptions"),
                        "classification")["root"] == "c100c"


def test_released_root_is_checked_before_anything_runs(write_suite, tmp_path):
    from kdbench.suite import SuiteError, check_data_available

    ev = {"name": "corruptions", "set": ["fog"], "severities": [1], "root": str(tmp_path / "CIFAR-100-C")}
    suite = load_suite(write_suite(tiny_suite(evals=["val", ev])))
    assert all(s.eval["root"] == ev["root"] for s in suite.specs if s.kind == "eval")
    with pytest.raises(SuiteError, match=r"evals: root: no folder .*CIFAR-100-C"):
        check_data_available(suite)
    (tmp_path / "CIFAR-100-C").mkdir()
    check_data_available(suite)
    # the released files are another source: the same cell file name never mixes them with generated ones
    from kdbench.robustness import read_cell

    cell = tmp_path / "fog_s1.json"
    cell.write_text(json.dumps({"corruption": "fog", "severity": 1, "n_images": 3, "metrics": {"top1": 50.0}}))
    assert read_cell(cell, "fog", 1, 3, "generated") is not None and read_cell(cell, "fog", 1, 3, "released") is None


def test_imagefolder_corruption_chunks_carry_their_point(write_suite, tmp_path):
    """An ImageFolder dataset is corrupted after its resize + center crop (ImageNet-C): its corruption chunks say
    so (``point``), which puts it in the eval run ids, so an eval run recorded before that order is another run
    (redone, never reused). Other datasets' chunks, and so their run ids, are unchanged; released files have none."""
    from kdbench.evals import corruption_point

    assert corruption_point({"name": "imagefolder"}) == "center_crop"
    assert corruption_point({"name": "digits"}) == corruption_point({"name": "cifar100"}) == "decoded"
    ev = {"name": "corruptions", "set": ["fog"], "severities": [1]}
    folder = load_suite(write_suite(tiny_suite(data={"name": "imagefolder", "root": str(tmp_path / "in"),
                                                     "image_size": 32}, evals=["val", ev])))
    digits = load_suite(write_suite(tiny_suite(evals=["val", ev], data={"name": "digits", "image_size": 32})))
    f_evals = [s for s in folder.specs if s.kind == "eval"]
    d_evals = [s for s in digits.specs if s.kind == "eval"]
    assert f_evals and all(s.eval.get("point") == "center_crop" for s in f_evals)
    assert d_evals and all("point" not in s.eval for s in d_evals)
    old = [replace(s, eval={k: v for k, v in s.eval.items() if k != "point"}) for s in f_evals]
    assert not {s.run_id for s in old} & {s.run_id for s in f_evals}
