"""Live progress of the runs of ``kdbench run``, across its worker processes.

Writer side (a worker): :class:`ProgressFile` keeps ``<run dir>/progress.json`` up to date while a run trains:
``{"kind", "epoch", "epochs", "step", "steps", "metric", "value", "loss", "started", "updated", "pid"}``
(``epoch`` is the epoch being trained, 1-based; ``step`` the steps of it done; ``metric``/``value`` the last
evaluated primary metric, ``loss`` the last epoch's mean training loss; times are ``time.time()`` seconds). It is
written atomically (``kdbench.results.write_atomic``) and at most once every
``KDBENCH_PROGRESS_S`` seconds (default 1) besides the last epoch, so training does not slow down.

Reader side (the scheduler's wait loop): :func:`read_progress` reads one such file (None when missing or
unreadable: a worker may be replacing it), :class:`LiveProgress` shows runs done / total, each running run's
label, pair, seed, epoch / epochs, last metric and an ETA: tqdm bars on a terminal, plain lines otherwise (stdout
not a TTY, or this process inside a SLURM job): at most one line per run every ``KDBENCH_PROGRESS_EVERY``
seconds (default 10) and only when its epoch changed. A progress file older than the walk (a previous,
interrupted invocation left it) is ignored.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from kdbench.results import PROGRESS_FILE, RECORD_FILE, write_atomic



def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


# ------------------------------------------------------------------------------------------- writer
def write_progress(run_dir: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``<run_dir>/progress.json`` atomically (never a half-written file for a reader; not
    fsynced: it is rewritten every second and worthless after a crash)."""
    try:
        write_atomic(Path(run_dir) / PROGRESS_FILE, json.dumps(state).encode(), durable=False)
    except OSError:  # progress is a convenience: a full disk or a vanished folder must not fail the run
        pass


class ProgressFile:
    """The progress of one training run, written to its folder at most every ``every_s`` seconds."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, epochs: int, steps: int, *, metric: str = "",
                 every_s: float | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.every_s = _env_float("KDBENCH_PROGRESS_S", 1.0) if every_s is None else float(every_s)
        self.enabled = enabled
        now = time.time()
        self.state = {"kind": kind, "epoch": 0, "epochs": int(epochs), "step": 0, "steps": int(steps),
                      "metric": metric, "value": None, "loss": None, "started": now, "updated": now,
                      "pid": os.getpid()}
        self._last = float("-inf")

    def update(self, *, epoch: int | None = None, step: int | None = None, value: float | None = None,
               loss: float | None = None, force: bool = False) -> None:
        """Note the new position; write the file when ``every_s`` has passed since the last write (or ``force``)."""
        if not self.enabled:
            return
        st = self.state
        if epoch is not None:
            st["epoch"] = int(epoch)
        if step is not None:
            st["step"] = int(step)
        if value is not None:
            st["value"] = float(value)
        if loss is not None:
            st["loss"] = float(loss)
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            st["updated"] = time.time()
            write_progress(self.run_dir, st)


# ------------------------------------------------------------------------------------------- reader
def read_progress(run_dir: str | os.PathLike, since: float | None = None) -> dict | None:
    """The run's progress, or None: no file, an unreadable one, or one not updated since ``since``."""
    try:
        d = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("epochs"), int) or not isinstance(d.get("epoch"), int):
        return None
    if since is not None and float(d.get("updated") or 0) < since:
        return None
    return d


def fraction(p: dict | None) -> float:
    """How much of the run is done, in [0, 1]: finished epochs plus the current epoch's steps."""
    if not p or not p.get("epochs"):
        return 0.0
    epochs, steps = int(p["epochs"]), max(1, int(p.get("steps") or 1))
    done_epochs = max(0, int(p["epoch"]) - 1) + min(1.0, int(p.get("step") or 0) / steps)
    return max(0.0, min(1.0, done_epochs / epochs))


def run_eta(p: dict | None) -> float | None:
    """Seconds left for this run at its rate so far (None before it has measurably progressed)."""
    f = fraction(p)
    if not p or f <= 0:
        return None
    spent = float(p["updated"]) - float(p["started"])
    return max(0.0, spent / f * (1 - f)) if spent > 0 else None


