"""Small things a newcomer meets first: `kdbench ls` output, and where a bad value came from."""

from __future__ import annotations

from pathlib import Path

from kdbench.cli import _shorten, main

QUICKSTART = Path(__file__).parent.parent / "suites" / "quickstart.yaml"


def test_ls_methods_has_three_columns_unless_verbose(capsys):
    assert main(["ls", "methods"]) == 0
    head, rule = capsys.readouterr().out.splitlines()[:2]
    assert head.split() == ["method", "tasks", "citation"] and len(rule.split()) == 3
    assert main(["ls", "methods", "-v"]) == 0
    head, rule = capsys.readouterr().out.splitlines()[:2]
    assert head.split() == ["method", "tasks", "citation", "params"] and len(rule.split()) == 4


def test_ls_suites_cuts_descriptions_at_a_word():
    text = "CIFAR-100, same-family teacher/student pairs, the mdistiller/CRD protocol"
    assert _shorten(text, 200) == text
    short = _shorten(text, 50)
    assert len(short) <= 50 and short.endswith("…") and text.startswith(short[:-1])
    assert text[len(short) - 1] in " ,"  # cut where a word ends


def test_ls_models_says_when_the_mmdet_backend_is_missing(capsys):
    import importlib.util

    assert main(["ls", "models", "resnet8*"]) == 0
    out = capsys.readouterr().out
    mmdet_line = next(line for line in out.splitlines() if line.startswith("mmdet:"))
    if importlib.util.find_spec("mmdet") is None:
        assert "not installed" in mmdet_line and "[mmdet]" in mmdet_line
    assert mmdet_line.strip() != "mmdet:"


def test_a_bad_value_from_set_says_so(capsys):
    assert main(["validate", str(QUICKSTART), "--no-data", "--set", "recipe.epochs=abc"]) != 0
    assert "recipe.epochs: expected int, got 'abc' (set by --set recipe.epochs=abc)" in capsys.readouterr().err


def test_status_has_a_kind_column(tmp_path):
    from test_results_tables import make_record, save

    from kdbench.tables import status_table

    stage = make_record("freekd", 0, 0, None, kind="stage")
    distill = make_record("freekd", 0, 0, 71.0)
    save(tmp_path / "s", stage, distill)
    lines = status_table(tmp_path / "s").splitlines()
    assert lines[0].split()[:4] == ["run", "v", "kind", "label"]
    kinds = sorted(line.split()[2] for line in lines[2:] if line[:8] in (stage["run_id"][:8], distill["run_id"][:8]))
    assert kinds == ["distill", "stage"]


def test_a_table_of_a_suite_not_run_here_points_to_the_committed_files(tmp_path, capsys):
    folder = tmp_path / "quickstart"
    folder.mkdir()
    (folder / "table.md").write_text("| x |\n")
    assert main(["table", str(folder), "--layout", "cost"]) == 2
    err = capsys.readouterr().err
    assert "holds tables (table.md) but no run records" in err and "kdbench run quickstart" in err


def test_a_rerun_says_which_runs_resume_and_from_where(tmp_path):
    import json

    from kdb_util import tiny_suite
    from kdbench.graph import resume_points
    from kdbench.results import run_dir_for
    from kdbench.suite import load_suite

    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_suite(methods=["kd"])))
    suite = load_suite(path)
    kd = next(s for s in suite.specs if s.kind == "distill")
    d = run_dir_for(tmp_path / "res", kd)
    d.mkdir(parents=True)
    (d / "checkpoint.pt").write_bytes(b"x")
    (d / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    lines = resume_points(suite.specs, tmp_path / "res")
    assert lines == [f"kd {kd.pair} s{kd.seed}: resumes after epoch 2/{kd.recipe['epochs']} (its checkpoint)"]


def test_the_cost_table_says_when_runs_ended_on_a_busy_machine(tmp_path):
    from test_results_tables import make_record, save

    from kdbench.tables import make_table

    quiet = [make_record("baseline", 0, s, 70.0) for s in range(2)]
    busy = [make_record("kd", 0, s, 71.0) for s in range(2)]
    for r in quiet:
        r["cost"] = {**r["cost"], "load_1m": 1.9, "cpus": 2}
    for r in busy:
        r["cost"] = {**r["cost"], "load_1m": 6.5, "cpus": 2}
    save(tmp_path / "s", *quiet, *busy)
    md = make_table(tmp_path / "s", layout="cost")
    assert "Busy machine: 2 of 4 run(s) ended with a load above their CPUs (up to 6.5 on 2)" in md
    save(tmp_path / "q", *quiet)
    assert "Busy machine" not in make_table(tmp_path / "q", layout="cost")


def test_rel_mce_does_not_crown_a_weak_model(tmp_path):
    """rel. mCE rewards a high clean error: a row far below the reference's clean top-1 is not bold for it, and a
    note says why; the caption says what rel. mCE measures."""
    from test_results_tables import make_record, save
    from test_robustness_tables import eval_record

    from kdbench import robustness as RB
    from kdbench.tables import make_table

    recs = []
    for label, clean, corrupted in (("baseline", 70.0, 40.0), ("kd", 69.0, 41.0), ("weak", 48.0, 40.0)):
        r = make_record(label, 0, 0, clean)
        recs += [r, eval_record(r, {(c, s): corrupted for c in RB.BENCHMARK for s in (1, 3)})]
    save(tmp_path / "s", *recs)
    md = make_table(tmp_path / "s", layout="robustness")
    weak = next(line for line in md.splitlines() if line.startswith("| weak"))
    rel = [c.strip() for c in weak.strip("|").split("|")][4]
    assert "**" not in rel  # the lowest rel. mCE, not marked
    assert "weak: not marked best for rel. mCE" in md and "rewards a model whose clean error is already high" in md


def test_run_of_a_suite_with_corruption_evals_ends_with_its_robustness_table(tmp_path, capsys):
    import yaml

    from kdb_util import tiny_suite

    d = tiny_suite(suite="rob", data={"name": "digits", "train_fraction": 0.2, "image_size": 32},
                   methods=["baseline"], evals=["val", {"name": "corruptions", "set": ["fog"], "severities": [1]}])
    d["recipe"].update(epochs=1, max_steps_per_epoch=1, eval_batch_size=540)
    d["pairs"][0]["teacher"]["train"]["recipe"] = {"epochs": 1, "max_steps_per_epoch": 1}
    path = tmp_path / "rob.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert main(["run", str(path), "--results", str(tmp_path / "res"), "--executor", "debug"]) == 0
    out = capsys.readouterr().out
    assert "top1 (eval val, final epoch" in out and "mCE" in out and "corruption robustness" in out


def test_every_command_prints_its_help(capsys):
    import pytest

    from kdbench.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in ["--help"] + [[c, "--help"] for c in sub.choices]:
        with pytest.raises(SystemExit) as e:
            main(name if isinstance(name, list) else [name])
        assert e.value.code == 0, name
    assert "compare" in capsys.readouterr().out
