"""Suite loading: strict schema, clear errors, include, env vars, --set overrides, stable run ids."""

import copy

import pytest
import yaml

from kdbench.suite import SuiteError, load_suite

from kdb_util import tiny_suite


def err(write_suite, data, overrides=(), name=None):
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(data, name=name), list(overrides))
    return str(e.value)


def test_tiny_suite_expands_to_teacher_plus_runs(write_suite):
    s = load_suite(write_suite(tiny_suite(seeds=[0, 1])))
    kinds = [x.kind for x in s.specs]
    assert kinds.count("teacher") == 1 and kinds.count("distill") == 4
    teacher = s.specs[0]
    kd_runs = [x for x in s.specs if x.method == "kd"]
    base_runs = [x for x in s.specs if x.method == "baseline"]
    assert all(r.teacher_run == teacher.run_id for r in kd_runs)
    assert all(r.teacher_run is None and r.teacher is None for r in base_runs)
    assert teacher.data["train_fraction"] == 1.0 and kd_runs[0].data["train_fraction"] == 0.2
    assert kd_runs[0].params == {"temperature": 4.0, "weight": 0.9, "ce_weight": 0.1}
    assert all(r.needs == (teacher.run_id,) for r in kd_runs) and all(r.needs == () for r in base_runs)


def test_run_id_is_stable_and_sensitive(write_suite, tmp_path):
    a = load_suite(write_suite(tiny_suite()))
    b = load_suite(write_suite(tiny_suite()))
    assert [x.run_id for x in a.specs] == [x.run_id for x in b.specs]
    assert len(a.specs[0].run_id) == 16
    # the id must not depend on the process (hash randomisation, dict order)
    import subprocess, sys
    code = (f"from kdbench.suite import load_suite; print(load_suite({str(write_suite(tiny_suite()))!r}).specs[-1].run_id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == a.specs[-1].run_id
    c = load_suite(write_suite(tiny_suite()), ["recipe.epochs=3"])
    distill = lambda s: {x.run_id for x in s.specs if x.kind == "distill"}
    assert distill(c).isdisjoint(distill(a))
    assert c.specs[0].run_id == a.specs[0].run_id, "the teacher pins its own epochs: it is reused"
    d = load_suite(write_suite(tiny_suite(methods=["baseline", {"name": "kd", "label": "kd-renamed"}])))
    assert [x.run_id for x in d.specs] == [x.run_id for x in a.specs], "a label is display only"
    e = load_suite(write_suite(tiny_suite(methods=["baseline", {"name": "kd", "params": {"temperature": 2}}])))
    assert e.specs[-1].run_id != a.specs[-1].run_id and e.specs[1].run_id == a.specs[1].run_id


def test_unknown_method_lists_choices(write_suite):
    msg = err(write_suite, tiny_suite(methods=["baseline", "kdd"]))
    assert "tiny.yaml: methods[1].name: unknown method 'kdd'" in msg
    assert "Did you mean 'kd'" in msg and "Valid methods:" in msg and "baseline" in msg


def test_teacher_train_resources_apply_to_the_teacher_run_only(write_suite):
    """A suite-trained teacher often runs alone in its stage: it may ask for more (cpus, gpus, time) than each
    distillation run. Resources never enter the run_id."""
    d = tiny_suite(resources={"cpus_per_task": 1, "timeout_min": 30})
    s0 = load_suite(write_suite(d))
    d["pairs"][0]["teacher"]["train"]["resources"] = {"cpus_per_task": 2}
    s = load_suite(write_suite(d))
    teacher, *runs = s.specs
    assert teacher.kind == "teacher" and teacher.resources == {"cpus_per_task": 2, "timeout_min": 30}
    assert all(r.resources == {"cpus_per_task": 1, "timeout_min": 30} for r in runs)
    assert [x.run_id for x in s.specs] == [x.run_id for x in s0.specs]


def test_unknown_param_lists_valid(write_suite):
    msg = err(write_suite, tiny_suite(methods=[{"name": "kd", "params": {"T": 3}}]))
    assert "methods[0].params" in msg and "unknown parameter(s) 'T'" in msg and "temperature=4.0" in msg


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.update(epochs=3), "epochs: unknown key; valid keys here:"),
    (lambda d: d["recipe"].update(epoch=3), "recipe.epoch: unknown key; valid keys here: amp, batch_size"),
    (lambda d: d["recipe"]["optimizer"].update(name="lion"), "unknown optimizer 'lion'; valid: sgd, adamw, adam"),
    (lambda d: d["recipe"]["optimizer"].update(betas=[0.9, 0.99]), "recipe.optimizer.betas: unknown key"),
    (lambda d: d["recipe"]["schedule"].update(name="multistep"), "recipe.schedule.milestones: required"),
    (lambda d: d["recipe"].update(epochs="ten"), "recipe.epochs: expected int, got 'ten'"),
    (lambda d: d["recipe"].update(batch_size=0), "recipe.batch_size: must be >= 1"),
    (lambda d: d.update(task="retrieval"), "task: unknown task 'retrieval'; valid: classification, detection"),
    (lambda d: d["data"].update(name="mnist"), "data.name: unknown dataset 'mnist'"),
    (lambda d: d["data"].update(fraction=0.1), "data.fraction: unknown key; valid keys here: augment"),
    (lambda d: d.update(seeds=[0, 0]), "seeds: duplicate seeds"),
    (lambda d: d.update(seeds="0"), "seeds: expected a non-empty list of integers"),
    (lambda d: d["pairs"][0]["student"].update(model="kdbench:resnet9"), "pairs[0].student.model: unknown model "
                                                                         "'kdbench:resnet9'. Did you mean"),
    (lambda d: d["pairs"][0]["student"].update(model="resnet8"), "must be 'SOURCE:NAME' with SOURCE one of"),
    (lambda d: d["pairs"][0]["teacher"].update(weights="x.pt"), "a teacher needs exactly one of 'weights"),
    (lambda d: d["pairs"][0].update(studnt={}), "pairs[0].studnt: unknown key"),
    (lambda d: d.update(resources={"gpus": 1}), "resources.gpus: unknown key; valid keys here: cohort_size, cpus_per_task"),
    (lambda d: d["pairs"][0]["teacher"]["train"].update(resources={"cpu": 2}),
     "pairs[0].teacher.train.resources.cpu: unknown key; valid keys here: cohort_size, cpus_per_task"),
    (lambda d: d.update(methods=["baseline", {"name": "kd"}, {"name": "kd"}]), "duplicate label(s) ['kd']"),
    (lambda d: d.update(suite="other"), "suite: must equal the file stem 'tiny'"),
    (lambda d: d.update(evals=[{"name": "coco-c"}]), "evals[0].name: unknown eval 'coco-c' for classification"),
    (lambda d: d.update(reference=[{"method": "kd", "pair": "nope", "metric": "top1", "value": 1}]),
     "reference[0].pair: unknown pair 'nope'"),
    (lambda d: d.pop("seeds"), "seeds: required key is missing"),
])
def test_bad_suites_are_rejected_with_file_key_and_choices(write_suite, mutate, expect):
    d = copy.deepcopy(tiny_suite())
    mutate(d)
    msg = err(write_suite, d, name="tiny")
    assert "tiny.yaml" in msg
    assert expect in msg, msg