def expected_work(kind: str, epochs: int | None, teacher: bool, cells: int = 0) -> float:
    """A run's expected work in epochs, before anything is measured: a training run's epochs, twice that when a
    teacher's forward comes with every step (a teacher run trains a larger network: 1.5 times); a stage run one
    epoch; an eval run a tenth of one per corruption cell. The live ETA multiplies it by the steps of an epoch of
    the run's data once a run of that data has reported them, and applies the measured rate of the work done so
    far to the work left."""
    if kind in ("teacher", "distill"):
        return max(1, int(epochs or 1)) * (2.0 if teacher else 1.5 if kind == "teacher" else 1.0)
    if kind == "eval":
        return 0.1 * max(1, cells)
    return 1.0


def fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(p: dict | None) -> str:
    """``epoch 3/30 top1=91.20 loss=0.412`` (``running`` without progress, e.g. a stage or eval run)."""
    if not p:
        return "running"
    out = f"epoch {p['epoch']}/{p['epochs']}"
    if p.get("steps") and 0 < int(p.get("step") or 0) < int(p["steps"]):
        out += f" step {p['step']}/{p['steps']}"
    last = metrics_text(p)
    return f"{out} {last}" if last else out


def metrics_text(p: dict) -> str:
    """``top1=91.20 loss=0.412``: the last evaluated metric and the last epoch's training loss, if any."""
    out = []
    if p.get("value") is not None:
        out.append(f"{p.get('metric') or 'metric'}={p['value']:.2f}")
    if p.get("loss") is not None:
        out.append(f"loss={p['loss']:.3f}")
    return " ".join(out)


_RUN_BAR = "{desc}: {percentage:3.0f}%|{bar}| epoch {n_fmt}/{total_fmt}{postfix}"


