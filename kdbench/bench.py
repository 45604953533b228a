"""``kdbench bench SUITE``: what one training step of every (pair, method) of a suite costs, on random weights and
synthetic batches of the suite's shapes (no data, no checkpoints needed).

For each pair it times, in the same process and interleaved round robin over every entry (a slow spell of a
shared machine, which only ever adds time, then hits every entry alike):

* ``student step``: the student trained alone (the ``baseline`` step: forward, cross-entropy, backward, SGD);
* ``teacher fwd``: the teacher's plain forward (logits) under ``no_grad``, as :func:`kdbench.step.train_step` runs it;
* each method's step: :func:`kdbench.step.train_step` exactly as :func:`kdbench.train.fit` runs it, models
  prepared by :func:`kdbench.perf.prepare_models` (memory format, device) as in a real run.

Reported per entry: the minimum and median step time, ``step / floor`` with ``floor = min(student step) +
min(teacher fwd)`` (what any distillation step must at least cost), samples/s at the minimum, the peak memory
of one step (CUDA: the allocator's peak; CPU: the peak of bytes allocated during the step, from the profiler's
memory events) and the method's extra (learnable) parameters. A method with a stage (FreeKD, AFP) uses its
seeded prompts: the stage is a one-off cost, not part of a step.

    kdbench bench suites/quickstart.yaml [--filter GLOB] [--steps 5] [--format md|csv] [--out results/...]
    python -m kdbench.bench suites/quickstart.yaml

The timing helpers (:func:`interleaved_times`, :func:`summarize`) are shared with ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

COLUMNS = ("pair", "label", "method", "min_ms", "median_ms", "step_over_floor", "samples_per_s", "peak_mem_mb",
           "extra_params")


# -- timing core (shared with benchmarks/bench_detection.py and benchmarks/bench_vs_reference.py) -------------
def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of ``fns[k]()``: ``warmup`` untimed calls of every entry, then ``rounds`` rounds that
    call every entry once, in order. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """``(min, median)`` of each entry's times."""
    return ({k: min(v) for k, v in times.items()}, {k: statistics.median(v) for k, v in times.items()})


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's own log lines (written to file descriptor 2)."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], Any], device) -> float:
    """Peak memory one call of ``fn`` allocates beyond what was allocated before it, in MiB. CUDA: the caching
    allocator's peak; CPU: the running sum of the profiler's allocation/free events (``profile_memory``)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


# -- building the entries of a suite ---------------------------------------------------------------------------
@dataclass
class Entry:
    pair: str
    label: str
    method: str
    step: Callable[[], Any]
    extra_params: int = 0
    kind: str = "method"  # "student" | "teacher" | "method" | "cohort"
    member: tuple | None = None  # a method entry: (student, teacher or None, method, task, batch, setup)


@dataclass
class _Synthetic:
    """A stand-in for a classification dataset: random images of the suite's shape (what ``build_context`` and
    ``task.example_input`` read), without the data."""

    num_classes: int
    in_chans: int
    image_size: int
    n: int
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)

    def __post_init__(self):
        import torch

        g = torch.Generator().manual_seed(0)
        x = torch.randn(max(2, self.n), self.in_chans, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (x.shape[0],), generator=g)
        self.train = [(x[i], y[i]) for i in range(self.n)]
        self.val = [(x[i], y[i]) for i in range(2)]


def synthetic_data(task, data_spec: dict, batch_size: int):
    """``(data, x, y)``: a dataset stand-in and one batch of the shapes ``data_spec`` gives. Shapes come from the
    dataset plugin (``synthetic_shape``) without touching the data; a plugin that cannot tell builds its data
    (digits ships with scikit-learn)."""
    import torch

    if task.name != "classification":
        raise ValueError(f"kdbench bench times classification suites; for {task.name} use "
                         "benchmarks/bench_detection.py")
    opts = {k: v for k, v in data_spec.items() if k not in ("name", "root")}
    plugin = task.dataset_plugin(data_spec["name"])
    shape = plugin.synthetic_shape(**opts)
    if shape is None:
        real = task.build_data(data_spec)
        shape = (real.num_classes, real.in_chans, real.image_size)
    data = _Synthetic(*shape, n=batch_size)
    x = torch.stack([s[0] for s in data.train])
    y = torch.stack([s[1] for s in data.train])
    return data, x, y


def _matches(spec, pattern: str | None) -> bool:
    return not pattern or any(fnmatch.fnmatch(v, pattern)
                              for v in (spec.label, spec.method, spec.pair, f"{spec.label}/{spec.pair}"))


def _teacher_model_spec(suite, spec) -> dict | None:
    """The teacher model (``{"model", "kwargs"}``) of ``spec``'s pair: the pair's checkpoint teacher, or the
    model of the suite-trained teacher run it needs."""
    if spec.teacher:
        return spec.teacher
    by_id = {s.run_id: s for s in suite.specs}
    needs = tuple(getattr(spec, "needs", ()) or ()) + ((spec.teacher_run,) if spec.teacher_run else ())
    for rid in needs:
        dep = by_id.get(rid)
        if dep is not None and dep.kind == "teacher":
            return dep.student
    return None


def _load_stage_seeded(method) -> None:
    """Use the method's seeded (untuned) stage state: stage 1 is a one-off cost, not part of a step."""
    prompts = getattr(method, "prompts", None)
    if prompts is None:
        raise ValueError(f"{type(method).__name__} has a stage but no seeded state to time a step with")
    method.load_stage({k: v.clone() for k, v in prompts.state_dict().items()})


