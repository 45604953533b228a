"""Eval groups (kdbench/evalgroup.py): the eval runs of several finished models on one chunk run as one job with one
corruption pass, each (image, corruption, severity) corrupted once, and every model gets exactly the cells, records
and numbers it gets alone (same run_ids; the corruption is seeded per image)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

import kdbench.corruptions as C
from kdbench import results as R
from kdbench.cohort import ENV, cohorts
from kdbench.evalgroup import ENV as GROUPS_ENV
from kdbench.evalgroup import deferred, eval_group_key, groups
from kdbench.scheduler import launch
from kdbench.suite import load_suite
from kdb_util import tiny_suite, train_digits32

EVALS = ["val", {"name": "corruptions", "set": ["gaussian_noise", "contrast"], "severities": [1, 3]}]
N_VAL = 540  # digits validation images
TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three finished models (the suite's teacher, baseline, kd) of a digits suite at 32 px, trained once for the
    module (a couple of steps); the suite file then lists two corruptions x two severities."""
    root = tmp_path_factory.mktemp("groups")
    path, res = train_digits32(root, ["baseline", "kd"], suite="grp")
    d = yaml.safe_load(path.read_text())
    d["evals"] = EVALS
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path, res


def _sweep(trained, dest: Path, mode: str, executor: str = "debug", **kw):
    """A copy of the trained results, its eval runs run with grouping ``mode`` (on/off): (the launch's records, (eval
    records, cells), the (image key, corruption, severity) of every image corrupted in this process)."""
    path, res = trained
    shutil.copytree(res, dest)
    calls: list[tuple] = []
    real = C.corrupt

    def counting(image, name, severity, key):
        if key != "warm-up":
            calls.append((key, name, severity))
        return real(image, name, severity, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, mode)
        mp.setattr(C, "corrupt", counting)
        recs = launch(load_suite(path), dest, executor=executor, log=lambda s: None, **kw)
    return recs, _evals(dest), calls


def _evals(res: Path) -> tuple[dict, dict]:
    """(eval records by run_id, cells by <model>/<file> without their timing)."""
    recs = {}
    for p in (res / "grp" / "runs").glob("*/record.json"):
        rec = json.loads(p.read_text())
        if rec["kind"] == "eval":
            recs[rec["run_id"]] = rec
    cells = {}
    for p in (res / "grp" / "runs").glob("*/evals/*.json"):
        cells[f"{p.parent.parent.name}/{p.name}"] = {k: v for k, v in json.loads(p.read_text()).items()
                                                     if k not in TIMING}
    return recs, cells


def _numbers(rec: dict) -> list:
    return [(m["corruption"], m["severity"], m["metric"], m["value"]) for m in rec["metrics"]
            if m["metric"] != "images_per_s"]


@pytest.fixture(scope="module")
def alone(trained, tmp_path_factory):
    return _sweep(trained, tmp_path_factory.mktemp("alone") / "res", "off")


# ------------------------------------------------------------------------------------------- grouping
def test_eval_runs_of_one_chunk_form_one_group(write_suite, monkeypatch):
    d = tiny_suite(methods=["baseline", "kd", "cwd"], evals=EVALS,
                   data={"name": "digits", "train_fraction": 0.2, "image_size": 32})
    specs = load_suite(write_suite(d)).specs
    evals = [s for s in specs if s.kind == "eval"]
    assert len(evals) == 8  # 4 models x 2 corruptions
    got = [g for g in groups(evals)]
    assert len(got) == 2 and all(len(g) == 4 and len({s.eval["corruption"] for s in g}) == 1 for g in got)
    assert {s.label for s in got[0]} == {"teacher", "baseline", "kd", "cwd"}
    # distill runs form the cohorts they always formed; the other runs are alone
    distill = [s for s in specs if s.kind == "distill"]
    assert groups(distill) == cohorts(distill)
    assert all(eval_group_key(s) is None for s in specs if s.kind != "eval")
    # the graph's order with the eval runs last (nothing needs them)
    order = deferred(specs)
    assert [s.kind for s in order][-8:] == ["eval"] * 8 and sorted(order, key=id) == sorted(specs, key=id)
    # at most cohort_size models per group
    d["resources"] = {"cohort_size": 3}
    capped = [s for s in load_suite(write_suite(d)).specs if s.kind == "eval"]
    assert sorted(len(g) for g in groups(capped)) == [1, 1, 3, 3]
    # --cohort off, or KDBENCH_EVAL_GROUPS=off alone: every run alone, in the graph's order
    for env in (ENV, GROUPS_ENV):
        monkeypatch.setenv(env, "off")
        assert all(len(g) == 1 for g in groups(evals)) and deferred(specs) == specs
        assert all(eval_group_key(s) is None for s in evals)
        monkeypatch.delenv(env)
    monkeypatch.setenv(GROUPS_ENV, "off")
    assert groups(distill) == cohorts(distill)  # cohorts stay on


