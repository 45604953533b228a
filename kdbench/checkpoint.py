"""The training loop's files in its run folder: ``checkpoint.pt`` (everything an exact resume needs, written
after every epoch) and ``log.jsonl`` (one line of metrics per epoch); the names are ``kdbench.results``'.

A checkpoint holds the run's ``run_id``, the epoch, the state dicts of the student, the method, the optimiser
and the loss scaler, and the loop's own state (:data:`LOOP_KEYS`) as plain numbers and containers, so that it is
read back with ``torch.load(weights_only=True)``: nothing in the file can run code. Both files are written
atomically (``kdbench.results.write_atomic``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdbench.results import write_atomic, write_torch_atomic

#: The loop's own state in a checkpoint: its history, best metrics, time, resumes and step-time sums.
LOOP_KEYS = ("history", "best", "best_epoch", "wall_time_s", "resumes", "step_times")
#: What a checkpoint written by :func:`write_checkpoint` holds (besides ``run_id``).
CHECKPOINT_KEYS = ("epoch", "student", "method", "optimizer", "scaler") + LOOP_KEYS


def _plain(x: Any) -> Any:
    """Numbers as Python numbers, containers as lists/dicts: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, int, float, str, type(None), Tensor)):
        return x
    item = getattr(x, "item", None)  # numpy scalars
    return item() if callable(item) else x


def write_checkpoint(path: Path, *, run_id: str | None, epoch: int, student, method, optimizer, scaler,
                     loop: dict) -> None:
    """Write the checkpoint of a finished ``epoch``; ``loop`` maps :data:`LOOP_KEYS` to the loop's state."""
    write_torch_atomic(path, {"run_id": run_id, "epoch": epoch, "student": student.state_dict(),
                              "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), **_plain({k: loop[k] for k in LOOP_KEYS})})


def restore_checkpoint(ck: dict, *, student, method, optimizer, scaler) -> dict:
    """Load a checkpoint's state dicts into the networks, the optimiser and the scaler; return the loop's state
    (:data:`LOOP_KEYS`) and the ``epoch`` it finished."""
    student.load_state_dict(ck["student"])
    method.load_state_dict(ck["method"])
    optimizer.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    return {k: ck[k] for k in ("epoch",) + LOOP_KEYS}


def read_checkpoint(path: Path, run_id: str | None, device: torch.device, warnings: list[str],
                    main: bool = True) -> dict | None:
    """The checkpoint at ``path`` to resume from, or None (none there: start from epoch 1).

    Read with ``weights_only=True``: tensors and plain containers only, nothing in the file can run code. A
    file that cannot be read that way (truncated, damaged, foreign content) is set aside under a new name,
    never deleted, with a warning (printed and appended to ``warnings``), and the run restarts; only the main
    rank (``main``) sets it aside, every rank restarts alike. A readable checkpoint of another run (its
    ``run_id`` differs: copied from another run folder) is refused: resuming it would record that run's
    numbers here.
    """
    from kdbench.models.sources import torch_file_problem

    if not path.is_file():
        return None
    try:
        problem = torch_file_problem(path)  # a damaged byte in a tensor would load silently: CRCs first
        if problem is not None:
            raise ValueError(f"not a kdbench training checkpoint: {problem}")
        ck = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
            raise ValueError("not a kdbench training checkpoint")
    except Exception as e:
        from kdbench.models.sources import _load_error

        if not main:
            return None
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        why = str(e) if isinstance(e, ValueError) and "kdbench" in str(e) else _load_error(e)
        msg = f"warning: {path}: unreadable checkpoint ({why}); set aside as {aside.name}, the run restarts"
        print(msg, file=sys.stderr, flush=True)
        warnings.append(msg)
        return None
    if run_id is not None and ck.get("run_id") != run_id:
        other = ck.get("run_id")
        where = f"of run {other}" if other else "without a run_id (an older kdbench's, or copied)"
        raise ValueError(f"{path}: checkpoint {where}, not of this run {run_id}: it was copied here; delete it "
                         f"(or move it back to its run folder) and run again")
    return ck


def write_log(path: Path, history: list[dict]) -> None:
    """``log.jsonl``: one JSON line per epoch of ``history``, rewritten whole (atomically) after every epoch."""
    write_atomic(path, "".join(json.dumps(h) + "\n" for h in history).encode())
