"""Integrity under faults, hostile files and bad input (issue 11): no run records wrong numbers, loads foreign
code, gets stuck or leaves processes behind, and every user mistake ends in one line.

Training cases share one tiny digits suite (teacher, baseline, kd; 2 epochs) trained once per module and
copied per test."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdbench import cli
from kdbench.results import RecordError
from kdbench.scheduler import launch
from kdbench.graph import pending
from kdbench.suite import load_suite

from kdb_util import slow_steps_env, tiny_suite

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda s: None)


def runs_dir(results: Path, suite: str = "tiny") -> Path:
    return results / suite / "runs"


def by_label(results: Path, suite: str = "tiny") -> dict:
    out = {}
    for p in sorted(runs_dir(results, suite).glob("*/record.json")):
        rec = json.loads(p.read_text())
        out[rec["label"]] = rec
    return out


def folder(results: Path, rec: dict) -> Path:
    return runs_dir(results, rec["suite"]) / rec["run_id"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(suite path, results) of the tiny suite trained once: teacher, baseline, kd."""
    root = tmp_path_factory.mktemp("trained")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite(), sort_keys=False))
    recs = launch(load_suite(path), root / "res", executor="debug", **QUIET)
    assert [r["status"] for r in recs] == ["ok", "ok", "ok"]
    return path, root / "res"


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained results: (suite path, results, the reference records by label)."""
    path, res = trained
    mine = tmp_path / "res"
    shutil.copytree(res, mine)
    return path, mine, by_label(res)


def rerun(path: Path, results: Path) -> dict:
    return {r["label"]: r for r in launch(load_suite(path), results, executor="debug", **QUIET)}


class Evil:
    """A pickle that, when loaded without restriction, creates the marker folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_evil(path: Path, marker: Path, zip_format: bool = True) -> None:
    if zip_format:
        torch.save({"student": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"student": Evil(marker)}))


# ------------------------------------------------------------------------------------------- provenance
def test_foreign_checkpoint_is_refused_not_resumed(copy):
    path, res, ref = copy
    base, kd = ref["baseline"], ref["kd"]
    bdir = folder(res, base)
    for f in ("record.json", "model.pt", "checkpoint.pt"):
        (bdir / f).unlink()
    shutil.copy(folder(res, kd) / "checkpoint.pt", bdir / "checkpoint.pt")  # KD's last epoch, copied over
    got = rerun(path, res)
    assert list(got) == ["baseline"]
    assert got["baseline"]["status"] == "failed"
    line = got["baseline"]["error"].strip().splitlines()[-1]
    assert str(bdir / "checkpoint.pt") in line and kd["run_id"] in line and "delete it" in line
    assert not (bdir / "model.pt").exists()
    (bdir / "checkpoint.pt").unlink()  # what the message says to do
    got = rerun(path, res)
    assert got["baseline"]["status"] == "ok" and got["baseline"]["metrics"] == base["metrics"]


def test_replaced_teacher_weights_are_refused(copy):
    path, res, ref = copy
    teacher, kd = ref["teacher"], ref["kd"]
    tdir = folder(res, teacher)
    assert teacher["artifact"]["sha256"] and teacher["artifact"]["file"] == "model.pt"
    shutil.copy(folder(res, ref["baseline"]) / "model.pt", tdir / "model.pt")  # a valid, different resnet8
    (folder(res, kd) / "record.json").unlink()
    (folder(res, kd) / "checkpoint.pt").unlink()
    got = rerun(path, res)
    assert list(got) == ["kd"] and got["kd"]["status"] == "failed"
    line = got["kd"]["error"].strip().splitlines()[-1]
    assert str(tdir / "model.pt") in line and "changed after its run recorded it" in line


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_teacher_file_is_rebuilt(copy, damage, capsys):
    path, res, ref = copy
    teacher, kd = ref["teacher"], ref["kd"]
    model = folder(res, teacher) / "model.pt"
    if damage == "missing":
        model.unlink()
    else:
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    (folder(res, kd) / "record.json").unlink()
    (folder(res, kd) / "checkpoint.pt").unlink()
    got = rerun(path, res)
    assert sorted(got) == ["kd", "teacher"]
    assert "runs again" in capsys.readouterr().err
    assert got["teacher"]["status"] == "ok" and got["teacher"]["metrics"] == teacher["metrics"]
    assert got["teacher"]["artifact"]["sha256"] == teacher["artifact"]["sha256"]  # resumed from its checkpoint
    assert got["kd"]["status"] == "ok" and got["kd"]["metrics"] == kd["metrics"]


