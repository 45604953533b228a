"""Live progress: the worker's progress.json, the reader, the plain and terminal displays, and a local run."""

import io
import json
import os
import time
from pathlib import Path

import pytest

from kdbench.progress import (PROGRESS_FILE, LiveProgress, ProgressFile, current_run, describe, fmt_time, fraction,
                              read_progress, run_eta)
from kdbench.scheduler import launch
from kdbench.suite import load_suite

from kdb_util import slow_steps_env, tiny_suite


def write(d: Path, **state) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"kind": "train", "epoch": 1, "epochs": 10, "step": 0, "steps": 10, "metric": "top1", "value": None,
            "loss": None, "started": 1000.0, "updated": 1000.0, "pid": 1}
    (d / PROGRESS_FILE).write_text(json.dumps({**base, **state}))
    return d


def test_reader_on_hand_written_files(tmp_path):
    d = write(tmp_path / "a", epoch=3, step=5, value=91.25, loss=0.4123, started=1000.0, updated=1050.0)
    p = read_progress(d)
    assert p["epoch"] == 3 and p["value"] == 91.25
    # 2 finished epochs + half of the third, of 10: a quarter; 50 s for a quarter leaves 150 s
    assert fraction(p) == 0.25 and run_eta(p) == 150.0
    assert describe(p) == "epoch 3/10 step 5/10 top1=91.25 loss=0.412"
    assert describe(None) == "running" and fmt_time(150) == "2m30s" and fmt_time(3725) == "1h02m"
    assert read_progress(d, since=1050.0) is not None and read_progress(d, since=1050.5) is None  # stale
    assert read_progress(tmp_path / "missing") is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / PROGRESS_FILE).write_text('{"epoch": 3, "epo')  # half a file (a reader never sees one)
    assert read_progress(tmp_path / "b") is None
    (tmp_path / "b" / PROGRESS_FILE).write_text('{"epoch": "3"}')  # not a progress file
    assert read_progress(tmp_path / "b") is None
    # the last step of the last epoch is the whole run; nothing done yet has no ETA
    assert fraction({"epoch": 10, "epochs": 10, "step": 10, "steps": 10}) == 1.0
    assert run_eta({"epoch": 1, "epochs": 10, "step": 0, "steps": 10, "started": 0, "updated": 5}) is None


def test_writer_is_atomic_and_throttled(tmp_path):
    pf = ProgressFile(tmp_path, "train", epochs=4, steps=3, metric="top1", every_s=3600)
    pf.update(epoch=1, step=0)  # the first write goes out
    assert read_progress(tmp_path)["epoch"] == 1
    for step in (1, 2, 3):
        pf.update(step=step)  # within the hour: not written
    assert read_progress(tmp_path)["step"] == 0
    pf.update(epoch=2, value=50.0, loss=1.5, force=True)
    p = read_progress(tmp_path)
    assert (p["epoch"], p["step"], p["value"], p["loss"], p["epochs"], p["steps"]) == (2, 3, 50.0, 1.5, 4, 3)
    assert p["pid"] == os.getpid() and p["updated"] >= p["started"]
    assert sorted(x.name for x in tmp_path.iterdir()) == [PROGRESS_FILE]  # no temporary file left behind
    off = ProgressFile(tmp_path / "off", "train", 1, 1, enabled=False)  # a non-main rank writes nothing
    off.update(epoch=1, force=True)
    assert not (tmp_path / "off").exists()


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def test_plain_lines_once_per_epoch_with_eta(tmp_path):
    clock = Clock(1000.0)
    lines = []
    live = LiveProgress(4, tty=False, every_s=0, log=lines.append, clock=clock)
    a = write(tmp_path / "a", epoch=2, step=0, value=80.0, started=1000.0, updated=1010.0)
    clock.t = 1010.0
    live.poll([("kd p s0", a), ("stage freekd p s0", tmp_path / "none")])
    # work done: 0 finished runs + 0.1 of one run in 10 s -> 3.9 runs left take 390 s; the run: 90 s left
    # no run finished and 2.5 % of the work done: the estimate says it is rough
    assert lines == ["[0/4 runs done, ETA 6m30s (rough)] kd p s0: epoch 2/10 top1=80.00 (run ETA 1m30s)"]
    live.poll([("kd p s0", a)])  # same epoch: no new line
    assert len(lines) == 1
    write(a, epoch=3, step=0, value=85.0, started=1000.0, updated=1020.0)
    live.finished()
    live.log("[      ok] baseline ...")
    clock.t = 1020.0
    live.poll([("kd p s0", a)])
    # 1 finished + 0.2 in 20 s -> 2.8 runs left take 46.7 s; the run: 20 s for 0.2 -> 80 s
    assert lines[1:] == ["[      ok] baseline ...", "[1/4 runs done, ETA 47s] kd p s0: epoch 3/10 top1=85.00 (run ETA 1m20s)"]
    live.close()