def build_entries(suite, pattern: str | None = None, device=None, log=print,
                  cohort: bool = False) -> list[tuple[str, dict, list[Entry]]]:
    """Per pair of ``suite`` (its runs matching ``pattern`` on label, method or pair): ``(pair, info, entries)``
    with the student-step and teacher-forward entries first, then one entry per method label (first seed), and
    with ``cohort`` a last entry: the step of all of them as one cohort (:func:`cohort_step`)."""
    import torch

    from kdbench.method import Batch
    from kdbench.models.sources import build_model
    from kdbench.registry import METHODS, TASKS
    from kdbench.runner import build_context
    from kdbench.perf import prepare_models
    from kdbench.recipe import Recipe, amp_dtype, build_mixup, build_optimizer, mix_batch, mixup_seed, teacher_dtype
    from kdbench.step import StepSetup, train_step

    device = device or torch.device("cpu")
    runs = [s for s in suite.specs if s.kind == "distill" and _matches(s, pattern)]
    if not runs:
        raise ValueError(f"no distillation run of suite {suite.name!r} matches --filter {pattern!r}")
    pairs: dict[str, list] = {}
    for s in runs:
        lst = pairs.setdefault(s.pair, [])
        if all(o.label != s.label for o in lst):
            lst.append(s)
    out = []
    for pair, specs in pairs.items():
        first = specs[0]
        task = TASKS.get(first.task)()
        bs = Recipe.of(first.recipe).batch_size
        data, x_cpu, y_cpu = synthetic_data(task, first.data, bs)
        t_spec = next((t for t in (_teacher_model_spec(suite, s) for s in specs) if t), None)
        if t_spec is None:  # a pair whose matching runs are all baselines: time the student only
            t_spec = next((_teacher_model_spec(suite, s) for s in suite.specs
                           if s.pair == pair and s.kind == "distill" and _teacher_model_spec(suite, s)), None)
        torch.manual_seed(0)
        teacher = build_model(t_spec["model"], data.num_classes, data.in_chans, **t_spec.get("kwargs", {})) \
            if t_spec else None
        if teacher is not None:
            prepare_models(None, teacher, None, device)
        info = {"batch_size": bs, "input": f"{data.in_chans}x{data.image_size}x{data.image_size}",
                "student": first.student["model"], "teacher": t_spec["model"] if t_spec else None,
                "num_classes": data.num_classes}
        entries: list[Entry] = []

        def make(spec, kind: str) -> Entry:
            cls = METHODS.get(spec.method if kind == "method" else "baseline")
            torch.manual_seed(0)
            student = build_model(spec.student["model"], data.num_classes, data.in_chans,
                                  **spec.student.get("kwargs", {}))
            t = teacher if cls.needs_teacher else None
            recipe = Recipe.of(spec.recipe)
            ctx = build_context(task, data, recipe, student, t, device, spec.student["model"],
                                t_spec["model"] if (t_spec and t is not None) else "")
            method = cls(ctx, **cls.check_params(spec.params if kind == "method" else {}))
            if cls.stage_params:
                _load_stage_seeded(method)
            x, y = prepare_models(student, t, method, device, x_cpu, y_cpu, task=task)
            task.configure_training(recipe)  # as fit: the recipe's label smoothing in the task loss
            mixup = build_mixup(recipe, data.num_classes)
            if mixup is not None:  # as fit: a mixed batch (soft targets); a copy, since mixup works in place
                x, y = mix_batch(mixup, x.clone(), y, mixup_seed(0, 1, 0))
            params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
            opt = build_optimizer(params, recipe.optimizer, modules=(student, method))
            batch = Batch(inputs=x, targets=y, epoch=max(1, recipe.epochs // 2), step=0, epochs=recipe.epochs,
                          steps_per_epoch=1)
            amp = amp_dtype(recipe.amp, device)  # as fit: AMP, bf16 teacher, compile on GPU per recipe
            setup = StepSetup(optimizer=opt, params=params,
                              scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
                              amp=amp or False, grad_clip=recipe.grad_clip, device=device, taps=method.taps(),
                              teacher_amp=teacher_dtype(recipe, device) if t is not None else None,
                              student_forward=torch.compile(student) if recipe.compile else None)

            def step():
                train_step(student, t, method, task, batch, setup)

            return Entry(pair, spec.label if kind == "method" else "(student step)", spec.method if kind == "method"
                         else "baseline", step, method.extra_parameters(), kind,
                         member=(student, t, method, task, batch, setup))

        entries.append(make(first, "student"))
        if teacher is not None:
            x_t, _ = prepare_models(None, teacher, None, device, x_cpu, y_cpu, task=task)
            t_amp = teacher_dtype(first.recipe, device)

            def teacher_fwd(x_t=x_t, teacher=teacher, t_amp=t_amp):
                with torch.no_grad(), torch.autocast(device.type, dtype=t_amp, enabled=t_amp is not None):
                    task.forward(teacher, x_t, None, ())

            entries.append(Entry(pair, "(teacher forward)", "", teacher_fwd, 0, "teacher"))
        for spec in specs:
            log(f"  building {pair} / {spec.label}")
            entries.append(make(spec, "method"))
        if cohort:
            members = [e.member for e in entries if e.kind == "method"]
            if teacher is not None:  # the forward a cohort shares: the union of its members' teacher taps
                union = tuple(dict.fromkeys(t for m in members if m[1] is not None for t in m[5].taps.teacher))

                def teacher_taps(x_t=x_t, teacher=teacher, t_amp=t_amp, union=union):
                    with torch.no_grad(), torch.autocast(device.type, dtype=t_amp, enabled=t_amp is not None):
                        task.forward(teacher, x_t, None, union)

                entries.append(Entry(pair, "(teacher forward, all taps)", "", teacher_taps, 0, "teacher_taps"))
            entries.append(Entry(pair, "(cohort step)", "", cohort_step(members, device), 0, "cohort"))
        out.append((pair, info, entries))
    return out


def cohort_step(members: list[tuple], device) -> Callable[[], None]:
    """One step of a cohort of these method entries, as :func:`kdbench.train.fit_cohort` takes it: the teacher's
    forward once with the union of the members' taps, then every member's :func:`kdbench.step.train_step` with its
    part of it."""
    import torch

    from kdbench.step import teacher_forward, train_step
    from kdbench.train import _only_taps

    with_teacher = [m for m in members if m[1] is not None]
    union = tuple(dict.fromkeys(t for m in with_teacher for t in m[5].taps.teacher))

    def step():
        t_all = None
        if with_teacher:
            student, teacher, method, task, batch, setup = with_teacher[0]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                t_all = teacher_forward(teacher, task, batch.inputs, union, setup, device)
        for student, teacher, method, task, batch, setup in members:
            t_out = None if teacher is None else _only_taps(t_all, setup.taps.teacher)
            train_step(student, teacher, method, task, batch, setup, teacher_out=t_out)

    return step


def run_bench(suite_path: str | os.PathLike, pattern: str | None = None, steps: int = 5, device: str | None = None,
              overrides: list[str] = (), memory: bool = True, log=print, cohort: bool = False) -> tuple[list[dict], dict]:
    """Rows (one per entry, see :data:`COLUMNS`) and facts about the measurement (threads, device, rounds)."""
    import torch

    from kdbench.allocator import allocator_state
    from kdbench.models import frozen
    from kdbench.suite import load_suite

    suite = load_suite(suite_path, list(overrides))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    groups = build_entries(suite, pattern, dev, log=log, cohort=cohort)
    rows: list[dict] = []
    for pair, info, entries in groups:
        fns = {i: e.step for i, e in enumerate(entries)}
        log(f"timing {pair}: {len(entries)} entries x {steps} interleaved rounds")
        best, med = summarize(interleaved_times(fns, steps, warmup=1, sync=sync))
        floor = best[0] + (best[1] if len(entries) > 1 and entries[1].kind == "teacher" else 0.0)
        if cohort:  # one row per pair: the members' solo steps summed against the cohort's step
            methods = [i for i, e in enumerate(entries) if e.kind == "method"]
            solo = sum(best[i] for i in methods)
            t_fwd = next((best[i] for i, e in enumerate(entries) if e.kind == "teacher_taps"), 0.0)
            n_t = sum(1 for i in methods if entries[i].member[1] is not None)
            rows.append({"pair": pair, "members": len(methods), "solo_ms_sum": 1000 * solo,
                         "cohort_ms": 1000 * best[len(entries) - 1], "ratio": best[len(entries) - 1] / solo,
                         "teacher_ms": 1000 * t_fwd,
                         "bound": (solo - max(0, n_t - 1) * t_fwd) / solo, "student": info["student"],
                         "teacher": info["teacher"], "batch_size": info["batch_size"], "input": info["input"],
                         "labels": " ".join(entries[i].label for i in methods)})
            continue
        for i, e in enumerate(entries):
            mem = peak_memory_mb(e.step, dev) if memory else float("nan")
            rows.append({"pair": pair, "label": e.label, "method": e.method, "min_ms": 1000 * best[i],
                         "median_ms": 1000 * med[i],
                         "step_over_floor": best[i] / floor if e.kind == "method" else float("nan"),
                         "samples_per_s": info["batch_size"] / best[i], "peak_mem_mb": mem,
                         "extra_params": e.extra_params, "batch_size": info["batch_size"], "input": info["input"],
                         "student": info["student"], "teacher": info["teacher"], "kind": e.kind})
    facts = {"suite": suite.name, "device": str(dev), "threads": torch.get_num_threads(), "rounds": steps,
             "torch": torch.__version__, "filter": pattern, "cpus": os.cpu_count(),
             "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
             "cpu_allocator": allocator_state(),
             "teacher_graph": frozen.mode() if dev.type == "cpu" else None}
    return rows, facts


def _fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, float):
        return "–" if v != v else f"{v:.{nd}f}"
    return str(v)


