"""A pair's own ``recipe:`` and ``data:`` (partial, merged over the suite's): the runs of that pair only."""

import copy

import pytest

from kdbench.suite import SuiteError, load_suite

from kdb_util import tiny_suite


def two_pairs(**second) -> dict:
    d = tiny_suite(evals=["val"])
    p = copy.deepcopy(d["pairs"][0])
    p["name"] = "second"
    p.update(second)
    d["pairs"].append(p)
    return d


def by_pair(suite, i, kind=None):
    return [s for s in suite.specs if s.pair_index == i and (kind is None or s.kind == kind)]


def test_a_pair_recipe_and_data_apply_to_its_runs_only(write_suite):
    plain = load_suite(write_suite(two_pairs()))
    over = load_suite(write_suite(two_pairs(recipe={"optimizer": {"name": "adamw", "lr": 1e-3}, "grad_clip": 5.0},
                                            data={"train_fraction": 0.5})))
    # the first pair's runs are the very same runs
    assert [s.run_id for s in by_pair(plain, 0)] == [s.run_id for s in by_pair(over, 0)]
    runs = by_pair(over, 1, "distill")
    # another optimiser replaces the suite's mapping (SGD's momentum is no AdamW key)
    assert runs and all(s.recipe["optimizer"] == {"name": "adamw", "lr": 1e-3} for s in runs)
    assert all(s.recipe["grad_clip"] == 5.0 and s.recipe["epochs"] == 2 for s in runs)  # merged over the suite's
    assert all(s.data == {"name": "digits", "train_fraction": 0.5} for s in runs)
    # the pair's teacher trains with the pair's recipe, then its own train: overrides on top
    (t,) = by_pair(over, 1, "teacher")
    assert t.recipe["optimizer"]["name"] == "adamw" and t.recipe["epochs"] == 2 and t.data["train_fraction"] == 1.0
    # its models are evaluated on the pair's data
    assert all(e.data["train_fraction"] == 0.5 for e in by_pair(over, 1, "eval"))
    assert {s.run_id for s in by_pair(plain, 1)}.isdisjoint(s.run_id for s in by_pair(over, 1))


def test_an_empty_override_changes_nothing(write_suite):
    plain = load_suite(write_suite(two_pairs()))
    same = load_suite(write_suite(two_pairs(recipe={}, data={})))
    assert [s.run_id for s in plain.specs] == [s.run_id for s in same.specs]


@pytest.mark.parametrize("second, expect", [
    ({"recipe": {"epoch": 3}}, "pairs[1].recipe.epoch: unknown key"),
    ({"recipe": {"optimizer": {"name": "lion"}}}, "pairs[1].recipe.optimizer"),
    ({"recipe": {"grad_clip": "five"}}, "pairs[1].recipe.grad_clip"),
    ({"data": {"train_fracton": 0.5}}, "pairs[1].data.train_fracton: unknown key"),
    ({"data": [1]}, "pairs[1].data: expected a mapping"),
])
def test_a_bad_pair_override_names_the_pair_and_key(write_suite, second, expect):
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(two_pairs(**second)))
    assert expect in str(e.value), str(e.value)


def test_the_same_optimiser_merges_key_by_key(write_suite):
    s = load_suite(write_suite(two_pairs(recipe={"optimizer": {"lr": 0.2}})))
    (run,) = [r for r in by_pair(s, 1, "distill") if r.method == "kd"]
    assert run.recipe["optimizer"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5.0e-4}


@pytest.mark.parametrize("where, recipe, expect", [
    ("suite", {"label_smoothing": 1.5}, "tiny.yaml: recipe.label_smoothing: expected a number"),
    ("pair", {"mixup": {"mode": "global"}}, "tiny.yaml: pairs[1].recipe.mixup.mode: unknown mode 'global'"),
    ("teacher", {"batch_size": 7, "mixup": {"cutmix_alpha": 1.0}},
     "tiny.yaml: pairs[0].teacher.train.recipe.batch_size: mixup needs an even batch size"),
])
def test_a_recipe_value_out_of_range_names_the_file_and_key(write_suite, where, recipe, expect):
    d = two_pairs()
    if where == "suite":
        d["recipe"].update(recipe)
    elif where == "pair":
        d["pairs"][1]["recipe"] = recipe
    else:
        d["pairs"][0]["teacher"]["train"]["recipe"] = recipe
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(d))
    assert expect in str(e.value), str(e.value)
