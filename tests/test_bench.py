"""kdbench bench (kdbench/bench.py) and the speed defaults of the training step (kdbench/perf.py,
kdbench/recipe.py): channels_last conv nets give the same losses and gradients as the default memory format; AMP
modes; loader options."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from kdb_util import assert_same_step, one_classification_step, tiny_suite
from kdbench import bench
from kdbench.registry import METHODS
from kdbench.recipe import amp_dtype, loader_options, teacher_dtype


def _suite(tmp_path, methods):
    d = tiny_suite(methods=methods)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return p


def test_bench_tiny_suite_one_step(tmp_path):
    p = _suite(tmp_path, ["baseline", "kd", "reviewkd"])
    logs = []
    rows, facts = bench.run_bench(p, steps=1, log=logs.append)
    labels = [r["label"] for r in rows]
    assert labels == ["(student step)", "(teacher forward)", "baseline", "kd", "reviewkd"]
    by = {r["label"]: r for r in rows}
    for r in rows:
        assert r["min_ms"] > 0 and r["median_ms"] >= r["min_ms"]
        assert r["samples_per_s"] == pytest.approx(32 / (r["min_ms"] / 1000))
    floor = by["(student step)"]["min_ms"] + by["(teacher forward)"]["min_ms"]
    assert by["kd"]["step_over_floor"] == pytest.approx(by["kd"]["min_ms"] / floor)
    assert math.isnan(by["(student step)"]["step_over_floor"])
    assert by["kd"]["extra_params"] == 0 and by["reviewkd"]["extra_params"] > 0
    assert by["reviewkd"]["peak_mem_mb"] > 0
    md, text = bench.format_md(rows, facts), bench.format_csv(rows)
    assert "| reviewkd | reviewkd |" in md and "step / floor" in md
    assert text.splitlines()[0].startswith("pair,label,method,min_ms") and len(text.splitlines()) == 6


def test_bench_filter_and_cli(tmp_path, capsys):
    p = _suite(tmp_path, ["baseline", "kd", "cwd"])
    out = tmp_path / "b" / "bench.md"
    assert bench.main([str(p), "--filter", "kd", "--steps", "1", "--no-memory", "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| kd | kd |" in md and "| cwd |" not in md
    assert out.read_text().startswith("# Step cost: tiny") and out.with_suffix(".csv").is_file()
    assert bench.main([str(p), "--filter", "nothing*", "--steps", "1"]) == 2
    assert "matches --filter" in capsys.readouterr().err
    from kdbench.cli import main as cli_main

    assert cli_main(["bench", str(p), "--filter", "cwd", "--steps", "1", "--no-memory", "--format", "csv",
                     "--set", "recipe.batch_size=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pair,label,method") and [ln.split(",")[1] for ln in lines[1:]] == [
        "(student step)", "(teacher forward)", "cwd"]
    assert all(ln.split(",")[-5] == "8" for ln in lines[1:])  # batch_size column follows --set


def test_bench_cohort_rows_and_csv(tmp_path, capsys):
    """``--cohort``: one row per pair, the members' solo steps summed against one cohort step, whose losses are
    the members' own (kdbench.train.fit_cohort's step)."""
    p = _suite(tmp_path, ["baseline", "kd", "cwd", "reviewkd"])
    rows, facts = bench.run_bench(p, steps=1, memory=False, log=lambda m: None, cohort=True)
    (r,) = rows
    assert r["members"] == 4 and r["labels"] == "baseline kd cwd reviewkd"
    assert r["ratio"] == pytest.approx(r["cohort_ms"] / r["solo_ms_sum"])
    # the bound: the teacher forwards of the 3 members with a teacher but one are saved
    assert r["bound"] == pytest.approx((r["solo_ms_sum"] - 2 * r["teacher_ms"]) / r["solo_ms_sum"])
    assert bench.main([str(p), "--cohort", "--steps", "1", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pair,members,solo_ms_sum,cohort_ms,ratio,teacher_ms,bound" and len(lines) == 2
    # the cohort step gives each member the loss its own step gives (no optimiser step: the weights stay)
    import dataclasses

    import kdbench.step as step_mod
    from kdbench.suite import load_suite

    entries = bench.build_entries(load_suite(p), log=lambda m: None, cohort=True)[0][2]
    members = [e.member for e in entries if e.kind == "method"]
    alone = [float(step_mod.train_step(*m[:5], dataclasses.replace(m[5], optimizer=None)).loss.detach())
             for m in members]
    seen, orig = [], step_mod.train_step

    def spy(*a, **k):
        out = orig(*a[:5], dataclasses.replace(a[5], optimizer=None), **k)
        seen.append(float(out.loss.detach()))
        return out

    step_mod.train_step = spy
    try:
        bench.cohort_step(members, torch.device("cpu"))()
    finally:
        step_mod.train_step = orig
    assert seen == pytest.approx(alone, rel=1e-6)


def test_interleaved_times_order_and_summary():
    calls = []
    times = bench.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2,
                                    warmup=1)
    assert calls == ["a", "b"] * 3 and all(len(v) == 2 for v in times.values())
    best, med = bench.summarize({"x": [3.0, 1.0, 2.0]})
    assert best == {"x": 1.0} and med == {"x": 2.0}


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if "classification" in c.tasks))
def test_channels_last_same_loss_and_grads(name, monkeypatch):
    """Loss terms and student gradients of one step (no optimiser step) with and without channels_last."""
    steps = []
    for channels_last in (False, True):
        monkeypatch.setenv("KDBENCH_CHANNELS_LAST", "1" if channels_last else "0")
        steps.append(one_classification_step(name))
        assert steps[-1][3].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_same_step(*steps)


def test_amp_modes_and_loader_options():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for v in (True, "bf16", "fp16", False):
        assert amp_dtype(v, cpu) is None  # never on CPU
    assert amp_dtype(True, cuda) is torch.float16 and amp_dtype("fp16", cuda) is torch.float16
    assert amp_dtype("bf16", cuda) is torch.bfloat16 and amp_dtype(False, cuda) is None
    with pytest.raises(ValueError, match="bf16, fp16"):
        amp_dtype("fp8", cuda)
    assert teacher_dtype({}, cpu) is None
    assert loader_options({"num_workers": 2}, {"cpus_per_task": 8}, cpu) == {"num_workers": 2, "pin_memory": False}
    assert loader_options({"num_workers": "auto"}, {"cpus_per_task": 8}, cuda) == {"num_workers": 7,
                                                                                 "pin_memory": True}
    assert loader_options({"num_workers": "auto"}, {"cpus_per_task": 8}, cpu)["num_workers"] == 0


# -- recipe/resource keys, several runs per GPU ---------------------------------------------------------------
def test_recipe_and_resource_keys_are_validated(tmp_path):
    from kdbench.suite import SuiteError, load_suite

    def load(**over):
        d = tiny_suite(**over)
        p = tmp_path / "tiny.yaml"
        p.write_text(yaml.safe_dump(d, allow_unicode=True))
        return load_suite(p)

    base = tiny_suite()["recipe"]
    for amp in (True, False, "bf16", "fp16"):
        load(recipe={**base, "amp": amp, "compile": True, "teacher_bf16": False, "num_workers": "auto"})
    with pytest.raises(SuiteError, match=r"recipe\.amp.*unknown value 'fp8'; valid: bool, bf16, fp16"):
        load(recipe={**base, "amp": "fp8"})
    with pytest.raises(SuiteError, match=r"recipe\.num_workers.*valid: int, auto"):
        load(recipe={**base, "num_workers": "many"})
    with pytest.raises(SuiteError, match=r"recipe\.compile"):
        load(recipe={**base, "compile": "yes"})
    load(resources={"gpus_per_node": 1, "runs_per_gpu": 4})
    with pytest.raises(SuiteError, match=r"resources\.runs_per_gpu.*gpus_per_node: 1"):
        load(resources={"gpus_per_node": 2, "runs_per_gpu": 4})
    with pytest.raises(SuiteError, match=r"resources\.runs_per_gpu.*integer >= 1"):
        load(resources={"gpus_per_node": 1, "runs_per_gpu": 0})


def test_cpu_share_keeps_the_threads_and_tells_a_busy_machine(monkeypatch):
    from kdbench import scheduler

    clock = [0.0]
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: clock[0])
    load = [0.1]
    share = scheduler.CpuShare(cpus=2, loadavg=lambda: (load[0], 0, 0))
    assert share.threads(1) == 2 and share.threads(2) == 1  # the cores / the jobs at once
    assert not share.busy(1)
    load[0] = 2.0  # another process keeps both cores busy: the threads stay (numbers), the walk says so
    assert share.threads(1) == 2 and share.busy(1) and share.others() == pytest.approx(2.0)
    assert not share.busy(2)  # one thread per job already
    # the walk's own 2-thread job, running for minutes, is not someone else's load
    share.observe(2)
    clock[0] = 600.0
    share.observe(2)
    load[0] = 2.1
    assert share.others() == pytest.approx(0.1, abs=0.01) and not share.busy(1)
    # its job ended a second ago: the load average still holds it, and so does the walk's own average
    clock[0] = 601.0
    share.observe(0)
    assert not share.busy(1)


def test_gpu_slots_pack_runs_per_gpu():
    from kdbench.scheduler import GpuSlots, default_parallel

    res = {"gpus_per_node": 1, "runs_per_gpu": 3, "cpus_per_task": 4}
    assert default_parallel(res, n_gpus=2) == 6
    assert default_parallel({"gpus_per_node": 1}, n_gpus=2) == 2
    slots = GpuSlots(2)
    got = [slots.take(res) for _ in range(6)]
    assert sorted(got) == [(0,)] * 3 + [(1,)] * 3 and slots.take(res) is None
    slots.give((1,))
    assert slots.take(res) == (1,)
    assert GpuSlots(0).take(res) == ()  # no GPU: the job gets none
    two = GpuSlots(4)
    assert [two.take({"gpus_per_node": 2}) for _ in range(3)] == [(0, 1), (2, 3), None]


def test_run_pack_runs_its_runs_in_parallel_processes(tmp_path):
    """The SLURM job of runs_per_gpu: N runs its runs as N processes; each writes its own record."""
    from kdbench.results import read_record, run_dir_for
    from kdbench.slurm import RunPack
    from kdbench.suite import load_suite

    d = tiny_suite(methods=["baseline"], seeds=[0, 1])
    d["recipe"]["epochs"] = 1
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    specs = [s for s in load_suite(p).specs if s.kind == "distill"]
    assert len(specs) == 2
    recs = RunPack()(specs, str(tmp_path / "res"))
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert {read_record(run_dir_for(tmp_path / "res", s))["run_id"] for s in specs} == {s.run_id for s in specs}


@pytest.mark.parametrize("h,hy", [(8, 1), (16, 8), (7, 3), ((8, 12), (4, 3)), ((6, 9), (6, 3))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_abf_fast_fusion_equals_the_definition(h, hy, channels_last):
    """ABF's fusion without concat/materialised upsampling (docs/methods.md §4.2) gives the definition's numbers
    (float64: to 1e-12) and gradients, block-repeat sizes and others."""
    import torch.nn.functional as F

    from kdbench.methods.reviewkd import ABF

    torch.manual_seed(0)
    abf = ABF(6, 8, 5, fuse=True).double()
    (h, w), (hy, wy) = (h if isinstance(h, tuple) else (h, h)), (hy if isinstance(hy, tuple) else (hy, hy))
    x = torch.randn(3, 6, h, w, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 8, hy, wy, dtype=torch.float64, requires_grad=True)
    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def definition(xx, y):
        x1 = abf.conv1(xx)
        n, _, hh, ww = x1.shape
        yu = F.interpolate(y, size=(hh, ww), mode="nearest")
        z = abf.att_conv(torch.cat([x1, yu], dim=1))
        x1 = x1 * z[:, 0].view(n, 1, hh, ww) + yu * z[:, 1].view(n, 1, hh, ww)
        return abf.conv2(x1), x1

    wanted = [x, y, abf.conv1[0].weight, abf.att_conv[0].weight, abf.att_conv[0].bias, abf.conv2[0].weight]
    got, ref = abf(xx, y), definition(xx, y)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad((got[0] ** 2).sum() + (got[1] ** 3).sum(), wanted)
    g2 = torch.autograd.grad((ref[0] ** 2).sum() + (ref[1] ** 3).sum(), wanted)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    # only some inputs needing gradients: the hand-written backward skips the others, the rest is unchanged
    some = [y, abf.att_conv[0].weight]
    abf.conv1.requires_grad_(False)  # x' needs no gradient now
    ga = torch.autograd.grad((abf(xx.detach(), y)[0] ** 2).sum(), some)
    gb = torch.autograd.grad((definition(xx.detach(), y)[0] ** 2).sum(), some)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_abf_output_gradient_comes_back_in_its_layout():
    """A loss that flattens ABF's channels_last output (a DWT, a spatial flatten) would hand back an NCHW
    gradient; ``same_layout_grad`` returns it in channels_last, the layout of the batch norm that made it."""
    from kdbench.fusion import ABF, same_layout_grad

    abf = ABF(4, 8, 6, fuse=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    out, _ = abf(x)
    seen = []
    out.register_hook(lambda g: seen.append(g))
    (out.flatten(2) ** 2).sum().backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert torch.allclose(seen[0], 2 * out.detach())
    plain = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert same_layout_grad(plain) is plain and not plain._backward_hooks