def test_one_corruption_pass_gives_every_model_the_numbers_it_gets_alone(trained, alone, tmp_path):
    recs_off, (solo, solo_cells), calls_off = alone
    recs_on, (together, cells), calls_on = _sweep(trained, tmp_path / "res", "on")
    assert [r["status"] for r in recs_on] == ["ok"] * 6 and [r["status"] for r in recs_off] == ["ok"] * 6
    # (a) the same run_ids, numbers and cells (timing apart)
    assert sorted(together) == sorted(solo) and len(together) == 6
    for rid, rec in together.items():
        assert _numbers(rec) == _numbers(solo[rid]) and rec["student"]["sha256"] == solo[rid]["student"]["sha256"]
    assert cells == solo_cells and len(cells) == 12
    # (b) each (image, corruption, severity) corrupted once with the groups, once per model without
    expected = {(k, c, s) for k in range(N_VAL) for c in ("gaussian_noise", "contrast") for s in (1, 3)}
    on, off = Counter(calls_on), Counter(calls_off)
    assert set(on) == expected and set(on.values()) == {1}
    assert set(off) == expected and set(off.values()) == {3}
    # the records say so: one group per chunk, 1,080 images corrupted once and evaluated by its 3 models
    by_chunk: dict = {}
    for rec in together.values():
        by_chunk.setdefault(rec["eval"]["corruption"], []).append(rec["corruption_pass"])
    for passes in by_chunk.values():
        assert len({p["group"] for p in passes}) == 1 and all(len(p["runs"]) == 3 for p in passes)
        assert all(p["models"] == 3 and p["images_corrupted"] == 2 * N_VAL and p["evaluations"] == 6 * N_VAL
                   and p["shared_by"] == 3.0 and p["cells"] == 2 for p in passes)
    assert all(r["corruption_pass"]["group"] is None and r["corruption_pass"]["images_corrupted"] == 2 * N_VAL
               and r["corruption_pass"]["shared_by"] == 1.0 for r in solo.values())


def test_an_interrupted_group_resumes_per_model_from_its_cells(trained, alone, tmp_path, monkeypatch):
    _, (solo, solo_cells), _ = alone
    path, res = trained
    dest = tmp_path / "res"
    shutil.copytree(res, dest)
    monkeypatch.setenv(ENV, "on")
    written: list[str] = []
    real = R.write_json_atomic

    def stop_at_the_fifth_cell(p, obj):
        if Path(p).parent.name == "evals":
            if len(written) == 4:  # the first chunk's s1 cell of all 3 models, its s3 cell of the first model
                raise KeyboardInterrupt
            written.append(f"{Path(p).parent.parent.name}/{Path(p).name}")
        return real(p, obj)

    monkeypatch.setattr(R, "write_json_atomic", stop_at_the_fifth_cell)
    with pytest.raises(KeyboardInterrupt):
        launch(load_suite(path), dest, executor="debug", log=lambda s: None)
    monkeypatch.setattr(R, "write_json_atomic", real)
    recs, cells = _evals(dest)
    assert not recs and len(cells) == 4  # no eval record: the group is not over
    first = written[0].split("/")[1].rsplit("_s", 1)[0]
    models = {w.split("/")[0] for w in written}
    assert len(models) == 3 and written[3].endswith(f"{first}_s3.json")
    # again: the two models without their s3 cell share one pass for it; the first model reuses its cells
    calls = []
    real_corrupt = C.corrupt

    def counting(image, name, severity, key):
        if key != "warm-up":
            calls.append((name, severity))
        return real_corrupt(image, name, severity, key)

    monkeypatch.setattr(C, "corrupt", counting)
    launch(load_suite(path), dest, executor="debug", log=lambda s: None)
    together, cells = _evals(dest)
    assert cells == solo_cells and sorted(together) == sorted(solo)
    for rid, rec in together.items():
        assert _numbers(rec) == _numbers(solo[rid]), rec["label"]
    other = "contrast" if first == "gaussian_noise" else "gaussian_noise"
    assert Counter(calls) == {(first, 3): N_VAL, (other, 1): N_VAL, (other, 3): N_VAL}
    resumed = [r["corruption_pass"] for r in together.values() if r["eval"]["corruption"] == first]
    assert sorted((p["cells"], p["cells_reused"]) for p in resumed) == [(0, 2), (1, 1), (1, 1)]
    assert all(p["images_corrupted"] == N_VAL and p["evaluations"] == 2 * N_VAL for p in resumed)