def format_md(rows: list[dict], facts: dict) -> str:
    out = [f"# Step cost: {facts['suite']}", "",
           f"`kdbench bench` on {facts['device']}, {facts['threads']} threads, torch {facts['torch']}; random "
           f"weights, synthetic batches; min and median of {facts['rounds']} interleaved rounds. "
           "floor = student step + teacher forward (each timed alone); peak memory = one step's allocations"
           + (f"; CPU allocator: {facts['cpu_allocator']} (kdbench.allocator)" if facts.get("cpu_allocator") else "")
           + (f"; CPU teacher forward: {facts['teacher_graph']} (kdbench.models.frozen)"
              if facts.get("teacher_graph") else "")
           + ".", ""]
    # busy: more load than the bench's own threads (or the CPUs) account for
    if facts.get("load") == facts.get("load") and facts.get("load") is not None and facts.get("cpus"):
        out[-1:] = [f"Machine load at the end: {facts['load']:.1f} on {facts['cpus']} CPUs"
                    + (" (busy: absolute times are inflated, compare ratios within one table)"
                       if facts["load"] > max(facts["cpus"], facts.get("threads") or 0) + 0.75 else "") + ".", ""]
    pairs: dict[str, list[dict]] = {}
    for r in rows:
        pairs.setdefault(r["pair"], []).append(r)
    for pair, rs in pairs.items():
        r0 = rs[0]
        out += [f"## {pair}", "", f"student `{r0['student']}`, teacher `{r0['teacher']}`, batch {r0['batch_size']} "
                f"× {r0['input']}", "",
                "| entry | method | step ms (min) | median | step / floor | samples/s | peak MiB | extra params |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            out.append(f"| {r['label']} | {r['method']} | {_fmt(r['min_ms'], 1)} | {_fmt(r['median_ms'], 1)} | "
                       f"{_fmt(r['step_over_floor'])} | {_fmt(r['samples_per_s'], 0)} | {_fmt(r['peak_mem_mb'], 1)} "
                       f"| {r['extra_params']:,} |")
        out.append("")
    return "\n".join(out)


