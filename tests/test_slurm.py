"""SLURM for real (issue 5): suites as job arrays on a real one-node SLURM cluster, stage dependencies,
``--no-wait`` + ``kdbench status``, failures, cancellation, reruns, time limits with requeue and exact resume,
DDP with 2 gloo tasks on CPU.

Tests marked ``slurm`` use the session fixture ``slurm`` (tests/conftest.py): they run on the cluster that is
already up, and are skipped, saying why, when none is; with ``KDBENCH_TEST_START_SLURM=1`` (what ``.ci/run``
sets) the fixture starts one with scripts/slurm/start-local-slurm.sh instead. The others check the resource
mapping, the status logic and DDP (two local processes) without a cluster.

The time-limit test needs ~110 s of (slowed) steps under a 2-minute limit: the warning signal comes 75-105 s
into the job (SLURM checks every ~30 s), the requeued job waits ``cred_expire`` = 30 s, then a second leg
finishes it, about 3 minutes in all. Its job is submitted by the first SLURM test (fixture
``time_limit_job``) so that it runs while the other SLURM tests do.

DDP tolerance: with synchronised batch norm and exact gradient averaging a 2-task run computes the same
function as one process up to floating-point summation order. On these tiny runs (14 steps) the per-epoch
losses agree to ~1e-7; the tests allow 1e-4 (relative) for losses and one validation image (0.19 points) for
accuracies. Longer runs at a high learning rate amplify such differences the way any 1e-7 perturbation does
(measured: scaling one weight tensor by 1 + 1e-6 in a single process moves the loss by ~1e-3 after 78
steps), so the equality is only testable on short runs.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdbench.scheduler import launch
from kdbench.graph import topological
from kdbench.slurm import job_states, read_jobs, slurm_parameters
from kdbench.suite import SuiteError, load_suite
from kdb_util import slow_steps_env, tiny_suite

ACC_TOL = 0.2  # accuracy points: one of the 540 validation images is 0.185
LOSS_RTOL = 1e-4


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _metrics(rec) -> dict:
    return {(m["metric"], m["select"]): m["value"] for m in rec["metrics"]}


def _records(results: Path, suite: str) -> dict:
    out = {}
    for p in sorted((results / suite / "runs").glob("*/record.json")):
        rec = json.loads(p.read_text())
        out[(rec["label"], rec["pair"], rec["seed"])] = rec
    return out


def _wait_for(cond, timeout: float, what: str, every: float = 2.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _sacct(job_ids, fields="JobID,State,Start,End") -> dict:
    r = subprocess.run(["sacct", "-X", "-P", "-n", "-o", fields, "-j", ",".join(sorted(set(job_ids)))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = fields.split(",")
    return {line.split("|")[0]: dict(zip(names, line.split("|"))) for line in r.stdout.splitlines() if line}


def _weights(path: Path) -> Path:
    import torch

    from kdbench.models.sources import build_model

    torch.manual_seed(0)
    torch.save(build_model("kdbench:resnet8", 10, 1).net.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------- no cluster
def test_slurm_parameters_map_suite_resources_to_sbatch(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    # only the sbatch text is checked here: no cluster needed (submitit's SlurmExecutor refuses to be built
    # where `srun` is not on PATH, so that check is switched off)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    res = {"gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 600, "slurm_partition": "gpu",
           "slurm_account": "lab", "slurm_qos": "high", "slurm_constraint": "a100", "slurm_array_parallelism": 16}
    p = slurm_parameters(res, parallel=3)
    assert p["slurm_array_parallelism"] == 3 and p["tasks_per_node"] == 4  # --parallel wins; one task per GPU
    assert p["slurm_srun_args"] == ["--kill-on-bad-exit=1"] and p["slurm_signal_delay_s"] == 90
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**p, slurm_additional_parameters={"kill-on-invalid-dep": "yes"},
                         slurm_dependency="afterok:7_0")
    ex._executor.parameters["map_count"] = 5
    script = ex._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB", "--time=600", "--partition=gpu",
                 "--account=lab", "--qos=high", "--constraint=a100", "--ntasks-per-node=4", "--array=0-4%3",
                 "--signal=USR2@90", "--dependency=afterok:7_0", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {flag}" in script, (flag, script)
    assert "--kill-on-bad-exit=1" in script
    d = slurm_parameters({}, None)  # submitit's 5-minute default would kill real runs
    assert d == {"timeout_min": 24 * 60, "slurm_signal_delay_s": 90}
    assert slurm_parameters({"timeout_min": 2, "tasks_per_node": 2}, None)["slurm_signal_delay_s"] == 40
    assert slurm_parameters({"timeout_min": 1}, None)["slurm_signal_delay_s"] == 15


def test_unknown_resource_key_is_rejected_with_the_valid_list(write_suite):
    with pytest.raises(SuiteError, match=r"resources\.gpus: unknown key; valid keys here: cohort_size, cpus_per_task, "
                                         r"gpus_per_node, mem_gb, nodes"):
        load_suite(write_suite(tiny_suite(resources={"gpus": 2})))


def test_status_table_merges_scheduler_states(tmp_path):
    from kdbench.tables import status_table

    runs = tmp_path / "s" / "runs"
    base = {"schema": 1, "kind": "distill", "suite": "s", "suite_version": 1, "task": "classification",
            "method": "kd", "method_index": 1, "method_version": 1, "params": {}, "pair": "a→b", "pair_index": 0,
            "teacher": None, "student": {"model": "m"}, "recipe": {}, "data": {}, "metrics": [],
            "teacher_metrics": [], "reference": [], "cost": {}, "env": {}}

    def rec(rid, status, job, finished, error=None, requeues=0):
        (runs / rid).mkdir(parents=True)
        r = {**base, "run_id": rid, "label": rid, "seed": 0, "status": status, "error": error,
             "scheduler": {"job_id": job, "requeues": requeues}, "started_at": finished, "finished_at": finished}
        (runs / rid / "record.json").write_text(json.dumps(r))

    tb = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nValueError: bad weights\n'
    rec("okjob", "ok", "10_0", "2026-01-01T00:05:00+00:00", requeues=2)
    rec("oldfail", "failed", "9_1", "2026-01-01T00:00:00+00:00", error=tb)  # resubmitted since: pending
    rec("stillbad", "failed", "10_2", "2026-01-01T00:06:00+00:00", error=tb)  # its own job's record
    jobs = {
        "okjob": {"job_id": "10_0", "status": "completed", "submitted_at": "2026-01-01T00:01:00+00:00"},
        "oldfail": {"job_id": "11_0", "status": "pending", "submitted_at": "2026-01-01T00:02:00+00:00"},
        "stillbad": {"job_id": "10_2", "status": "failed", "submitted_at": "2026-01-01T00:01:00+00:00",
                      "error": "job 10_2 FAILED"},
        "gone": {"job_id": "10_3", "status": "cancelled", "submitted_at": "2026-01-01T00:01:00+00:00",
                 "error": "job 10_3 CANCELLED (Dependency)", "label": "kd", "pair": "a→b", "seed": 3},
    }
    out = status_table(tmp_path / "s", jobs=jobs, tail=2)
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln.strip() and not ln.startswith((" ", "-"))}
    assert "ok" in rows["okjob"].split() and "10_0 (requeued 2x)" in rows["okjob"]
    assert "pending" in rows["oldfail"].split() and "11_0" in rows["oldfail"]
    assert "failed" in rows["stillbad"].split() and "ValueError: bad weights" in rows["stillbad"]
    assert "cancelled" in rows["gone"].split() and "(Dependency)" in rows["gone"]
    assert "errors (last lines):" in out and "        g()" in out  # the traceback tail, 2 lines
    assert out.splitlines()[-1].endswith("4 run(s) in " + str(runs) + ": 1 ok, 1 pending, 1 failed, 1 cancelled")
    assert "job" not in status_table(tmp_path / "s").splitlines()[0]  # no scheduler: the plain table


def test_shards_are_slices_of_the_single_process_batches():
    import torch
    from torch.utils.data import DataLoader

    from kdbench.ddp import Dist, loss_scale, shard_indices

    n, bs, steps = 100, 32, 3
    single = list(DataLoader(range(n), batch_size=bs, shuffle=True, drop_last=True,
                             generator=torch.Generator().manual_seed(5)))
    for world in (2, 3):
        shards = [shard_indices(n, bs, steps, torch.Generator().manual_seed(5), Dist(rank=r, world=world))
                  for r in range(world)]
        locals_ = [s[1] for s in shards]
        assert sum(locals_) == bs and all(s[2] == bs for s in shards)
        for k in range(steps):  # rank slices of step k, in rank order, are the single process's batch k
            got = sum((s[0][k * s[1]:(k + 1) * s[1]] for s in shards), [])
            assert got == single[k].tolist()
        assert sum(loss_scale(m, bs, Dist(world=world)) for m in locals_) == pytest.approx(world)
    with pytest.raises(ValueError, match="cannot be split over 4 tasks"):
        shard_indices(3, bs, 1, torch.Generator(), Dist(rank=0, world=4))


@pytest.mark.slow
def test_ddp_two_local_processes_match_one_process(write_suite, tmp_path):
    """The DDP path without a cluster: submitit's LocalExecutor starts 2 tasks, gloo on CPU."""
    import submitit

    from kdbench.slurm import RunJob

    d = tiny_suite(methods=["kd"])  # one run: a loaded teacher, KD, 2 epochs
    d["pairs"][0]["teacher"] = {"model": "kdbench:resnet8", "weights": str(_weights(tmp_path / "t.pt"))}
    suite = load_suite(write_suite(d))
    ref = {r["label"]: r for r in launch(suite, tmp_path / "one", executor="debug", log=lambda s: None)}
    ex = submitit.LocalExecutor(folder=tmp_path / "jobs")
    ex.update_parameters(tasks_per_node=2, timeout_min=10)
    for spec in topological(suite.specs):
        rank0, rank1 = ex.submit(RunJob(), spec, str(tmp_path / "two")).results()
        assert rank0["status"] == "ok", rank0["error"]
        assert rank0["scheduler"]["world_size"] == 2 and rank1["scheduler"]["global_rank"] == 1
        _assert_close(rank0, ref[spec.label])
    assert not list((tmp_path / "two").glob("**/*.tmp*"))