def _is_terminal(stream) -> bool:
    if os.environ.get("SLURM_JOB_ID"):  # inside a SLURM job stdout is a file, whatever isatty says
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LiveProgress:
    """What the scheduler shows while it waits: call :meth:`poll` with the runs now running (each with its run
    folder), :meth:`finished` when a run's record is in, :meth:`log` for the scheduler's own lines (so they do not
    tear a bar), and :meth:`close` at the end.

    ``tty`` None: tqdm bars when ``stream`` is a terminal (and not under SLURM), plain lines otherwise."""

    def __init__(self, total: int, *, stream=None, tty: bool | None = None, every_s: float | None = None,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 work: dict[str, float] | None = None, keys: dict[str, str] | None = None):
        self.total, self.done = int(total), 0
        #: run name -> its expected work in epochs (:func:`expected_work`), times the steps of an epoch of its data
        #: (``keys``: run name -> data key) once a run of that data has reported them; without ``work`` every run
        #: counts as one unit
        self.work = dict(work or {})
        self.keys = dict(keys or {})
        self.steps: dict[str, int] = {}  # data key -> steps per epoch, learned from the runs' progress
        self._finished: list[str | None] = []
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _is_terminal(self.stream) if tty is None else bool(tty)
        self.every_s = _env_float("KDBENCH_PROGRESS_EVERY", 10.0) if every_s is None else float(every_s)
        self._log = log
        self.clock = clock
        self.t0 = clock()
        self._said: dict[str, tuple[int, float]] = {}  # key -> (epoch, time) of its last plain line
        self._bars: dict[str, object] = {}
        self._main = None
        if self.tty:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._main = tqdm(total=self.total, desc="runs", unit="run", file=self.stream, dynamic_ncols=True,
                              position=0, leave=True)

    # -- the scheduler's lines
    def log(self, line: str) -> None:
        if self._main is not None:
            self._tqdm.write(line, file=self.stream)
        elif self._log is not None:
            self._log(line)
        else:
            print(line, file=self.stream, flush=True)

    def finished(self, n: int = 1, name: str | None = None) -> None:
        self.done += n
        self._finished += [name] * (1 if name is not None else n)
        if self._main is not None:
            self._main.update(n)

    def weight(self, name: str | None) -> float:
        """A run's expected work: its epochs (and teacher factor) times the steps of an epoch of its data, the mean
        of the known steps while its data has reported none."""
        if name not in self.work:
            return (sum(self.weight(n) for n in self.work) / len(self.work)) if self.work else 1.0
        known = list(self.steps.values())
        steps = self.steps.get(self.keys.get(name, ""), (sum(known) / len(known)) if known else 1.0)
        return self.work[name] * steps

    @property
    def total_work(self) -> float:
        unit = self.weight(None)
        return sum(self.weight(n) for n in self.work) + max(0, self.total - len(self.work)) * unit

    @property
    def done_work(self) -> float:
        return sum(self.weight(n) for n in self._finished)

    def eta(self, running: Iterable[dict | None] | dict[str, dict | None]) -> float | None:
        """Seconds left for all runs: the rate of work so far (finished runs plus the running runs' fractions, each
        weighted by its expected work: epochs, a teacher's forward, corruption cells; one unit each without
        ``work``) applied to the work left; it refines itself as steps complete. None until some work is
        measurably done (:meth:`rough` says when it is still a guess)."""
        items = list(running.items() if isinstance(running, dict) else ((None, p) for p in running))
        for n, p in items:  # learn the steps of an epoch of each run's data
            if n in self.keys and p and p.get("steps"):
                self.steps[self.keys[n]] = int(p["steps"])
        work = self.done_work + sum(fraction(p) * self.weight(n) for n, p in items)
        spent = self.clock() - self.t0
        total = self.total_work
        self._done_fraction = work / total if total else 0.0
        if work <= 0 or spent <= 0:
            return None
        return spent / work * max(0.0, total - work)

    def rough(self) -> bool:
        """The ETA rests on under 5 % of the work, or no run has finished yet: a guess, said as such."""
        return getattr(self, "_done_fraction", 0.0) < 0.05 or self.done == 0

    def _eta_text(self, eta: float | None) -> str:
        return f"ETA {fmt_time(eta)}" + (" (rough)" if eta is not None and self.rough() else "")

    # -- the running runs
    def poll(self, running: Iterable[tuple[str, str | os.PathLike]]) -> None:
        """``running``: (name, run dir) of each run now running, e.g. ("teacher resnet20→resnet8 s0", dir)."""
        running = list(running)
        progs = {name: read_progress(d, since=self.t0 - 1) for name, d in running}
        eta = self.eta(progs)
        if self._main is not None:
            self._poll_tty(progs, eta)
            return
        now = self.clock()
        for name, p in progs.items():
            if p is None:
                continue
            last = self._said.get(name)
            if last is not None and (p["epoch"] == last[0] or now - last[1] < self.every_s):
                continue
            self._said[name] = (p["epoch"], now)
            left = run_eta(p)
            self.log(f"[{self.done}/{self.total} runs done, {self._eta_text(eta)}] {name}: {describe(p)}"
                     + (f" (run ETA {fmt_time(left)})" if left is not None else ""))

    def _poll_tty(self, progs: dict, eta: float | None) -> None:
        self._main.set_postfix_str(f"{len(progs)} running, {self._eta_text(eta)}", refresh=False)
        self._main.refresh()
        for name in [n for n in self._bars if n not in progs]:
            self._bars.pop(name).close()
        used = {getattr(b, "pos", 0) for b in self._bars.values()}
        for name, p in progs.items():
            bar = self._bars.get(name)
            if bar is None:
                slot = next(i for i in itertools.count(1) if i not in used and -i not in used)
                used.add(slot)
                # tqdm's own rate would count from the bar's creation (the worker's start-up): our ETA instead
                bar = self._bars[name] = self._tqdm(total=(p or {}).get("epochs") or 1, desc=name, unit="ep",
                                                    file=self.stream, position=slot, leave=False,
                                                    dynamic_ncols=True, bar_format=_RUN_BAR)
            if p:
                bar.total = p["epochs"]
                bar.n = max(0, p["epoch"] - 1) + (1 if int(p.get("step") or 0) >= int(p.get("steps") or 1) else 0)
                left = run_eta(p)
                bar.set_postfix_str(" ".join(x for x in (metrics_text(p), left is not None and f"ETA {fmt_time(left)}")
                                             if x), refresh=False)
            bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self._main is not None:
            self._main.close()
            self._main = None


def current_run(run_dirs: Iterable[str | os.PathLike], since: float) -> int | None:
    """Index of the run a job works on now: the job runs ``run_dirs`` in turn, so the first one without a record
    written since ``since`` (None when every one has its record)."""
    for i, d in enumerate(run_dirs):
        try:
            if os.stat(Path(d) / RECORD_FILE).st_mtime >= since:
                continue
        except OSError:
            pass
        return i
    return None
