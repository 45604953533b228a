"""Which records a table shows, and in which order; shared by the paper, robustness, cost and status layouts.

Records of one (label, pair) that were produced by another configuration (params, recipe, data, models or
method version changed without bumping the suite version) are not mixed: the configuration of the most recent
record wins, one record per seed (the most recent) (:func:`current`).
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from kdbench.tasks import TASK_FACTS

BASELINE = "baseline"
TEACHER = "teacher"
#: Main metric per task, used when no ``ok`` record tells the metric (from the task registry's facts).
TASK_METRICS = {name: facts["primary_metric"] for name, facts in TASK_FACTS.items()}
#: Record kinds a results table is made of (stage and eval records have tables of their own).
TABLE_KINDS = ("teacher", "distill")
#: The kind of the records of extra evaluations (corruptions), read by the robustness layout.
EVAL_KIND = "eval"


def _config(rec: dict) -> dict:
    """What determines a run's numbers, seed excluded (the run_id's fields)."""
    key = {k: rec.get(k) for k in ("kind", "method", "method_version", "params", "recipe", "data")}
    key["student"] = (rec.get("student") or {}).get("model")
    key["teacher"] = (rec.get("teacher") or {}).get("model")
    return key


def _config_key(rec: dict) -> str:
    """:func:`_config` as one comparable text (sorted keys: records that differ only in key order agree)."""
    return json.dumps(_config(rec), sort_keys=True, default=str)


def seed_key(seed: Any) -> tuple:
    """Sort key of seeds: integers in order, then the others by their text."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def recency(rec: dict) -> tuple:
    """Sort key of records by when they finished (started, if they never finished), then run_id."""
    return (rec.get("finished_at") or rec.get("started_at") or "", rec.get("run_id") or "")


def current(recs: list[dict]) -> tuple[list[dict], int]:
    """The records of one cell that belong together: the newest record's configuration, newest per seed, in
    seed order; and the count of the others (ignored)."""
    if not recs:
        return [], 0
    newest = max(recs, key=recency)
    newest_repr, newest_key = repr(_config(newest)), None

    def same(r: dict) -> bool:
        nonlocal newest_key
        # equal reprs of JSON values mean the same values of the same types in the same key order, hence the same
        # _config_key; it is ~5x cheaper than serialising every record of a 10,000-run table
        if repr(_config(r)) == newest_repr:
            return True
        if newest_key is None:
            newest_key = _config_key(newest)
        return _config_key(r) == newest_key

    by_seed: dict[Any, dict] = {}
    for r in sorted((r for r in recs if same(r)), key=recency):
        by_seed[r.get("seed")] = r
    kept = sorted(by_seed.values(), key=lambda r: (seed_key(r.get("seed")), r.get("run_id") or ""))
    return kept, len(recs) - len(kept)


def metric_row(rows: list[dict], eval: str, metric: str, select: str) -> dict | None:
    """The metric row of (eval, metric, select) among a record's ``metrics`` / ``teacher_metrics``."""
    return next((m for m in rows or [] if m.get("eval") == eval and m.get("metric") == metric
                 and m.get("select") == select), None)


def order_key(r: dict) -> tuple:
    """Table order: pair, method entry (suite order), seed; teacher runs after distillation runs."""
    return (r["kind"] == TEACHER, r.get("pair_index", 0), r.get("method_index", 0), seed_key(r.get("seed")),
            r.get("run_id") or "")


def in_order(records: list[dict]) -> list[dict]:
    return sorted(records, key=order_key)


def teacher_sha_of_distill(recs: list[dict]) -> str:
    """The teacher file a pair's loaded teacher row shows: the one its newest distillation run loaded."""
    with_sha = [r for r in recs if (r.get("teacher") or {}).get("sha256")]
    return str(max(with_sha, key=recency)["teacher"]["sha256"]) if with_sha else ""


def model_records(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """ok teacher/distill records per (label, pair), newest configuration, one per seed."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["kind"] in (TEACHER, "distill"):
            out.setdefault((r["label"], r["pair"]), []).append(r)
    return {k: [r for r in current(v)[0] if r["status"] == "ok"] for k, v in out.items()}


def stat(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample std (NaN below two values) and count of the finite ``values``."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def pair_order(records: list[dict], pairs) -> list[str]:
    """``pairs`` in suite order (the smallest ``pair_index`` their records carry), then by name."""
    return sorted(pairs, key=lambda p: (min(r["pair_index"] for r in records if r["pair"] == p), p))