def _assert_close(rec, ref):
    got, want = _metrics(rec), _metrics(ref)
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k[0] == "loss":
            assert got[k] == pytest.approx(v, rel=LOSS_RTOL), k
        else:
            assert abs(got[k] - v) <= ACC_TOL, (k, got[k], v)


# ------------------------------------------------------------------------------------------- SLURM
SLOW_EPOCHS, SLOW_SLEEP_S = 24, 0.65  # 24 epochs x 7 steps x 0.65 s: ~110 s of training, past a 2-min limit


def _slow_suite() -> dict:
    d = tiny_suite(suite="slow", methods=["baseline"], resources={"timeout_min": 2, "cpus_per_task": 1})
    d["pairs"] = [{"teacher": {"model": "kdbench:resnet8", "weights": "unused-by-the-baseline.pt"},
                   "student": {"model": "kdbench:resnet8"}}]
    d["recipe"]["epochs"] = SLOW_EPOCHS
    return d


@pytest.fixture(scope="module")
def time_limit_job(slurm, tmp_path_factory):
    """Submit (no wait) a run that needs ~110 s of steps under a 2-minute limit; cancel it at the end."""
    root = tmp_path_factory.mktemp("timelimit")
    path = root / "slow.yaml"
    path.write_text(yaml.safe_dump(_slow_suite()))
    results = root / "res"
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-wait",
             env=slow_steps_env(SLOW_SLEEP_S))
    assert r.returncode == 0, r.stderr
    yield {"path": path, "results": results, "submitted": time.time()}
    for rid, e in job_states(results / "slow").items():  # left running by a failed or deselected test
        done = results / "slow" / "runs" / rid / "record.json"
        if e["status"] in ("pending", "running") and not done.is_file():
            subprocess.run(["scancel", e["job_id"]], capture_output=True)