@pytest.mark.parametrize("damage", ["truncated", "one byte of a tensor"])
def test_truncated_checkpoint_is_set_aside_and_the_run_restarts(copy, capsys, damage):
    """A truncated checkpoint, or one with a damaged byte inside a tensor (torch.load reads it without a word: the
    zip's CRCs catch it), is set aside and the run restarts from nothing: no resume from damaged weights."""
    path, res, ref = copy
    kd = ref["kd"]
    kdir = folder(res, kd)
    ck = (kdir / "checkpoint.pt").read_bytes()
    (kdir / "record.json").unlink()
    (kdir / "model.pt").unlink()
    if damage == "truncated":
        bad = ck[: len(ck) // 3]
    else:
        import struct
        import zipfile

        with zipfile.ZipFile(kdir / "checkpoint.pt") as z:
            info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
        name_len, extra_len = struct.unpack("<HH", ck[info.header_offset + 26: info.header_offset + 30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2  # mid-tensor (local header)
        bad = ck[:at] + bytes([ck[at] ^ 0x40]) + ck[at + 1:]
    (kdir / "checkpoint.pt").write_bytes(bad)
    got = rerun(path, res)
    rec = got["kd"]
    assert rec["status"] == "ok" and rec["metrics"] == kd["metrics"] and rec["scheduler"]["resumes"] == 0
    aside = list(kdir.glob("checkpoint.pt.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, not deleted
    assert "unreadable checkpoint" in capsys.readouterr().err and "set aside" in rec["warnings"][0]


def test_record_of_another_run_or_suite_is_refused(copy, capsys):
    path, res, ref = copy
    kd, base = ref["kd"], ref["baseline"]
    # a suite "other" with one record of its own, and tiny's kd run folder copied into its runs/
    own = json.loads((folder(res, base) / "record.json").read_text())
    own.update(suite="other", run_id="0123456789abcdef")
    (res / "other" / "runs" / own["run_id"]).mkdir(parents=True)
    (res / "other" / "runs" / own["run_id"] / "record.json").write_text(json.dumps(own))
    shutil.copytree(folder(res, kd), res / "other" / "runs" / kd["run_id"])
    assert cli.main(["table", str(res / "other")]) != 0
    err = capsys.readouterr().err
    assert str(res / "other" / "runs" / kd["run_id"] / "record.json") in err and "suite 'tiny'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    from kdbench.results import load_records

    with pytest.raises(RecordError, match="copied or moved here"):
        load_records(res / "other")
    # kd's record copied over the baseline's: the baseline would show KD's numbers
    shutil.copy(folder(res, kd) / "record.json", folder(res, base) / "record.json")
    assert cli.main(["table", str(res / "tiny")]) != 0
    err = capsys.readouterr().err
    assert str(folder(res, base) / "record.json") in err and len(err.strip().splitlines()) == 1
    with pytest.raises(RecordError):
        pending(load_suite(path).specs, res)


def test_non_numeric_metric_names_the_file(copy, capsys):
    path, res, ref = copy
    f = folder(res, ref["kd"]) / "record.json"
    rec = json.loads(f.read_text())
    rec["metrics"][0]["value"] = "71.3%"
    f.write_text(json.dumps(rec))
    assert cli.main(["table", str(res / "tiny")]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "'71.3%' is not a number" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- safe loading
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_malicious_checkpoint_executes_nothing(copy, tmp_path, zip_format, capsys):
    path, res, ref = copy
    kd = ref["kd"]
    kdir = folder(res, kd)
    marker = tmp_path / "PWNED"
    for f in ("record.json", "model.pt", "checkpoint.pt"):
        (kdir / f).unlink()
    write_evil(kdir / "checkpoint.pt", marker, zip_format)
    got = rerun(path, res)
    assert not marker.exists()
    assert got["kd"]["status"] == "ok" and got["kd"]["metrics"] == kd["metrics"]
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "checkpoint.pt" in ln]
    assert len(warn) == 1 and "objects other than tensors" in warn[0]


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_malicious_teacher_model_executes_nothing(copy, tmp_path, zip_format):
    path, res, ref = copy
    teacher, kd = ref["teacher"], ref["kd"]
    marker = tmp_path / "PWNED"
    write_evil(folder(res, teacher) / "model.pt", marker, zip_format)
    for f in ("record.json", "model.pt", "checkpoint.pt"):
        (folder(res, kd) / f).unlink()
    got = rerun(path, res)
    assert not marker.exists()
    if zip_format:  # an intact torch file with another hash: the dependent refuses it, naming it
        assert got["kd"]["status"] == "failed" and "changed after its run recorded it" in got["kd"]["error"]
    else:  # not a torch file: the teacher is rebuilt, the student gets its right numbers
        assert got["teacher"]["status"] == "ok" and got["kd"]["metrics"] == kd["metrics"]


def test_malicious_weights_and_stage_files_execute_nothing(tmp_path):
    from kdbench.models.sources import build_model, load_weights
    from kdbench.runner import _load_stage

    marker = tmp_path / "PWNED"
    net = build_model("kdbench:resnet8", 10, 3)
    for zip_format in (True, False):
        evil = tmp_path / f"evil{zip_format}.pt"
        write_evil(evil, marker, zip_format)
        with pytest.raises(ValueError) as e:
            load_weights(net, evil)  # a checkpoint teacher's `weights:` file
        assert str(evil) in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError) as e:
            _load_stage(evil, {"artifact": None})  # a stage.pt (a record without a hash: read, refused)
        assert "objects other than tensors" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError, match="changed after its run recorded it.*redo the stage"):
            _load_stage(evil, {"artifact": {"sha256": "0" * 64}})  # with a hash: never read at all
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- temp files
def test_stale_temp_files_are_cleaned_and_writes_leave_none(tmp_path, monkeypatch):
    import errno

    from kdbench.checkpoint import write_log
    from kdbench.results import STALE_TMP_S, clean_stale_temps, temp_path, write_json_atomic, write_torch_atomic

    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temp_path(d / "model.pt")  # a live writer's (this process): kept
    theirs = mine.with_name(mine.name.replace(f"-{os.getpid()}.", f"-{dead.pid}."))  # a process that died
    other_host = mine.with_name(mine.name.replace(mine.name.split(".")[3], "otherhost-1"))  # alive or not: kept
    for p in (mine, theirs, other_host):
        p.write_bytes(b"x")
    old = d / "log.jsonl.tmp123"  # an older kdbench's name, long abandoned
    young = d / "checkpoint.pt.tmp123"  # an older kdbench's name, maybe still written: kept for now
    old.write_text("x")
    young.write_text("x")
    os.utime(old, (time.time() - STALE_TMP_S - 60, time.time() - STALE_TMP_S - 60))
    removed = clean_stale_temps(d)
    assert sorted(p.name for p in removed) == sorted([theirs.name, old.name])
    assert sorted(p.name for p in d.iterdir()) == sorted([mine.name, other_host.name, young.name])
    for p in (mine, other_host, young):
        p.unlink()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_torch_atomic(d / "model.pt", {"w": torch.zeros(3)})
    with pytest.raises(OSError):
        write_log(d / "log.jsonl", [{"epoch": 1}])
    with pytest.raises(OSError):
        write_json_atomic(d / "record.json", {"a": 1})
    assert list(d.iterdir()) == []


# ------------------------------------------------------------------------------------------- concurrency
SITECUSTOMIZE = """
import os
import kdbench.runner as _r

_orig = _r._run_one

def _counted(spec, *a, **k):
    fd = os.open(os.environ["KDB_COUNTER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (spec.run_id + "\\n").encode())
    os.close(fd)
    return _orig(spec, *a, **k)

_r._run_one = _counted
"""


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "KDBENCH_THREADS": "1", **extra}
    return env


def test_two_concurrent_runs_train_each_run_once(write_suite, tmp_path):
    path = write_suite(tiny_suite())
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    counter = tmp_path / "count.txt"
    env = _env(tmp_path, KDB_COUNTER=str(counter),
               PYTHONPATH=os.pathsep.join([str(hook), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "kdbench.cli", "run", str(path), "--results", str(tmp_path / "res"), "--no-table",
           "--parallel", "2"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    recs = by_label(tmp_path / "res")
    assert sorted(recs) == ["baseline", "kd", "teacher"] and all(r["status"] == "ok" for r in recs.values())
    trained = counter.read_text().split()
    assert sorted(trained) == sorted(r["run_id"] for r in recs.values()), "a run was trained twice (or never)"
    assert all(r["scheduler"]["resumes"] == 0 for r in recs.values())
    leftovers = [p.name for p in runs_dir(tmp_path / "res").glob("*/*") if ".tmp" in p.name]
    assert leftovers == []


# ------------------------------------------------------------------------------------------- signals
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    from kdbench.scheduler import _children

    out, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell does for `cmd &` in a script


@pytest.mark.parametrize("sig,background", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True),
                                            (signal.SIGINT, "terminal")],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-background", "Ctrl-C"])
def test_stop_signal_leaves_no_worker_and_a_rerun_resumes(write_suite, tmp_path, sig, background):
    """Stopped by a signal, kdbench stops its workers (Ctrl-C to each job, even when it was started in the
    background by a script and so has SIGINT ignored) and a rerun resumes the interrupted runs. A Ctrl-C at a
    terminal reaches every process of the foreground group (kdbench, submitit's job controllers, the runs): one
    line, no traceback from any of them."""
    d = tiny_suite(methods=["baseline"])
    d["recipe"]["epochs"] = 4
    d["pairs"][0]["teacher"]["train"]["recipe"]["epochs"] = 6  # far longer than the stop's 15 s grace
    path = write_suite(d)
    results = tmp_path / "res"
    env = _env(tmp_path, **slow_steps_env(0.2))
    proc = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(path), "--results", str(results),
                             "--no-table", "--parallel", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint if background is True else None,
                            start_new_session=background == "terminal")
    deadline = time.time() + 300
    workers: set[int] = set()
    while time.time() < deadline:  # wait until a worker is training (a log line written)
        workers |= _descendants(proc.pid)
        if any(runs_dir(results).glob("*/log.jsonl")) if runs_dir(results).is_dir() else False:
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    workers |= _descendants(proc.pid)
    assert workers, "no worker process was seen"
    if background == "terminal":
        os.killpg(proc.pid, sig)  # what the terminal does on Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(sig)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 12, "the workers were not stopped by the Ctrl-C but by the grace period's kill"
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert (f"stopped by {sig.name}" if sig != signal.SIGINT else "kdbench: interrupted") in err
    time.sleep(1.0)
    assert [p for p in workers if _alive(p)] == [], "a worker outlived kdbench run"
    assert [r for r in by_label(results).values()] == [] or all(r["status"] == "ok" for r in by_label(results).values())
    if sig == signal.SIGTERM:  # the interrupted runs resume (the teacher's 6 epochs cannot have finished)
        r = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(path), "--results", str(results),
                            "--no-table", "--executor", "debug"], env=_env(tmp_path), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        recs = by_label(results)
        assert sorted(recs) == ["baseline", "teacher"] and all(x["status"] == "ok" for x in recs.values())
        assert sum(x["scheduler"]["resumes"] for x in recs.values()) >= 1


def test_an_abort_of_the_scheduler_stops_the_running_workers(write_suite, tmp_path, monkeypatch):
    """Any error in the scheduler's own process (here: the log callback, standing for a corrupt record or a full
    disk met while writing) stops every running worker before it propagates."""
    d = tiny_suite(methods=["baseline"])
    d["recipe"]["epochs"] = 4
    path = write_suite(d)
    for k, v in slow_steps_env(0.2).items():  # the workers' steps, not this process'
        monkeypatch.setenv(k, v)
    seen: set[int] = set()
    before = _descendants(os.getpid())  # earlier tests' long-lived helpers (e.g. multiprocessing's resource tracker)

    def log(line: str) -> None:
        seen.update(_descendants(os.getpid()) - before)
        if line.startswith("["):  # the first run finished while the other still trains
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        launch(load_suite(path), tmp_path / "res", executor="local", parallel=2, log=log)
    assert seen, "no worker process was seen"
    # the job of the run that had just finished may still be writing its result and exiting: give it time (a
    # loaded machine), but no process may stay
    deadline = time.time() + 20
    while [p for p in seen if _alive(p)] and time.time() < deadline:
        time.sleep(0.2)
    assert [p for p in seen if _alive(p)] == []


# ------------------------------------------------------------------------------------------- bad input
def _suite_text(**over) -> str:
    return yaml.safe_dump(tiny_suite(**over), sort_keys=False)


def _bad(tmp: Path) -> dict:
    """name -> (argv, files to write {name: text or bytes}); ``{t}`` in argv is the case's folder."""
    ok = _suite_text()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    return {
        # the suite file itself
        "suite-is-a-directory": (["run", "{t}"], {}),
        "suite-missing": (["run", "{t}/nope.yaml"], {}),
        "suite-not-utf8": (["run", "{t}/tiny.yaml"], {"tiny.yaml": ok.encode("utf-8").replace(b"tiny", b"t\xe9ny")}),
        "suite-empty": (["run", "{t}/tiny.yaml"], {"tiny.yaml": ""}),
        "suite-yaml-syntax": (["run", "{t}/tiny.yaml"], {"tiny.yaml": "suite: [unclosed\n"}),
        "suite-a-list": (["run", "{t}/tiny.yaml"], {"tiny.yaml": "- a\n- b\n"}),
        "suite-duplicate-key": (["run", "{t}/tiny.yaml"], {"tiny.yaml": ok + "seeds: [1, 2]\n"}),
        "suite-alias-bomb": (["validate", "{t}/tiny.yaml"], {"tiny.yaml": bomb}),
        "suite-binary": (["validate", "{t}/tiny.yaml"], {"tiny.yaml": bytes(range(256))}),
        "validate-dir": (["validate", "{t}"], {}),
        # suite contents
        "unknown-task": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(task="classify")}),
        "unknown-method": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(methods=["baseline", "kdd"])}),
        "unknown-param": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(methods=[{"name": "kd", "params": {"tau": 2}}])}),
        "param-wrong-type": (["run", "{t}/tiny.yaml"],
                             {"tiny.yaml": _suite_text(methods=[{"name": "kd", "params": {"temperature": "four"}}])}),
        "unknown-model": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(pairs=[{"teacher": {"model": "kdbench:resnet9000",
                                                                                   "train": {}},
                                                                       "student": {"model": "kdbench:resnet8"}}])}),
        "missing-teacher-weights": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(pairs=[{
            "teacher": {"model": "kdbench:resnet8", "weights": "/nonexistent/t.pt"},
            "student": {"model": "kdbench:resnet8"}}])}),
        "missing-key": (["run", "{t}/tiny.yaml"], {"tiny.yaml": yaml.safe_dump({k: v for k, v in tiny_suite().items()
                                                                        if k != "recipe"})}),
        "seeds-not-ints": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(seeds=["zero"])}),
        "unknown-dataset": (["run", "{t}/tiny.yaml"], {"tiny.yaml": _suite_text(data={"name": "mnist-ish"})}),
        "missing-include": (["run", "{t}/tiny.yaml"], {"tiny.yaml": "include: nothere.yaml\n"}),
        "unknown-top-key": (["run", "{t}/tiny.yaml"], {"tiny.yaml": ok + "colour: blue\n"}),
        "set-no-equals": (["run", "{t}/tiny.yaml", "--set", "recipe.epochs"], {"tiny.yaml": ok}),
        "set-unknown-key": (["run", "{t}/tiny.yaml", "--set", "recipe.epohcs=2"], {"tiny.yaml": ok}),
        "set-bad-value": (["run", "{t}/tiny.yaml", "--set", "recipe.epochs=abc"], {"tiny.yaml": ok}),
        "filter-matches-nothing": (["run", "{t}/tiny.yaml", "--filter", "nosuchmethod", "--dry-run"], {"tiny.yaml": ok}),
        # the command line
        "parallel-zero": (["run", "{t}/tiny.yaml", "--parallel", "0"], {"tiny.yaml": ok}),
        "parallel-negative": (["run", "{t}/tiny.yaml", "--parallel", "-1"], {"tiny.yaml": ok}),
        "parallel-text": (["run", "{t}/tiny.yaml", "--parallel", "many"], {"tiny.yaml": ok}),
        "unknown-executor": (["run", "{t}/tiny.yaml", "--executor", "cloud"], {"tiny.yaml": ok}),
        "unknown-command": (["train", "{t}/tiny.yaml"], {}),
        "no-command": ([], {}),
        "unknown-option": (["run", "{t}/tiny.yaml", "--fast"], {"tiny.yaml": ok}),
        "ls-unknown": (["ls", "weights"], {}),
        "no-wait-local": (["run", "{t}/tiny.yaml", "--no-wait"], {"tiny.yaml": ok}),
        # results folders and records
        "results-is-a-file": (["run", "{t}/tiny.yaml", "--results", "{t}/res"], {"tiny.yaml": ok, "res": "x"}),
        "results-under-a-file": (["run", "{t}/tiny.yaml", "--results", "{t}/f/res"], {"tiny.yaml": ok, "f": "x"}),
        "table-missing": (["table", "{t}/nothing"], {}),
        "table-empty": (["table", "{t}"], {}),
        "table-corrupt-record": (["table", "{t}/tiny"], {"tiny/runs/abc/record.json": '{"schema": 1, "run'}),
        "table-not-a-record": (["table", "{t}/tiny"], {"tiny/runs/abc/record.json": "[1, 2]"}),
        "table-bad-format": (["table", "{t}", "--format", "xlsx"], {}),
        "table-bad-select": (["table", "{t}", "--select", "worst"], {}),
        "table-suite-version-text": (["table", "{t}", "--suite-version", "two"], {}),
        "status-missing": (["status", "{t}/nothing"], {}),
        "status-tail-text": (["status", "{t}", "--tail", "all"], {}),
        "run-over-corrupt-record": (["run", "{t}/tiny.yaml", "--results", "{t}/res"],
                                    {"tiny.yaml": ok, "res/tiny/runs/RID/record.json": "{"}),
    }


