"""The typed recipe: defaults in one place, an identity equal to the mapping run_ids have always hashed."""

from __future__ import annotations

import dataclasses

import pytest

from kdbench.recipe import RECIPE_DEFAULTS, Recipe, steps_per_epoch, value

GIVEN = {"epochs": 240, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05},
         "schedule": {"name": "multistep", "milestones": [150, 180, 210]}, "amp": "bf16", "compile": True}


def test_identity_is_the_suite_mapping_with_the_defaults():
    r = Recipe.of(GIVEN)
    assert r.identity() == {**RECIPE_DEFAULTS, **GIVEN}
    assert list(r.identity()) == list({**RECIPE_DEFAULTS, **GIVEN})  # same order as the records have it
    assert "teacher_bf16" not in r.identity() and r.teacher_bf16 is True  # a field default, not a given key
    assert Recipe.of(r.identity()) == r and Recipe.of(r) is r
    assert (r.epochs, r.batch_size, r.amp, r.eval_batch_size, r.grad_clip) == (240, 64, "bf16", 256, None)


def test_frozen_and_strict():
    r = Recipe.of(GIVEN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epochs = 1
    with pytest.raises(ValueError, match="unknown recipe key.*ema_decay"):
        Recipe.of({**GIVEN, "ema_decay": 0.999})
    with pytest.raises(ValueError, match="recipe lacks schedule"):
        Recipe.of({k: v for k, v in GIVEN.items() if k != "schedule"})


def test_values_of_a_partial_mapping_and_steps_per_epoch():
    assert value({"batch_size": 8}, "eval_batch_size") == 256 and value({"batch_size": 8}, "batch_size") == 8
    assert steps_per_epoch({"batch_size": 8}, 20) == 2 == steps_per_epoch(Recipe.of({**GIVEN, "batch_size": 8}), 20)
    assert steps_per_epoch({"batch_size": 64}, 20) == 1  # a set smaller than a batch: one partial batch
    assert steps_per_epoch({"batch_size": 2, "max_steps_per_epoch": 3}, 100) == 3
