"""Run records: the schema, atomic writes, reading back, and loading a suite's records into pandas.

One JSON record per run at ``<results>/<suite>/runs/<run_id>/record.json`` (DESIGN.md §5). It is written
once, atomically, when the run ends whatever the outcome, so a reader sees either the previous complete
record or the new complete one, never a partial file.

This module is torch-free (pandas only) so that ``kdbench table`` and ``kdbench status`` stay fast.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # pandas is imported where frames are built: `kdbench table/status` never need it
    import pandas as pd

RECORD_SCHEMA = 1
STATUSES = ("ok", "failed", "diverged", "timeout")
KINDS = ("teacher", "stage", "distill", "eval")
LAYOUT = "<results>/<suite>/runs/<run_id>/record.json"

# The files of a run folder (``run_dir``); every module asks for them here.
RECORD_FILE = "record.json"  # the run's record, written once when it ends
SPEC_FILE = "spec.json"  # the RunSpec as plain data
MODEL_FILE = "model.pt"  # a teacher or distill run's trained network (state dict)
STAGE_FILE = "stage.pt"  # a stage run's tensors
CHECKPOINT_FILE = "checkpoint.pt"  # the training loop's last epoch (kdbench/checkpoint.py)
LOG_FILE = "log.jsonl"  # one line per trained epoch
PROGRESS_FILE = "progress.json"  # live progress (kdbench/progress.py)
EVALS_DIR = "evals"  # corruption cells of the evaluated run (kdbench/robustness.py)
LOCK_FILE = ".lock"  # held by whoever runs the run (kdbench/runner.py: run_lock)
#: the suite as `kdbench run` read it (overrides applied), one per suite version, beside the runs:
#: ``<results>/<suite>/suite-v<version>.json`` (``kdbench check`` reads its references)
SUITE_SNAPSHOT = "suite-v{version}.json"

#: Keys every record carries (schema 1). ``write_record`` refuses a record that lacks one.
REQUIRED_KEYS = (
    "schema", "run_id", "kind", "suite", "suite_version", "task", "method", "label", "method_index",
    "method_version", "params", "pair", "pair_index", "teacher", "student", "seed", "recipe", "data", "status",
    "error", "metrics", "teacher_metrics", "reference", "cost", "env", "scheduler", "started_at", "finished_at",
)
METRIC_KEYS = ("eval", "metric", "select", "value", "higher_is_better")
#: Optional keys of a metric row (eval records of corruptions), kept as columns of :func:`metrics_frame`.
METRIC_OPTIONAL_KEYS = ("corruption", "severity", "source")
_METRIC_KEYSET = frozenset(METRIC_KEYS)

#: Columns of the frames returned by :func:`load_records` (in this order; extra columns never appear).
RUN_COLUMNS = (
    "run_id", "kind", "suite", "suite_version", "task", "method", "label", "method_index", "method_version",
    "pair", "pair_index", "seed", "status", "error", "error_line", "params", "teacher_model", "teacher_weights",
    "teacher_sha256", "teacher_params", "teacher_run", "student_model", "student_params", "wall_time_s",
    "step_time_s", "peak_mem_mb", "extra_params", "reference", "git_sha", "git_dirty", "device", "started_at",
    "finished_at", "path",
)
#: Run fields joined onto every metric row.
JOINED_RUN_FIELDS = ("kind", "suite", "suite_version", "task", "method", "label", "method_index",
                     "method_version", "pair", "pair_index", "seed", "status")
METRIC_COLUMNS = (("run_id", "eval", "metric", "select", "value", "higher_is_better") + JOINED_RUN_FIELDS
                  + ("target",) + METRIC_OPTIONAL_KEYS)


class RecordError(ValueError):
    """A record that is missing, corrupt, partial or does not follow the schema."""


# ------------------------------------------------------------------------------------------- layout
def suite_snapshot_path(suite_dir: str | os.PathLike, version: Any) -> Path:
    """Where the suite of version ``version`` is kept beside its runs (:data:`SUITE_SNAPSHOT`)."""
    return Path(suite_dir) / SUITE_SNAPSHOT.format(version=version)


def read_suite_snapshot(suite_dir: str | os.PathLike, version: Any) -> dict | None:
    """The suite kept beside the runs of ``version``, or None when there is none (results of an older kdbench, or
    copied without it); a file that is not a JSON object raises naming it."""
    path = suite_snapshot_path(suite_dir, version)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not a suite snapshot ({e}); delete it, `kdbench run` writes it again") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a suite snapshot (a JSON object); delete it, `kdbench run` writes it again")
    return data


def run_dir(results: str | os.PathLike, suite: str, run_id: str) -> Path:
    """The folder of one run: ``<results>/<suite>/runs/<run_id>`` (the one place this layout is spelled)."""
    return Path(results) / suite / "runs" / run_id


def run_dir_for(results: str | os.PathLike, spec: Any) -> Path:
    """The folder of a RunSpec's run."""
    return run_dir(results, spec.suite, spec.run_id)


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_record(spec: Any, *, status: str = "failed", error: str | None = None, scheduler: Mapping | None = None,
               started: bool = True) -> dict:
    """The record of a RunSpec before (or without) its numbers: every schema key, from the spec.

    The runner fills in metrics, cost and env and sets the status; a job that died without writing a record
    gets this one with ``status`` and ``error`` (``started=False``: no start time). Eval records carry
    ``target`` (the evaluated model's run_id) and the ``eval`` chunk; stage and distill records ``needs``.
    """
    rec: dict[str, Any] = {
        "schema": RECORD_SCHEMA, "run_id": spec.run_id, "kind": spec.kind, "suite": spec.suite,
        "suite_version": spec.suite_version, "task": spec.task, "method": spec.method, "label": spec.label,
        "method_index": spec.method_index, "method_version": spec.method_version, "params": spec.params,
        "pair": spec.pair, "pair_index": spec.pair_index, "teacher": spec.teacher,
        "student": {"model": spec.student["model"], "params": None}, "seed": spec.seed, "recipe": spec.recipe,
        "data": spec.data, "needs": list(spec.needs), "status": status,
        "error": None if error is None else str(error)[-4000:], "metrics": [], "teacher_metrics": [],
        "reference": list(spec.reference), "cost": {}, "env": {}, "scheduler": dict(scheduler or {}),
        "started_at": _now() if started else None, "finished_at": None,
    }
    if spec.kind == "eval":
        rec["target"] = spec.target
        rec["eval"] = spec.eval
    return rec