BAD = sorted(_bad(Path("/x")))
#: what the one line must say (so that a case cannot pass by failing for another reason)
SAYS = {
    "suite-is-a-directory": "is a directory", "suite-missing": "not found", "suite-not-utf8": "not UTF-8",
    "suite-empty": "must be a YAML mapping", "suite-yaml-syntax": "not valid YAML",
    "suite-a-list": "must be a YAML mapping", "suite-duplicate-key": "duplicate key 'seeds'",
    "suite-alias-bomb": "alias bomb", "suite-binary": "not UTF-8", "validate-dir": "is a directory",
    "unknown-task": "unknown task 'classify'", "unknown-method": "unknown method 'kdd'",
    "unknown-param": "unknown parameter(s) 'tau'", "param-wrong-type": "'temperature'",
    "unknown-model": "resnet9000", "missing-teacher-weights": "/nonexistent/t.pt", "missing-key": "recipe",
    "seeds-not-ints": "seeds", "unknown-dataset": "mnist-ish", "missing-include": "nothere.yaml",
    "unknown-top-key": "colour", "set-no-equals": "KEY=VALUE", "set-unknown-key": "epohcs",
    "set-bad-value": "recipe.epochs", "filter-matches-nothing": "matches no run", "parallel-zero": "at least 1",
    "parallel-negative": "at least 1", "parallel-text": "'many'", "unknown-executor": "'cloud'",
    "unknown-command": "'train'", "no-command": "required", "unknown-option": "--fast", "ls-unknown": "'weights'",
    "no-wait-local": "--no-wait", "results-is-a-file": "is a file, not a folder",
    "results-under-a-file": "is a file, not a folder", "table-missing": "does not exist",
    "table-empty": "no run records", "table-corrupt-record": "record.json", "table-not-a-record": "record.json",
    "table-bad-format": "'xlsx'", "table-bad-select": "'worst'", "table-suite-version-text": "'two'",
    "status-missing": "does not exist", "status-tail-text": "'all'", "run-over-corrupt-record": "delete it",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_non_zero(case, tmp_path, capsys, monkeypatch):
    argv, files = _bad(tmp_path)[case]
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        if "RID" in name:  # the run folder of the suite's first run
            rid = load_suite(tmp_path / "tiny.yaml").specs[0].run_id
            name = name.replace("RID", rid)
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), (out, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1, err
    assert "internal error" not in err, err
    assert SAYS[case] in lines[0], lines[0]


def test_bad_input_case_count():
    assert len(BAD) >= 40


# ------------------------------------------------------------------------------------------- filesystem faults
@pytest.fixture
def mounted(tmp_path):
    """A tmpfs mounted for the test (root only): ``mounted(options)`` returns its folder."""
    made = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"mnt{len(made)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        made.append(d)
        return d

    yield mount
    for d in made:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _one_line_failure(argv, capsys) -> str:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and "Traceback" not in err + out and len(lines) == 1, (rc, err)
    return lines[0]


def _readonly(mounted, tmp_path) -> Path:
    if os.geteuid() == 0:
        return mounted("ro,size=1m")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_read_only_results_and_table_out(copy, mounted, tmp_path, capsys):
    path, res, _ = copy
    ro = _readonly(mounted, tmp_path)
    line = _one_line_failure(["run", str(path), "--results", str(ro / "res"), "--no-table"], capsys)
    assert str(ro / "res") in line and ("read-only" in line or "permission" in line)
    line = _one_line_failure(["table", str(res / "tiny"), "--out", str(ro / "t.md")], capsys)
    assert str(ro / "t.md") in line
    line = _one_line_failure(["table", str(res / "tiny"), "--out", str(tmp_path)], capsys)  # a folder
    assert str(tmp_path) in line


def _no_tmp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name]


def test_full_disk_is_one_line_and_leaves_no_temp_files(write_suite, mounted, tmp_path, capsys):
    path = write_suite(tiny_suite(methods=["baseline"]))
    full = mounted("size=300k")  # room for the records, not for the models
    line = _one_line_failure(["run", str(path), "--results", str(full), "--executor", "debug", "--no-table"], capsys)
    assert "No space left on device" in line and "free space" in line
    assert _no_tmp_files(full) == []


def test_full_disk_simulated_is_one_line_and_leaves_no_temp_files(write_suite, tmp_path, capsys, monkeypatch):
    """The same without root: every rename fails with ENOSPC (records, checkpoints, models)."""
    import errno

    path = write_suite(tiny_suite(methods=["baseline"]))
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith((".pt", ".json", ".jsonl")):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    res = tmp_path / "res"
    line = _one_line_failure(["run", str(path), "--results", str(res), "--executor", "debug", "--no-table"], capsys)
    assert "No space left on device" in line and "free space" in line
    assert _no_tmp_files(res) == []
