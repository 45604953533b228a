"""Cohorts: distill runs that train on the same batches with the same teacher, run as one job.

Runs of a suite that share the teacher (model, weights file or suite-trained teacher run), the data (dataset and
options), the seed, the recipe and the resources see the same batches in the same order (the data order and
the augmentation draws are seeded from the seed, epoch and batch: ``kdbench.train``) and the same teacher
outputs. A cohort runs them in one process (:func:`kdbench.runner.run_cohort`): each batch is loaded and
augmented once and the teacher's forward is taken once, with the union of the members' taps; each member then
takes its own step in its own random stream. Members keep their own run_id, record, folder, checkpoint and
numbers; the record's ``cohort`` says which cohort ran it. Runs without a teacher (the baseline) form cohorts
of their own the same way (sharing the data only).

Size: at most ``resources.cohort_size`` runs (:data:`DEFAULT_SIZE`); ``cohort_size: 1`` or ``kdbench run
--cohort off`` (``KDBENCH_COHORT=off``) runs every run alone. Memory: the teacher is held once and its outputs
for one batch once; each member adds its student, its method's modules and their optimiser state (about four
times their parameters in fp32 with SGD momentum: weights, gradients, momentum); the activations of one
member's step at a time. A cohort of ``n`` therefore needs about ``solo + (n - 1) x 4 x (student + method
parameters) x 4 bytes``: for CIFAR students (0.1-2 M parameters) that is a few MB per member; for ResNet-18
(11.7 M) about 190 MB per member.

Distributed runs (``gpus_per_node > 1``), runs on several nodes, and teacher or stage runs are not grouped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from kdbench.suite import RunSpec

#: the largest cohort when the suite's resources do not say (``resources.cohort_size``)
DEFAULT_SIZE = 16
#: ``KDBENCH_COHORT=off`` (what ``kdbench run --cohort off`` sets) runs every run alone
ENV = "KDBENCH_COHORT"


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def cohort_size(spec: RunSpec) -> int:
    if not enabled():
        return 1
    return max(1, int(spec.resources.get("cohort_size") or DEFAULT_SIZE))


def cohort_key(spec: RunSpec) -> str | None:
    """What the members of a cohort share; None for a run that never joins one."""
    res = spec.resources or {}
    if (spec.kind != "distill" or int(res.get("gpus_per_node") or 0) > 1 or int(res.get("nodes") or 1) > 1
            or int(res.get("tasks_per_node") or 1) > 1 or cohort_size(spec) < 2):
        return None
    return json.dumps({"suite": spec.suite, "teacher": spec.teacher, "teacher_run": spec.teacher_run,
                       "data": spec.data, "seed": spec.seed, "recipe": spec.recipe, "resources": res,
                       "batch_rng": spec.batch_rng}, sort_keys=True, default=str)


def cohorts(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """``specs`` grouped into cohorts (in their order; a run that joins none is a cohort of one), each at most its
    runs' ``cohort_size``."""
    return group_by(specs, cohort_key, cohort_size)


def group_by(specs: list[RunSpec], key: Callable[[RunSpec], str | None],
             size: Callable[[RunSpec], int]) -> list[list[RunSpec]]:
    """``specs`` in groups of equal ``key`` (None: a group of one), in the order of each group's first run, a group
    closing at its first run's ``size``."""
    groups: dict[str, list[list[RunSpec]]] = {}
    out: list[list[RunSpec]] = []
    for s in specs:
        k = key(s)
        if k is None:
            out.append([s])
            continue
        chunks = groups.setdefault(k, [])
        if not chunks or len(chunks[-1]) >= size(s):
            chunks.append([])
            out.append(chunks[-1])
        chunks[-1].append(s)
    return out


def cohort_id(specs: list[RunSpec]) -> str:
    """A short name of a cohort: a digest of its members' run_ids."""
    blob = ",".join(sorted(s.run_id for s in specs))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