COHORT_COLUMNS = ("pair", "members", "solo_ms_sum", "cohort_ms", "ratio", "teacher_ms", "bound")


def format_cohort_md(rows: list[dict], facts: dict) -> str:
    out = [f"# Cohort step: {facts['suite']}", "",
           f"`kdbench bench --cohort` on {facts['device']}, {facts['threads']} threads, torch {facts['torch']}; random "
           f"weights, synthetic batches; minimum of {facts['rounds']} interleaved rounds of every method's step alone "
           "and of the cohort's step (one teacher forward with the union of the taps, then every member's step). "
           "ratio = cohort / sum of the solo steps; teacher forward = the teacher's forward with the union of the "
           "members' taps; bound = the ratio if sharing saved exactly that forward for all members but one (what "
           "the teacher alone accounts for; the cohort can do better: one batch and one layout conversion per step, "
           "and the teacher's weights stay in cache).", ""]
    if facts.get("load") == facts.get("load") and facts.get("load") is not None and facts.get("cpus"):
        out[-1:] = [f"Machine load at the end: {facts['load']:.1f} on {facts['cpus']} CPUs.", ""]
    out += ["| pair | members | solo steps, sum (ms) | cohort step (ms) | ratio | teacher forward (ms) | bound |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['pair']} | {r['members']} | {_fmt(r['solo_ms_sum'], 1)} | {_fmt(r['cohort_ms'], 1)} | "
                   f"{_fmt(r['ratio'])} | {_fmt(r['teacher_ms'], 1)} | {_fmt(r['bound'])} |")
    out += ["", "Members: " + "; ".join(f"{r['pair']}: {r['labels']}" for r in rows), ""]
    return "\n".join(out)


