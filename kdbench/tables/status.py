"""The status view (``kdbench status``): one line per run folder of a suite, with its record's (or job's) state.

It reads every record itself (a corrupt or foreign record is a row, not an error) and lays the table out in
tabulate's "simple" format without tabulate's per-cell machinery, which took most of a 10,000-run status.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from kdbench.results import RECORD_FILE, SPEC_FILE, RecordError, error_line, no_records_error, read_record, run_dirs
from kdbench.tables.records import TEACHER, seed_key


def status_table(suite_dir: str | os.PathLike, jobs: dict[str, dict] | None = None, tail: int = 0) -> str:
    """State of every run folder of a suite: run id (short), version, label, pair, seed, status, error line.

    A folder without a record yet (running, or killed before writing one) shows "no record" (label/pair/seed
    from its ``spec.json``); an unreadable record shows "corrupt" with the reason. A summary line ends it.

    ``jobs`` (``kdbench.slurm.job_states``: run id -> the latest SLURM submission, with a ``status`` of
    pending / running / completed / cancelled / timeout / failed / unknown) adds a "job" column and lets the
    scheduler speak where the record cannot: a run whose job is pending or running shows that (unless this
    very job already wrote its record); a job that ended without writing a record (cancelled, time limit,
    killed) shows the job's state and error. A record written by the job, or after it was submitted, wins.
    ``tail``: below the table, the last ``tail`` lines of the error of every run that is not ok.
    """
    suite_dir = Path(suite_dir)
    jobs = jobs or {}
    dirs = {d.name: d for d in run_dirs(suite_dir)}
    if not dirs and not jobs:
        raise no_records_error(suite_dir)
    read: dict[str, dict | RecordError | None] = {}
    for name, d in dirs.items():
        try:
            read[name] = read_record(d)
        except RecordError as e:
            read[name] = e
    suites = Counter(r["suite"] for r in read.values() if isinstance(r, dict))
    own = suite_dir.name if suite_dir.name in suites or not suites else suites.most_common(1)[0][0]
    rows = []
    for name in sorted(set(dirs) | set(jobs)):
        d = dirs.get(name)
        rec, status, err, full = None, "no record", "", ""
        got = read.get(name)
        if isinstance(got, RecordError):
            status, full = "corrupt", str(got)
        elif got is not None and got["suite"] != own:  # copied or moved here from another suite's folder
            status, full = "foreign", (f"{d / RECORD_FILE}: a record of suite {got['suite']!r}, not of {own!r}: "
                                       "copied or moved here; move it to its own suite's folder or delete it")
        elif got is not None:
            rec = got
            status, full = rec["status"], rec.get("error") or ""
        job = jobs.get(name)
        job_cell = ""
        if job:
            sched = (rec.get("scheduler") or {}) if rec else {}
            mine = rec is not None and str(sched.get("job_id")) == str(job.get("job_id"))
            newer = rec is not None and str(rec.get("finished_at") or "") >= str(job.get("submitted_at") or "~")
            requeues = sched.get("requeues") if mine else None
            job_cell = str(job.get("job_id", "")) + (f" (requeued {requeues}x)" if requeues else "")
            if job.get("status") in ("pending", "running") and not mine:
                status, full = job["status"], ""
            elif job.get("status") in ("cancelled", "timeout", "failed") and not (mine or newer):
                status, full = job["status"], job.get("error") or ""
        err = error_line(full, 100)
        info = rec if rec is not None else (got if isinstance(got, dict) else None)
        if info is None:
            try:
                info = json.loads((d / SPEC_FILE).read_text()) if d is not None else dict(job or {})
            except (OSError, ValueError):
                info = dict(job or {})
        kind = str(info.get("kind", ""))
        chunk = info.get("eval") if isinstance(info.get("eval"), dict) else {}
        if kind == "eval" and chunk:  # which evaluation: the corruption, or the eval's name
            kind = f"eval {chunk.get('corruption') or chunk.get('name', '')}"
        cells = [name[:8], info.get("suite_version", ""), kind, info.get("label", ""), info.get("pair", ""),
                 info.get("seed", ""), status] + ([job_cell] if jobs else []) + [err]
        rows.append({"key": (str(info.get("suite_version", "")), info.get("pair_index", 0),
                             info.get("kind") != TEACHER, info.get("method_index", 0), seed_key(info.get("seed")),
                             name),
                     "cells": cells, "full": full if status != "ok" else "", "status": status})
    rows.sort(key=lambda r: r["key"])
    headers = ["run", "v", "kind", "label", "pair", "seed", "status"] + (["job"] if jobs else []) + ["error"]
    table = _simple_table([r["cells"] for r in rows], headers)
    tails = []
    if tail > 0:
        for r in rows:
            lines = [ln for ln in str(r["full"]).rstrip().splitlines() if ln.strip()]
            if lines:
                c = r["cells"]
                tails.append(f"- {c[0]} {c[2]} {c[3]} {c[4]} seed {c[5]} ({r['status']}):")
                tails += ["    " + ln for ln in lines[-tail:]]
    counts = Counter(r["status"] for r in rows)
    order = ["ok", "running", "pending", "failed", "diverged", "timeout", "cancelled", "corrupt", "foreign",
             "no record"]
    summary = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: (order.index(s)
                                                                                   if s in order else 99, s)))
    middle = ("\n\nerrors (last lines):\n" + "\n".join(tails)) if tails else ""
    return f"{table}{middle}\n\n{len(rows)} run(s) in {suite_dir / 'runs'}: {summary}"


def _simple_table(rows: list[list], headers: list[str]) -> str:
    """``tabulate(rows, headers, tablefmt="simple", disable_numparse=True)``, the same text, ~5x faster.

    tabulate spends most of a 10,000-run status table on per-cell type sniffing and width measuring. For
    one-line printable cells (what status shows) the layout is simple: None -> "", cells stripped, every
    column left-aligned, as wide as its widest cell and at least its header + 2, columns joined by two spaces,
    a dashed rule under the header, lines right-stripped. The display width of a non-ASCII text (two columns
    per CJK character when wcwidth is installed) is tabulate's own: the rule of a one-cell table of it,
    measured once per distinct text. Anything else (line breaks, control or ANSI codes, non-ASCII headers,
    "True"/"False" cells that tabulate types as bool) goes to tabulate itself.
    """
    from tabulate import tabulate

    def slow() -> str:
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    known: dict[str, int] = {}  # non-ASCII texts repeat (pair names with "→"): measure each once

    def wide(c: str) -> int:
        n = known.get(c)
        if n is None:
            n = known[c] = len(tabulate([[c]], tablefmt="simple", disable_numparse=True).split("\n", 1)[0])
        return n
    texts = [["" if c is None else str(c).strip() for c in row] for row in rows]
    ncol = len(headers)
    widths = [len(h) + 2 for h in headers]
    if any(not h.isascii() or not h.isprintable() for h in headers):
        return slow()
    for row in texts:
        if len(row) != ncol:
            return slow()
        for i, c in enumerate(row):
            if c.isascii():
                if not c.isprintable() or c in ("True", "False"):
                    return slow()
                n = len(c)
            elif c.isprintable():
                n = wide(c)
            else:
                return slow()
            if n > widths[i]:
                widths[i] = n

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (w - (len(c) if c.isascii() else wide(c))) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(row) for row in texts])
