"""The cost layout (``make_table(layout="cost")``): what each method costs to train, per pair, from the ``cost``
of the ok teacher and distillation records (newest configuration, one per seed)."""

from __future__ import annotations

import math

from kdbench.tables.records import BASELINE, TEACHER, model_records, pair_order, stat
from kdbench.tables.render import (check_format, csv_round, csv_text, dash, fmt_num, latex_block, latex_escape,
                                   pipe_table, pm)

FLOOR_NOTE = ("× floor: step time / (baseline step + teacher forward per step, cost.teacher_forward_s); "
              "\"—\" where the runs did not record the teacher's forward time")


#: a run ended on a busy machine when its 1-minute load exceeded the CPUs by this much (as ``kdbench bench`` says)
BUSY_MARGIN = 0.75


def busy_note(records: list[dict]) -> str:
    """A caption sentence when some runs ended with the machine's load above its CPUs (``cost.load_1m`` and
    ``cost.cpus`` of the records; records without them say nothing): their absolute times are inflated."""
    busy = [r for r in records if isinstance((r.get("cost") or {}).get("load_1m"), (int, float))
            and (r.get("cost") or {}).get("cpus") and r["cost"]["load_1m"] > r["cost"]["cpus"] + BUSY_MARGIN]
    if not busy:
        return ""
    worst = max(r["cost"]["load_1m"] for r in busy)
    return (f" Busy machine: {len(busy)} of {len(records)} run(s) ended with a load above their CPUs (up to "
            f"{worst:.1f} on {busy[0]['cost']['cpus']}): their absolute times are inflated, compare ratios within "
            "runs of one machine state.")


def cost_table(records: list[dict], fmt: str = "md", *, decimals: int = 2) -> str:
    """What each method costs (``layout="cost"``), per pair: mean over the ok seeds of the training step time
    (ms), that step relative to the baseline's step and to the floor (teacher forward + student step: the
    baseline's step plus ``cost.teacher_forward_s`` when the records hold it), the method's extra parameters,
    peak memory (MB) and wall time (s). Teacher runs are listed for reference, without ratios."""
    check_format(fmt)
    suite, version = records[0]["suite"], records[0]["suite_version"]
    models = model_records(records)
    pairs = pair_order(records, {p for _, p in models})
    fields = [("step_ms", "step (ms)"), ("x_baseline", "× baseline"), ("x_floor", "× floor"),
              ("extra_params", "extra params"), ("peak_mem_mb", "peak mem (MB)"), ("wall_time_s", "wall (s)")]
    blocks, csv_rows = [], []
    for pair in pairs:
        entries = [(lab, recs) for (lab, p), recs in models.items() if p == pair and recs]
        entries.sort(key=lambda e: (e[0] != TEACHER, min(r.get("method_index", 0) for r in e[1]), e[0]))

        def mean_of(recs, key):
            return stat([float((r.get("cost") or {}).get(key)) for r in recs
                         if isinstance((r.get("cost") or {}).get(key), (int, float))])

        base = next((recs for lab, recs in entries if lab == BASELINE), None) or \
            next((recs for lab, recs in entries if recs[0]["method"] == BASELINE and recs[0]["kind"] != TEACHER), None)
        base_step = mean_of(base, "step_time_s")[0] if base else math.nan
        rows = []
        for lab, recs in entries:
            step = mean_of(recs, "step_time_s")
            tf = mean_of(recs, "teacher_forward_s")
            teacher_row = recs[0]["kind"] == TEACHER
            floor = base_step + tf[0] if tf[2] and math.isfinite(base_step) else math.nan
            vals = {"step_ms": (1000 * step[0], 1000 * step[1], step[2]),
                    "x_baseline": ((step[0] / base_step, math.nan, step[2])
                                   if step[2] and base_step and math.isfinite(base_step) and not teacher_row
                                   else (math.nan, math.nan, 0)),
                    "x_floor": ((step[0] / floor, math.nan, step[2]) if step[2] and math.isfinite(floor)
                                and not teacher_row else (math.nan, math.nan, 0)),
                    "extra_params": mean_of(recs, "extra_params"), "peak_mem_mb": mean_of(recs, "peak_mem_mb"),
                    "wall_time_s": mean_of(recs, "wall_time_s")}
            rows.append((lab, recs[0]["method"], len(recs), vals))
        if fmt == "csv":
            for lab, method, n, vals in rows:
                for key, _ in fields:
                    m, sd, k = vals[key]
                    csv_rows.append({"suite": suite, "suite_version": version, "pair": pair, "row": lab,
                                     "method": method, "column": key, "mean": csv_round(m) if k else None,
                                     "std": csv_round(sd) if k > 1 and math.isfinite(sd) else None, "n": k})
            continue

        def show(key, m, sd, k):
            if not k or not math.isfinite(m):
                return dash(fmt)
            if key in ("x_baseline", "x_floor"):
                return f"{m:.2f}×" if fmt == "md" else f"{m:.2f}$\\times$"
            if key == "extra_params":
                return f"{int(round(m)):,}"
            d = 1 if key in ("peak_mem_mb", "wall_time_s") else decimals
            core = fmt_num(m, d, fmt)
            if k > 1 and math.isfinite(sd):
                core += pm(fmt) + fmt_num(sd, d, fmt)
            return core

        headers = ["Method"] + [h for _, h in fields] + ["n"]
        body = [[lab if fmt == "md" else latex_escape(lab)] + [show(key, *vals[key]) for key, _ in fields] + [str(n)]
                for lab, method, n, vals in rows]
        caption = (f"{suite} v{version}, {pair}: training cost, mean ± std over ok seeds. × baseline: step time / "
                   "the baseline's step. " + FLOOR_NOTE + ". Extra params: parameters the method trains besides "
                   "the student. Teacher: its own training run, no ratio." + busy_note([r for _, recs in entries
                                                                                        for r in recs]))
        if fmt == "md":
            blocks.append(pipe_table(body, headers) + "\n\n" + caption)
        else:
            blocks.append(latex_block(caption, headers, body))
    if fmt == "csv":
        return csv_text(csv_rows, ["suite", "suite_version", "pair", "row", "method", "column", "mean", "std", "n"])
    if not blocks:
        raise ValueError("no ok teacher or distillation record to take costs from")
    return "\n\n".join(blocks)