def test_invalid_yaml_and_missing_file(write_suite, tmp_path):
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(write_suite({}, name="tiny", text="suite: [unclosed"))
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_set_overrides(write_suite):
    s = load_suite(write_suite(tiny_suite()), ["recipe.epochs=5", "pairs.0.student.model=kdbench:resnet14",
                                               "seeds=[3, 4]", "recipe.optimizer.lr=0.1"])
    d = [x for x in s.specs if x.kind == "distill"]
    assert {x.recipe["epochs"] for x in d} == {5} and {x.seed for x in d} == {3, 4}
    assert d[0].student["model"] == "kdbench:resnet14" and d[0].recipe["optimizer"]["lr"] == 0.1
    msg = err(write_suite, tiny_suite(), ["pairs.3.student.model=x"])
    assert "needs a list index below 1" in msg
    assert "expected KEY=VALUE" in err(write_suite, tiny_suite(), ["recipe.epochs"])


def test_env_vars_and_include(write_suite, tmp_path, monkeypatch):
    base = tiny_suite()
    base.pop("suite")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    child = {"include": "base.yaml", "suite": "child", "data": {"name": "cifar100", "root": "${KD_ROOT:-/d}/c"},
             "methods": ["baseline"]}
    s = load_suite(write_suite(child, name="child"))
    assert s.specs[-1].data == {"name": "cifar100", "root": "/d/c", "train_fraction": 0.2}
    assert s.specs[-1].recipe["epochs"] == 2 and [x.method for x in s.specs if x.kind == "distill"] == ["baseline"]
    monkeypatch.setenv("KD_ROOT", "/data")
    assert load_suite(write_suite(child, name="child")).specs[-1].data["root"] == "/data/c"
    child["data"]["root"] = "${UNSET_KDBENCH_VAR}/x"
    assert "UNSET_KDBENCH_VAR} is not set" in err(write_suite, child, name="child")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "include": "other.yaml"}))
    child["data"]["root"] = "/x"
    assert "one level only" in err(write_suite, child, name="child")


def test_pair_params_override_per_pair(write_suite):
    d = tiny_suite(methods=["baseline", {"name": "kd", "params": {"temperature": 2}}])
    d["pairs"][0]["params"] = {"kd": {"weight": 0.5}}
    s = load_suite(write_suite(d))
    kd = [x for x in s.specs if x.method == "kd"][0]
    assert kd.params["temperature"] == 2 and kd.params["weight"] == 0.5
    d["pairs"][0]["params"] = {"kd": {"wieght": 0.5}}
    assert "pairs[0].params.kd" in err(write_suite, d)