@pytest.mark.slurm
def test_tiny_suite_via_slurm_matches_local(slurm, time_limit_job, write_suite, tmp_path):
    # (time_limit_job is asked for here only so that its long job starts first and overlaps these tests)
    path = write_suite(tiny_suite())
    local = launch(load_suite(path), tmp_path / "local", executor="local", parallel=2, log=lambda s: None)
    lines = []
    remote = launch(load_suite(path), tmp_path / "slurm", executor="slurm", log=lines.append)
    assert [r["status"] for r in remote] == ["ok", "ok", "ok"], [r.get("error") for r in remote]
    # records come back in the order jobs finish: compare them by run and order them teacher, baseline, kd
    order = {"teacher": 0, "baseline": 1, "kd": 2}
    remote = sorted(remote, key=lambda r: order[r["label"]])
    local = sorted(local, key=lambda r: order[r["label"]])
    assert [r["run_id"] for r in remote] == [r["run_id"] for r in local]
    for a, b in zip(remote, local):
        assert a["metrics"] == b["metrics"] and a["teacher_metrics"] == b["teacher_metrics"]
        assert a["params_resolved"] == b["params_resolved"] and a["best_epoch"] == b["best_epoch"]
    jobs = read_jobs(tmp_path / "slurm" / "tiny")
    teacher, base, kd = remote
    assert {r["scheduler"]["job_id"] for r in remote} == {e["job_id"] for e in jobs.values()}
    assert jobs[kd["run_id"]]["depends"] == [teacher["scheduler"]["job_id"]]
    assert jobs[base["run_id"]]["depends"] == []  # the baseline needs no teacher: it starts at once
    assert any("afterok" in ln for ln in lines)
    # a rerun has nothing to do
    assert launch(load_suite(path), tmp_path / "slurm", executor="slurm", log=lambda s: None) == []


