"""The run graph: kinds, needs, hashes (needs included, evals not in training runs), filter closure, task facts,
eval validation, pair checks, and the local scheduler's order and failure propagation (runs faked)."""

import pytest

from kdbench.scheduler import launch
from kdbench.graph import levels, select_specs, topological
from kdbench.suite import SuiteError, load_suite

from kdb_util import tiny_suite

FREEKD = {"name": "freekd", "params": {"stage_iters": 3}}
CORR = {"name": "corruptions", "set": ["fog", "snow"], "severities": [1, 3]}
DATA32 = {"name": "digits", "train_fraction": 0.2, "image_size": 32}  # large enough to be corrupted


def _suite(write_suite, overrides=(), **kw):
    kw.setdefault("data", DATA32)
    return load_suite(write_suite(tiny_suite(**kw)), list(overrides))


def by_kind(suite, kind):
    return [s for s in suite.specs if s.kind == kind]


def test_four_kinds_and_their_needs(write_suite):
    s = _suite(write_suite, methods=["baseline", "kd", FREEKD], seeds=[0, 1], evals=["val", CORR])
    teacher, = by_kind(s, "teacher")
    stage, = by_kind(s, "stage")
    assert stage.needs == (teacher.run_id,) and stage.method == "freekd"
    assert stage.params["stage_iters"] == 3 and "mask_weight" not in stage.params, "only the stage params"
    distill = by_kind(s, "distill")
    assert len(distill) == 6
    for d in distill:
        want = {"baseline": (), "kd": (teacher.run_id,), "freekd": (teacher.run_id, stage.run_id)}[d.method]
        assert d.needs == want
    evals = by_kind(s, "eval")
    # one eval per (finished model, corruption): the teacher and the six students, two corruptions each
    assert len(evals) == 2 * 7
    assert {e.target for e in evals} == {teacher.run_id} | {d.run_id for d in distill}
    assert all(e.needs == (e.target,) for e in evals)
    assert all(e.eval["severities"] == [1, 3] for e in evals)
    depth = levels(s.specs)
    order = [x.run_id for x in topological(s.specs)]
    assert order.index(teacher.run_id) < order.index(stage.run_id) < min(
        order.index(d.run_id) for d in distill if d.method == "freekd")
    assert all(depth[n] < depth[x.run_id] for x in s.specs for n in x.needs)


def test_run_ids_hash_needs_and_not_evals(write_suite):
    a = _suite(write_suite, methods=["baseline", "kd", FREEKD])
    b = _suite(write_suite, methods=["baseline", "kd", FREEKD], evals=["val", CORR])
    train = lambda s: [x.run_id for x in s.specs if x.kind != "eval"]
    assert train(a) == train(b), "adding an eval changes no training run_id"
    assert len(by_kind(b, "eval")) > 0 and not by_kind(a, "eval")
    # a different teacher (its own recipe) changes every run built on it, through needs
    c = _suite(write_suite, ["pairs.0.teacher.train.recipe.epochs=3"], methods=["baseline", "kd", FREEKD])
    ids = lambda s, k: {x.method: x.run_id for x in by_kind(s, k)}
    assert ids(c, "distill")["baseline"] == ids(a, "distill")["baseline"]
    assert ids(c, "distill")["kd"] != ids(a, "distill")["kd"]
    assert ids(c, "stage")["freekd"] != ids(a, "stage")["freekd"]
    # a different severity list is a different eval run, of the same model
    d = _suite(write_suite, methods=["baseline"], evals=[{**CORR, "severities": [1]}])
    e = _suite(write_suite, methods=["baseline"], evals=[CORR])
    assert {x.run_id for x in by_kind(d, "eval")}.isdisjoint(x.run_id for x in by_kind(e, "eval"))
    assert {x.target for x in by_kind(d, "eval")} == {x.target for x in by_kind(e, "eval")}


def test_checkpoint_teacher_is_evaluated_without_needs(write_suite, tmp_path):
    d = tiny_suite(methods=["baseline"], evals=[CORR], data=DATA32)
    d["pairs"][0]["teacher"] = {"model": "kdbench:resnet8", "weights": str(tmp_path / "t.pt")}
    s = load_suite(write_suite(d))
    t_evals = [e for e in by_kind(s, "eval") if e.label == "teacher"]
    assert len(t_evals) == 2 and all(e.needs == () and e.student["weights"] == str(tmp_path / "t.pt")
                                     for e in t_evals)
    assert t_evals[0].target.startswith("w") and len(t_evals[0].target) == 16