def format_csv(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    buf = io.StringIO()
    cols = list(columns) if columns else list(COLUMNS) + ["batch_size", "input", "student", "teacher", "kind"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite YAML")
    p.add_argument("--filter", metavar="GLOB", help="only runs whose label, method or pair matches GLOB")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds per entry (default 5)")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--out", metavar="PATH", help="also write the table (and PATH with .csv: the CSV) here")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: KDBENCH_THREADS or torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--cohort", action="store_true",
                   help="per pair: the sum of the methods' solo steps against one cohort step of all of them "
                        "(shared teacher forward; kdbench/cohort.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite value, e.g. --set recipe.batch_size=128 (repeatable)")


def run_cli(a: argparse.Namespace) -> int:
    import torch

    threads = a.threads or int(os.environ.get("KDBENCH_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        rows, facts = run_bench(a.suite, a.filter, a.steps, a.device, a.overrides, memory=not a.no_memory,
                                log=lambda m: print(m, file=sys.stderr), cohort=a.cohort)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"kdbench bench: {e}", file=sys.stderr)
        return 2
    if a.cohort:
        md, text_csv = format_cohort_md(rows, facts), format_csv(rows, COHORT_COLUMNS)
    else:
        md, text_csv = format_md(rows, facts), format_csv(rows)
    print(md if a.format == "md" else text_csv, end="" if a.format == "csv" else "\n")
    if a.out:
        from kdbench.results import prepare_output

        out = prepare_output(a.out)
        out.write_text(md + "\n" if out.suffix != ".csv" else text_csv)
        out.with_suffix(".csv").write_text(text_csv)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdbench bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
