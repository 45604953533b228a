"""Eval groups: the eval runs of several finished models on the same chunk, run as one job with one corruption pass.

The eval runs of a suite that share the data (dataset and options), the chunk (one corruption with its severities,
its batch size, its released-files folder or corruption point), the recipe and the resources evaluate the same
images under the same corruptions; only the evaluated model differs. A group runs them in one process
(:func:`kdbench.runner.run_eval_group`): each (image, corruption, severity) is corrupted once
(:func:`kdbench.robustness.sweep_models`) and every model of the group that still needs that cell is evaluated on
the same corrupted batches, one model at a time. Members keep their own run_id, record and corruption cells
(``<evaluated run dir>/evals/``), with exactly the numbers they get alone: the pixels are the same
(:func:`kdbench.corruptions.corrupt` is seeded per image), and so is each model's evaluation of them. A cell a
model already has is reused as always; a model that finishes later forms a later group of its own. The record's
``corruption_pass`` says how many images the group's pass corrupted in its process and by how many models each was
shared.

Which eval runs form groups is decided where the cohorts of distill runs are (:func:`groups` gives both:
:mod:`kdbench.cohort` for distill runs, :func:`eval_group_key` for eval runs); ``kdbench run --cohort off``
(``KDBENCH_COHORT=off``) turns both off, ``KDBENCH_EVAL_GROUPS=off`` only the eval groups. Size: at most
``resources.cohort_size`` (default :data:`kdbench.cohort.DEFAULT_SIZE`) models per group. Memory: every model of
a group is held at once (on the GPU, for a GPU run), the activations of one model's batch at a time, and one batch
of corrupted images.

Grouped are the corruption chunks (generated or released) only: ``val`` re-evaluations corrupt nothing.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from kdbench.cohort import cohort_id, cohort_key, cohort_size, group_by
from kdbench.cohort import enabled as cohorts_enabled

if TYPE_CHECKING:  # pragma: no cover
    from kdbench.suite import RunSpec

#: ``KDBENCH_EVAL_GROUPS=off`` evaluates every model alone (its own corruption pass) while cohorts stay on
ENV = "KDBENCH_EVAL_GROUPS"


def enabled() -> bool:
    """Eval groups are formed unless ``KDBENCH_COHORT=off`` (``--cohort off``) or ``KDBENCH_EVAL_GROUPS=off``."""
    return cohorts_enabled() and os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def group_size(spec: RunSpec) -> int:
    if not enabled():
        return 1
    return cohort_size(spec)


def eval_group_key(spec: RunSpec) -> str | None:
    """What the members of an eval group share: everything of an eval run but the evaluated model (its spec,
    ``target`` and ``needs``); None for a run that never joins one."""
    if spec.kind != "eval" or (spec.eval or {}).get("name") != "corruptions" or group_size(spec) < 2:
        return None
    return json.dumps({"suite": spec.suite, "suite_version": spec.suite_version, "task": spec.task,
                       "data": spec.data, "eval": spec.eval, "recipe": spec.recipe, "resources": spec.resources},
                      sort_keys=True, default=str)


def _key(spec: RunSpec) -> str | None:
    c = cohort_key(spec)
    if c is not None:
        return "cohort " + c
    e = eval_group_key(spec)
    return None if e is None else "eval " + e


def groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """``specs`` grouped into what runs together: the cohorts of distill runs (:func:`kdbench.cohort.cohorts`,
    the same groups) and the eval groups (:func:`eval_group_key`), in the order of their first run; a run that joins
    none is a group of one. Each group holds at most its runs' ``cohort_size``."""
    return group_by(specs, _key, lambda s: cohort_size(s) if s.kind == "distill" else group_size(s))


def is_eval_group(group: list[RunSpec]) -> bool:
    return len(group) > 1 and all(s.kind == "eval" for s in group)


def group_id(specs: list[RunSpec]) -> str:
    """A short name of an eval group: a digest of its members' run_ids (as a cohort's)."""
    return cohort_id(specs)


def deferred(todo: list[RunSpec]) -> list[RunSpec]:
    """``todo`` (in the graph's order) with the eval runs that no run needs moved to the end, when eval groups are
    on: the debug walk then evaluates each chunk once for every model it trains (their passes shared), instead of
    each model as soon as it is trained. The order is otherwise kept."""
    if not enabled():
        return list(todo)
    needed = {n for s in todo for n in s.needs}
    last = [s for s in todo if s.kind == "eval" and s.run_id not in needed]
    ids = {s.run_id for s in last}
    return [s for s in todo if s.run_id not in ids] + last


def run_group(group: list[RunSpec], results, *, requeues: int = 0, threads: int | None = None,
              shared: dict | None = None) -> list[dict]:
    """Run one group of :func:`groups` in this process: a cohort with :func:`kdbench.runner.run_cohort`, an eval
    group with :func:`kdbench.runner.run_eval_group`, a single run with :func:`kdbench.runner.run_one`; their
    records in the group's order. ``shared``: what successive eval groups of one process reuse (the data)."""
    from kdbench.runner import run_cohort, run_eval_group, run_one

    if is_eval_group(group):
        return run_eval_group(group, results, requeues=requeues, threads=threads, shared=shared)
    if len(group) > 1:
        return run_cohort(group, results, requeues=requeues, threads=threads)
    return [run_one(group[0], results, requeues=requeues, threads=threads)]
