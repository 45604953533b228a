"""What a newcomer meets before anything runs: pair params of methods the suite does not run, suite names,
a --filter that matches nothing, missing data and checkpoints, and `ls suites` through include:."""

from pathlib import Path

import pytest
import yaml

from kdbench.cli import main
from kdbench.graph import select_specs
from kdbench.suite import SuiteError, check_data_available, find_suite, load_suite, package_suites_dir

from kdb_util import tiny_suite

REPO = Path(__file__).resolve().parent.parent


def test_params_of_methods_not_run_are_ignored_with_a_note(write_suite):
    d = tiny_suite(methods=["baseline", "kd", "catkd"])
    d["pairs"][0]["params"] = {"catkd": {"beta": 0.7}, "kd": {"weight": 0.5}}
    path = write_suite(d)
    full = load_suite(path)
    assert full.notes == [] and {x.params["beta"] for x in full.specs if x.method == "catkd"} == {0.7}
    s = load_suite(path, ["methods=[baseline, kd]"])  # the quickstart's --set that used to fail
    assert {x.method for x in s.specs} == {"baseline", "kd"}
    assert [x.params["weight"] for x in s.specs if x.method == "kd"] == [0.5]  # the kept params still apply
    assert len(s.notes) == 1 and "pairs[0].params.catkd: ignored, 'catkd' is not among this suite's methods " \
                                  "(baseline, kd)" in s.notes[0]


def test_pair_param_key_that_is_no_method_stays_an_error(write_suite):
    d = tiny_suite(methods=["baseline", {"name": "kd", "label": "kd-t2", "params": {"temperature": 2.0}}])
    d["pairs"][0]["params"] = {"kd-t3": {"weight": 0.5}}
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(d))
    msg = str(e.value)
    assert "tiny.yaml: pairs[0].params.kd-t3: not a method of this suite nor a registered method." in msg
    assert "Did you mean 'kd-t2'?" in msg and "Valid here: baseline, kd, kd-t2" in msg


def test_validate_and_dry_run_print_the_note(write_suite, capsys):
    d = tiny_suite(methods=["baseline", "kd", "catkd"])
    d["pairs"][0]["params"] = {"catkd": {"beta": 0.7}}
    path = str(write_suite(d))
    assert main(["validate", path, "--no-data", "--set", "methods=[baseline]"]) == 0
    out = capsys.readouterr().out
    assert "ok   " in out and "note: " in out and "pairs[0].params.catkd: ignored" in out
    assert main(["run", path, "--dry-run", "--set", "methods=[baseline]"]) == 0
    assert "pairs[0].params.catkd: ignored" in capsys.readouterr().err


def test_bare_suite_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "mine.yaml").write_text(yaml.safe_dump(tiny_suite(suite="mine")))
    assert find_suite("mine") == Path("suites/mine.yaml") and find_suite("mine.yaml") == Path("suites/mine.yaml")
    # not in ./suites: the package's own suites folder (a source checkout here)
    assert package_suites_dir() == REPO / "suites"
    assert find_suite("quickstart") == REPO / "suites" / "quickstart.yaml"
    (tmp_path / "suites" / "quickstart.yaml").write_text("local copy wins")
    assert find_suite("quickstart") == Path("suites/quickstart.yaml")
    assert find_suite(str(REPO / "suites" / "quickstart.yaml")) == REPO / "suites" / "quickstart.yaml"
    with pytest.raises(SuiteError) as e:
        find_suite("quickstrat")
    msg = str(e.value)
    assert "suite 'quickstrat' not found (looked for quickstrat, suites/quickstrat.yaml," in msg
    assert "Did you mean 'quickstart'?" in msg and "Available suites: " in msg and "mine, " in msg
    with pytest.raises(SuiteError, match="not found"):
        find_suite("some/dir/quickstart")  # a path is taken as a path


def test_cli_finds_a_suite_by_name(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "--dry-run"]) == 0
    assert "quickstart v1, 48 runs" in capsys.readouterr().out
    assert main(["validate", "quickstart", "--no-data"]) == 0
    assert main(["validate", "nosuch", "--no-data"]) == 1
    assert "suite 'nosuch' not found" in capsys.readouterr().err


