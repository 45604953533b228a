"""Extra evaluations of finished models (a suite's ``evals:``), as ``eval`` runs of the run graph.

``val`` is what training does (the record's own metrics); every other entry of ``evals:`` becomes one ``eval``
run per (finished model, chunk) -- for ``corruptions``, a chunk is one corruption with all its severities --
so an interrupted sweep resumes per chunk and, inside a chunk, per (corruption, severity) cell
(``kdbench.robustness`` keeps one JSON cell per pair under ``<model run dir>/evals/``).

The validation and chunking below are torch-free (the suite loader uses them); :func:`run_eval` imports the
engine when an eval runs.
"""

from __future__ import annotations

from typing import Any

#: The 15 corruptions of the ImageNet-C / CIFAR-C benchmark (Hendrycks & Dietterich, ICLR 2019), in its order.
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out corruptions of the same paper.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTION_SETS = {"benchmark": BENCHMARK_CORRUPTIONS, "extra": EXTRA_CORRUPTIONS,
                   "all": BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS}
SEVERITIES = (1, 2, 3, 4, 5)
EVAL_KEYS = {"val": {"name"}, "corruptions": {"name", "set", "severities", "batch_size"}}


def corruption_names(which: str | list | tuple = "benchmark") -> tuple[str, ...]:
    """The corruption names of a set (``benchmark``, ``extra``, ``all``) or of a list of names (checked)."""
    if isinstance(which, str):
        if which not in CORRUPTION_SETS:
            raise ValueError(f"unknown corruption set {which!r}; valid: {', '.join(CORRUPTION_SETS)} "
                             "or a list of corruption names")
        return CORRUPTION_SETS[which]
    if not isinstance(which, (list, tuple)) or not which:
        raise ValueError(f"expected a set name or a non-empty list of corruption names, got {which!r}")
    valid = CORRUPTION_SETS["all"]
    for name in which:
        if name not in valid:
            raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(valid)}")
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
    return out


def chunks(entry: dict) -> list[dict]:
    """The eval runs of one checked entry (``val`` has none: training evaluates it): one per corruption."""
    if entry["name"] == "val":
        return []
    if entry["name"] == "corruptions":
        return [{**{k: v for k, v in entry.items() if k != "corruptions"}, "corruption": c}
                for c in entry["corruptions"]]
    return [dict(entry)]


def chunk_label(chunk: dict) -> str:
    return f"{chunk['name']}:{chunk['corruption']}" if "corruption" in chunk else chunk["name"]


def run_eval(spec, net, task, data, device, cell_dir, log=None) -> list[dict]:
    """Evaluate ``net`` (a finished model, eval mode) on the chunk ``spec.eval``; return metric rows
    (``{"eval", "metric", "select": "final", "value", "higher_is_better", ...}``)."""
    chunk = spec.eval or {}
    name = chunk.get("name")
    bs = int(chunk.get("batch_size") or spec.recipe.get("eval_batch_size", 256))
    from kdbench.train import loader_options

    workers = loader_options(spec.recipe, spec.resources, device)["num_workers"]  # resolves num_workers: auto
    if name == "val":  # a re-evaluation of the clean validation set (a check that a saved model loads back)
        metrics = task.evaluate(net, task.loader(data.val, bs, num_workers=workers), device)
        return [{"eval": "val", "metric": k, "select": "final", "value": float(v),
                 "higher_is_better": bool(task.metrics.get(k, True))} for k, v in metrics.items()]
    if name == "corruptions":
        from kdbench.robustness import evaluate_corruptions

        rows = evaluate_corruptions(net, task, data.val, device, corruptions=[chunk["corruption"]],
                                    severities=list(chunk["severities"]), cell_dir=cell_dir, batch_size=bs,
                                    num_workers=workers, log=log)
        return [{"eval": "corruptions", "select": "final", **r} for r in rows]
    raise ValueError(f"unknown eval {name!r}")