@pytest.mark.slurm
def test_no_wait_submits_arrays_after_the_teacher_stage_and_status_follows(slurm, write_suite, tmp_path):
    d = tiny_suite(seeds=[0, 1], resources={"cpus_per_task": 1, "timeout_min": 10})
    d["pairs"][0]["teacher"]["train"]["recipe"]["epochs"] = 3
    path, results = write_suite(d), tmp_path / "res"
    t0 = time.time()
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-wait")
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 30, "--no-wait must return once submitted"
    assert "submitted 1 teacher run(s) as job" in r.stdout and "kdbench status" in r.stdout
    jobs = read_jobs(results / "tiny")
    by_label = {}
    for e in jobs.values():
        by_label.setdefault(e["label"], []).append(e)
    (teacher,) = by_label["teacher"]
    kd_arrays = {e["job_id"].split("_")[0] for e in by_label["kd"]}
    assert len(kd_arrays) == 1 and len(by_label["kd"]) == 2, "the two kd seeds are one job array"
    assert all(e["depends"] == [teacher["job_id"]] for e in by_label["kd"])
    assert all(e["depends"] == [] for e in by_label["baseline"])
    st = _cli("status", str(results / "tiny"))
    assert st.returncode == 0, st.stderr
    assert "job" in st.stdout.splitlines()[0] and ("pending" in st.stdout or "running" in st.stdout)
    # a second submission while they run submits nothing twice
    again = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-wait")
    assert again.returncode == 0 and "submitted earlier" in again.stdout and "as job" not in again.stdout
    done = _wait_for(lambda: (s := _cli("status", str(results / "tiny"))).stdout.rstrip().endswith(": 5 ok") and s,
                     240, "the 5 runs to finish ok")
    assert "pending" not in done.stdout
    recs = _records(results, "tiny")
    assert {r["scheduler"]["job_id"] for r in recs.values()} == {e["job_id"] for e in read_jobs(results / "tiny").values()}
    times = _sacct([e["job_id"] for e in jobs.values()])
    t_end = times[teacher["job_id"]]["End"]
    for e in by_label["kd"]:  # SLURM held them until the teacher had finished (afterok)
        assert times[e["job_id"]]["Start"] >= t_end, (times[e["job_id"]], t_end)
        assert recs[("kd", e["pair"], e["seed"])]["teacher"]["run"] == teacher["run_id"]