def test_local_executor_runs_the_groups_in_one_job(trained, alone, tmp_path):
    _, (solo, solo_cells), _ = alone
    recs, (together, cells), _ = _sweep(trained, tmp_path / "res", "on", executor="local", parallel=1)
    assert [r["status"] for r in recs] == ["ok"] * 6
    assert cells == solo_cells
    for rid, rec in together.items():
        assert _numbers(rec) == _numbers(solo[rid]), rec["label"]
        assert rec["corruption_pass"]["models"] == 3 and rec["corruption_pass"]["shared_by"] == 3.0
    assert len({r["scheduler"]["job_id"] for r in together.values()}) == 1  # both groups in one job
    assert len({r["corruption_pass"]["group"] for r in together.values()}) == 2


# ------------------------------------------------------------------------------------------- the pass itself
class _Task:
    """A task whose evaluation measures the pixels it is given (any pixel difference shows)."""

    metrics = {"top1": True, "loss": False}
    primary_metric = "top1"

    def loader(self, ds, batch_size, num_workers=0):
        import torch

        return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)

    def evaluate(self, net, loader, device):
        import torch

        sums = [float(net(x).sum()) for x, _ in loader]
        assert loader.dataset is not None
        return {"top1": float(sum(sums)) % 100.0, "loss": float(torch.tensor(sums).std()) if len(sums) > 1 else 0.0}


