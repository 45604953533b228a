"""Extra evaluations of finished models (a suite's ``evals:``), as ``eval`` runs of the run graph.

``val`` is what training does (the record's own metrics); every other entry of ``evals:`` becomes one ``eval``
run per (finished model, chunk) -- for ``corruptions``, a chunk is one corruption with all its severities --
so an interrupted sweep resumes per chunk and, inside a chunk, per (corruption, severity) cell
(``kdbench.robustness`` keeps one JSON cell per pair under ``<model run dir>/evals/``). The eval runs of one chunk
over several models may run together (``kdbench/evalgroup.py``): :func:`run_eval_models` corrupts each image once
for all of them.

The validation and chunking below are torch-free (the suite loader uses them); :func:`run_eval` imports the
engine when an eval runs.
"""

from __future__ import annotations

from typing import Any

# The corruption names, sets and severities live in kdbench.corruptions (torch-free at import): one list.
from kdbench.corruptions import ALL as _ALL
from kdbench.corruptions import SETS as CORRUPTION_SETS
from kdbench.corruptions import SEVERITIES

EVAL_KEYS = {"val": {"name"}, "corruptions": {"name", "set", "severities", "batch_size", "root"}}


def corruption_names(which: str | list | tuple = "benchmark") -> tuple[str, ...]:
    """The corruption names of a set (``benchmark``, ``extra``, ``all``, a family: ``noise``, ``blur``,
    ``weather``, ``digital``) or of a list of names (checked), in the order given (a set: its own order)."""
    if isinstance(which, str):
        if which not in CORRUPTION_SETS:
            raise ValueError(f"unknown corruption set {which!r}; valid: {', '.join(CORRUPTION_SETS)} "
                             f"or a list of corruption names ({', '.join(_ALL)})")
        return CORRUPTION_SETS[which]
    if not isinstance(which, (list, tuple)) or not which:
        raise ValueError(f"expected a set name or a non-empty list of corruption names, got {which!r}")
    for name in which:
        if name not in _ALL:
            raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(_ALL)}")
    if len(set(which)) != len(which):
        raise ValueError(f"duplicate corruption names in {list(which)}")
    return tuple(which)


class EvalEntryError(ValueError):
    """An invalid ``evals:`` entry; ``key`` is the sub-key at fault ("" for the entry itself)."""

    def __init__(self, key: str, msg: str):
        super().__init__(msg)
        self.key = key