@pytest.mark.slurm
def test_freekd_stage_is_its_own_job_that_the_distill_jobs_depend_on(slurm, write_suite, tmp_path):
    d = tiny_suite(methods=[{"name": "freekd", "params": {"stage_iters": 3}}], seeds=[0, 1],
                   resources={"cpus_per_task": 1, "timeout_min": 10})
    d["data"]["image_size"] = 16
    d["pairs"][0]["teacher"] = {"model": "kdbench:resnet8", "weights": str(_weights(tmp_path / "t.pt"))}
    suite = load_suite(write_suite(d))
    (stage,) = [s for s in suite.specs if s.kind == "stage"]
    lines = []
    recs = launch(suite, tmp_path / "res", executor="slurm", log=lines.append)
    assert sorted(r["kind"] for r in recs) == ["distill", "distill", "stage"]
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    jobs = read_jobs(tmp_path / "res" / "tiny")
    stage_job = jobs[stage.run_id]["job_id"]
    distill = [e for e in jobs.values() if e["kind"] == "distill"]
    assert len(distill) == 2 and all(e["depends"] == [stage_job] for e in distill)
    assert any(f"after {stage_job} (afterok)" in ln for ln in lines)
    times = _sacct([e["job_id"] for e in jobs.values()])
    for e in distill:  # SLURM held them until the stage job had finished
        assert times[e["job_id"]]["Start"] >= times[stage_job]["End"]
    by = {r["kind"]: r for r in recs}
    assert by["distill"]["stage"]["run"] == stage.run_id
    assert (tmp_path / "res" / "tiny" / "runs" / stage.run_id / "stage.pt").is_file()
    assert launch(load_suite(write_suite(d)), tmp_path / "res", executor="slurm", log=lambda s: None) == []


@pytest.mark.slurm
def test_failed_run_is_recorded_others_finish_cancel_shows_and_rerun_resubmits_only_it(slurm, write_suite,
                                                                                      tmp_path):
    import torch

    good, bad = _weights(tmp_path / "good.pt"), tmp_path / "bad.pt"
    torch.save([1, 2], bad)  # a torch file, so validate lets it through; not a state dict, so the run fails
    d = tiny_suite(methods=["baseline", "kd"], resources={"cpus_per_task": 1, "timeout_min": 10})
    d["pairs"] = [{"name": "good", "teacher": {"model": "kdbench:resnet8", "weights": str(good)},
                   "student": {"model": "kdbench:resnet8"}},
                  {"name": "broken", "teacher": {"model": "kdbench:resnet8", "weights": str(bad)},
                   "student": {"model": "kdbench:resnet8"}}]
    path, results = write_suite(d), tmp_path / "res"
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-table")
    assert r.returncode == 1, r.stdout + r.stderr  # one run failed
    recs = _records(results, "tiny")
    assert {k: v["status"] for k, v in recs.items()} == {("baseline", "good", 0): "ok", ("kd", "good", 0): "ok",
                                                         ("baseline", "broken", 0): "ok",
                                                         ("kd", "broken", 0): "failed"}
    failed = recs[("kd", "broken", 0)]
    assert "Traceback" in failed["error"] and "cannot read checkpoint" in failed["error"]
    assert failed["scheduler"]["job_id"]  # the remote traceback, from that job
    st = _cli("status", str(results / "tiny"), "--tail", "3")
    assert "failed" in st.stdout and "cannot read checkpoint" in st.stdout and "errors (last lines):" in st.stdout
    # the weights are fixed; a rerun resubmits only the failed run. Cancel it: status says cancelled.
    shutil.copy(good, bad)
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-wait",
             env=slow_steps_env(5))
    assert r.returncode == 0 and "3 already ok, 1 to run" in r.stdout, r.stdout + r.stderr
    job = read_jobs(results / "tiny")[failed["run_id"]]["job_id"]
    assert job != failed["scheduler"]["job_id"]
    subprocess.run(["scancel", job], check=True)
    def cancelled_shown():
        out = _cli("status", str(results / "tiny")).stdout
        return out if "cancelled" in out else None

    st = _wait_for(cancelled_shown, 60, "the cancelled job to show as cancelled")
    line = next(ln for ln in st.splitlines() if ln.startswith(failed["run_id"][:8]))
    assert "cancelled" in line.split() and job in line
    # and the next rerun (following the job this time) resubmits it again, only it, and it finishes ok
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-table")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 already ok, 1 to run" in r.stdout
    rec = _records(results, "tiny")[("kd", "broken", 0)]
    assert rec["status"] == "ok" and rec["error"] is None
    assert len(read_jobs(results / "tiny")) == 4