def test_filter_pulls_in_what_the_selected_runs_need(write_suite):
    s = _suite(write_suite, methods=["baseline", "kd", FREEKD], evals=[CORR])
    sel = select_specs(s, "freekd")
    kinds = sorted(x.kind for x in sel)
    assert kinds == ["distill", "eval", "eval", "stage", "teacher"]
    assert {x.method for x in sel if x.kind == "distill"} == {"freekd"}
    assert [x.kind for x in select_specs(s, "baseline")] == ["distill", "eval", "eval"]


@pytest.mark.parametrize("evals, expect", [
    ([{"name": "corruptions", "set": ["fogg"]}], "evals[0].set: unknown corruption 'fogg'; valid: gaussian_noise"),
    ([{"name": "corruptions", "set": "most"}], "evals[0].set: unknown corruption set 'most'; valid: benchmark, extra, all"),
    ([{"name": "corruptions", "severities": [0, 6]}], "evals[0].severities: severity 0 is outside 1-5"),
    ([{"name": "corruptions", "level": 3}], "evals[0].level: unknown key for eval 'corruptions'"),
])
def test_eval_entries_are_checked_before_anything_runs(write_suite, evals, expect):
    with pytest.raises(SuiteError) as e:
        _suite(write_suite, evals=evals)
    assert "tiny.yaml" in str(e.value) and expect in str(e.value)


def test_corruption_sets():
    from kdbench.evals import corruption_names

    assert len(corruption_names("benchmark")) == 15 and len(corruption_names("extra")) == 4
    assert corruption_names("all")[:15] == corruption_names("benchmark")
    assert corruption_names(["fog"]) == ("fog",)


def test_task_refuses_a_model_it_cannot_use(write_suite):
    d = tiny_suite()
    d["pairs"][0]["teacher"] = {"model": "torchvision:retinanet_resnet50_fpn", "weights": "x.pt"}
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(d))
    assert "pairs[0].teacher.model" in str(e.value) and "is a detector; a classification suite needs a classifier" \
        in str(e.value)
    from kdbench.tasks import TASK_FACTS, model_kind

    assert model_kind("smp:pspnet_resnet18") == "segmenter" and model_kind("torchvision:fcn_resnet50") == "segmenter"
    assert model_kind("torchvision:resnet18") == "classifier" and model_kind("timm:resnet18") == "classifier"
    from kdbench.registry import TASKS

    for name, facts in TASK_FACTS.items():
        cls = TASKS.get(name)
        assert cls.primary_metric == facts["primary_metric"] and cls.metrics == facts["metrics"]


def test_pair_check_of_the_method_becomes_a_suite_error(write_suite, monkeypatch):
    from kdbench.registry import METHODS

    cls = METHODS.get("kd")

    def check_pair(params, teacher_model, student_model):
        if params["temperature"] > 5:
            raise ValueError(f"too hot for {teacher_model}")

    monkeypatch.setattr(cls, "check_pair", staticmethod(check_pair), raising=False)
    _suite(write_suite)  # temperature 4: fine
    with pytest.raises(SuiteError) as e:
        _suite(write_suite, methods=["baseline", {"name": "kd", "params": {"temperature": 6}}])
    assert "tiny.yaml: methods[1] (kd) on pairs[0]" in str(e.value) and "too hot for kdbench:resnet8" in str(e.value)


def test_scheduler_runs_in_order_and_a_failed_need_fails_its_dependents_only(write_suite, tmp_path, monkeypatch):
    """The debug walk with a fake run_one: order respects needs; the teacher fails -> kd, freekd's stage and
    their evals get failed records naming it and never start; the baseline and its evals run."""
    import kdbench.runner as runner
    from kdbench.results import finish_record, new_record, run_dir_for

    s = _suite(write_suite, methods=["baseline", "kd", FREEKD], evals=[CORR])
    started = []

    def fake(spec, results, **kw):
        started.append(spec.run_id)
        assert all(n in started for n in spec.needs), "a run started before what it needs"
        rec = new_record(spec, status="failed" if spec.kind == "teacher" else "ok", error="boom")
        return finish_record(run_dir_for(results, spec), rec)

    monkeypatch.setattr(runner, "run_one", fake)
    recs = launch(s, tmp_path, executor="debug", log=lambda m: None)
    by = {r["run_id"]: r for r in recs}
    teacher, = by_kind(s, "teacher")
    base = next(x for x in s.specs if x.method == "baseline" and x.kind == "distill")
    for spec in s.specs:
        rec = by[spec.run_id]
        if spec.run_id == teacher.run_id:
            assert rec["status"] == "failed"
        elif spec.run_id == base.run_id or spec.target == base.run_id:
            assert rec["status"] == "ok"
        else:
            assert rec["status"] == "failed" and spec.run_id not in started
            assert "not run: it needs the" in rec["error"] and "which ended failed" in rec["error"]
    assert len(started) == 1 + 1 + 2  # teacher, baseline, its two evals
