"""``kdbench robustness``: a corruption sweep over the finished models of a results folder, planned as the eval runs
the suite's own ``evals:`` would give (same run_ids), without the suite file."""

from __future__ import annotations

import json
from pathlib import Path

from kdbench.evals import EvalEntryError, check_eval, chunks, corruption_point
from kdbench.results import ARTIFACTS, SPEC_FILE, read_record, run_dirs
from kdbench.corruptions import SEVERITIES, check_severities, resolve_corruptions
from kdbench.suite import Suite, eval_specs, model_id, run_eval_specs, spec_from_dict, teacher_facts


def plan_sweep(suite_dir, corruptions: str | list | None = None, severities: list | None = None, *,
               suite_version: int | None = None, root: str | None = None, batch_size: int | None = None):
    """The eval runs of a corruption sweep over the finished (ok) teachers and students under ``suite_dir``
    (``<results>/<suite>``), built from their ``spec.json`` by :func:`kdbench.suite.run_eval_specs` (the same
    run_ids as the suite's own ``evals:`` would give), plus the checkpoint teachers the distill runs loaded.
    Returns a :class:`kdbench.suite.Suite` holding only those eval runs (for :func:`kdbench.scheduler.launch`).

    Everything is checked before any work, each refusal in one line: corruption names (the valid ones listed),
    severities (1-5), the suite version of the models (one version, or ``suite_version``), every model's
    checkpoint (``model.pt``; a checkpoint teacher's ``weights:`` file), a released-files folder (``root``)."""
    suite_dir = Path(suite_dir)
    names = resolve_corruptions(corruptions if corruptions is not None else "benchmark")
    try:
        sevs = check_severities(severities if severities is not None else SEVERITIES)
    except ValueError:
        bad = next(s for s in severities if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5)
        raise ValueError(f"severity {bad!r} is outside 1-5 (the benchmark's severities)") from None
    if not suite_dir.is_dir():
        raise FileNotFoundError(f"{suite_dir}: no such results folder (expected RESULTS/SUITE, e.g. "
                                "results/quickstart_robustness)")
    models = []  # (spec, run dir) of the ok teacher and distill runs
    for d in run_dirs(suite_dir):
        try:
            rec = read_record(d)
        except Exception:  # a corrupt record is not a finished model
            continue
        if rec is None or rec.get("kind") not in ("teacher", "distill") or rec.get("status") != "ok":
            continue
        sp = d / SPEC_FILE
        if not sp.is_file():
            raise FileNotFoundError(f"run {d.name} ({rec.get('label')}, {rec.get('pair')}, seed {rec.get('seed')}) "
                                    f"has no {sp}: it was not written by `kdbench run`")
        models.append((spec_from_dict(json.loads(sp.read_text())), d))
    if not models:
        raise FileNotFoundError(f"{suite_dir}: no finished teacher or student (no ok teacher/distill record); "
                                "`kdbench run SUITE.yaml` trains them first")
    versions = sorted({s.suite_version for s, _ in models})
    if suite_version is None:
        if len(versions) > 1:
            raise ValueError(f"{suite_dir} holds models of suite versions {', '.join(map(str, versions))}; the "
                             f"current one is {versions[-1]}: models of another version are not comparable, pass "
                             f"--suite-version {versions[-1]} (or another) to sweep one version")
        suite_version = versions[0]
    elif suite_version not in versions:
        raise ValueError(f"{suite_dir} has no finished model of suite version {suite_version}; versions found: "
                         f"{', '.join(map(str, versions))}")
    models = [(s, d) for s, d in models if s.suite_version == suite_version]
    for s, d in models:
        if not (d / ARTIFACTS[s.kind]).is_file():
            raise FileNotFoundError(f"run {s.run_id} ({s.label}, {s.pair}, seed {s.seed}): no checkpoint "
                                    f"{d / ARTIFACTS[s.kind]}; rerun it with `kdbench run` (delete {d} first)")
    # the suite's own data, recipe and resources: those of its distill runs (a teacher run has its own merged ones)
    distill = [s for s, _ in models if s.kind == "distill"]
    if not distill:
        raise ValueError(f"{suite_dir}: no finished distill run of suite version {suite_version}: the sweep takes "
                         "the suite's data and recipe from them")
    base = distill[0]
    task = base.task
    entry = {"name": "corruptions", "set": list(names), "severities": sevs}
    if root is not None:
        entry["root"] = str(root)
    if batch_size is not None:
        entry["batch_size"] = int(batch_size)
    try:
        checked = check_eval(entry, ("val", "corruptions"), task)
    except EvalEntryError as e:
        raise ValueError(f"--{e.key.replace('_', '-') or 'corruptions'}: {e}") from None
    if root is None:  # corrupted on the fly: the images must be large enough for the corruption library
        from kdbench.data.plugin import corruption_size_problem
        from kdbench.corruptions import MIN_SIDE

        problem = corruption_size_problem(base.data, MIN_SIDE)
        if problem:
            raise ValueError(f"{suite_dir}: {problem} (its models were trained on this data: train the suite again "
                             "with that setting to evaluate them on corrupted images)")
    if root is not None:
        from kdbench.data.cifar import cifar100c_slice

        for c in names:  # the files are there, in the released layout
            cifar100c_slice(root, c, sevs[0])
    chunk_list = chunks(checked, corruption_point(base.data))
    # a pair may set its own recipe and data (``pairs[].recipe``/``data``): its models' evals carry the pair's
    by_pair = {}
    for s in distill:
        by_pair.setdefault(s.pair_index, dict(data=s.data, recipe=s.recipe, resources=s.resources))
    common = dict(data=base.data, recipe=base.recipe, resources=base.resources)
    specs = []
    for s, _ in sorted(models, key=lambda m: (m[0].pair_index, m[0].method_index, m[0].seed)):
        specs += run_eval_specs(s, chunk_list, **by_pair.get(s.pair_index, common))
    seen = set()
    for s in distill:  # checkpoint teachers (weights:) have no run: their evals go by model_id
        t = s.teacher
        if not t or s.teacher_run or not t.get("weights"):
            continue
        mid = model_id(t)
        if mid in seen:
            continue
        seen.add(mid)
        if not Path(t["weights"]).is_file():
            raise FileNotFoundError(f"the checkpoint teacher of pair {s.pair}: no file {t['weights']}")
        specs += eval_specs(t, mid, (), {**teacher_facts(s.pair, s.pair_index), "seed": 0}, chunk_list,
                            suite=s.suite, suite_version=s.suite_version, task=task,
                            **by_pair.get(s.pair_index, common))
    return Suite(path=suite_dir, raw={"suite": base.suite, "version": suite_version, "task": task}, specs=specs)