def check_eval(entry: Any, valid_names: tuple[str, ...], task: str = "") -> dict:
    """One ``evals:`` entry (a name or a mapping) -> its normalised mapping; :class:`EvalEntryError` with the
    sub-key and the reason (the caller adds the file and the entry's key)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise EvalEntryError("", f"expected a name or a mapping with 'name:', got {entry!r}")
    name = entry["name"]
    if name not in valid_names:
        raise EvalEntryError("name", f"unknown eval {name!r}{' for ' + task if task else ''}; valid: "
                                     f"{', '.join(valid_names)}")
    unknown = sorted(set(entry) - EVAL_KEYS.get(name, {"name"}))
    if unknown:
        raise EvalEntryError(unknown[0], f"unknown key for eval {name!r}; valid keys here: "
                                         f"{', '.join(sorted(EVAL_KEYS.get(name, {'name'})))}")
    if name != "corruptions":
        return dict(entry)
    try:
        names = corruption_names(entry.get("set", "benchmark"))
    except ValueError as e:
        raise EvalEntryError("set", str(e)) from None
    sev = entry.get("severities", list(SEVERITIES))
    if not isinstance(sev, list) or not sev or not all(isinstance(s, int) and not isinstance(s, bool) for s in sev):
        raise EvalEntryError("severities", f"expected a non-empty list of integers 1-5, got {sev!r}")
    bad = [s for s in sev if s not in SEVERITIES]
    if bad:
        raise EvalEntryError("severities", f"severity {bad[0]} is outside 1-5 (the benchmark's severities)")
    out = {"name": name, "corruptions": list(names), "severities": sorted(set(sev))}
    if "batch_size" in entry:
        if not isinstance(entry["batch_size"], int) or entry["batch_size"] < 1:
            raise EvalEntryError("batch_size", f"expected a positive integer, got {entry['batch_size']!r}")
        out["batch_size"] = entry["batch_size"]
    if "root" in entry:  # released pre-corrupted files (CIFAR-100-C: <corruption>.npy + labels.npy)
        if task and task != "classification":
            raise EvalEntryError("root", f"released corruption files are read for classification only (CIFAR-100-C "
                                         f"layout), not for {task}; leave root: out to corrupt the val images")
        if not isinstance(entry["root"], str) or not entry["root"]:
            raise EvalEntryError("root", f"expected the folder of the released .npy files, got {entry['root']!r}")
        out["root"] = entry["root"]
    return out


def corruption_point(data: dict) -> str:
    """Where the suite's dataset (its ``data:`` mapping) applies corruptions: the dataset plugin's
    ``corruption_point``, read from its file without importing it (``"decoded"`` or ``"center_crop"``)."""
    from kdbench.registry import DATASETS

    info = DATASETS.info(data["name"])
    if info is not None:
        return str(info.attrs.get("corruption_point", "decoded"))
    return str(getattr(DATASETS.get(data["name"]), "corruption_point", "decoded"))


def chunks(entry: dict, point: str = "decoded") -> list[dict]:
    """The eval runs of one checked entry (``val`` has none: training evaluates it): one per corruption. A
    corruption chunk of a dataset corrupted elsewhere than the decoded image (``point``, see
    :func:`corruption_point`: ImageFolder's ``center_crop``) says so, which makes it part of the eval run's id: a
    record of the same images corrupted at another point is another run."""
    if entry["name"] == "val":
        return []
    if entry["name"] == "corruptions":
        extra = {"point": point} if point != "decoded" and not entry.get("root") else {}
        return [{**{k: v for k, v in entry.items() if k != "corruptions"}, "corruption": c, **extra}
                for c in entry["corruptions"]]
    return [dict(entry)]


def chunk_label(chunk: dict) -> str:
    return f"{chunk['name']}:{chunk['corruption']}" if "corruption" in chunk else chunk["name"]


def run_eval(spec, net, task, data, device, cell_dir, log=None, *, model_sha256: str | None = None,
             warnings: list[str] | None = None, stats: dict | None = None) -> list[dict]:
    """Evaluate ``net`` (a finished model, eval mode, loaded from the file of sha256 ``model_sha256``) on the chunk
    ``spec.eval``; return metric rows (``{"eval", "metric", "select": "final", "value", "higher_is_better",
    ...}``). Corruption cells are bound to ``model_sha256``; warnings (a cell set aside) go to ``warnings``;
    ``stats`` (a dict) receives the counts of the corruption pass (:func:`kdbench.robustness.sweep_models`)."""
    chunk = spec.eval or {}
    name = chunk.get("name")
    bs, workers = _loader_options(spec, device)
    if name == "val":  # a re-evaluation of the clean validation set (a check that a saved model loads back)
        metrics = task.evaluate(net, task.loader(data.val, bs, num_workers=workers), device)
        return [{"eval": "val", "metric": k, "select": "final", "value": float(v),
                 "higher_is_better": bool(task.metrics.get(k, True))} for k, v in metrics.items()]
    if name == "corruptions":
        from kdbench.robustness import evaluate_corruptions

        rows = evaluate_corruptions(net, task, data.val, device, corruptions=[chunk["corruption"]],
                                    severities=list(chunk["severities"]), cell_dir=cell_dir, batch_size=bs,
                                    num_workers=workers, log=log, released=chunk.get("root"),
                                    model_sha256=model_sha256, warnings=warnings,
                                    **({"stats": stats} if stats is not None else {}))
        return [{"eval": "corruptions", "select": "final", **r} for r in rows]
    raise ValueError(f"unknown eval {name!r}")


def _loader_options(spec, device) -> tuple[int, int]:
    """(batch size, loader workers) of an eval run."""
    from kdbench.recipe import Recipe, loader_options

    recipe = Recipe.of(spec.recipe)
    bs = int((spec.eval or {}).get("batch_size") or recipe.eval_batch_size)
    return bs, loader_options(recipe, spec.resources, device)["num_workers"]  # resolves num_workers: auto


def run_eval_models(spec, models: list, task, data, device, log=None) -> dict:
    """:func:`run_eval` of several models (:class:`kdbench.robustness.SweepModel`: each its network, cell folder
    and model file's sha256) on the corruption chunk ``spec.eval``, with one pass over its images: each (image,
    corruption, severity) is corrupted once for all of them (:func:`kdbench.robustness.sweep_models`). Fills each
    model's ``rows`` (or its ``error``); a failure of the shared part raises. Returns the pass's counts."""
    chunk = spec.eval or {}
    if chunk.get("name") != "corruptions":
        raise ValueError(f"eval {chunk.get('name')!r} is not evaluated in groups (only corruption chunks are)")
    from kdbench.robustness import sweep_models

    bs, workers = _loader_options(spec, device)
    stats = sweep_models(models, task, data.val, device, corruptions=[chunk["corruption"]],
                         severities=list(chunk["severities"]), batch_size=bs, num_workers=workers, log=log,
                         released=chunk.get("root"))
    for m in models:
        m.rows = [{"eval": "corruptions", "select": "final", **r} for r in m.rows]
    return stats