def finish_record(run_dir_: str | os.PathLike, record: dict) -> dict:
    """Stamp ``finished_at`` and write the record (atomically); return it."""
    record["finished_at"] = _now()
    write_record(run_dir_, record)
    return record


def write_spec(run_dir_: str | os.PathLike, spec: Any) -> None:
    """``spec.json`` of a run: the RunSpec as plain data (what a job is given, kept next to its record)."""
    write_json_atomic(Path(run_dir_) / SPEC_FILE, spec.to_dict())


# ------------------------------------------------------------------------------------------- writing
def _json_default(x: Any) -> Any:
    """Serialise the few non-JSON types a record may pick up (paths, numpy/torch scalars, sets)."""
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=str)
    item = getattr(x, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{type(x).__name__} is not JSON serialisable: {x!r}")


#: A temporary file of :func:`write_atomic`: ``.<name>.<host>-<pid>.<random>.tmp`` next to the file it will
#: become: its writer's host and pid tell :func:`clean_stale_temps` a dead writer's file from a live one's (a
#: results folder on a shared filesystem is written from several hosts).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
#: Temporary names of kdbench before the one scheme (``<name>.tmp<pid>[.<n>]``, ``.<name>.<random>.tmp``).
OLD_TEMP_NAME = re.compile(r"\.tmp\d+(\.\d+)?$|^\..+\.tmp$")
#: a temporary file of a process that is still alive (or of another host) is left alone until it is this old
STALE_TMP_S = 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for ``path``, in its folder (:data:`TEMP_NAME`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_atomic(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], None], *,
                 durable: bool = True) -> None:
    """Write a file atomically: a reader sees the old file or the new one, never a part; the one way kdbench
    writes the files of a run folder (records, checkpoints, models, logs, progress, eval cells).

    ``content`` (bytes, or a function that writes into the open binary file) goes to a temporary file in the
    same folder (:func:`temp_path`), flushed and, when ``durable``, fsynced; then ``os.replace``-d over ``path``
    (and, when ``durable``, the folder fsynced where the filesystem allows it). If anything fails on the way
    (a full disk, an interrupt) the temporary file is removed, the error raised and an existing ``path`` left
    untouched. The folder must exist.
    """
    path = Path(path)
    while True:
        tmp = temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover  (4 random bytes of one process: never in practice)
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not possible on every platform/filesystem."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON (paths, numpy scalars and sets converted) to ``path`` atomically
    (:func:`write_atomic`); the folder is created if needed."""
    text = json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"))


def write_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`write_atomic`; torch is imported here, not with this
    module). A full disk surfaces as the ``OSError`` it is (torch's own writer reports it as a RuntimeError
    from its C++ stream)."""
    import torch

    def save(fh: BinaryIO) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError as e:
            cause = e.__cause__ or e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e

    write_atomic(path, save)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`write_atomic` in ``folder`` whose writer died (a pid of this host
    that is gone) or that are older than :data:`STALE_TMP_S`, and those of an older kdbench's names
    (:data:`OLD_TEMP_NAME`) older than :data:`STALE_TMP_S`; return them. Called by whoever holds the run's
    lock, so no live writer of this run is interrupted."""
    folder = Path(folder)
    removed = []
    host = _host()
    for p in folder.iterdir() if folder.is_dir() else ():
        m = TEMP_NAME.match(p.name)
        if (m is None and OLD_TEMP_NAME.search(p.name) is None) or not p.is_file():
            continue
        try:
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            continue
        dead = m is not None and m.group("host") == host and not _alive(int(m.group("pid")))
        if dead or age > STALE_TMP_S:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def prepare_output(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Make the folder of an output file (``kdbench table --out``, ``bench --out``); a path through an existing
    file, or naming a folder, is refused in one line naming the flag and the offending path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: a folder; name a file (e.g. {path / 'table.md'})")
    for p in path.parents:
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is a file, not a folder; name a file in a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def validate_record(record: Mapping, where: str = "record") -> None:
    """Raise :class:`RecordError` naming every problem if ``record`` does not follow schema 1."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    problems = []
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if "schema" in record and record["schema"] != RECORD_SCHEMA:
        problems.append(f"schema is {record['schema']!r}, this kdbench reads schema {RECORD_SCHEMA}")
    if "status" in record and record["status"] not in STATUSES:
        problems.append(f"status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if "kind" in record and record["kind"] not in KINDS:
        problems.append(f"kind {record['kind']!r} is not one of {', '.join(KINDS)}")
    if "error" in record and record["error"] is not None and not isinstance(record["error"], str):
        problems.append("error must be a string or null")
    for field in ("metrics", "teacher_metrics"):
        rows = record.get(field)
        if field in record and not isinstance(rows, list):
            problems.append(f"{field} must be a list")
            continue
        for i, row in enumerate(rows or []):
            if type(row) is dict and _METRIC_KEYSET <= row.keys() and (  # the common case, no ABC isinstance
                    type(row["value"]) in (float, int) or row["value"] is None):
                continue
            lacking = [k for k in METRIC_KEYS if not isinstance(row, Mapping) or k not in row]
            if lacking:
                problems.append(f"{field}[{i}] lacks {', '.join(lacking)}")
            elif not _is_number(row["value"]):
                problems.append(f"{field}[{i}] ({row.get('metric')}) value {row['value']!r} is not a number")
    if "reference" in record and not isinstance(record["reference"], list):
        problems.append("reference must be a list")
    if problems:
        raise RecordError(f"{where}: invalid record: " + "; ".join(problems))


def _is_number(x: Any) -> bool:
    """A metric value: an int or float (NaN included: a diverged metric) or null; never a string or a bool."""
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def write_record(run_dir: str | os.PathLike, record: Mapping) -> Path:
    """Validate ``record`` and write it atomically to ``run_dir/record.json``; return the file's path."""
    path = Path(run_dir) / RECORD_FILE
    validate_record(record, where=str(path))
    write_json_atomic(path, dict(record))
    return path


# ------------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while many records are parsed (restored afterwards).

    Parsing 10,000 records makes millions of dicts and lists that all stay alive; the collector keeps
    rescanning them, which took 30-50 % of the parse time. Parsed JSON holds no reference cycles, so nothing
    is left for the collector to find: pausing it changes no result.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """The record of ``run_dir``, or None when the run has none (yet).

    A file that is not valid JSON (truncated, corrupt) or not a schema-1 record raises :class:`RecordError`
    naming the file, so that a bad record is never mistaken for a missing one.
    """
    # run_dirs() hands Paths (already normalised: joining their text is the same path, ~4x cheaper)
    path = os.path.join(run_dir, RECORD_FILE) if isinstance(run_dir, Path) else str(Path(run_dir) / RECORD_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: corrupt or partial record (not UTF-8: {e.reason}); "
                          "delete it to rerun this run") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: corrupt or partial record ({e.msg} at line {e.lineno} column {e.colno}); "
                          "delete it to rerun this run") from None
    validate_record(record, where=str(path))
    _check_place(record, Path(run_dir), path)
    return record