@pytest.mark.slurm
def test_failed_teacher_cancels_the_runs_that_depend_on_it(slurm, write_suite, tmp_path):
    d = tiny_suite(resources={"cpus_per_task": 1, "timeout_min": 10})
    d["pairs"][0]["teacher"]["kwargs"] = {"no_such_argument": 1}  # the teacher run raises when it builds it
    path, results = write_suite(d), tmp_path / "res"
    r = _cli("run", str(path), "--executor", "slurm", "--results", str(results), "--no-table")
    assert r.returncode == 1
    out = r.stdout
    assert "[  failed] teacher" in out and "[cancelled] kd" in out, out
    assert "a job it depends on" in out and "did not succeed" in out, out
    assert "[      ok] baseline" in out  # it depends on nothing
    jobs = read_jobs(results / "tiny")

    def ended():  # the CLI returns once every run has its record; the job that wrote one may still be ending
        st = sorted(v["State"].split()[0] for v in _sacct(e["job_id"] for e in jobs.values()).values())
        return st if not {"RUNNING", "PENDING", "COMPLETING"} & set(st) else None

    states = _wait_for(ended, 60, "the jobs to end in SLURM's accounting")
    assert states == ["CANCELLED", "COMPLETED", "FAILED"]
    st = _cli("status", str(results / "tiny")).stdout
    assert st.rstrip().endswith("1 ok, 1 failed, 1 cancelled"), st


@pytest.mark.slurm
def test_ddp_two_gloo_tasks_on_slurm_match_one_process(slurm, write_suite, tmp_path):
    d = tiny_suite(methods=["kd"], resources={"tasks_per_node": 2, "cpus_per_task": 1, "timeout_min": 10})
    d["pairs"][0]["teacher"]["train"] = {"recipe": {"epochs": 2}}
    path = write_suite(d)
    ref = {r["label"]: r for r in launch(load_suite(path), tmp_path / "one", executor="debug", log=lambda s: None)}
    recs = launch(load_suite(path), tmp_path / "two", executor="slurm", log=lambda s: None)
    assert [r["status"] for r in recs] == ["ok", "ok"], [r.get("error") for r in recs]
    for rec in recs:
        assert rec["scheduler"]["world_size"] == 2 and rec["scheduler"]["num_tasks"] == 2
        _assert_close(rec, ref[rec["label"]])
    folder = Path(read_jobs(tmp_path / "two" / "tiny")[recs[1]["run_id"]]["folder"])
    assert sorted(p.name.split("_log")[0][-1] for p in folder.glob(f"{recs[1]['scheduler']['job_id']}_*_log.err")) == \
        ["0", "1"], "two tasks"


@pytest.mark.slurm
def test_run_past_its_time_limit_is_requeued_and_resumes_to_the_same_metrics(slurm, time_limit_job, tmp_path):
    suite = load_suite(time_limit_job["path"])
    ref = launch(suite, tmp_path / "ref", executor="debug", log=lambda s: None)[0]  # uninterrupted, no sleep
    results = time_limit_job["results"]
    run_dir = results / "slow" / "runs" / ref["run_id"]
    rec = _wait_for(lambda: (run_dir / "record.json").is_file() and json.loads((run_dir / "record.json").read_text()),
                    max(60, 480 - (time.time() - time_limit_job["submitted"])), "the time-limited run to finish")
    assert rec["status"] == "ok", rec["error"]
    assert rec["scheduler"]["requeues"] >= 1 and rec["scheduler"]["restart_count"] >= 1
    assert rec["scheduler"]["resumes"] >= 1
    assert rec["metrics"] == ref["metrics"], "resumed from the epoch checkpoint: exactly the uninterrupted numbers"
    epochs = [json.loads(ln)["epoch"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, SLOW_EPOCHS + 1)), "every epoch once: nothing finished was redone"
    job = rec["scheduler"]["job_id"]
    assert read_jobs(results / "slow")[ref["run_id"]]["job_id"] == job, "requeued under the same job id"
    st = _cli("status", str(results / "slow"))
    assert f"{job} (requeued {rec['scheduler']['requeues']}x)" in st.stdout and ": 1 ok" in st.stdout