def test_eta_weights_runs_by_their_expected_work(tmp_path):
    """A 40-epoch distillation run (a teacher forward every step) weighs 80 units, a 30-epoch teacher 45, an eval
    of three corruption cells 0.3: the ETA applies the measured rate to the work left, not to a count of runs."""
    from kdbench.progress import expected_work

    assert expected_work("distill", 40, True) == 80 and expected_work("teacher", 30, False) == 45
    assert expected_work("distill", 40, False) == 40 and expected_work("eval", None, False, 3) == pytest.approx(0.3)
    clock = Clock(1000.0)
    lines = []
    work = {"teacher p s0": 45.0, "kd p s0": 80.0, "eval fog kd p s0": 0.3}
    live = LiveProgress(3, tty=False, every_s=0, log=lines.append, clock=clock, work=work)
    t = write(tmp_path / "t", epoch=16, epochs=30, step=0, started=1000.0, updated=1150.0)
    clock.t = 1150.0
    live.poll([("teacher p s0", t)])
    # 15 of 30 epochs = 22.5 units in 150 s: 102.8 units left take 685 s (counting runs: 2.5 runs in 1000 s)
    assert lines[-1].startswith("[0/3 runs done, ETA 11m25s (rough)] teacher p s0")
    live.finished(name="teacher p s0")
    clock.t = 1300.0
    live.poll([])
    assert live.eta({}) == pytest.approx(300 / 45 * 80.3) and not live.rough()


def test_eta_learns_the_steps_of_an_epoch_of_each_data(tmp_path):
    """A teacher on the full data (39 steps an epoch) and students on a tenth of it (4 steps): once a run of each
    data has reported its steps, the runs weigh epochs × steps, and the students stop looking ten times longer."""
    clock = Clock(1000.0)
    work = {"teacher": 45.0, "kd s0": 80.0, "kd s1": 80.0}
    keys = {"teacher": "full", "kd s0": "tenth", "kd s1": "tenth"}
    live = LiveProgress(3, tty=False, every_s=0, log=[].append, clock=clock, work=work, keys=keys)
    t = write(tmp_path / "t", epoch=16, epochs=30, steps=39, started=1000.0, updated=1030.0)
    clock.t = 1030.0
    live.eta({"teacher": read_progress(t)})
    assert live.total_work == 45 * 39 + 2 * 80 * 39  # the students' data has reported nothing yet: the mean
    live.finished(name="teacher")
    a = write(tmp_path / "a", epoch=21, epochs=40, steps=4, started=1060.0, updated=1070.0)
    clock.t = 1070.0
    eta = live.eta({"kd s0": read_progress(a)})
    assert live.total_work == 45 * 39 + 2 * 80 * 4
    done = 45 * 39 + 0.5 * 80 * 4
    assert eta == pytest.approx(70 / done * (live.total_work - done)) and not live.rough()


def test_plain_lines_are_spaced_by_every_s(tmp_path):
    clock = Clock(1000.0)
    lines = []
    live = LiveProgress(1, tty=False, every_s=10, log=lines.append, clock=clock)
    a = write(tmp_path / "a", epoch=1, updated=1000.0)
    live.poll([("r", a)])
    for epoch, t in ((2, 1005.0), (3, 1009.0), (4, 1011.0)):
        write(a, epoch=epoch, updated=t)
        clock.t = t
        live.poll([("r", a)])
    assert [line.split("r: ")[1].split(" (")[0] for line in lines] == ["epoch 1/10", "epoch 4/10"]


def test_terminal_bars(tmp_path):
    out = io.StringIO()
    live = LiveProgress(3, stream=out, tty=True)
    a = write(tmp_path / "a", epoch=3, step=0, value=70.5, loss=0.25, started=time.time() - 20, updated=time.time())
    live.poll([("teacher resnet20→resnet8 s0", a)])
    live.log("[      ok] something")
    live.finished()
    live.close()
    text = out.getvalue()
    assert "teacher resnet20→resnet8 s0" in text and "epoch 2/10, top1=70.50 loss=0.250" in text
    assert "[      ok] something" in text and "1/3" in text and "1 running" in text


def test_current_run_is_the_first_without_a_new_record(tmp_path):
    dirs = [tmp_path / x for x in "abc"]
    for d in dirs:
        d.mkdir()
    (dirs[0] / "record.json").write_text("{}")
    os.utime(dirs[0] / "record.json", (500, 500))  # a record of an earlier invocation: redone now
    assert current_run(dirs, since=1000) == 0
    os.utime(dirs[0] / "record.json", (1500, 1500))
    assert current_run(dirs, since=1000) == 1
    for d in dirs:
        (d / "record.json").write_text("{}")
    assert current_run(dirs, since=1000) is None


def test_local_run_prints_epoch_lines_when_not_a_terminal(write_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_PROGRESS_EVERY", "0")  # a line at every epoch change the scheduler sees
    monkeypatch.setenv("KDBENCH_PROGRESS_S", "0")  # the worker writes at every step
    for k, v in slow_steps_env(0.1).items():  # ~1 s epochs, longer than the scheduler's poll
        monkeypatch.setenv(k, v)
    d = tiny_suite(methods=["baseline"])
    d["recipe"]["epochs"] = 3
    lines = []
    recs = launch(load_suite(write_suite(d)), tmp_path / "res", executor="local", parallel=1,
                  pattern="baseline", log=lines.append)
    assert [r["status"] for r in recs] == ["ok"]
    prog = [line for line in lines if "baseline resnet8→resnet8 s0: epoch" in line]
    epochs = {line.split(": epoch ")[1].split("/")[0] for line in prog}
    assert len(epochs) >= 2 and all(line.startswith("[0/1 runs done, ETA ") for line in prog), lines
    assert lines[-1].startswith("[      ok] baseline")
    p = read_progress(tmp_path / "res" / "tiny" / "runs" / recs[0]["run_id"])
    assert (p["epoch"], p["epochs"], p["step"], p["steps"]) == (3, 3, 7, 7) and p["value"] == \
        next(m["value"] for m in recs[0]["metrics"] if m["metric"] == "top1" and m["select"] == "final")