def test_filter_that_matches_nothing_lists_what_exists(write_suite):
    s = load_suite(write_suite(tiny_suite(methods=["baseline", {"name": "kd", "label": "kd-t2"}])))
    with pytest.raises(ValueError) as e:
        select_specs(s, "kdd*")
    assert str(e.value) == ("--filter 'kdd*' matches no run of tiny (a glob over the label, the method, the pair "
                            "and label/pair). Labels: teacher, baseline, kd-t2; methods: baseline, kd; "
                            "pairs: resnet8→resnet8")
    assert [x.label for x in select_specs(s, "kd")] == ["teacher", "kd-t2"]  # the method name matches


def _torch_archive(path):
    """A file with the structure of what torch.save writes (validate checks it without torch)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", b"\x80\x02}q\x00.")


def _ckpt_suite(write_suite, tmp_path, n_pairs=3):
    d = tiny_suite(methods=["baseline", "kd"])
    d["pairs"] = [{"name": f"p{i}", "teacher": {"model": "kdbench:resnet8",
                                                 "weights": "${KDBENCH_CKPT:-ckpts}/t%d.pt" % i},
                   "student": {"model": "kdbench:resnet8"}} for i in range(n_pairs)]
    return write_suite(d)


def test_every_missing_teacher_checkpoint_is_listed(write_suite, tmp_path, monkeypatch):
    monkeypatch.delenv("KDBENCH_CKPT", raising=False)
    monkeypatch.chdir(tmp_path)
    path = _ckpt_suite(write_suite, tmp_path)
    with pytest.raises(SuiteError) as e:
        check_data_available(load_suite(path))
    lines = str(e.value).splitlines()
    assert lines == [f"{path}: pairs[{i}] (p{i}): teacher weights not found: ckpts/t{i}.pt" for i in range(3)] + [
        f"hint: {path} reads checkpoints under ${{KDBENCH_CKPT:-ckpts}} (KDBENCH_CKPT is not set, so the default "
        f"'ckpts' is used): point KDBENCH_CKPT at the folder that holds them, e.g. "
        f"`export KDBENCH_CKPT=/path/to/checkpoints`"]
    # with the variable pointing at a folder holding two of them, only the third is missing
    (tmp_path / "store").mkdir()
    for i in (0, 2):
        _torch_archive(tmp_path / "store" / f"t{i}.pt")
    monkeypatch.setenv("KDBENCH_CKPT", str(tmp_path / "store"))
    with pytest.raises(SuiteError) as e:
        check_data_available(load_suite(path))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: pairs[1] (p1): teacher weights not found: {tmp_path}/store/t1.pt"
    assert len(lines) == 2 and f"(KDBENCH_CKPT={tmp_path}/store)" in lines[1]
    _torch_archive(tmp_path / "store" / "t1.pt")
    check_data_available(load_suite(path))  # all there


def test_validate_cifar100_homogeneous_lists_all_four_teachers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDBENCH_CKPT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "data"))
    assert main(["validate", str(REPO / "suites" / "cifar100_homogeneous.yaml")]) == 1
    err = capsys.readouterr().err
    assert "data: CIFAR-100 not found at " in err
    missing = [line for line in err.splitlines() if "teacher weights not found" in line]
    assert [m.split("): ")[0].split(" (")[1] for m in missing] == [
        "resnet32x4→resnet8x4", "resnet56→resnet20", "wrn_40_2→wrn_16_2", "vgg13→vgg8"]
    assert f"(KDBENCH_DATA={tmp_path / 'data'}): point KDBENCH_DATA at the folder" in err
    assert "reads checkpoints under ${KDBENCH_CKPT:-download_ckpts}" in err


def test_data_and_weights_not_found_messages_name_the_variables(tmp_path):
    from kdbench.data.cifar import CIFAR100
    from kdbench.models.sources import load_weights

    with pytest.raises(FileNotFoundError) as e:
        CIFAR100().check(tmp_path / "cifar100")
    assert "CIFAR-100 not found at" in str(e.value) and "point KDBENCH_DATA at the folder" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_weights(None, tmp_path / "t.pt")
    assert f"teacher weights not found: {tmp_path / 't.pt'}" in str(e.value) and "KDBENCH_CKPT" in str(e.value)


def test_ls_suites_reads_the_task_through_include(tmp_path, capsys):
    base = tiny_suite(suite="base", task="detection", description="the base")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "child.yaml").write_text("suite: child\ninclude: base.yaml\ndescription: a child\n")
    assert main(["ls", "suites", "--dir", str(tmp_path)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["child.yaml"][:3] == ["1", "detection", "a"] and rows["base.yaml"][:2] == ["1", "detection"]
    assert main(["ls", "suites", "--dir", str(REPO / "suites")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("coco_spatial_vs_dwt.yaml"))
    assert line.split()[2] == "detection"