class _Net:
    def __init__(self, scale, fail_at=None):
        self.scale, self.fail_at, self.calls = scale, fail_at, 0

    def __call__(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise ValueError("this model cannot evaluate")
        x.mul_(self.scale)  # in place: each model has a copy of the batch of its own
        return x


def _images(n=10, size=32):
    import torch

    from kdbench.data.base import TensorImages

    g = torch.Generator().manual_seed(0)
    return TensorImages(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.zeros(n, dtype=torch.long), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_model_that_fails_leaves_the_others_their_cells(tmp_path):
    from kdbench import robustness as RB

    ds = _images()
    kw = dict(corruptions=["shot_noise"], severities=[1, 2], batch_size=3, log=lambda s: None)
    alone = {}
    for scale in (1.0, 2.0):
        alone[scale] = RB.evaluate_corruptions(_Net(scale), _Task(), ds, "cpu", cell_dir=tmp_path / f"a{scale}", **kw)
    models = [RB.SweepModel(_Net(1.0), tmp_path / "m1"), RB.SweepModel(_Net(3.0, fail_at=2), tmp_path / "bad"),
              RB.SweepModel(_Net(2.0), tmp_path / "m2")]
    stats = RB.sweep_models(models, _Task(), ds, "cpu", **kw)
    for m, scale in ((models[0], 1.0), (models[2], 2.0)):
        assert [(r["metric"], r["value"]) for r in m.rows if r["metric"] != "images_per_s"] == [
            (r["metric"], r["value"]) for r in alone[scale] if r["metric"] != "images_per_s"]
        assert m.error is None and m.cells == 2
    bad = models[1]
    assert isinstance(bad.error, ValueError) and "cannot evaluate" in bad.error_text and not list((tmp_path / "bad").iterdir())
    assert stats["images_corrupted"] == 2 * 10 and stats["evaluations"] == 3 * 10 + 2 * 10


def test_a_failure_to_load_the_images_fails_the_pass(tmp_path):
    from kdbench import robustness as RB

    small = _images(size=16)  # the corruption library refuses 16 px images
    models = [RB.SweepModel(_Net(1.0), tmp_path / "a"), RB.SweepModel(_Net(2.0), tmp_path / "b")]
    with pytest.raises(ValueError, match="16×16 pixels is too small"):
        RB.sweep_models(models, _Task(), small, "cpu", corruptions=["fog"], severities=[1], batch_size=4,
                        log=lambda s: None)


def test_loader_workers_corrupt_once_for_all_models(tmp_path):
    from kdbench import robustness as RB

    ds = _images()
    kw = dict(corruptions=["glass_blur"], severities=[1], batch_size=4, log=lambda s: None)
    alone = RB.evaluate_corruptions(_Net(2.0), _Task(), ds, "cpu", cell_dir=tmp_path / "alone", **kw)
    models = [RB.SweepModel(_Net(s), tmp_path / f"m{s}") for s in (1.0, 2.0)]
    stats = RB.sweep_models(models, _Task(), ds, "cpu", num_workers=2, **kw)
    strip = lambda rows: [(r["metric"], r["value"]) for r in rows if r["metric"] != "images_per_s"]
    assert strip(models[1].rows) == strip(alone) and models[0].error is None
    assert stats["images_corrupted"] == 10 and stats["evaluations"] == 20


class _Interrupting(_Net):
    """Ctrl-C (SIGINT's KeyboardInterrupt in the main thread) while this model evaluates its ``at``-th batch."""

    def __init__(self, scale, at):
        super().__init__(scale)
        self.at = at

    def __call__(self, x):
        if self.calls + 1 == self.at:
            import _thread
            import time

            _thread.interrupt_main()
            time.sleep(0.5)  # the main thread takes it while this model computes
        return super().__call__(x)


def test_ctrl_c_in_the_middle_of_a_pass_stops_it_and_each_model_resumes_from_its_cells(tmp_path):
    import threading

    from kdbench import robustness as RB

    ds = _images()
    kw = dict(corruptions=["shot_noise"], severities=[1, 2], batch_size=4, log=lambda s: None)
    alone = [RB.evaluate_corruptions(_Net(s), _Task(), ds, "cpu", cell_dir=tmp_path / f"alone{s}", **kw)
             for s in (1.0, 2.0, 3.0)]
    models = [RB.SweepModel(_Net(1.0), tmp_path / "a"), RB.SweepModel(_Interrupting(2.0, at=5), tmp_path / "b"),
              RB.SweepModel(_Net(3.0), tmp_path / "c")]
    with pytest.raises(KeyboardInterrupt):  # its 5th batch: the second cell's (3 batches a cell)
        RB.sweep_models(models, _Task(), ds, "cpu", **kw)
    assert not [t for t in threading.enumerate() if t.name.startswith("kdbench-eval")]
    assert [sorted(p.name for p in (tmp_path / d).iterdir()) for d in "abc"] == [["shot_noise_s1.json"]] * 3
    again = [RB.SweepModel(_Net(s), tmp_path / d) for s, d in ((1.0, "a"), (2.0, "b"), (3.0, "c"))]
    stats = RB.sweep_models(again, _Task(), ds, "cpu", **kw)
    assert stats["cells"] == 1 and stats["images_corrupted"] == 10 and [m.reused for m in again] == [1, 1, 1]
    strip = lambda rows: [(r["severity"], r["metric"], r["value"]) for r in rows if r["metric"] != "images_per_s"]
    assert [strip(m.rows) for m in again] == [strip(rows) for rows in alone]


# ------------------------------------------------------------------------------------------- SLURM
class _FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class _FakeExecutor:
    """submitit.AutoExecutor as submit_slurm uses it, recording each array: (job, units, dependency)."""

    arrays: list = []

    def __init__(self, folder, cluster, slurm_max_num_timeout):
        self.params = {}

    def update_parameters(self, **kw):
        self.params.update(kw)

    def map_array(self, fn, units, _results):
        n = len(_FakeExecutor.arrays) + 1
        _FakeExecutor.arrays.append((type(fn).__name__, units, self.params.get("slurm_dependency")))
        return [_FakeJob(f"{n}_{i}") for i in range(len(units))]


def test_slurm_submits_one_array_task_per_eval_group(write_suite, tmp_path, monkeypatch):
    import shutil as sh

    from kdbench import slurm
    from kdbench.graph import topological

    d = tiny_suite(methods=["baseline", "kd", "cwd"], evals=EVALS,
                   data={"name": "digits", "train_fraction": 0.2, "image_size": 32})
    suite = load_suite(write_suite(d))
    monkeypatch.setattr(sh, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm.submitit, "AutoExecutor", _FakeExecutor)
    monkeypatch.setattr(slurm, "job_states", lambda suite_dir: {})  # nothing submitted earlier (no sacct here)

    def submit():
        _FakeExecutor.arrays = []
        entries = slurm.submit_slurm(suite, topological(suite.specs), tmp_path / "res", None, lambda s: None)
        return list(_FakeExecutor.arrays), {e["run_id"]: e for e in entries}

    arrays, entries = submit()
    jobs = {s.run_id: entries[s.run_id]["job_id"] for s in suite.specs}
    assert [a[0] for a in arrays] == ["RunJob", "RunJob", "CohortJob", "EvalGroupJob"]
    _, units, dep = arrays[-1]  # the eval groups: one task each, after every model of the group
    assert len(units) == 2 and all(len(u) == 4 for u in units)
    models = {s.run_id for s in suite.specs if s.kind in ("teacher", "distill")}
    assert dep == "afterany:" + ":".join(sorted({jobs[m] for m in models}))
    assert len({entries[s.run_id]["job_id"] for s in units[0]}) == 1
    # grouping off: each eval run its own task, after its own model (as before)
    monkeypatch.setenv(ENV, "off")
    arrays, entries = submit()
    assert "EvalGroupJob" not in [a[0] for a in arrays] and "CohortJob" not in [a[0] for a in arrays]
    evals = [s for s in suite.specs if s.kind == "eval"]
    jobs = {s.run_id: entries[s.run_id]["job_id"] for s in suite.specs}
    assert all(entries[s.run_id]["depends"] == [jobs[s.target]] for s in evals)
    assert len({entries[s.run_id]["job_id"] for s in evals}) == len(evals)