def _check_place(record: Mapping, run_dir: Path, path: Path) -> None:
    """A record belongs to the folder it sits in (``<suite>/runs/<run_id>``): one copied or moved from another
    run would put that run's numbers under this one's name. Refused, naming the file."""
    if run_dir.parent.name != "runs":  # not in the results layout (a record read from elsewhere)
        return
    if record["run_id"] != run_dir.name:
        raise RecordError(f"{path}: record of run {record['run_id']} (suite {record['suite']!r}), not of this "
                          f"folder's run {run_dir.name}: it was copied or moved here; move it back or delete it")


def check_one_suite(records: list[Mapping], suite_dir: str | os.PathLike) -> None:
    """The records of one suite folder are of one suite: a record of another suite placed in its ``runs/`` is
    refused, naming the file (the folder's own suite is the one named like the folder, else the most common).
    Records carry ``_path`` (as :func:`load_records` adds it) or are named by run_id."""
    from collections import Counter

    counts = Counter(r.get("suite") for r in records)
    if len(counts) <= 1:
        return
    name = Path(suite_dir).name
    own = name if name in counts else counts.most_common(1)[0][0]
    odd = [r for r in records if r.get("suite") != own]
    files = ", ".join(str(r.get("_path") or Path(suite_dir) / "runs" / str(r.get("run_id")) / RECORD_FILE)
                      for r in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
    raise RecordError(f"{files}: record(s) of suite {odd[0].get('suite')!r} among the records of suite {own!r} in "
                      f"{suite_dir}: copied or moved here; move them to their own suite's folder or delete them")


def run_dirs(suite_dir: str | os.PathLike) -> list[Path]:
    """Every run folder of a suite (with or without a record yet), sorted by name."""
    runs = os.path.join(suite_dir, "runs")
    try:
        with os.scandir(runs) as it:  # scandir knows folders from the directory listing: no stat per run
            names = sorted(e.name for e in it if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = Path(runs)
    return [base / n for n in names]


def iter_records(suite_dir: str | os.PathLike) -> Iterator[dict]:
    """Yield the records under ``suite_dir/runs/*/record.json`` in run-folder order.

    Run folders without a record (a run in progress or killed) are skipped; a corrupt record raises.
    """
    for d in run_dirs(suite_dir):
        rec = read_record(d)
        if rec is not None:
            yield rec


# ------------------------------------------------------------------------------------------- artifacts
#: The file each kind of run leaves for the runs that need it.
ARTIFACTS = {"teacher": MODEL_FILE, "distill": MODEL_FILE, "stage": STAGE_FILE}


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_entry(path: str | os.PathLike) -> dict:
    """What a record keeps of the file its run left: name, size and sha256 (``record["artifact"]``)."""
    path = Path(path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def artifact_problem(run_dir_: str | os.PathLike, record: Mapping) -> str | None:
    """Why the artifact of an ``ok`` run cannot be used (missing, or not a readable torch file), else None.

    A file whose sha256 is the recorded one is fine. One that differs but is an intact torch archive (zip,
    every CRC right) was replaced: it is not rebuilt here; the runs that load it compare the hash and refuse
    it, naming the file. Torch-free: torch files are zip archives.
    """
    import zipfile

    name = ARTIFACTS.get(record.get("kind"))
    if name is None:
        return None
    path = Path(run_dir_) / name
    if not path.is_file():
        return f"{path} is missing"
    want = (record.get("artifact") or {}).get("sha256")
    if want is None:  # a record from before artifacts were recorded: the file is there
        return None
    if file_sha256(path) == want:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"{path} is corrupt ({type(e).__name__}: {e})"
    return f"{path} is corrupt (CRC error in {bad})" if bad else None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a model file given by path (a checkpoint teacher's ``weights:``), None when there is no such
    file; cached per (path, size, mtime) so that a sweep's many eval runs hash one file once."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def current_sha256(results: str | os.PathLike, suite: str, run_id: str) -> str | None:
    """sha256 of the file the run ``run_id`` left (its ok record's ``artifact``), None when it has no ok record
    or recorded no artifact."""
    try:
        rec = read_record(run_dir(results, suite, run_id))
    except RecordError:
        return None
    if rec is None or rec.get("status") != "ok":
        return None
    return (rec.get("artifact") or {}).get("sha256")


def _model_now(results: str | os.PathLike, suite: str, run: str | None, model: Mapping | None) -> str | None:
    """sha256 of the model file a run loads now: the ok record's artifact of ``run`` (a suite-trained model), else
    the file at ``model["weights"]`` (a checkpoint)."""
    if run:
        return current_sha256(results, suite, run)
    weights = (model or {}).get("weights")
    return weights_sha256(weights) if weights else None


def binding_problem(results: str | os.PathLike, spec: Any, record: Mapping) -> str | None:
    """Why an ok record no longer describes the model file it depends on, else None.

    Every number is bound to the sha256 of the model file it was measured on or trained with: an ``eval`` record
    to the evaluated model (``student.sha256``), a ``stage`` or ``distill`` record to its teacher
    (``teacher.sha256``). When that file has been replaced since (a teacher retrained in its folder, a checkpoint
    overwritten under the same path), the record is of another model. Eval and stage records are then stale
    (redone); a distill record is kept unless the user asks to rerun it (``kdbench run --rerun-replaced``), and
    flagged in the tables. None when the dependency has no ok record or file now (the run that needs it waits)."""
    if spec.kind == "eval":
        had = (record.get("student") or {}).get("sha256")
        now = _model_now(results, spec.suite, spec.target if spec.needs else None, spec.student)
        what = "the evaluated model"
    elif spec.kind in ("stage", "distill") and spec.teacher is not None:
        had = (record.get("teacher") or {}).get("sha256")
        now = _model_now(results, spec.suite, spec.teacher_run, spec.teacher)
        what = "its teacher"
    else:
        return None
    if now is None or had == now:
        return None
    return (f"{what}'s file was replaced since (sha256 {str(had)[:12]} recorded, {now[:12]} now)")


def no_records_error(suite_dir: str | os.PathLike) -> FileNotFoundError:
    """The error for a folder without records: names the path, the expected layout, and nearby suites."""
    suite_dir = Path(suite_dir)
    msg = f"no run records under {suite_dir}: expected {LAYOUT} (pass the suite's folder, e.g. results/<suite>)"
    if suite_dir.is_dir():
        inner = sorted(p.name for p in suite_dir.iterdir() if (p / "runs").is_dir())
        committed = sorted(p.name for p in suite_dir.iterdir() if p.is_file() and p.suffix in (".md", ".csv", ".tex"))
        if inner:
            msg += f"; {suite_dir} looks like a results folder holding suite(s): {', '.join(inner)}"
        elif committed and not (suite_dir / "runs").is_dir():
            msg = (f"{suite_dir} holds tables ({', '.join(committed)}) but no run records: the suite has not been "
                   f"run here (run records are not committed). Read those files, or run the suite first: "
                   f"`kdbench run {suite_dir.name}` writes {suite_dir}/runs/ and the tables come from it")
    else:
        msg += f"; {suite_dir} does not exist"
    return FileNotFoundError(msg)


def error_line(error: str | None, width: int = 160) -> str:
    """The one informative line of an error text: the exception line of a traceback, else its first line.

    Records keep the tail of a traceback; its first line ("Traceback ...", or a cut-off frame) says nothing,
    so the line naming the exception (the first unindented line after the last frame) is returned.
    """
    if not error:
        return ""
    lines = [ln.rstrip() for ln in str(error).splitlines()]
    frame = max((i for i, ln in enumerate(lines)
                 if ln.startswith("Traceback (most recent call last)") or ln.lstrip().startswith('File "')),
                default=None)
    if frame is None:  # a tail cut inside a frame: the frames are the indented lines
        frame = next((i for i, ln in enumerate(lines) if ln[:1].isspace() and ln.strip()), None)
    found = ""
    if frame is not None:
        found = next((ln for ln in lines[frame + 1:] if ln.strip() and not ln[:1].isspace()), "")
    if not found:
        found = next((ln.strip() for ln in lines if ln.strip()), "")
    return found if len(found) <= width else found[: width - 1] + "…"


# ------------------------------------------------------------------------------------------- frames
def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def run_row(record: Mapping, path: str | os.PathLike | None = None) -> dict:
    """One record flattened to the fields of :data:`RUN_COLUMNS`."""
    teacher = record.get("teacher") or {}
    student = record.get("student") or {}
    cost = record.get("cost") or {}
    env = record.get("env") or {}
    return {
        **{k: record.get(k) for k in ("run_id", "kind", "suite", "suite_version", "task", "method", "label",
                                      "method_index", "method_version", "pair", "pair_index", "seed", "status",
                                      "error")},
        "error_line": error_line(record.get("error")),
        "params": dict(record.get("params") or {}),
        "teacher_model": teacher.get("model"), "teacher_weights": teacher.get("weights"),
        "teacher_sha256": teacher.get("sha256"), "teacher_params": teacher.get("params"),
        "teacher_run": teacher.get("run"),
        "student_model": student.get("model"), "student_params": student.get("params"),
        "wall_time_s": _num(cost.get("wall_time_s")), "step_time_s": _num(cost.get("step_time_s")),
        "peak_mem_mb": _num(cost.get("peak_mem_mb")), "extra_params": cost.get("extra_params"),
        "reference": list(record.get("reference") or []),
        "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"), "device": env.get("device"),
        "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
        "path": None if path is None else str(path),
    }


def metrics_frame(records: list[Mapping], field: str = "metrics") -> pd.DataFrame:
    """Long form of ``field`` ("metrics" or "teacher_metrics"): one row per (run, eval, metric, select).

    Every row carries the run fields of :data:`JOINED_RUN_FIELDS`; for ``teacher_metrics`` they are the
    fields of the distillation run that evaluated its teacher. Rows of eval records also carry ``target``
    (the evaluated model's run_id) and, for corruptions, ``corruption``, ``severity`` and ``source`` (else None).
    """
    import pandas as pd

    rows = []
    for rec in records:
        joined = {k: rec.get(k) for k in JOINED_RUN_FIELDS}
        for m in rec.get(field) or []:
            rows.append({"run_id": rec.get("run_id"), "eval": m["eval"], "metric": m["metric"],
                         "select": m["select"], "value": _num(m["value"]),
                         "higher_is_better": bool(m["higher_is_better"]), **joined, "target": rec.get("target"),
                         **{k: m.get(k) for k in METRIC_OPTIONAL_KEYS}})
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def records_to_frames(records: list[Mapping]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, metrics)`` frames of in-memory records (see :func:`load_records`)."""
    import pandas as pd

    runs = pd.DataFrame([run_row(r, r.get("_path")) for r in records], columns=list(RUN_COLUMNS))
    return runs, metrics_frame(records)


def load_records(suite_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load a suite's records into two pandas frames.

    * ``runs``: one row per record, columns :data:`RUN_COLUMNS` (teacher/student/cost/env flattened;
      ``params`` and ``reference`` kept as dict/list; ``error_line`` is the exception line of ``error``;
      ``path`` the record file).
    * ``metrics``: long form, one row per (run, eval, metric, select), columns :data:`METRIC_COLUMNS`
      (value, higher_is_better and the run fields joined).

    Raises FileNotFoundError naming the path and the expected layout when there is no record.
    """
    return records_to_frames(load_suite_records(suite_dir, paths=True))


# ------------------------------------------------------------------------------------------- one suite's records
def load_suite_records(suite_dir: str | os.PathLike, kinds: tuple[str, ...] = KINDS, *,
                       paths: bool = False) -> list[dict]:
    """The records of ``kinds`` under ``suite_dir/runs``, in run-folder order (``paths``: each with its file as
    ``_path``). Records of another suite among them are refused (:func:`check_one_suite`); none at all raises
    FileNotFoundError naming the path and the expected layout."""
    records = []
    with gc_paused():  # 10,000 records are millions of live containers (see gc_paused)
        for d in run_dirs(suite_dir):
            rec = read_record(d)
            if rec is not None and rec.get("kind") in kinds:
                records.append({**rec, "_path": str(d / RECORD_FILE)} if paths else rec)
    if not records:
        raise no_records_error(suite_dir)
    check_one_suite(records, suite_dir)
    return records


def one_version(records: list[dict], suite_dir: str | os.PathLike, suite_version: int | None) -> list[dict]:
    """The records of ``suite_version``; with None, all of them when they are of one version (numbers of
    different versions are not comparable: several versions without a choice are refused)."""
    versions = sorted({r["suite_version"] for r in records}, key=str)
    if suite_version is None:
        if len(versions) > 1:
            raise ValueError(f"{suite_dir} holds records of suite versions {', '.join(map(str, versions))}; "
                             "numbers of different versions are not comparable: pass suite_version=N "
                             "(CLI: --suite-version N)")
        return records
    chosen = [r for r in records if r["suite_version"] == suite_version]
    if not chosen:
        raise ValueError(f"{suite_dir} has no record of suite version {suite_version}; versions found: "
                         f"{', '.join(map(str, versions))}")
    return chosen


def higher_is_better(records: list[Mapping], metric: str, eval: str) -> bool:
    """Whether higher ``metric`` (of evaluation ``eval``) is better, as the records' metric rows and teacher
    metric rows say (True when none says); records that disagree are refused."""
    flags = {bool(m["higher_is_better"]) for r in records
             for m in (r.get("metrics") or []) + (r.get("teacher_metrics") or [])
             if m["metric"] == metric and m["eval"] == eval}
    if len(flags) > 1:
        raise ValueError(f"records disagree on whether higher {metric!r} is better")
    return flags.pop() if flags else True