@pytest.mark.slurm
def test_a_cohort_runs_as_one_array_task(slurm, write_suite, tmp_path):
    """The distill runs that share the teacher, data and seed (kd, cwd, pkd) are one array task running
    kdbench.runner.run_cohort; their records say so and match the runs trained alone (kdbench/cohort.py)."""
    d = tiny_suite(methods=["baseline", "kd", "cwd", "pkd"], resources={"cpus_per_task": 1, "timeout_min": 10})
    path = write_suite(d)
    lines = []
    remote = launch(load_suite(path), tmp_path / "slurm", executor="slurm", log=lines.append)
    assert [r["status"] for r in remote] == ["ok"] * 5, [r.get("error") for r in remote]
    members = [r for r in remote if r["label"] in ("kd", "cwd", "pkd")]
    assert len({r["scheduler"]["job_id"] for r in members}) == 1  # one array task
    assert len({r["cohort"]["id"] for r in members}) == 1 and len(members[0]["cohort"]["runs"]) == 3
    assert any("one per cohort" in ln for ln in lines), lines
    os.environ["KDBENCH_COHORT"] = "off"
    try:
        alone = launch(load_suite(path), tmp_path / "alone", executor="debug", log=lambda s: None)
    finally:
        del os.environ["KDBENCH_COHORT"]
    by = {r["run_id"]: r for r in alone}
    for r in remote:
        assert r["metrics"] == by[r["run_id"]]["metrics"], r["label"]


@pytest.mark.slurm
def test_an_eval_group_runs_as_one_array_task(slurm, tmp_path):
    """The eval runs of one corruption chunk over the suite's three finished models are one array task that
    corrupts each image once (kdbench/evalgroup.py); their numbers are those of the runs alone."""
    from kdb_util import train_digits32

    path, res = train_digits32(tmp_path, ["baseline", "kd"], suite="grp")
    d = yaml.safe_load(path.read_text())
    d["evals"] = ["val", {"name": "corruptions", "set": ["gaussian_noise", "contrast"], "severities": [1]}]
    d["resources"] = {"cpus_per_task": 1, "timeout_min": 10}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    alone = tmp_path / "alone"
    shutil.copytree(res, alone)
    lines = []
    remote = launch(load_suite(path), res, executor="slurm", log=lines.append)
    assert [r["status"] for r in remote] == ["ok"] * 6, [r.get("error") for r in remote]  # 3 models x 2 chunks
    by_chunk = {}
    for r in remote:
        by_chunk.setdefault(r["eval"]["corruption"], []).append(r)
    for chunk, recs in by_chunk.items():
        assert len({r["scheduler"]["job_id"] for r in recs}) == 1, chunk  # one array task per chunk
        assert {len(r["corruption_pass"]["runs"]) for r in recs} == {3}
        assert {r["corruption_pass"]["images_corrupted"] for r in recs} == {540}  # once, for the three models
    os.environ["KDBENCH_COHORT"] = "off"
    try:
        solo = launch(load_suite(path), alone, executor="debug", log=lambda s: None)
    finally:
        del os.environ["KDBENCH_COHORT"]
    by = {r["run_id"]: r for r in solo}

    def numbers(rec):
        return [(m["corruption"], m["severity"], m["metric"], m["value"]) for m in rec["metrics"]
                if m["metric"] != "images_per_s"]

    for r in remote:
        assert numbers(r) == numbers(by[r["run_id"]])
